"""checkpoint.pt: the trainer's whole state, saved every epoch and loaded on resume without pickle.

A run directory may sit in a shared scratch tree or come from someone else's copy, so loading a
checkpoint must never run code: it is read with `torch.load(weights_only=True)`, which accepts
only tensors, numbers, strings and plain containers. Everything saved is therefore reduced to
those types first; NumPy's RNG state (a tuple holding an ndarray) becomes a dict with a tensor.

A checkpoint that cannot be read (truncated by a full disk, garbled, written by another model or
method) is one line naming the file and the way out, never a traceback on every relaunch.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from sparsebench import results
from sparsebench.errors import UserError


def rng_state() -> dict:
    """Every RNG the trainer draws from, as weights-only types."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, run, scaler: torch.amp.GradScaler, trainer_state: dict) -> None:
    """Atomically write everything a resumed run needs (`run` is train.Run)."""
    results.atomic_torch_save(path, {
        "model": run.model.state_dict(), "engine": run.engine.state_dict(),
        "optimizer": run.optimizer.state_dict(), "method": run.method.state_dict(),
        "scaler": scaler.state_dict(), "trainer": dict(trainer_state), "rng": rng_state(),
    })


def load(path: Path, run, scaler: torch.amp.GradScaler) -> dict:
    """Restore model, masks, optimizer, method, scaler and RNGs from `path`; return the trainer state.

    Raises UserError (one line) if the file is not a checkpoint this run can resume from.
    """
    try:
        ckpt = torch.load(path, map_location=run.device, weights_only=True)
        run.model.load_state_dict(ckpt["model"])
        run.engine.load_state_dict(ckpt["engine"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.method.load_state_dict(ckpt["method"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        return dict(ckpt["trainer"])
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not ours to resume from
        reason = " ".join(str(exc).split())[:200] or exc.__class__.__name__
        raise UserError(
            f"cannot resume from {path}: not a readable checkpoint of this run ({exc.__class__.__name__}: {reason}); "
            f"move it aside (e.g. mv {path} {path}.bad) and relaunch to restart the run from scratch"
        ) from None
