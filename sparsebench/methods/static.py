"""`static`: a random sparse mask drawn at initialisation and never changed.

The allocation (uniform, ER, ERK, custom) decides each tensor's density; the mask is drawn
uniformly at random with exactly floor(s_l N_l) zeros per tensor (ALGORITHMS.md section 0.1).
"""
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext


@METHODS.register("static")
class Static(SparsityMethod):
    def start(self, ctx: StepContext) -> None:
        self.random_start(ctx)
