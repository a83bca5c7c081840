"""Masking overhead and mask-update cost, measured side by side in one run (not a test).

    python benchmarks/bench_masking.py [--batch 64] [--repeats 15]

Model: torchvision ResNet-18 with the CIFAR stem on 32x32 inputs, SGD with momentum, on the CPU.
* step overhead: a training step with MaskedModel at 90% uniform sparsity (mask the gradients,
  step, re-apply the masks) against the same dense step. The two are interleaved (ABAB...) so
  machine noise hits both alike; the ratio of medians is printed. Target: <= 1.03.
* mask update: one per-tensor magnitude re-prune of every prunable tensor (what GMP and GaP do
  at an event) and one global-magnitude re-prune, each as a fraction of 100 training steps
  (RigL's update interval). Target: <= 1%.
* RigL amortized over one Delta T = 100 cycle: the real `rigl` method (sparsebench.methods, its
  defaults: alpha 0.3 cosine, delta_t 100) stepping its own copy of the model through the
  trainer's order (finish_step). A regular step (hooks, masked step) and an update step (dense
  gradient read in after_backward, drop by |W|, grow by |grad|, optimizer-state reset) are
  timed interleaved with the dense step; amortized = (99 regular + 1 update) / (100 dense).
  Target: <= 1.03.
Only ratios are printed as the verdict: this machine is shared and absolute times are noise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
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
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    torch.manual_seed(0)

    def make():
        model = create_model("resnet18", (3, 32, 32), 10, cifar_stem=True)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    dense_model, dense_opt = make()
    sparse_model, sparse_opt = make()
    engine = MaskedModel(sparse_model, dense_first=True, dense_last=True)
    densities = {n: 1.0 - args.sparsity for n in engine.names}
    engine.set_masks(engine.magnitude_masks(densities), densities, sparse_opt)
    # RigL on its own copy: 100 000 planned steps, so the update at step 100 drops ~alpha = 0.3.
    rigl_model, rigl_opt = make()
    rigl_engine = MaskedModel(rigl_model, dense_first=True, dense_last=True)
    rigl_cls = METHODS.get("rigl")
    total = 100_000
    rigl = rigl_cls(rigl_cls.Options(), rigl_engine, SparsityTarget(args.sparsity, "uniform", densities), total, 100,
                    torch.Generator().manual_seed(1))
    rigl_ctx = StepContext(0, total, 100, rigl_opt, rigl_opt.state.clear, lambda span: None, lambda message: None)
    rigl.start(rigl_ctx)
    delta_t = rigl.options.delta_t
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

    def rigl_step(step: int):
        def run():
            rigl_ctx.step = step
            rigl.before_step(rigl_ctx)
            rigl_opt.zero_grad(set_to_none=True)
            F.cross_entropy(rigl_model(x), y).backward()
            finish_step(rigl, rigl_engine, rigl_ctx, rigl_opt.step)
            rigl_engine.pop_mask_events()
        return run

    rigl_regular, rigl_update = rigl_step(delta_t + 1), rigl_step(delta_t)
    assert rigl.dense_weight_grad(delta_t) and not rigl.dense_weight_grad(delta_t + 1)

    for _ in range(3):  # warm-up: allocator, optimizer state, threads
        dense_step()
        masked_step()
        rigl_regular()
    rigl_update()
    dense_times, masked_times, regular_times, update_times = [], [], [], []
    for _ in range(args.repeats):
        dense_times.append(timed(dense_step))
        masked_times.append(timed(masked_step))
        regular_times.append(timed(rigl_regular))
        update_times.append(timed(rigl_update))
    step = statistics.median(dense_times)
    overhead = statistics.median(masked_times) / step
    regular, update = statistics.median(regular_times) / step, statistics.median(update_times) / step
    amortized = ((delta_t - 1) * regular + update) / delta_t

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
    print(f"RigL amortized over one delta_t={delta_t} cycle / dense: {amortized:.3f}   target <= 1.030   "
          f"(regular step {regular:.3f}, update step {update:.3f} of a dense step)")
    print(f"layer-wise magnitude update / 100 steps: {layerwise / (100 * step):.4f}   target <= 0.0100")
    print(f"global magnitude update / 100 steps:     {global_ / (100 * step):.4f}   target <= 0.0100")
    print(f"(one update = {layerwise / step:.3f} / {global_ / step:.3f} of a dense step)")
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
