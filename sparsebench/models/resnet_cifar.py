"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", Sec. 4.2).

A 3x3 stem, three stages of n basic blocks with 16/32/64 channels (times `width`), n = (depth-2)/6,
global average pooling and a linear classifier. Where a block changes shape we use the paper's
option B, a 1x1 conv + BatchNorm projection shortcut, rather than option A's zero padding: it
keeps every weight in an ordinary conv the sparsity engine can see, at a cost of ~1% more
parameters (resnet20: 0.27M).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.models import MODELS
from sparsebench.models.common import kaiming_init, require_positive_int, require_rank


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; the shortcut runs last so module order is forward order."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, width: int):
        super().__init__()
        blocks = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        for index, (out_channels, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            stage = [BasicBlock(channels if b == 0 else out_channels, out_channels, stride if b == 0 else 1)
                     for b in range(blocks)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            channels = out_channels
        self.fc = nn.Linear(channels, num_classes)
        self.stage_names = ["layer1", "layer2", "layer3"]
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def _build(name: str, depth: int, input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    require_rank(name, input_shape, 3, "(C, H, W)")
    return CifarResNet(depth, input_shape[0], num_classes, require_positive_int(name, "width", width))


@MODELS.register("resnet20")
def resnet20(input_shape: tuple[int, ...], num_classes: int, *, width: int = 1) -> nn.Module:
    """ResNet-20 (0.27M parameters at width 1)."""
    return _build("resnet20", 20, input_shape, num_classes, width)


@MODELS.register("resnet32")
def resnet32(input_shape: tuple[int, ...], num_classes: int, *, width: int = 1) -> nn.Module:
    """ResNet-32 (0.46M at width 1); the GraSP line (Wang et al. 2020) trains it at width 2."""
    return _build("resnet32", 32, input_shape, num_classes, width)


@MODELS.register("resnet56")
def resnet56(input_shape: tuple[int, ...], num_classes: int, *, width: int = 1) -> nn.Module:
    """ResNet-56 (0.85M at width 1)."""
    return _build("resnet56", 56, input_shape, num_classes, width)
