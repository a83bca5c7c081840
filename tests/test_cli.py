"""The `sparsebench train` command end to end: bad input, the files a run writes, resume, sweeps."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsebench import cli, results
from sparsebench.sparse.masked import target_nnz
from cli_process import run_cli

FAST = ["epochs=2", "dataset.num_samples=600", "progress=none"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(results.CONFIG_FILE))


# ------------------------------------------------------------------------------ bad input
BAD_INPUTS = {
    "sparsity=1.5": "sparsity=1.5: expected a fraction of zeros in [0, 1)",
    "sparsity=-0.1": "sparsity=-0.1: expected a fraction of zeros in [0, 1)",
    "sparsity=1.0": "sparsity=1.0: expected a fraction of zeros in [0, 1)",
    "sparsity=abc": "sparsity='abc': expected a finite number",
    "method=nonexistent": "Could not find 'method/nonexistent'",
    "model=nope": "Could not find 'model/nope'",
    "epochs=0": "epochs=0: expected a positive integer",
    "sparsty=0.9": "unknown key 'sparsty'",
    "method.kapa=2": "unknown key 'method.kapa'",
    "optimizer.lr=-1": "optimizer.lr=-1.0: expected a positive learning rate",
    "distribution=global": "distribution=global picks layer densities from trained weights",
    # Issue #8: optimizer ranges, seeds, deleted keys, NaN/inf anywhere a number is read.
    "optimizer.weight_decay=-1": "optimizer.weight_decay=-1.0: expected a value >= 0",
    "optimizer.momentum=-0.1": "optimizer.momentum=-0.1: expected a value in [0, 1)",
    "optimizer.momentum=1": "optimizer.momentum=1.0: expected a value in [0, 1)",
    "seed=4294967296": "seed=4294967296: expected an integer in [0, 4294967295]",
    "seed=-1": "seed=-1: expected an integer in [0, 4294967295]",
    "seed=123456789012345678901234": "seed=123456789012345678901234: expected an integer in [0, 4294967295]",
    "~sparsity": "sparsity was removed from the config (~sparsity); it is required",
    "~epochs": "epochs was removed from the config (~epochs); it is required",
    "optimizer.lr=nan": "optimizer.lr=nan: expected a finite number",
    "optimizer.lr=inf": "optimizer.lr=inf: expected a finite number",
    "schedule.warmup_epochs=nan": "schedule.warmup_epochs=nan: expected a finite number",
    "powerprop=nan": "powerprop=nan: expected a finite number",
    "powerprop=inf": "powerprop=inf: expected a finite number",
    "sparsity=nan": "sparsity=nan: expected a finite number",
    "label_smoothing=-inf": "label_smoothing=-inf: expected a finite number",
    "schedule.min_lr=1": "schedule.min_lr=1.0: expected a value in [0, optimizer.lr=0.1]",
    "model.channels=nan": "model.channels=nan: expected an integer",
    "model.channels=abc": "model.channels='abc': expected an integer",
    "dataset.num_samples=1.5": "dataset.num_samples=1.5: expected an integer",
    "dataset.download=maybe": "dataset.download='maybe': expected true or false",
}
MULTI_OVERRIDE_BAD_INPUTS = {
    ("distribution=erk", "distribution.erk_power_scale=nan"): "distribution.erk_power_scale=nan: expected a finite",
    ("distribution=erk", "distribution.erk_power_scale=-1"): "distribution.erk_power_scale=-1.0: expected a value >= 0",
    ("schedule=multistep", "schedule.gamma=-1"): "schedule.gamma=-1.0: expected a decay factor in (0, 1]",
    ("schedule=multistep", "schedule.gamma=0"): "schedule.gamma=0.0: expected a decay factor in (0, 1]",
    ("schedule=multistep", "schedule.milestones=[5,3]"): "schedule.milestones=[5, 3]: expected increasing epoch",
    ("optimizer=adam", "optimizer.beta1=1"): "optimizer.beta1=1.0: expected a value in [0, 1)",
    ("optimizer=adamw", "optimizer.beta2=-0.5"): "optimizer.beta2=-0.5: expected a value in [0, 1)",
    ("optimizer=adam", "optimizer.eps=0"): "optimizer.eps=0.0: expected a positive number",
    ("optimizer.momentum=0", "optimizer.nesterov=true"): "optimizer.nesterov=true needs optimizer.momentum > 0",
}


@pytest.mark.parametrize("override", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_any_directory(override, tmp_path, capsys):
    code = cli.main(["train", override, f"results_root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and BAD_INPUTS[override] in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides", list(MULTI_OVERRIDE_BAD_INPUTS))
def test_bad_option_combinations_are_one_line_before_any_directory(overrides, tmp_path, capsys):
    code = cli.main(["train", *overrides, f"results_root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and MULTI_OVERRIDE_BAD_INPUTS[overrides] in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset=cifar10", "model=resnet20", "dataset.data_dir={empty}"], "dataset 'cifar10' not found or incomplete in"),
        (["dataset=npz", "dataset.path=/nonexistent/data.npz"], "/nonexistent/data.npz"),
        (["dataset=cifar10", "dataset.data_dir=/nonexistent/dir"], "dataset.data_dir"),
        (["method.kappa=5"], "method.kappa=5 is larger than the number of prunable layers (3)"),
        (["-m", "seed=0,1", "sparsity=0.8,1.2"], "sparsity=1.2: expected"),
    ],
)
def test_data_and_model_errors_are_one_line_in_a_real_process(overrides, message, tmp_path):
    (tmp_path / "empty").mkdir()
    overrides = [o.format(empty=tmp_path / "empty") for o in overrides]
    proc = run_cli("train", *overrides, f"results_root={tmp_path}", "progress=none")
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert run_dirs(tmp_path) == []


# ------------------------------------------------------------------------------ runs
def prunable_zero_count(model_file: Path, names) -> tuple[int, int]:
    state = torch.load(model_file, map_location="cpu")
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    return zeros, sum(state[n].numel() for n in names)


@pytest.mark.slow
def test_main_job_meets_the_readme_promise(tmp_path):
    """README's first command: gap at 0.9 on the embedded default, complete and honest."""
    proc = run_cli("train", "method=gap", "sparsity=0.9", f"results_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(tmp_path)
    assert "gap" in run.parts and "sparsity=0.9" in run.parts and run.name.startswith("seed=0-")
    final = json.loads((run / "final.json").read_text())
    required = {"status", "method", "sparsity", "actual_sparsity", "test_acc", "best_test_acc", "train_flops",
                "train_flops_dense", "wall_time_s", "seed", "layer_densities"}
    assert required <= final.keys()
    assert final["status"] == "completed" and final["method"] == "gap" and final["sparsity"] == 0.9
    assert abs(final["actual_sparsity"] - 0.9) < 0.001
    zeros, total = prunable_zero_count(run / "model.pt", final["layer_densities"])
    assert zeros / total == pytest.approx(final["actual_sparsity"], abs=1e-9)
    assert final["test_acc"] > 60.0  # 10 classes: chance is 10 %
    assert final["train_flops"] < final["train_flops_dense"]
    metrics = results.read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, 41))
    assert {"lr", "train_loss", "train_acc", "test_loss", "test_acc", "actual_sparsity", "layer_densities",
            "weights_changed", "wall_time_s", "step"} <= metrics[0].keys()
    assert sum(m["weights_changed"] for m in metrics) > 0  # GaP's masks moved
    assert not (run / "checkpoint.pt").exists()
    assert (run / "config.yaml").read_text().count("name: gap") == 1
    updates = results.read_jsonl(run / "mask_updates.jsonl")
    # One per GaP step after the first: partition 0 starts dense, so step 0 changes no mask.
    assert [u["step"] for u in updates] == [160, 320, 480, 640, 800, 960]
    assert 0 < final["ece"] < 100 and 0.1 < final["itop_rate"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gmp", "magnitude", "static"])
def test_sparse_methods_write_exact_zero_models(method, tmp_path):
    assert cli.main(["train", f"method={method}", "sparsity=0.8", f"results_root={tmp_path}", *FAST]) == 0
    (run,) = run_dirs(tmp_path)
    final = json.loads((run / "final.json").read_text())
    state = torch.load(run / "model.pt")
    for name in final["layer_densities"]:
        assert int(state[name].count_nonzero()) <= target_nnz(state[name].numel(), 0.2)
    assert final["actual_sparsity"] >= 0.8 - 1e-3


@pytest.mark.slow
def test_killed_run_resumes_to_identical_result(tmp_path, monkeypatch):
    args = ["train", "method=gap", "method.rounds=1", "epochs=4", "dataset.num_samples=600", "progress=none"]
    assert cli.main([*args, f"results_root={tmp_path / 'whole'}"]) == 0
    (whole,) = run_dirs(tmp_path / "whole")

    calls = {"n": 0}
    real_save = results.atomic_torch_save

    def crash_on_third_checkpoint(path, obj):
        if path.name == results.CHECKPOINT_FILE:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # killed after epoch 3's metrics line, before its checkpoint
        real_save(path, obj)

    monkeypatch.setattr(results, "atomic_torch_save", crash_on_third_checkpoint)
    assert cli.main([*args, f"results_root={tmp_path / 'killed'}"]) == 130  # Ctrl-C: one line, exit 130
    (killed,) = run_dirs(tmp_path / "killed")
    assert not (killed / "final.json").exists() and (killed / "checkpoint.pt").exists()
    monkeypatch.setattr(results, "atomic_torch_save", real_save)
    assert cli.main([*args, f"results_root={tmp_path / 'killed'}"]) == 0

    a = json.loads((whole / "final.json").read_text())
    b = json.loads((killed / "final.json").read_text())
    for key in ("test_acc", "best_test_acc", "actual_sparsity", "train_flops", "layer_densities"):
        assert a[key] == b[key], key
    sa, sb = torch.load(whole / "model.pt"), torch.load(killed / "model.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    metrics = results.read_jsonl(killed / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]  # the redone epoch 3 is not duplicated


@pytest.mark.slow
def test_completed_run_is_skipped_and_dense_ignores_sparsity(tmp_path, capsys):
    args = ["train", "-m", "method=dense", "sparsity=0.8,0.9", f"results_root={tmp_path}", *FAST]
    assert cli.main(args) == 0
    (run,) = run_dirs(tmp_path)  # both sweep points are the same dense run, stored at sparsity 0
    assert "sparsity=0" in run.parts
    assert "already complete, skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_multirun_writes_one_directory_per_config(tmp_path):
    proc = run_cli("train", "-m", "method=static,gmp", "seed=0,1", f"results_root={tmp_path}", *FAST)
    assert proc.returncode == 0, proc.stderr
    runs = run_dirs(tmp_path)
    assert len(runs) == 4 and all((r / "final.json").is_file() for r in runs)
    assert {r.parts[-3] for r in runs} == {"static", "gmp"}
    (sweep,) = (tmp_path / "default" / ".multirun").iterdir()
    assert [p.name for p in sweep.iterdir()] == ["multirun.yaml"]  # no empty per-job folders left behind


def test_train_help_describes_sparsebench(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sparsebench train: train one sparse network") and "powered by Hydra" not in out
    assert "docs/methods.md" in out


@pytest.mark.slow
def test_submitit_launcher_runs_the_sweep(tmp_path):
    """The real Hydra submitit plugin (its local executor runs the SLURM code path on one machine)."""
    proc = run_cli("train", "-m", "hydra/launcher=submitit_local", "method=static,gmp", f"results_root={tmp_path}",
                   *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = run_dirs(tmp_path)
    assert len(runs) == 2 and all((r / "final.json").is_file() for r in runs)


def test_cfg_job_shows_the_composed_config():
    proc = run_cli("train", "--cfg", "job", "method=gmp", "sparsity=0.95")
    assert proc.returncode == 0
    assert "name: gmp" in proc.stdout and "sparsity: 0.95" in proc.stdout and "frequency: 100" in proc.stdout


def test_cfg_job_reads_a_preset_without_its_dataset(tmp_path):
    # Printing builds nothing, so a CIFAR preset can be read before the data is there; keys and
    # values are still checked (what needs the model, such as GaP's kappa against its layers, is
    # checked when the run is launched).
    missing = tmp_path / "no_data"
    proc = run_cli("train", "--cfg", "job", "experiment=cifar10_resnet32_gap", f"dataset.data_dir={missing}")
    assert proc.returncode == 0, proc.stderr
    assert "name: cifar10" in proc.stdout and "rounds: 10" in proc.stdout and "epochs: 350" in proc.stdout
    assert not missing.exists()
    bad = run_cli("train", "--cfg", "job", "experiment=cifar10_resnet32_gap", "sparsity=1.5")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "sparsity=1.5" in bad.stderr


def test_user_config_dir_adds_methods(tmp_path):
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "fast_gmp.yaml").write_text("name: gmp\nfrequency: 5\nbegin: 0.1\nend: 0.5\n")
    proc = run_cli("train", "--config-dir", str(tmp_path), "method=fast_gmp", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "frequency: 5" in proc.stdout
    code = cli.main(["train", "--config-dir", str(tmp_path), "method=fast_gmp", "method.frequency=abc"])
    assert code == 2  # the user's configs are validated like ours


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path):
    """conf/ and every subpackage must be inside the installed package, not only in the source
    tree (sparsebench.search was once left out of pyproject's package list)."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy without build/: setuptools would pack files left there by an earlier build
    for folder in ("conf", "sparsebench"):
        shutil.copytree(root / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True)
    assert (tmp_path / "site" / "sparsebench" / "conf" / "method" / "gap.yaml").is_file()
    for init in (root / "sparsebench").rglob("__init__.py"):
        assert (tmp_path / "site" / "sparsebench" / init.relative_to(root / "sparsebench")).is_file(), init.parent.name
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-m", "sparsebench", "train", "--cfg", "job"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and "name: gap" in proc.stdout, proc.stderr


EXPERIMENTS = sorted(p.stem for p in (Path(cli.CONFIG_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_presets_compose_for_every_method(experiment):
    from sparsebench.config import validate
    from sparsebench.methods import METHODS

    for method in METHODS.names():
        cfg = cli.resolve(cli.compose_config([f"experiment={experiment}", f"method={method}", "epochs=7"]))
        validate(cfg)
        assert cfg["exp"] == experiment and cfg["epochs"] == 7  # the command line wins over the preset
