"""Low-rank weights W = U diag(s) V^T as a parametrisation (SVD training, Yang et al., CVPR-W 2020,
arXiv 2004.09031; docs/methods.md, SVD training).

A prunable weight of shape (out, in, *kernel) is read as an m x n matrix and kept as three
trained tensors: U (m x R), s (R) and V (n x R), R = min(m, n), from which the layer's weight is
computed on every access (`torch.nn.utils.parametrize`, like Powerprop's w = sign(v)|v|^alpha).
`register_parametrization(module, "weight", LowRank(shape))` calls `right_inverse`, the thin SVD
of the current weight, so the module computes exactly the function it computed before (up to
float rounding) and its `weight` is replaced by `parametrizations.weight.original0/1/2` = U, s, V.

How a convolution's weight becomes a matrix (`decomposition`):

* `channel`: (C_out) x (C_in k_1 ... k_d). A rank-r weight is a k_1 x ... x k_d convolution to r
  channels followed by a 1 x 1 convolution to C_out.
* `spatial`: (C_out k_1) x (C_in k_2 ... k_d); for a 2-D kernel (C_out kh) x (C_in kw): a
  1 x kw convolution to r channels followed by a kh x 1 one. A 1-D kernel (our default model's
  Conv1d) goes wholly to the output side, (C_out k) x (C_in): a 1-wide convolution to r channels,
  then a k-wide one. sparsebench's reading: the authors' code (yanghr/SVD_Prune_EDLCV) pairs kh
  with C_in and kw with C_out instead, the same parameter count with the roles of the two kernel
  axes swapped.

Linear weights are (out) x (in) in both. A rank-r layer stores r(m + n) numbers (s folded into
U); where that is more than the dense m n, the layer would be stored dense, so it counts
min(r(m + n), m n) (`kept_parameters`).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

DECOMPOSITIONS = ("channel", "spatial")


def matrix_shape(shape: tuple[int, ...] | torch.Size, decomposition: str = "channel") -> tuple[int, int]:
    """(m, n) of the matrix a weight of `shape` is decomposed as."""
    shape = tuple(shape)
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}")
    if len(shape) < 2:
        raise ValueError(f"a weight of shape {shape} is not a matrix or a convolution kernel")
    out, inp, kernel = shape[0], shape[1], shape[2:]
    if decomposition == "channel" or not kernel:
        return out, inp * math.prod(kernel)
    return out * kernel[0], inp * math.prod(kernel[1:])


def to_matrix(weight: torch.Tensor, decomposition: str = "channel") -> torch.Tensor:
    m, n = matrix_shape(weight.shape, decomposition)
    if decomposition == "channel" or weight.dim() == 2:
        return weight.reshape(m, n)
    return weight.transpose(1, 2).reshape(m, n)  # (out, k1, in, k2...) -> (out k1) x (in k2...)


def from_matrix(matrix: torch.Tensor, shape: tuple[int, ...], decomposition: str = "channel") -> torch.Tensor:
    """The inverse of `to_matrix`: the weight of `shape` whose matrix is `matrix`."""
    if decomposition == "channel" or len(shape) == 2:
        return matrix.reshape(shape)
    out, inp, first, *rest = shape
    return matrix.reshape(out, first, inp, *rest).transpose(1, 2)


class LowRank(nn.Module):
    """weight = from_matrix(U diag(s) V^T). `right_inverse` gives (U, s, V) by a thin SVD."""

    def __init__(self, shape: tuple[int, ...] | torch.Size, decomposition: str = "channel"):
        super().__init__()
        self.shape = tuple(shape)
        self.decomposition = decomposition
        self.m, self.n = matrix_shape(self.shape, decomposition)
        self.full_rank = min(self.m, self.n)

    def forward(self, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return from_matrix((U * s) @ V.T, self.shape, self.decomposition)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        U, s, Vh = torch.linalg.svd(to_matrix(weight.detach(), self.decomposition), full_matrices=False)
        return U.contiguous(), s.contiguous(), Vh.T.contiguous()


def apply_low_rank(modules: Iterable[nn.Module], decomposition: str = "channel") -> list[LowRank]:
    """Keep each module's `weight` as U, s, V from its current value (the function is unchanged)."""
    out = []
    for module in modules:
        low_rank = LowRank(module.weight.shape, decomposition)
        parametrize.register_parametrization(module, "weight", low_rank)
        out.append(low_rank)
    return out


def factors(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """(U, s, V) of a module with a `LowRank` weight: the parameters the optimizer trains."""
    p = module.parametrizations.weight
    return p.original0, p.original1, p.original2


# ---------------------------------------------------------------------------- regularisers
def orthogonality_penalty(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(||U^T U - I||_F^2 + ||V^T V - I||_F^2) / r^2 for U (m x r), V (n x r): 0 exactly when the
    columns of both are orthonormal. The 1/r^2 is the mean over the r x r Gram matrix's entries,
    as the authors' code divides by the Gram matrix's size."""
    r = U.shape[1]
    eye = torch.eye(r, device=U.device, dtype=U.dtype)
    return (((U.T @ U - eye) ** 2).sum() + ((V.T @ V - eye) ** 2).sum()) / (r * r)


def l1_penalty(s: torch.Tensor) -> torch.Tensor:
    return s.abs().sum()


def hoyer_penalty(s: torch.Tensor) -> torch.Tensor:
    """||s||_1 / ||s||_2: between 1 (one non-zero value) and sqrt(len(s)) (all equal), scale-free.
    0 for s = 0 (where the ratio is undefined)."""
    return s.abs().sum() / s.norm().clamp_min(torch.finfo(s.dtype).tiny)


def hoyer_square_penalty(s: torch.Tensor) -> torch.Tensor:
    """||s||_1^2 / ||s||_2^2, the square of the Hoyer ratio (between 1 and len(s)), as in the
    authors' code (yanghr/SVD_Prune_EDLCV, Regularization.py, which subtracts a constant 1). Its
    gradient is 2 H(s) times Hoyer's, so it pushes hardest while s is still spread out. 0 for s = 0."""
    return s.abs().sum() ** 2 / (s * s).sum().clamp_min(torch.finfo(s.dtype).tiny)


SPARSITY_PENALTIES = {"l1": l1_penalty, "hoyer": hoyer_penalty, "hoyer_square": hoyer_square_penalty}


# ---------------------------------------------------------------------------- the rank cut
def kept_parameters(rank: int, m: int, n: int) -> int:
    """Numbers a rank-`rank` m x n layer stores: r(m + n), or m n where dense is smaller."""
    return min(rank * (m + n), m * n)


def cumulative_energy(s: torch.Tensor) -> list[float]:
    """c[k-1] = the fraction of sum(s^2) held by the k largest |s| (in float64); c[-1] = 1."""
    energy = torch.sort(s.detach().double().cpu() ** 2, descending=True).values
    total = float(energy.sum())
    if total <= 0.0:
        return [1.0] * len(energy)  # no energy anywhere: any rank holds all of it
    cumulative = (energy.cumsum(0) / total).tolist()
    cumulative[-1] = 1.0  # not 1 - 1e-16: the full rank always holds every fraction e <= 1
    return cumulative


def rank_for_energy(cumulative: list[float], energy: float) -> int:
    """The smallest rank >= 1 whose largest singular values hold fraction `energy` of sum(s^2)."""
    return min(len(cumulative), max(1, bisect.bisect_left(cumulative, energy) + 1))


def ranks_for_energy(cumulative: Mapping[str, list[float]], energy: float) -> dict[str, int]:
    return {name: rank_for_energy(c, energy) for name, c in cumulative.items()}


def choose_ranks(
    spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], budget: int
) -> tuple[dict[str, int], float]:
    """One energy fraction e for every layer, as large as the parameter budget allows: each layer
    keeps the smallest rank holding fraction e of its sum(s^2), and e is the largest value with
    sum_l kept_parameters(r_l(e), m_l, n_l) <= budget. Returns (ranks, e).

    The cost is a non-decreasing step function of e that rises only just after one of the layers'
    cumulative energies c_l(k), so e is searched over those values by bisection: exact, not an
    approximation of a continuous threshold. Raises ValueError if rank 1 everywhere is already
    over the budget."""
    cumulative = {n: cumulative_energy(s) for n, s in spectra.items()}

    def cost(e: float) -> int:
        return sum(kept_parameters(r, *shapes[n]) for n, r in ranks_for_energy(cumulative, e).items())

    if cost(0.0) > budget:
        raise ValueError(f"rank 1 in every layer keeps {cost(0.0)} parameters, over the budget of {budget}")
    candidates = sorted({e for c in cumulative.values() for e in c})  # the last one is 1.0
    lo, hi = 0, len(candidates)  # candidates[:lo] fit, candidates[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(candidates[mid]) <= budget:
            lo = mid + 1
        else:
            hi = mid
    energy = candidates[lo - 1] if lo else 0.0
    return ranks_for_energy(cumulative, energy), energy


def top_rank_mask(s: torch.Tensor, rank: int) -> torch.Tensor:
    """Boolean mask of the `rank` entries of s with the largest s^2 (ties broken by topk)."""
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    mask[torch.topk(s.detach().abs(), rank, sorted=False).indices] = True
    return mask
