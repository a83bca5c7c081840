"""Typed schemas for a composed config, validated before anything touches the disk.

Hydra type-checks only while composing, and our YAML has no structured schema, so range and
type checks (`sparsity=1.5`, `sparsity=abc`, `epochs=0`, a method option it does not have) all
happen here and end as one UserError line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import functools
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sparsebench.errors import UserError
from sparsebench.live_log import require_tensorboard
from sparsebench.sparse.allocation import ALLOCATIONS
from sparsebench.sparse.initialisation import SparseInit
from sparsebench.sparse.structure import SparsityStructure, StructureKind


# ---------------------------------------------------------------------------- option parsing
def _describe(tp) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.value for m in tp)
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_describe((typing.get_args(tp) or (Any,))[0])}"
    if tp is Any:
        return "any value"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null", dict: "a mapping"}.get(tp, str(tp))


def _convert(value: Any, tp) -> Any:
    """Convert `value` to type `tp` or raise ValueError (bools are never numbers here)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg)
            except ValueError:
                pass
        raise ValueError
    if tp is type(None):
        if value is None:
            return None
        raise ValueError
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ValueError from None
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ValueError
        (item, *_) = typing.get_args(tp) or (Any,)
        return [_convert(v, item) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if tp is float:
        # NaN and inf are refused everywhere: no option means "not a number" (lr=nan used to
        # train to a "diverged" directory, gamma=inf to a silent wrong run).
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError
    raise TypeError(f"unsupported option type {tp}")


def parse_options(cls: type, values: Mapping[str, Any], prefix: str, owner: str):
    """Build dataclass `cls` from `values`; unknown keys and bad types become one-line errors.

    `prefix` is how the user spells the keys (`method.`), `owner` names what they belong to
    (`method gap`).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            did_you_mean = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            allowed = ", ".join(fields) or "none"
            raise UserError(f"{prefix}{key} is not an option of {owner}{did_you_mean}; its options: {allowed}")
    kwargs = {}
    for key, value in values.items():
        try:
            kwargs[key] = _convert(value, hints[key])
        except ValueError:
            raise UserError(f"{prefix}{key}={value!r}: expected {_describe(hints[key])}") from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------- schemas
class Device(enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Progress(enum.Enum):
    auto = "auto"  # a tqdm bar only when stderr is a terminal
    bar = "bar"
    none = "none"


class Backend(enum.Enum):
    """How prunable layers compute during training (sparse/backend.py)."""

    masked = "masked"  # dense kernels on weights whose masked entries are zeros
    sparse = "sparse"  # sparse kernels where they pay: same masks and metrics within fp tolerance


class BackendLayers(enum.Enum):
    """Which prunable layers `backend=sparse` puts on the sparse path."""

    measured = "measured"  # timed once per run, dense against sparse, at the layer's final density
    all = "all"  # every layer that can (tests, benchmarks)


@dataclass
class RunOptions:
    """Top-level keys (the command-line contract, docs/design.md) and the trainer's own knobs."""

    sparsity: float = 0.9
    seed: int = 0
    epochs: int = 40
    batch_size: int = 128
    eval_batch_size: int = 1000
    label_smoothing: float = 0.0
    ece_bins: int = 15  # bins of the test-set expected calibration error (train.expected_calibration_error)
    device: Device = Device.auto
    amp: bool = False
    num_workers: int = 0
    results_root: str = "results"
    exp: str = "default"
    progress: Progress = Progress.auto
    powerprop: float = 1.0  # Powerpropagation alpha for the prunable weights; 1 = off
    dry_run: bool = False
    tensorboard: bool = False  # live scalars in <run dir>/tensorboard (needs the tensorboard extra)
    sparse_init: SparseInit = SparseInit.none  # rescale sparse layers' initial weights (sparse/initialisation.py)
    backend: Backend = Backend.masked  # sparse: sparse kernels during training (sparse/backend.py)
    backend_layers: BackendLayers = BackendLayers.measured
    rerun: bool = False  # true: train a completed run again (after a code change); its old results are replaced
    plugins: list[str] = field(default_factory=list)  # modules or .py files with your methods/models/datasets
    paper: dict | None = None  # published numbers an experiment preset shows beside ours


@dataclass
class SGDOptions:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4


@dataclass
class AdamOptions:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


class MarsVariant(enum.Enum):
    approx = "approx"  # g_{t-1}: the previous step's gradient (the official default, is_approx=True)
    exact = "exact"  # grad f(x_{t-1}, xi_t): the previous weights on this step's batch, a second pass


@dataclass
class MarsOptions(AdamOptions):
    """MARS-AdamW (mars.py), approximate or exact variant; defaults from the official code's optimizer."""

    lr: float = 3e-3
    beta1: float = 0.95
    beta2: float = 0.99
    gamma: float = 0.025  # weight of the gradient correction
    beta1_1d: float = 0.9  # vectors (biases, norms) take AdamW with these betas and weight decay
    beta2_1d: float = 0.95
    weight_decay_1d: float = 0.1
    kernels: bool = True  # conv kernels (>2-D) through MARS; false: AdamW, as the official code
    variant: MarsVariant = MarsVariant.approx


OPTIMIZERS = {"sgd": SGDOptions, "adam": AdamOptions, "adamw": AdamOptions, "mars": MarsOptions}


@dataclass
class ScheduleOptions:
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)  # epochs, multistep only
    gamma: float = 0.1
    min_lr: float = 0.0


SCHEDULES = ("constant", "multistep", "cosine")


@dataclass
class DistributionOptions:
    dense_first: bool = True
    dense_last: bool = True
    dense_layers: list[str] = field(default_factory=list)  # glob patterns of tensor names
    erk_power_scale: float = 1.0
    file: str | None = None  # custom allocation only
    # Sparsity type (sparse/structure.py): unstructured | nm (n of every m consecutive weights of
    # a row of the (out, in*k) matrix; sparsity must be 1 - n/m) | block (square block x block).
    structure: StructureKind = StructureKind.unstructured
    n: int = 2
    m: int = 4
    block: int = 16

    def sparsity_structure(self) -> SparsityStructure:
        return SparsityStructure(self.structure, self.n, self.m, self.block)


@dataclass
class Config:
    """A validated run: every group parsed; model/dataset options are checked by their registries."""

    run: RunOptions
    method: str
    method_options: Any
    model: str
    model_options: dict
    dataset: str
    dataset_options: dict  # data_dir, download and the dataset's own options
    distribution: str
    distribution_options: DistributionOptions
    optimizer: str
    optimizer_options: Any
    schedule: str
    schedule_options: ScheduleOptions


def _group(cfg: Mapping, key: str) -> tuple[str, dict]:
    node = cfg.get(key)
    if not isinstance(node, Mapping) or "name" not in node:
        raise UserError(f"{key} must be chosen from its config group (e.g. {key}=<name>), got {node!r}")
    options = {k: v for k, v in node.items() if k != "name"}
    return str(node["name"]), options


def _check_choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(value, list(allowed), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(f"{key}={value!r} is unknown{did_you_mean}; choose one of: {', '.join(allowed)}")


def _check_structure(d: DistributionOptions, distribution: str, method: str, method_cls, sparsity: float) -> None:
    """distribution.structure: a method that keeps it, and N:M's fixed density."""
    from sparsebench.methods import METHODS

    if d.structure is StructureKind.unstructured:
        return
    kind = d.structure.value
    if not method_cls.supports_structure:
        able = ", ".join(n for n in METHODS.names() if METHODS.get(n).supports_structure)
        raise UserError(
            f"distribution.structure={kind} is kept only by methods {able}; method {method} cannot keep it"
        )
    if d.structure is StructureKind.block and d.block < 1:
        raise UserError(f"distribution.block={d.block}: expected a positive block side")
    if d.structure is StructureKind.nm:
        if not 1 <= d.n < d.m:
            raise UserError(f"distribution.n={d.n}, distribution.m={d.m}: structure=nm needs 1 <= n < m")
        if abs(sparsity - (1.0 - d.n / d.m)) > 1e-9:
            raise UserError(
                f"distribution.structure=nm with n={d.n}, m={d.m} fixes sparsity at {1.0 - d.n / d.m:g}; "
                f"got sparsity={sparsity:g}"
            )
        if distribution != "uniform":
            raise UserError(
                f"distribution.structure=nm puts every sparse tensor at density n/m={d.n / d.m:g}, so it needs "
                f"distribution=uniform (got distribution={distribution})"
            )


SEED_MAX = 2**32 - 1  # NumPy's legacy seeding takes seeds in [0, 2^32)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def check_seed(seed: Any) -> int:
    """The one seed rule, for validate and for the seeds of a sweep checked on their own."""
    try:
        seed = _convert(seed, int)
    except ValueError:
        raise UserError(f"seed={seed!r}: expected an integer") from None
    _require(0 <= seed <= SEED_MAX, f"seed={seed}: expected an integer in [0, {SEED_MAX}]")
    return seed


def _check_run(run: RunOptions) -> None:
    _require(0.0 <= run.sparsity < 1.0, f"sparsity={run.sparsity}: expected a fraction of zeros in [0, 1)")
    for key in ("epochs", "batch_size", "eval_batch_size", "ece_bins"):
        _require(getattr(run, key) >= 1, f"{key}={getattr(run, key)}: expected a positive integer")
    _require(run.ece_bins <= 1000, f"ece_bins={run.ece_bins}: expected at most 1000 bins")
    check_seed(run.seed)
    _require(run.num_workers >= 0, f"num_workers={run.num_workers}: expected a non-negative integer")
    _require(run.powerprop >= 1.0, f"powerprop={run.powerprop}: expected alpha >= 1 (1 turns Powerpropagation off)")
    _require(0.0 <= run.label_smoothing < 1.0, f"label_smoothing={run.label_smoothing}: expected a value in [0, 1)")
    _check_exp(run.exp)
    _require(bool(run.results_root), "results_root='': expected a directory")
    if run.tensorboard:
        require_tensorboard()


def _check_exp(exp: str) -> None:
    """`exp` names a folder *inside* results_root: relative, and never climbing out of it."""
    parts = exp.replace(os.sep, "/").split("/")
    _require(
        bool(exp) and not os.path.isabs(exp) and ".." not in parts and "\0" not in exp,
        f"exp={exp!r}: expected a relative folder name inside results_root (no leading '/', no '..')",
    )


def _check_optimizer(name: str, o) -> None:
    _require(o.lr > 0, f"optimizer.lr={o.lr}: expected a positive learning rate")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}: expected a value >= 0")
    if isinstance(o, SGDOptions):
        _require(0 <= o.momentum < 1, f"optimizer.momentum={o.momentum}: expected a value in [0, 1)")
        _require(not o.nesterov or o.momentum > 0, "optimizer.nesterov=true needs optimizer.momentum > 0")
    else:
        betas = ("beta1", "beta2", "beta1_1d", "beta2_1d") if isinstance(o, MarsOptions) else ("beta1", "beta2")
        for key in betas:
            _require(0 <= getattr(o, key) < 1, f"optimizer.{key}={getattr(o, key)}: expected a value in [0, 1)")
        if isinstance(o, MarsOptions):
            _require(o.gamma >= 0, f"optimizer.gamma={o.gamma}: expected a value >= 0")
            _require(o.weight_decay_1d >= 0, f"optimizer.weight_decay_1d={o.weight_decay_1d}: expected a value >= 0")
        _require(o.eps > 0, f"optimizer.eps={o.eps}: expected a positive number")


def _check_schedule(s: ScheduleOptions, epochs: int, lr: float) -> None:
    _require(0 <= s.warmup_epochs < epochs,
             f"schedule.warmup_epochs={s.warmup_epochs}: expected a value in [0, epochs={epochs})")
    _require(0 < s.gamma <= 1, f"schedule.gamma={s.gamma}: expected a decay factor in (0, 1]")
    _require(0 <= s.min_lr <= lr, f"schedule.min_lr={s.min_lr}: expected a value in [0, optimizer.lr={lr}]")
    # Milestones past `epochs` are allowed: a preset shortened for a smoke run keeps its LR steps.
    _require(all(m >= 1 for m in s.milestones) and s.milestones == sorted(set(s.milestones)),
             f"schedule.milestones={s.milestones}: expected increasing epoch numbers >= 1")


def validate(cfg: Mapping) -> Config:
    """Validate a resolved config (a plain dict); raise UserError on the first bad value."""
    from sparsebench.methods import METHODS  # late: methods import the engine and torch

    groups = ("method", "model", "dataset", "distribution", "optimizer", "schedule")
    top = {k: v for k, v in cfg.items() if k not in groups}
    removed = [f.name for f in dataclasses.fields(RunOptions) if f.name not in top]
    if removed:  # `~sparsity` on the command line: every top-level key is part of the contract
        raise UserError(f"{removed[0]} was removed from the config (~{removed[0]}); it is required: give it a value")
    run = parse_options(RunOptions, top, "", "sparsebench train")
    _check_run(run)

    method, method_raw = _group(cfg, "method")
    if method not in METHODS:
        from sparsebench.search import SEARCHES

        if method in SEARCHES:
            raise UserError(f"method={method} is a search, not a training method: run `sparsebench search method={method} ...`")
    method_cls = METHODS.get(method)
    method_options = parse_options(method_cls.Options, method_raw, "method.", f"method {method}")

    distribution, dist_raw = _group(cfg, "distribution")
    _check_choice("distribution", distribution, ALLOCATIONS)
    dist_options = parse_options(DistributionOptions, dist_raw, "distribution.", f"distribution {distribution}")
    if (distribution == "custom") != (dist_options.file is not None):
        raise UserError("distribution.file is required by distribution=custom and used by no other distribution")
    _require(dist_options.erk_power_scale >= 0,
             f"distribution.erk_power_scale={dist_options.erk_power_scale}: expected a value >= 0")
    if distribution == "global" and not method_cls.supports_global_allocation:
        raise UserError(
            f"distribution=global picks layer densities from trained weights, but method {method} draws its "
            "masks at initialisation; use uniform, er, erk or custom"
        )
    _check_structure(dist_options, distribution, method, method_cls, run.sparsity)

    optimizer, opt_raw = _group(cfg, "optimizer")
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    optimizer_options = parse_options(OPTIMIZERS[optimizer], opt_raw, "optimizer.", f"optimizer {optimizer}")
    _check_optimizer(optimizer, optimizer_options)
    if isinstance(optimizer_options, MarsOptions) and optimizer_options.variant is MarsVariant.exact:
        _require(not run.amp, "optimizer.variant=exact with amp=true: the exact MARS pass runs in float32 only; "
                              "use amp=false or optimizer.variant=approx")
        _require(run.backend is Backend.masked, "optimizer.variant=exact with backend=sparse: the exact MARS pass "
                                                 "is not implemented on the sparse kernels; use backend=masked")
        _require(not method_cls.random_forward, f"optimizer.variant=exact with method={method}: its forward draws a "
                                                "random mask every step, which the exact pass at the previous weights "
                                                "would not see; use optimizer.variant=approx")

    schedule, sched_raw = _group(cfg, "schedule")
    _check_choice("schedule", schedule, SCHEDULES)
    schedule_options = parse_options(ScheduleOptions, sched_raw, "schedule.", f"schedule {schedule}")
    _check_schedule(schedule_options, run.epochs, optimizer_options.lr)

    model, model_raw = _group(cfg, "model")
    model_options = _factory_options("model", model, model_raw)
    dataset, dataset_raw = _group(cfg, "dataset")
    dataset_options = _factory_options("dataset", dataset, dataset_raw)
    return Config(
        run, method, method_options, model, model_options, dataset, dataset_options,
        distribution, dist_options, optimizer, optimizer_options, schedule, schedule_options,
    )


# Factory parameters that are not options: filled by the trainer, or common to every dataset.
_NOT_OPTIONS = ("input_shape", "num_classes")
_DATASET_COMMON = (("data_dir", str), ("download", bool))


@functools.lru_cache(maxsize=None)
def factory_options(factory) -> type:
    """A model's or dataset's options as a dataclass built from its factory's parameters (their
    annotations and defaults), so they are parsed and reported exactly like a method's `Options`:
    one mechanism and one error style for every group. The YAML files mirror these defaults
    (tests/test_config_defaults.py keeps them equal)."""
    hints = typing.get_type_hints(factory)
    fields = []
    for p in inspect.signature(factory).parameters.values():
        if p.name in _NOT_OPTIONS or p.name in dict(_DATASET_COMMON):
            continue
        if p.default is inspect.Parameter.empty:
            continue
        fields.append((p.name, hints.get(p.name, Any), dataclasses.field(default=p.default)))
    return dataclasses.make_dataclass(f"{factory.__name__.strip('_')}_options", fields)


def _factory_options(group: str, name: str, raw: Mapping) -> dict:
    from sparsebench.data import DATASETS
    from sparsebench.models import MODELS

    factory = (MODELS if group == "model" else DATASETS).get(name)
    common = {}
    if group == "dataset":  # data_dir and download belong to every dataset
        raw = dict(raw)
        for key, tp in _DATASET_COMMON:
            if key in raw:
                common[key] = parse_options(
                    dataclasses.make_dataclass("common", [(key, tp)]), {key: raw.pop(key)}, "dataset.", f"dataset {name}"
                ).__dict__[key]
    options = parse_options(factory_options(factory), raw, f"{group}.", f"{group} {name}")
    return {**common, **{k: v for k, v in options.__dict__.items() if k in raw}}
