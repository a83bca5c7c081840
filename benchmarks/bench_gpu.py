"""GPU kernels for issue #10, side by side in one run (not a test): 2:4 and BSR/CSR against dense.

    python benchmarks/bench_gpu.py [--repeats 25] [--json FILE]
    python benchmarks/bench_gpu.py --smoke     # tiny sizes on this machine's device: checks the script

Needs a CUDA GPU for its figures. `--smoke` runs every section at toy sizes on whatever device
there is (the CPU here), 2:4 skipped with its reason off CUDA: it checks the script, it measures
nothing. Every case is guarded: one that fails prints one line (what, and torch's message) and
the others still run, since a GPU is lent rarely and briefly.

1. 2:4 semi-structured (`kernels.to_semi_structured`: torch's to_sparse_semi_structured, which
   is cuSPARSELt on Hopper), float16 and bfloat16, weights pruned 2:4 by magnitude, linears
   (out, in) = 4096x4096, 8192x8192 and 4096x16384 (a feed-forward down projection) at 256 and
   4096 input rows:
   * forward: F.linear(x, W as 2:4) against F.linear(x, W);
   * a training step of the layer (forward, backward, SGD with momentum, gradient and weight
     masked as the engine does) on `backend=sparse`'s 2:4 path (`two_four.forward`): the
     forward is the 2:4 product of the weight compressed afresh after every update (the
     re-sparsification torch's semi-structured training examples do), the backward is dense
     (W^T of a row-wise 2:4 mask is not 2:4, and torch's 2:4 tensors multiply only by
     themselves).
2. BSR (16, 32, 64: torch's CUDA BSR product, Triton where torch dispatches to it) and CSR
   (cuSPARSE) against dense for a 4096x4096 linear at batch 256, s = 0.9 and 0.95 (block masks
   for BSR, uniformly random for CSR), float32 and float16: the forward (`SparseLinear`), and,
   float32, one layer's share of a training step under `backend=sparse` against the masked step
   (`backend.probe`, as the trainer measures it, CSR and BSR-32 on a 32x32 block mask).

Timing: `sparsebench bench`'s (CUDA events around each call, perf_counter off CUDA), warm-up,
candidates interleaved in a rotating order; speedup = median over repeats of dense time /
candidate time of the same repeat.
Targets (issue #10): 2:4 >= 1.3x dense (forward and training step); BSR-32 >= 1.3x at s >= 0.9.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.bench import interleaved, paired_speedup
from sparsebench.sparse import backend as training_backend
from sparsebench.sparse import two_four
from sparsebench.sparse.kernels import (
    TOLERANCE,
    SparseLinear,
    relative_error,
    semi_structured_problem,
    to_semi_structured,
    to_sparse,
)

SHAPES_2_4 = [(4096, 4096), (8192, 8192), (4096, 16384)]
ROWS_2_4 = [256, 4096]
BSR_SIZE, BSR_BATCH, BLOCKS, SPARSITIES = 4096, 256, (16, 32, 64), (0.9, 0.95)
TARGET = 1.3


def compare(functions: dict[str, Callable[[], object]], repeats: int, warmup: int,
            device: torch.device) -> dict[str, dict]:
    """Each function's median ms and its median paired speedup over functions["dense"]
    (`sparsebench bench`'s interleaved timing: CUDA events on a GPU)."""
    times = interleaved(functions, repeats, warmup, device)
    return {name: {"ms": statistics.median(t) * 1e3, "speedup": paired_speedup(times["dense"], t)}
            for name, t in times.items()}


def guarded(label: str, results: list[dict], fn: Callable[[], dict]) -> None:
    """Run one case; a failure is one line and a record, not the end of the run."""
    try:
        row = fn()
    except Exception as error:  # noqa: BLE001 - a GPU is lent briefly: keep every other figure
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"{label}: FAILED: {type(error).__name__}: {message[:300]}", flush=True)
        results.append({"case": label, "error": f"{type(error).__name__}: {message}"})
        return
    row["case"] = label
    results.append(row)
    cells = "  ".join(f"{name} {v['ms']:.3f} ms ({v['speedup']:.2f}x)" for name, v in row["timings"].items())
    print(f"{label}: {cells}", flush=True)


# ------------------------------------------------------------------------------ 2:4
def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask keeping the two largest |w| of every group of 4 consecutive weights of a row."""
    rows, cols = weight.shape
    groups = weight.abs().reshape(rows, cols // 4, 4)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def case_2_4(out_features: int, in_features: int, rows: int, dtype: torch.dtype, device: torch.device,
             repeats: int, warmup: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5).to(device, dtype)
    mask = prune_2_4(weight)
    weight.mul_(mask)
    keep = mask.to(dtype)
    x = torch.randn(rows, in_features, generator=generator).to(device, dtype)
    grad_y = torch.randn(rows, out_features, generator=generator).to(device, dtype)
    compressed = to_semi_structured(weight, "weight")  # checks device, dtype, shape and pattern once
    error = relative_error(F.linear(x, compressed), F.linear(x, weight))
    if error > TOLERANCE[dtype]:
        raise AssertionError(f"2:4 forward differs from dense: relative error {error:.2e} > {TOLERANCE[dtype]}")
    with torch.no_grad():
        forward = compare({"dense": lambda: F.linear(x, weight), "2:4": lambda: F.linear(x, compressed)},
                          repeats, warmup, device)

    def stepper(kind: str):
        w = weight.clone().requires_grad_()
        xs = x.clone().requires_grad_()
        optimizer = torch.optim.SGD([w], lr=1e-3, momentum=0.9)
        compressed_weight = two_four.CompressedWeight()

        def step():
            optimizer.zero_grad(set_to_none=True)
            xs.grad = None
            if kind == "2:4":  # backend=sparse's 2:4 path: re-compressed because w changed at the last step
                y = two_four.forward(xs, w, None, w, mask, compressed_weight, None)
            else:
                y = F.linear(xs, w)
            y.backward(grad_y)
            if kind != "dense":
                w.grad.mul_(keep)
            optimizer.step()
            if kind != "dense":
                with torch.no_grad():
                    w.mul_(keep)
        return step

    training = compare({kind: stepper(kind) for kind in ("dense", "masked", "2:4")}, repeats, warmup, device)
    return {"shape": [out_features, in_features], "rows": rows, "dtype": str(dtype).replace("torch.", ""),
            "relative_error": error,
            "timings": {"forward dense": forward["dense"], "forward 2:4": forward["2:4"],
                        "step dense": training["dense"], "step masked": training["masked"],
                        "step 2:4 fwd": training["2:4"]}}


# ------------------------------------------------------------------------------ BSR and CSR
def random_mask(rows: int, cols: int, sparsity: float, block: int, generator: torch.Generator) -> torch.Tensor:
    grid = torch.rand(rows // block, cols // block, generator=generator) >= sparsity
    return grid.repeat_interleave(block, 0).repeat_interleave(block, 1)


def case_forward(size: int, batch: int, sparsity: float, dtype: torch.dtype, device: torch.device, repeats: int,
                 warmup: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    dense_weight = (torch.randn(size, size, generator=generator) * size ** -0.5).to(device, dtype)
    x = torch.randn(batch, size, generator=generator).to(device, dtype)
    functions: dict[str, Callable[[], object]] = {"dense": lambda: F.linear(x, dense_weight)}
    errors, skipped = {}, {}
    for fmt, block in [("csr", 1), *(("bsr", b) for b in BLOCKS if size % b == 0)]:
        label = "csr" if fmt == "csr" else f"bsr{block}"
        weight = dense_weight * random_mask(size, size, sparsity, block, generator).to(device)
        try:
            module = SparseLinear(to_sparse(weight, fmt, block if fmt == "bsr" else None), None, fmt,
                                  block if fmt == "bsr" else None)
            with torch.no_grad():
                errors[label] = relative_error(module(x), F.linear(x, weight))
        except Exception as error:  # noqa: BLE001 - e.g. a dtype this kernel lacks: name it, time the rest
            skipped[label] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            print(f"  {label} {str(dtype).replace('torch.', '')} s={sparsity}: skipped: {skipped[label]}")
            continue
        if errors[label] > TOLERANCE[dtype]:
            raise AssertionError(f"{label}: relative error {errors[label]:.2e} > {TOLERANCE[dtype]}")
        functions[label] = lambda m=module: m(x)
    with torch.no_grad():
        timings = compare(functions, repeats, warmup, device)
    return {"size": size, "batch": batch, "sparsity": sparsity, "dtype": str(dtype).replace("torch.", ""),
            "relative_errors": errors, "skipped": skipped, "timings": timings}


def case_training_share(size: int, batch: int, sparsity: float, device: torch.device) -> dict:
    """One layer's share of a training step, sparse backend against masked (what the trainer measures)."""
    module = nn.Linear(size, size).to(device)
    row: dict = {"size": size, "batch": batch, "sparsity": sparsity, "timings": {}}
    for label, block in (("unstructured", None), ("32x32 blocks", 32)):
        dense_ms, sparse_ms, _, fmt = training_backend.probe(module, (size,), 1.0 - sparsity, batch, device,
                                                             block=block, repeats=5)
        row["timings"][f"masked ({label})"] = {"ms": dense_ms, "speedup": 1.0}
        row["timings"][f"sparse {fmt} ({label})"] = {"ms": sparse_ms, "speedup": dense_ms / sparse_ms}
    return row


# ------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device: checks the script only")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("bench_gpu: error: no CUDA GPU here; use --smoke to check the script on this machine", file=sys.stderr)
        return 2
    shapes, rows_2_4, size, batch = SHAPES_2_4, ROWS_2_4, BSR_SIZE, BSR_BATCH
    repeats, warmup = args.repeats, args.warmup
    if args.smoke:
        shapes, rows_2_4, size, batch, repeats, warmup = [(128, 256)], [64], 128, 32, 3, 1
    where = (f"{torch.cuda.get_device_name(device)} (SM {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
             if device.type == "cuda" else "CPU (smoke run: not a measurement)")
    print(f"{where}, torch {torch.__version__}, {repeats} repeats after {warmup} warm-up calls; "
          "speedup = median of dense time / candidate time over interleaved repeats", flush=True)
    results: list[dict] = []

    print("== 2:4 semi-structured: forward, and a training step whose forward is 2:4 (weight re-compressed "
          "each step) and backward dense", flush=True)
    problem = semi_structured_problem(torch.zeros(shapes[0], dtype=torch.float16, device=device), "probe")
    if problem:
        print(f"skipped: {problem}", flush=True)
        results.append({"case": "2:4", "skipped": problem})
    else:
        for dtype in (torch.float16, torch.bfloat16):
            for out_features, in_features in shapes:
                for rows in rows_2_4:
                    label = f"2:4 {str(dtype).replace('torch.', '')} {out_features}x{in_features} rows {rows}"
                    guarded(label, results, lambda: case_2_4(out_features, in_features, rows, dtype, device, repeats,
                                                             warmup))

    print(f"== BSR and CSR forward, {size}x{size} linear, batch {batch}", flush=True)
    for dtype in (torch.float32, torch.float16):
        for sparsity in SPARSITIES:
            label = f"forward {str(dtype).replace('torch.', '')} s={sparsity}"
            guarded(label, results, lambda: case_forward(size, batch, sparsity, dtype, device, repeats, warmup))

    print("== one layer's share of a training step, backend=sparse against masked (float32)", flush=True)
    for sparsity in SPARSITIES:
        guarded(f"training share s={sparsity}", results, lambda: case_training_share(size, batch, sparsity, device))

    if args.json:  # before the verdicts: whatever they meet, the figures are kept
        with open(args.json, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "repeats": repeats, "results": results}, f,
                      indent=2)
    print("== targets", flush=True)
    for row in results:
        timings = row.get("timings")
        if not timings:  # failed or skipped: said above
            continue
        if row["case"].startswith("2:4 "):
            for name in ("forward 2:4", "step 2:4 fwd"):
                verdict = "met" if timings[name]["speedup"] >= TARGET else "MISSED"
                print(f"{row['case']}: {name} {timings[name]['speedup']:.2f}x >= {TARGET}x: {verdict}")
        elif row["case"].startswith("forward ") and "bsr32" in timings:
            verdict = "met" if timings["bsr32"]["speedup"] >= TARGET else "MISSED"
            print(f"{row['case']}: bsr32 {timings['bsr32']['speedup']:.2f}x >= {TARGET}x: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
