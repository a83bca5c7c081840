"""Layer-wise sparsity allocation: how a global sparsity s is spread over the prunable tensors.

* uniform: every tensor at density 1 - s.
* ER / ERK (docs/methods.md, allocations, google-research/rigl `get_sparsities_erdos_renyi`):
  d_l = eps * r_l with r_l = (n_in + n_out)/(n_in * n_out) for ER and
  r_l = sum(dims)/prod(dims) for ERK, optionally r_l ** power; eps is solved so that
  sum_l d_l N_l = (1 - s) sum_l N_l, and any layer whose d_l would exceed 1 is made dense and
  moved to the right-hand side before eps is solved again.
* global magnitude: one magnitude threshold over all prunable tensors, resolved from the current
  weights when a method prunes (so it needs trained weights, not an allocation at init).
* custom: explicit per-tensor densities read from a YAML/JSON file (EvoPress output, GaP
  non-uniform runs).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from sparsebench.errors import UserError
from sparsebench.sparse.masked import MaskedModel, target_nnz

ALLOCATIONS = ("uniform", "er", "erk", "global", "custom")


def uniform_densities(shapes: Mapping[str, torch.Size], sparsity: float) -> dict[str, float]:
    return {name: 1.0 - sparsity for name in shapes}


def erdos_renyi_densities(
    shapes: Mapping[str, torch.Size], sparsity: float, kernel: bool, power: float = 1.0
) -> dict[str, float]:
    """ER (kernel=False) or ERK (kernel=True) densities with the dense-overflow rule."""
    numel = {n: math.prod(s) for n, s in shapes.items()}

    def raw_score(shape: torch.Size) -> float:
        dims = list(shape) if kernel else list(shape[:2])
        return (sum(dims) / math.prod(dims)) ** power

    scores = {n: raw_score(s) for n, s in shapes.items()}
    dense: set[str] = set()
    budget = (1.0 - sparsity) * sum(numel.values())
    while True:
        sparse_names = [n for n in shapes if n not in dense]
        remaining = budget - sum(numel[n] for n in dense)
        eps = remaining / sum(scores[n] * numel[n] for n in sparse_names)
        overflow = [n for n in sparse_names if eps * scores[n] > 1.0]
        if not overflow:
            break
        # Only the largest-score layer is moved per pass, as in the reference implementation:
        # moving it changes eps, which may bring the others back under 1.
        dense.add(max(overflow, key=lambda n: scores[n]))
    return {n: 1.0 if n in dense else eps * scores[n] for n in shapes}


def read_custom_densities(path: str, names: list[str], sparsity: float) -> dict[str, float]:
    """Per-tensor densities from a file: a mapping {tensor name: density}.

    The file must name every prunable tensor, and its implied global sparsity must match the
    run's `sparsity` within 0.005, so that a run's directory never claims a sparsity it lacks.
    """
    file = Path(path)
    if not file.is_file():
        raise UserError(f"distribution.file={path!r}: no such file")
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"distribution.file={path!r}: cannot parse ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"distribution.file={path!r}: expected a mapping of tensor name to density")
    unknown = sorted(set(data) - set(names))
    missing = [n for n in names if n not in data]
    if unknown or missing:
        raise UserError(
            f"distribution.file={path!r}: unknown tensors {unknown}, missing tensors {missing}; "
            f"prunable tensors are {names}"
        )
    densities = {}
    for name in names:
        value = data[name]
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise UserError(f"distribution.file={path!r}: density of {name} is {value!r}, expected a number in [0, 1]")
        densities[name] = float(value)
    return densities


def check_total_sparsity(densities: Mapping[str, float], shapes, sparsity: float, source: str) -> None:
    numel = {n: math.prod(s) for n, s in shapes.items()}
    nnz = sum(target_nnz(numel[n], d) for n, d in densities.items())
    implied = 1.0 - nnz / sum(numel.values())
    if abs(implied - sparsity) > 0.005:
        raise UserError(
            f"{source} gives a global sparsity of {implied:.4f} but sparsity={sparsity}; "
            "make them agree (within 0.005)"
        )


def layer_densities(
    kind: str,
    shapes: Mapping[str, torch.Size],
    sparsity: float,
    erk_power_scale: float = 1.0,
    file: str | None = None,
) -> dict[str, float]:
    """Densities for an allocation that is fixed before training (everything but `global`)."""
    if kind == "uniform":
        return uniform_densities(shapes, sparsity)
    if kind in ("er", "erk"):
        return erdos_renyi_densities(shapes, sparsity, kernel=kind == "erk", power=erk_power_scale)
    if kind == "custom":
        densities = read_custom_densities(file, list(shapes), sparsity)
        check_total_sparsity(densities, shapes, sparsity, f"distribution.file={file!r}")
        return densities
    raise ValueError(f"allocation {kind!r} is not fixed before training")


@torch.no_grad()
def global_magnitude_densities(engine: MaskedModel, density: float) -> dict[str, float]:
    """Per-tensor densities that keep the globally largest |W| (active entries only), exactly
    target_nnz(N, density) in total (docs/design.md: a full sort costs ~0.6 of a ResNet-18 step)."""
    scores = {
        n: torch.where(t.mask, t.param.abs(), torch.full_like(t.param, -1.0))
        for n, t in engine.tensors.items()
    }
    counts = global_topk_counts(scores, target_nnz(sum(s.numel() for s in scores.values()), density))
    # Density is stored as count/N; target_nnz(N, count/N) == count thanks to its 1e-6 guard.
    return {n: counts[n] / scores[n].numel() for n in scores}


@torch.no_grad()
def global_topk_counts(scores: Mapping[str, torch.Tensor], keep: int) -> dict[str, int]:
    """How many entries each tensor keeps so that exactly the `keep` globally largest scores survive.

    The threshold is the k-th largest score (kthvalue, a selection, not a sort); entries tied at
    it are handed out in tensor order so that the total is exactly `keep`.
    """
    if keep <= 0:
        return {n: 0 for n in scores}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
    counts = {n: int((s > threshold).sum()) for n, s in scores.items()}
    ties_left = keep - sum(counts.values())
    for n, s in scores.items():
        take = min(ties_left, int((s == threshold).sum()))
        counts[n] += take
        ties_left -= take
    return counts
