"""ImageNet architectures from torchvision, randomly initialised (`weights=None`).

Pretrained weights would defeat sparse-from-scratch training, so none are ever loaded. The first
conv is rebuilt when the input is not 3-channel, and `cifar_stem` swaps ResNet's 7x7 stride-2
conv + max-pool for a 3x3 stride-1 conv, the usual adaptation for 32x32 inputs (keeping 4x more
resolution in layer1). Replacing a submodule in place keeps `named_modules()` in forward order.
"""
from __future__ import annotations

from torch import nn

from sparsebench.models import MODELS
from sparsebench.models.common import require_rank


def _fresh_conv(template: nn.Conv2d, in_channels: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, template.out_channels, kernel, stride, padding, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resnet(name: str, input_shape: tuple[int, ...], num_classes: int, cifar_stem: bool) -> nn.Module:
    require_rank(name, input_shape, 3, "(C, H, W)")
    from torchvision import models as tv  # here, not at import: torchvision.models costs ~2 s to import

    model = getattr(tv, name)(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = _fresh_conv(model.conv1, input_shape[0], kernel=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif input_shape[0] != model.conv1.in_channels:
        model.conv1 = _fresh_conv(model.conv1, input_shape[0], kernel=7, stride=2, padding=3)
    model.stage_names = ["layer1", "layer2", "layer3", "layer4"]
    return model


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int, *, cifar_stem: bool = False) -> nn.Module:
    """ResNet-18 (He et al. 2016, ImageNet variant)."""
    return _resnet("resnet18", input_shape, num_classes, cifar_stem)


@MODELS.register("resnet50")
def resnet50(input_shape: tuple[int, ...], num_classes: int, *, cifar_stem: bool = False) -> nn.Module:
    """ResNet-50 (He et al. 2016, bottleneck blocks)."""
    return _resnet("resnet50", input_shape, num_classes, cifar_stem)


@MODELS.register("mobilenet_v2")
def mobilenet_v2(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018); its depthwise convs make it a hard case for pruning."""
    require_rank("mobilenet_v2", input_shape, 3, "(C, H, W)")
    from torchvision import models as tv

    model = tv.mobilenet_v2(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    if input_shape[0] != stem.in_channels:
        model.features[0][0] = _fresh_conv(stem, input_shape[0], kernel=3, stride=2, padding=1)
    return model
