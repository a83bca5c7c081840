"""Sparsity methods, one module each, registered by name in METHODS."""
from sparsebench.methods import dense, gap, gmp, magnitude, static  # noqa: F401  (registration)
from sparsebench.methods import acdc, dpf  # noqa: F401  (registration)
from sparsebench.methods import cigl, dstee, rigl, set  # noqa: F401  (registration)
from sparsebench.methods import node_masks  # noqa: F401  (registration)
from sparsebench.methods import svd  # noqa: F401  (registration)
from sparsebench.methods.base import METHODS, SparsityMethod, SparsityTarget, StepContext, finish_step

__all__ = ["METHODS", "SparsityMethod", "SparsityTarget", "StepContext", "finish_step"]
