"""A full training step under `backend=sparse` against the dense step, side by side in one run (not a test).

    python benchmarks/bench_training_step.py [--cases mlp-0.9,mlp-0.95,resnet18-0.9] [--repeats 7]

Each case builds three copies of one model from the same seed, each with the project's default
optimizer (SGD, momentum 0.9, weight decay 5e-4, lr 0.1) and allocation (uniform; first and last
layer dense, as `distribution=uniform` keeps them):

* dense: no engine at all: forward, loss, backward, optimizer step;
* masked: the trainer's step under `backend=masked` (MaskedModel + method `static` + finish_step:
  gradients masked, optimizer step, masks re-applied);
* sparse: the same step under `backend=sparse` (`sparsebench.sparse.backend.create`, as the
  trainer calls it; `--layers measured` times every layer once first and logs the decisions,
  `--layers all` forces every prunable layer onto the sparse path), with `begin_step` each step.

The three steps are interleaved (dense, masked, sparse, dense, ...) so machine noise hits them
alike, after warm-up; printed is, for masked and sparse, the median over repeats of (its step
time / the dense step time of the same repeat), with the load average before and after (this
machine is shared: only ratios are a verdict).

Cases: `mlp-S`: the registered `mlp` model 3072 -> 4096 -> 4096 -> 4096 -> 10 (a CIFAR-sized
input flattened; the two 4096x4096 layers are prunable, the first and last stay dense as
`distribution=uniform` keeps them), batch 128, sparsity S. `resnet18-S`: torchvision ResNet-18
with the CIFAR stem on 32x32 inputs, batch 64 (as benchmarks/bench_masking.py), sparsity S.
`--block B`: block masks (`distribution.structure=block distribution.block=B`, whole B x B
blocks); the sparse step then picks CSR or BSR per layer as the trainer does (`--layers all`: BSR
everywhere), and two more steps, `sparse-csr` and `sparse-bsr`, put every prunable layer on one
kernel (chunked as the CPU default), so the kernels are compared on the same masks in one run.
Target (issue #10): CPU, linear-heavy model at s=0.95: sparse step <= 0.7x the dense step.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from sparsebench.config import Backend, BackendLayers
from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
from sparsebench.models import create_model
from sparsebench.sparse import backend as training_backend
from sparsebench.sparse.kernels import chunk_columns
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.structure import UNSTRUCTURED, SparsityStructure, StructureKind

CASES = {
    "mlp": dict(model="mlp", options={"hidden": [4096, 4096, 4096]}, input_shape=(3, 32, 32), batch=128),
    "resnet18": dict(model="resnet18", options={"cifar_stem": True}, input_shape=(3, 32, 32), batch=64),
}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: time to their completion
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def build(case: dict, sparsity: float, backend: str, layers: str, batch: int, block: int | None = None,
          device: torch.device = torch.device("cpu"), seed: int = 0):
    """(step function, backend object or None) for one copy of the case's model; `backend` is
    dense, masked, sparse or sparse-csr (every prunable layer on CSR kernels)."""
    torch.manual_seed(seed)
    model = create_model(case["model"], case["input_shape"], 10, **case["options"]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    if backend == "dense":
        def dense_step(x, y):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return dense_step, None
    structure = SparsityStructure(StructureKind.block, block=block) if block else UNSTRUCTURED
    engine = MaskedModel(model, dense_first=True, dense_last=True, structure=structure)
    target = SparsityTarget(sparsity, "uniform", engine.round_densities({n: 1.0 - sparsity for n in engine.names}))
    steps = 10**6
    static = METHODS.get("static")
    method = static(static.Options(), engine, target, steps, 100, torch.Generator().manual_seed(1))
    ctx = StepContext(0, steps, 100, optimizer, optimizer.state.clear, lambda span: None, print)
    method.start(ctx)
    engine.pop_mask_events()
    backend_object = training_backend.MaskedBackend()
    if backend == "sparse":
        cfg = SimpleNamespace(run=SimpleNamespace(backend=Backend.sparse, backend_layers=BackendLayers(layers),
                                                  batch_size=batch, amp=False),
                              distribution_options=SimpleNamespace(structure=structure.kind))
        run = SimpleNamespace(cfg=cfg, method=method, engine=engine, optimizer=optimizer, device=device,
                              data=SimpleNamespace(input_shape=case["input_shape"]))
        backend_object = training_backend.create(run, None, print)
    elif backend in ("sparse-csr", "sparse-bsr"):  # every prunable layer on one kernel, chunked as on CPU
        fmt = backend.split("-")[1]
        decisions = training_backend.decide(engine, {}, case["input_shape"], batch, device, "all")
        cpu = device.type == "cpu"  # CUDA products are never cut into chunks
        decisions = {n: dataclasses.replace(d, format=fmt, block=block if fmt == "bsr" else None,
                                            chunk=chunk_columns(fmt, engine.tensors[n].param[0].numel(), 4, block)
                                            if cpu else None)
                     for n, d in decisions.items()}
        backend_object = training_backend.SparseBackend(engine, optimizer, decisions, lambda step: False, "all")
    counter = [0]

    def trainer_step(x, y):  # the loop body of train._train_locked, without logging
        ctx.step = counter[0]
        method.before_step(ctx)
        backend_object.begin_step(counter[0])
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        finish_step(method, engine, ctx, optimizer.step)
        engine.pop_mask_events()
        loss.item()
        counter[0] += 1
    return trainer_step, backend_object


def measure(name: str, sparsity: float, layers: str, repeats: int, batch: int | None, block: int | None = None,
            device: torch.device = torch.device("cpu")) -> dict:
    case = CASES[name]
    batch = batch or case["batch"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *case["input_shape"]), generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    kinds = ("dense", "masked", "sparse") + (("sparse-csr", "sparse-bsr") if block else ())
    steps = {kind: build(case, sparsity, kind, layers, batch, block, device)[0] for kind in kinds}
    for _ in range(2):  # warm-up: allocator, optimizer state, MKL handles, the sparse index
        for fn in steps.values():
            fn(x, y)
    times: dict[str, list[float]] = {k: [] for k in steps}
    before = load()
    for _ in range(repeats):
        for kind, fn in steps.items():
            times[kind].append(timed(lambda: fn(x, y), device))
    def paired(kind: str) -> float:  # median over repeats of (this step / the dense step of the same repeat)
        return statistics.median(t / d for t, d in zip(times[kind], times["dense"]))

    blocks = f" {block}x{block} blocks" if block else ""
    return {"case": f"{name} s={sparsity}{blocks} batch {batch} layers={layers}",
            "dense_ms": 1e3 * statistics.median(times["dense"]),
            "ratios": {kind: paired(kind) for kind in kinds if kind != "dense"}, "load": f"{before} -> {load()}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="mlp-0.9,mlp-0.95,resnet18-0.9",
                        help="comma-separated MODEL-SPARSITY, MODEL one of " + ", ".join(CASES))
    parser.add_argument("--layers", default="measured", choices=["measured", "all"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=None, help="default: the case's (mlp 128, resnet18 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=None, help="block masks of this side (BSR beside CSR)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (steps timed to the GPU's completion)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU threads {torch.get_num_threads()}"
    print(f"{where}, torch {torch.__version__}, load average {load()}")
    for spec in args.cases.split(","):
        name, _, sparsity = spec.partition("-")
        r = measure(name, float(sparsity), args.layers, args.repeats, args.batch, args.block, device)
        ratios = "; ".join(f"{kind} / dense {ratio:.3f}" for kind, ratio in r["ratios"].items())
        print(f"{r['case']}: dense step {r['dense_ms']:.0f} ms; {ratios}   (median of {args.repeats} paired "
              f"ratios, interleaved; load {r['load']})")


if __name__ == "__main__":
    main()
