"""Read a results tree into one pandas row per run.

A run directory is any directory holding `config.yaml` (the resolved Hydra config); `final.json`
appears once the run has ended and `metrics.jsonl` grows one line per evaluation. The path of a
run is never parsed: everything comes from its files.
"""
from __future__ import annotations

import json
import math
import os
import time
from functools import partial
from pathlib import Path

import pandas as pd
import yaml

from sparsebench.reporting.parallel import parallel_map
from sparsebench.results import method_label

CONFIG_FILE = "config.yaml"
FINAL_FILE = "final.json"
METRICS_FILE = "metrics.jsonl"

# libyaml parses the thousands of configs of a sweep several times faster than pure Python; even
# so, building the Python objects costs ~1 ms a config, hence the worker processes past this many.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RUNS_PER_WORKER = 500

OK, INCOMPLETE, FAILED, DIVERGED = "ok", "incomplete", "failed", "diverged"
DENSE = "dense"

IDENTITY_COLUMNS = ("dataset", "model", "method", "distribution", "sparsity", "seed")
NUMERIC_RESULTS = (
    "test_acc", "best_test_acc", "test_loss", "actual_sparsity", "train_flops",
    "train_flops_dense", "wall_time_s", "ece", "diverged_at_step",
)
# A completed run whose final accuracy or loss is NaN/inf diverged without saying so.
_MUST_BE_FINITE = ("test_acc", "best_test_acc", "test_loss")
# Top-level config keys that are no experiment setting: published numbers (read by
# published_accuracy) and Hydra's own output/launcher settings, which differ between every run.
_NOT_EXPERIMENT_SETTINGS = ("paper", "hydra")
# Columns the loader derives; every other column of the run table is a flattened config value.
RESULT_COLUMNS = (
    "run", "state", "problem", "status", *NUMERIC_RESULTS, "flops_vs_dense",
    "paper_test_acc", "paper_source", "layer_densities",
)


class _Unusable(Exception):
    """A run whose files cannot be read as the contract says; the message names the file."""


def find_run_dirs(root: Path, skip: Path) -> list[Path]:
    """Every directory under `root` holding a config.yaml, except inside `skip` and hidden dirs."""
    skip = skip.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if CONFIG_FILE in filenames:
            found.append(Path(dirpath))
            dirnames.clear()  # a run's own subfolders (checkpoints, .hydra) hold no further runs
            continue
        dirnames[:] = sorted(
            name for name in dirnames
            if not name.startswith(".") and not _is_same_dir(Path(dirpath, name), skip)
        )
    return sorted(found)


def _is_same_dir(candidate: Path, target: Path) -> bool:
    # Comparing names first keeps resolve() (several syscalls) off the hot path of big trees.
    return candidate.name == target.name and candidate.resolve() == target


def load_runs(root: Path, skip: Path, jobs: int = 1) -> pd.DataFrame:
    """One row per run directory: identity, flattened config, results and health state."""
    records = parallel_map(partial(read_run, root=root), find_run_dirs(root, skip), _RUNS_PER_WORKER, jobs)
    runs = pd.DataFrame.from_records(records)
    leading = [*RESULT_COLUMNS[:3], *IDENTITY_COLUMNS, *RESULT_COLUMNS[3:]]
    trailing = sorted(column for column in runs.columns if column not in leading)
    runs = runs.reindex(columns=leading + trailing)
    # Runs with an unreadable config have no seed; the others' seeds must stay integers.
    runs["seed"] = runs["seed"].astype("Int64")
    return runs


def read_run(run_dir: Path, root: Path) -> dict:
    record = {"run": run_dir.relative_to(root).as_posix()}
    try:
        config = _read_config(run_dir / CONFIG_FILE)
        record = {**config_columns(config), **record}  # a config key never overrides the loader's columns
        record.update(published_accuracy(config, record["method"], record["sparsity"]))
        final = _read_final(run_dir / FINAL_FILE)
        if final is None:
            return {**record, "state": INCOMPLETE, "problem": _progress(run_dir, record.get("epochs"))}
        record.update(_results(final))
    except _Unusable as problem:
        return {**record, "state": FAILED, "problem": str(problem)}
    state, problem = _judge(final, record)
    return {**record, "state": state, "problem": problem}


def _read_config(path: Path) -> dict:
    try:
        config = yaml.load(path.read_bytes(), Loader=_YAML_LOADER)
    except (OSError, yaml.YAMLError) as error:
        raise _Unusable(f"{CONFIG_FILE} unreadable: {_one_line(error)}") from None
    if not isinstance(config, dict):
        raise _Unusable(f"{CONFIG_FILE} is not a mapping")
    return config


def config_columns(config: dict) -> dict:
    """Flatten the config to dotted columns; `method: {name: rigl}` becomes the column `method`."""
    columns: dict = {}
    _flatten(config, "", columns)
    missing = [key for key in ("dataset", "model", "method", "seed") if columns.get(key) is None]
    if missing:
        raise _Unusable(f"{CONFIG_FILE} lacks {', '.join(missing)}")
    for key in ("dataset", "model", "method"):
        columns[key] = str(columns[key])
    columns["method"] = method_label(columns["method"], columns.get("powerprop"))
    columns.setdefault("distribution", "n/a")
    try:
        columns["seed"] = int(columns["seed"])
        # Dense runs are the baseline of every sparsity column, whatever their config says.
        sparsity = 0.0 if columns["method"] == DENSE else float(columns["sparsity"])
    except (KeyError, TypeError, ValueError):
        raise _Unusable(f"{CONFIG_FILE} lacks a numeric seed or sparsity") from None
    columns["sparsity"] = round(sparsity, 6)  # 0.9 and 0.9000000001 are the same column
    return columns


def _flatten(node: dict, prefix: str, columns: dict) -> None:
    for key, value in node.items():
        if not prefix and key in _NOT_EXPERIMENT_SETTINGS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, f"{name}.", columns)
        elif key == "name" and prefix:
            columns[prefix[:-1]] = value
        elif value is None or isinstance(value, (str, int, float, bool)):
            columns[name] = value
        else:  # lists and dates stay comparable and groupable as text
            columns[name] = json.dumps(value, default=str)


def published_accuracy(config: dict, method: str, sparsity: float) -> dict:
    """The experiment preset's published accuracy for this method and sparsity, if it states one."""
    paper = config.get("paper")
    if not isinstance(paper, dict):
        return {}
    published = paper.get("test_acc")
    by_sparsity = published.get(method) if isinstance(published, dict) else None
    if not isinstance(by_sparsity, dict):
        return {}
    for key, value in by_sparsity.items():
        try:
            if round(float(key), 6) == sparsity:
                return {"paper_test_acc": float(value), "paper_source": paper.get("source")}
        except (TypeError, ValueError):
            continue
    return {}


def _read_final(path: Path) -> dict | None:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _Unusable(f"{FINAL_FILE} unreadable: {error.strerror}") from None
    try:
        final = json.loads(text)
    except ValueError as error:
        raise _Unusable(f"{FINAL_FILE} is not valid JSON ({_one_line(error)})") from None
    if not isinstance(final, dict):
        raise _Unusable(f"{FINAL_FILE} is not a JSON object")
    return final


def _results(final: dict) -> dict:
    results = {"status": final.get("status"), "layer_densities": final.get("layer_densities")}
    for field in NUMERIC_RESULTS:
        value = final.get(field)
        try:
            # JSON null stands for a NaN the trainer could not serialise.
            results[field] = math.nan if value is None else float(value)
        except (TypeError, ValueError):
            raise _Unusable(f"{FINAL_FILE}: {field} is not a number ({value!r})") from None
    flops, dense_flops = results["train_flops"], results["train_flops_dense"]
    results["flops_vs_dense"] = flops / dense_flops if dense_flops > 0 else math.nan
    return results


def _judge(final: dict, record: dict) -> tuple[str, str]:
    status = final.get("status")
    if status == "diverged":
        step = record.get("diverged_at_step")
        return DIVERGED, f"diverged at step {step:.0f}" if math.isfinite(step) else "diverged"
    if status != "completed":
        return FAILED, f"{FINAL_FILE} has unknown status {status!r}"
    if "test_acc" not in final:
        return FAILED, f"{FINAL_FILE} lacks test_acc"
    non_finite = [field for field in _MUST_BE_FINITE if field in final and not math.isfinite(record[field])]
    if non_finite:
        return DIVERGED, f"completed with non-finite {', '.join(non_finite)}"
    return OK, ""


def _progress(run_dir: Path, epochs) -> str:
    """Where an unfinished run stopped, and how long ago it last wrote: running or killed?"""
    path = run_dir / METRICS_FILE
    try:
        age_s = time.time() - path.stat().st_mtime
        last = _last_complete_line(path.read_bytes())
    except OSError:
        return "no final.json and no metrics yet"
    if last is None:
        return "no final.json and no complete metrics line"
    of_epochs = f" of {epochs}" if epochs is not None else ""
    return f"no final.json; last evaluation at epoch {last.get('epoch')}{of_epochs}, written {_age(age_s)} ago"


def _last_complete_line(data: bytes) -> dict | None:
    # A killed run can leave a torn last line: fall back to the last one that parses.
    for line in reversed(data.splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            return parsed
    return None


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def _one_line(error: Exception) -> str:
    # YAML errors span several lines (what, where, why); a health table cell holds one.
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def load_curves(root: Path, runs: list[str]) -> pd.DataFrame:
    """Test accuracy per evaluation of the given runs: columns run, epoch, test_acc."""
    rows = []
    for run in runs:
        try:
            data = (root / run / METRICS_FILE).read_bytes()
        except OSError:
            continue  # a run without curves still has its final numbers
        for line in data.splitlines():
            try:
                evaluation = json.loads(line)
                rows.append((run, float(evaluation["epoch"]), float(evaluation["test_acc"])))
            except (ValueError, KeyError, TypeError):
                continue  # torn or partial line
    return pd.DataFrame(rows, columns=["run", "epoch", "test_acc"])
