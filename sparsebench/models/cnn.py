"""Small convolutional networks: LeNet-5 for images and a 1-D CNN for MNIST-1D signals."""
from __future__ import annotations

from torch import nn

from sparsebench.models import MODELS
from sparsebench.models.common import kaiming_init, require_positive_int, require_rank, require_spatial


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@MODELS.register("lenet5")
def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, as used in pruning papers (Han et al. 2015).

    No padding, so the flatten size depends on the input: 16*4*4 for 28x28 MNIST, 16*5*5 for
    32x32 CIFAR (the original 32x32 LeNet-5 layout).
    """
    require_rank("lenet5", input_shape, 3, "(C, H, W)")
    channels, height, width = input_shape
    height, width = (_conv_out(_conv_out(s, 5) // 2, 5) // 2 for s in (height, width))
    require_spatial("lenet5", input_shape, min(height, width))
    model = nn.Sequential(
        nn.Conv2d(channels, 6, kernel_size=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * height * width, 120),
        nn.ReLU(inplace=True),
        nn.Linear(120, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )
    kaiming_init(model)
    return model


# (kernel, stride, padding) of the four convolutions: downsample 8x, then one full-resolution conv.
_CNN1D_CONVS = [(5, 2, 2), (3, 2, 1), (3, 2, 1), (3, 1, 1)]


def _cnn1d(name: str, input_shape: tuple[int, ...], num_classes: int, channels: int, batch_norm: bool) -> nn.Module:
    require_rank(name, input_shape, 2, "(C, L)")
    require_positive_int(name, "channels", channels)
    in_channels, length = input_shape
    layers: list[nn.Module] = []
    for index, (kernel, stride, padding) in enumerate(_CNN1D_CONVS):
        conv_in = in_channels if index == 0 else channels
        # A conv followed by BatchNorm needs no bias (the norm's shift replaces it).
        layers.append(nn.Conv1d(conv_in, channels, kernel, stride, padding, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(channels))
        layers.append(nn.ReLU(inplace=True))
        length = _conv_out(length, kernel, stride, padding)
    require_spatial(name, input_shape, length)
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * length, num_classes))
    kaiming_init(model)
    return model


@MODELS.register("cnn1d_bn")
def cnn1d_bn(input_shape: tuple[int, ...], num_classes: int, *, channels: int = 64) -> nn.Module:
    """The default model: `cnn1d` with BatchNorm after every convolution.

    Sparse-training papers evaluate normalised networks (ResNets, WRNs, VGG with BatchNorm). In a
    network without normalisation, a layer at 90 % sparsity starts with its activations ~3x
    smaller than dense and the shrink compounds with depth, so every method that is sparse from
    step 0 (static, SET, RigL, GaP's sparse partitions) starts with a vanishing signal; BatchNorm
    restores the scale, as it does in the papers' networks. Same 40.6 k prunable-layer weights.
    """
    return _cnn1d("cnn1d_bn", input_shape, num_classes, channels, batch_norm=True)


@MODELS.register("cnn1d")
def cnn1d(input_shape: tuple[int, ...], num_classes: int, *, channels: int = 64) -> nn.Module:
    """1-D CNN for MNIST-1D (Greydanus 2020), whose reference CNN reaches ~94% dense accuracy.

    Wider than the paper's 25 channels so that every layer after the first has thousands of
    prunable weights. No normalisation: sparse-from-scratch methods start with a collapsed
    activation scale here (see `cnn1d_bn`, the default, and `sparse_init`).
    """
    return _cnn1d("cnn1d", input_shape, num_classes, channels, batch_norm=False)
