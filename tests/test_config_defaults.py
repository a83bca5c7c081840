"""The YAML files in conf/ mirror the Python defaults (a method's Options, a model's or dataset's
factory parameters): they can never drift apart, and every option is reachable from the CLI."""
import dataclasses
import enum
from pathlib import Path

import pytest
import yaml

from sparsebench import cli
from sparsebench.config import factory_options
from sparsebench.data import DATASETS
from sparsebench.methods import METHODS
from sparsebench.models import MODELS
from sparsebench.search import SEARCHES

CONF = Path(cli.CONFIG_DIR)


def yaml_options(group: str, name: str) -> dict:
    node = yaml.safe_load((CONF / group / f"{name}.yaml").read_text())
    return {k: v for k, v in node.items() if k not in ("name", "defaults", "data_dir", "download")}


def python_defaults(options_cls) -> dict:
    out = {}
    for f in dataclasses.fields(options_cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = value.value if isinstance(value, enum.Enum) else value
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


@pytest.mark.parametrize("name", METHODS.names())
def test_method_yaml_equals_its_options(name):
    assert yaml_options("method", name) == python_defaults(METHODS.get(name).Options)


@pytest.mark.parametrize("name", SEARCHES.names())
def test_search_yaml_equals_its_options(name):
    assert yaml_options("method", name) == python_defaults(SEARCHES.get(name).Options)


@pytest.mark.parametrize("name", MODELS.names())
def test_model_yaml_equals_its_factory(name):
    assert yaml_options("model", name) == python_defaults(factory_options(MODELS.get(name)))


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_yaml_equals_its_loader(name):
    assert yaml_options("dataset", name) == python_defaults(factory_options(DATASETS.get(name)))


def test_mars_yaml_equals_its_options():
    from sparsebench.config import MarsOptions

    assert yaml_options("optimizer", "mars") == python_defaults(MarsOptions)
