"""Fixtures shared by several test modules."""
import pytest

from sparsebench import cli, results


class CheckpointInterrupt:
    """Ctrl-C delivered while the `at`-th checkpoint.pt of this process is written: the ones
    before it are saved, so the run stops with a checkpoint to resume from."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int):
        self.at, self.calls = at, 0
        self._monkeypatch, self._real_save = monkeypatch, results.atomic_torch_save
        monkeypatch.setattr(results, "atomic_torch_save", self._save)

    def _save(self, path, obj) -> None:
        if path.name == results.CHECKPOINT_FILE:
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
        self._real_save(path, obj)

    def remove(self) -> None:
        self._monkeypatch.setattr(results, "atomic_torch_save", self._real_save)


@pytest.fixture
def interrupt_at_checkpoint(monkeypatch):
    """`interrupt_at_checkpoint(3)` arms a `CheckpointInterrupt`; `.remove()` disarms it."""
    return lambda at: CheckpointInterrupt(monkeypatch, at)


@pytest.fixture
def interrupted_then_resumed(interrupt_at_checkpoint):
    """`interrupted_then_resumed(args, root, at)`: `sparsebench <args>` into `root`, interrupted
    while writing its `at`-th checkpoint, then relaunched to the end; returns the run directory."""
    def run(args: list[str], root, at: int):
        interrupt = interrupt_at_checkpoint(at)
        try:
            code = cli.main([*args, f"results_root={root}"])
        except BaseException:  # noqa: BLE001 - the interrupt, however the trainer reports it
            code = None
        assert code != 0 and interrupt.calls == at
        interrupt.remove()
        assert cli.main([*args, f"results_root={root}"]) == 0
        (run_dir,) = [p.parent for p in root.rglob(results.FINAL_FILE)]
        return run_dir
    return run
