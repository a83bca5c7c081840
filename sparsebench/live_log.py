"""Optional live logging to TensorBoard while training (`tensorboard=true`, extra `tensorboard`).

Each evaluation's numbers go to `<run dir>/tensorboard/` as scalars keyed by the training step:
the metrics.jsonl record, and the per-tensor densities under `density/`. metrics.jsonl stays the
record of truth; this is only for watching runs as they go (`tensorboard --logdir results`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from sparsebench.errors import UserError

SUBDIR = "tensorboard"


def require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("tensorboard=true needs the tensorboard package: pip install 'sparsebench[tensorboard]'")


class TensorBoardLog:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / SUBDIR))

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.writer.add_scalar(key, value, step)
        for name, density in record.get("layer_densities", {}).items():
            self.writer.add_scalar(f"density/{name}", density, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
