"""What every search shares: its registry, its config, its directory and the trainings it runs.

A search (`sparsebench search method=<search>`) is a job like a training run: Hydra composes
the same config tree, the `method` group names the search (conf/method/<search>.yaml holds its
options), and every training key (epochs, model, dataset, sparsity, optimizer, ...) applies to
the training runs the search starts. A search has up to three parts, each resumable:

    arms_before()   training runs it needs first (EvoPress: the trained dense model)
    search(job)     its own work in its own run directory (EvoPress, DASS), checkpointed
    arms_after()    training runs of what it found (Random Search: searched, control, parent)

Arms are ordinary runs of the results tree: a finished one is skipped, a killed one resumes,
and `sparsebench report` reads them like any run. A search's own directory sits where a run of
method <search> would (results.run_dir), holds config.yaml, metrics.jsonl (one line per
generation or epoch), the search's outputs and a final.json with `"kind": "search"`, written
last, so its presence means done (docs/search.md).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from sparsebench import results
from sparsebench.config import Config, parse_options, validate
from sparsebench.errors import UserError
from sparsebench.registry import Registry

SEARCHES: Registry[type["Search"]] = Registry("search")
STATE_FILE = results.SEARCH_STATE_FILE  # the checkpoint of a search's own work (weights-only types)


def arm_config(resolved: dict, method: str, **changes: Any) -> dict:
    """The resolved config of a training run a search starts: the search's own config with
    `method` (at its default options) in place of the search, and `changes` applied
    (`{"distribution.dense_first": False}`). A dense run is stored at sparsity 0, as `train` does."""
    from sparsebench.methods import METHODS

    arm = copy.deepcopy(resolved)
    method_cls = METHODS.get(method)
    arm["method"] = {"name": method, **dataclasses.asdict(method_cls.Options())}
    arm["rerun"] = False  # `rerun=true` redoes the search's own work, not the runs it needs
    for key, value in changes.items():
        node = arm
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    if not method_cls.uses_sparsity:
        arm["sparsity"] = 0.0
    return arm


class Search:
    """One search method. Subclasses set `name`/`Options` and override the parts they have."""

    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, options, resolved: dict, cfg: Config):
        self.options = options
        self.resolved = resolved  # the search's whole config (its run directory's identity)
        self.cfg = cfg  # the training keys, validated (method: the first arm's, or dense)
        self.check()

    @property
    def device(self) -> torch.device:
        from sparsebench.train import pick_device

        return pick_device(self.cfg.run.device)

    def check(self) -> None:
        """Raise UserError for options that cannot work (before any directory exists)."""

    def require_positive(self, *keys: str) -> None:
        """Options that count something (generations, epochs, channels): at least 1."""
        for key in keys:
            if getattr(self.options, key) < 1:
                raise UserError(f"method.{key}={getattr(self.options, key)}: expected a positive integer")

    def arms_before(self) -> list[dict]:
        return []

    def arms_after(self) -> list[dict]:
        return []

    has_directory: ClassVar[bool] = True  # False: the search is only its arms (Random Search)

    def search(self, job: "SearchJob") -> dict:
        """Do the search in `job.path`, resuming from `job.load_state()`; return the `search`
        summary of final.json."""
        raise NotImplementedError


def meta_engine(cfg: Config):
    """The engine of `cfg`'s model built on PyTorch's meta device (shapes only, no memory): what
    a search needs to check its options against the prunable tensors before anything runs."""
    from sparsebench.data import load_dataset
    from sparsebench.train import build_run

    data = load_dataset(cfg.dataset, **cfg.dataset_options)
    with torch.device("meta"):
        return build_run(cfg, data, torch.device("meta"), with_optimizer=False).engine


def training_view(resolved: dict) -> dict:
    """The config validated for the training keys: the search replaced by `dense` (keeping the
    search's sparsity, which is what the search aims at)."""
    return {**arm_config(resolved, "dense"), "sparsity": resolved["sparsity"]}


@dataclass
class SearchPlan:
    search: Search
    arms_before: list[tuple[Config, dict]]


def plan_search(resolved: dict) -> SearchPlan:
    """Validate a search's config and every arm's; one UserError line for the first bad value."""
    from sparsebench.methods import METHODS

    method = resolved.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    if name not in SEARCHES:
        trains = f"; train method={name} with `sparsebench train`" if name in METHODS else ""
        raise UserError(f"method={name} is not a search{trains}; `sparsebench search` runs method="
                        f"{'|'.join(SEARCHES.names())}")
    search_cls = SEARCHES.get(name)
    raw = {k: v for k, v in method.items() if k != "name"}
    options = parse_options(search_cls.Options, raw, "method.", f"search {name}")
    if resolved.get("powerprop", 1.0) != 1.0:
        raise UserError("powerprop applies to training methods; a search trains with powerprop=1")
    cfg = validate(training_view(resolved))
    search = search_cls(options, resolved, cfg)
    before = [(validate(arm), arm) for arm in search.arms_before()]
    for arm in search.arms_after():  # their options checked now; planned again after the search (job.py)
        validate(arm)
    return SearchPlan(search, before)


class SearchJob:
    """A search's own run directory: state, per-generation metrics, outputs."""

    def __init__(self, path: Path, log: Callable[[str], None]):
        self.path = path
        self.log = log

    def load_state(self) -> dict | None:
        """The last checkpoint of the search's work, or None on a fresh start (weights-only read)."""
        file = self.path / STATE_FILE
        if not file.is_file():
            return None
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not ours
            raise UserError(
                f"cannot resume from {file}: not a readable search checkpoint ({exc.__class__.__name__}); "
                f"move it aside (e.g. mv {file} {file}.bad) and relaunch to restart the search"
            ) from None

    def save_state(self, state: dict) -> None:
        results.atomic_torch_save(self.path / STATE_FILE, state)

    def append_metrics(self, record: dict) -> None:
        results.append_jsonl(self.path / results.METRICS_FILE, record)

    def metrics(self) -> list[dict]:
        return results.read_jsonl(self.path / results.METRICS_FILE)

    def truncate_metrics(self, key: str, last: int) -> None:
        """On resume: drop lines after the checkpoint (they are redone identically)."""
        results.truncate_jsonl(self.path / results.METRICS_FILE, key, last)
