"""The Python API: `sparsebench.run(...)` trains (or finds) one run and returns its results.

For notebooks and scripts. The arguments are the command line's overrides, so the config is
composed and validated exactly as `sparsebench train` does it, into the same run directory (a
finished run is found again, not retrained; a half-done one resumes):

    import sparsebench
    result = sparsebench.run(method="gap", sparsity=0.9, epochs=10)
    result = sparsebench.run("method=rigl", "method.delta_t=50", seed=1)
    result = sparsebench.run(**{"method": "gmp", "method.end": 0.8})
    result.final["test_acc"], result.path, result.metrics[-1]["ece"]
    model = result.model()          # the trained torch module, rebuilt from config.yaml + model.pt

Keyword values become overrides (`True` -> true, `None` -> null, lists -> [a,b]); dotted keys
need dict unpacking. Bad input raises `sparsebench.errors.UserError` with the CLI's one-line
message. Sweeps (`-m`) are the CLI's job; loop over `run` for those in Python.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsebench import plugins, results
from sparsebench.errors import UserError


def _override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in " ,[]{}()='\"\\\n:"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def overrides_from(args: tuple[str, ...], kwargs: dict[str, Any]) -> list[str]:
    """Override strings from positional `key=value` strings and keyword values, in that order."""
    for arg in args:
        if not isinstance(arg, str) or "=" not in arg:
            raise UserError(f"{arg!r}: positional arguments are overrides written key=value")
    return [*args, *(f"{key}={_override_value(value)}" for key, value in kwargs.items())]


@dataclass
class RunResult:
    """A finished run: where it is, what it measured, and its model on demand."""

    path: Path
    final: dict
    config: dict
    metrics: list[dict] = field(repr=False)

    @property
    def test_acc(self) -> float:
        return self.final["test_acc"]

    def model(self, device: str = "cpu"):
        """The trained model: built from the run's config and loaded from model.pt (weights only).
        Under Powerpropagation model.pt already holds the effective weights, so the plain model
        is returned."""
        import torch

        from sparsebench.models import create_model

        model_cfg = dict(self.config["model"])
        name = model_cfg.pop("name")
        module = create_model(name, tuple(self.final["input_shape"]), self.final["num_classes"], **model_cfg)
        state = torch.load(self.path / results.MODEL_FILE, map_location=device, weights_only=True)
        module.load_state_dict(state)
        return module.to(device).eval()


def run(*overrides: str, **options: Any) -> RunResult | None:
    """Train one run like `sparsebench train <overrides>` and return its results (None for dry runs)."""
    from sparsebench.cli import compose_config, one_line, resolve
    from sparsebench.config import validate
    from sparsebench.train import train

    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    job = overrides_from(overrides, options)
    plugins.load(plugins.from_overrides(job))
    try:
        resolved = resolve(compose_config(job))
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(one_line(exc)) from None
    config = validate(resolved)
    path = train(config, resolved, OmegaConf.to_yaml(OmegaConf.create(resolved)))
    if path is None:
        return None
    return load_result(path)


def load_result(path: str | Path) -> RunResult:
    """The results of a finished run directory (final.json, config.yaml, metrics.jsonl)."""
    import yaml

    path = Path(path)
    if not results.is_complete(path):
        raise UserError(f"{path} holds no finished run (no readable final.json)")
    final = json.loads((path / results.FINAL_FILE).read_text())
    config = yaml.safe_load((path / results.CONFIG_FILE).read_text())
    return RunResult(path, final, config, results.read_jsonl(path / results.METRICS_FILE))
