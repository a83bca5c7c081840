"""Powerpropagation (Schwarz et al., NeurIPS 2021, arXiv 2110.00296; docs/methods.md, Powerpropagation).

Each prunable weight is re-parameterised as w = sign(v) |v|^alpha and v is trained, so
dL/dv = alpha |v|^(alpha-1) dL/dw: small weights get small updates and the weight distribution
piles up at zero ("rich get richer"), which makes magnitude pruning cheaper. Initialisation
follows the official colab: draw u from the usual initialiser and set v = sign(u) |u|^(1/alpha),
so the *effective* weights start with the standard distribution.

It is a wrapper, not a method: `powerprop=<alpha>` composes with every method. The engine
(masked.py) holds and masks v; a masked v is 0, so its w is 0, and |v| orders weights exactly
as |w| does, so magnitude criteria are unchanged. model.pt stores the effective weights under
their plain names (export_state_dict), so exported models need no Powerprop code.

How it composes with masking and regrowth (sparsebench's design; the colab only trains dense
and prunes once at evaluation, so it never meets these cases):

1. The forward is written sign(v) * |v|^alpha, not v * |v|^(alpha-1). Both are the same
   function, but autograd differentiates the second by the product rule, and at v = 0 the factor
   |v|^(alpha-1) has an infinite derivative for 1 < alpha < 2: 0 * inf = NaN in every masked
   entry (a static run diverged at its first step). The first form's derivative is the analytic
   alpha |v|^(alpha-1), which is finite, and 0, at v = 0 for every alpha > 1.
2. That 0 makes v = 0 absorbing for alpha > 1: an entry regrown at v = 0 has zero gradient (and
   zero weight decay) forever. So the engine never regrows a Powerprop tensor at v = 0: a grown
   entry whose requested value is 0 (`regrow_init="zero"` of RigL, SET, AC/DC and GaP, SET's
   `keep` for a never-active position) gets a fresh initial value instead, v = sign(u)|u|^(1/alpha)
   with u drawn like the layer's initial weights: the value the paper gives every weight at
   initialisation (`draw_initial_v`). This departs from "grown at zero" of those methods (the
   function changes a little when weights are grown), which is unavoidable: no non-zero v gives
   w = 0, and a v small enough to leave w near 0 would learn at the rate alpha |v|^(alpha-1),
   i.e. hardly at all.
3. Grow scores are taken in effective-weight space: RigL's |dL/dw| of the masked model, not
   |dL/dv| (which is 0 at every inactive entry). dL/dw is read by a tensor hook on the output of
   the parametrisation (`capture` / `weight_grad`), only on the steps a method asks for it.
   DPF's feedback gradient for a pruned entry is alpha |v_dense|^(alpha-1) dL/dw, the chain rule
   at its dense shadow value (`grad_v`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

# Standard deviation of a unit normal truncated at +-2: dividing by it gives a truncated normal
# of a chosen variance (as TF's variance-scaling initialiser does).
_TRUNCATED_STD = 0.87962566103423978


class PowerPropagation(nn.Module):
    """w = sign(v) |v|^alpha. `init_std` is the std of the layer's initial effective weights."""

    def __init__(self, alpha: float, init_std: float = 0.0):
        super().__init__()
        self.alpha = alpha
        self.init_std = init_std
        self.capture = False  # record dL/dw of the next backward passes (`weight_grad`)
        self.weight_grad: torch.Tensor | None = None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        w = torch.sign(v) * v.abs().pow(self.alpha)  # not v * |v|^(alpha-1): see point 1 above
        if self.capture and w.requires_grad:
            w.register_hook(self._record_weight_grad)
        return w

    def _record_weight_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        # A weight read twice in one forward gets two hooks: dL/dw is their sum.
        self.weight_grad = grad.clone() if self.weight_grad is None else self.weight_grad + grad

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """The v that gives w: registering the parametrisation keeps the initial w unchanged."""
        return torch.sign(w) * w.abs().pow(1.0 / self.alpha)

    def grad_v(self, v: torch.Tensor, grad_w: torch.Tensor) -> torch.Tensor:
        """dL/dv = alpha |v|^(alpha-1) dL/dw (the chain rule through w = sign(v)|v|^alpha)."""
        return self.alpha * v.abs().pow(self.alpha - 1.0) * grad_w

    def draw_initial_v(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A fresh v as at initialisation: u from a normal truncated at two standard deviations
        with the variance of the layer's initial weights (the colab's fan-in variance-scaling
        initialiser, matched to this layer's actual init), then v = sign(u)|u|^(1/alpha).
        Drawn on the CPU from torch's global generator, which checkpoints save and restore."""
        std = self.init_std / _TRUNCATED_STD
        u = torch.nn.init.trunc_normal_(torch.empty(shape), 0.0, std, -2.0 * std, 2.0 * std)
        return self.right_inverse(u).to(device=device, dtype=dtype)


def _initial_std(weight: torch.Tensor) -> float:
    """Std of the layer's initial weights; 1/sqrt(fan_in) where they have none to measure (a
    constant tensor, or a shape-only tensor on the meta device while a sweep is checked)."""
    std = 0.0
    if weight.numel() > 1 and not weight.is_meta:
        std = float(weight.detach().float().std())
    if std > 0.0 and math.isfinite(std):
        return std
    fan_in = weight[0].numel() if weight.dim() > 1 else weight.numel()
    return 1.0 / math.sqrt(max(1, fan_in))


def apply_powerprop(model: nn.Module, weight_names: Iterable[str], alpha: float) -> None:
    """Re-parameterise the named weights (e.g. `layer1.0.conv1.weight`) in place."""
    modules = dict(model.named_modules())
    for name in weight_names:
        module = modules[name.rsplit(".", 1)[0] if "." in name else ""]
        parametrize.register_parametrization(module, "weight", PowerPropagation(alpha, _initial_std(module.weight)))


def powerprop_of(module: nn.Module) -> PowerPropagation | None:
    """The module's weight parametrisation if it is Powerprop, else None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations.weight if isinstance(p, PowerPropagation)]
    return found[0] if found else None


def trainable_weight(module: nn.Module) -> nn.Parameter:
    """The parameter the optimizer updates: v under Powerprop, the weight itself otherwise."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with effective weights under plain names (`x.weight`, not `x.parametrizations...`).

    Any parametrised tensor, whatever the number of tensors it is computed from: Powerprop's one
    (`...parametrizations.weight.original`) or SVD training's U, s, V (`...original0/1/2`,
    sparse/low_rank.py). The plain model loads the result with `load_state_dict`."""
    state = {}
    for key, value in model.state_dict().items():
        found = _PARAMETRIZED_KEY.fullmatch(key)
        if found is None:
            state[key] = value
            continue
        module_name, tensor_name = found.group(1) or "", found.group(2)
        plain = f"{module_name}.{tensor_name}" if module_name else tensor_name
        if plain not in state:  # once per tensor, not once per original0/1/2
            state[plain] = getattr(model.get_submodule(module_name), tensor_name).detach().clone()
    return state


# `[module.]parametrizations.<tensor>.original[<i>]`: the stored tensors a parametrised tensor is computed from.
_PARAMETRIZED_KEY = re.compile(r"(?:(.+)\.)?parametrizations\.([^.]+)\.original\d*")
