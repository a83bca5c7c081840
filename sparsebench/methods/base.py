"""The one small base class every sparsity method subclasses (after jaxpruner's design).

A method sees the MaskedModel, the step counters and the optimizer through hooks the trainer
calls at fixed points of a training step; it returns nothing and changes masks only through the
engine (which keeps the invariants). It never reads files or parses config: its options arrive
as a validated dataclass.

    trainer step t:  method.before_step(ctx)       # scheduled mask changes (GMP, GaP phases)
                     forward, loss, backward
                     method.after_backward(ctx)    # dense gradients are still in .grad here
                     engine.mask_gradients()       # if method.mask_gradients_at(t)
                     optimizer.step()              # unless method.skips_optimizer_step(t)
                     method.after_step(ctx)        # weights updated, masks not yet re-applied
                     engine.apply_masks()

Under Powerprop the parameters are v, not the weights w = sign(v)|v|^alpha: a method that needs
dL/dw (RigL's grow score, DPF's feedback) turns on `engine.capture_weight_grads` in
`before_step` of the steps that need it and reads `engine.weight_grad(name)` (sparse/powerprop.py).

For dry runs (`dry_run=true`) a method also describes its plan without training:
`mask_update_steps()`, `schedule_value(step)` and `densities_at(step)`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from sparsebench.errors import UserError
from sparsebench.registry import Registry
from sparsebench.sparse.allocation import global_magnitude_densities
from sparsebench.sparse.masked import MaskedModel


@dataclass
class SparsityTarget:
    """What the run asks for: a global sparsity and how it is spread over the tensors."""

    sparsity: float
    allocation: str  # uniform | er | erk | custom | global
    densities: dict[str, float] | None  # fixed per-tensor targets; None for `global`

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity


@dataclass
class StepContext:
    """What a hook may look at or ask of the trainer at one step."""

    step: int  # the step about to run (0-based), counted over the whole run
    total_steps: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    reset_optimizer: Callable[[], None]  # forget all optimizer state (a fresh run's optimizer)
    restart_lr: Callable[[int], None]  # restart the LR schedule over the next n steps
    log: Callable[[str], None]
    # The first training batch (inputs, labels) on the run's device, for methods that score
    # weights on data before the first step (prune-at-init: SNIP, GraSP, SynFlow); None in
    # harnesses without data.
    first_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    # Replicas on ranks of their own (replica_ranks.py): this rank's finished replica in, every
    # rank's out, in replica order. None when one process trains every replica.
    exchange: Callable[[dict], list[dict]] | None = None
    # The training split's batches of an epoch (inputs, labels on the run's device), in the
    # order that epoch trains on, for methods that score masks on data (Random Search's proxy);
    # None in harnesses without data.
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None


@dataclass
class NoOptions:
    pass


METHODS: Registry[type["SparsityMethod"]] = Registry("method")


def finish_step(method: "SparsityMethod", engine: MaskedModel, ctx: StepContext, step_optimizer: Callable[[], None]) -> None:
    """The sparse half of a training step, after loss.backward(), in the order every method relies on.

    The trainer and the tests both call this, so the tests exercise the trainer's real order.
    """
    method.after_backward(ctx)  # dense gradients are still in .grad here
    if method.mask_gradients_at(ctx.step):
        engine.mask_gradients()
    if not method.skips_optimizer_step(ctx.step):
        step_optimizer()  # skipped: no weight, momentum or weight-decay update at all this step
    method.after_step(ctx)  # weights updated, masks not yet re-applied
    engine.apply_masks()


class SparsityMethod:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # False for `dense`: its runs ignore `sparsity` and are stored at sparsity 0.
    uses_sparsity: ClassVar[bool] = True
    # Methods that prune trained weights may resolve a `global` magnitude allocation; methods
    # that draw masks at initialisation need the densities up front.
    supports_global_allocation: ClassVar[bool] = False
    mask_gradients: ClassVar[bool] = True  # the default of `mask_gradients_at`
    # Methods whose every mask change goes through `random_start`, `magnitude_prune` (rounded
    # densities, structured top-k) or the structured drop-and-grow of dst.py keep N:M or block
    # structure (`distribution.structure`); the others are refused with a structured engine.
    supports_structure: ClassVar[bool] = False
    # True for methods whose masks remove whole hidden units (Random Search's node masks): their
    # weight sparsity follows from the units kept, not from `sparsity`, and they need every layer
    # in the engine, so the per-weight method tests (tests/test_methods.py) leave them out.
    removes_units: ClassVar[bool] = False
    # False for methods whose sparsity is not a weight mask (SVD training: ranks of U diag(s) V^T,
    # engine masks all ones, `parameter_densities` says what is kept): the per-weight method tests
    # (tests/test_methods.py, tests/test_powerprop.py) leave them out, as they do `removes_units`.
    masks_weights: ClassVar[bool] = True
    # False for methods that change what a step computes beyond the mask (CigL's per-step random
    # mask and gradient rescaling): `backend=sparse`, whose compact kernels assume the masked
    # step, refuses them with one line.
    runs_on_sparse_backend: ClassVar[bool] = True
    # True for a method whose forward uses a random draw of its own every step (CigL's mask Z):
    # exact MARS's second pass at the previous weights could not see the same draw, so it is refused.
    random_forward: ClassVar[bool] = False
    # Why the method cannot run under `powerprop` (refused in one line when built), or None.
    powerprop_conflict: ClassVar[str | None] = None

    def __init__(
        self,
        options,
        engine: MaskedModel,
        target: SparsityTarget,
        total_steps: int,
        steps_per_epoch: int,
        generator: torch.Generator,
    ):
        self.options = options
        self.engine = engine
        self.target = target
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.generator = generator  # the method's own RNG: random masks, random partitions
        if engine.powerprop and self.powerprop_conflict:
            raise UserError(f"method={self.registered_name()} with powerprop: {self.powerprop_conflict}; use powerprop=1")
        if not engine.structure.unstructured and not self.supports_structure:
            raise UserError(
                f"distribution.structure={engine.structure.kind.value}: method {self.registered_name()} cannot keep "
                f"{engine.structure} masks; use distribution.structure=unstructured"
            )
        self.validate()

    @classmethod
    def registered_name(cls) -> str:
        return next((n for n in METHODS.names() if METHODS.get(n) is cls), cls.__name__)

    # ---------------------------------------------------------------- hooks
    def validate(self) -> None:
        """Raise UserError for options that cannot work with this model or schedule."""

    def start(self, ctx: StepContext) -> None:
        """Initial masks, before the first step of a fresh (not resumed) run."""

    def before_step(self, ctx: StepContext) -> None:
        pass

    def after_backward(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        """After optimizer.step(), before the engine re-applies the masks (DPF's dense shadow)."""

    def mask_gradients_at(self, step: int) -> bool:
        """Whether the engine masks the gradients of `step` before the optimizer step (so masked
        weights get no update). False only while a method updates masked entries (DPF)."""
        return self.mask_gradients

    def skips_optimizer_step(self, step: int) -> bool:
        """True where a mask update takes the place of this step's optimizer step (RigL with
        `timing=reference`). The forward and backward still run: FLOPs are unchanged but for the
        weight update itself, which the FLOP count leaves out anyway."""
        return False

    def dense_weight_grad(self, step: int) -> bool:
        """True where this step computes the gradient of every weight, masked ones included
        (FLOPs: 2 f_S + f_D); False where only active weights need it (3 f_S)."""
        return False

    def learning_rate(self, step: int, scheduled: float) -> float:
        """The learning rate of `step`, given the run's schedule's value (CigL's constant rate
        while it averages weights); the schedule's by default."""
        return scheduled

    def loss_term(self) -> torch.Tensor | None:
        """A regulariser added to this step's training loss before backward (SVD training's
        orthogonality and singular-value penalties); None for none. The logged train_loss stays
        the task loss."""
        return None

    def step_flops_overhead(self, step: int) -> float:
        """Training FLOPs of `step` that do not scale with the batch (SVD training forms every
        weight from U, s, V and takes its penalties, forward and backward); 0 for mask methods."""
        return 0.0

    def parameter_densities(self) -> dict[str, float] | None:
        """Per prunable tensor, the fraction of the dense layer's parameters the model keeps, for
        a method whose sparsity is not a mask (SVD training: a rank r layer keeps r(m+n)/(mn));
        None: the masks' non-zeros say it. When given, final.json's actual_sparsity,
        layer_densities and inference FLOPs follow it."""
        return None

    def inference_flop_densities(self, input_shape: tuple[int, ...]) -> dict[str, float] | None:
        """Per prunable tensor, the fraction of its dense forward FLOPs that the trained model
        costs at inference (final.json's inference_flops), for inputs of `input_shape`; None: the
        masks' non-zeros say it. Default: `parameter_densities`, right when every kept parameter
        is used once per output position."""
        return self.parameter_densities()

    def artifacts(self) -> dict[str, dict]:
        """Extra state_dicts to save beside model.pt as <name>.pt (AC/DC's paired dense model)."""
        return {}

    def summary(self) -> dict:
        """Extra entries for final.json (Random Search: the candidates' proxy scores and cost)."""
        return {}

    def replica_plan(self) -> tuple[int, int, int] | None:
        """For a method that trains independent replicas (P-GaP): (replicas, step where they end,
        steps per replica turn), so that as many ranks can train them side by side
        (sparsebench/replica_ranks.py); None for every other method."""
        return None

    def use_replica_rank(self, rank: int) -> None:
        """From now on this process trains only replica `rank`; `ctx.exchange` swaps finished replicas."""
        raise NotImplementedError(f"{self.name} has no replicas")

    # ---------------------------------------------------------------- the plan, for dry runs
    def mask_update_steps(self) -> list[int]:
        """Steps at which masks may change (before_step/after_backward of that step)."""
        return []

    def schedule_value(self, step: int) -> tuple[str, float] | None:
        """The method's scheduled quantity at `step`, e.g. ("sparsity", s_t) or ("drop_fraction", f)."""
        return None

    def densities_at(self, step: int) -> dict[str, float]:
        """Planned mask density per tensor during `step` (FLOPs of a dry run). It may change
        only at the steps of `mask_update_steps()`. A `global` allocation is only known once
        trained weights exist: estimated as uniform."""
        if self.target.densities is None:
            return self.engine.round_densities({n: self.target.density for n in self.engine.names})
        return self.engine.round_densities(self.target.densities)

    def state_dict(self) -> dict:
        """Method state beyond the masks and the step (which the trainer checkpoints)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---------------------------------------------------------------- the plan, for users
    # Fewer planned mask updates than this and a method's schedule no longer means what it says
    # (a cosine drop fraction or a cubic sparsity curve sampled once or twice is a one-shot change).
    min_updates: ClassVar[int] = 0

    def schedule_warning(self) -> str | None:
        """One line when the run is too short for the method's update schedule, else None."""
        planned = len(self.mask_update_steps())
        if planned >= self.min_updates:
            return None
        return (
            f"warning: method {self.registered_name()} plans {planned} mask update(s) in {self.total_steps} steps; "
            f"its schedule needs about {self.min_updates} to mean what it says: raise epochs, or space the updates "
            "with method.updates_per_epoch or method.total_updates"
        )

    # ---------------------------------------------------------------- helpers for subclasses
    def check_pruning_window(self, begin: float, end: float) -> None:
        """Options `begin` and `end` (fractions of training) of a schedule."""
        if not 0.0 <= begin < end < 1.0:
            raise UserError(f"method.begin={begin}, method.end={end}: need 0 <= begin < end < 1")

    def update_interval(self, key: str, window: int) -> int:
        """Steps between mask updates. The papers state it in steps (`method.<key>`, RigL's
        delta_t = 100, GMP's frequency), which at a short run's few hundred steps means one or two
        updates; `method.updates_per_epoch` or `method.total_updates` (spread over the `window`
        steps in which updates happen) give it in the units researchers also use, and win over
        `method.<key>` when set."""
        o = self.options
        steps, per_epoch, total = getattr(o, key), getattr(o, "updates_per_epoch", None), getattr(o, "total_updates", None)
        if per_epoch is not None and total is not None:
            raise UserError("method.updates_per_epoch and method.total_updates are both set; give one of them "
                            f"(or neither, to use method.{key} in steps)")
        if per_epoch is not None:
            if per_epoch <= 0:
                raise UserError(f"method.updates_per_epoch={per_epoch}: expected a positive number")
            return max(1, round(self.steps_per_epoch / per_epoch))
        if total is not None:
            if total < 1:
                raise UserError(f"method.total_updates={total}: expected a positive number of updates")
            return max(1, window // total)
        if steps < 1:
            raise UserError(f"method.{key}={steps}: expected a positive number of steps between mask updates")
        return steps

    def scaled_densities(self, sparsity: float) -> dict[str, float]:
        """Per-tensor densities at an intermediate global `sparsity`, keeping the allocation's
        shape: each tensor's sparsity s_l is scaled by sparsity / s (uniform for `global`).
        Rounded to the densities the engine's structure admits (N:M: the level n/M at or above
        the density, i.e. s_t rounded down to a multiple of 1/M; blocks: whole blocks)."""
        if self.target.densities is None:
            return self.engine.round_densities({n: 1.0 - sparsity for n in self.engine.names})
        scale = sparsity / self.target.sparsity if self.target.sparsity > 0 else 0.0
        return self.engine.round_densities({n: 1.0 - scale * (1.0 - d) for n, d in self.target.densities.items()})

    def random_start(self, ctx: StepContext) -> None:
        """Exact-count uniformly random masks at the target densities (static sparse init),
        rounded to the structure's (random N:M groups, random blocks)."""
        densities = self.engine.round_densities(self.target.densities)
        masks = self.engine.random_masks(densities, self.generator)
        self.engine.set_masks(masks, densities, ctx.optimizer)

    def magnitude_prune(
        self,
        optimizer: torch.optim.Optimizer,
        names: Iterable[str] | None = None,
        sparsity: float | None = None,
    ) -> None:
        """Prune `names` (default: all) by magnitude to `sparsity` (default: the target).

        Layer-wise allocations scale each tensor's target sparsity s_l by sparsity/s (so a
        schedule's intermediate sparsity keeps the allocation's shape); `global` puts one
        magnitude threshold over all prunable tensors.
        """
        names = list(self.engine.names if names is None else names)
        sparsity = self.target.sparsity if sparsity is None else sparsity
        if self.target.allocation == "global":
            densities = global_magnitude_densities(self.engine, 1.0 - sparsity)
            densities = self.engine.round_densities({n: densities[n] for n in names})
        else:
            densities = {n: d for n, d in self.scaled_densities(sparsity).items() if n in names}
        self.engine.set_masks(self.engine.magnitude_masks(densities), densities, optimizer)
