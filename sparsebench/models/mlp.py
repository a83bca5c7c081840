"""Fully connected network; the default is LeNet-300-100 (LeCun et al. 1998), the classic pruning benchmark
(Han et al. 2015, Lee et al. 2019 SNIP)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from sparsebench.errors import UserError
from sparsebench.models import MODELS
from sparsebench.models.common import require_positive_int


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, *, hidden: Sequence[int] = (300, 100)) -> nn.Module:
    """Flatten any input, then `hidden` ReLU layers and a linear classifier."""
    if isinstance(hidden, str) or not isinstance(hidden, Sequence):
        raise UserError(f"model 'mlp': option 'hidden' must be a list of layer widths, got {hidden!r}")
    widths = [math.prod(input_shape)] + [require_positive_int("mlp", "hidden", h) for h in hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)
