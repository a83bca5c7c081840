"""`acdc`: Alternating Compressed/DeCompressed training (Peste et al., NeurIPS 2021, arXiv 2106.12379;
docs/methods.md, AC/DC).

A dense warm-up, then compressed phases (prune to the target by magnitude, train with that mask
fixed: IHT-style) alternating with decompressed phases (every weight re-enabled; the pruned ones
come back as exact zeros, as `RestoreWeights` does in the official code), and a longer final
compressed phase. The magnitude criterion follows the run's `distribution`: `global` puts one threshold over
all prunable tensors (the paper's "global" models), a layer-wise allocation prunes each tensor to
its own density. Masks change only at phase boundaries.

Phases are given as fractions of training (so a schedule scales with `epochs`), counted in steps
as round(fraction * total_steps):

    W = warmup, P = phase, F = total - final_compressed           (the final prune)
    n = floor((F - W) / 2P) compressed/decompressed pairs
    D[0, W) . C[W, W+P) . D[W+P, W+2P) . ... . C[W+(2n-2)P, W+(2n-1)P) . D[W+(2n-1)P, F) . C[F, total)

i.e. prune at W, W+2P, ..., W+(2n-2)P and at F; restore at W+P, ..., W+(2n-1)P (the official
configs' `[start, freq, end]` pruner and recycler lists). The last decompressed phase absorbs the
remainder: it lasts P + ((F - W) mod 2P). Both official schedules come out exactly:

* ImageNet ResNet-50, 100 epochs (the defaults): warmup 0.1, phase 0.05, final_compressed 0.15
  -> prune at 10, 20, ..., 70 and 85, restore at 15, 25, ..., 75: 10-epoch warm-up, 5-epoch
  phases, a 10-epoch last dense phase, a 15-epoch final compressed phase.
* CIFAR-100 WRN-28-10, 200 epochs: warmup 0.05, phase 0.1, final_compressed 0.15
  -> prune at 10, 50, 90, 130, 170, restore at 30, 70, 110, 150.

Optimizer state when a compressed phase ends (`reset_momentum`):

* `all` (default): the whole optimizer state is cleared at the first step of every decompressed
  phase, for every parameter (biases and norms included). This is the official code with
  `--reset_momentum_after_recycling` (set in its run scripts): the flag zeroes the momentum
  buffer of every parameter of its SGD before the first step after a recycle. With Adam/AdamW,
  sparsebench clears all their state (a fresh optimizer, step count included).
* `restored`: only the restored (previously pruned) entries get zero momentum / Adam moments
  (earlier sparsebench behaviour; `true` is read as `restored`).
* `none`: nothing is reset (`false` is read as `none`); restored entries keep the state they had
  when pruned.

Under `powerprop=alpha` restored weights cannot come back at v = 0, where they would never
train: they come back at a fresh Powerprop initial value of v (sparse/powerprop.py).

AC/DC yields a sparse-dense pair: the model of the last decompressed phase, taken at the moment
it is pruned for the final compressed phase, is returned by `artifacts()` as `model_dense`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext
from sparsebench.sparse.powerprop import export_state_dict

COMPRESSED, DECOMPRESSED = "compressed", "decompressed"


class ResetMomentum(enum.Enum):
    all = "all"  # clear the whole optimizer state when a decompressed phase starts (official)
    restored = "restored"  # zero the state of the restored entries only
    none = "none"  # keep every state


@dataclass
class ACDCOptions:
    warmup: float = 0.1  # dense warm-up, fraction of training (ImageNet config: 10 of 100 epochs)
    phase: float = 0.05  # length of each compressed and decompressed phase (5 of 100 epochs)
    final_compressed: float = 0.15  # length of the final compressed phase (15 of 100 epochs)
    # Optimizer state reset when a compressed phase ends; true/false are read as restored/none.
    reset_momentum: ResetMomentum | bool = ResetMomentum.all


def phase_boundaries(total_steps: int, warmup: int, phase: int, final_start: int) -> list[tuple[int, str]]:
    """(step, kind) at which each phase starts; training is dense before the first one."""
    pairs = (final_start - warmup) // (2 * phase)
    out = []
    for j in range(pairs):
        out.append((warmup + 2 * j * phase, COMPRESSED))
        out.append((warmup + (2 * j + 1) * phase, DECOMPRESSED))
    out.append((final_start, COMPRESSED))
    return out


@METHODS.register("acdc")
class ACDC(SparsityMethod):
    Options = ACDCOptions
    supports_global_allocation = True

    def validate(self) -> None:
        o, total = self.options, self.total_steps
        reset = o.reset_momentum
        if isinstance(reset, bool):  # the earlier boolean spelling
            reset = ResetMomentum.restored if reset else ResetMomentum.none
        self.reset_momentum: ResetMomentum = reset
        for key in ("warmup", "phase", "final_compressed"):
            value = getattr(o, key)
            low_ok = value >= 0.0 if key == "warmup" else value > 0.0
            if not (low_ok and value < 1.0):
                bound = "[0, 1)" if key == "warmup" else "(0, 1)"
                raise UserError(f"method.{key}={value}: expected a fraction of training in {bound}")
        self.warmup_steps = round(o.warmup * total)
        self.phase_steps = round(o.phase * total)
        self.final_start = total - round(o.final_compressed * total)
        if self.phase_steps < 1:
            raise UserError(
                f"method.phase={o.phase} is shorter than one step of the {total} training steps; raise it or epochs"
            )
        if self.final_start >= total:
            raise UserError(
                f"method.final_compressed={o.final_compressed} is shorter than one step of the {total} training steps"
            )
        if self.warmup_steps + 2 * self.phase_steps > self.final_start:
            raise UserError(
                f"AC/DC phases do not fit in training: warmup={o.warmup} + one compressed and one decompressed "
                f"phase of {o.phase} + final_compressed={o.final_compressed} exceed 1; lower them"
            )
        self.boundaries = phase_boundaries(total, self.warmup_steps, self.phase_steps, self.final_start)
        self._kind_at = dict(self.boundaries)
        self.dense_model: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------ schedule
    def phase_at(self, step: int) -> str:
        """The kind of phase `step` belongs to (after its boundary's mask change)."""
        kind = DECOMPRESSED  # the warm-up is dense
        for start, k in self.boundaries:
            if start > step:
                break
            kind = k
        return kind

    def start(self, ctx: StepContext) -> None:
        spe = self.steps_per_epoch
        prunes = [s for s, k in self.boundaries if k == COMPRESSED]
        restores = [s for s, k in self.boundaries if k == DECOMPRESSED]
        ctx.log(
            f"AC/DC: prune at epochs {[round(s / spe, 2) for s in prunes]}, "
            f"restore at epochs {[round(s / spe, 2) for s in restores]} "
            f"(steps {prunes} / {restores}); final compressed phase from step {self.final_start}; "
            f"optimizer state reset at each restore: {self.reset_momentum.value}"
        )

    def before_step(self, ctx: StepContext) -> None:
        kind = self._kind_at.get(ctx.step)
        if kind == COMPRESSED:
            if ctx.step == self.final_start:
                # The last decompressed phase's model, as it is at the final prune (the dense half
                # of AC/DC's sparse-dense pair).
                # Exported like model.pt (effective weights under plain names under Powerprop).
                exported = export_state_dict(self.engine.model)
                self.dense_model = {k: v.detach().clone() for k, v in exported.items()}
            self.magnitude_prune(ctx.optimizer)  # global or layer-wise, per the run's distribution
        elif kind == DECOMPRESSED:
            # Pruned weights return as zeros (RestoreWeights), or at a fresh initial v under Powerprop.
            reset = self.reset_momentum
            self.engine.grow_dense(self.engine.names, ctx.optimizer if reset is ResetMomentum.restored else None)
            if reset is ResetMomentum.all:
                ctx.reset_optimizer()  # every parameter's momentum, as --reset_momentum_after_recycling

    # ------------------------------------------------------------ artifacts and resume
    def artifacts(self) -> dict[str, dict]:
        return {} if self.dense_model is None else {"model_dense": self.dense_model}

    def state_dict(self) -> dict:
        return {"dense_model": self.dense_model}  # phases are a function of the step

    def load_state_dict(self, state: dict) -> None:
        self.dense_model = state.get("dense_model")

    # ------------------------------------------------------------ the plan, for dry runs
    def mask_update_steps(self) -> list[int]:
        return [s for s, _ in self.boundaries]

    def schedule_value(self, step: int) -> tuple[str, float]:
        return ("compressed", 1.0 if self.phase_at(step) == COMPRESSED else 0.0)

    def densities_at(self, step: int) -> dict[str, float]:
        if self.phase_at(step) == DECOMPRESSED:
            return {n: 1.0 for n in self.engine.names}
        return super().densities_at(step)
