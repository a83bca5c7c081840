"""sparsebench: an experiment runner for sparse neural-network training research.

`sparsebench.run(...)` trains one run from Python (see sparsebench/api.py); importing the
package itself stays light (no torch) so the CLI starts fast.
"""

__version__ = "0.1.0"


def run(*overrides, **options):
    """Train one run like `sparsebench train`; returns a RunResult (see sparsebench.api.run)."""
    from sparsebench.api import run as _run

    return _run(*overrides, **options)


def load_result(path):
    """The RunResult of a finished run directory (see sparsebench.api.load_result)."""
    from sparsebench.api import load_result as _load_result

    return _load_result(path)
