"""P-GaP's replicas on ranks of their own: `torchrun --nproc_per_node=KAPPA -m sparsebench train method=gap method.variant=parallel`.

In one process P-GaP trains its kappa replicas one after another (methods/gap.py): during round r,
replica i trains over the global steps [(r kappa + i) L, (r kappa + i + 1) L) of the run, L the GaP
step length. With kappa ranks each rank trains its own replica over exactly those steps (the same
batches, the same learning rates) and skips the others' (it still walks the data order, without
computing), so the round takes the wall time of one replica; at the round's end the ranks
exchange their finished replicas and every rank assembles the same combined model. The fine-tune
after the last round is rank 0's alone. No gradient is all-reduced: each replica is a whole model
on the whole batch, as on the paper's kappa machines.

The result is the sequential run's, bit for bit (tests/test_distributed.py), because a replica
depends only on the combined model it starts from, never on the replicas trained before it in
the same round, and nothing in a step draws from the global RNG for the default data and models
(a model with dropout or data augmentation draws from it; there the ranks draw independently,
which is a valid P-GaP run but not the sequential run's numbers).

The bookkeeping that makes the run directory identical too:
* an epoch whose last step a rank trained is evaluated by that rank. Rank 0 writes its own
  epochs at once (everything before them in the run is known to it: earlier rounds were
  exchanged); the other ranks' epochs are written by rank 0 at the next exchange, after their
  training-loss sums, FLOPs and mask changes are added up over the ranks that trained them;
* mask changes are gathered at each exchange and written in step order, the changes of one
  step from two ranks (one prunes its partition, the next grows its own) as one line;
* checkpoints are written by rank 0 at its own epoch ends, where the state is exactly the
  sequential run's (the round's combined model, no finished replica yet), so a checkpoint can be
  resumed by one process or by kappa ranks alike.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from sparsebench.distributed import Processes
from sparsebench.sparse.masked import MaskedModel

Partial = list[float]  # [training-loss sum, correct predictions, examples] of some steps of an epoch


def _add(a: Partial | None, b: Partial | None) -> Partial:
    return [x + y for x, y in zip(a or [0.0, 0, 0], b or [0.0, 0, 0])]


class ReplicaRanks:
    """Which steps this rank trains, and everything the ranks exchange at a round's end.

    Inactive (every step trained here, nothing exchanged) without `replicas`: `for_run` gives
    them only when the method spreads replicas over exactly as many ranks as there are processes."""

    def __init__(self, processes: Processes, replicas: int | None = None, finetune_start: int | None = None,
                 step_length: int | None = None):
        self.active = replicas is not None
        self.rank = processes.rank
        self.kappa = replicas or 1
        self.finetune_start = finetune_start
        self.step_length = step_length
        self.carry: dict[int, Partial] = {}  # epoch -> sums of steps exchanged already (earlier rounds)
        self.own: dict[int, Partial] = {}  # epoch -> sums of the steps this rank trained since the exchange
        self.ended: list[dict] = []  # epochs this rank ended since the exchange: record, masks, rank, FLOPs
        self.events: list[tuple[int, int, list]] = []  # (step, epoch, mask events) kept for the exchange
        self.pending: dict[int, list] = {}  # rank 0: other ranks' mask events of a step rank 0 trains
        self.flops_at_exchange: tuple[float, float] | None = None
        self.last_masks: dict[str, torch.Tensor] | None = None  # masks of the last epoch written

    def start(self, state: dict, masks: dict[str, torch.Tensor]) -> None:
        """Where the trainer starts (fresh or resumed): FLOPs so far and the masks of the last epoch end."""
        self.flops_at_exchange = (state["train_flops"], state["train_flops_dense"])
        self.last_masks = masks

    @classmethod
    def for_run(cls, method, processes: Processes) -> "ReplicaRanks":
        plan = method.replica_plan()  # (replicas, fine-tune start, GaP step length) or None
        if plan is None or not processes.active or plan[0] != processes.world_size:
            return cls(processes)
        ranks = cls(processes, *plan)
        method.use_replica_rank(processes.rank)
        return ranks

    # ------------------------------------------------------------------ who trains what
    def trains(self, step: int) -> bool:
        if not self.active:
            return True
        if step >= self.finetune_start:
            return self.rank == 0
        return (step // self.step_length) % self.kappa == self.rank

    # ------------------------------------------------------------------ during an epoch
    def keep_events(self, step: int, epoch: int, events: list, write: Callable[[int, int, list], None]) -> None:
        """Mask changes of one step: written now if the run's mask log can take them, else kept."""
        if not self.active:
            if events:
                write(step, epoch, events)
            return
        if self.rank == 0 and self.trains(step):
            merged = self.pending.pop(step, []) + events
            if merged:
                write(step, epoch, merged)
        elif events:
            self.events.append((step, epoch, events))

    def end_epoch(self, epoch: int, partial: Partial, last_step: int, state: dict,
                  make_record: Callable[[Partial], dict], masks: dict[str, torch.Tensor],
                  finish: Callable[[dict], None]) -> None:
        """This rank's share of an epoch: its sums, and the record if it trained the last step."""
        self.own[epoch] = _add(self.own.get(epoch), partial)
        if not self.trains(last_step):
            return
        total = _add(self.carry.get(epoch), self.own[epoch])
        record = make_record(total)
        if self.rank == 0:  # everything before this epoch end is known here: write it now
            record["weights_changed"] = MaskedModel.masks_changed(masks, self.last_masks)
            finish(record)
            self.last_masks = masks
        else:
            self.ended.append({"record": record, "masks": masks, "rank": self.rank,
                               "flops": (state["train_flops"], state["train_flops_dense"])})

    # ------------------------------------------------------------------ at a round's end
    def exchange(self, piece: dict, step: int, epoch: int, running: Partial, engine, state: dict,
                 write_events: Callable[[int, int, list], None], publish: Callable[[dict], None]) -> list[dict]:
        """Every rank's finished replica, in replica order; writes what the round left to write.
        `epoch` (0-based) holds `step`; `running` is this rank's sums of it so far, handed over here."""
        self.own[epoch] = _add(self.own.get(epoch), running)
        running[:] = [0.0, 0, 0]
        now = engine.pop_mask_events()  # the prune this boundary just made, logged at this step
        if now:
            self.events.append((step, epoch + 1, now))
        base = self.flops_at_exchange
        mine = {
            "piece": piece, "events": self.events, "own": self.own, "ended": self.ended,
            "flops": (state["train_flops"] - base[0], state["train_flops_dense"] - base[1]),
            "last_masks": self.last_masks,
        }
        gathered: list = [None] * self.kappa
        dist.all_gather_object(gathered, mine)
        # FLOPs: every rank's steps since the last exchange, added to the total then.
        before = [base]
        for g in gathered:
            before.append((before[-1][0] + g["flops"][0], before[-1][1] + g["flops"][1]))
        state["train_flops"], state["train_flops_dense"] = before[-1]
        self.flops_at_exchange = before[-1]
        # Training-loss sums of every epoch any rank touched.
        own_sums: dict[int, Partial] = {}
        for g in gathered:
            for e, p in g["own"].items():
                own_sums[e] = _add(own_sums.get(e), p)
        # Epochs the other ranks ended, in order: sums, FLOPs so far and mask changes completed.
        previous = gathered[0]["last_masks"]  # rank 0's last written epoch end: the same on every rank
        for ended in sorted((x for g in gathered for x in g["ended"]), key=lambda x: x["record"]["epoch"]):
            record, e, r = ended["record"], ended["record"]["epoch"] - 1, ended["rank"]
            loss, correct, seen = _add(self.carry.get(e), own_sums.get(e))
            record.update(train_loss=loss / seen, train_acc=100.0 * correct / seen)
            # The ranks before r trained all of their steps of this round before this epoch ended.
            record["train_flops"] = ended["flops"][0] + sum(g["flops"][0] for g in gathered[:r])
            record["weights_changed"] = MaskedModel.masks_changed(ended["masks"], previous)
            previous = ended["masks"]
            if self.rank == 0:
                publish(record)
        self.last_masks = previous
        # Every epoch before this step's has ended; the sums of this step's epoch go on.
        self.carry = {epoch: _add(self.carry.get(epoch), own_sums.get(epoch))}
        # Mask changes in step order; this step's go with rank 0's own change of it.
        events: dict[int, tuple[int, list]] = {}
        for g in gathered:
            for s, e, ev in g["events"]:
                events.setdefault(s, (e, []))[1].extend(ev)
        for s in sorted(events):
            e, ev = events[s]
            if s < step and self.rank == 0:
                write_events(s, e, ev)
            elif s == step and self.rank == 0:
                self.pending[s] = ev
        self.own, self.ended, self.events = {}, [], []
        return [g["piece"] for g in gathered]
