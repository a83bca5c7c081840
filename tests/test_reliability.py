"""A results tree must never hold a wrong or half-written result: kills, races, NaNs, full disks."""
import errno
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sparsebench import cli, report, results
from sparsebench.errors import UserError

TINY = ["epochs=5", "dataset.num_samples=400", "batch_size=64", "progress=none"]
COMPARED = ("test_acc", "best_test_acc", "test_loss", "ece", "actual_sparsity", "itop_rate", "train_flops",
            "layer_densities", "steps")


def launch(args, root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparsebench", "train", *args, f"results_root={root}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def the_run(root: Path) -> Path:
    (run,) = [p.parent for p in root.rglob(results.CONFIG_FILE)]
    return run


def assert_same_result(a: Path, b: Path) -> None:
    fa, fb = (json.loads((p / results.FINAL_FILE).read_text()) for p in (a, b))
    for key in COMPARED:
        assert fa[key] == fb[key], key
    ma, mb = torch.load(a / results.MODEL_FILE), torch.load(b / results.MODEL_FILE)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    ra, rb = results.read_jsonl(a / results.METRICS_FILE), results.read_jsonl(b / results.METRICS_FILE)
    assert [r["epoch"] for r in rb] == [r["epoch"] for r in ra]
    assert [r["test_acc"] for r in rb] == [r["test_acc"] for r in ra]
    ua, ub = (results.read_jsonl(p / results.MASK_UPDATES_FILE) for p in (a, b))
    assert ua == ub


METHODS_WITH_STATE = [
    ["method=gap", "method.rounds=1"],
    ["method=gap", "method.variant=parallel", "method.rounds=1"],
    ["method=rigl", "method.delta_t=3"],
    ["method=rigl", "optimizer=mars", "method.delta_t=3"],  # MARS's previous gradient is checkpointed
    ["method=rigl", "optimizer=mars", "optimizer.variant=exact", "method.delta_t=3"],  # and its previous weights
    ["method=dstee", "method.delta_t=3"],  # its per-weight activity counts are checkpointed
    ["method=cigl", "method.delta_t=3"],  # its generator (Z every step) and the running mean of the weights
    ["method=acdc"],
    ["method=dpf"],
    ["method=svd", "method.cut=0.5"],  # its rank masks and whether the cut happened are checkpointed
    # Random Search: the proxy-scored choice and its scores live in the checkpoint, not redone.
    ["method=random_search", "method.candidates=3", "distribution.dense_first=false", "distribution.dense_last=false"],
]


def kill_when(proc: subprocess.Popen, root: Path, epochs_done: int, delay: float) -> bool:
    """SIGKILL `proc` `delay` s after its run has logged `epochs_done` epochs; False if it ended first."""
    while proc.poll() is None:
        metrics = list(root.rglob(results.METRICS_FILE))
        if len(results.read_jsonl(metrics[0]) if metrics else []) >= epochs_done:
            time.sleep(delay)
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()
    return False


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS_WITH_STATE, ids=lambda m: "-".join(a.split("=")[1] for a in m[:2]))
def test_sigkill_at_random_points_resumes_to_identical_result(method, tmp_path):
    """Killed during start-up, mid-epoch and around checkpoints, then resumed to the end."""
    args = [*method, *TINY]
    whole = launch(args, tmp_path / "whole")
    assert whole.wait() == 0, whole.stderr.read()
    rng = random.Random(" ".join(method))
    root = tmp_path / "killed"
    start_up = launch(args, root)
    time.sleep(rng.uniform(0.5, 2.0))  # usually still importing, sometimes training
    start_up.send_signal(signal.SIGKILL)
    start_up.wait()
    kills = 0
    for epochs_done in sorted(rng.sample(range(0, 5), 3)):
        kills += kill_when(launch(args, root), root, epochs_done, rng.uniform(0.0, 0.3))
    final = launch(args, root)
    assert final.wait() == 0, final.stderr.read()
    assert kills >= 1
    killed = the_run(root)
    assert_same_result(the_run(tmp_path / "whole"), killed)
    assert not list(killed.glob(".*.tmp")) and not (killed / results.CHECKPOINT_FILE).exists()


def test_processes_probing_one_run_directory_at_once_all_succeed(tmp_path):
    """Each launch checks that it can write the run directory; concurrent checks (two launches of
    one config) must not trip over each other's probe file."""
    errors = []

    def probe_repeatedly():
        for _ in range(300):
            try:
                results.create_run_dir(tmp_path / "run")
            except UserError as exc:
                errors.append(str(exc))
                return

    threads = [threading.Thread(target=probe_repeatedly) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and list((tmp_path / "run").iterdir()) == []  # and no probe left behind


@pytest.mark.slow
def test_two_launches_of_one_config_train_it_once(tmp_path):
    args = ["method=gmp", *TINY]
    first, second = launch(args, tmp_path), launch(args, tmp_path)
    outputs = [p.communicate() for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    run = the_run(tmp_path)
    assert [r["epoch"] for r in results.read_jsonl(run / results.METRICS_FILE)] == [1, 2, 3, 4, 5]
    said = " ".join(out for out, _ in outputs)
    assert "another process is training this run" in said or "already complete" in said


@pytest.mark.slow
def test_parallel_sweep_into_one_tree_never_clobbers(tmp_path):
    procs = [launch(["-m", f"method={m}", "seed=0,1", *TINY], tmp_path) for m in ("static", "gmp")]
    assert all(p.wait() == 0 for p in procs)
    finals = list(tmp_path.rglob(results.FINAL_FILE))
    assert len(finals) == 4 and all(json.loads(f.read_text())["status"] == "completed" for f in finals)


@pytest.mark.slow
def test_nan_loss_marks_the_run_diverged_and_the_report_lists_it(tmp_path, capsys):
    assert cli.main(["train", "method=static", "optimizer.lr=1e12", *TINY, f"results_root={tmp_path}"]) == 0
    run = the_run(tmp_path)
    final = json.loads((run / results.FINAL_FILE).read_text())
    assert final["status"] == "diverged" and final["diverged_at_step"] >= 0 and final["test_acc"] is None
    assert not (run / results.MODEL_FILE).exists()
    capsys.readouterr()
    assert report.main([str(tmp_path), "--no-plots"]) == 0
    assert "diverged" in capsys.readouterr().out


def test_unwritable_results_root_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = cli.main(["train", "method=static", *TINY, f"results_root={blocker}/results"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a writable directory" in err, err


def test_full_disk_mid_run_is_one_line_and_no_result(tmp_path, capsys, monkeypatch):
    real = results.atomic_write_bytes

    def disk_full_on_checkpoint(path, data):
        if path.name == results.CHECKPOINT_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(results, "atomic_write_bytes", disk_full_on_checkpoint)
    assert cli.main(["train", "method=static", *TINY, f"results_root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    assert not list(tmp_path.rglob(results.FINAL_FILE))


def test_torn_metrics_line_is_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert results.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
