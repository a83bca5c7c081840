"""Spread CPU-bound work (YAML parsing, drawing figures) over the machine's cores.

Both are pure-Python hot loops that threads cannot speed up, so they go to processes; small
inputs stay in this process, where starting workers would cost more than it saves.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def usable_cpus() -> int:
    # The affinity mask honours taskset and container CPU limits; cpu_count() does not.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(
    function: Callable[[Item], Result], items: Sequence[Item], items_per_worker: int, jobs: int
) -> list[Result]:
    """`[function(item) for item in items]`, in order, on up to `jobs` processes.

    A worker is started per `items_per_worker` items at most. `function` must be picklable:
    a module-level function or a functools.partial of one.
    """
    workers = min(jobs, len(items) // items_per_worker)
    if workers < 2:
        return [function(item) for item in items]
    # A few chunks per worker balance uneven items without paying per-item messaging.
    chunk = max(1, math.ceil(len(items) / (workers * 4)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items, chunksize=chunk))
