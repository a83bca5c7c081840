"""Datasets behind one call: ``load_dataset(name, data_dir, download, **options)``.

Every loader returns a `DatasetBundle` whose splits yield ``(x, y)`` with ``x`` a float32
tensor of shape ``input_shape`` and ``y`` a Python int, so models and training loops never
need to know where the data came from.

Registered datasets
-------------------
``mnist1d`` (the default; no files, no network)
    MNIST-1D: ten 1-D digit templates, randomly padded, translated, sheared, scaled and
    noised to length 40. Generated in-process with ``mnist1d.data.make_dataset`` and the
    package's default arguments (5000 samples split 4000 train / 1000 test, length 40,
    seed 42), which reproduce the data of S. Greydanus & D. Kobak, "Scaling down deep
    learning with MNIST-1D", ICML 2024 (arXiv:2011.14439). Published dense test
    accuracies there: logistic regression ~32%, MLP ~68%, CNN ~94%, GRU ~91%: the CNN
    and MLP numbers are the reference points a sparse network is measured against.
    ``make_dataset`` already centres the whole set to mean 0 and std 1 (one scalar each),
    which is the data those baselines were trained on, so it is not re-standardised
    here: the train split's own statistics differ from it by well under 1%.
    Generation takes ~3 s (plus ~2 s to import the package), so the arrays are cached
    per ``(num_samples, gen_seed)`` in memory for the life of the process; nothing is
    ever written to disk.

``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` (torchvision)
    Read from ``data_dir`` in torchvision's own layout (``data_dir/MNIST/raw``,
    ``data_dir/cifar-10-batches-py``, ...), fetched there when ``download`` is true.
    CIFAR training images get the standard augmentation of He et al., "Deep Residual
    Learning for Image Recognition", CVPR 2016, section 4.2: 4-pixel zero padding, a
    random 32x32 crop and a random horizontal flip. Normalisation constants are the
    per-channel mean and standard deviation of each training set's pixels in [0, 1].

``imagefolder``
    An ImageNet-style tree ``data_dir/train/<class>/*`` plus ``data_dir/val/<class>/*``
    (or ``test``), read with ``torchvision.datasets.ImageFolder``. Training uses
    RandomResizedCrop + horizontal flip; evaluation resizes the short side to
    ``image_size * 256 / 224`` and centre-crops, the usual ImageNet recipe
    (torchvision's reference training scripts), with the ImageNet mean/std.

``npz``
    The user's own arrays: a ``.npz`` file with ``x`` and ``y`` and optionally
    ``x_test``/``y_test`` (else a seeded ``test_fraction`` split). The layout of ``x``
    decides the input shape: ``(N, F)`` becomes ``(N, 1, F)`` one-channel signals for
    1-D models, ``(N, H, W)`` becomes ``(N, 1, H, W)`` grey images, and ``(N, C, H, W)``
    is kept as it is. No scaling is applied: the user's numbers are used as given.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from sparsebench.errors import UserError
from sparsebench.registry import Registry


@dataclass
class DatasetBundle:
    name: str
    train: Dataset  # yields (x: float tensor, y: int)
    test: Dataset
    input_shape: tuple[int, ...]  # (C, L) or (C, H, W), without batch
    num_classes: int


DatasetLoader = Callable[..., DatasetBundle]
DATASETS: Registry[DatasetLoader] = Registry("dataset")

# Parameters every loader takes; everything else in its signature is a dataset option.
_COMMON_PARAMETERS = ("data_dir", "download")


def load_dataset(name: str, data_dir: str, download: bool = False, **options) -> DatasetBundle:
    """Build the named dataset; ``options`` are that dataset's own keys (see its conf file)."""
    loader = DATASETS.get(name)
    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"unknown option(s) for dataset {name!r}: {', '.join('dataset.' + key for key in unknown)}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    return loader(data_dir=data_dir, download=download, **options)


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_options(name: str) -> dict[str, object]:
    """The options a dataset accepts beyond ``data_dir``/``download``, with their defaults."""
    parameters = inspect.signature(DATASETS.get(name)).parameters
    return {key: p.default for key, p in parameters.items() if key not in _COMMON_PARAMETERS}


class ArrayDataset(Dataset):
    """In-memory ``(x, y)`` pairs with the same item types as the torchvision sets."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray):
        self.inputs = torch.tensor(inputs, dtype=torch.float32)
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs[index], int(self.labels[index])


def _require_int(key: str, value: object, minimum: int, maximum: int | None = None) -> None:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UserError(f"dataset.{key} must be an integer {allowed}, got {value!r}")


def _require_no_download(name: str, download: bool) -> None:
    if download:
        raise UserError(f"dataset {name!r} cannot be downloaded; set dataset.download=false and supply the files")


def _existing_data_dir(data_dir: str) -> str:
    path = os.path.abspath(data_dir)
    if not os.path.isdir(path):
        raise UserError(
            f"dataset.data_dir {path} does not exist; set dataset.data_dir (or SPARSEBENCH_DATA) to the data folder"
        )
    return path


# ---------------------------------------------------------------- mnist1d

@functools.lru_cache(maxsize=4)
def _generate_mnist1d(num_samples: int, gen_seed: int) -> dict[str, np.ndarray]:
    """Run the package's generator; it reseeds the global RNGs, so theirs are put back after."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = gen_seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {key: generated[key] for key in ("x", "y", "x_test", "y_test")}


@DATASETS.register("mnist1d")
def _load_mnist1d(data_dir: str, download: bool, num_samples: int = 5000, gen_seed: int = 42) -> DatasetBundle:
    """``data_dir`` and ``download`` are ignored: the data is generated, never read or fetched."""
    _require_int("num_samples", num_samples, minimum=10)
    if num_samples % 10:
        raise UserError(f"dataset.num_samples must be a multiple of 10 (an equal share per digit), got {num_samples}")
    _require_int("gen_seed", gen_seed, minimum=0, maximum=2**32 - 1)  # numpy's legacy seed range
    arrays = _generate_mnist1d(num_samples, gen_seed)
    train = ArrayDataset(arrays["x"][:, None, :], arrays["y"])
    test = ArrayDataset(arrays["x_test"][:, None, :], arrays["y_test"])
    return DatasetBundle("mnist1d", train, test, input_shape=tuple(train.inputs.shape[1:]), num_classes=10)


# ---------------------------------------------------------------- torchvision

@dataclass(frozen=True)
class _TorchvisionSpec:
    dataset_class: type
    folder: str  # where torchvision keeps the files under root
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


_TORCHVISION_SPECS = {
    "mnist": _TorchvisionSpec(tv_datasets.MNIST, "MNIST/raw", (1, 28, 28), 10, (0.1307,), (0.3081,), False),
    "fashion_mnist": _TorchvisionSpec(
        tv_datasets.FashionMNIST, "FashionMNIST/raw", (1, 28, 28), 10, (0.2860,), (0.3530,), False
    ),
    "cifar10": _TorchvisionSpec(
        tv_datasets.CIFAR10, "cifar-10-batches-py", (3, 32, 32), 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True,
    ),
    "cifar100": _TorchvisionSpec(
        tv_datasets.CIFAR100, "cifar-100-python", (3, 32, 32), 100,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
    ),
}


def _torchvision_split(name: str, spec: _TorchvisionSpec, root: str, download: bool, train: bool) -> Dataset:
    to_input = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    augmentation = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if spec.augment and train else []
    looked_in = os.path.join(root, spec.folder)
    silenced = io.StringIO()
    try:
        with contextlib.redirect_stdout(silenced), contextlib.redirect_stderr(silenced):
            return spec.dataset_class(
                root=root, train=train, download=download, transform=T.Compose(augmentation + to_input)
            )
    except RuntimeError as error:  # torchvision's way of saying the files are missing or a download failed
        if not str(error).startswith(("Dataset not found", "Dataset metadata file not found", "Error downloading")):
            raise
        raise _unavailable(name, looked_in, download, error) from None
    except OSError as error:  # no network (urllib's URLError), no permission, disk full
        raise _unavailable(name, looked_in, download, error) from None


def _unavailable(name: str, looked_in: str, download: bool, error: Exception) -> UserError:
    reason = " ".join(str(error).split())  # torchvision's MNIST lists each mirror's failure on its own line
    if download:
        return UserError(
            f"could not download dataset {name!r} into {looked_in} ({reason}); "
            "check the internet access or place the files there"
        )
    if isinstance(error, OSError):
        return UserError(f"could not read dataset {name!r} from {looked_in} ({reason})")
    return UserError(
        f"dataset {name!r} not found or incomplete in {looked_in}; "
        "run once with dataset.download=true on a machine with internet, or place the files there"
    )


def _register_torchvision(name: str, spec: _TorchvisionSpec) -> None:
    def load(data_dir: str, download: bool) -> DatasetBundle:
        root = os.path.abspath(data_dir) if download else _existing_data_dir(data_dir)
        return DatasetBundle(
            name,
            train=_torchvision_split(name, spec, root, download, train=True),
            test=_torchvision_split(name, spec, root, download, train=False),
            input_shape=spec.input_shape,
            num_classes=spec.num_classes,
        )

    load.__doc__ = f"torchvision's {spec.dataset_class.__name__} under ``data_dir/{spec.folder}``."
    DATASETS.register(name)(load)


for _name, _spec in _TORCHVISION_SPECS.items():
    _register_torchvision(_name, _spec)


# ---------------------------------------------------------------- imagefolder

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _image_folder(path: str, transform: Callable) -> tv_datasets.ImageFolder:
    try:
        return tv_datasets.ImageFolder(path, transform=transform)
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise UserError(f"imagefolder {path} has no usable images: {str(error).splitlines()[0]}") from None


@DATASETS.register("imagefolder")
def _load_imagefolder(data_dir: str, download: bool, image_size: int = 224) -> DatasetBundle:
    _require_no_download("imagefolder", download)
    _require_int("image_size", image_size, minimum=1)
    root = _existing_data_dir(data_dir)
    train_dir = os.path.join(root, "train")
    eval_dirs = [os.path.join(root, split) for split in ("val", "test")]
    eval_dir = next((path for path in eval_dirs if os.path.isdir(path)), None)
    if not os.path.isdir(train_dir) or eval_dir is None:
        raise UserError(
            f"imagefolder needs {train_dir} and {eval_dirs[0]} (or {eval_dirs[1]}), each with one folder per class"
        )
    normalize = [T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    train = _image_folder(
        train_dir, T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *normalize])
    )
    test = _image_folder(
        eval_dir, T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), *normalize])
    )
    if train.classes != test.classes:  # ImageFolder numbers classes by sorted folder name, per split
        raise UserError(
            f"imagefolder class folders differ between {train_dir} ({len(train.classes)}) "
            f"and {eval_dir} ({len(test.classes)}); both need the same class folder names"
        )
    return DatasetBundle("imagefolder", train, test, (3, image_size, image_size), len(train.classes))


# ---------------------------------------------------------------- npz

def _as_model_input(x: np.ndarray, key: str, path: str) -> np.ndarray:
    """(N, F) -> (N, 1, F) signals; (N, H, W) -> (N, 1, H, W) images; (N, C, H, W) kept."""
    if x.ndim in (2, 3):
        return x[:, None]
    if x.ndim == 4:
        return x
    raise UserError(f"array {key!r} in {path} has shape {x.shape}; expected (N, F), (N, H, W) or (N, C, H, W)")


def _labels(y: np.ndarray, key: str, path: str, count: int) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise UserError(
            f"array {key!r} in {path} must hold 1-D non-negative integer class labels, got {y.dtype} {y.shape}"
        )
    if len(y) != count:
        raise UserError(f"array {key!r} in {path} has {len(y)} labels but its inputs have {count} samples")
    return y


@DATASETS.register("npz")
def _load_npz(
    data_dir: str, download: bool, path: str | None = None, test_fraction: float = 0.2, split_seed: int = 0
) -> DatasetBundle:
    """``data_dir`` is not used: ``path`` names the file (relative to the working directory).

    ``test_fraction`` and ``split_seed`` only apply when the file has no ``x_test``/``y_test``.
    """
    _require_no_download("npz", download)
    if not path:
        raise UserError("dataset npz needs dataset.path=<file.npz> with arrays 'x' and 'y'")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise UserError(f"dataset.path {path} does not exist")
    with np.load(path, allow_pickle=False) as file:
        arrays = {key: file[key] for key in file.files}
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing or (("x_test" in arrays) != ("y_test" in arrays)):
        raise UserError(
            f"{path} holds arrays {sorted(arrays)}; it needs 'x' and 'y', and optionally both 'x_test' and 'y_test'"
        )
    x = _as_model_input(arrays["x"], "x", path)
    y = _labels(arrays["y"], "y", path, len(x))
    if "x_test" in arrays:
        x_test = _as_model_input(arrays["x_test"], "x_test", path)
        y_test = _labels(arrays["y_test"], "y_test", path, len(x_test))
        if x_test.shape[1:] != x.shape[1:]:
            raise UserError(f"'x_test' samples in {path} have shape {x_test.shape[1:]}, 'x' samples {x.shape[1:]}")
    else:
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise UserError(f"dataset.test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
        _require_int("split_seed", split_seed, minimum=0)
        test_count = round(len(y) * test_fraction)
        if not 0 < test_count < len(y):
            raise UserError(
                f"dataset.test_fraction={test_fraction} of {len(y)} samples in {path} leaves a split empty"
            )
        order = np.random.default_rng(split_seed).permutation(len(y))
        x, x_test = x[order[test_count:]], x[order[:test_count]]
        y, y_test = y[order[test_count:]], y[order[:test_count]]
    if not len(y) or not len(y_test):
        raise UserError(f"{path} gives {len(y)} training and {len(y_test)} test samples; both need at least one")
    num_classes = int(max(y.max(), y_test.max())) + 1
    return DatasetBundle("npz", ArrayDataset(x, y), ArrayDataset(x_test, y_test), tuple(x.shape[1:]), num_classes)
