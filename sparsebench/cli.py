"""`sparsebench train|report`: the command-line dispatcher.

`train` hands its arguments to a `@hydra.main` function by rewriting sys.argv (Hydra reads
argv itself; no private Hydra API is used), so multirun, `--cfg job`, `--config-dir`, any
launcher and `torchrun -m sparsebench train` all work. Before that, every combination a sweep
would launch is composed with Hydra's compose API and validated, so a typo or a bad value ends
in one clear line and a non-zero exit before any job starts or any directory is written.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sparsebench.errors import UserError

USAGE = """usage: sparsebench <command> [arguments]

commands:
  train [overrides]   train one run (or a sweep with -m), e.g.
                      sparsebench train method=gap sparsity=0.9
                      sparsebench train -m method=gap,gmp,static seed=0,1,2
                      sparsebench train --cfg job        (show the composed config)
  report PATH         tables and plots from a results tree

`sparsebench train --help` lists the config groups and their options."""



def config_directory() -> str:
    """conf/ ships inside the wheel as sparsebench/conf; in a source checkout it sits beside
    the package. Looking for both by path (not pkg://) works however sparsebench was imported."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"sparsebench's configs are missing: looked in {package / 'conf'} and {package.parent / 'conf'}")


CONFIG_DIR = config_directory()
# Hydra flags that take a value (the value is the next argument unless written with '=').
FLAGS_WITH_VALUE = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp",
                    "--cfg", "-c", "--package", "-p", "--info", "--experimental-rerun"}
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "--version", "--shell-completion", "-sc"}
MAX_PREVALIDATED_JOBS = 1000


def fail(command: str, message: str) -> int:
    print(f"sparsebench {command}: error: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------- pre-validation
def split_arguments(args: list[str]) -> tuple[list[str], dict[str, str], bool]:
    """(overrides, flags with their values, multirun?) from a `train` argument list."""
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
        elif arg.startswith("-"):
            flags[arg] = ""
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags, multirun


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Every job's override list, as Hydra's basic sweeper would launch them."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.islice(itertools.product(*choices), MAX_PREVALIDATED_JOBS)]


def compose_config(overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """The job config Hydra would build for these overrides (hydra node excluded)."""
    extra = []
    if config_dir:
        extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*extra, *overrides])


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


def prevalidate(args: list[str]) -> None:
    from sparsebench.config import validate

    overrides, flags, multirun = split_arguments(args)
    config_dir = flags.get("--config-dir") or flags.get("-cd")
    jobs = expand_sweeps(overrides) if multirun else [overrides]
    for job in jobs:
        try:
            cfg = compose_config(job, config_dir)
            validate(resolve(cfg))
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(one_line(exc)) from None
        finally:
            GlobalHydra.instance().clear()


# ---------------------------------------------------------------------------- the Hydra task
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_train(cfg: DictConfig) -> None:
    from sparsebench.config import validate
    from sparsebench.train import train

    try:
        resolved = resolve(cfg)
        config = validate(resolved)
        train(config, resolved, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    except UserError as exc:
        print(f"sparsebench train: error: {exc}", file=sys.stderr)
        sys.exit(2)  # SystemExit passes through Hydra's exception reporting


def train_command(args: list[str]) -> int:
    _, flags, _ = split_arguments(args)
    if not INFO_FLAGS.intersection(flags):
        try:
            prevalidate(args)
        except UserError as exc:
            return fail("train", str(exc))
    sys.argv = [f"{Path(sys.argv[0]).name} train", *args]
    try:
        hydra_train()
    except SystemExit as exc:  # the task's one-line errors, and Hydra's own exits
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_command(rest)
    if command == "report":
        from sparsebench.report import main as report_main

        return report_main(rest)
    return fail(command, f"unknown command {command!r}; commands: train, report")


def entry_point() -> None:
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    sys.exit(main())
