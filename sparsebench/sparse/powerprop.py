"""Powerpropagation (Schwarz et al., NeurIPS 2021, arXiv 2110.00296; ALGORITHMS.md section 7).

Each prunable weight is re-parameterised as w = v |v|^(alpha - 1) = sign(v) |v|^alpha and v is
trained, so dL/dv = alpha |v|^(alpha-1) dL/dw: small weights get small updates and the weight
distribution piles up at zero ("rich get richer"), which makes magnitude pruning cheaper.
Initialisation follows the official colab: draw u from the usual initialiser and set
v = sign(u) |u|^(1/alpha), so the *effective* weights start with the standard distribution.

It is a wrapper, not a method: `powerprop=<alpha>` composes with any method (gmp, gap, ...).
The engine then masks v; masked v is 0, so w is 0, and |v| orders weights exactly as |w| does,
so magnitude criteria are unchanged. model.pt stores the effective weights under their plain
names (export_state_dict), so exported models need no Powerprop code.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize


class PowerPropagation(nn.Module):
    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * v.abs().pow(self.alpha - 1.0)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """The v that gives w: registering the parametrisation keeps the initial w unchanged."""
        return torch.sign(w) * w.abs().pow(1.0 / self.alpha)


def apply_powerprop(model: nn.Module, weight_names: Iterable[str], alpha: float) -> None:
    """Re-parameterise the named weights (e.g. `layer1.0.conv1.weight`) in place."""
    modules = dict(model.named_modules())
    for name in weight_names:
        module = modules[name.rsplit(".", 1)[0] if "." in name else ""]
        parametrize.register_parametrization(module, "weight", PowerPropagation(alpha))


def trainable_weight(module: nn.Module) -> nn.Parameter:
    """The parameter the optimizer updates: v under Powerprop, the weight itself otherwise."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with effective weights under plain names (`x.weight`, not `x.parametrizations...`)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".parametrizations.weight.original" in key:
            module_name = key.replace(".parametrizations.weight.original", "")
            module = model.get_submodule(module_name)
            state[f"{module_name}.weight"] = module.weight.detach().clone()
        else:
            state[key] = value
    return state
