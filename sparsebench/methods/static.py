"""`static`: a random sparse mask drawn at initialisation and never changed.

The allocation (uniform, ER, ERK, custom) decides each tensor's density; the mask is drawn
uniformly at random with exactly floor(s_l N_l) zeros per tensor (docs/methods.md, allocations).
Under `distribution.structure=nm` each group of M keeps N entries drawn at random; under
`block`, whole b x b blocks are drawn at random, their number rounded as `target_nnz` rounds.
"""
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext


@METHODS.register("static")
class Static(SparsityMethod):
    supports_structure = True
    def start(self, ctx: StepContext) -> None:
        self.random_start(ctx)
