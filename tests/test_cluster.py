"""Sweeps through cluster launchers: a real SLURM, submitit's local executor, joblib.

A job preempted while it trains (USR2, the signal SLURM sends before a time limit or an
administrator sends to preempt) must come back through the launcher's own requeue, resume from
its run's last checkpoint and end bit-identical to an uninterrupted local run of the same config;
jobs that run side by side must not clobber each other nor oversubscribe the cores.

The SLURM test runs whenever `sbatch` reaches a cluster (`scripts/local_slurm.sh start` makes a
one-machine cluster; CI does that) and skips with a one-line reason otherwise; with
SPARSEBENCH_REQUIRE_SLURM=1 (set by CI once the cluster started) it fails instead of skipping.
On a real cluster, SPARSEBENCH_SLURM_TEST_DIR must name a directory the compute nodes share
(pytest's tmp_path is usually node-local), and SPARSEBENCH_SLURM_TEST_OVERRIDES adds launcher
overrides, e.g. "hydra.launcher.partition=debug".

Thread counts are pinned to one everywhere (results are bit-identical only at equal thread counts).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsebench import results

SWEEP = ["method=gmp,rigl", "seed=0,1"]  # 2 methods x 2 seeds
EPOCHS = 16
# About 0.25 s an epoch on one thread: a job trains for a few seconds, long enough to be caught
# between its first checkpoint and its end.
TINY = ["dataset.num_samples=2000", f"epochs={EPOCHS}", "batch_size=64", "progress=none"]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
ONE_THREAD = {var: "1" for var in THREAD_VARS}
COMPARED = ("test_acc", "best_test_acc", "test_loss", "ece", "actual_sparsity", "itop_rate", "train_flops",
            "layer_densities", "steps")
RESUMING = re.compile(r"resuming (\S+) from epoch (\d+)")
SWEEP_TIMEOUT_S = 900


def launch(args: list[str], log: Path, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()) -> subprocess.Popen:
    """`sparsebench train ARGS` in its own process group (so a failed test can end all of it), its
    output to a file (a pipe nobody reads while the sweep runs could fill up and block it)."""
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(env or {})
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sparsebench", "train", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def finish(proc: subprocess.Popen, timeout: float = SWEEP_TIMEOUT_S) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_group(proc)
        pytest.fail(f"sweep still running after {timeout} s:\n{output(proc)[-4000:]}")
    assert proc.returncode == 0, output(proc)[-4000:]
    return output(proc)


def end_group(proc: subprocess.Popen) -> None:
    """A test that failed half-way: its sweep process and everything it started (same group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def override_value(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(f"{key}="))


def run_of(root: Path, overrides: list[str]) -> Path | None:
    """The run directory of a job: results_root/exp/dataset/model/METHOD/sparsity=S/seed=K-HASH."""
    method, seed = override_value(overrides, "method"), override_value(overrides, "seed")
    found = list(root.glob(f"*/*/*/{method}/sparsity=*/seed={seed}-*"))
    return found[0] if len(found) == 1 else None


def run_dirs(root: Path) -> dict[Path, Path]:
    return {p.parent.relative_to(root): p.parent for p in root.rglob(results.FINAL_FILE)}


def assert_same_runs(root: Path, reference: Path, expected: int) -> None:
    """Every run's final.json metrics and every tensor of model.pt equal the uninterrupted run's."""
    runs, ref = run_dirs(root), run_dirs(reference)
    assert len(runs) == expected and set(runs) <= set(ref), (sorted(runs), sorted(ref))
    for rel, run in runs.items():
        fa, fb = (json.loads((p / results.FINAL_FILE).read_text()) for p in (run, ref[rel]))
        assert fa["status"] == "completed", fa["status"]
        for key in COMPARED:
            assert fa[key] == fb[key], f"{rel}: {key} {fa[key]} != {fb[key]}"
        ma = torch.load(run / results.MODEL_FILE, weights_only=True)
        mb = torch.load(ref[rel] / results.MODEL_FILE, weights_only=True)
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma), rel
        epochs = [r["epoch"] for r in results.read_jsonl(run / results.METRICS_FILE)]
        assert epochs == list(range(1, EPOCHS + 1)), (rel, epochs)  # each epoch logged once


class Reference:
    """Uninterrupted runs of the sweep's configs: one local sweep, one thread, started once per
    module and left running beside the test that needs it first."""

    def __init__(self, root: Path):
        self.root_dir, self.proc = root, None

    def start(self) -> "Reference":
        if self.proc is None:
            self.proc = launch(["-m", *SWEEP, *TINY, f"results_root={self.root_dir}",
                                f"hydra.sweep.dir={self.root_dir}/.sweep"], self.root_dir / "sweep.log", env=ONE_THREAD)
        return self

    def root(self) -> Path:
        finish(self.start().proc)
        return self.root_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc is not None:
        end_group(ref.proc)


# ------------------------------------------------------------------ preempt one job of a sweep
def submitted_jobs(sweep_dir: Path, cache: dict) -> dict[str, list[str]]:
    """job id -> the job's overrides, from submitit's pickles (.submitit/<job id>/<job id>_submitted.pkl)."""
    from submitit.core.utils import DelayedSubmission

    for pickle in sweep_dir.glob(".submitit/*/*_submitted.pkl"):
        job_id = pickle.parent.name
        if job_id not in cache:
            try:
                cache[job_id] = list(DelayedSubmission.load(pickle).args[0])
            except (OSError, EOFError):
                continue  # being written
    return cache


def preempt_one(proc: subprocess.Popen, sweep_dir: Path, runs: Path, send) -> tuple[str, Path, int]:
    """Signal one job once its run has a checkpoint (>= 1 epoch) and several epochs left to train."""
    cache: dict = {}
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the sweep ended before any job could be preempted:\n" + output(proc)[-4000:])
        for job_id, overrides in sorted(submitted_jobs(sweep_dir, cache).items()):
            run = run_of(runs, overrides)
            if run is None or results.is_complete(run) or not (run / results.CHECKPOINT_FILE).is_file():
                continue
            done = len(results.read_jsonl(run / results.METRICS_FILE))
            if 1 <= done <= EPOCHS - 6:
                send(job_id)
                return job_id, run, done
        time.sleep(0.05)
    pytest.fail(f"no job of the sweep reached its first checkpoint within {SWEEP_TIMEOUT_S} s")


def job_log(sweep_dir: Path, job_id: str) -> str:
    """The job's stdout: submitit's messages and the trainer's, all of its runs (appended on requeue)."""
    log = sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.out"
    return log.read_text(errors="replace") if log.is_file() else ""


def wait_for_resume(proc: subprocess.Popen, sweep_dir: Path, job_id: str) -> float | None:
    """Seconds from the signal until the requeued job printed `resuming ...` (None if the sweep ended first)."""
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < SWEEP_TIMEOUT_S:
        if RESUMING.search(job_log(sweep_dir, job_id)):
            return time.monotonic() - start
        time.sleep(0.2)
    return None


def assert_requeued_and_resumed(log: str, run: Path, epochs_at_signal: int) -> int:
    """Preempted once (not a timeout), requeued once, resumed once from a checkpoint."""
    assert len(re.findall(r"^submitit WARNING .* Caught signal SIGUSR2 .*: this job is preempted", log, re.M)) == 1, log
    assert len(re.findall(r"^submitit INFO .* Requeued job ", log, re.M)) == 1, log
    resumed = [(Path(m.group(1)), int(m.group(2))) for m in RESUMING.finditer(log)]
    assert len(resumed) == 1 and resumed[0][0].resolve() == run.resolve(), (resumed, log[-4000:])
    epoch = resumed[0][1]
    # From its checkpoint, not from scratch: the signal may have come while the checkpoint of the
    # last logged epoch was being written, so that one or the one before.
    assert max(1, epochs_at_signal - 1) <= epoch < EPOCHS, (epochs_at_signal, epoch)
    return epoch


def run_preempted_sweep(tmp: Path, launcher: list[str], send, reference: Reference, label: str) -> None:
    reference.start()
    sweep_dir, runs = tmp / "sweep", tmp / "runs"
    tmp.mkdir(parents=True, exist_ok=True)
    args = ["-m", *launcher, *SWEEP, *TINY, f"results_root={runs}", f"hydra.sweep.dir={sweep_dir}"]
    started = time.monotonic()
    proc = launch(args, tmp / "sweep.log", env=ONE_THREAD)
    try:
        job_id, run, done = preempt_one(proc, sweep_dir, runs, send)
        delay = wait_for_resume(proc, sweep_dir, job_id)
        finish(proc)
    finally:
        end_group(proc)
    epoch = assert_requeued_and_resumed(job_log(sweep_dir, job_id), run, done)
    assert_same_runs(runs, reference.root(), expected=4)
    print(f"\n{label}: sweep of 4 jobs in {time.monotonic() - started:.0f} s; job {job_id} preempted after "
          f"{done} epoch(s), requeued, resumed from epoch {epoch} {delay or float('nan'):.1f} s after the signal; "
          "4/4 runs identical to uninterrupted runs")


# ------------------------------------------------------------------------------------- SLURM
def slurm_unavailable() -> str | None:
    """Why no SLURM cluster can be used from here, in one line; None when sbatch reaches one."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (scripts/local_slurm.sh start sets up a one-machine SLURM)"
    try:
        probe = subprocess.run(["sbatch", "--test-only", "--wrap=true"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sbatch --test-only got no answer from a SLURM controller within 30 s"
    if probe.returncode != 0:
        lines = [line.strip() for line in probe.stderr.splitlines() if line.strip()]
        return f"sbatch cannot reach a SLURM cluster: {lines[-1] if lines else f'exit code {probe.returncode}'}"
    return None


@pytest.mark.slow
def test_slurm_preempted_job_is_requeued_and_resumes_identically(tmp_path, reference):
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("SPARSEBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    shared = os.environ.get("SPARSEBENCH_SLURM_TEST_DIR")
    tmp = Path(shared) / f"test_cluster-{os.getpid()}-{time.time_ns()}" if shared else tmp_path
    launcher = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                "hydra.launcher.timeout_min=60", "hydra.launcher.name=sparsebench-test",
                *shlex.split(os.environ.get("SPARSEBENCH_SLURM_TEST_OVERRIDES", ""))]

    def scancel_usr2(job_id: str) -> None:
        # One try. For a task of an array that still has pending tasks, SLURM 22.05 delivers the
        # signal but answers "Job can not be altered now, try again later", and scancel then
        # retries for about 35 s, which would signal the requeued job again.
        try:
            subprocess.run(["scancel", "--signal=USR2", job_id], capture_output=True, timeout=3)
        except subprocess.TimeoutExpired:
            pass

    try:
        run_preempted_sweep(tmp, launcher, scancel_usr2, reference, "SLURM")
    finally:
        jobs = {p.name.split("_")[0] for p in (tmp / "sweep" / ".submitit").glob("*_*")}
        if jobs:  # nothing of a failed test stays queued
            subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=60)
    if shared:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------- submitit local executor
def children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", text, re.MULTILINE):
            found.append(int(status.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to find the job's task process")
def test_submitit_local_preempted_job_is_requeued_and_resumes_identically(tmp_path, reference):
    def usr2_to_task(job_id: str) -> None:
        # submitit_local: the job id is the pid of a controller whose child is the task process;
        # the controller restarts the task when it exits with submitit's requeue code.
        (task,) = children(int(job_id))
        os.kill(task, signal.SIGUSR2)

    run_preempted_sweep(tmp_path, ["hydra/launcher=submitit_local"], usr2_to_task, reference, "submitit_local")


# ------------------------------------------------------------------------------------ joblib
def loky_worker_threads(pid: int) -> set[str]:
    """OMP_NUM_THREADS as joblib's loky workers (children of the sweep process) were started with."""
    seen = set()
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"popen_loky_posix" in cmdline:  # a worker (not loky's resource tracker)
            seen.add(next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"OMP_NUM_THREADS=")), "unset"))
    return seen


@pytest.mark.slow
def test_joblib_runs_jobs_side_by_side_without_clobbering_or_oversubscribing(tmp_path, reference):
    """n_jobs = the cores, so loky gives each worker cores // n_jobs = 1 thread (OMP/MKL_NUM_THREADS,
    unset here so loky chooses); the first two jobs are the same run, so they start together and
    the run lock lets one train it."""
    import joblib

    reference.start()
    runs = tmp_path / "runs"
    n_jobs = joblib.cpu_count()
    proc = launch(["-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", "method=gmp,gmp,rigl", "seed=0",
                   *TINY, f"results_root={runs}", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path / "sweep.log",
                  drop=THREAD_VARS)
    threads: set[str] = set()
    try:
        while proc.poll() is None:
            threads |= loky_worker_threads(proc.pid)
            time.sleep(0.2)
        out = finish(proc)
    finally:
        end_group(proc)
    assert threads == {"1"}, threads
    assert len(re.findall(r"^done: ", out, re.MULTILINE)) == 2, out
    assert ("another process is training this run" in out) or ("already complete, skipped" in out), out
    assert_same_runs(runs, reference.root(), expected=2)
