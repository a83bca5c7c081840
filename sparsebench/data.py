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
    With ``verify_images`` (the default) every image is opened once at load time, so an
    empty, foreign or damaged file stops the run with its name before any run directory
    exists. The check parses each header (PNG files are read to the end, checksums
    included) but decodes nothing; still, it reads every file once, which on a tree the
    size of ImageNet adds a full pass over the disk to start-up: ``verify_images=false``
    skips it. A file the check cannot catch (a JPEG cut off mid-data) fails when it is
    decoded, and that error names the file too.

``npz``
    The user's own arrays: a ``.npz`` file with ``x`` and ``y`` and optionally
    ``x_test``/``y_test`` (else a seeded ``test_fraction`` split). The layout of ``x``
    decides the input shape: ``(N, F)`` becomes ``(N, 1, F)`` one-channel signals for
    1-D models, ``(N, H, W)`` becomes ``(N, 1, H, W)`` grey images, and ``(N, C, H, W)``
    is kept as it is.

    Reading: each member's .npy header is checked before its data is read, so a file
    that is not a zip of .npy arrays, an array of strings, objects or complex numbers,
    or a header declaring more bytes than the archive holds (a "petabyte" shape) is one
    line naming the file, and nothing big is allocated for it. Pickled arrays are never
    loaded. NaN or infinite inputs are refused: they train to chance and "complete".

    Labels: any integers. Labels that are not already 0..C-1 (``y * 100000``, -1/+1)
    are renumbered 0..C-1 in sorted order of the distinct values of both splits, with a
    one-line warning on stdout, and the bundle's ``class_labels`` keeps the original
    value of each class index; without this a label of 900000 would build a
    900,001-class output layer. Fewer than two training classes is refused. A test
    label that never occurs in training keeps its own class and is warned about: those
    samples cannot be classified correctly, but refusing them would also refuse a random
    split that happened to put a rare class's only samples into the test set.

    Scaling (``normalize``), what a torchvision user gets from ``ToTensor`` + ``Normalize``:
    ``auto`` (the default) scales integer and boolean ``x`` (raw ``uint8`` pixels,
    MNIST style, which would otherwise train at chance) to [0, 1] by dividing unsigned
    integers by their type's maximum (255 for ``uint8``, 65535 for ``uint16``, as
    torchvision's ``ToDtype(scale=True)`` does; signed integers and booleans have no
    such full scale and are divided by 1), then standardises every channel with the
    mean and (population) standard deviation of the training split only, applying the
    same numbers to the test split. Float ``x`` is used as given under ``auto``: it is
    usually prepared by the user already, possibly normalised. ``standardize`` does the
    same for any ``x``, floats included; ``none`` uses the numbers as given. A constant
    channel is only centred. The numbers applied are the bundle's ``normalization``:
    ``{"scale": s, "mean": [...], "std": [...]}``, model input ``(x / s - mean) / std``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import inspect
import io
import math
import os
import random
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from sparsebench.errors import UserError
from sparsebench.registry import Registry
from sparsebench.results import atomic_write_bytes


@dataclass
class DatasetBundle:
    name: str
    train: Dataset  # yields (x: float tensor, y: int)
    test: Dataset
    input_shape: tuple[int, ...]  # (C, L) or (C, H, W), without batch
    num_classes: int
    # npz: {"scale", "mean", "std"} that made the model input (x / scale - mean) / std, per
    # channel, from training-split statistics; None when the inputs are used as given.
    normalization: dict | None = None
    # npz: the file's label value of each class index when the labels were renumbered.
    class_labels: list[int] | None = None


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

_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


def cache_directory() -> Path:
    """Where generated data is kept between processes: $SPARSEBENCH_CACHE, else the XDG cache."""
    if os.environ.get("SPARSEBENCH_CACHE"):
        return Path(os.environ["SPARSEBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsebench"


def _digest(arrays: dict[str, np.ndarray]) -> np.ndarray:
    h = hashlib.sha256()
    for key in _MNIST1D_KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, gen_seed: int) -> dict[str, np.ndarray]:
    """The generated set, from the on-disk cache when a content-checked copy is there.

    Generating MNIST-1D takes seconds (and imports matplotlib) in every process, which dominated
    a short run's start-up; the cache file holds the arrays and their SHA-256, is keyed by the
    generator's version and arguments, and is rewritten whenever it fails its check. A cache that
    cannot be written only costs the time of generating again.
    """
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    path = cache_directory() / f"mnist1d-{version}-n{num_samples}-seed{gen_seed}.npz"
    try:
        with np.load(path, allow_pickle=False) as cached:
            arrays = {key: cached[key] for key in _MNIST1D_KEYS}
            if np.array_equal(cached["sha256"], _digest(arrays)):
                return arrays
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: regenerate below
        pass
    arrays = _generate_mnist1d(num_samples, gen_seed)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, sha256=_digest(arrays))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:
        pass
    return arrays


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
    return {key: generated[key] for key in _MNIST1D_KEYS}


@DATASETS.register("mnist1d")
def _load_mnist1d(data_dir: str, download: bool, num_samples: int = 5000, gen_seed: int = 42) -> DatasetBundle:
    """``data_dir`` and ``download`` are ignored: the data is generated, never read or fetched."""
    _require_int("num_samples", num_samples, minimum=10)
    if num_samples % 10:
        raise UserError(f"dataset.num_samples must be a multiple of 10 (an equal share per digit), got {num_samples}")
    _require_int("gen_seed", gen_seed, minimum=0, maximum=2**32 - 1)  # numpy's legacy seed range
    arrays = _mnist1d_arrays(num_samples, gen_seed)
    train = ArrayDataset(arrays["x"][:, None, :], arrays["y"])
    test = ArrayDataset(arrays["x_test"][:, None, :], arrays["y_test"])
    return DatasetBundle("mnist1d", train, test, input_shape=tuple(train.inputs.shape[1:]), num_classes=10)


# ---------------------------------------------------------------- torchvision

@dataclass(frozen=True)
class _TorchvisionSpec:
    dataset_class: str  # the class in torchvision.datasets (imported only when a set is loaded)
    folder: str  # where torchvision keeps the files under root
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


_TORCHVISION_SPECS = {
    "mnist": _TorchvisionSpec("MNIST", "MNIST/raw", (1, 28, 28), 10, (0.1307,), (0.3081,), False),
    "fashion_mnist": _TorchvisionSpec(
        "FashionMNIST", "FashionMNIST/raw", (1, 28, 28), 10, (0.2860,), (0.3530,), False
    ),
    "cifar10": _TorchvisionSpec(
        "CIFAR10", "cifar-10-batches-py", (3, 32, 32), 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True,
    ),
    "cifar100": _TorchvisionSpec(
        "CIFAR100", "cifar-100-python", (3, 32, 32), 100,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
    ),
}


def _torchvision_split(name: str, spec: _TorchvisionSpec, root: str, download: bool, train: bool) -> Dataset:
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as T

    to_input = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    augmentation = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if spec.augment and train else []
    looked_in = os.path.join(root, spec.folder)
    silenced = io.StringIO()
    try:
        with contextlib.redirect_stdout(silenced), contextlib.redirect_stderr(silenced):
            return getattr(tv_datasets, spec.dataset_class)(
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

    load.__doc__ = f"torchvision's {spec.dataset_class} under ``data_dir/{spec.folder}``."
    DATASETS.register(name)(load)


for _name, _spec in _TORCHVISION_SPECS.items():
    _register_torchvision(_name, _spec)


# ---------------------------------------------------------------- imagefolder

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _unreadable_image(path: str, error: Exception) -> UserError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return UserError(f"imagefolder image {path} cannot be read ({reason}); remove or replace it")


def _read_rgb_image(path: str):
    """ImageFolder's own loader, but a file that fails when decoded mid-training is named as a
    user error; as a bare OSError the trainer would report it as a run-directory write failure."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except Exception as error:  # whatever PIL raises while parsing the user's file, that file is unusable
        raise _unreadable_image(path, error) from None


def _verify_images(folder) -> None:
    """Open every image once, so a bad file is named at load time, before a run directory exists."""
    from PIL import Image

    for path, _ in folder.samples:
        try:
            with Image.open(path) as image:
                image.verify()  # headers (and PNG checksums) only: decoding every image costs far more
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for bad files
            raise _unreadable_image(path, error) from None


def _image_folder(path: str, transform: Callable):
    from torchvision import datasets as tv_datasets

    try:
        return tv_datasets.ImageFolder(path, transform=transform, loader=_read_rgb_image)
    except FileNotFoundError as error:  # no class folders, or a class folder without images
        raise UserError(f"imagefolder {path} has no usable images: {str(error).splitlines()[0]}") from None


@DATASETS.register("imagefolder")
def _load_imagefolder(
    data_dir: str, download: bool, image_size: int = 224, verify_images: bool = True
) -> DatasetBundle:
    _require_no_download("imagefolder", download)
    _require_int("image_size", image_size, minimum=1)
    if not isinstance(verify_images, bool):
        raise UserError(f"dataset.verify_images must be true or false, got {verify_images!r}")
    root = _existing_data_dir(data_dir)
    train_dir = os.path.join(root, "train")
    eval_dirs = [os.path.join(root, split) for split in ("val", "test")]
    eval_dir = next((path for path in eval_dirs if os.path.isdir(path)), None)
    if not os.path.isdir(train_dir) or eval_dir is None:
        raise UserError(
            f"imagefolder needs {train_dir} and {eval_dirs[0]} (or {eval_dirs[1]}), each with one folder per class"
        )
    from torchvision import transforms as T

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
    if verify_images:
        _verify_images(train)
        _verify_images(test)
    return DatasetBundle("imagefolder", train, test, (3, image_size, image_size), len(train.classes))


# ---------------------------------------------------------------- npz

_NPZ_ARRAYS = ("x", "y", "x_test", "y_test")
_NUMERIC_KINDS = {"b": "bool", "i": "int", "u": "uint", "f": "float"}  # numpy dtype.kind -> name
_NORMALIZE_MODES = ("auto", "standardize", "none")
# What reading a damaged or foreign file can raise: zipfile's own error and zlib's for a corrupt
# member, numpy's ValueError for a bad .npy header, EOFError/OSError for a truncated one,
# RuntimeError for an encrypted member, NotImplementedError for an unknown compression method,
# MemoryError for an array that is genuine but larger than this machine.
_NPZ_READ_ERRORS = (
    zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, RuntimeError, NotImplementedError, MemoryError
)
_CHUNK_VALUES = 2**22  # float64 values per chunk (32 MiB): statistics never copy a whole large array


def _describe(error: Exception) -> str:
    """``Type: message`` on one line; a bare ``MemoryError`` has no message."""
    return " ".join(f"{type(error).__name__}: {error}".split()).removesuffix(":")


def _not_readable_npz(path: str, reason: str) -> UserError:
    return UserError(f"dataset.path {path} is not a readable .npz with numeric arrays x, y ({reason})")


def _why_not_a_zip(path: str) -> str:
    with open(path, "rb") as file:
        start = file.read(6)
    if not start:
        return "the file is empty"
    if start == b"\x93NUMPY":  # the .npy magic: np.save was used where np.savez was meant
        return "it is a single .npy array; save x and y together with numpy.savez"
    return "it is not a zip archive; save the arrays with numpy.savez"


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays x, y, x_test, y_test in ``path``; members with other names are never read."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _not_readable_npz(path, _why_not_a_zip(path)) from None
    except _NPZ_READ_ERRORS as error:
        raise _not_readable_npz(path, _describe(error)) from None
    with archive:
        # np.savez stores array 'x' as member 'x.npy'; np.load names it 'x' the same way
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        if any(key not in members for key in ("x", "y")) or (("x_test" in members) != ("y_test" in members)):
            raise UserError(
                f"{path} holds arrays {sorted(members)}; "
                "it needs 'x' and 'y', and optionally both 'x_test' and 'y_test'"
            )
        return {key: _read_member(archive, members[key], key, path) for key in _NPZ_ARRAYS if key in members}


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, path: str) -> np.ndarray:
    try:
        with archive.open(info) as member:
            _check_header(member, info, key, path)
        with archive.open(info) as member:
            array = np.lib.format.read_array(member, allow_pickle=False)
    except _NPZ_READ_ERRORS as error:
        raise _not_readable_npz(path, f"array {key!r} cannot be read: {_describe(error)}") from None
    # torch refuses non-native byte order (arrays written on a big-endian machine or as '>f4')
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _check_header(member, info: zipfile.ZipInfo, key: str, path: str) -> None:
    """Refuse a member from its .npy header alone, before any memory is allocated for its data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:  # format 3.0 exists only for structured dtypes with non-Latin-1 field names: not numeric anyway
        raise _not_readable_npz(path, f"array {key!r} uses .npy format {version[0]}.{version[1]}, not a numeric array")
    if dtype.kind not in _NUMERIC_KINDS:
        raise _not_readable_npz(path, f"array {key!r} has dtype {dtype}; allowed: {', '.join(_NUMERIC_KINDS.values())}")
    declared = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for absurd shapes
    stored = info.file_size - member.tell()  # uncompressed bytes after the header, from the zip directory
    if declared > stored:
        raise _not_readable_npz(
            path, f"array {key!r} declares shape {shape} of {declared} bytes but the file holds {stored}"
        )


def _require_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"dataset.{key} must be one of {', '.join(allowed)}, got {value!r}")


def _as_model_input(x: np.ndarray, key: str, path: str) -> np.ndarray:
    """(N, F) -> (N, 1, F) signals; (N, H, W) -> (N, 1, H, W) images; (N, C, H, W) kept."""
    if x.ndim not in (2, 3, 4) or 0 in x.shape[1:]:
        raise UserError(
            f"array {key!r} in {path} has shape {x.shape}; expected (N, F), (N, H, W) or (N, C, H, W), none of them 0"
        )
    return x[:, None] if x.ndim in (2, 3) else x


def _require_finite(x: np.ndarray, key: str, path: str) -> None:
    if x.dtype.kind != "f":
        return
    finite = np.isfinite(x)
    if not finite.all():
        first = int(np.argmin(finite.reshape(len(x), -1).all(axis=1)))
        raise UserError(
            f"array {key!r} in {path} holds {int(finite.size - finite.sum())} NaN or infinite value(s), "
            f"the first in sample {first}; remove or replace them"
        )


def _labels(y: np.ndarray, key: str, path: str, count: int) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"array {key!r} in {path} must hold 1-D integer class labels, got {y.dtype} {y.shape}")
    if len(y) != count:
        raise UserError(f"array {key!r} in {path} has {len(y)} labels but its inputs have {count} samples")
    return y


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, split_seed: int, path: str):
    """A seeded random (train x, train y, test x, test y) partition of one labelled set."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise UserError(f"dataset.test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    _require_int("split_seed", split_seed, minimum=0)
    test_count = round(len(y) * test_fraction)
    if not 0 < test_count < len(y):
        raise UserError(f"dataset.test_fraction={test_fraction} of {len(y)} samples in {path} leaves a split empty")
    order = np.random.default_rng(split_seed).permutation(len(y))
    train, test = order[test_count:], order[:test_count]
    return x[train], y[train], x[test], y[test]


def _warn(message: str) -> None:
    print(f"warning: {message}", flush=True)


def _listed(values: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(value) for value in values[:limit].tolist())
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _numbered_classes(y: np.ndarray, y_test: np.ndarray, path: str):
    """(train labels, test labels, original value per class or None) with labels 0..C-1."""
    train_classes = np.unique(y)
    if len(train_classes) < 2:
        raise UserError(
            f"every training label in {path} is {train_classes[0]}; a classifier needs at least two classes"
        )
    classes = np.union1d(train_classes, y_test)
    unseen = np.setdiff1d(classes, train_classes)
    if len(unseen):
        _warn(f"test label(s) {_listed(unseen)} in {path} never occur in training; those samples cannot be learned")
    if classes[0] == 0 and classes[-1] == len(classes) - 1:  # distinct and sorted: exactly 0..C-1
        return y.astype(np.int64), y_test.astype(np.int64), None
    _warn(
        f"labels in {path} are not 0..C-1 ({len(classes)} distinct values from {classes[0]} to {classes[-1]}); "
        f"renumbered 0..{len(classes) - 1} in sorted order"
    )
    return np.searchsorted(classes, y), np.searchsorted(classes, y_test), [int(value) for value in classes]


def _full_scale(dtype: np.dtype) -> float:
    """The value that means "full intensity": an unsigned type's maximum (255 for uint8), else 1."""
    return float(np.iinfo(dtype).max) if dtype.kind == "u" else 1.0


def _sample_chunks(x: np.ndarray):
    rows = max(1, _CHUNK_VALUES // x[0].size)
    return (slice(start, start + rows) for start in range(0, len(x), rows))


def _channel_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of (N, C, ...) ``x``, in float64: two passes for
    accuracy, in chunks of samples so that a large uint8 array is never copied whole."""
    axes = (0, *range(2, x.ndim))
    per_channel = x.size // x.shape[1]
    total = sum(x[part].astype(np.float64).sum(axis=axes) for part in _sample_chunks(x))
    mean = total / per_channel
    broadcast = mean.reshape(1, -1, *[1] * (x.ndim - 2))
    squares = sum(np.square(x[part].astype(np.float64) - broadcast).sum(axis=axes) for part in _sample_chunks(x))
    return mean, np.sqrt(squares / per_channel)


def _standardized(x: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    shape = (1, -1, *[1] * (x.ndim - 2))
    out = np.empty(x.shape, dtype=np.float32)
    for part in _sample_chunks(x):
        out[part] = (x[part].astype(np.float64) / scale - mean.reshape(shape)) / std.reshape(shape)
    return out


def _normalized(x: np.ndarray, x_test: np.ndarray, mode: str, path: str):
    """(x, x_test, the numbers applied or None) under ``dataset.normalize``; see the module docstring."""
    if mode == "none":
        return x, x_test, None
    scale = _full_scale(x.dtype)
    # uint8 x beside float x_test (or the reverse) means two scales: one of them would be wrong
    if (x_test.dtype.kind == "f") != (x.dtype.kind == "f") or _full_scale(x_test.dtype) != scale:
        raise UserError(
            f"arrays 'x' ({x.dtype}) and 'x_test' ({x_test.dtype}) in {path} would be scaled differently; "
            "store both with the same dtype, or set dataset.normalize=none"
        )
    if mode == "auto" and x.dtype.kind == "f":
        return x, x_test, None
    raw_mean, raw_std = _channel_statistics(x)
    if not (np.isfinite(raw_mean).all() and np.isfinite(raw_std).all()):  # float64 overflow of huge floats
        raise UserError(f"array 'x' in {path} holds values too large to standardise")
    mean, std = raw_mean / scale, raw_std / scale
    std[std == 0] = 1.0  # a constant channel is only centred, never divided by zero
    record = {"scale": scale, "mean": mean.tolist(), "std": std.tolist()}
    return _standardized(x, scale, mean, std), _standardized(x_test, scale, mean, std), record


@DATASETS.register("npz")
def _load_npz(
    data_dir: str,
    download: bool,
    path: str | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    normalize: str = "auto",
) -> DatasetBundle:
    """``data_dir`` is not used: ``path`` names the file (relative to the working directory).

    ``test_fraction`` and ``split_seed`` only apply when the file has no ``x_test``/``y_test``.
    """
    _require_no_download("npz", download)
    _require_choice("normalize", normalize, _NORMALIZE_MODES)
    if not path:
        raise UserError("dataset npz needs dataset.path=<file.npz> with arrays 'x' and 'y'")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise UserError(f"dataset.path {path} does not exist")
    arrays = _read_npz(path)
    x = _as_model_input(arrays["x"], "x", path)
    _require_finite(x, "x", path)
    y = _labels(arrays["y"], "y", path, len(x))
    if "x_test" in arrays:
        x_test = _as_model_input(arrays["x_test"], "x_test", path)
        _require_finite(x_test, "x_test", path)
        y_test = _labels(arrays["y_test"], "y_test", path, len(x_test))
        if x_test.shape[1:] != x.shape[1:]:
            raise UserError(f"'x_test' samples in {path} have shape {x_test.shape[1:]}, 'x' samples {x.shape[1:]}")
    else:
        x, y, x_test, y_test = _split(x, y, test_fraction, split_seed, path)
    if not len(y) or not len(y_test):
        raise UserError(f"{path} gives {len(y)} training and {len(y_test)} test samples; both need at least one")
    y, y_test, class_labels = _numbered_classes(y, y_test, path)
    x, x_test, normalization = _normalized(x, x_test, normalize, path)
    return DatasetBundle(
        "npz", ArrayDataset(x, y), ArrayDataset(x_test, y_test), tuple(x.shape[1:]),
        num_classes=int(max(y.max(), y_test.max())) + 1, normalization=normalization, class_labels=class_labels,
    )
