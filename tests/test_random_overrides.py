"""Property: any override of any top-level or method key ends in a completed run or in one clear
error line with a non-zero exit — never a traceback, never a directory that looks complete."""
import dataclasses
import enum
import json
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sparsebench import cli, results
from sparsebench.config import RunOptions
from sparsebench.methods import METHODS

NASTY = st.sampled_from([
    "abc", "", "null", "-1", "1e9", "[1,2]", "{a: 1}", "true", "nan", "0",
    "inf", "-inf", "1e400", "123456789012345678901234", "-99999999999999999999", "4294967296",
])
# Files that are not what a key expects: missing, empty, a directory, text, binary junk.
_BAD_FILES = Path(tempfile.mkdtemp(prefix="sparsebench-bad-files-"))
(_BAD_FILES / "empty").write_bytes(b"")
(_BAD_FILES / "text.npz").write_text("x,y\n1,2\n")
(_BAD_FILES / "junk.yaml").write_bytes(bytes(range(256)))
(_BAD_FILES / "list.yaml").write_text("[1, 2, 3]\n")
(_BAD_FILES / "folder").mkdir()
BAD_FILE = st.sampled_from([str(_BAD_FILES / n) for n in ("missing", "empty", "text.npz", "junk.yaml", "list.yaml",
                                                           "folder")])
# Keys whose range is bounded here only to keep each example fast (a huge epoch count is valid).
BOUNDED = {
    "epochs": st.sampled_from(["0", "-3", "1", "2", "abc", "1.5"]),
    "batch_size": st.sampled_from(["0", "-1", "32", "1000", "x"]),
    "eval_batch_size": st.sampled_from(["0", "64", "y"]),
    "num_workers": st.sampled_from(["0", "-1", "w"]),
    "results_root": st.nothing(),  # the test's own directory
    "paper": st.sampled_from(["null", "{source: x}", "3"]),
}


def values_for(tp) -> st.SearchStrategy[str]:
    """Override strings of the right type and of the wrong one."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        good = st.sampled_from([m.value for m in tp])
    elif tp is bool:
        good = st.sampled_from(["true", "false"])
    elif tp is int:
        good = st.integers(-3, 12).map(str)
    elif tp is float:
        good = st.floats(-0.5, 1.5, allow_nan=False).map(lambda x: f"{x:.3f}")
    elif tp is str:
        good = st.sampled_from(["default", "exp_a", "../up", "a/b"])
    elif origin is list:
        good = st.sampled_from(["[]", "[1,2]", "[a]"])
    else:
        good = NASTY
    return st.one_of(good, NASTY)


def top_level_overrides():
    hints = typing.get_type_hints(RunOptions)
    keys = [f.name for f in dataclasses.fields(RunOptions)]
    return st.lists(
        st.sampled_from(keys).flatmap(lambda k: BOUNDED.get(k, values_for(hints[k])).map(lambda v: f"{k}={v}")),
        max_size=4,
    )


@st.composite
def overrides(draw):
    method = draw(st.sampled_from(METHODS.names() + ["nonexistent"]))
    chosen = [f"method={method}"]
    if method in METHODS:
        options = METHODS.get(method).Options
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            if draw(st.booleans()):
                chosen.append(f"method.{f.name}={draw(values_for(hints[f.name]))}")
    if draw(st.booleans()):
        chosen.append(f"method.{draw(st.sampled_from(['bogus', 'kapa', 'alpah']))}=1")
    chosen += draw(top_level_overrides())
    if draw(st.integers(0, 3)) == 0:  # a deleted key: `~sparsity`, `~method.kappa`, ...
        keys = [f.name for f in dataclasses.fields(RunOptions) if f.name != "results_root"]
        chosen.append(f"~{draw(st.sampled_from(keys + ['optimizer.lr', 'method']))}")
    file_case = draw(st.integers(0, 3))
    if file_case == 1:
        chosen += ["dataset=npz", f"dataset.path={draw(BAD_FILE)}"]
    elif file_case == 2:
        chosen += ["distribution=custom", f"distribution.file={draw(BAD_FILE)}"]
    return chosen


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(overrides())
@example(["method=static", "epochs=1"])  # the completed branch is always exercised
@example(["method=gap", "epochs=2", "method.kappa=2", "dry_run=true"])
# Each class of issue #8 at least once, whatever the draws reach.
@example(["method=static", "powerprop=nan", "epochs=1"])
@example(["method=gmp", "sparsity=inf"])
@example(["method=gap", "seed=123456789012345678901234"])
@example(["method=static", "~sparsity"])
@example(["method=static", "dataset=npz", f"dataset.path={_BAD_FILES / 'text.npz'}"])
@example(["method=static", "distribution=custom", f"distribution.file={_BAD_FILES / 'junk.yaml'}"])
@example(["method=static", "distribution=custom", f"distribution.file={_BAD_FILES / 'folder'}"])
def test_random_overrides_complete_or_fail_in_one_line(drawn):
    root = Path(tempfile.mkdtemp())
    # Appended last so they win: tiny data keeps a completed example around a second.
    tiny = [] if "dataset=npz" in drawn else ["dataset.num_samples=200"]
    args = ["train", *drawn, f"results_root={root}", *tiny, "progress=none"]
    capture = _Capture()
    with capture:
        code = cli.main(args)
    finals = list(root.rglob(results.FINAL_FILE))
    if code == 0:
        assert "Traceback" not in capture.err, (drawn, capture.err)
        for final in finals:
            assert json.loads(final.read_text())["status"] in ("completed", "diverged")
        dirs = [p.parent for p in root.rglob(results.CONFIG_FILE)]
        assert all((d / results.FINAL_FILE).exists() for d in dirs) or "dry_run=true" in drawn, drawn
    else:
        lines = capture.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("sparsebench train: error: "), (drawn, capture.err)
        assert not finals, drawn


class _Capture:
    """stderr capture that works inside hypothesis (pytest's capsys is function-scoped)."""

    def __enter__(self):
        import contextlib
        import io

        self._buffer = io.StringIO()
        self._redirect = contextlib.redirect_stderr(self._buffer)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        self.err = self._buffer.getvalue()
        return False
