"""`dense`: the unpruned baseline. Every mask stays all-ones; runs are stored at sparsity 0."""
from sparsebench.methods.base import METHODS, SparsityMethod


@METHODS.register("dense")
class Dense(SparsityMethod):
    uses_sparsity = False
    supports_global_allocation = True
