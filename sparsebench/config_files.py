"""Where sparsebench's YAML configs live, and the option defaults they state, read without
Hydra or torch (the report reads them to fill options a run's config predates)."""
from __future__ import annotations

import functools
from pathlib import Path

import yaml


def config_directory() -> str:
    """conf/ ships inside the wheel as sparsebench/conf; in a source checkout it sits beside
    the package. Looking for both by path (not pkg://) works however sparsebench was imported."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"sparsebench's configs are missing: looked in {package / 'conf'} and {package.parent / 'conf'}")


@functools.lru_cache(maxsize=None)
def method_defaults(method: str) -> dict:
    """The options conf/method/<method>.yaml sets, without `name` and Hydra's `defaults` list;
    empty for a method without a file there (a plugin's) or a name that is not a plain file name."""
    if not method or not method.replace("_", "").isalnum():
        return {}
    path = Path(config_directory()) / "method" / f"{method}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: value for key, value in data.items() if key not in ("name", "defaults")}
