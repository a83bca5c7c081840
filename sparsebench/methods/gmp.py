"""`gmp`: gradual magnitude pruning (Zhu & Gupta 2017, arXiv 1710.01878; docs/methods.md, GMP).

Every `frequency` steps between `begin` and `end` (fractions of training) the network is pruned
by magnitude to s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 (their eq. 1); pruned weights
never come back. Defaults follow RigL's pruning baseline on CIFAR (begin 20k, end 75k of 97.6k
steps, i.e. 0.205 and 0.768 of training, rounded here to 0.2 and 0.75; pass method.end=0.768 to
match it exactly). Under `powerprop=alpha` nothing is regrown, so Powerprop only changes the
weights' dynamics (the forward sign(v)|v|^alpha keeps masked entries' gradients finite).

Structured sparsity (`distribution.structure`): every event prunes by magnitude within the
structure (`magnitude_masks`). N:M: s_t is rounded down to a multiple of 1/M, so the events pass
through the levels M:M, (M-1):M, ..., N:M (each group keeps its n_t largest |W|; the final
event reaches N:M exactly); blocks: s_t is rounded to whole blocks and the blocks with the
smallest sum of |W| go. Pruned entries never come back in either case.
"""
from dataclasses import dataclass

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext
from sparsebench.schedules import cubic_sparsity, last_event


@dataclass
class GMPOptions:
    initial_sparsity: float = 0.0
    begin: float = 0.2  # fraction of training at which pruning starts (t0)
    end: float = 0.75  # fraction of training at which the target sparsity is reached
    frequency: int = 100  # steps between pruning events (dt)
    updates_per_epoch: float | None = None  # instead of frequency: pruning events per epoch
    total_updates: int | None = None  # instead of frequency: about this many events from begin to end


@METHODS.register("gmp")
class GMP(SparsityMethod):
    Options = GMPOptions
    supports_global_allocation = True
    supports_structure = True  # the rounding lives in scaled_densities and magnitude_masks
    min_updates = 5

    def validate(self) -> None:
        o = self.options
        self.check_pruning_window(o.begin, o.end)
        if not 0.0 <= o.initial_sparsity <= self.target.sparsity:
            raise UserError(
                f"method.initial_sparsity={o.initial_sparsity}: expected a value in [0, sparsity={self.target.sparsity}]"
            )
        self.begin_step = int(o.begin * self.total_steps)
        self.end_step = int(o.end * self.total_steps)
        self.frequency = self.update_interval("frequency", self.end_step - self.begin_step)
        self.events = [t for t in range(self.begin_step, self.end_step + 1)
                       if self.is_pruning_step(t) and self.sparsity_at(t) > 0]

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.options.initial_sparsity, self.target.sparsity, self.begin_step, self.end_step)

    def is_pruning_step(self, t: int) -> bool:
        on_grid = t >= self.begin_step and (t - self.begin_step) % self.frequency == 0
        return (on_grid and t <= self.end_step) or t == self.end_step

    def before_step(self, ctx: StepContext) -> None:
        if self.is_pruning_step(ctx.step):
            sparsity = self.sparsity_at(ctx.step)
            if sparsity > 0:
                self.magnitude_prune(ctx.optimizer, sparsity=sparsity)

    def mask_update_steps(self) -> list[int]:
        return list(self.events)

    def schedule_value(self, step: int) -> tuple[str, float]:
        """The sparsity in force during `step` (set at the last pruning event)."""
        last = last_event(self.events, step)
        return "sparsity", 0.0 if last is None else self.sparsity_at(last)

    def densities_at(self, step: int) -> dict[str, float]:
        return self.scaled_densities(self.schedule_value(step)[1])
