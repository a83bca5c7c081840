"""Helpers shared by the model families: input checks, option checks and initialisation."""
from __future__ import annotations

from typing import Any

from torch import nn

from sparsebench.errors import UserError


def require_rank(model: str, input_shape: tuple[int, ...], rank: int, layout: str) -> None:
    """Fail with one line when a dataset's sample shape does not fit the model (e.g. 1-D data to a CNN)."""
    if len(input_shape) != rank:
        raise UserError(
            f"model {model!r} expects inputs shaped {layout}, got {tuple(input_shape)}; pick a matching dataset"
        )


def require_positive_int(model: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"model {model!r}: option {option!r} must be a positive integer, got {value!r}")
    return value


def require_probability(model: str, option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise UserError(f"model {model!r}: option {option!r} must be a number in [0, 1), got {value!r}")
    return float(value)


def require_spatial(model: str, input_shape: tuple[int, ...], size: int) -> None:
    """Fail with one line when downsampling would shrink the feature map to nothing."""
    if size < 1:
        raise UserError(f"model {model!r}: input shape {tuple(input_shape)} is too small for its downsampling")


def kaiming_init(model: nn.Module) -> None:
    """He et al. (2015) init for convs (fan_out, ReLU), identity BatchNorm; linears keep PyTorch's default.

    fan_out follows the CIFAR ResNet/WRN reference implementations and torchvision.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
