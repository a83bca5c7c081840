"""`sparsebench train|report`: the command-line dispatcher.

`train` hands its arguments to a `@hydra.main` function by rewriting sys.argv (Hydra reads
argv itself; no private Hydra API is used), so multirun, `--cfg job`, `--config-dir`, any
launcher and `torchrun -m sparsebench train` all work. Before that, every combination a sweep
would launch is composed with Hydra's compose API and validated, so a typo or a bad value ends
in one clear line and a non-zero exit before any job starts or any directory is written.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparsebench import interrupts, plugins, results
from sparsebench.config_files import config_directory
from sparsebench.errors import RunInterrupted, UserError

USAGE = """usage: sparsebench <command> [arguments]

commands:
  train [overrides]   train one run (or a sweep with -m), e.g.
                      sparsebench train method=gap sparsity=0.9
                      sparsebench train -m method=gap,gmp,static seed=0,1,2
                      sparsebench train --cfg job        (show the composed config)
  search method=random_search|evopress|dass [overrides]
                      a search (resumable, sweepable like train), e.g.
                      sparsebench search method=evopress sparsity=0.9
                      sparsebench search -m method=random_search sparsity=0.5,0.75,0.9 seed=0,1,2
  report PATH         tables and plots from a results tree
  status PATH | [search] [-m] OVERRIDES
                      which runs are done, running, resumable or missing (trains nothing)
  export RUN_DIR --format csr|bsr|semi_structured [--block N] [--out PATH]
                      a finished run's model as real torch sparse tensors
  bench RUN_DIR       dense against every available sparse backend: latency,
                      throughput, a training step, memory, bytes on disk
  bench model=mlp sparsity=0.9 [distribution.structure=block]   (no run needed)

`sparsebench train --help` lists the config groups and their options."""


CONFIG_DIR = config_directory()
# Hydra flags that take a value (the value is the next argument unless written with '=').
FLAGS_WITH_VALUE = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp",
                    "--cfg", "-c", "--package", "-p", "--info", "--experimental-rerun"}
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "--version", "--shell-completion", "-sc"}
OTHER_FLAGS = {"--run", "-r", "--resolve"}


def fail(command: str, message: str) -> int:
    print(f"sparsebench {command}: error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------- pre-validation
def split_arguments(args: list[str]) -> tuple[list[str], dict[str, str], bool]:
    """(overrides, flags with their values, multirun?) from a `train` argument list.

    Flags may come before or after the overrides (Hydra's argparse accepts both); a flag Hydra
    does not know is refused here by name instead of by argparse's usage block.
    """
    overrides, flags, multirun = [], {}, False
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_value, value = arg.partition("=")
        if arg in ("-m", "--multirun"):
            multirun = True
        elif name in FLAGS_WITH_VALUE:
            if not has_value and i + 1 < len(args) and not args[i + 1].startswith("-"):
                i += 1
                value = args[i]
            flags[name] = value
        elif name in INFO_FLAGS or name in OTHER_FLAGS:
            flags[name] = value
        elif arg.startswith("-") and not arg.startswith("~"):
            raise UserError(
                f"unknown flag {arg!r}; sparsebench train takes key=value overrides and Hydra's flags "
                "(-m, --cfg job, --config-dir DIR, --help)"
            )
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags, multirun


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's parse of the overrides, with its lexer errors turned into one line a user can act on."""
    return [_parse_override(text) for text in overrides]


@functools.lru_cache(maxsize=65536)  # a sweep's jobs share most of their override strings
def _parse_override(text: str):
    try:
        (parsed,) = OverridesParser.create().parse_overrides([text])
        return parsed
    except HydraException:
        if "=" not in text:
            raise UserError(
                f"{text!r} is not a key=value override; a value with spaces must be quoted as one "
                f"argument, e.g. 'exp=my run'"
            ) from None
        key = text.split("=", 1)[0]
        raise UserError(
            f"cannot parse the value of {key!r} in {text!r}: quote values holding spaces, newlines or "
            "special characters (key='a value') or fix the syntax"
        ) from None


def expand_sweeps(overrides: list[str]) -> Iterator[list[str]]:
    """Every job's override list, as Hydra's basic sweeper would launch them (all of them, lazily)."""
    choices = []
    for override in parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return (list(combo) for combo in itertools.product(*choices))


def compose_config(overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """The job config Hydra would build for these overrides (hydra node excluded)."""
    extra = []
    if config_dir:
        extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=[*extra, *overrides])
    finally:
        GlobalHydra.instance().clear()


class JobComposer:
    """Composes the configs of a sweep, thousands of jobs in seconds.

    A Hydra compose costs about 0.1 s, so a 10 000-job sweep would take 15 minutes to check.
    Jobs differ mostly in plain values (seed, sparsity, method.kappa), which Hydra applies after
    composing the defaults with exactly `OmegaConf.update(cfg, key, value, merge=True)`. So each
    distinct set of *structural* overrides (config groups, `+`/`~`/`++`, hydra keys) is composed
    once, and a job's plain values are applied to a copy in the same way. Anything the fast path
    cannot apply is composed by Hydra itself, so its errors and results stay Hydra's.
    """

    def __init__(self, config_dir: str | None):
        self.config_dir = config_dir
        self.bases: dict[tuple[str, ...], DictConfig] = {}
        self.groups: set[str] | None = None

    def _is_structural(self, override) -> bool:
        key = override.key_or_group
        return (
            override.is_add() or override.is_force_add() or override.is_delete() or override.package is not None or "/" in key
            or key.startswith("hydra.") or key in self.groups
        )

    def compose(self, job: list[str]) -> DictConfig:
        if self.groups is None:  # the config groups of this config tree: method, model, ...
            self.groups = set(compose_hydra_choices(self.config_dir))
        parsed = parse_overrides(job)
        structural = tuple(o.input_line for o in parsed if self._is_structural(o))
        if structural not in self.bases:
            self.bases[structural] = compose_config(list(structural), self.config_dir)
        cfg = copy.deepcopy(self.bases[structural])
        try:
            for override in parsed:
                if not self._is_structural(override):
                    OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        except OmegaConfBaseException:
            return compose_config(job, self.config_dir)  # Hydra's own message for this job
        return cfg


def compose_hydra_choices(config_dir: str | None) -> list[str]:
    """Names of the config groups chosen in the defaults list (method, model, hydra/launcher, ...)."""
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=extra, return_hydra_config=True)
            return list(cfg.hydra.runtime.choices.keys())
    finally:
        GlobalHydra.instance().clear()


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines (hints, full_key, object_type): make one."""
    cause = exc.__cause__ or exc
    text = str(cause).strip() or cause.__class__.__name__
    if "is not in struct" in text:
        full_key = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "full_key:" in line), "?")
        return f"unknown key {full_key!r}: no such option (`sparsebench train --cfg job` lists every key)"
    return str(exc).strip().splitlines()[0].replace("In 'config': ", "")


def resolve(cfg: DictConfig) -> dict:
    """Plain dict with interpolations resolved; runs that ignore `sparsity` are stored at 0."""
    from sparsebench.methods import METHODS

    resolved = OmegaConf.to_container(cfg, resolve=True)
    method = resolved.get("method")
    if isinstance(method, dict) and method.get("name") in METHODS and not METHODS.get(method["name"]).uses_sparsity:
        resolved["sparsity"] = 0.0
    return resolved


def check_results_root(root: str) -> None:
    """The results root must be (or become) a writable directory; checked before Hydra creates
    a sweep folder in it, which would otherwise end in a Hydra traceback."""
    path = Path(root).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"results_root={root}: {path} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"results_root={root}: cannot create or write {path} ({existing} is not a writable directory)")


def prevalidate(args: list[str], command: str = "train") -> set[Path]:
    """Compose, validate and dry-build every job of the command before any job starts.

    The dry build (train.check_run) makes the model on PyTorch's meta device, so it costs no
    memory; the data, the engine and the method are built as a job would build them, so options
    that depend on the model (GaP's kappa) fail here. Jobs that differ only in their seed share
    one dry build, and a job that differs from a checked one only in its seed needs only its
    seed checked, so a sweep over thousands of seeds is checked in seconds.
    """
    from sparsebench.config import check_seed, validate
    from sparsebench.train import check_run

    overrides, flags, multirun = split_arguments(args)
    config_dir = flags.get("--config-dir") or flags.get("-cd")
    if config_dir is not None and not Path(config_dir).is_dir():
        raise UserError(f"--config-dir {config_dir!r}: no such directory")
    # `--cfg job` only prints the composed config: values are checked, but nothing is built, so
    # a preset can be read on a machine without its dataset.
    printing_only = "--cfg" in flags or "-c" in flags
    composer = JobComposer(config_dir)
    checked_roots: set[str] = set()
    built: set[str] = set()
    data_cache: dict = {}
    checked_jobs: set[tuple[str, ...]] = set()
    sweep_roots: set[Path] = set()
    for job in expand_sweeps(overrides) if multirun else [overrides]:
        seeds = [o for o in job if o.startswith("seed=")]
        other = tuple(o for o in job if not o.startswith("seed="))
        if seeds and other in checked_jobs:
            text = seeds[-1].partition("=")[2]
            check_seed(int(text) if text.isdigit() else _parse_override(seeds[-1]).value())
            continue
        checked_jobs.add(other)
        try:
            resolved = resolve(composer.compose(job))
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(one_line(exc)) from None
        for config, arm in _runs_to_check(resolved, command, validate):
            sweep_roots.add(Path(config.run.results_root) / config.run.exp / ".multirun")
            if config.run.results_root not in checked_roots:
                check_results_root(config.run.results_root)
                checked_roots.add(config.run.results_root)
            build_key = json.dumps({k: v for k, v in arm.items() if k != "seed"}, sort_keys=True, default=str)
            if not config.run.rerun and results.is_complete(results.run_dir(arm)):
                continue  # a finished run is skipped by the job without being built: no dry build either
            if build_key not in built and not printing_only:
                check_run(config, data_cache)
                built.add(build_key)
    return sweep_roots


def _runs_to_check(resolved: dict, command: str, validate) -> list[tuple]:
    """(Config, resolved) of what a job will build: the run itself for `train`; for `search`,
    its training keys and the arms it trains first (the arms after it read the search's output,
    which does not exist yet: their options are validated, their models built when they start)."""
    if command == "train":
        return [(validate(resolved), resolved)]
    from sparsebench.search import plan_search
    from sparsebench.search.base import training_view

    plan = plan_search(resolved)
    return [(plan.search.cfg, training_view(resolved)), *plan.arms_before]


# ---------------------------------------------------------------------------- the Hydra task
def run_job(cfg: DictConfig) -> None:
    """One job: plug-ins, resolve, validate, train. Raises UserError / RunInterrupted."""
    from sparsebench.config import validate
    from sparsebench.train import train

    plugins.load(cfg.get("plugins") or [])  # again in this job's process (a launcher may have started it)
    resolved = resolve(cfg)
    config = validate(resolved)
    train(config, resolved, OmegaConf.to_yaml(OmegaConf.create(resolved)))


def run_search_job(cfg: DictConfig) -> None:
    """One search job (sparsebench/search/job.py). Raises UserError / RunInterrupted."""
    from sparsebench.search.job import run_search

    plugins.load(cfg.get("plugins") or [])
    run_search(resolve(cfg))


JOBS = {"train": run_job, "search": run_search_job}


def _hydra_task(command: str, cfg: DictConfig) -> None:
    try:
        JOBS[command](cfg)
    except RunInterrupted as exc:
        print(f"sparsebench {command}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except UserError as exc:
        print(f"sparsebench {command}: error: {exc}", file=sys.stderr)
        sys.exit(2)  # SystemExit passes through Hydra's exception reporting


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_train(cfg: DictConfig) -> None:
    _hydra_task("train", cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_search(cfg: DictConfig) -> None:
    _hydra_task("search", cfg)


HYDRA_APPS = {"train": hydra_train, "search": hydra_search}


def is_single_plain_run(overrides: list[str], flags: dict[str, str], multirun: bool) -> bool:
    """One run with no Hydra flag and no hydra.* setting: composed once by sparsebench and
    trained in this process; Hydra's app (a second composition, its logging set-up) adds nothing."""
    plain_flags = set(flags) <= {"--config-dir", "-cd"}
    return not multirun and plain_flags and not any(o.lstrip("+~").startswith("hydra") for o in overrides)


SEARCH_HELP = (
    "sparsebench search: a search (method=random_search|evopress|dass) as a resumable job; training keys "
    "apply to the runs it trains (docs/search.md).\n"
    "  sparsebench search method=evopress sparsity=0.9\n"
    "  sparsebench search -m method=random_search sparsity=0.5,0.75,0.9 seed=0,1,2\n"
    "Any key below is set with key=value (method.generations=50), a group with group=option."
)


def train_command(args: list[str], command: str = "train") -> int:
    """`sparsebench train ...`, and `sparsebench search ...` (command="search"), which composes
    the same config tree and runs through the same Hydra machinery (sweeps, launchers)."""
    try:
        overrides, flags, multirun = split_arguments(args)
        plugins.load(plugins.from_overrides(overrides))  # before composing: method=<a plug-in's> must compose
        if is_single_plain_run(overrides, flags, multirun):
            return _train_single(overrides, flags.get("--config-dir") or flags.get("-cd"), command)
        sweep_roots = set() if INFO_FLAGS.intersection(flags) else prevalidate(args, command)
    except UserError as exc:
        return fail(command, str(exc))
    if command == "search" and {"--help", "-h"} & set(flags):
        args = [*args, f"hydra.help.header='{SEARCH_HELP}'"]
    sys.argv = [f"{Path(sys.argv[0]).name} {command}", *args]
    try:
        HYDRA_APPS[command]()
    except SystemExit as exc:  # the task's one-line errors, and Hydra's own exits
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        remove_empty_job_folders(sweep_roots)
    return 0


def remove_empty_job_folders(sweep_roots: set[Path]) -> None:
    """Hydra makes a folder per job of a sweep (`.multirun/<time>/<n>/`); sparsebench writes into
    its own run directories, so those stay empty unless a launcher logged into them: remove the
    empty ones (multirun.yaml and submitit's logs stay)."""
    for root in sweep_roots:
        for job in root.glob("*/*"):
            if job.is_dir() and not any(job.iterdir()):
                job.rmdir()


def _train_single(overrides: list[str], config_dir: str | None, command: str = "train") -> int:
    """A single run: its config composed once, its model built once (train() builds and checks
    everything before any directory exists, which is what pre-validation guarantees for sweeps)."""
    if config_dir is not None and not Path(config_dir).is_dir():
        raise UserError(f"--config-dir {config_dir!r}: no such directory")
    parse_overrides(overrides)  # Hydra's lexer errors as one line
    try:
        cfg = compose_config(overrides, config_dir)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(one_line(exc)) from None
    if isinstance(cfg.get("results_root"), str):
        check_results_root(cfg.results_root)
    try:
        JOBS[command](cfg)
    except RunInterrupted as exc:
        print(f"sparsebench {command}: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    with interrupts.signals_as_exceptions():
        try:
            if command in ("train", "search"):
                return train_command(rest, command)
            if command == "status":
                from sparsebench.sweep_status import main as status_main

                return status_main(rest)
            if command == "report":
                from sparsebench.report import main as report_main

                return report_main(rest)
            if command == "export":
                from sparsebench.export import main as export_main

                return export_main(rest)
            if command == "bench":
                from sparsebench.bench import main as bench_main

                return bench_main(rest)
        except (KeyboardInterrupt, interrupts.Terminated) as exc:  # outside a run's training loop
            code = interrupts.exit_code(exc)
            print(f"sparsebench {command}: interrupted ({interrupts.signal_name(exc)}); nothing was left half-written",
                  file=sys.stderr)
            return code
    return fail(command, f"unknown command {command!r}; commands: train, search, report, status, export, bench")


def entry_point() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.exit(main())
