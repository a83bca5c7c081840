"""`dry_run=true`: what a run would do, printed without training or writing anything.

Per-tensor target densities, the steps at which masks change, the method's schedule curve
(drop fraction or sparsity), the last mask change (T_end) and the training FLOPs relative to
dense, summed step by step from the method's own plan.
"""
from __future__ import annotations

from collections.abc import Callable

from sparsebench.sparse.flops import FlopCounter, layer_forward_flops

CURVE_POINTS = 11


def compact_steps(steps: list[int], shown: int = 8) -> str:
    if not steps:
        return "none (masks fixed after initialisation)"
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if len(steps) > 2 and len(gaps) == 1:
        return f"{len(steps)} updates, every {gaps.pop()} steps from {steps[0]} to {steps[-1]}"
    head = ", ".join(map(str, steps[:shown]))
    return f"{len(steps)} updates at steps {head}{', ...' if len(steps) > shown else ''}"


def planned_flops(method, counter: FlopCounter, batch_size: int) -> float:
    """Per-example training FLOPs of the whole plan. Densities are constant between mask
    changes, so they are asked for once per segment, not once per step (a CIFAR schedule has
    ~100k steps); only the dense-gradient flag and a method's per-step overhead (shared by the
    batch's examples) are asked per step."""
    total = method.total_steps
    bounds = sorted({0, total, *(t for t in method.mask_update_steps() if 0 < t < total)})
    flops = 0.0
    for start, stop in zip(bounds, bounds[1:]):
        densities = method.densities_at(start)
        dense_grad_steps = sum(method.dense_weight_grad(step) for step in range(start, stop))
        flops += dense_grad_steps * counter.train_step(densities, dense_weight_grad=True)
        flops += (stop - start - dense_grad_steps) * counter.train_step(densities)
    return flops + sum(method.step_flops_overhead(step) for step in range(total)) / batch_size


def describe(run, write: Callable[[str], None] = print) -> float:
    """Print the plan of `run` (a train.Run); returns training FLOPs relative to dense."""
    method, engine, cfg = run.method, run.engine, run.cfg
    total = method.total_steps
    write(f"dry run: method={cfg.method} sparsity={method.target.sparsity} distribution={cfg.distribution} "
          f"model={cfg.model} dataset={cfg.dataset}")
    write(f"{total} steps = {cfg.run.epochs} epochs x {run.steps_per_epoch} steps")
    write(f"dense tensors (never pruned): {', '.join(engine.dense_names) or 'none'}")
    final = method.densities_at(total - 1)
    write(f"{'tensor':<40} {'shape':<18} {'weights':>9} {'final density':>14}")
    for name, t in engine.tensors.items():
        write(f"{name:<40} {str(tuple(t.param.shape)):<18} {t.numel:>9} {final[name]:>14.4f}")
    if method.target.densities is None:
        write("(distribution=global: per-tensor densities are chosen from trained weights when pruning)")
    updates = method.mask_update_steps()
    write(f"mask changes: {compact_steps(updates)}")
    if updates:
        write(f"T_end (last mask change): step {updates[-1]} = {updates[-1] / total:.2f} of training")

    counter = FlopCounter(layer_forward_flops(run.model, run.data.input_shape))
    ratio = planned_flops(method, counter, cfg.run.batch_size) / (total * counter.dense_train_step())

    weights = {n: t.numel for n, t in engine.tensors.items()}
    write("schedule:")
    for i in range(CURVE_POINTS):
        step = min(total - 1, round(i * (total - 1) / (CURVE_POINTS - 1)))
        densities = method.densities_at(step)
        sparsity = 1 - sum(densities[n] * weights[n] for n in weights) / sum(weights.values())
        value = method.schedule_value(step)
        extra = f"  {value[0]} {value[1]:.4f}" if value else ""
        write(f"  step {step:>7}  sparsity {sparsity:.4f}{extra}")
    write(f"training FLOPs: {ratio:.3f} x dense")
    return ratio
