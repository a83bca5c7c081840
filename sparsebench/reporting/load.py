"""Read a results tree into one pandas row per run.

A run directory is any directory holding `config.yaml` (the resolved Hydra config); `final.json`
appears once the run has ended and `metrics.jsonl` grows one line per evaluation. The path of a
run is never parsed: everything comes from its files.

A results tree may be junk (copied halfway, edited by hand, or planted), so reading it never
blocks, never expands without bound and never stops the report: nothing is unpickled; only
regular files are opened (a FIFO, device or directory in a file's place is refused before it is
opened, and a symbolic link is followed only to a regular file), each up to a size cap; YAML
anchors and aliases, which no config that sparsebench writes contains, are refused before any
object is built; and every config value the report uses is validated. A run that breaks any of
this is listed as failed, with a one-line problem naming the file and key, and the report goes on.
"""
from __future__ import annotations

import json
import math
import os
import stat
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
MASK_UPDATES_FILE = "mask_updates.jsonl"
BENCH_FILE = "bench.json"  # written beside final.json by `sparsebench bench RUN_DIR`

# libyaml parses the thousands of configs of a sweep several times faster than pure Python; even
# so, building the Python objects costs ~1 ms a config, hence the worker processes past this many.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RUNS_PER_WORKER = 500

# The most bytes read of each file. A resolved config is a few KiB and final.json grows with the
# model's layer count (about 50 bytes a layer); metrics.jsonl holds one line per evaluation, each
# with the densities of every layer, and mask_updates.jsonl one line per mask-changing step, each
# with the counts of every layer, so they get far more room.
_MiB = 1 << 20
CAPS = {
    CONFIG_FILE: 1 * _MiB, FINAL_FILE: 1 * _MiB, METRICS_FILE: 64 * _MiB, MASK_UPDATES_FILE: 64 * _MiB,
    BENCH_FILE: 1 * _MiB,
}
# A resolved config has well under a hundred settings a few levels deep; past these bounds a
# config is junk that would blow up runs.csv (one column per setting) or Python's recursion limit.
_MAX_SETTINGS = 2000
_MAX_DEPTH = 32
_MAX_NAME_CHARS = 200
_MAX_PROBLEM_CHARS = 300  # a problem is one cell of the health table
_SEED_RANGE = (0, 2**32 - 1)  # what the trainer's seeding accepts
# A completed run at or below this many points above chance (but never more than half the chance
# accuracy itself: a 1000-class task guesses at 0.1 %) learned nothing; it is averaged but flagged.
_CHANCE_MARGIN_PP = 1.0

OK, INCOMPLETE, FAILED, DIVERGED = "ok", "incomplete", "failed", "diverged"
DENSE = "dense"

IDENTITY_COLUMNS = ("dataset", "model", "method", "distribution", "sparsity", "seed")
NUMERIC_RESULTS = (
    "test_acc", "best_test_acc", "test_loss", "actual_sparsity", "train_flops",
    "train_flops_dense", "wall_time_s", "ece", "diverged_at_step", "chance_acc", "steps", "itop_rate",
    # Forward FLOPs of one example at the final masks and of the dense model (newer trainers only).
    "inference_flops", "inference_flops_dense",
)
# A completed run whose final accuracy or loss is NaN/inf diverged without saying so.
_MUST_BE_FINITE = ("test_acc", "best_test_acc", "test_loss")
# Top-level config keys that are no experiment setting: published numbers (read by
# published_accuracy) and Hydra's own output/launcher settings, which differ between every run.
_NOT_EXPERIMENT_SETTINGS = ("paper", "hydra")
# Columns the loader derives; every other column of the run table is a flattened config value.
# `problem` says why a run is not "ok", or, for an "ok" run, what is suspicious about it although
# it is averaged (final accuracy at chance level). The speedups come from bench.json, if any;
# `bench_problem` says why a bench.json beside a healthy run was not used.
BENCH_COLUMNS = (
    "inference_speedup", "inference_speedup_setting", "train_step_speedup", "train_step_setting", "bench_problem",
)
RESULT_COLUMNS = (
    "run", "state", "problem", "status", *NUMERIC_RESULTS, "flops_vs_dense", "inference_flops_vs_dense",
    *BENCH_COLUMNS, "paper_test_acc", "paper_source", "layer_densities", "code_version", "compute",
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


class _Unfinished(Exception):
    """A final.json that does not parse: torn by a copy still in progress, or by a full disk."""


def read_run(run_dir: Path, root: Path) -> dict:
    record = {"run": run_dir.relative_to(root).as_posix()}
    try:
        config = _read_config(run_dir / CONFIG_FILE)
        # A config key never overrides the loader's columns: a stray `test_acc:` in a config
        # must not pass for a result.
        record = {**config_columns(config), **record}
        record.update(published_accuracy(config, record["method"], record["sparsity"]))
        final = _read_final(run_dir / FINAL_FILE)
        if final is None:
            return {**record, "state": INCOMPLETE, "problem": _progress(run_dir, record.get("epochs"))}
        record.update(_results(final))
    except _Unfinished as problem:
        return {**record, "state": INCOMPLETE, "problem": _clip(str(problem))}
    except _Unusable as problem:
        return {**record, "state": FAILED, "problem": _clip(str(problem))}
    state, problem = _judge(final, record)
    if state == OK:
        bench = read_bench(run_dir)
        ratio = bench.pop("bench_flops_ratio", None)
        if ratio is not None and not math.isfinite(record["inference_flops_vs_dense"]):
            record["inference_flops_vs_dense"] = ratio  # measured on the run's own weights by `sparsebench bench`
        record.update(bench)
    return {**record, "state": state, "problem": problem}


def read_capped(path: Path) -> tuple[bytes, os.stat_result] | None:
    """The bytes of a run file (None if there is none) and its stat, within the file's size cap.

    Only a regular file is opened, and only after stat says so: opening a FIFO blocks until a
    writer comes, and /dev/zero never ends. O_NONBLOCK and a second look with fstat cover a file
    swapped in between, and reading stops one byte past the cap whatever st_size claimed (files
    under /proc report 0). Raises _Unusable, naming the file, for anything else.
    """
    name, cap = path.name, CAPS[path.name]
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise _Unusable(f"{name} is a symbolic link to nothing") from None
        return None
    except OSError as error:
        raise _Unusable(f"{name} unreadable: {error.strerror or error}") from None
    _check_regular(name, info, cap)
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None  # removed since the stat
    except OSError as error:
        raise _Unusable(f"{name} unreadable: {error.strerror or error}") from None
    try:
        info = os.fstat(descriptor)
        _check_regular(name, info, cap)
        chunks, left = [], cap + 1
        while left > 0:
            chunk = os.read(descriptor, min(left, _MiB))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as error:
        raise _Unusable(f"{name} unreadable: {error.strerror or error}") from None
    finally:
        os.close(descriptor)
    if left <= 0:
        raise _Unusable(f"{name} is larger than the {_size(cap)} a run's {name} may have")
    return b"".join(chunks), info


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _check_regular(name: str, info: os.stat_result, cap: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise _Unusable(f"{name} is not a regular file but {_file_kind(info.st_mode)}")
    if info.st_size > cap:
        raise _Unusable(f"{name} is {_size(info.st_size)}, over the {_size(cap)} a run's {name} may have")


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
    )
    return next((word for test, word in kinds if test(mode)), "a special file")


def _size(size: int) -> str:
    return f"{size / _MiB:.3g} MiB" if size >= _MiB else f"{size} bytes"


def _read_config(path: Path) -> dict:
    read = read_capped(path)
    if read is None:  # deleted since the directory walk found it
        raise _Unusable(f"{CONFIG_FILE} vanished while reading")
    data = read[0]
    try:
        _refuse_aliases(data)
        config = yaml.load(data, Loader=_YAML_LOADER)
    except _Unusable:
        raise
    # Not only YAMLError: the safe constructors let ValueError through for `2020-13-45` (a date)
    # or a 5,000-digit integer, and nesting past the recursion limit raises RecursionError.
    except Exception as error:  # noqa: BLE001 - junk in, one failed run out; never a crashed report
        raise _Unusable(f"{CONFIG_FILE} unreadable: {_one_line(error)}") from None
    if not isinstance(config, dict):
        raise _Unusable(f"{CONFIG_FILE} is not a mapping")
    return config


def _refuse_aliases(data: bytes) -> None:
    """Refuse YAML anchors and aliases, before any object is built.

    Even the safe loaders expand aliases, so 600 bytes of nested ones ("billion laughs") become
    millions of settings and a huge runs.csv. No config that sparsebench writes has any
    (OmegaConf.to_yaml writes none). Anchors start with & and aliases with *, in every encoding
    YAML allows, so configs without those bytes (nearly all) skip the scan and parse only once,
    in libyaml; the others are scanned as parser events, which builds nothing.
    """
    if b"*" not in data and b"&" not in data:
        return
    for event in yaml.parse(data, Loader=_YAML_LOADER):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Unusable(
                f"{CONFIG_FILE} uses YAML anchors or aliases, which sparsebench never writes; they are not expanded"
            )


EXPLICIT_NULL = "null"


def config_columns(config: dict) -> dict:
    """Flatten the config to dotted columns; `method: {name: rigl}` becomes the column `method`.

    Every value the report itself uses is validated as the trainer would have: a config that
    fails is junk (edited by hand, or never run), and the run is listed as failed.
    """
    columns: dict = {}
    _flatten(config, "", columns, 1)
    for key in RESULT_COLUMNS:
        columns.pop(key, None)
    missing = [key for key in ("dataset", "model", "method", "seed") if columns.get(key) is None]
    if missing:
        raise _Unusable(f"{CONFIG_FILE} lacks {', '.join(missing)}")
    if columns.get("distribution") is None:
        columns["distribution"] = "n/a"
    for key in ("dataset", "model", "method", "distribution"):
        name = columns[key]
        # One printable line: names head tables, titles and file names of plots.
        if not (isinstance(name, str) and name.strip() and name.isprintable() and len(name) <= _MAX_NAME_CHARS):
            raise _invalid(key, name, f"a name (one printable line of at most {_MAX_NAME_CHARS} characters)")
    columns["seed"] = _whole_number(columns, "seed", *_SEED_RANGE)
    if columns.get("epochs") is not None:
        columns["epochs"] = _whole_number(columns, "epochs", 1, None)
    if columns.get("powerprop") is not None:
        columns["powerprop"] = _real_number(columns, "powerprop", "a number >= 1", lambda alpha: alpha >= 1)
    columns["method"] = method_label(columns["method"], columns.get("powerprop"))
    # Dense runs are the baseline of every sparsity column, whatever their config says; a value
    # it does state must still be one the trainer would have accepted.
    if "sparsity" not in columns and columns["method"] != DENSE:
        raise _Unusable(f"{CONFIG_FILE} lacks sparsity")
    sparsity = 0.0
    if "sparsity" in columns:
        sparsity = _real_number(columns, "sparsity", "a fraction in [0, 1)", lambda value: 0 <= value < 1)
    if columns["method"] == DENSE:
        sparsity = 0.0
    columns["sparsity"] = round(sparsity, 6)  # 0.9 and 0.9000000001 are the same column
    # A setting written as null (`method.swa_start: null`) is a value like any other; only a
    # setting absent from the config (written before it existed) is unset (identity.py).
    return {key: EXPLICIT_NULL if value is None else value for key, value in columns.items()}


def _whole_number(columns: dict, key: str, low: int, high: int | None) -> int:
    value = columns[key]
    # bool is an int to Python, but `seed: true` is no seed.
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        wanted = f"a whole number in [{low}, {high}]" if high is not None else f"a whole number >= {low}"
        raise _invalid(key, value, wanted)
    return value


def _real_number(columns: dict, key: str, wanted: str, accept) -> float:
    value = columns[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(key, value, wanted)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        raise _invalid(key, value, wanted) from None
    if not math.isfinite(number) or not accept(number):
        raise _invalid(key, value, wanted)
    return number


def _invalid(key: str, value, wanted: str) -> _Unusable:
    return _Unusable(f"{CONFIG_FILE}: {key}={_show(value)} is not {wanted}")


def _show(value) -> str:
    """A value for a one-line message: repr, clipped (a junk value can be a megabyte long)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr (Python caps int-to-text at 4300 digits)
        return f"<a {value.bit_length()}-bit integer>"
    return text if len(text) <= 40 else f"{text[:37]}..."


def _flatten(node: dict, prefix: str, columns: dict, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Unusable(f"{CONFIG_FILE} nests deeper than {_MAX_DEPTH} levels")
    for key, value in node.items():
        if not prefix and key in _NOT_EXPERIMENT_SETTINGS:
            continue
        name = f"{prefix}{key}"
        if len(columns) >= _MAX_SETTINGS:
            raise _Unusable(f"{CONFIG_FILE} has more than {_MAX_SETTINGS} settings")
        if isinstance(value, dict):
            _flatten(value, f"{name}.", columns, depth + 1)
        elif key == "name" and prefix:
            columns[prefix[:-1]] = value
        elif value is None or isinstance(value, (str, int, float, bool)):
            columns[name] = value
        else:  # lists and dates stay comparable and groupable as text
            try:
                columns[name] = json.dumps(value, default=str)
            except (ValueError, RecursionError):  # circular (only aliases build that: refused) or too deep
                raise _Unusable(f"{CONFIG_FILE}: {name} cannot be written as text") from None


def published_accuracy(config: dict, method: str, sparsity: float) -> dict:
    """The experiment preset's published accuracy for this method and sparsity, if it states one."""
    paper = config.get("paper")
    if not isinstance(paper, dict):
        return {}
    published = paper.get("test_acc")
    by_sparsity = published.get(method) if isinstance(published, dict) else None
    if not isinstance(by_sparsity, dict):
        return {}
    source = paper.get("source")
    for key, value in by_sparsity.items():
        try:
            if round(float(key), 6) == sparsity:
                return {"paper_test_acc": float(value), "paper_source": source if isinstance(source, str) else None}
        except (TypeError, ValueError, OverflowError):
            continue
    return {}


def _read_final(path: Path) -> dict | None:
    read = read_capped(path)
    if read is None:
        return None
    try:
        final = json.loads(read[0])
    except RecursionError:
        raise _Unusable(f"{FINAL_FILE} nests too deeply to read") from None
    except ValueError as error:
        # The trainer renames a complete final.json into place, so a torn one was cut short
        # after the run, by a copy (scp, cp -r) still in progress or a full disk: the run has
        # no result yet, which is what incomplete says.
        raise _Unfinished(
            f"{FINAL_FILE} is not valid JSON ({_one_line(error)}): cut short, or still being copied?"
        ) from None
    if not isinstance(final, dict):
        raise _Unusable(f"{FINAL_FILE} is not a JSON object")
    return final


def _results(final: dict) -> dict:
    status = final.get("status")
    results = {"status": status if status is None or isinstance(status, str) else _show(status)}
    for field in NUMERIC_RESULTS:
        value = final.get(field)
        try:
            # JSON null stands for a NaN the trainer could not serialise.
            results[field] = math.nan if value is None else float(value)
        except (TypeError, ValueError, OverflowError):
            raise _Unusable(f"{FINAL_FILE}: {field} is not a number ({_show(value)})") from None
    densities = final.get("layer_densities")
    if densities is not None and not (
        isinstance(densities, dict)
        and all(isinstance(density, (int, float)) and not isinstance(density, bool) for density in densities.values())
    ):
        raise _Unusable(f"{FINAL_FILE}: layer_densities is not a mapping of layer names to numbers")
    results["layer_densities"] = densities
    results["code_version"] = _code_version(final.get("provenance"))
    results["compute"] = _compute(final.get("provenance"))
    results["flops_vs_dense"] = _ratio(results["train_flops"], results["train_flops_dense"])
    results["inference_flops_vs_dense"] = _ratio(results["inference_flops"], results["inference_flops_dense"])
    return results


def _code_version(provenance) -> str | None:
    """`0.1.0 1a2b3c4` (`-dirty` when the checkout had local changes), from final.json's
    provenance; None for runs written before provenance was recorded."""
    if not isinstance(provenance, dict):
        return None
    version, commit = provenance.get("sparsebench"), provenance.get("commit")
    text = " ".join(_printable(str(part)) for part in (version, commit[:7] if isinstance(commit, str) else None) if part)
    return (text + ("-dirty" if provenance.get("dirty") is True else "")) or None


def _compute(provenance) -> str | None:
    """`cpu, 1 thread, torch 2.14.1+cu130` from final.json's provenance: what sets the order of a
    run's floating-point sums, so the same seed and code give other numbers on another set-up
    (a different thread count is enough); None for runs written before provenance was recorded."""
    if not isinstance(provenance, dict) or provenance.get("device") is None:
        return None
    threads, ranks = provenance.get("threads"), provenance.get("world_size")
    parts = [_printable(str(provenance["device"]))]
    if isinstance(threads, int) and not isinstance(threads, bool):
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if isinstance(ranks, int) and not isinstance(ranks, bool) and ranks > 1:
        parts.append(f"{ranks} ranks")
    if provenance.get("torch") is not None:
        parts.append(f"torch {_printable(str(provenance['torch']))}")
    return ", ".join(parts)


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else math.nan  # NaN compares false: a missing whole gives NaN


def read_bench(run_dir: Path) -> dict:
    """The measured speedups of bench.json beside a finished run, or why they cannot be used.

    A bench.json that cannot be used never touches the run's results: its speedups are left
    out and `bench_problem` says why.
    """
    try:
        read = read_capped(run_dir / BENCH_FILE)
        if read is None:
            return {}
        try:
            bench = json.loads(read[0])
        except (ValueError, RecursionError):
            raise _Unusable(f"{BENCH_FILE} is not valid JSON") from None
        return bench_speedups(bench)
    except _Unusable as problem:
        return {"bench_problem": _clip(str(problem))}


BENCH_SCHEMA = "sparsebench.bench/1"


def bench_speedups(bench) -> dict:
    """The numbers the report shows from one bench.json; the only code that knows its layout.

    Reads the layout `sparsebench bench` documents as schema sparsebench.bench/1 (see bench.py):
    `formats: {name: {status, baseline, inference: [{batch, speedup, ...}]}}`,
    `training: {status, steps: {name: {status, speedup}}}` and `flops: {ratio}`; a speedup is the
    baseline's time over the format's (above 1: faster). Shown: the inference speedup of the best
    format at the largest batch size measured (throughput), named with its batch and, when not
    dense float32, its baseline; the training step of a sparse training backend if one was
    measured, else the masked step the trainer takes; and flops.ratio, the forward FLOPs at the
    run's densities over dense, where final.json has no inference FLOPs of its own.
    """
    if not isinstance(bench, dict):
        raise _Unusable(f"{BENCH_FILE} is not a JSON object")
    schema = bench.get("schema")
    if schema != BENCH_SCHEMA:
        raise _Unusable(f"{BENCH_FILE} has schema {_show(schema)}, not {BENCH_SCHEMA}, the one this report reads")
    found: dict = {}
    formats = _mapping(bench.get("formats", {}), "formats")
    measured = []
    for name, entry in formats.items():
        entry = _mapping(entry, f"formats.{name}")
        baseline = entry.get("baseline")
        if entry.get("status") != "ok" or name == baseline or str(name).startswith("dense"):
            continue  # skipped on this machine, or a baseline itself
        points = entry.get("inference", [])
        if not isinstance(points, list):
            raise _Unusable(f"{BENCH_FILE}: formats.{name}.inference is not a list")
        for index, point in enumerate(points):
            point = _mapping(point, f"formats.{name}.inference[{index}]")
            speedup = _speedup(point.get("speedup"), f"formats.{name}.inference[{index}].speedup")
            batch = point.get("batch")
            batch = batch if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else 0
            if speedup is not None:
                measured.append((batch, speedup, str(name), baseline))
    if measured:
        largest = max(batch for batch, _, _, _ in measured)
        _, speedup, name, baseline = max((m for m in measured if m[0] == largest), key=lambda m: m[1])
        setting = _printable(name) + (f", batch {largest}" if largest else "")
        if isinstance(baseline, str) and baseline != "dense":
            setting += f", against {_printable(baseline)}"
        found.update(inference_speedup=speedup, inference_speedup_setting=setting)
    training = bench.get("training")
    if training is not None:
        training = _mapping(training, "training")
        steps = _mapping(training.get("steps") or {}, "training.steps") if training.get("status") == "ok" else {}
        timed = {}
        for name, step in steps.items():
            step = _mapping(step, f"training.steps.{name}")
            if name != "dense" and step.get("status") == "ok":
                speedup = _speedup(step.get("speedup"), f"training.steps.{name}.speedup")
                if speedup is not None:
                    timed[str(name)] = speedup
        backends = {name: speedup for name, speedup in timed.items() if name != "masked"}
        chosen = max(backends.items(), key=lambda item: item[1]) if backends else (
            ("masked", timed["masked"]) if "masked" in timed else None)
        if chosen:
            found.update(train_step_speedup=chosen[1], train_step_setting=_printable(chosen[0]))
    flops = bench.get("flops")
    if isinstance(flops, dict) and flops.get("ratio") is not None:
        found["bench_flops_ratio"] = _speedup(flops["ratio"], "flops.ratio")
    return found


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Unusable(f"{BENCH_FILE}: {where} is not an object")
    return value


def _printable(name: str) -> str:
    return name if name.isprintable() and len(name) <= 40 else "?"


def _speedup(value, where: str) -> float | None:
    if value is None:
        return None  # not measured (a format the machine lacks)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise _Unusable(f"{BENCH_FILE}: {where}={_show(value)} is not a positive number")
    return float(value)


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
    return OK, _at_chance(record["test_acc"], record["chance_acc"])


def _at_chance(accuracy: float, chance: float) -> str:
    """A warning for an "ok" run that learned nothing, if the trainer said what guessing scores.

    Such a run stays averaged: a terrible config is still a result, so it is flagged, not hidden.
    """
    if not (math.isfinite(chance) and 0 < chance <= 100):
        return ""  # older runs write no chance_acc: no check
    if accuracy > chance + min(_CHANCE_MARGIN_PP, chance / 2):
        return ""
    return f"final accuracy at chance level ({accuracy:.2f} %, chance {chance:.2f} %)"


def _progress(run_dir: Path, epochs) -> str:
    """Where an unfinished run stopped, and how long ago it last wrote: running or killed?"""
    try:
        read = read_capped(run_dir / METRICS_FILE)
    except _Unusable as problem:
        return _clip(f"no final.json, and {problem}")
    if read is None:
        return "no final.json and no metrics yet"
    data, info = read
    age_s = time.time() - info.st_mtime
    last = _last_complete_line(data)
    if last is None:
        return "no final.json and no complete metrics line"
    of_epochs = f" of {epochs}" if epochs is not None else ""
    epoch = _show(last.get("epoch"))
    return _clip(f"no final.json; last evaluation at epoch {epoch}{of_epochs}, written {_age(age_s)} ago")


def _last_complete_line(data: bytes) -> dict | None:
    # A killed run can leave a torn last line: fall back to the last one that parses.
    for line in reversed(data.splitlines()):
        try:
            parsed = json.loads(line)
        except (ValueError, RecursionError):
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
    return _clip(" ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_PROBLEM_CHARS else f"{text[:_MAX_PROBLEM_CHARS - 3]}..."


def _jsonl_lines(path: Path) -> list[bytes]:
    try:
        read = read_capped(path)
    except _Unusable:
        read = None
    return [] if read is None else read[0].splitlines()  # a run without the file still has its final numbers


def load_curves(root: Path, runs: list[str]) -> pd.DataFrame:
    """Test accuracy and ITOP rate per evaluation of the given runs: columns run, epoch, test_acc, itop_rate."""
    rows = []
    for run in runs:
        for line in _jsonl_lines(root / run / METRICS_FILE):
            try:
                evaluation = json.loads(line)
                itop = evaluation.get("itop_rate")  # older runs log none
                rows.append((run, float(evaluation["epoch"]), float(evaluation["test_acc"]),
                             math.nan if itop is None else float(itop)))
            except (ValueError, KeyError, TypeError, OverflowError, RecursionError, AttributeError):
                continue  # torn, partial or junk line
    return pd.DataFrame(rows, columns=["run", "epoch", "test_acc", "itop_rate"])


def load_mask_updates(root: Path, runs: list[str]) -> pd.DataFrame:
    """One row per mask-changing step of the given runs: run, step, epoch, moved (weights dropped + grown)."""
    rows = []
    for run in runs:
        for line in _jsonl_lines(root / run / MASK_UPDATES_FILE):
            try:
                update = json.loads(line)
                moved = sum(float(counts["dropped"]) + float(counts["grown"]) for counts in update["layers"].values())
                rows.append((run, float(update["step"]), float(update["epoch"]), moved))
            except (ValueError, KeyError, TypeError, OverflowError, RecursionError, AttributeError):
                continue
    return pd.DataFrame(rows, columns=["run", "step", "epoch", "moved"])
