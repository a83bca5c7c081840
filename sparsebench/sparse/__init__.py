"""The masked-layer engine: masks and their invariants, layer allocations, FLOPs accounting."""
from sparsebench.sparse.masked import MaskedModel, MaskInvariantError, reset_optimizer_state, target_nnz, topk_mask

__all__ = ["MaskedModel", "MaskInvariantError", "reset_optimizer_state", "target_nnz", "topk_mask"]
