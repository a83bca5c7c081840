"""The dataset layer offline: generated MNIST-1D, tiny fakes in torchvision's on-disk formats,
generated image folders and .npz files, and the one-line errors for everything users get wrong."""
from __future__ import annotations

import inspect
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from sparsebench import data
from sparsebench.data import DatasetBundle, dataset_options, list_datasets, load_dataset
from sparsebench.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def user_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- registry and configs

def test_registered_names():
    assert list_datasets() == sorted(
        ["mnist1d", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "npz"]
    )


def test_unknown_dataset_and_option_are_user_errors(tmp_path):
    assert "mnist1e" in user_error(load_dataset, "mnist1e", str(tmp_path))
    message = user_error(load_dataset, "mnist1d", str(tmp_path), num_sample=100)
    assert "num_sample" in message and "num_samples" in message


@pytest.mark.parametrize("name", list_datasets())
def test_conf_file_keys_are_the_loader_parameters(name):
    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"), resolve=True)
    options = dataset_options(name)
    assert conf["name"] == name
    assert set(conf) == {"name", "data_dir", "download"} | set(options)
    assert conf["download"] is False
    assert {key: conf[key] for key in options} == options
    inspect.signature(load_dataset).bind(**conf)


def test_no_conf_file_without_a_dataset():
    assert sorted(path.stem for path in CONF_DIR.glob("*.yaml")) == list_datasets()


# ---------------------------------------------------------------- mnist1d

def test_mnist1d_default_shapes_and_classes(tmp_path):
    bundle = load_dataset("mnist1d", str(tmp_path))
    assert isinstance(bundle, DatasetBundle)
    assert (len(bundle.train), len(bundle.test)) == (4000, 1000)
    assert bundle.input_shape == (1, 40) and bundle.num_classes == 10
    x, y = bundle.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 40) and isinstance(y, int)
    assert sorted(set(bundle.train.labels.tolist())) == list(range(10))
    assert abs(float(bundle.train.inputs.mean())) < 0.05 and abs(float(bundle.train.inputs.std()) - 1) < 0.05
    assert list(tmp_path.iterdir()) == []  # nothing written to disk


def test_mnist1d_is_deterministic_and_seeded(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    data._mnist1d_arrays.cache_clear()
    first = load_dataset("mnist1d", str(tmp_path), num_samples=200)
    data._mnist1d_arrays.cache_clear()
    (cached,) = (tmp_path / "cache").glob("mnist1d-*-n200-seed42.npz")
    cached.unlink()  # make the second load generate again
    second = load_dataset("mnist1d", str(tmp_path), num_samples=200)
    other_seed = load_dataset("mnist1d", str(tmp_path), num_samples=200, gen_seed=7)
    assert torch.equal(first.train.inputs, second.train.inputs)
    assert torch.equal(first.test.labels, second.test.labels)
    assert not torch.equal(first.train.inputs, other_seed.train.inputs)
    assert (len(first.train), len(first.test)) == (160, 40)


def test_mnist1d_needs_no_network_and_leaves_global_rngs_alone(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("mnist1d tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    data._mnist1d_arrays.cache_clear()
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    bundle = load_dataset("mnist1d", str(tmp_path), num_samples=100, gen_seed=3)
    assert len(bundle.train) == 80
    assert np.random.rand() == expected


def test_mnist1d_is_cached_on_disk_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    data._mnist1d_arrays.cache_clear()
    generated = load_dataset("mnist1d", str(tmp_path), num_samples=100, gen_seed=5)
    (cached,) = (tmp_path / "cache").glob("mnist1d-*-n100-seed5.npz")

    def must_not_generate(*args):
        raise AssertionError("generated although a valid cache file exists")

    monkeypatch.setattr(data, "_generate_mnist1d", must_not_generate)
    data._mnist1d_arrays.cache_clear()
    from_cache = load_dataset("mnist1d", str(tmp_path), num_samples=100, gen_seed=5)
    assert torch.equal(generated.train.inputs, from_cache.train.inputs)
    assert torch.equal(generated.test.labels, from_cache.test.labels)

    monkeypatch.undo()
    monkeypatch.setenv("SPARSEBENCH_CACHE", str(tmp_path / "cache"))
    with np.load(cached) as f:  # same shapes, one value changed: only the checksum can tell
        arrays = {k: f[k].copy() for k in f.files}
    arrays["x"][0, 0] += 1.0
    np.savez(cached, **arrays)
    data._mnist1d_arrays.cache_clear()
    repaired = load_dataset("mnist1d", str(tmp_path), num_samples=100, gen_seed=5)
    assert torch.equal(generated.train.inputs, repaired.train.inputs)
    with np.load(cached) as f:
        assert np.array_equal(f["x"], data._generate_mnist1d(100, 5)["x"])  # rewritten valid


@pytest.mark.parametrize("options", [{"num_samples": 5}, {"num_samples": 105}, {"gen_seed": -1}, {"gen_seed": "a"}])
def test_mnist1d_bad_options(tmp_path, options):
    assert next(iter(options)) in user_error(load_dataset, "mnist1d", str(tmp_path), **options)


# ---------------------------------------------------------------- torchvision sets

def test_missing_torchvision_data_names_the_directory(tmp_path):
    message = user_error(load_dataset, "cifar10", str(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py") in message and "dataset.download=true" in message
    missing = tmp_path / "nowhere"
    message = user_error(load_dataset, "mnist", str(missing))
    assert "data_dir" in message and str(missing) in message


def write_fake_cifar10(root: Path, images_per_batch: int) -> np.ndarray:
    """The pickles torchvision reads: five training batches, one test batch, label names."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    test_pixels = None
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, size=(images_per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(label) for label in rng.integers(0, 10, size=images_per_batch)]
        with open(folder / batch, "wb") as file:
            pickle.dump({"data": pixels, "labels": labels}, file)
        test_pixels = pixels
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, file)
    return test_pixels


def test_fake_cifar10_loads_and_augments_train_only(tmp_path, monkeypatch):
    # torchvision checks every CIFAR file's md5 on each load, not only after a download, so
    # fake files can never pass; keep its existence check and skip the checksum.
    monkeypatch.setattr(
        "torchvision.datasets.cifar.check_integrity", lambda path, md5=None: os.path.isfile(path)
    )
    test_pixels = write_fake_cifar10(tmp_path, images_per_batch=3)
    bundle = load_dataset("cifar10", str(tmp_path))
    assert (len(bundle.train), len(bundle.test)) == (15, 3)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10

    image = test_pixels[0].reshape(3, 32, 32).transpose(1, 2, 0)
    spec = data._TORCHVISION_SPECS["cifar10"]
    expected = T.Normalize(spec.mean, spec.std)(T.ToTensor()(image))
    x, y = bundle.test[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    assert torch.allclose(x, expected) and torch.equal(bundle.test[0][0], x)

    torch.manual_seed(0)
    draws = [bundle.train[0][0] for _ in range(10)]
    assert all(draw.shape == (3, 32, 32) for draw in draws)
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:])


def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's idx format: magic (0, 0, uint8 type 0x08, ndim), big-endian sizes, raw bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fake_mnist_loads_from_raw_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("t10k", 4)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, size=(count, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(count))
    bundle = load_dataset("mnist", str(tmp_path))
    assert (len(bundle.train), len(bundle.test)) == (6, 4)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    x, y = bundle.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3


# ---------------------------------------------------------------- imagefolder

def write_image_folder(root: Path, split: str, classes: list[str], per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@pytest.mark.parametrize("eval_split", ["val", "test"])
def test_imagefolder(tmp_path, eval_split):
    write_image_folder(tmp_path, "train", ["cat", "dog", "emu"])
    write_image_folder(tmp_path, eval_split, ["cat", "dog", "emu"], per_class=1)
    bundle = load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert (len(bundle.train), len(bundle.test)) == (6, 3)
    assert bundle.input_shape == (3, 16, 16) and bundle.num_classes == 3
    for split in (bundle.train, bundle.test):
        x, y = split[len(split) - 1]
        assert x.shape == (3, 16, 16) and y == 2


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 7, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content", [b"", b"not an image at all\n", png_bytes()[:60]], ids=["empty", "text", "truncated"]
)
def test_imagefolder_names_an_unreadable_image_at_load_time(tmp_path, content):
    write_image_folder(tmp_path, "train", ["cat", "dog"])
    write_image_folder(tmp_path, "val", ["cat", "dog"], per_class=1)
    bad = tmp_path / "val" / "dog" / "broken.png"
    bad.write_bytes(content)
    message = user_error(load_dataset, "imagefolder", str(tmp_path), image_size=16)
    assert f"imagefolder image {bad} cannot be read" in message


def test_imagefolder_without_verification_names_the_bad_image_when_it_is_read(tmp_path):
    write_image_folder(tmp_path, "train", ["cat", "dog"])
    write_image_folder(tmp_path, "val", ["cat", "dog"], per_class=1)
    bad = tmp_path / "train" / "cat" / "0.png"
    bad.write_bytes(b"")
    bundle = load_dataset("imagefolder", str(tmp_path), image_size=16, verify_images=False)
    assert len(bundle.train) == 4
    assert bundle.train[1][0].shape == (3, 16, 16)
    assert str(bad) in user_error(bundle.train.__getitem__, 0)  # a UserError, not the OSError the trainer misreports
    assert "verify_images" in user_error(load_dataset, "imagefolder", str(tmp_path), verify_images="yes")


def test_imagefolder_errors(tmp_path):
    assert "data_dir" in user_error(load_dataset, "imagefolder", str(tmp_path / "absent"))
    write_image_folder(tmp_path, "train", ["cat", "dog"])
    assert str(tmp_path / "val") in user_error(load_dataset, "imagefolder", str(tmp_path))
    write_image_folder(tmp_path, "val", ["cat"])
    assert "class folder" in user_error(load_dataset, "imagefolder", str(tmp_path))


# ---------------------------------------------------------------- npz

def test_npz_with_test_arrays_keeps_images(tmp_path):
    rng = np.random.default_rng(0)
    file = tmp_path / "images.npz"
    x, y = rng.normal(size=(6, 3, 5, 5)), np.array([0, 1, 2, 0, 1, 2])
    np.savez(file, x=x, y=y, x_test=rng.normal(size=(2, 3, 5, 5)), y_test=np.array([2, 0]))
    bundle = load_dataset("npz", str(tmp_path), path=str(file))
    assert bundle.input_shape == (3, 5, 5) and bundle.num_classes == 3
    assert bundle.normalization is None and bundle.class_labels is None  # float inputs are used as given
    assert (len(bundle.train), len(bundle.test)) == (6, 2)
    inputs, label = bundle.train[1]
    assert inputs.dtype == torch.float32 and torch.allclose(inputs, torch.tensor(x[1], dtype=torch.float32))
    assert label == 1


def test_npz_signals_split_deterministically(tmp_path):
    file = tmp_path / "signals.npz"
    x = np.arange(10 * 7, dtype=np.float64).reshape(10, 7)
    np.savez(file, x=x, y=np.arange(10) % 3)
    first = load_dataset("npz", str(tmp_path), path=str(file))
    second = load_dataset("npz", str(tmp_path), path=str(file))
    assert first.input_shape == (1, 7) and first.num_classes == 3
    assert (len(first.train), len(first.test)) == (8, 2)
    assert torch.equal(first.test.inputs, second.test.inputs)
    rows = torch.cat([first.train.inputs, first.test.inputs])[:, 0, 0].tolist()
    assert sorted(rows) == x[:, 0].tolist()  # a partition: every sample exactly once
    reseeded = load_dataset("npz", str(tmp_path), path=str(file), split_seed=1)
    assert not torch.equal(first.test.inputs, reseeded.test.inputs)


def test_npz_grey_images_get_a_channel(tmp_path):
    file = tmp_path / "grey.npz"
    np.savez(file, x=np.zeros((5, 4, 4)), y=np.arange(5) % 2)
    bundle = load_dataset("npz", str(tmp_path), path=str(file), test_fraction=0.4)
    assert bundle.input_shape == (1, 4, 4) and (len(bundle.train), len(bundle.test)) == (3, 2)


def test_npz_errors(tmp_path):
    def npz_error(**options) -> str:
        return user_error(load_dataset, "npz", str(tmp_path), **options)

    assert "dataset.path" in npz_error()
    assert str(tmp_path / "absent.npz") in npz_error(path=str(tmp_path / "absent.npz"))
    no_labels = tmp_path / "no_labels.npz"
    np.savez(no_labels, x=np.zeros((4, 3)))
    assert "'y'" in npz_error(path=str(no_labels))
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, x=np.zeros((4, 3)), y=np.zeros(5, dtype=np.int64))
    assert "5 labels" in npz_error(path=str(mismatched))
    float_labels = tmp_path / "float_labels.npz"
    np.savez(float_labels, x=np.zeros((4, 3)), y=np.zeros(4))
    assert "integer" in npz_error(path=str(float_labels))
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 3)), y=np.zeros(4, dtype=np.int64))
    assert "test_fraction" in npz_error(path=str(good), test_fraction=1.5)
    assert "cannot be downloaded" in user_error(load_dataset, "npz", str(tmp_path), download=True, path=str(good))


NOT_READABLE = "is not a readable .npz with numeric arrays x, y"


def npy_member(header: dict, data: bytes = b"") -> bytes:
    """A .npy file written by hand: any header, however large the shape it claims, with few bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def write_npz_members(file: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(file, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


def labels_npy(count: int) -> bytes:
    return npy_member({"descr": "<i8", "fortran_order": False, "shape": (count,)}, (np.arange(count) % 2).tobytes())


def write_empty(file: Path) -> str:
    file.write_bytes(b"")
    return "the file is empty"


def write_text(file: Path) -> str:
    file.write_text("x,y\n0.5,1\n")
    return "not a zip archive"


def write_renamed_npy(file: Path) -> str:
    with open(file, "wb") as handle:
        np.save(handle, np.zeros((4, 3)))
    return "single .npy array"


def write_object_array(file: Path) -> str:
    np.savez(file, x=np.array([{"a": 1}, None, 3, 4], dtype=object), y=np.arange(4) % 2)
    return "array 'x' has dtype object"


def write_string_arrays(file: Path) -> str:
    np.savez(file, x=np.zeros((4, 3)), y=np.array(["cat", "dog", "cat", "dog"]))
    return "array 'y' has dtype <U3"


def write_complex_array(file: Path) -> str:
    np.savez(file, x=np.zeros((4, 3), dtype=np.complex64), y=np.arange(4) % 2)
    return "array 'x' has dtype complex64"


def write_petabyte_header(file: Path) -> str:
    petabyte_shape = {"descr": "<f8", "fortran_order": False, "shape": (2**37, 1024)}  # 2**50 bytes
    write_npz_members(file, {"x.npy": npy_member(petabyte_shape, b"\0" * 64), "y.npy": labels_npy(4)})
    return f"array 'x' declares shape ({2**37}, 1024) of {2**50} bytes but the file holds 64"


def write_truncated_member(file: Path) -> str:
    header = {"descr": "<f8", "fortran_order": False, "shape": (4, 3)}
    write_npz_members(file, {"x.npy": npy_member(header, b"\0" * 10), "y.npy": labels_npy(4)})
    return "array 'x' declares shape (4, 3) of 96 bytes but the file holds 10"


def write_corrupt_member(file: Path) -> str:
    x = np.arange(40, dtype=np.float64).reshape(10, 4)
    np.savez(file, x=x, y=np.arange(10) % 2)
    content = bytearray(file.read_bytes())
    content[content.index(x[5].tobytes())] ^= 0xFF  # the zip's CRC no longer matches
    file.write_bytes(bytes(content))
    return "array 'x' cannot be read: BadZipFile: Bad CRC-32"


@pytest.mark.parametrize(
    "write",
    [write_empty, write_text, write_renamed_npy, write_object_array, write_string_arrays, write_complex_array,
     write_petabyte_header, write_truncated_member, write_corrupt_member],
)
def test_npz_unreadable_files_are_one_line_naming_the_path(tmp_path, write):
    file = tmp_path / "data.npz"
    reason = write(file)
    message = user_error(load_dataset, "npz", str(tmp_path), path=str(file))
    assert f"dataset.path {file} {NOT_READABLE} (" in message
    assert reason in message, message


def test_npz_other_members_are_not_read(tmp_path):
    file = tmp_path / "extra.npz"
    np.savez(file, x=np.zeros((4, 3)), y=np.arange(4) % 2, notes=np.array([None], dtype=object))
    assert len(load_dataset("npz", str(tmp_path), path=str(file)).train) == 3


def test_npz_big_endian_arrays_load(tmp_path):
    file = tmp_path / "big_endian.npz"
    x, y = np.arange(12, dtype=">f4").reshape(4, 3), (np.arange(4) % 2).astype(">i8")
    np.savez(file, x=x, y=y, x_test=x, y_test=y)
    bundle = load_dataset("npz", str(tmp_path), path=str(file))
    assert bundle.test.inputs[:, 0, 0].tolist() == [0.0, 3.0, 6.0, 9.0] and bundle.test.labels.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("key, bad_value", [("x", np.nan), ("x", -np.inf), ("x_test", np.inf)])
def test_npz_nan_or_infinite_inputs_are_refused(tmp_path, key, bad_value):
    arrays = {"x": np.zeros((6, 3)), "y": np.arange(6) % 2, "x_test": np.zeros((2, 3)), "y_test": np.array([0, 1])}
    arrays[key][1, 2] = bad_value
    arrays[key][1, 0] = bad_value
    file = tmp_path / "nan.npz"
    np.savez(file, **arrays)
    message = user_error(load_dataset, "npz", str(tmp_path), path=str(file))
    assert f"array {key!r} in {file} holds 2 NaN or infinite value(s), the first in sample 1" in message


def test_npz_zero_sized_samples_are_refused(tmp_path):
    file = tmp_path / "empty_features.npz"
    np.savez(file, x=np.zeros((4, 0)), y=np.arange(4) % 2)
    assert "(4, 0)" in user_error(load_dataset, "npz", str(tmp_path), path=str(file))


def test_npz_labels_that_are_not_0_to_c_minus_1_are_renumbered(tmp_path, capsys):
    file = tmp_path / "scaled_labels.npz"
    y = np.arange(20) % 10
    np.savez(file, x=np.zeros((20, 3)), y=y * 100000, x_test=np.zeros((3, 3)), y_test=np.array([900000, 0, 300000]))
    bundle = load_dataset("npz", str(tmp_path), path=str(file))
    assert bundle.num_classes == 10
    assert bundle.class_labels == [value * 100000 for value in range(10)]
    assert bundle.train.labels.tolist() == y.tolist() and bundle.test.labels.tolist() == [9, 0, 3]
    out = capsys.readouterr().out.splitlines()
    assert out == [f"warning: labels in {file} are not 0..C-1 (10 distinct values from 0 to 900000); "
                   "renumbered 0..9 in sorted order"]

    signs = tmp_path / "signs.npz"
    np.savez(signs, x=np.zeros((4, 3)), y=np.array([-1, 1, 1, -1]), x_test=np.zeros((2, 3)), y_test=np.array([1, -1]))
    bundle = load_dataset("npz", str(tmp_path), path=str(signs))
    assert (bundle.num_classes, bundle.class_labels) == (2, [-1, 1])
    assert bundle.train.labels.tolist() == [0, 1, 1, 0] and bundle.test.labels.tolist() == [1, 0]


def test_npz_test_label_missing_from_training_is_warned_about(tmp_path, capsys):
    file = tmp_path / "unseen.npz"
    np.savez(file, x=np.zeros((4, 3)), y=np.array([0, 1, 0, 1]), x_test=np.zeros((2, 3)), y_test=np.array([2, 0]))
    bundle = load_dataset("npz", str(tmp_path), path=str(file))
    assert bundle.num_classes == 3 and bundle.class_labels is None and bundle.test.labels.tolist() == [2, 0]
    assert capsys.readouterr().out.splitlines() == [
        f"warning: test label(s) 2 in {file} never occur in training; those samples cannot be learned"
    ]


def test_npz_a_single_training_class_is_refused(tmp_path):
    file = tmp_path / "one_class.npz"
    np.savez(file, x=np.zeros((4, 3)), y=np.full(4, 7), x_test=np.zeros((2, 3)), y_test=np.array([7, 3]))
    message = user_error(load_dataset, "npz", str(tmp_path), path=str(file))
    assert f"every training label in {file} is 7; a classifier needs at least two classes" in message


def test_npz_uint8_images_are_scaled_and_standardised_with_training_statistics(tmp_path):
    # Channel 0 of the training images holds 0 and 255 equally (in [0, 1]: mean 0.5, std 0.5),
    # channel 1 holds 0 and 51 (0 and 0.2: mean 0.1, std 0.1); the test images' own statistics
    # differ and must not be used.
    x = np.zeros((4, 2, 1, 2), dtype=np.uint8)
    x[:, 0] = [[[0, 255]], [[255, 0]], [[0, 255]], [[255, 0]]]
    x[:, 1] = [[[0, 51]], [[51, 0]], [[0, 51]], [[51, 0]]]
    x_test = np.array([[[[51, 255]], [[102, 102]]]], dtype=np.uint8)
    file = tmp_path / "mnist_like.npz"
    np.savez(file, x=x, y=np.array([0, 1, 0, 1]), x_test=x_test, y_test=np.array([1]))
    bundle = load_dataset("npz", str(tmp_path), path=str(file))
    assert bundle.normalization == {"scale": 255.0, "mean": [0.5, 0.1], "std": [0.5, 0.1]}
    assert torch.allclose(bundle.train.inputs[0], torch.tensor([[[-1.0, 1.0]], [[-1.0, 1.0]]]))
    assert torch.allclose(bundle.test.inputs[0], torch.tensor([[[-0.6, 1.0]], [[3.0, 3.0]]]))
    assert bundle.train.inputs.dtype == torch.float32 and bundle.input_shape == (2, 1, 2)


@pytest.mark.parametrize("dtype, scale", [(np.uint8, 255.0), (np.uint16, 65535.0), (np.int64, 1.0), (np.bool_, 1.0)])
def test_npz_integer_inputs_are_scaled_by_their_full_scale(tmp_path, dtype, scale):
    pixels = np.array([[0, 1], [1, 0], [1, 1], [0, 0]]) * (1 if dtype is np.bool_ else 200)
    file = tmp_path / "integers.npz"
    np.savez(file, x=pixels.astype(dtype), y=np.arange(4) % 2, x_test=pixels[:1].astype(dtype), y_test=np.array([0]))
    bundle = load_dataset("npz", str(tmp_path), path=str(file))
    top = 1.0 if dtype is np.bool_ else 200.0
    assert bundle.normalization == {"scale": scale, "mean": [top / 2 / scale], "std": [top / 2 / scale]}
    assert bundle.train.inputs[:, 0].tolist() == [[-1, 1], [1, -1], [1, 1], [-1, -1]]  # standardising undoes any scale


def test_npz_split_statistics_come_from_the_training_split_only(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(10, 3, 2, 2), dtype=np.uint8)
    file = tmp_path / "split.npz"
    np.savez(file, x=x, y=np.arange(10) % 2)
    bundle = load_dataset("npz", str(tmp_path), path=str(file))
    train_raw = x[np.random.default_rng(0).permutation(10)[2:]] / 255.0
    assert np.allclose(bundle.normalization["mean"], train_raw.mean(axis=(0, 2, 3)))
    assert np.allclose(bundle.normalization["std"], train_raw.std(axis=(0, 2, 3)))
    assert torch.allclose(bundle.train.inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6)


def test_npz_normalize_none_and_standardize(tmp_path):
    file = tmp_path / "raw.npz"
    x = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    np.savez(file, x=x, y=np.array([0, 1]), x_test=x, y_test=np.array([0, 1]))
    raw = load_dataset("npz", str(tmp_path), path=str(file), normalize="none")
    assert raw.normalization is None and raw.train.inputs[:, 0].tolist() == [[0.0, 255.0], [255.0, 0.0]]
    floats = tmp_path / "floats.npz"
    np.savez(floats, x=np.array([[2.0, 4.0], [6.0, 8.0]]), y=np.array([0, 1]), x_test=np.array([[5.0, 0.5]]),
             y_test=np.array([0]))
    standardized = load_dataset("npz", str(tmp_path), path=str(floats), normalize="standardize")
    std = float(np.std([2.0, 4.0, 6.0, 8.0]))
    assert standardized.normalization == {"scale": 1.0, "mean": [5.0], "std": [std]}
    assert torch.allclose(standardized.test.inputs[0, 0], torch.tensor([0.0, -4.5 / std]))
    as_given = load_dataset("npz", str(tmp_path), path=str(floats))
    assert as_given.normalization is None and as_given.test.inputs[0, 0].tolist() == [5.0, 0.5]
    assert "dataset.normalize" in user_error(load_dataset, "npz", str(tmp_path), path=str(file), normalize="minmax")


@pytest.mark.parametrize("dtype, test_dtype", [("uint8", "float64"), ("float32", "uint8"), ("uint8", "uint16")])
def test_npz_inputs_scaled_differently_in_the_two_splits_are_refused(tmp_path, dtype, test_dtype):
    file = tmp_path / "mixed.npz"
    np.savez(file, x=np.zeros((2, 3), dtype=dtype), y=np.array([0, 1]), x_test=np.zeros((1, 3), dtype=test_dtype),
             y_test=[0])
    message = user_error(load_dataset, "npz", str(tmp_path), path=str(file))
    assert f"'x' ({dtype}) and 'x_test' ({test_dtype})" in message
    assert load_dataset("npz", str(tmp_path), path=str(file), normalize="none").num_classes == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["npz", "imagefolder"])
def test_bad_user_data_stops_the_cli_before_any_run_directory(tmp_path, case):
    if case == "npz":
        (tmp_path / "empty.npz").write_bytes(b"")
        overrides, expected = ["dataset=npz", f"dataset.path={tmp_path / 'empty.npz'}"], NOT_READABLE
    else:
        write_image_folder(tmp_path / "images", "train", ["cat", "dog"])
        write_image_folder(tmp_path / "images", "val", ["cat", "dog"], per_class=1)
        (tmp_path / "images" / "train" / "dog" / "1.png").write_text("oops")
        overrides = ["dataset=imagefolder", f"dataset.data_dir={tmp_path / 'images'}", "model=resnet20"]
        expected = f"imagefolder image {tmp_path / 'images' / 'train' / 'dog' / '1.png'} cannot be read"
    results_root = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsebench", "train", *overrides, f"results_root={results_root}", "progress=none"],
        capture_output=True, text=True, timeout=600,
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("sparsebench train: error: ") and expected in lines[0]
    assert not results_root.exists() or not any(results_root.rglob("*"))
