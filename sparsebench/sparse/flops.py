"""Training FLOPs, counted the way the RigL paper's appendix does (Evci et al. 2020, App. H).

Per example, a layer's dense forward cost F_l is 2 * multiply-accumulates (conv: output
positions x (c_in/groups) x kernel size x c_out; linear: in x out per token). A sparse layer at
density d_l costs d_l * F_l. One training step costs

    forward + backward w.r.t. activations + backward w.r.t. weights = f_S + f_S + f_W,

where f_S = sum_l d_l F_l (+ the dense layers) and f_W = f_S, except on steps where the method
needs the dense gradient of every weight (RigL's update steps, DPF): then f_W = f_D, the dense
forward cost, giving RigL's 2 f_S + f_D. Dense phases (GaP's grown partition, AC/DC's
decompressed phases, GMP before pruning) are counted dense because their masks are dense.
Only conv and linear layers are counted (norms, activations and pooling are a few percent and
the same for every method, so they would only blur the ratios).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparsebench.sparse.masked import PRUNABLE_TYPES


@torch.no_grad()
def layer_forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Dense forward FLOPs per example of every conv/linear weight, keyed by parameter name."""
    flops: dict[str, int] = {}
    hooks = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs, output):
            weight = module.weight
            if isinstance(module, nn.Linear):
                tokens = output.numel() // output.shape[-1]  # batch of 1: positions per example
                macs = tokens * weight.numel()
            else:  # conv: each output position uses (c_in/groups * kernel) weights per c_out
                positions = output[0, 0].numel()
                macs = positions * weight.numel()
            flops[name] = 2 * macs

        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            hooks.append(module.register_forward_hook(make_hook(f"{module_name}.weight")))
    probe_forward(model, input_shape, hooks)
    return flops


@torch.no_grad()
def probe_forward(model: nn.Module, input_shape: tuple[int, ...], hooks: list) -> None:
    """One eval-mode forward of a zero example, for the `hooks` to observe; then the hooks are
    removed and the model's train/eval mode restored."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def layer_inputs(model: nn.Module, modules: Mapping[str, nn.Module],
                 input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-example input shape of each named module: one eval-mode forward of a zero example."""
    return {name: shapes[0] for name, shapes in layer_shapes(model, modules, input_shape).items()}


def layer_shapes(model: nn.Module, modules: Mapping[str, nn.Module],
                 input_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per-example (input shape, output shape) of each named module, from one eval-mode forward
    of a zero example (the first call of a module that runs twice)."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(name: str):
        def hook(module, args, output) -> None:  # returns None: the output is left as it is
            shapes.setdefault(name, (tuple(args[0].shape[1:]), tuple(output.shape[1:])))
        return hook

    probe_forward(model, input_shape, [m.register_forward_hook(record(n)) for n, m in modules.items()])
    return shapes


class FlopCounter:
    """Turns per-layer densities into per-example training-step FLOPs."""

    def __init__(self, layer_flops: Mapping[str, int]):
        self.layer_flops = dict(layer_flops)
        self.dense_forward = sum(self.layer_flops.values())

    def forward(self, densities: Mapping[str, float]) -> float:
        """f_S: layers absent from `densities` (kept dense) count in full."""
        return sum(f * densities.get(name, 1.0) for name, f in self.layer_flops.items())

    def train_step(self, densities: Mapping[str, float], dense_weight_grad: bool = False) -> float:
        f_sparse = self.forward(densities)
        return 2 * f_sparse + (self.dense_forward if dense_weight_grad else f_sparse)

    def dense_train_step(self) -> float:
        return 3 * self.dense_forward
