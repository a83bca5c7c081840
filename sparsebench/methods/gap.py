"""`gap`: scheduled Grow-and-Prune (Ma et al., ICLR 2022, arXiv 2106.09857; docs/methods.md, GaP).

The prunable tensors are cut into `kappa` partitions. Training is a sequence of equal GaP steps
(kappa * rounds of them, one more with `initial_step=true`) followed by a fine-tune:

* cyclic (C-GaP, the repository's S-GaP): during GaP step j partition j mod kappa is fully dense
  while the others keep fixed sparse masks; at the start of step j + 1 that partition is cut back
  to its target by per-tensor magnitude and the next one is made dense. A partition made dense
  during training regrows its masked entries from 0, where masking held them (under Powerprop
  the engine draws them a fresh initial value instead, masked.py).
* parallel (P-GaP): each round, kappa replicas start from the same sparse "combined" model,
  replica i grows partition i and trains one step; then partition i of replica i is magnitude
  pruned and the pieces are assembled into the next combined model. In one process the
  replicas run one after another, so a round costs kappa steps of compute (as on kappa
  machines) and kappa steps of wall time (unlike kappa machines); under torchrun with kappa
  ranks each rank trains one replica and a round takes one step of wall time, with the same
  result (sparsebench/replica_ranks.py).

Initial masks. `first_partition=dense` (what `auto` means for C-GaP) follows the official
scripts: the first partition simply gets no mask, so it trains dense from its random
initialisation, and the other partitions get exact-count random masks at their targets; the
"grow" at step 0 then changes nothing. `first_partition=sparse` (earlier sparsebench behaviour)
draws a random mask on every partition and grows the first one from zeros at step 0. P-GaP
always starts from an all-sparse random combined model, as the official parallel script does.

The official C-GaP run is one dense-first-partition step followed by `rounds` full cycles, i.e.
1 + kappa * rounds steps, so the first partition is dense rounds + 1 times; `initial_step=true`
reproduces that count (the cyclic order is unchanged: step j still grows partition j mod kappa).

Combine (P-GaP). `combine=copy` (official) takes every parameter and buffer owned by partition i
from replica i and everything owned by no partition from replica 0 (the official "replica 1");
nothing is averaged. Ownership (`state_owners`) works on modules, the analogue of the official
"layer" names. The first rule that applies decides:
  1. with partitions by residual stage, every module under a stage's prefix belongs to that
     stage's partition (whole blocks, norms included, as a Transformer layer is copied whole);
  2. a module holding a prunable tensor of partition i (its weight, bias, Powerprop
     parametrisation) belongs to partition i; a conv/linear kept dense belongs to none;
  3. any other module (a norm, a module of buffers) belongs to the owner of the nearest conv or
     linear layer before it in registration order, which models keep in forward order; before
     the first such layer, or after a layer kept dense, it belongs to none.
So a stem kept dense, its norm and a dense classifier come from replica 0. `combine=average`
(earlier sparsebench behaviour) copies only the partitions' prunable weights from their
replicas and averages every other floating-point parameter and buffer over the replicas.

After the last GaP step the dense partition is pruned and the whole sparse network is
fine-tuned with fixed masks. The official code restarts the optimizer (Adam moments) and the LR
schedule at every step (`--restart-training`); `restart_each_step=true` does the same, the
default keeps one LR schedule over the run (sparsebench choice for short CPU runs).

Epoch budget: with E total epochs and fine-tune fraction F, each GaP step lasts
(1 - F) E / n_steps epochs, counted in optimizer steps (n_steps = kappa * rounds, + 1 with
`initial_step`), so GaP costs the same number of steps as any other method at the same
`epochs`. The official budget is different: 10-epoch steps and 10 rounds, then a 40-epoch
fine-tune, against a 40-epoch dense baseline. The presets cifar10_resnet32_gap,
imagenet_resnet50_gap and imagenet_resnet50_pgap set it (CIFAR: epochs=350 with
finetune_fraction=40/350 and initial_step=true, i.e. 31 steps of 10 epochs and 40 to fine-tune).
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext
from sparsebench.sparse.masked import PRUNABLE_TYPES, MaskedModel


class GaPVariant(enum.Enum):
    cyclic = "cyclic"
    parallel = "parallel"


class PartitionKind(enum.Enum):
    auto = "auto"  # residual stages when the model has exactly kappa of them, else contiguous
    contiguous = "contiguous"
    stages = "stages"
    random = "random"  # ablation in the official code; its README recommends cyclic partitions


class FirstPartition(enum.Enum):
    auto = "auto"  # dense for cyclic, sparse for parallel: what each official script does
    dense = "dense"  # no mask: trains dense from its random initialisation
    sparse = "sparse"  # random mask like the others, grown from zeros at step 0


class Combine(enum.Enum):
    copy = "copy"  # every state entry from the replica of the partition owning it (official)
    average = "average"  # partition weights from their replica, the rest averaged over replicas


@dataclass
class GaPOptions:
    variant: GaPVariant = GaPVariant.cyclic
    kappa: int = 3
    rounds: int = 2
    finetune_fraction: float = 0.25
    partition: PartitionKind = PartitionKind.auto
    restart_each_step: bool = False
    first_partition: FirstPartition = FirstPartition.auto
    initial_step: bool = False  # C-GaP: 1 + kappa*rounds steps, as the official scripts run
    combine: Combine = Combine.copy  # P-GaP only


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


def state_owners(
    model: nn.Module,
    engine: MaskedModel,
    partitions: list[list[str]],
    stage_names: list[str] | None = None,
) -> dict[str, int | None]:
    """The partition owning each `model.state_dict()` key, or None when no partition owns it.

    Per module, first match wins (module docstring): with `stage_names` (partitions by stage),
    the stage whose prefix it lies under; the partition of its prunable tensor (None for a
    conv/linear kept dense); else the owner of the nearest conv/linear registered before it.
    Keys missing from the result (e.g. a module registered under two names) are shared.
    """
    partition_of_module = {
        id(engine.tensors[name].module): i for i, part in enumerate(partitions) for name in part
    }
    owners: dict[str, int | None] = {}
    current: int | None = None
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            current = partition_of_module.get(id(module))  # None: a layer kept dense
        owner = current
        for i, stage in enumerate(stage_names or ()):
            if module_name == stage or module_name.startswith(stage + "."):
                owner = i
        entries = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for local, _ in entries:
            owners[f"{module_name}.{local}" if module_name else local] = owner
    return owners


@METHODS.register("gap")
class GaP(SparsityMethod):
    Options = GaPOptions

    # ------------------------------------------------------------ set-up
    def validate(self) -> None:
        o = self.options
        names = self.engine.names
        parallel = o.variant is GaPVariant.parallel
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
        if parallel and o.first_partition is FirstPartition.dense:
            raise UserError(
                "method.first_partition=dense is for variant=cyclic; P-GaP starts every partition sparse "
                "(use first_partition=auto)"
            )
        if parallel and o.initial_step:
            raise UserError("method.initial_step=true is for variant=cyclic; P-GaP runs kappa*rounds replica steps")
        if not parallel and o.combine is not Combine.copy:
            raise UserError(f"method.combine={o.combine.value} is for variant=parallel; C-GaP combines no replicas")
        self.n_steps = o.kappa * o.rounds + (1 if o.initial_step else 0)
        # At least one all-sparse step: the last dense partition is pruned (P-GaP: the last round
        # combined) at the fine-tune's first step, so finetune_fraction=0 still ends sparse.
        self.finetune_start = self.total_steps - max(1, round(o.finetune_fraction * self.total_steps))
        self.step_length = self.finetune_start // self.n_steps
        if self.step_length < 1:
            raise UserError(
                f"too few training steps ({self.total_steps}) for {self.n_steps} GaP steps; "
                "raise epochs or lower method.rounds"
            )
        self.finetune_start = self.step_length * self.n_steps  # remainder goes to fine-tune
        self.partitions = self._make_partitions()

    @property
    def dense_first_partition(self) -> bool:
        choice = self.options.first_partition
        if choice is FirstPartition.auto:
            return self.options.variant is GaPVariant.cyclic
        return choice is FirstPartition.dense

    def _make_partitions(self) -> list[list[str]]:
        o, names = self.options, self.engine.names
        stage_names = getattr(self.engine.model, "stage_names", None)
        kind = o.partition
        if kind is PartitionKind.auto:
            use_stages = stage_names is not None and len(stage_names) == o.kappa
            kind = PartitionKind.stages if use_stages else PartitionKind.contiguous
        self.stage_names = None  # set when the partitions are the model's residual stages
        if kind is PartitionKind.stages:
            if stage_names is None or len(stage_names) != o.kappa:
                found = "none" if stage_names is None else len(stage_names)
                raise UserError(
                    f"method.partition=stages needs a model with kappa={o.kappa} residual stages; this model has {found}"
                )
            groups = stage_partitions(names, stage_names)
            if any(not g for g in groups):
                raise UserError("method.partition=stages: a stage has no prunable tensor; use partition=contiguous")
            self.stage_names = list(stage_names)
            return groups
        if kind is PartitionKind.random:
            order = torch.randperm(len(names), generator=self.generator).tolist()
            return [[names[i] for i in sorted(order[g :: o.kappa])] for g in range(o.kappa)]
        sizes = {n: self.engine.tensors[n].numel for n in names}
        return contiguous_partitions(names, sizes, o.kappa)

    # ------------------------------------------------------------ schedule
    def step_index(self, step: int) -> int | None:
        """Which GaP step starts at `step` (None if no boundary; n_steps = fine-tune)."""
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
        if self.options.initial_step:
            ctx.log(f"{variant}: one initial step before the rounds, {self.n_steps} GaP steps in all")
        if self.options.variant is GaPVariant.parallel and self.replica_rank is None:
            ctx.log(f"P-GaP: one process, so the {kappa} replicas of each round run one after another "
                    f"(torchrun --nproc_per_node={kappa} trains them side by side)")
        if not self.dense_first_partition:
            self.random_start(ctx)
            return
        ctx.log(f"{variant}: partition 0 starts dense at its initial weights, the others at random masks")
        # A fresh engine has all-ones masks, so this grows nothing and keeps the initial values.
        self.engine.grow_dense(self.partitions[0], ctx.optimizer)
        first = set(self.partitions[0])
        densities = self.engine.round_densities(
            {n: self.target.densities[n] for n in self.engine.names if n not in first}
        )
        self.engine.set_masks(self.engine.random_masks(densities, self.generator), densities, ctx.optimizer)

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
            is_finetune = index == self.n_steps
            ctx.restart_lr(self.total_steps - ctx.step if is_finetune else self.step_length)

    # ------------------------------------------------------------ C-GaP
    def _cyclic_boundary(self, index: int, ctx: StepContext) -> None:
        kappa = self.options.kappa
        if index > 0:  # prune the partition that was dense during the previous step
            self._prune_to_target(self.partitions[(index - 1) % kappa], ctx.optimizer)
        if index < self.n_steps:  # at index 0 a dense first partition is already dense: no-op
            self.engine.grow_dense(self.partitions[index % kappa], ctx.optimizer)

    # ------------------------------------------------------------ P-GaP
    replica_rank: int | None = None  # set when each rank trains one replica (replica_ranks.py)

    def replica_plan(self) -> tuple[int, int, int] | None:
        if self.options.variant is not GaPVariant.parallel:
            return None
        return self.options.kappa, self.finetune_start, self.step_length

    def use_replica_rank(self, rank: int) -> None:
        self.replica_rank = rank

    def _parallel_boundary(self, index: int, ctx: StepContext) -> None:
        kappa, mine = self.options.kappa, self.replica_rank
        replica = index % kappa
        if index > 0 and mine in (None, (index - 1) % kappa):
            self._finish_replica((index - 1) % kappa, ctx)
        if index > 0 and replica == 0:  # a round ended (n_steps is a multiple of kappa)
            if mine is not None:  # each rank holds its own replica: swap them
                # Own piece: the only one, or (resumed from one process's checkpoint mid-round) the
                # one at this rank's place among those that process had finished.
                self.pieces = ctx.exchange(self.pieces[mine] if len(self.pieces) > mine else self.pieces[-1])
            self._assemble()
        if index == self.n_steps:
            ctx.reset_optimizer()
            return
        if replica == 0:  # a new round: every replica starts from this combined model
            self.combined = self._snapshot()
            self.pieces: list[dict] = []
        elif mine in (None, replica):
            self._restore(self.combined)
        if mine not in (None, replica):
            return  # another rank trains this replica
        if mine is not None:  # count what the replicas before this one explored, as one process does
            for earlier in self.partitions[:replica]:
                for name in earlier:
                    self.engine.ever_active[name].fill_(True)
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

    def state_owners(self) -> dict[str, int | None]:
        """Partition owning each model state key under `combine=copy` (module docstring rules)."""
        return state_owners(self.engine.model, self.engine, self.partitions, self.stage_names)

    def _weight_owners(self) -> dict[str, int]:
        """State key of each partition's prunable parameter (a Powerprop `...original` too)."""
        key_of = {id(p): k for k, p in self.engine.model.named_parameters()}
        return {
            key_of[id(self.engine.tensors[name].param)]: i
            for i, part in enumerate(self.partitions) for name in part
        }

    @torch.no_grad()
    def _assemble(self) -> None:
        """Build the next combined model from the round's replicas (`combine`: copy or average)."""
        models = [p["model"] for p in self.pieces]
        state = {}
        if self.options.combine is Combine.copy:
            owners = self.state_owners()
            for key in models[0]:
                owner = owners.get(key)
                state[key] = models[0 if owner is None else owner][key]
        else:
            owners = self._weight_owners()
            for key, value in models[0].items():
                if key in owners:
                    state[key] = models[owners[key]][key]
                elif value.is_floating_point():
                    state[key] = torch.stack([m[key] for m in models]).mean(0)
                else:  # integer buffers such as BatchNorm's num_batches_tracked
                    state[key] = models[-1][key]
        owner = {name: i for i, part in enumerate(self.partitions) for name in part}
        engine_state = {
            "masks": {n: self.pieces[owner[n]]["engine"]["masks"][n] for n in self.engine.names},
            "densities": {n: self.pieces[owner[n]]["engine"]["densities"][n] for n in self.engine.names},
        }
        self._restore({"model": state, "engine": engine_state})
        for piece in self.pieces:  # what any replica explored stays explored (replicas on ranks)
            for name, explored in piece["engine"]["ever_active"].items():
                self.engine.ever_active[name] |= explored
        self.engine.apply_masks()

    # ------------------------------------------------------------ plan
    def mask_update_steps(self) -> list[int]:
        return list(range(0, self.finetune_start + 1, self.step_length))

    def densities_at(self, step: int) -> dict[str, float]:
        densities = dict(self.target.densities)
        if step < self.finetune_start:  # both variants, both starts: one partition dense at a time
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
