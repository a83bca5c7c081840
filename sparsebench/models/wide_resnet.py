"""Wide ResNets of Zagoruyko & Komodakis 2016 ("Wide Residual Networks").

WRN-d-k: a 3x3 conv stem with 16 channels, three stages of n = (d-4)/6 pre-activation blocks
(BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3) with 16k/32k/64k channels, then BN-ReLU, global
average pooling and a linear classifier. Shape-changing blocks use a 1x1 conv shortcut on the
pre-activated input, as in the authors' code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.models import MODELS
from sparsebench.models.common import kaiming_init, require_probability, require_rank


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        # Identity blocks add the raw input; projecting blocks project the pre-activated one.
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, dropout: float):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        channels = 16
        for index, (out_channels, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            stage = [PreActBlock(channels if b == 0 else out_channels, out_channels, stride if b == 0 else 1, dropout)
                     for b in range(blocks)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            channels = out_channels
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        self.stage_names = ["layer1", "layer2", "layer3"]
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def wide_resnet(depth: int, widen: int):
    """Make a registrable factory for WRN-`depth`-`widen`."""
    name = f"wrn{depth}_{widen}"

    def factory(input_shape: tuple[int, ...], num_classes: int, *, dropout: float = 0.0) -> nn.Module:
        require_rank(name, input_shape, 3, "(C, H, W)")
        return WideResNet(depth, widen, input_shape[0], num_classes, require_probability(name, "dropout", dropout))

    factory.__name__ = name
    factory.__doc__ = f"WRN-{depth}-{widen} (Zagoruyko & Komodakis 2016); `dropout` between the block's convs."
    return MODELS.register(name)(factory)


wrn22_2 = wide_resnet(22, 2)
wrn28_10 = wide_resnet(28, 10)
