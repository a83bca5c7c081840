"""Sparsity-aware initialisation: give a sparse layer the signal scale of its dense init.

A dense layer's init (Kaiming, Glorot) sets each unit's weight variance for its full fan-in.
When only a fraction d of the incoming weights is kept, the unit's pre-activation variance
shrinks by d, and in a network without normalisation the shrink compounds layer by layer, so a
network that is sparse from step 0 starts with a vanishing signal (Evci et al., "Gradient Flow in
Sparse Neural Networks and How Lottery Tickets Win", AAAI 2022). The remedy rescales the
initial weights so that the variance matches the dense init again:

* `layer`: every kept weight of a tensor times 1/sqrt(d), d the tensor's density (the
  per-layer reading, matching the density-scaled init of the sparse-init literature);
* `unit`: each output unit's kept weights times sqrt(n_in / n_active), n_active its own number
  of kept incoming weights (Evci et al.'s per-neuron fan-in form as sparsebench reads it; the
  paper's exact formula was not re-checked here, hence both forms are offered).

Applied once, to the initial masks of a fresh run (not on resume, not to weights grown later);
off by default because the default model is normalised. Under Powerpropagation the effective
weights are rescaled and the trained parameter recomputed from them.
"""
from __future__ import annotations

import enum

import torch
from torch.nn.utils import parametrize

from sparsebench.sparse.masked import MaskedModel


class SparseInit(enum.Enum):
    none = "none"
    layer = "layer"
    unit = "unit"


@torch.no_grad()
def rescale_for_sparsity(engine: MaskedModel, mode: SparseInit) -> None:
    if mode is SparseInit.none:
        return
    for t in engine.tensors.values():
        if t.density >= 1.0:
            continue
        rows = t.mask.reshape(t.mask.shape[0], -1)  # (units, fan-in)
        if mode is SparseInit.layer:
            factor = torch.full_like(rows, 1.0 / t.density ** 0.5, dtype=t.param.dtype)
        else:
            active = rows.sum(1, keepdim=True).clamp(min=1).to(t.param.dtype)
            factor = (rows.shape[1] / active).sqrt().expand_as(rows)
        factor = factor.reshape(t.mask.shape)
        if parametrize.is_parametrized(t.module, "weight"):  # Powerprop: scale w, then solve for v
            scaled = t.module.weight * factor
            t.param.copy_(t.module.parametrizations.weight[0].right_inverse(scaled))
        else:
            t.param.mul_(factor)
        t.param.mul_(t.keep)
