"""Ctrl-C and SIGTERM as exceptions, so an interrupted run ends in one line and a shell's exit code.

SIGINT already raises KeyboardInterrupt. SIGTERM (what `scancel`, `kill` and most schedulers send
first) kills Python silently by default; while sparsebench runs it raises `Terminated` instead,
so the trainer can say where it stopped. The handler is installed only where SIGTERM still has
its default action: a cluster launcher that handles SIGTERM itself (submitit bypasses it and
requeues on USR2) keeps its own handler.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so `except Exception` cannot swallow it."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (unless someone else already handles it)."""
    own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if not own:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def signal_name(exc: BaseException) -> str:
    return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"


def exit_code(exc: BaseException) -> int:
    """128 + the signal's number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
