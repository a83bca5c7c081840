"""Masking overhead and mask-update cost, measured side by side in one run (not a test).

    python benchmarks/bench_masking.py [--batch 64] [--repeats 15]

Model: torchvision ResNet-18 with the CIFAR stem on 32x32 inputs, SGD with momentum, on the CPU.
* step overhead: a training step with MaskedModel at 90% uniform sparsity (mask the gradients,
  step, re-apply the masks) against the same dense step. The two are interleaved (ABAB...) so
  machine noise hits both alike; the ratio of medians is printed. Target: <= 1.03.
* mask update: one per-tensor magnitude re-prune of every prunable tensor (what GMP and GaP do
  at an event) and one global-magnitude re-prune, each as a fraction of 100 training steps
  (RigL's update interval). Target: <= 1%.
Only ratios are printed as the verdict: this machine is shared and absolute times are noise.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparsebench.models import create_model
from sparsebench.sparse.allocation import global_magnitude_densities
from sparsebench.sparse.masked import MaskedModel


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    torch.manual_seed(0)

    def make():
        model = create_model("resnet18", (3, 32, 32), 10, cifar_stem=True)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    dense_model, dense_opt = make()
    sparse_model, sparse_opt = make()
    engine = MaskedModel(sparse_model, dense_first=True, dense_last=True)
    densities = {n: 1.0 - args.sparsity for n in engine.names}
    engine.set_masks(engine.magnitude_masks(densities), densities, sparse_opt)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def dense_step():
        dense_opt.zero_grad(set_to_none=True)
        F.cross_entropy(dense_model(x), y).backward()
        dense_opt.step()

    def masked_step():
        sparse_opt.zero_grad(set_to_none=True)
        F.cross_entropy(sparse_model(x), y).backward()
        engine.mask_gradients()
        sparse_opt.step()
        engine.apply_masks()

    for _ in range(3):  # warm-up: allocator, optimizer state, threads
        dense_step()
        masked_step()
    dense_times, masked_times = [], []
    for _ in range(args.repeats):
        dense_times.append(timed(dense_step))
        masked_times.append(timed(masked_step))
    step = statistics.median(dense_times)
    overhead = statistics.median(masked_times) / step

    def layerwise_update():
        engine.set_masks(engine.magnitude_masks(densities), densities, sparse_opt)

    def global_update():
        d = global_magnitude_densities(engine, 1.0 - args.sparsity)
        engine.set_masks(engine.magnitude_masks(d), d, sparse_opt)

    layerwise = statistics.median(timed(layerwise_update) for _ in range(5))
    global_ = statistics.median(timed(global_update) for _ in range(5))
    prunable = sum(t.numel for t in engine.tensors.values())

    print(f"ResNet-18 (CIFAR stem), batch {args.batch}, 32x32, CPU threads {torch.get_num_threads()}, "
          f"{prunable / 1e6:.1f}M prunable weights at sparsity {args.sparsity}")
    print(f"masked step / dense step (median of {args.repeats}, interleaved): {overhead:.3f}   target <= 1.030")
    print(f"layer-wise magnitude update / 100 steps: {layerwise / (100 * step):.4f}   target <= 0.0100")
    print(f"global magnitude update / 100 steps:     {global_ / (100 * step):.4f}   target <= 0.0100")
    print(f"(one update = {layerwise / step:.3f} / {global_ / step:.3f} of a dense step)")


if __name__ == "__main__":
    main()
