"""The dataset layer offline: generated MNIST-1D, tiny fakes in torchvision's on-disk formats,
generated image folders and .npz files, and the one-line errors for everything users get wrong."""
from __future__ import annotations

import inspect
import os
import pickle
import socket
import struct
import urllib.request
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


def test_mnist1d_is_deterministic_and_seeded(tmp_path):
    first = load_dataset("mnist1d", str(tmp_path), num_samples=200)
    data._generate_mnist1d.cache_clear()  # make the second load generate again
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
    data._generate_mnist1d.cache_clear()
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    bundle = load_dataset("mnist1d", str(tmp_path), num_samples=100, gen_seed=3)
    assert len(bundle.train) == 80
    assert np.random.rand() == expected


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
    np.savez(file, x=x, y=y, x_test=rng.normal(size=(2, 3, 5, 5)), y_test=np.array([4, 0]))
    bundle = load_dataset("npz", str(tmp_path), path=str(file))
    assert bundle.input_shape == (3, 5, 5) and bundle.num_classes == 5
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
    np.savez(file, x=np.zeros((5, 4, 4)), y=np.zeros(5, dtype=np.int64))
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
