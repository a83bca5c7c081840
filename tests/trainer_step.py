"""One training step in the trainer's order (sparsebench/train.py), for tests that train twin
models side by side, one per backend."""
import contextlib

import torch
import torch.nn.functional as F


def trainer_step(twin, x: torch.Tensor, y: torch.Tensor, autocast: bool = False) -> float:
    """`twin` has `backend`, `engine`, `model`, `optimizer` and a `steps` count; autocast in the
    device's default autocast dtype when asked (amp=true)."""
    twin.backend.begin_step(twin.steps)
    kind = x.device.type
    with torch.autocast(kind, dtype=torch.get_autocast_dtype(kind)) if autocast else contextlib.nullcontext():
        loss = F.cross_entropy(twin.model(x), y)
    twin.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    twin.engine.mask_gradients()
    twin.optimizer.step()
    twin.engine.apply_masks()
    twin.steps += 1
    return loss.item()
