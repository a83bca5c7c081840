"""Run directories and the files in them: atomic writes, tolerant reads, one process per run.

Layout (docs/design.md contract): results_root/exp/<dataset>/<model>/<method>/sparsity=<s>/seed=<k>-<hash>/
holding config.yaml, metrics.jsonl, mask_updates.jsonl, checkpoint.pt (while running), model.pt
and final.json.
The hash covers the whole resolved config except keys that do not change the result (where
results go, how progress is shown), so two differing configs never share a directory and the
same config always maps to the same one: finished runs are skipped, half-done ones resumed.
This module never imports models; torch appears only to save tensors.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sparsebench.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
MASK_UPDATES_FILE = "mask_updates.jsonl"
FINAL_FILE = "final.json"
MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = ".lock"
MAX_FINAL_BYTES = 1 << 20  # a final.json is a few kB; anything larger is not one of ours

# Keys that say where or how a run is shown, not what it computes.
NON_SEMANTIC_KEYS = (
    "results_root", "exp", "progress", "num_workers", "paper", "dry_run", "tensorboard", "plugins", "rerun",
)
NON_SEMANTIC_DATASET_KEYS = ("data_dir", "download")
# Searches with a run directory of their own (search/): it holds what they found, no trained
# model, so reports keep them out of the accuracy tables. Named here, not imported from the
# search registry, so that reading a results tree never imports torch (a test keeps them equal).
SEARCH_DIRECTORY_METHODS = ("dass", "evopress")
SEARCH_STATE_FILE = "search_state.pt"  # a search's checkpoint of its own work (search/base.py)


def overwrites_run_file(target: Path) -> bool:
    """Whether writing `target` would replace a file a run directory owns (its model, final.json,
    config, metrics, checkpoint): `export`/`bench --out` must never break the run they read."""
    own = (CONFIG_FILE, METRICS_FILE, MASK_UPDATES_FILE, FINAL_FILE, MODEL_FILE, CHECKPOINT_FILE, LOCK_FILE,
           SEARCH_STATE_FILE)
    return Path(target).name in own and (Path(target).parent / CONFIG_FILE).exists()


# Keys added after results were first published, with the value that reproduces the earlier
# behaviour: at that value they stay out of the hash, so adding such a key never moves the
# directories of existing runs (they are still found, skipped or resumed). A new key whose
# neutral value gives the old results belongs here.
HASH_NEUTRAL = {"backend": "masked", "ece_bins": 15}
# Keys that only matter together with another one: left out while it has its neutral value.
HASH_DEPENDENT = {"backend_layers": "backend"}


def config_hash(resolved: Mapping) -> str:
    semantic = {
        k: v for k, v in resolved.items()
        if k not in NON_SEMANTIC_KEYS
        and not (k in HASH_NEUTRAL and v == HASH_NEUTRAL[k])
        and not (k in HASH_DEPENDENT and resolved.get(HASH_DEPENDENT[k]) == HASH_NEUTRAL[HASH_DEPENDENT[k]])
    }
    if isinstance(semantic.get("dataset"), Mapping):
        semantic["dataset"] = {
            k: v for k, v in semantic["dataset"].items() if k not in NON_SEMANTIC_DATASET_KEYS
        }
    canonical = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def method_label(method: str, powerprop: float | None) -> str:
    """`gmp`, or `gmp+powerprop2` when Powerpropagation wraps the method."""
    return method if powerprop in (None, 1, 1.0) else f"{method}+powerprop{powerprop:g}"


def run_dir(resolved: Mapping) -> Path:
    """The run's directory, always inside results_root (config.validate refuses an `exp` that
    would leave it; checked again here because a wrong path would write over someone's files)."""
    sparsity = resolved["sparsity"]
    root = Path(resolved["results_root"])
    path = (
        root
        / resolved["exp"]
        / resolved["dataset"]["name"]
        / resolved["model"]["name"]
        / method_label(resolved["method"]["name"], resolved.get("powerprop"))
        / f"sparsity={sparsity:g}"
        / f"seed={resolved['seed']}-{config_hash(resolved)}"
    )
    if os.path.commonpath([os.path.normpath(root.absolute()), os.path.normpath(path.absolute())]) != os.path.normpath(root.absolute()):
        raise UserError(f"exp={resolved['exp']!r}: the run directory {path} would lie outside results_root={root}")
    return path


# ---------------------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary file in the same directory, flush, fsync, rename: readers see all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: Path, obj) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _json_safe(obj):
    """NaN/inf are not JSON: store them as null so every reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- metrics.jsonl
def append_jsonl(path: Path, obj) -> None:
    """One line per record, fsynced: a crash can tear at most the last line."""
    with open(path, "a") as f:
        f.write(json.dumps(_json_safe(obj), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """All complete records. A line that is not a JSON object (torn by a kill, garbled on disk)
    is skipped wherever it is: one bad line must not make a run unresumable or unreportable."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, and numbers too long to convert
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def truncate_jsonl(path: Path, key: str, last: int) -> None:
    """On resume, keep only records with record[key] <= last (later ones will be redone);
    unreadable lines are dropped, so the file is repaired as a side effect."""
    kept = [r for r in read_jsonl(path) if _is_number(r.get(key, 0)) and r.get(key, 0) <= last]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- directories
def create_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a probe of its own: two launches of one config probe the same directory at once, and
        # with one shared name the first one's unlink made the second fail
        with tempfile.TemporaryFile(dir=path, prefix=".write_test."):
            pass
    except OSError as exc:
        reason = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
        raise UserError(f"results_root: cannot write run directory {path} ({reason})") from None


@contextmanager
def run_lock(path: Path) -> Iterator[bool]:
    """Yield True if this process holds the run's lock, False if another process trains it.

    flock is released by the kernel when a process dies, so a killed run never leaves a stale
    lock behind.
    """
    with open(path / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def drop_leftover_checkpoint(path: Path) -> None:
    """A run killed between writing final.json and removing its checkpoint is complete and will
    never read that checkpoint again: remove it, under the run's lock (a `rerun=true` launch may be
    training the run afresh). Best effort: a read-only tree keeps it."""
    if not (Path(path) / CHECKPOINT_FILE).exists():
        return
    try:
        with run_lock(Path(path)) as locked:
            if locked and is_complete(path):
                (Path(path) / CHECKPOINT_FILE).unlink(missing_ok=True)
    except OSError:
        pass


def clear_run(path: Path) -> None:
    """Forget a run's results before training it again (`rerun=true`): final.json first, so the
    directory is never a complete-looking mix of old and new files."""
    (Path(path) / FINAL_FILE).unlink(missing_ok=True)
    for name in (CHECKPOINT_FILE, MODEL_FILE, METRICS_FILE, MASK_UPDATES_FILE, "bench.json"):
        (Path(path) / name).unlink(missing_ok=True)
    for artifact in Path(path).glob("*.pt"):  # method artifacts (AC/DC's model_dense.pt), exports
        artifact.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of atomic writes that a killed process never renamed."""
    for tmp in Path(path).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def is_complete(path: Path) -> bool:
    """final.json is a regular file holding a JSON object with a status: a truncated or garbled
    one (a disk that filled during the rename, a bad copy) means the run is not done."""
    final = Path(path) / FINAL_FILE
    if final.is_symlink() or not final.is_file():
        return False
    try:
        with open(final, "rb") as f:
            record = json.loads(f.read(MAX_FINAL_BYTES + 1))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("status"), str)
