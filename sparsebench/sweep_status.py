"""`sparsebench status`: what a relaunch would do, for a results tree or a planned sweep.

    sparsebench status results/showcase                      # every run under a tree
    sparsebench status -m method=gap,gmp seed=0,1,2 exp=x     # the runs a `train -m` would launch
    sparsebench status search -m method=random_search seed=0,1  # ... or a `search -m`, arms included

Each run is one of:

* `done`      final.json says completed: a relaunch skips it;
* `diverged`  final.json says diverged (NaN/inf loss): skipped too; change the config to retry;
* `running`   another process holds the run's lock right now;
* `resumable` a checkpoint is there: a relaunch resumes from its epoch;
* `restart`   a directory without checkpoint or valid final.json (killed before its first
              checkpoint, or final.json torn): a relaunch trains it from the start;
* `missing`   (planned sweeps only) no directory yet: a relaunch trains it;
* `later`     (planned searches only) the runs a search trains from what it finds (DASS's
              retraining): their directories are known once the search is complete.

A planned search (`status search ...`; EvoPress and DASS, which only run as searches, without
the word too) lists what `sparsebench search` would do: the runs it trains first (EvoPress's
dense model), its own directory (EvoPress, DASS; `resumable` once it has saved its state) and
the runs it trains afterwards (Random Search's searched, control and dense runs; DASS's
retraining).

Nothing is trained, built or written; the lock is only probed.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sparsebench import results
from sparsebench.errors import UserError

STATES = ("done", "diverged", "running", "resumable", "restart", "missing", "later")


@dataclass(frozen=True)
class AfterSearch:
    """Runs a search trains from what it finds, not yet planned: it is not complete."""

    search: Path
    methods: tuple[str, ...]


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
    if (path / results.SEARCH_STATE_FILE).is_file():
        return "resumable", "search state saved"
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


def planned_runs(args: list[str], search: bool = False) -> list[Path | AfterSearch]:
    """The run directories `sparsebench train <args>` (`search <args>` with `search`) would use,
    in launch order."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sparsebench.cli import JobComposer, expand_sweeps, one_line, resolve, split_arguments

    overrides, flags, multirun = split_arguments(args)
    composer = JobComposer(flags.get("--config-dir") or flags.get("-cd"))
    paths = []
    for job in expand_sweeps(overrides) if multirun else [overrides]:
        try:
            paths.extend(_job_runs(resolve(composer.compose(job)), search))
        except (HydraException, OmegaConfBaseException) as exc:
            raise UserError(one_line(exc)) from None
    return list(dict.fromkeys(paths))  # a dense run swept over sparsities is one directory


def _job_runs(resolved: dict, search: bool) -> list[Path | AfterSearch]:
    """One job's runs: itself, or for a search what `search/job.py` runs, in its order."""
    method = resolved.get("method")
    name = method.get("name") if isinstance(method, dict) else None
    if not search and name not in results.SEARCH_DIRECTORY_METHODS:  # those run only as searches
        return [results.run_dir(resolved)]
    from sparsebench.search import plan_search  # one line for a method that is not a search

    # EvoPress checks its options on the model, which reads the dataset's shape: never download
    # for that (`download` is not part of a run's directory name)
    if isinstance(resolved.get("dataset"), dict):
        resolved = {**resolved, "dataset": {**resolved["dataset"], "download": False}}
    plan = plan_search(resolved)
    runs: list[Path | AfterSearch] = [results.run_dir(arm) for _, arm in plan.arms_before]
    after = plan.search.arms_after()
    if plan.search.has_directory:
        own = results.run_dir(resolved)
        runs.append(own)
        if after and not results.is_complete(own):  # the arms may name what the search writes
            return [*runs, AfterSearch(own, tuple(arm["method"]["name"] for arm in after))]
    return [*runs, *(results.run_dir(arm) for arm in after)]


def main(args: list[str]) -> int:
    # `search` plans a search sweep, unless it is the one argument and a results tree of that name
    search = bool(args) and args[0] == "search" and not (len(args) == 1 and Path("search").is_dir())
    if search:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\n\nusage: sparsebench status PATH | sparsebench status [search] [-m] OVERRIDES")
        return 0 if args else 2
    try:
        if not search and len(args) == 1 and "=" not in args[0] and not args[0].startswith("-"):
            root = Path(args[0])
            if not root.is_dir():
                raise UserError(f"{root} is not a directory")
            paths = tree_runs(root)
        else:
            paths = planned_runs(args, search)
    except UserError as exc:
        print(f"sparsebench status: error: {exc}", file=sys.stderr)
        return 2
    counts: Counter = Counter()
    for path in paths:
        if isinstance(path, AfterSearch):
            counts["later"] += len(path.methods)
            print(f"{'later':<10} {', '.join(path.methods)}: trained from what {path.search} finds, once it is complete")
            continue
        state, detail = run_state(path)
        counts[state] += 1
        print(f"{state:<10} {path}" + (f"  ({detail})" if detail else ""))
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
    trains = counts["missing"] + counts["restart"] + counts["later"]
    print(f"{sum(counts.values())} runs: {summary or 'none'}; a relaunch trains {trains}, "
          f"resumes {counts['resumable']} and skips {counts['done'] + counts['diverged']}")
    return 0
