"""Where a result came from: sparsebench's version and commit, torch, CUDA, device and threads.

Recorded in final.json, so a report can tell runs of one cell apart when they come from
different code (the run-directory hash covers the config, not the code: a fixed method gives
"already complete" until `rerun=true`).
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

import sparsebench


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# What trains: the package and its configs. An edited README or a new results file does not make
# the code dirty; a changed or new (untracked, not ignored) file under these does.
CODE_PATHS = ("sparsebench", "conf")


def code_version() -> dict:
    """sparsebench's version, plus the commit and a dirty flag when it runs from a git checkout."""
    package = Path(sparsebench.__file__).resolve().parent
    info = {"sparsebench": sparsebench.__version__, "commit": None, "dirty": None}
    top = _git(["rev-parse", "--show-toplevel"], package)
    if top and (Path(top) / "sparsebench").resolve() == package:  # our own checkout, not an enclosing repo
        info["commit"] = _git(["rev-parse", "HEAD"], package)
        status = _git(["status", "--porcelain", "--untracked-files=normal", "--", *CODE_PATHS], Path(top))
        info["dirty"] = None if status is None else bool(status)
    return info


def provenance(device: torch.device, world_size: int) -> dict:
    return {
        **code_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "world_size": world_size,
    }
