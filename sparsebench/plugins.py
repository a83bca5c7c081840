"""Your own methods, models and datasets, loaded in every process that trains.

Two routes, usable together:

* `plugins=[my_pkg.methods,/abs/path/snip.py]`: modules (importable names, or paths of .py
  files) imported before anything is validated — in the command's own process (so Hydra can
  compose `method=snip`) and again in each job a launcher starts (submitit, joblib) and in each
  torchrun rank, because they all read the job's config.
* Python entry points in the groups `sparsebench.methods`, `sparsebench.models` and
  `sparsebench.datasets` of any installed distribution: imported in every sparsebench process.

A plug-in module registers its objects with the usual decorators (`METHODS.register`,
`MODELS.register`, `DATASETS.register`). It needs no YAML file: for every registered method,
model or dataset without one in conf/ this module stores the defaults in Hydra's ConfigStore
(a method's `Options` dataclass, a model's or dataset's keyword parameters), so `method=snip`
and `method.keep_ratio=...` compose like the built-in ones. A YAML file in a `--config-dir`
still wins where one exists.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path

from sparsebench.errors import UserError

ENTRY_POINT_GROUPS = ("sparsebench.methods", "sparsebench.models", "sparsebench.datasets")
_loaded: set[str] = set()
_entry_points_loaded = False


def load(names: Iterable[str] = ()) -> None:
    """Import the named plug-ins and every entry point (each once per process), then make
    sure every registered method, model and dataset can be composed by Hydra."""
    global _entry_points_loaded
    for name in names:
        if name not in _loaded:
            _import(name)
            _loaded.add(name)
    if not _entry_points_loaded:
        for group in ENTRY_POINT_GROUPS:
            for entry in importlib.metadata.entry_points(group=group):
                try:
                    entry.load()
                except Exception as exc:  # noqa: BLE001 - a broken plug-in is the user's error, named
                    raise UserError(f"entry point {entry.name} ({group}: {entry.value}) failed to load: "
                                    f"{exc.__class__.__name__}: {exc}") from None
        _entry_points_loaded = True
    register_configs()


def _import(name: str) -> None:
    try:
        if name.endswith(".py") or "/" in name:
            path = Path(name).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"plugins: {name} is not a file")
            spec = importlib.util.spec_from_file_location(f"sparsebench_plugin_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the plug-in raised on import
        raise UserError(f"plugins: cannot import {name!r}: {exc.__class__.__name__}: {exc}") from None


def from_overrides(overrides: Iterable[str]) -> list[str]:
    """The plug-ins a command line asks for (`plugins=[a,b]`, `+plugins=...`), read before composing."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    names: list[str] = []
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if key != "plugins" or "=" not in text:
            continue
        try:
            (override,) = OverridesParser.create().parse_overrides([text])
            value = override.value()
        except Exception:  # noqa: BLE001 - the normal validation reports the syntax error
            continue
        names.extend(value if isinstance(value, list) else [value])
    return [str(n) for n in names if n]


def _plain(value):
    """A default as YAML would hold it (enums by value, dataclass lists copied)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _method_node(name: str, cls) -> dict:
    options = cls.Options()
    return {"name": name, **{f.name: _plain(getattr(options, f.name)) for f in dataclasses.fields(options)}}


def _keyword_node(name: str, factory, extra: dict) -> dict:
    params = inspect.signature(factory).parameters.values()
    defaults = {p.name: _plain(p.default) for p in params
                if p.default is not inspect.Parameter.empty and p.name not in ("data_dir", "download")}
    return {"name": name, **extra, **defaults}


def register_configs() -> None:
    """A ConfigStore entry for each registered method/model/dataset that has no YAML in conf/."""
    from hydra.core.config_store import ConfigStore

    from sparsebench.cli import CONFIG_DIR
    from sparsebench.data import DATASETS
    from sparsebench.methods import METHODS
    from sparsebench.models import MODELS

    store = ConfigStore.instance()
    data_keys = {"data_dir": "${oc.env:SPARSEBENCH_DATA,data}", "download": False}
    for group, registry, node in (
        ("method", METHODS, lambda n: _method_node(n, METHODS.get(n))),
        ("model", MODELS, lambda n: _keyword_node(n, MODELS.get(n), {})),
        ("dataset", DATASETS, lambda n: _keyword_node(n, DATASETS.get(n), data_keys)),
    ):
        for name in registry.names():
            if not (Path(CONFIG_DIR) / group / f"{name}.yaml").is_file():
                store.store(group=group, name=name, node=node(name))
