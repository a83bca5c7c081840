"""`sparsebench status`: what a relaunch would do, for a results tree or a planned sweep.

    sparsebench status results/showcase                      # every run under a tree
    sparsebench status -m method=gap,gmp seed=0,1,2 exp=x     # the runs a `train -m` would launch

Each run is one of:

* `done`      final.json says completed: a relaunch skips it;
* `diverged`  final.json says diverged (NaN/inf loss): skipped too; change the config to retry;
* `running`   another process holds the run's lock right now;
* `resumable` a checkpoint is there: a relaunch resumes from its epoch;
* `restart`   a directory without checkpoint or valid final.json (killed before its first
              checkpoint, or final.json torn): a relaunch trains it from the start;
* `missing`   (planned sweeps only) no directory yet: a relaunch trains it.

Nothing is trained, built or written; the lock is only probed.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from collections import Counter
from pathlib import Path

from sparsebench import results
from sparsebench.errors import UserError

STATES = ("done", "diverged", "running", "resumable", "restart", "missing")


def _lock_held(path: Path) -> bool:
    try:
        fd = os.open(path / results.LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def run_state(path: Path) -> tuple[str, str]:
    """(state, detail) of one run directory (see the module docstring)."""
    if not path.is_dir():
        return "missing", ""
    if results.is_complete(path):
        final = json.loads((path / results.FINAL_FILE).read_bytes()[: results.MAX_FINAL_BYTES])
        status = final.get("status")
        if status == "diverged":
            return "diverged", f"at step {final.get('diverged_at_step')}"
        acc = final.get("test_acc")
        return "done", f"test_acc {acc:.2f}" if isinstance(acc, (int, float)) else str(status)
    if _lock_held(path):
        return "running", f"{len(results.read_jsonl(path / results.METRICS_FILE))} epochs logged"
    if (path / results.CHECKPOINT_FILE).is_file():
        return "resumable", f"{len(results.read_jsonl(path / results.METRICS_FILE))} epochs logged"
    return "restart", "no checkpoint"


def tree_runs(root: Path) -> list[Path]:
    """Run directories (holding config.yaml) under `root`, hidden folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if results.CONFIG_FILE in filenames:
            found.append(Path(dirpath))
            dirnames.clear()
    return found


def planned_runs(args: list[str]) -> list[Path]:
    """The run directories `sparsebench train <args>` would use, in launch order."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sparsebench.cli import JobComposer, expand_sweeps, one_line, resolve, split_arguments

    overrides, flags, multirun = split_arguments(args)
    composer = JobComposer(flags.get("--config-dir") or flags.get("-cd"))
    paths = []
    for job in expand_sweeps(overrides) if multirun else [overrides]:
        try:
            paths.append(results.run_dir(resolve(composer.compose(job))))
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(one_line(exc)) from None
    return list(dict.fromkeys(paths))  # a dense run swept over sparsities is one directory


def main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\n\nusage: sparsebench status PATH | sparsebench status [-m] OVERRIDES")
        return 0 if args else 2
    try:
        if len(args) == 1 and "=" not in args[0] and not args[0].startswith("-"):
            root = Path(args[0])
            if not root.is_dir():
                raise UserError(f"{root} is not a directory")
            paths = tree_runs(root)
        else:
            paths = planned_runs(args)
    except UserError as exc:
        print(f"sparsebench status: error: {exc}", file=sys.stderr)
        return 2
    counts: Counter = Counter()
    for path in paths:
        state, detail = run_state(path)
        counts[state] += 1
        print(f"{state:<10} {path}" + (f"  ({detail})" if detail else ""))
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
    print(f"{len(paths)} runs: {summary or 'none'}; a relaunch trains {counts['missing'] + counts['restart']}, "
          f"resumes {counts['resumable']} and skips {counts['done'] + counts['diverged']}")
    return 0
