"""`magnitude`: train dense, prune once by weight magnitude, fine-tune with the mask fixed.

The one-shot baseline of Han et al. (2015): the prune happens at `prune_at` (a fraction of the
training steps), after which the remaining steps fine-tune the sparse network.
"""
from dataclasses import dataclass

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext


@dataclass
class MagnitudeOptions:
    prune_at: float = 0.5  # fraction of training done dense before the one-shot prune


@METHODS.register("magnitude")
class Magnitude(SparsityMethod):
    Options = MagnitudeOptions
    supports_global_allocation = True

    def validate(self) -> None:
        if not 0.0 <= self.options.prune_at < 1.0:
            raise UserError(f"method.prune_at={self.options.prune_at}: expected a fraction in [0, 1)")
        self.prune_step = int(self.options.prune_at * self.total_steps)

    def before_step(self, ctx: StepContext) -> None:
        if ctx.step == self.prune_step:
            self.magnitude_prune(ctx.optimizer)

    def mask_update_steps(self) -> list[int]:
        return [self.prune_step]

    def densities_at(self, step: int) -> dict[str, float]:
        return super().densities_at(step) if step >= self.prune_step else {n: 1.0 for n in self.engine.names}
