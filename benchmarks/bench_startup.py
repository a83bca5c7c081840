"""Start-up of `sparsebench train` against a bare `import torch`, measured side by side.

Prints the median of each, and the ratios the issue tracker asked for:

* the README main job from process start to its first training step (the trainer prints the
  number of planned mask updates just before the loop: the process is stopped there);
* `dry_run=true` from start to exit;

each over `python -c "import torch"`, and, for reference, over `import torch; import
torch._dynamo`: every torch.optim optimizer imports torch._dynamo (about as costly as torch
itself) on its first use, a floor no torch training script avoids.

    python benchmarks/bench_startup.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

FIRST_STEP_MARK = "mask updates planned"


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def until_first_step(command: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if FIRST_STEP_MARK in line:
                return time.perf_counter() - start
        raise RuntimeError(f"{' '.join(command)} ended before its first training step")
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as root:
        cases = {
            "import torch": lambda: timed([python, "-c", "import torch"]),
            "import torch + torch._dynamo": lambda: timed([python, "-c", "import torch, torch._dynamo"]),
            # a fresh results_root each time, so the run really starts (not "already complete")
            "main job to its first step": lambda: until_first_step(
                [python, "-m", "sparsebench", "train", "method=gap", "sparsity=0.9", "progress=none",
                 f"results_root={tempfile.mkdtemp(dir=root)}"]),
            "dry_run=true": lambda: timed([python, "-m", "sparsebench", "train", "dry_run=true"]),
        }
        for case in cases.values():  # warm-up: page cache, the MNIST-1D cache file
            case()
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved, so drift of a shared machine hits all alike
            for name, case in cases.items():
                samples[name].append(case())
    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"start-up, median of {args.repeats} (load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    for name, value in median.items():
        print(f"  {name:<32} {value:6.2f} s   {value / median['import torch']:.2f}x import torch   "
              f"{value / median['import torch + torch._dynamo']:.2f}x torch + dynamo")


if __name__ == "__main__":
    main()
