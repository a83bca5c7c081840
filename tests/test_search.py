"""`sparsebench search`: Random Search's node masks and arms, EvoPress's levels, mutation,
selection and output, determinism, SIGKILL-resume, the training split only, bad input."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsebench import cli, results, sweep_status
from sparsebench.config import validate
from sparsebench.methods.node_masks import RandomNodes
from sparsebench.search import evopress
from sparsebench.search.evopress import LevelDatabase, mutate, unique_offspring
from sparsebench.search.job import run_search
from sparsebench.train import build_run
from cli_process import run_cli

FAST = ["dataset.num_samples=600", "progress=none", "epochs=1"]
EVO_FAST = ["method=evopress", "method.generations=12", "method.offspring=6", "method.survivors=[3,1]",
            "method.stage_examples=[64,200]", "method.checkpoint_every=3"]


def resolved_of(overrides: list[str]) -> dict:
    return cli.resolve(cli.compose_config(overrides))


# ------------------------------------------------------------------ EvoPress's levels and mutation
def database(sizes: list[int], sparsity: float, step: int) -> LevelDatabase:
    base = [results_target(n, sparsity) for n in sizes]
    low = [-((n - b) // step) for n, b in zip(sizes, base)]
    high = [(b - 1) // step for b in base]
    return LevelDatabase([f"t{i}" for i in range(len(sizes))], sizes, base, step, low, high)


def results_target(numel: int, sparsity: float) -> int:
    from sparsebench.sparse.masked import target_nnz

    return target_nnz(numel, 1.0 - sparsity)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(50, 50_000), min_size=2, max_size=12),
    sparsity=st.floats(0.05, 0.98),
    step=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    rounds=st.integers(1, 30),
)
def test_level_switch_mutation_keeps_the_global_count_exact(sizes, sparsity, step, seed, rounds):
    db = database(sizes, sparsity, step)
    budget = sum(db.base)
    generator = torch.Generator().manual_seed(seed)
    levels = [0] * len(sizes)
    for _ in range(rounds):  # a chain of mutations: every step stays in range and on budget
        levels = mutate(levels, db, 3, generator)
        assert sum(levels) == 0
        assert sum(db.nnz(levels)) == budget
        assert all(lo <= k <= hi for k, lo, hi in zip(levels, db.low, db.high))
        assert all(1 <= c <= n for c, n in zip(db.nnz(levels), sizes))


def test_offspring_are_distinct_and_differ_from_the_parent():
    db = database([1000, 2000, 3000], 0.9, 10)
    children = unique_offspring([0, 0, 0], db, 16, 3, torch.Generator().manual_seed(0))
    assert len(children) == 16
    assert len({tuple(c) for c in children}) == 16 and (0, 0, 0) not in {tuple(c) for c in children}


def test_level_database_from_a_model_and_its_unreachable_sparsity():
    cfg = validate(resolved_of(["method=dense", *FAST]))
    engine = build_run(cfg, with_optimizer=False).engine
    options = evopress.EvoPressOptions()
    db = evopress.level_database(engine, 0.9, options)
    smallest = min(db.numel)
    assert db.step == math.floor(0.5 * 0.1 * smallest / options.levels)  # the auto rule
    assert db.base == [results_target(n, 0.9) for n in db.numel]
    with pytest.raises(Exception, match="cannot reach any allocation but the uniform one"):
        evopress.level_database(engine, 0.9, evopress.EvoPressOptions(step=10**7))


# ------------------------------------------------------------------ EvoPress end to end
def evopress_dir(root: Path) -> Path:
    (path,) = [p.parent for p in root.rglob(results.FINAL_FILE) if "/evopress/" in str(p)]
    return path


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


@pytest.mark.slow
def test_evopress_writes_densities_that_train_with_exact_counts_and_is_deterministic(tmp_path):
    for name in ("a", "b"):
        proc = run_cli("search", *EVO_FAST, *FAST, f"results_root={tmp_path / name}")
        assert proc.returncode == 0, proc.stderr
    first, second = evopress_dir(tmp_path / "a"), evopress_dir(tmp_path / "b")
    assert (first / "densities.yaml").read_text().split("\n", 1)[1] == (second / "densities.yaml").read_text().split("\n", 1)[1]
    assert without_time(results.read_jsonl(first / results.METRICS_FILE)) == \
        without_time(results.read_jsonl(second / results.METRICS_FILE))
    final = json.loads((first / results.FINAL_FILE).read_text())
    assert final["kind"] == "search" and final["search"]["generations"] == 12
    assert len(results.read_jsonl(first / results.METRICS_FILE)) == 13  # generation 0 (uniform) .. 12
    assert not (first / "search_state.pt").exists()  # the checkpoint goes once final.json is there
    nnz = final["search"]["nnz"]
    densities = yaml.safe_load((first / "densities.yaml").read_text())
    cfg = validate(resolved_of(["method=dense", *FAST]))
    numel = {n: t.param.numel() for n, t in build_run(cfg, with_optimizer=False).engine.tensors.items()}
    # The search kept the uniform allocation's global count exactly.
    assert sum(nnz.values()) == sum(results_target(n, 0.9) for n in numel.values())
    # The file round-trips into training: a static run has exactly those counts per tensor.
    proc = run_cli("train", "method=static", "distribution=custom", f"distribution.file='{first / 'densities.yaml'}'",
                   *FAST, f"results_root={tmp_path / 'train'}")
    assert proc.returncode == 0, proc.stderr
    (model_file,) = (tmp_path / "train").rglob(results.MODEL_FILE)
    weights = torch.load(model_file, weights_only=True)
    assert {name: int((weights[name] != 0).sum()) for name in densities} == nnz


@pytest.mark.slow
def test_evopress_killed_mid_search_resumes_to_the_same_result(tmp_path):
    # Train the dense arm first, so that the kill lands inside the search itself.
    root = tmp_path / "killed"
    assert run_cli("train", "method=dense", *FAST, f"results_root={root}").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "sparsebench", "search", *EVO_FAST, *FAST,
                             "method.generations=150", f"results_root={root}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            states = list(root.rglob("search_state.pt"))
            metrics = list(root.rglob(f"evopress/**/{results.METRICS_FILE}"))
            if states and metrics and len(results.read_jsonl(metrics[0])) >= 8:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    search_dir = evopress_dir_or_running(root)
    assert not (search_dir / results.FINAL_FILE).exists()
    resumed = run_cli("search", *EVO_FAST, *FAST, "method.generations=150", f"results_root={root}")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at generation" in resumed.stdout
    full = run_cli("search", *EVO_FAST, *FAST, "method.generations=150", f"results_root={tmp_path / 'full'}")
    assert full.returncode == 0
    assert without_time(results.read_jsonl(search_dir / results.METRICS_FILE)) == \
        without_time(results.read_jsonl(evopress_dir(tmp_path / "full") / results.METRICS_FILE))
    assert (search_dir / "densities.yaml").read_text().split("\n", 1)[1] == \
        (evopress_dir(tmp_path / "full") / "densities.yaml").read_text().split("\n", 1)[1]


def evopress_dir_or_running(root: Path) -> Path:
    (path,) = [p.parent for p in root.rglob(results.CONFIG_FILE) if "/evopress/" in str(p)]
    return path


def test_calibration_batches_come_from_the_training_split_only(tmp_path, monkeypatch):
    """The test split is made unreadable; the search still runs, and every calibration index
    lies in the training split (the dense arm's evaluation is the one reader of the test split,
    so it is trained first, with the test split intact)."""
    from sparsebench import data as data_module

    overrides = [*EVO_FAST, "method.generations=3", *FAST, f"results_root={tmp_path}"]
    resolved = resolved_of(overrides)
    assert run_cli("train", "method=dense", *FAST, f"results_root={tmp_path}").returncode == 0
    real_load = data_module.load_dataset

    class Forbidden(torch.utils.data.Dataset):
        def __init__(self, size):
            self.size = size

        def __len__(self):
            return self.size

        def __getitem__(self, index):
            raise AssertionError("a search read the test split")

    def load_without_test(name, **options):
        bundle = real_load(name, **options)
        bundle.test = Forbidden(len(bundle.test))
        return bundle

    monkeypatch.setattr("sparsebench.train.load_dataset", load_without_test)
    drawn = []
    real_draw = evopress.FitnessScorer.draw_batch

    def record(self, examples, generator):
        real_draw(self, examples, generator)
        drawn.append((self.indices, len(self.train_split)))

    monkeypatch.setattr(evopress.FitnessScorer, "draw_batch", record)
    run_search(resolved)
    assert drawn and all(len(i) == len(set(i.tolist())) and 0 <= int(i.min()) and int(i.max()) < n for i, n in drawn)
    assert {len(i) for i, _ in drawn} == {64, 200}


# ------------------------------------------------------------------ Random Search
def node_run(overrides: list[str]):
    cfg = validate(resolved_of(["method=random_nodes", "distribution.dense_first=false",
                                "distribution.dense_last=false", *FAST, *overrides]))
    return build_run(cfg)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_node_masks_remove_whole_units_with_exact_counts(sparsity):
    run = node_run([f"sparsity={sparsity}"])
    method: RandomNodes = run.method
    units = method.draw()
    masks = method.weight_masks(units)
    tensors = list(run.engine.tensors.values())
    kept = method.kept_units()
    assert kept == [math.ceil((1 - sparsity) * t.param.shape[0] - 1e-9) for t in tensors[:-1]]
    for i, t in enumerate(tensors):
        rows = kept[i] if i < len(tensors) - 1 else t.param.shape[0]
        in_dim = t.param.shape[1]
        cols = in_dim if i == 0 else kept[i - 1] * in_dim // tensors[i - 1].param.shape[0]
        kernel = t.param[0, 0].numel()
        assert int(masks[t.name].sum()) == rows * cols * kernel
    assert method.densities_of(masks) == pytest.approx(method.planned_densities())


def test_a_removed_unit_has_no_effect_on_the_output():
    run = node_run(["sparsity=0.75"])
    method, model = run.method, run.model
    units = method.draw()
    masks = method.weight_masks(units)
    model.eval()
    x = torch.randn(8, *run.data.input_shape)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])
        before = model(x)
        first = list(run.engine.tensors.values())[0]
        removed = [u for u in range(first.param.shape[0]) if u not in set(units[0].tolist())]
        # A removed unit's own incoming weights are masked already; even were they not, the next
        # layer's columns are: perturb its batch norm shift, which reaches it whatever its weights.
        norm = dict(model.named_modules())["1"]
        norm.bias[removed] += 5.0
        after = model(x)
    assert torch.equal(before, after)


def test_random_nodes_is_candidate_zero_of_random_search():
    control = node_run(["sparsity=0.75"]).method.draw()
    searched = validate(resolved_of(["method=random_search", "distribution.dense_first=false",
                                     "distribution.dense_last=false", "sparsity=0.75", *FAST]))
    first = build_run(searched).method.draw()
    assert all(torch.equal(a, b) for a, b in zip(control, first))


@pytest.mark.slow
def test_random_search_trains_the_searched_the_control_and_the_parent(tmp_path):
    args = ["search", "method=random_search", "method.candidates=3", "sparsity=0.75", *FAST, f"results_root={tmp_path}"]
    planned = sweep_status.planned_runs(args[1:], search=True)  # `status search`: the three runs, none yet
    assert [p.parts[-3] for p in planned] == ["random_search", "random_nodes", "dense"]
    assert all(sweep_status.run_state(p)[0] == "missing" for p in planned)
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    finals = {p.parent.parent.parent.name: json.loads(p.read_text()) for p in tmp_path.rglob(results.FINAL_FILE)}
    assert set(finals) == {"random_search", "random_nodes", "dense"}
    info = finals["random_search"]["node_search"]
    assert len(info["scores"]) == 3 and info["chosen"] == min(range(3), key=lambda i: (info["scores"][i], i))
    assert info["search_flops"] > 0 and info["proxy_epochs_total"] == 3
    assert finals["random_search"]["sparsity"] == finals["random_nodes"]["sparsity"] == 0.75
    assert finals["random_search"]["actual_sparsity"] == finals["random_nodes"]["actual_sparsity"] > 0.75
    assert finals["dense"]["actual_sparsity"] == 0.0
    assert set(planned) == {p.parent for p in tmp_path.rglob(results.FINAL_FILE)}  # the planned directories
    again = run_cli(*args)  # deterministic, and every arm is skipped as done
    assert again.returncode == 0 and again.stdout.count("already complete, skipped") == 3
    report = run_cli("report", str(tmp_path))
    assert report.returncode == 0, report.stderr
    assert "Random Search: candidates scored by the proxy" in report.stdout


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("args, message", [
    (["method=random_search", "method.candidates=0"], "method.candidates=0: expected at least one node mask"),
    (["method=evopress", "method.step=10000000"], "cannot reach any allocation but the uniform one"),
    (["method=evopress", "sparsity=0"], "sparsity=0: EvoPress allocates a sparsity in (0, 1)"),
    (["method=evopress", "method.survivors=[4,2]", "method.stage_examples=[64,256]"], "expected non-increasing positive counts ending in 1"),
    (["method=evopress", "method.stage_examples=[10]"], "expected one survivor count per selection stage"),
    (["method=gmp"], "method=gmp is not a search; train method=gmp with `sparsebench train`"),
    (["method=evopress", "method.generation=3"], "unknown key 'method.generation'"),
])
def test_bad_search_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    proc = run_cli("search", *args, *FAST, f"results_root={tmp_path / 'r'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_search_is_not_a_training_method(tmp_path):
    proc = run_cli("train", "method=evopress", *FAST, f"results_root={tmp_path / 'r'}")
    assert proc.returncode == 2 and "method=evopress is a search" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_node_masks_need_every_layer_in_the_engine(tmp_path):
    proc = run_cli("train", "method=random_nodes", *FAST, f"results_root={tmp_path / 'r'}")
    assert proc.returncode == 2 and "distribution.dense_first=false distribution.dense_last=false" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_the_report_knows_every_search_with_a_directory_without_importing_it():
    from sparsebench.methods import METHODS
    from sparsebench.search import SEARCHES

    with_directory = {name for name in SEARCHES.names() if SEARCHES.get(name).has_directory}
    assert set(results.SEARCH_DIRECTORY_METHODS) == with_directory
    assert not with_directory & set(METHODS.names())


def test_search_help_describes_searches():
    proc = run_cli("search", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("sparsebench search: a search")
    assert "method: " in proc.stdout and "evopress" in proc.stdout
