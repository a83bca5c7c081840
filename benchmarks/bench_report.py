"""Time `sparsebench report` on a synthetic sweep of 5,000 runs.

    .venv/bin/python benchmarks/bench_report.py [--runs 5000] [--keep DIR]

Writes realistic run directories (resolved config.yaml, ten metrics.jsonl lines with per-layer
densities, mask_updates.jsonl for the methods that change masks, final.json with every key the
trainer writes, a bench.json beside one run in ten; about 1% of runs incomplete, diverged or
corrupt), then times the report without and with plots and prints the seconds. Target: 10 s
without plots.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from sparsebench.report import main  # noqa: E402

DATASETS = ("cifar10", "cifar100", "svhn", "tiny_imagenet")
MODELS = ("resnet20", "vgg16", "wrn22_2")
DISTRIBUTIONS = ("erk", "uniform")
METHODS = ("set", "rigl", "snip", "grasp", "synflow", "static", "magnitude")
DYNAMIC = ("set", "rigl")  # change masks every UPDATE_EVERY steps; magnitude prunes at a few steps
UPDATE_EVERY = 100
STEPS_PER_EPOCH = 390
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
SEEDS = range(6)
EPOCHS = 10
LAYERS = [f"layer{stage}.{block}.conv{conv}.weight" for stage in (1, 2, 3) for block in (0, 1, 2) for conv in (1, 2)]
DENSE_FLOPS = 4.1e16
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def sweep() -> list[tuple[str, str, str, str, float, int]]:
    """Every (dataset, model, method, distribution, sparsity, seed) of the sweep, dense runs first."""
    dense = [(d, m, "dense", "uniform", 0.0, s) for d, m, s in itertools.product(DATASETS, MODELS, SEEDS)]
    sparse = [
        (d, m, method, dist, sparsity, s)
        for d, m, dist, method, sparsity, s in itertools.product(DATASETS, MODELS, DISTRIBUTIONS, METHODS, SPARSITIES, SEEDS)
    ]
    return dense + sparse


def config(dataset, model, method, distribution, sparsity, seed) -> dict:
    return {
        "exp": f"{method}_{dataset}", "seed": seed, "epochs": EPOCHS, "sparsity": sparsity, "batch_size": 128,
        "eval_batch_size": 1000, "label_smoothing": 0.0, "device": "auto", "amp": False, "powerprop": 1.0,
        "sparse_init": "none", "results_root": "results", "progress": "none", "num_workers": 4,
        "method": {"name": method, "update_frequency": UPDATE_EVERY, "drop_fraction": 0.3, "drop_schedule": "cosine"},
        "model": {"name": model, "width": 1, "num_classes": 100 if dataset == "cifar100" else 10},
        "dataset": {"name": dataset, "data_dir": "data", "download": False, "augment": True},
        "distribution": {"name": distribution, "erk_power_scale": 1.0, "dense_first_layer": False},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "paper": {"source": "Evci et al. 2020, Rigging the Lottery", "test_acc": {"rigl": {0.9: 91.2, 0.95: 89.9}}},
    }


def write_run(root: Path, rng: random.Random, dataset, model, method, distribution, sparsity, seed) -> None:
    run = root / "bench" / dataset / model / method / f"sparsity={sparsity}" / f"seed={seed}-{rng.getrandbits(32):08x}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.dump(config(dataset, model, method, distribution, sparsity, seed), Dumper=_DUMPER))
    target = 92.0 - 10 * sparsity**4 + rng.gauss(0, 0.3)
    density = 1 - sparsity
    lines = []
    itop = density
    for epoch in range(1, EPOCHS + 1):
        itop = min(1.0, itop + (0.03 if method in DYNAMIC else 0.0))
        accuracy = target * (1 - 0.5 ** epoch)
        lines.append(json.dumps({
            "epoch": epoch, "step": epoch * STEPS_PER_EPOCH, "lr": 0.1, "itop_rate": itop, "ece": 3.0, "train_loss": 2.3 / epoch, "train_acc": accuracy + 3,
            "test_loss": 2.0 / epoch, "test_acc": accuracy, "actual_sparsity": sparsity, "weights_changed": 1200,
            "train_flops": DENSE_FLOPS * density * epoch / EPOCHS, "wall_time_s": 30.0 * epoch,
            "layer_densities": {layer: min(1.0, density * (1 + 0.05 * i)) for i, layer in enumerate(LAYERS)},
        }))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    update_steps = (
        range(UPDATE_EVERY - 1, EPOCHS * STEPS_PER_EPOCH * 3 // 4, UPDATE_EVERY) if method in DYNAMIC
        else range(STEPS_PER_EPOCH - 1, EPOCHS * STEPS_PER_EPOCH // 2, STEPS_PER_EPOCH) if method == "magnitude"
        else ()
    )
    updates = [
        json.dumps({"step": step, "epoch": step // STEPS_PER_EPOCH + 1, "layers": {
            layer: {"dropped": 120 + i, "grown": 120 + i if method in DYNAMIC else 0} for i, layer in enumerate(LAYERS)
        }})
        for step in update_steps
    ]
    if updates:
        (run / "mask_updates.jsonl").write_text("\n".join(updates) + "\n")
    fate = rng.random()
    if fate < 0.005:
        return  # still running: no final.json
    final = {
        "status": "diverged" if fate < 0.01 else "completed", "method": method, "model": model, "dataset": dataset,
        "distribution": distribution, "sparsity": sparsity, "actual_sparsity": sparsity, "test_acc": target,
        "best_test_acc": target + 0.2, "test_loss": 0.3, "train_flops": DENSE_FLOPS * max(density, 0.01),
        "train_flops_dense": DENSE_FLOPS, "wall_time_s": 300.0, "seed": seed, "epochs": EPOCHS,
        "layer_densities": json.loads(lines[-1])["layer_densities"], "ece": 0.03, "steps": EPOCHS * STEPS_PER_EPOCH,
        "itop_rate": itop, "input_shape": [3, 32, 32], "num_classes": 100 if dataset == "cifar100" else 10,
        "chance_acc": 1.0 if dataset == "cifar100" else 10.0, "inference_flops": 4.1e7 * max(density, 0.01),
        "inference_flops_dense": 4.1e7,
    }
    if fate > 0.9:  # `sparsebench bench RUN_DIR` measured this one
        (run / "bench.json").write_text(json.dumps({
            "inference": [{"format": fmt, "batch_size": batch, "speedup_vs_dense": 1 + sparsity * speed}
                          for fmt, speed in (("csr", 0.8), ("bsr", 1.1)) for batch in (1, 256)],
            "train_step": {"speedup_vs_dense": 0.95},
        }))
    text = json.dumps(final)
    (run / "final.json").write_text(text[: len(text) // 2] if fate > 0.997 else text)  # a few corrupt files


def time_report(root: Path, *options: str) -> float:
    messages = io.StringIO()
    started = time.perf_counter()
    # The terminal's speed is not the report's: swallow the printed Markdown.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(messages):
        code = main([str(root), *options])
    elapsed = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"report exited with {code}: {messages.getvalue()}")
    return elapsed


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--keep", type=Path, help="build the tree here and keep it (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        rng = random.Random(0)
        started = time.perf_counter()
        for run in sweep()[: args.runs]:
            write_run(root, rng, *run)
        print(f"built {args.runs} runs in {time.perf_counter() - started:.1f} s under {root}")
        print(f"report --no-plots: {time_report(root, '--no-plots'):.2f} s")
        print(f"report with plots: {time_report(root):.2f} s")


if __name__ == "__main__":
    main_bench()
