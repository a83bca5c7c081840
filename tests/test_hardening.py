"""Issue #8's classes of bad input and faults: each ends in one line or is survived, never a
traceback, a stuck run, code run from a results tree, or a wrong result that looks complete."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsebench import cli, interrupts, results

TINY = ["method=static", "epochs=3", "dataset.num_samples=400", "batch_size=64", "progress=none"]


def planned_run_dir(args: list[str]) -> Path:
    """The directory `sparsebench train *args` will use (composed exactly as the CLI does)."""
    return results.run_dir(cli.resolve(cli.compose_config(args)))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


class _WritesMarkerWhenUnpickled:
    """An object whose unpickling opens (creates) a file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ------------------------------------------------------------------------ security
def test_crafted_checkpoint_is_never_unpickled(tmp_path, capsys):
    args = [*TINY, f"results_root={tmp_path / 'results'}"]
    run = planned_run_dir(args)
    run.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"model": _WritesMarkerWhenUnpickled(marker)}, run / results.CHECKPOINT_FILE)

    assert cli.main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert f"cannot resume from {run / results.CHECKPOINT_FILE}" in err and "move it aside" in err, err
    assert not marker.exists()
    assert not (run / results.FINAL_FILE).exists() and (run / results.CHECKPOINT_FILE).exists()


@pytest.mark.parametrize("exp", ["/tmp/elsewhere", "a/../../escape", "..", "a/b/../../.."])
def test_exp_cannot_leave_results_root(exp, tmp_path, capsys):
    assert cli.main(["train", *TINY, f"exp={exp}", f"results_root={tmp_path / 'root'}"]) == 2
    assert "expected a relative folder name inside results_root" in one_error_line(capsys)
    assert not (tmp_path / "root").exists() and not Path("/tmp/elsewhere").exists()


def test_run_dir_refuses_a_path_outside_the_root():
    resolved = cli.resolve(cli.compose_config(["exp=/abs"]))
    with pytest.raises(cli.UserError, match="would lie outside results_root"):
        results.run_dir(resolved)


# ------------------------------------------------------------------------ runs that get stuck or lie
def _interrupted_run(tmp_path: Path, interrupt_at_checkpoint, args: list[str]) -> Path:
    """A run stopped after its 2nd epoch's checkpoint (Ctrl-C delivered while writing the 3rd)."""
    interrupt = interrupt_at_checkpoint(3)
    assert cli.main(["train", *args]) == 130
    interrupt.remove()
    run = planned_run_dir(args)
    assert (run / results.CHECKPOINT_FILE).is_file() and not (run / results.FINAL_FILE).exists()
    return run


def _truncate(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled", "other_model"])
def test_unreadable_checkpoint_is_one_line_with_a_way_out(damage, tmp_path, interrupt_at_checkpoint, capsys):
    args = [*TINY, "epochs=4", f"results_root={tmp_path}"]
    run = _interrupted_run(tmp_path, interrupt_at_checkpoint, args)
    ckpt = run / results.CHECKPOINT_FILE
    blob = ckpt.read_bytes()
    if damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "truncated":
        ckpt.write_bytes(_truncate(blob))
    elif damage == "garbled":
        ckpt.write_bytes(blob[:100] + os.urandom(len(blob) - 200) + blob[-100:])
    else:  # a checkpoint of a narrower model: every tensor has the wrong shape
        other = _interrupted_run(tmp_path / "other", interrupt_at_checkpoint, [*args[:-1], "model.channels=16",
                                                                  f"results_root={tmp_path / 'other'}"])
        ckpt.write_bytes((other / results.CHECKPOINT_FILE).read_bytes())
    capsys.readouterr()

    assert cli.main(["train", *args]) == 2
    err = one_error_line(capsys)
    assert f"cannot resume from {ckpt}" in err and f"mv {ckpt} {ckpt}.bad" in err, err
    # The way out the line names works: move it aside, relaunch, and the run completes from scratch.
    ckpt.rename(ckpt.with_suffix(".pt.bad"))
    assert cli.main(["train", *args]) == 0
    assert json.loads((run / results.FINAL_FILE).read_text())["status"] == "completed"


def test_garbage_lines_in_jsonl_files_do_not_block_resume(tmp_path, interrupt_at_checkpoint):
    args = ["method=rigl", "method.delta_t=3", *TINY[1:], "epochs=4", f"results_root={tmp_path}"]
    run = _interrupted_run(tmp_path, interrupt_at_checkpoint, args)
    for name in (results.METRICS_FILE, results.MASK_UPDATES_FILE):
        lines = (run / name).read_text().splitlines()
        assert len(lines) >= 2, name
        junk = ["{not json", "[1, 2]", "42", '"a string"', "\x00\x01", '{"epoch": "three", "step": null}']
        (run / name).write_text("\n".join([lines[0], *junk, *lines[1:]]) + "\n")

    assert cli.main(["train", *args]) == 0
    metrics = results.read_jsonl(run / results.METRICS_FILE)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    updates = results.read_jsonl(run / results.MASK_UPDATES_FILE)
    assert [u["step"] for u in updates] == sorted({u["step"] for u in updates})  # repaired: no junk, no repeats


@pytest.mark.parametrize("content", [b"", b'{"status": "compl', b"\x00" * 10, b"[1, 2]", b'"completed"'])
def test_torn_final_json_means_the_run_is_redone(content, tmp_path, capsys):
    args = [*TINY, f"results_root={tmp_path}"]
    assert cli.main(["train", *args]) == 0
    run = planned_run_dir(args)
    (run / results.FINAL_FILE).write_bytes(content)
    assert not results.is_complete(run)
    capsys.readouterr()

    assert cli.main(["train", *args]) == 0
    assert "already complete" not in capsys.readouterr().out
    final = json.loads((run / results.FINAL_FILE).read_text())
    assert final["status"] == "completed" and final["epochs"] == 3
    assert [m["epoch"] for m in results.read_jsonl(run / results.METRICS_FILE)] == [1, 2, 3]


def test_final_json_that_is_a_fifo_is_not_complete(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / results.FINAL_FILE)
    assert not results.is_complete(run)  # returns at once: a FIFO is never opened


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_interrupt_is_one_line_and_the_relaunch_resumes(sig, code, name, tmp_path):
    args = [*TINY, "epochs=30", f"results_root={tmp_path}"]
    run = planned_run_dir(args)
    # A shell starts background commands with SIGINT ignored and Python keeps it ignored (so
    # Ctrl-C in a terminal does not stop them): give the child a default SIGINT, as a terminal does.
    proc = subprocess.Popen([sys.executable, "-m", "sparsebench", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not results.read_jsonl(run / results.METRICS_FILE) or not (run / results.CHECKPOINT_FILE).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, err
    assert f"interrupted by {name}" in lines[0] and "relaunch the same command to resume" in lines[0], err
    assert not (run / results.FINAL_FILE).exists()

    resumed = subprocess.run([sys.executable, "-m", "sparsebench", "train", *args],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    assert [m["epoch"] for m in results.read_jsonl(run / results.METRICS_FILE)] == list(range(1, 31))


def test_a_launchers_sigterm_handler_is_kept():
    def launcher_handler(signum, frame):  # e.g. submitit's bypass, installed before our code runs
        pass

    previous = signal.signal(signal.SIGTERM, launcher_handler)
    try:
        with interrupts.signals_as_exceptions():
            assert signal.getsignal(signal.SIGTERM) is launcher_handler
        assert signal.getsignal(signal.SIGTERM) is launcher_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    with interrupts.signals_as_exceptions():  # with the default action, ours raises while inside
        with pytest.raises(interrupts.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ------------------------------------------------------------------------ sweeps refused whole
def test_a_sweep_with_one_bad_job_starts_no_job(tmp_path, capsys):
    code = cli.main(["train", "-m", "method=gap", "method.kappa=2,50", *TINY[1:], f"results_root={tmp_path}"])
    assert code == 2
    assert "method.kappa=50 is larger than the number of prunable layers" in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_jobs_past_the_first_thousand_are_checked(tmp_path, capsys):
    # 2 x 1001 jobs; the first bad one is job 1001 (epochs=0 with seed 0).
    code = cli.main(["train", "-m", "epochs=2,0", "seed=range(0,1001)", *TINY[:1], *TINY[2:], f"results_root={tmp_path}"])
    assert code == 2 and "epochs=0: expected a positive integer" in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_seed_sweep_out_of_range_is_caught_on_the_fast_path(tmp_path, capsys):
    code = cli.main(["train", "-m", "seed=4294967294,4294967295,4294967296", *TINY, f"results_root={tmp_path}"])
    assert code == 2 and "seed=4294967296: expected an integer in [0, 4294967295]" in one_error_line(capsys)


JOBS = [
    ["method=gap", "method.kappa=2", "sparsity=0.8"],
    ["experiment=cifar10_wrn22_2_rigl", "method=rigl", "epochs=7", "optimizer.lr=0.05"],
    ["schedule=multistep", "schedule.milestones=[3,5]", "seed=4"],
    ["method=gmp", "distribution=erk", "distribution.dense_layers=[a*,b]", "exp=x/y"],
    ["model=resnet20", "model.width=2", "method=set", "method.zeta=0.1", "label_smoothing=0.1"],
]


@pytest.mark.parametrize("job", JOBS)
def test_fast_sweep_composition_equals_hydras(job):
    fast = cli.JobComposer(None).compose(job)
    assert cli.resolve(fast) == cli.resolve(cli.compose_config(job))


def test_fast_composition_falls_back_to_hydras_error():
    with pytest.raises(Exception, match="sparsty"):
        cli.JobComposer(None).compose(["sparsty=0.9"])


# ------------------------------------------------------------------------ command-line syntax
@pytest.mark.parametrize("args, message", [
    (["--foo"], "unknown flag '--foo'"),
    (["method=gap", "--bogus=1"], "unknown flag '--bogus=1'"),
    (["--config-dir", "/nonexistent/conf", "method=gap"], "--config-dir '/nonexistent/conf': no such directory"),
    (["exp=my", "run"], "'run' is not a key=value override; a value with spaces must be quoted"),
    (["exp=a\nb"], "cannot parse the value of 'exp'"),
])
def test_command_line_mistakes_are_named(args, message, tmp_path, capsys):
    assert cli.main(["train", *args, f"results_root={tmp_path}"]) == 2
    assert message in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_flags_after_overrides_work(capsys):
    assert cli.main(["train", "method=gmp", "--cfg", "job"]) == 0
    assert "name: gmp" in capsys.readouterr().out


@pytest.mark.parametrize("multirun", [[], ["-m", "method=static,gmp"]])
def test_results_root_that_is_a_file_is_one_line(multirun, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["train", *multirun, *TINY[1:], f"results_root={blocker}"]) == 2
    assert f"results_root={blocker}: {blocker} exists and is not a directory" in one_error_line(capsys)
    assert blocker.read_text() == ""
