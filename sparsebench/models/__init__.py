"""Model registry: every architecture is a factory `factory(input_shape, num_classes, **options)`.

Factories take their options as keyword-only parameters with defaults; those defaults are
mirrored in `conf/model/<name>.yaml` and are the only option names `create_model` accepts, so a
typo on the command line fails with one line instead of a TypeError traceback.

Every model registers its submodules in forward order, because the sparsity engine orders
layers by `named_modules()`. Residual models also set `stage_names`, the module-name prefixes
of their residual stages in forward order, which GaP uses to cut partitions.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from sparsebench.errors import UserError
from sparsebench.registry import Registry

MODELS: Registry = Registry("model")

# Imported for their side effect of registering factories in MODELS.
from sparsebench.models import (  # noqa: E402, F401
    cnn,
    dass_net,
    mlp,
    resnet_cifar,
    torchvision_models,
    vgg,
    wide_resnet,
)

__all__ = ["MODELS", "create_model", "list_models", "model_options"]


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def model_options(name: str) -> dict[str, Any]:
    """The options model `name` accepts, with their defaults (its keyword-only parameters)."""
    parameters = inspect.signature(MODELS.get(name)).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Build model `name` for inputs of shape `input_shape` (no batch dimension) and `num_classes` outputs."""
    allowed = model_options(name)
    for option in options:
        if option not in allowed:
            hint = difflib.get_close_matches(option, allowed, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            choices = ", ".join(sorted(allowed)) or "none"
            raise UserError(
                f"model {name!r} has no option {option!r}{did_you_mean}; allowed options: {choices}"
            )
    return MODELS.get(name)(tuple(input_shape), num_classes, **options)
