"""MaskedModel: the one place where masks live and where their invariants are kept.

Methods decide *which* entries are active; this engine alone changes masks, and after every
change it guarantees (docs/design.md, "Contracts"; docs/methods.md, "the engine"):

* each prunable tensor has exactly its target number of non-zeros, `target_nnz(N, density)`
  (no silent under/overshoot: ERK undershooting is sparse_learning#20);
* masked weights are exactly zero and receive no update (`mask_gradients` before the optimizer
  step, `apply_masks` after it: weight decay or momentum cannot leak into masked entries);
* regrown entries start at the value the method asks for (zero by default: RigL, GaP, AC/DC),
  and their optimizer state (SGD momentum, Adam/AdamW moments, any per-parameter tensor of the
  weight's shape) is reset, for any torch optimizer. Under Powerpropagation no entry is regrown
  at v = 0, where its gradient is 0 forever: a grown entry asked to start at 0 gets a fresh
  initial value of v instead (powerprop.py explains why), for every method alike;
* only conv and linear weights are prunable; biases, norms and embeddings never are, and the
  layers kept dense are named explicitly (`dense_first`, `dense_last`, `dense_patterns`);
* every mask follows the engine's `structure` (structure.py: unstructured, N:M groups or square
  blocks); it matters only when masks change, never on the per-step hot path.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sparsebench.sparse.powerprop import PowerPropagation, powerprop_of, trainable_weight
from sparsebench.sparse.structure import UNSTRUCTURED, SparsityStructure

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# How regrown entries are initialised: "zero", or a callable(shape, device, dtype) -> tensor.
RegrowInit = str | Callable[[torch.Size, torch.device, torch.dtype], torch.Tensor]


def target_nnz(numel: int, density: float) -> int:
    """Active entries of a tensor at `density`: N minus floor(s*N) zeros (RigL's sparse_utils).

    The 1e-6 guards against s*N landing just below an integer in floating point (e.g. a
    density stored as count/N for a 25M-weight tensor).
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density {density} outside [0, 1]")
    return numel - math.floor((1.0 - density) * numel + 1e-6)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with exactly k True entries at the largest scores (ties broken by topk)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k, sorted=False).indices] = True
    return mask.view_as(scores)


@dataclass
class PrunableTensor:
    name: str  # parameter name in model.named_parameters(), e.g. "layer1.0.conv1.weight"
    module: nn.Module
    param: nn.Parameter
    mask: torch.Tensor  # bool, same shape as param
    density: float  # current target density; nnz(mask) == target_nnz(numel, density)
    # The mask in the weight's dtype, for the per-step multiplications: multiplying by a bool
    # tensor converts it on every call (5x slower, measured in benchmarks/bench_masking.py).
    keep: torch.Tensor | None = None
    # The Powerprop parametrisation w = sign(v)|v|^alpha when `param` is v; None otherwise.
    powerprop: PowerPropagation | None = None

    def __post_init__(self) -> None:
        self.sync_keep()

    def sync_keep(self) -> None:
        self.keep = self.mask.to(self.param.dtype)

    @property
    def numel(self) -> int:
        return self.param.numel()


class MaskInvariantError(AssertionError):
    """A method asked for a mask that breaks an engine invariant: a bug, never a user error."""


class MaskedModel:
    """Wraps a model: which tensors are prunable, their masks, and every mask change."""

    def __init__(
        self,
        model: nn.Module,
        dense_first: bool = False,
        dense_last: bool = False,
        dense_patterns: Iterable[str] = (),
        structure: SparsityStructure = UNSTRUCTURED,
    ):
        self.model = model
        self.structure = structure
        candidates = [
            (f"{module_name}.weight" if module_name else "weight", module)
            for module_name, module in model.named_modules()
            if isinstance(module, PRUNABLE_TYPES)
        ]
        if not candidates:
            raise ValueError("model has no conv or linear layer to sparsify")
        patterns = list(dense_patterns)
        dense = {
            name
            for name, _ in candidates
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)
        }
        if dense_first:
            dense.add(candidates[0][0])
        if dense_last:
            dense.add(candidates[-1][0])
        self.dense_names = [name for name, _ in candidates if name in dense]
        self.tensors: dict[str, PrunableTensor] = {}
        for name, module in candidates:
            if name in dense:
                continue
            weight = trainable_weight(module)  # v, not the computed w, under Powerprop
            structure.check(name, weight.shape)  # ValueError naming the tensor
            self.tensors[name] = PrunableTensor(
                name, module, weight, torch.ones_like(weight, dtype=torch.bool), 1.0,
                powerprop=powerprop_of(module),
            )
        if not self.tensors:
            raise ValueError("every conv/linear layer is kept dense: nothing left to sparsify")
        # Tensors whose mask has zeros: the hot-path masking skips dense ones (dense phases of
        # GaP/AC-DC and the dense baseline then cost nothing extra).
        self._sparse_names: list[str] = []
        self.version = 0  # bumped on every mask change; lets callers cache derived numbers
        # In-time over-parameterisation (Liu et al. 2021): entries active at any time since
        # `start_exploration_count`; and the (tensor, dropped, grown) of each mask change.
        self.ever_active = {n: t.mask.clone() for n, t in self.tensors.items()}
        self.mask_events: list[tuple[str, int, int]] = []

    # ----------------------------------------------------------------- read-only views
    @property
    def names(self) -> list[str]:
        """Prunable tensor names in forward (module registration) order."""
        return list(self.tensors)

    def densities(self) -> dict[str, float]:
        """Mask density per prunable tensor (what the method asked for)."""
        return {n: t.density for n, t in self.tensors.items()}

    def mask_nnz(self) -> dict[str, int]:
        return {n: int(t.mask.sum()) for n, t in self.tensors.items()}

    def weight_densities(self) -> dict[str, float]:
        """Non-zero weights per tensor over its size: what a sparse kernel would store."""
        return {n: int(t.param.count_nonzero()) / t.numel for n, t in self.tensors.items()}

    def actual_sparsity(self) -> float:
        """Exact zeros over all prunable weights (the `actual_sparsity` of final.json)."""
        total = sum(t.numel for t in self.tensors.values())
        nonzero = sum(int(t.param.count_nonzero()) for t in self.tensors.values())
        return 1.0 - nonzero / total

    @staticmethod
    def masks_changed(masks: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor]) -> int:
        """Entries whose mask differs between two `masks()` snapshots (metrics' weights_changed)."""
        return sum(int((masks[n] != previous[n]).sum()) for n in masks)

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: t.mask.clone() for n, t in self.tensors.items()}

    def start_exploration_count(self) -> None:
        """Count explored entries from the current masks on (after a method's initial masks)."""
        self.ever_active = {n: t.mask.clone() for n, t in self.tensors.items()}

    def itop_rate(self) -> float:
        """Fraction of prunable weights that have ever been active (ITOP's R_s)."""
        total = sum(t.numel for t in self.tensors.values())
        return sum(int(m.sum()) for m in self.ever_active.values()) / total

    def pop_mask_events(self) -> list[tuple[str, int, int]]:
        events, self.mask_events = self.mask_events, []
        return events

    # ----------------------------------------------------------------- effective weights
    @property
    def powerprop(self) -> bool:
        """True when the prunable tensors are Powerprop's v (the effective weight is sign(v)|v|^alpha)."""
        return any(t.powerprop is not None for t in self.tensors.values())

    def capture_weight_grads(self, enabled: bool) -> None:
        """Record dL/dw of the next backward passes (see `weight_grad`); False stops and forgets.

        Needed only under Powerprop, where the parameter's .grad is dL/dv; recording costs one
        weight-sized tensor per layer, so methods turn it on only for the steps that read it."""
        for t in self.tensors.values():
            if t.powerprop is not None:
                t.powerprop.capture = enabled
                t.powerprop.weight_grad = None

    def weight_grad(self, name: str) -> torch.Tensor | None:
        """dL/dw of the last backward pass w.r.t. the effective weight of tensor `name` (the
        masked model's weight: dL/d(M*W)). Without Powerprop this is the parameter's .grad; under
        Powerprop the gradient recorded while `capture_weight_grads(True)` was on (None if off)."""
        t = self.tensors[name]
        if t.powerprop is None:
            return t.param.grad
        return t.powerprop.weight_grad

    def param_value(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The parameter value whose effective weight is `weight` (v = sign(w)|w|^(1/alpha) under
        Powerprop, `weight` itself otherwise): for methods that choose regrown weights."""
        t = self.tensors[name]
        return weight if t.powerprop is None else t.powerprop.right_inverse(weight)

    def grad_from_weight_grad(self, name: str, param: torch.Tensor, grad_w: torch.Tensor) -> torch.Tensor:
        """dL/dparam at parameter value `param` given dL/dw (DPF's feedback for pruned entries):
        alpha |v|^(alpha-1) dL/dw under Powerprop, dL/dw otherwise."""
        t = self.tensors[name]
        return grad_w if t.powerprop is None else t.powerprop.grad_v(param, grad_w)

    # ----------------------------------------------------------------- hot path
    @torch.no_grad()
    def mask_gradients(self) -> None:
        """grad <- M * grad: masked weights get no gradient, so no momentum either."""
        for name in self._sparse_names:
            t = self.tensors[name]
            if t.param.grad is not None:
                t.param.grad.mul_(t.keep)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """W <- M * W after the optimizer step (weight decay or stale momentum cannot revive it)."""
        for name in self._sparse_names:
            t = self.tensors[name]
            t.param.mul_(t.keep)

    # ----------------------------------------------------------------- mask changes
    @torch.no_grad()
    def set_mask(
        self,
        name: str,
        new_mask: torch.Tensor,
        density: float,
        optimizer: torch.optim.Optimizer | None = None,
        regrow_init: RegrowInit = "zero",
    ) -> tuple[int, int]:
        """Install `new_mask` on tensor `name` at target `density`; returns (dropped, grown).

        Dropped entries are zeroed. Grown entries (0 -> 1) are set by `regrow_init` and their
        optimizer state is reset. An entry dropped and regrown in the same call is unchanged
        and keeps its value (RigL: "a just-dropped connection that is regrown keeps its weight").
        `regrow_init` gives parameter values (v under Powerprop; see `param_value`); under
        Powerprop, grown entries it leaves at 0 get `PowerPropagation.draw_initial_v` instead.
        """
        t = self.tensors[name]
        new_mask = new_mask.to(dtype=torch.bool, device=t.mask.device)
        if new_mask.shape != t.mask.shape:
            raise MaskInvariantError(f"{name}: mask shape {tuple(new_mask.shape)} != {tuple(t.mask.shape)}")
        expected = target_nnz(t.numel, density)
        nnz = int(new_mask.sum())
        if nnz != expected:
            raise MaskInvariantError(
                f"{name}: mask has {nnz} active entries, density {density} needs exactly {expected}"
            )
        if not self.structure.follows(new_mask):
            raise MaskInvariantError(f"{name}: mask does not follow the structure {self.structure}")
        grown = new_mask & ~t.mask
        dropped = t.mask & ~new_mask
        n_grown, n_dropped = int(grown.sum()), int(dropped.sum())
        if n_grown:
            if regrow_init == "zero":
                t.param[grown] = 0.0
            elif callable(regrow_init):
                t.param[grown] = regrow_init(t.param.shape, t.param.device, t.param.dtype)[grown]
            else:
                raise ValueError(f"unknown regrow_init {regrow_init!r}")
            if t.powerprop is not None:
                # v = 0 is absorbing under Powerprop (zero gradient for alpha > 1): a grown entry
                # asked to start there is drawn afresh from the initial distribution instead.
                dead = grown & (t.param == 0)
                if bool(dead.any()):
                    fresh = t.powerprop.draw_initial_v(t.param.shape, t.param.device, t.param.dtype)
                    t.param[dead] = fresh[dead]
            if optimizer is not None:
                reset_optimizer_state(optimizer, t.param, grown)
        t.mask.copy_(new_mask)
        t.sync_keep()
        t.param.mul_(t.keep)
        t.density = density
        self.ever_active[name] |= new_mask
        if n_grown or n_dropped:
            self.mask_events.append((name, n_dropped, n_grown))
        self._refresh_sparse_names()
        self.version += 1
        return n_dropped, n_grown

    def set_masks(
        self,
        masks: Mapping[str, torch.Tensor],
        densities: Mapping[str, float],
        optimizer: torch.optim.Optimizer | None = None,
        regrow_init: RegrowInit = "zero",
    ) -> dict[str, tuple[int, int]]:
        return {
            n: self.set_mask(n, m, densities[n], optimizer, regrow_init) for n, m in masks.items()
        }

    def round_densities(self, densities: Mapping[str, float]) -> dict[str, float]:
        """Each density rounded to one the structure admits (unchanged when unstructured): what
        a method must pass to `set_mask` with a mask from `structured_topk`."""
        return {n: self.structure.round_density(self.tensors[n].param.shape, d) for n, d in densities.items()}

    def structured_topk(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """Exactly target_nnz(numel, density) entries at the largest `scores`, following the
        structure (`topk_mask` when unstructured); `density` must be rounded (`round_densities`)."""
        return self.structure.topk(scores, density)

    def random_masks(
        self, densities: Mapping[str, float], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Uniformly random masks with exact counts (RigL's get_mask_random); under a structure,
        uniformly random groups' entries (N:M) or blocks."""
        out = {}
        for name, density in densities.items():
            t = self.tensors[name]
            scores = torch.rand(t.param.shape, generator=generator).to(t.param.device)
            out[name] = self.structured_topk(scores, density)
        return out

    def magnitude_masks(self, densities: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Per-tensor top-|W| masks. Inactive entries score -1 so they lose every tie with an
        active weight that happens to be exactly zero (a weight grown at 0 and not yet moved)."""
        out = {}
        for name, density in densities.items():
            t = self.tensors[name]
            scores = torch.where(t.mask, t.param.detach().abs(), torch.full_like(t.param, -1.0))
            out[name] = self.structured_topk(scores, density)
        return out

    def grow_dense(
        self, names: Iterable[str], optimizer: torch.optim.Optimizer | None = None
    ) -> dict[str, tuple[int, int]]:
        """Make tensors fully dense; regrown entries start at zero (GaP, AC/DC decompression), or
        at a fresh initial value under Powerprop (`set_mask`)."""
        return {
            n: self.set_mask(n, torch.ones_like(self.tensors[n].mask), 1.0, optimizer)
            for n in names
        }

    def _refresh_sparse_names(self) -> None:
        self._sparse_names = [n for n, t in self.tensors.items() if t.density < 1.0]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "masks": {n: t.mask.clone() for n, t in self.tensors.items()},
            "densities": self.densities(),
            "ever_active": {n: m.clone() for n, m in self.ever_active.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        for name, t in self.tensors.items():
            t.mask.copy_(state["masks"][name])
            t.sync_keep()
            t.density = float(state["densities"][name])
            if "ever_active" in state:
                self.ever_active[name].copy_(state["ever_active"][name])
        self._refresh_sparse_names()
        self.version += 1


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, entries: torch.Tensor
) -> None:
    """Zero every per-entry optimizer buffer of `param` at `entries`.

    Works for any torch optimizer: SGD's momentum_buffer, Adam/AdamW's exp_avg, exp_avg_sq and
    max_exp_avg_sq are all tensors shaped like the parameter; scalar state (Adam's `step`) is
    shared by the whole tensor and left alone. Peers reset only SGD momentum while advertising
    Adam (condensed-sparsity) or defined the reset and never called it (GraNet).
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[entries] = 0


def masked_training_step(model: nn.Module, optimizer: torch.optim.Optimizer, keep: Mapping[str, torch.Tensor],
                         x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One plain cross-entropy step of `model` outside a run (proxies, benchmarks) that keeps the
    entries masked by `keep` ({parameter name: 0/1 tensor}) at zero: gradients masked before the
    optimizer step, weights after it. Returns the loss."""
    params = dict(model.named_parameters())
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        for name, k in keep.items():
            params[name].grad.mul_(k)
        optimizer.step()
        for name, k in keep.items():
            params[name].mul_(k)
    return loss
