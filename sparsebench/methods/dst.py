"""Dynamic sparse training: the drop-then-grow machinery shared by `rigl` and `set`.

Every update round, each sparse tensor drops some of its active weights and grows the same
number at positions that the drop did not keep, so its non-zero count never changes
(docs/methods.md (RigL, SET)). The pieces a method may change are hooks:

* `update_steps()`: when rounds happen (default: every `delta_t` steps while t < T_end, with
  T_end = `end` x training steps; the first round is at step delta_t, not at the random init;
  RigL's `timing=reference` adds step 0, see "Timing" below);
* `drop_fraction(step)`: f(t), cosine `alpha/2 (1 + cos(pi t / T_end))` (RigL's `cosine_decay`)
  or constant `alpha`, 0 from T_end on;
* `select_drop(name, t, step)`: which active entries go (default: the k = floor(f(t) nnz)
  smallest |W|, with N(0, 1e-5) noise from the method's generator to break ties, as RigL does);
* `grow_scores(name, t, step)`: the one function in which RigL (|dense gradient|) and SET
  (uniform random) differ. Entries kept by the drop are excluded; a just-dropped entry competes
  like any inactive one and, if regrown, keeps its value (the engine does that);
* `regrow_init`: "zero" (RigL, RigL-protocol SET) or a callable for the engine.

Timing. A method that reads the dense gradient (`needs_dense_grad`) copies |dL/dw| in
`after_backward` of an update step (the trainer has not masked it yet) and changes the masks in
`after_step`: grown weights then begin the next step at exactly 0 with reset optimizer state.
Two timings (`timing`, RigL's option):

* `sparsebench` (default): rounds at delta_t, 2 delta_t, ... < T_end; the update step also
  applies its optimizer step (to the weights that survive the drop), then the mask changes.
* `reference` (google-research/rigl `sparse_optimizers_base.py`): rounds at 0, delta_t, ...
  <= T_end (the first one at step 0, on the random initial mask), and on a round step the mask
  update takes the place of the optimizer step: no weight, momentum or weight-decay update
  happens at that step (`skips_optimizer_step`). With the cosine schedule the round at T_end
  drops nothing, but its optimizer step is still skipped, as in the reference.

The two differ by one round at step 0 and by one skipped weight update in every delta_t steps
before T_end (1 % of them at the paper's delta_t = 100).

A method that needs no gradient changes the masks in `before_step` of the update step (SET's
original protocol: "at the first step of every epoch but the first"). Either way every mask
change goes through `MaskedModel.set_mask`, which zeroes dropped entries, initialises grown
ones, resets their momentum / Adam moments, and checks the exact count.

Powerpropagation (`powerprop=alpha`, sparse/powerprop.py). The parameters are v with
w = sign(v)|v|^alpha. The drop by |v| is the drop by |w| (same order). The grow score reads
dL/dw of the masked model (`MaskedModel.weight_grad`, recorded on update steps only), not
dL/dv, which is 0 at every inactive entry. Entries grown at 0 would never train (v = 0 is
absorbing), so the engine draws them a fresh initial v instead (`MaskedModel.set_mask`).

Structured sparsity (`distribution.structure`, sparse/structure.py). N:M: the drop is the
method's own (any active entries), and each group of M regrows as many entries as it lost, at
its largest grow scores among its entries the drop did not keep, so every group keeps exactly
N. Blocks: whole blocks are dropped, the k = floor(f(t) x active blocks) with the smallest sum
of |W| + noise (for every method and protocol: SET's sign split has no block analogue, so its
original protocol drops the fraction zeta of the active blocks), and as many whole blocks grow
where the sum of the grow scores is largest.
"""
from __future__ import annotations

import enum
import math
from typing import ClassVar

import torch

from sparsebench.errors import UserError
from sparsebench.methods.base import SparsityMethod, StepContext
from sparsebench.schedules import cosine_drop_fraction
from sparsebench.sparse.masked import PrunableTensor, RegrowInit, topk_mask
from sparsebench.sparse.structure import StructureKind

# RigL adds N(0, 1e-5) to |W| before the magnitude drop so that ties (e.g. weights grown at 0
# that have not moved) are broken at random rather than by position.
TIE_NOISE_STD = 1e-5


class DropSchedule(enum.Enum):
    cosine = "cosine"  # alpha/2 (1 + cos(pi t / T_end)): the RigL paper's setting
    constant = "constant"  # alpha until T_end: the RigL code's flag default


class Timing(enum.Enum):
    sparsebench = "sparsebench"  # rounds at delta_t, 2 delta_t, ... < T_end, after the optimizer step
    reference = "reference"  # rounds at 0, delta_t, ... <= T_end, replacing that step's optimizer step


class DynamicSparseMethod(SparsityMethod):
    """Drop-then-grow every update round; subclasses supply the grow score.

    Subclass options must have `alpha`, `drop_schedule`, `delta_t` and `end`; `timing` is optional
    (default `sparsebench`).
    """

    needs_dense_grad: ClassVar[bool] = False
    description: ClassVar[str] = "drop by |W|, grow"
    min_updates = 5
    supports_structure = True  # N:M and blocks: see the module docstring

    # ------------------------------------------------------------ set-up and plan
    def validate(self) -> None:
        o = self.options
        if not 0.0 < o.alpha <= 1.0:
            raise UserError(f"method.alpha={o.alpha}: expected a drop fraction in (0, 1]")
        if not 0.0 < o.end <= 1.0:
            raise UserError(f"method.end={o.end}: expected a fraction of training in (0, 1]")
        self.end_step = int(o.end * self.total_steps)  # T_end
        self.timing = getattr(o, "timing", Timing.sparsebench)
        # delta_t, or from updates_per_epoch / total_updates (rounds strictly inside (0, T_end)).
        self.delta_t = self.update_interval("delta_t", self.end_step if self.reference_timing else self.end_step - 1)
        self.updates = self.update_steps()
        self._update_set = set(self.updates)
        self._dense_grads: dict[str, torch.Tensor] = {}

    @property
    def reference_timing(self) -> bool:
        return self.timing is Timing.reference

    def update_steps(self) -> list[int]:
        if self.reference_timing:  # the reference: t = k delta_t with 0 <= t <= T_end
            last = min(self.end_step, self.total_steps - 1)
            return list(range(0, last + 1, self.delta_t))
        return list(range(self.delta_t, self.end_step, self.delta_t))

    def drop_fraction(self, step: int) -> float:
        o = self.options
        if step > self.end_step or (step == self.end_step and not self.reference_timing):
            return 0.0
        if o.drop_schedule is DropSchedule.cosine:
            return cosine_drop_fraction(step, o.alpha, self.end_step)
        return o.alpha

    def mask_update_steps(self) -> list[int]:
        return list(self.updates)

    def schedule_value(self, step: int) -> tuple[str, float]:
        return "drop_fraction", self.drop_fraction(step)

    def densities_at(self, step: int) -> dict[str, float]:
        return self.engine.round_densities(self.target.densities)  # constant: only the positions move

    def dense_weight_grad(self, step: int) -> bool:
        return self.needs_dense_grad and step in self._update_set

    def skips_optimizer_step(self, step: int) -> bool:
        """`timing=reference`: the mask update replaces the optimizer step of a round step."""
        return self.reference_timing and self.needs_dense_grad and step in self._update_set

    def start(self, ctx: StepContext) -> None:
        self.random_start(ctx)
        if self.updates:
            ctx.log(f"{self.name}: {len(self.updates)} mask updates at steps {self.updates[0]}..{self.updates[-1]}; "
                    f"{self.description}")
        else:
            ctx.log(f"{self.name}: no mask update fits in {self.total_steps} steps; masks stay as drawn")

    # ------------------------------------------------------------ hooks
    def before_step(self, ctx: StepContext) -> None:
        if ctx.step not in self._update_set:
            return
        if self.needs_dense_grad:
            self.engine.capture_weight_grads(True)  # dL/dw under Powerprop; a no-op otherwise
        else:
            self.update_masks(ctx.step, ctx.optimizer)

    def after_backward(self, ctx: StepContext) -> None:
        if self.needs_dense_grad and ctx.step in self._update_set:
            self._dense_grads = self.read_dense_gradients()
            self.engine.capture_weight_grads(False)

    def after_step(self, ctx: StepContext) -> None:
        if self.needs_dense_grad and ctx.step in self._update_set:
            self.update_masks(ctx.step, ctx.optimizer)
            self._dense_grads = {}

    def read_dense_gradients(self) -> dict[str, torch.Tensor]:
        """|dL/d(M*W)| of the current mini-batch for every sparse tensor (a copy: the trainer
        masks .grad in place right after this hook). Masked weights are exactly 0, so the
        gradient w.r.t. the weight is the gradient w.r.t. M*W; under Powerprop it is the
        recorded dL/dw (`MaskedModel.weight_grad`), not the parameter's dL/dv."""
        out = {}
        for name, t in self.engine.tensors.items():
            grad = self.engine.weight_grad(name)
            out[name] = torch.zeros_like(t.param) if grad is None else grad.detach().abs().clone()
        return out

    # ------------------------------------------------------------ one update round
    @torch.no_grad()
    def update_masks(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, tuple[int, int]]:
        """Drop then grow in every sparse tensor; returns name -> (dropped, grown) positions."""
        self.before_update(step)
        structure = self.engine.structure
        changes = {}
        for name, t in self.engine.tensors.items():
            if t.density >= 1.0:
                continue  # a dense tensor has nowhere to grow
            if structure.kind is StructureKind.block:
                drop = self.block_drop(t, step)
            else:
                drop = self.select_drop(name, t, step) & t.mask
            k = int(drop.sum())
            if k == 0:
                continue
            kept = t.mask & ~drop
            scores = torch.nan_to_num(self.grow_scores(name, t, step).float(), nan=0.0)
            scores = scores.masked_fill(kept, -math.inf)
            # Unstructured: the k largest; N:M: per group, as many as the group lost; blocks:
            # as many whole blocks as were dropped.
            new_mask = kept | structure.grow(scores, drop)
            self.remember_dropped(name, t, drop)
            changes[name] = self.engine.set_mask(name, new_mask, t.density, optimizer, self.regrow_init(name))
        return changes

    def before_update(self, step: int) -> None:
        """Called once at the start of every update round (RigL's exploration counters)."""

    def magnitude_drop(self, t: PrunableTensor, k: int) -> torch.Tensor:
        """The k active entries with the smallest |W| + N(0, 1e-5) tie-breaking noise."""
        noise = torch.randn(t.param.shape, generator=self.generator) * TIE_NOISE_STD
        scores = t.param.detach().abs() + noise.to(device=t.param.device, dtype=t.param.dtype)
        scores = scores.masked_fill(~t.mask, -math.inf)
        keep = topk_mask(scores, int(t.mask.sum()) - k)
        return t.mask & ~keep

    def select_drop(self, name: str, t: PrunableTensor, step: int) -> torch.Tensor:
        k = math.floor(self.drop_fraction(step) * int(t.mask.sum()))
        return self.magnitude_drop(t, k)

    def block_drop(self, t: PrunableTensor, step: int) -> torch.Tensor:
        """Block structure: the floor(f(t) x active blocks) active blocks with the smallest sum
        of |W| + N(0, 1e-5) noise, as an entry-level mask of whole blocks."""
        structure = self.engine.structure
        active = structure.pool(t.mask.to(torch.int32)) > 0
        k = math.floor(self.drop_fraction(step) * int(active.sum()))
        if k == 0:
            return torch.zeros_like(t.mask)
        noise = torch.randn(t.param.shape, generator=self.generator) * TIE_NOISE_STD
        scores = t.param.detach().abs().float() + noise.to(device=t.param.device)
        block_scores = structure.pool(scores).masked_fill(~active, math.inf)
        return structure.unpool(topk_mask(-block_scores, k), t.mask.shape)

    def grow_scores(self, name: str, t: PrunableTensor, step: int) -> torch.Tensor:
        """Higher grows first; entries kept by the drop are excluded by the caller."""
        raise NotImplementedError

    def random_scores(self, t: PrunableTensor) -> torch.Tensor:
        """Uniform random grow scores from the method's generator (SET)."""
        return torch.rand(t.param.shape, generator=self.generator).to(t.param.device)

    def regrow_init(self, name: str) -> RegrowInit:
        return "zero"

    def remember_dropped(self, name: str, t: PrunableTensor, drop: torch.Tensor) -> None:
        """Called with the dropped entries before they are zeroed (SET's regrow_init=keep)."""

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
