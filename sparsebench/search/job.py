"""One `sparsebench search` job: the arms it needs, its own resumable work, the arms it found.

Every part skips what is done and resumes what was killed, so relaunching the same command
after a SIGKILL, a preemption or Ctrl-C carries on where it stopped (docs/search.md).
"""
from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from sparsebench import interrupts, results
from sparsebench.config import validate
from sparsebench.errors import RunInterrupted, UserError
from sparsebench.provenance import provenance
from sparsebench.search.base import STATE_FILE, SearchJob, SearchPlan, plan_search

SEARCH_OUTPUTS = (STATE_FILE, "densities.yaml", "genotype.json")


def _yaml(resolved: dict) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(resolved))


def run_search(resolved: dict) -> Path | None:
    """Run the search `resolved` describes; returns its directory (None when it has none)."""
    from sparsebench.train import log, train

    plan = plan_search(resolved)
    for cfg, arm in plan.arms_before:
        train(cfg, arm, _yaml(arm))
    path = None
    if plan.search.has_directory:
        path = _search_in_directory(plan, resolved, log)
    # Arms after the search are planned again now: they may name what the search wrote (DASS's
    # genotype digest); plan_search validated their options before anything ran.
    for arm in plan.search.arms_after():
        train(validate(arm), arm, _yaml(arm))
    return path


def _search_in_directory(plan: SearchPlan, resolved: dict, log) -> Path:
    path = results.run_dir(resolved)
    rerun = bool(resolved.get("rerun"))
    if results.is_complete(path) and not rerun:
        log(f"search already complete, skipped: {path}")
        return path
    results.create_run_dir(path)
    with results.run_lock(path) as locked:
        if not locked or (results.is_complete(path) and not rerun):
            log(f"another process runs this search or has just finished it, skipped: {path}")
            return path
        (path / results.FINAL_FILE).unlink(missing_ok=True)
        if rerun:
            for name in (*SEARCH_OUTPUTS, results.METRICS_FILE):
                (path / name).unlink(missing_ok=True)
        results.atomic_write_text(path / results.CONFIG_FILE, _yaml(resolved))
        results.remove_stale_temporaries(path)
        job = SearchJob(path, log)
        started = time.perf_counter()
        try:
            with interrupts.signals_as_exceptions():
                summary = plan.search.search(job)
        except OSError as exc:
            raise UserError(f"cannot write to search directory {path}: {exc.strerror or exc}") from None
        except (KeyboardInterrupt, interrupts.Terminated) as exc:
            raise RunInterrupted(
                f"interrupted by {interrupts.signal_name(exc)}; relaunch the same command to resume the search "
                f"from its last checkpoint: {path}", interrupts.exit_code(exc),
            ) from None
        cfg = plan.search.cfg
        final = {
            "status": "completed", "kind": "search", "method": plan.search.name,
            "model": cfg.model, "dataset": cfg.dataset, "sparsity": cfg.run.sparsity, "seed": cfg.run.seed,
            "epochs": cfg.run.epochs, "search": summary,
            "wall_time_s": summary.get("wall_time_s", time.perf_counter() - started),
            "provenance": provenance(plan.search.device, 1),
        }
        results.atomic_write_json(path / results.FINAL_FILE, final)  # last: its presence means done
        (path / STATE_FILE).unlink(missing_ok=True)
    log(f"search done -> {path}")
    return path
