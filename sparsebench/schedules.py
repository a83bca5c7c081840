"""Schedules as pure functions of the step: learning rate and GMP's cubic sparsity.

Pure functions (no scheduler objects with hidden state) make resume exact: the step number
alone gives the value.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def lr_at(
    step: int,
    total_steps: int,
    base_lr: float,
    kind: str,
    warmup_steps: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> float:
    """Learning rate at `step` (0-based) of a span of `total_steps`.

    constant; multistep (x gamma at each milestone step); cosine (to min_lr at the end).
    Linear warm-up from base_lr/warmup_steps over the first `warmup_steps`, for every kind.
    """
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    if kind == "multistep":
        return base_lr * gamma ** sum(step >= m for m in milestones)
    if kind == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {kind!r}")


def cubic_sparsity(step: int, initial: float, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta (2017) eq. 1: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3.

    `begin` is t0 and `end` is t0 + n dt; before t0 the sparsity is s_i, after the end s_f.
    """
    if step <= begin:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - begin) / (end - begin)) ** 3


def cosine_drop_fraction(step: int, alpha: float, end: int) -> float:
    """RigL's drop fraction (Evci et al. 2020; TF `cosine_decay` with decay_steps = T_end):
    f(t) = alpha/2 (1 + cos(pi t / T_end)) for t <= T_end, and 0 after T_end (no more updates).
    """
    if end <= 0 or step > end:
        return 0.0
    return 0.5 * alpha * (1.0 + math.cos(math.pi * step / end))


def last_event(events: Sequence[int], step: int) -> int | None:
    """The last of the sorted `events` at or before `step` (bisect: plans are queried often)."""
    i = bisect.bisect_right(events, step)
    return events[i - 1] if i else None
