"""The real console entry point in a subprocess, for the tests that check what a user sees."""
import subprocess
import sys


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`python -m sparsebench ARGS` with its output captured (at most 10 minutes)."""
    return subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)
