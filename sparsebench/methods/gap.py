"""`gap`: scheduled Grow-and-Prune (Ma et al., ICLR 2022, arXiv 2106.09857; ALGORITHMS.md section 1).

The prunable tensors are cut into `kappa` partitions. Training is split into kappa * rounds
equal GaP steps and a final fine-tune:

* cyclic (C-GaP, the repository's S-GaP): at each step one partition is grown fully dense
  (grown weights restart from 0: they were held at 0) while the others keep fixed sparse masks;
  at the next step it is pruned back to its target by per-tensor magnitude and the next
  partition, in cyclic order, is grown.
* parallel (P-GaP): each round, kappa replicas start from the same sparse "combined" model,
  replica i grows partition i and trains one step; then partition i is taken from replica i,
  magnitude-pruned, and the pieces are assembled into the next combined model. With one device
  the replicas run one after another, so a round costs kappa steps of compute (as on kappa
  machines) and kappa steps of wall time (unlike kappa machines).

After the last step the remaining dense partition is pruned and the whole sparse network is
fine-tuned with fixed masks. The official code restarts the optimizer (Adam moments) and the LR
schedule at every step (`--restart-training`); `restart_each_step=true` does the same, the
default keeps one LR schedule over the run (sparsebench choice for short CPU runs).

Epoch budget: with E total epochs and fine-tune fraction F, each GaP step lasts
(1 - F) E / (kappa * rounds) epochs, counted in optimizer steps, so GaP costs the same number of
steps as any other method at the same `epochs`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext


class GaPVariant(enum.Enum):
    cyclic = "cyclic"
    parallel = "parallel"


class PartitionKind(enum.Enum):
    auto = "auto"  # residual stages when the model has exactly kappa of them, else contiguous
    contiguous = "contiguous"
    stages = "stages"
    random = "random"  # ablation in the official code; its README recommends cyclic partitions


@dataclass
class GaPOptions:
    variant: GaPVariant = GaPVariant.cyclic
    kappa: int = 3
    rounds: int = 2
    finetune_fraction: float = 0.25
    partition: PartitionKind = PartitionKind.auto
    restart_each_step: bool = False


def contiguous_partitions(names: list[str], sizes: dict[str, int], kappa: int) -> list[list[str]]:
    """Cut tensors (in forward order) into kappa contiguous groups of balanced parameter count.

    The official code cuts consecutive layers (`cut_all_partitions`); balancing the count keeps
    one huge layer from making a partition trivially small. Every group is non-empty.
    """
    prefix = [0]
    for name in names:
        prefix.append(prefix[-1] + sizes[name])
    cuts = [0]
    for g in range(1, kappa):
        ideal = g * prefix[-1] / kappa
        # Cut after at least one more tensor, leaving one for each of the later groups.
        candidates = range(cuts[-1] + 1, len(names) - (kappa - g) + 1)
        cuts.append(min(candidates, key=lambda i: abs(prefix[i] - ideal)))
    cuts.append(len(names))
    return [names[a:b] for a, b in zip(cuts, cuts[1:])]


def stage_partitions(names: list[str], stage_names: list[str]) -> list[list[str]]:
    """One partition per residual stage; the stem joins the first, the head the last stage."""
    groups: list[list[str]] = [[] for _ in stage_names]
    current = 0
    for name in names:
        for i, stage in enumerate(stage_names):
            if name.startswith(stage + "."):
                current = i
        groups[current].append(name)
    return groups


@METHODS.register("gap")
class GaP(SparsityMethod):
    Options = GaPOptions

    # ------------------------------------------------------------ set-up
    def validate(self) -> None:
        o = self.options
        names = self.engine.names
        if o.kappa < 1:
            raise UserError(f"method.kappa={o.kappa}: expected a positive number of partitions")
        if o.kappa > len(names):
            raise UserError(
                f"method.kappa={o.kappa} is larger than the number of prunable layers ({len(names)}); "
                f"use kappa <= {len(names)}"
            )
        if o.rounds < 1:
            raise UserError(f"method.rounds={o.rounds}: expected a positive number of rounds")
        if not 0.0 <= o.finetune_fraction < 1.0:
            raise UserError(f"method.finetune_fraction={o.finetune_fraction}: expected a fraction in [0, 1)")
        self.finetune_start = self.total_steps - round(o.finetune_fraction * self.total_steps)
        self.step_length = self.finetune_start // (o.kappa * o.rounds)
        if self.step_length < 1:
            raise UserError(
                f"too few training steps ({self.total_steps}) for kappa*rounds={o.kappa * o.rounds} GaP steps; "
                "raise epochs or lower method.rounds"
            )
        self.finetune_start = self.step_length * o.kappa * o.rounds  # remainder goes to fine-tune
        self.partitions = self._make_partitions()

    def _make_partitions(self) -> list[list[str]]:
        o, names = self.options, self.engine.names
        stage_names = getattr(self.engine.model, "stage_names", None)
        kind = o.partition
        if kind is PartitionKind.auto:
            use_stages = stage_names is not None and len(stage_names) == o.kappa
            kind = PartitionKind.stages if use_stages else PartitionKind.contiguous
        if kind is PartitionKind.stages:
            if stage_names is None or len(stage_names) != o.kappa:
                found = "none" if stage_names is None else len(stage_names)
                raise UserError(
                    f"method.partition=stages needs a model with kappa={o.kappa} residual stages; this model has {found}"
                )
            groups = stage_partitions(names, stage_names)
            if any(not g for g in groups):
                raise UserError("method.partition=stages: a stage has no prunable tensor; use partition=contiguous")
            return groups
        if kind is PartitionKind.random:
            order = torch.randperm(len(names), generator=self.generator).tolist()
            return [[names[i] for i in sorted(order[g :: o.kappa])] for g in range(o.kappa)]
        sizes = {n: self.engine.tensors[n].numel for n in names}
        return contiguous_partitions(names, sizes, o.kappa)

    # ------------------------------------------------------------ schedule
    def step_index(self, step: int) -> int | None:
        """Which GaP step starts at `step` (None if no boundary; kappa*rounds = fine-tune)."""
        if step % self.step_length or step > self.finetune_start:
            return None
        return step // self.step_length

    def _prune_to_target(self, names: list[str], optimizer) -> None:
        densities = {n: self.target.densities[n] for n in names}
        self.engine.set_masks(self.engine.magnitude_masks(densities), densities, optimizer)

    def start(self, ctx: StepContext) -> None:
        kappa = self.options.kappa
        variant = "P-GaP" if self.options.variant is GaPVariant.parallel else "C-GaP"
        sizes = [sum(self.engine.tensors[n].numel for n in p) for p in self.partitions]
        ctx.log(
            f"{variant}: kappa={kappa} partitions of {sizes} weights, {self.options.rounds} rounds, "
            f"{self.step_length} steps per GaP step, fine-tune from step {self.finetune_start}"
        )
        if self.options.variant is GaPVariant.parallel:
            ctx.log(f"P-GaP: one device, so the {kappa} replicas of each round run one after another")
        self.random_start(ctx)

    def before_step(self, ctx: StepContext) -> None:
        index = self.step_index(ctx.step)
        if index is None:
            return
        if self.options.variant is GaPVariant.cyclic:
            self._cyclic_boundary(index, ctx)
        else:
            self._parallel_boundary(index, ctx)
        if self.options.restart_each_step:
            ctx.reset_optimizer()
            is_finetune = index == self.options.kappa * self.options.rounds
            ctx.restart_lr(self.total_steps - ctx.step if is_finetune else self.step_length)

    # ------------------------------------------------------------ C-GaP
    def _cyclic_boundary(self, index: int, ctx: StepContext) -> None:
        kappa = self.options.kappa
        if index > 0:  # prune the partition that was dense during the previous step
            self._prune_to_target(self.partitions[(index - 1) % kappa], ctx.optimizer)
        if index < kappa * self.options.rounds:
            self.engine.grow_dense(self.partitions[index % kappa], ctx.optimizer)

    # ------------------------------------------------------------ P-GaP
    def _parallel_boundary(self, index: int, ctx: StepContext) -> None:
        kappa = self.options.kappa
        replica = index % kappa
        if index > 0:
            self._finish_replica((index - 1) % kappa, ctx)
        if index > 0 and replica == 0:  # a round ended (kappa*rounds is a multiple of kappa)
            self._assemble()
        if index == kappa * self.options.rounds:
            ctx.reset_optimizer()
            return
        if replica == 0:  # a new round: every replica starts from this combined model
            self.combined = self._snapshot()
            self.pieces: list[dict] = []
        else:
            self._restore(self.combined)
        ctx.reset_optimizer()  # each replica is a fresh worker: no momentum from another replica
        self.engine.grow_dense(self.partitions[replica], ctx.optimizer)

    def _snapshot(self) -> dict:
        return {
            "model": {k: v.detach().clone() for k, v in self.engine.model.state_dict().items()},
            "engine": self.engine.state_dict(),
        }

    def _restore(self, snapshot: dict) -> None:
        explored = {n: m.clone() for n, m in self.engine.ever_active.items()}
        self.engine.model.load_state_dict(snapshot["model"])
        self.engine.load_state_dict(snapshot["engine"])
        for name, mask in explored.items():  # what replicas explored stays explored
            self.engine.ever_active[name] |= mask

    def _finish_replica(self, replica: int, ctx: StepContext) -> None:
        self._prune_to_target(self.partitions[replica], ctx.optimizer)
        self.pieces.append(self._snapshot())

    @torch.no_grad()
    def _assemble(self) -> None:
        """Partition i from replica i; every other parameter and buffer averaged over replicas.

        The paper specifies only the partitions; averaging the shared dense layers, biases and
        norm statistics (as data-parallel training would) is a sparsebench choice.
        """
        state = {}
        owner = {name: i for i, part in enumerate(self.partitions) for name in part}
        for key, value in self.pieces[0]["model"].items():
            if key in owner:
                state[key] = self.pieces[owner[key]]["model"][key]
            elif value.is_floating_point():
                state[key] = torch.stack([p["model"][key] for p in self.pieces]).mean(0)
            else:  # integer buffers such as BatchNorm's num_batches_tracked
                state[key] = self.pieces[-1]["model"][key]
        engine_state = {
            "masks": {n: self.pieces[owner[n]]["engine"]["masks"][n] for n in self.engine.names},
            "densities": {n: self.pieces[owner[n]]["engine"]["densities"][n] for n in self.engine.names},
        }
        self._restore({"model": state, "engine": engine_state})
        self.engine.apply_masks()

    # ------------------------------------------------------------ plan
    def mask_update_steps(self) -> list[int]:
        return list(range(0, self.finetune_start + 1, self.step_length))

    def densities_at(self, step: int) -> dict[str, float]:
        densities = dict(self.target.densities)
        if step < self.finetune_start:  # both variants: one partition dense at a time
            for name in self.partitions[(step // self.step_length) % self.options.kappa]:
                densities[name] = 1.0
        return densities

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        if self.options.variant is GaPVariant.cyclic:
            return {}  # C-GaP's state is the masks plus the step, both checkpointed
        return {"combined": getattr(self, "combined", None), "pieces": getattr(self, "pieces", [])}

    def load_state_dict(self, state: dict) -> None:
        if state.get("combined") is not None:
            self.combined = state["combined"]
        self.pieces = state.get("pieces", [])
