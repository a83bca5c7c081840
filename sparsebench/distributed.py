"""Several processes for one run: `torchrun --nproc_per_node=N -m sparsebench train ...`.

One run directory; rank 0 alone writes into it (config, metrics, checkpoints, model.pt,
final.json) and holds its lock; the other ranks follow. `batch_size` stays the *global* batch:
every rank walks the same shuffled order (a function of seed and epoch) and takes its share of
each batch, so the run sees the same data whatever the number of processes; a rank reads only
its share from the dataset (`RankBatches`). Each rank's loss is
scaled so that DDP's average of the ranks' gradients is the gradient of the global batch's mean
loss, uneven last batches included (a plain average of per-rank means would weight a smaller
shard's samples more).

Masks stay identical on every rank without extra traffic: every rank holds the same weights,
receives the same gradients (DistributedDataParallel all-reduces them during backward) and draws
from the same method RNG, so every mask decision is the same. After each mask change rank 0's masks are broadcast anyway and compared
(`check_masks`), so a divergence fails loudly instead of training silently different models.
FLOPs are counted once, for the global batch. Each rank evaluates the whole test set (the
numbers are identical; it keeps evaluation free of communication). final.json records
`world_size`.

Backends: gloo on CPU (what the tests use), NCCL on CUDA (one GPU per rank, by LOCAL_RANK) —
NCCL is unmeasured here.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from sparsebench.errors import UserError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Only rank 0 writes run files and takes the run lock."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (shares differ by at most one sample)."""
        return x.tensor_split(self.world_size)[self.rank]

    def share(self, indices: list[int]) -> list[int]:
        """The sample indices of this rank's `shard` of a global batch of `indices`."""
        size, extra = divmod(len(indices), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return indices[start:start + size + (self.rank < extra)]

    def loss_scale(self, local: int, total: int) -> float:
        """Factor on a rank's mean loss so that all-reduced, averaged gradients equal the global
        batch's mean-loss gradient: (local/total) * world_size."""
        return local * self.world_size / total if self.active else 1.0


SINGLE = Processes()


class RankBatches(Sampler):
    """The sample indices one rank reads of each global batch of `batches`: its share (`share`),
    so that no rank loads the samples of the others; and, with `trains`, nothing for the batches
    of steps it does not train (P-GaP's replicas on other ranks). A global batch smaller than the
    number of ranks would leave some share empty: such a batch is read whole, and the trainer
    takes the rank's `shard` of it (a loaded batch as large as the global one is not yet shared)."""

    def __init__(self, batches: Iterable[list[int]], ranks: Processes, trains: Callable[[int], bool] | None = None):
        self.batches, self.ranks, self.trains = batches, ranks, trains

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.batches):  # every global batch is drawn: the order stays the run's
            if self.trains is None or self.trains(index):
                yield self.ranks.share(batch) if len(batch) >= self.ranks.world_size else batch


def from_environment(device_choice: str) -> Processes:
    """The process group torchrun described in the environment (RANK, WORLD_SIZE, LOCAL_RANK),
    joined once per process; a plain launch is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = device_choice != "cpu" and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return Processes(rank, world, local_rank)


def wrap(model: torch.nn.Module, processes: Processes, device: torch.device) -> torch.nn.Module:
    """The module the training forward goes through: DistributedDataParallel around `model` when
    there are several processes (its all-reduce averages the ranks' gradients during backward;
    the engine and the method keep working on `model`'s own parameters), `model` itself otherwise.
    BatchNorm statistics are each rank's own shard's, with rank 0's buffers broadcast at every
    forward (DDP's default), as in any data-parallel run without SyncBatchNorm."""
    if not processes.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [processes.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def check_masks(masks: dict[str, torch.Tensor], processes: Processes) -> None:
    """Every rank's masks equal rank 0's; a mismatch is a bug and stops every rank."""
    if not processes.active:
        return
    for name, mask in masks.items():
        reference = mask.clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, mask):
            raise RuntimeError(f"rank {processes.rank}: mask of {name} differs from rank 0's after a mask update")


def agree(flag: bool, processes: Processes) -> bool:
    """True only if every rank says True (a loss that is finite everywhere, a run claimed by rank 0)."""
    return _reduce_flag(flag, processes, dist.ReduceOp.MIN)


def agree_any(flag: bool, processes: Processes) -> bool:
    """True if any rank says True (a mask changed somewhere: every rank then checks its masks)."""
    return _reduce_flag(flag, processes, dist.ReduceOp.MAX)


def _reduce_flag(flag: bool, processes: Processes, op) -> bool:
    if not processes.active:
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=op)
    return bool(value.item())


def sum_over_ranks(values: list[float], processes: Processes) -> list[float]:
    """Per-rank epoch sums (loss, hits, samples) added up, so logged training metrics are the global batch's."""
    if not processes.active:
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def barrier(processes: Processes) -> None:
    if processes.active:
        dist.barrier()


def check(cfg, processes: Processes) -> None:
    """What a multi-process run cannot do, as one line before any directory exists."""
    if not processes.active:
        return
    if cfg.run.batch_size < processes.world_size:
        raise UserError(f"batch_size={cfg.run.batch_size} is the global batch; it must be at least the number of "
                        f"processes ({processes.world_size})")
    if cfg.run.backend.value != "masked":
        raise UserError(f"backend={cfg.run.backend.value} runs in one process; under torchrun use backend=masked")
