"""VGG for CIFAR-sized inputs: the conv stacks of Simonyan & Zisserman 2015 (configs D and E) with
BatchNorm after every conv, as in the pruning literature (SNIP, GraSP, Frankle et al. 2021).

The ImageNet head (three fully connected layers on 7x7 maps) is replaced by one linear
classifier on the flattened final maps, whose size is computed from the input (512x1x1 for 32x32).
"""
from __future__ import annotations

from torch import nn

from sparsebench.models import MODELS
from sparsebench.models.common import kaiming_init, require_rank, require_spatial

POOL = "M"
CONFIGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL],
    "vgg19": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
              512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL],
}


def _vgg(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    require_rank(name, input_shape, 3, "(C, H, W)")
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for entry in CONFIGS[name]:
        if entry == POOL:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        else:
            layers += [nn.Conv2d(channels, entry, 3, padding=1, bias=False), nn.BatchNorm2d(entry), nn.ReLU(inplace=True)]
            channels = entry
    require_spatial(name, input_shape, min(height, width))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * height * width, num_classes))
    kaiming_init(model)
    return model


@MODELS.register("vgg16")
def vgg16(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-16 (config D) with BatchNorm, ~14.7M parameters for CIFAR-10."""
    return _vgg("vgg16", input_shape, num_classes)


@MODELS.register("vgg19")
def vgg19(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-19 (config E) with BatchNorm, ~20.0M parameters for CIFAR-10."""
    return _vgg("vgg19", input_shape, num_classes)
