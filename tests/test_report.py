"""`sparsebench report` on small synthetic results trees whose numbers are known exactly."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sparsebench.report import main

REPO = Path(__file__).resolve().parent.parent
DATASET, MODEL = "tiny_imagenet", "resnet20"  # the underscore checks LaTeX escaping
PAPER = {"source": "Evci et al. 2020", "test_acc": {"rigl": {0.9: 91.5}}}


def write_run(root: Path, method: str, sparsity: float, seed: int, final: dict | None, *,
              final_text: str | None = None, metrics: list[dict] | None = None, **config_extra) -> Path:
    """One run directory as the trainer writes it; `final=None` leaves the run unfinished."""
    run = root / "exp" / DATASET / MODEL / method / f"sparsity={sparsity}" / f"seed={seed}-{len(list(root.rglob('config.yaml'))):08x}"
    run.mkdir(parents=True)
    config = {
        "exp": "test", "seed": seed, "epochs": 3, "sparsity": sparsity, "paper": PAPER,
        "method": {"name": method, "update_frequency": 100}, "model": {"name": MODEL},
        "dataset": {"name": DATASET}, "distribution": {"name": "erk"}, **config_extra,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    curve = metrics if metrics is not None else [
        {"epoch": epoch, "step": 10 * epoch, "test_acc": 30.0 * epoch, "test_loss": 1.0 / epoch,
         "layer_densities": {"conv1.weight": 1.0, "fc.weight": 1 - sparsity}}
        for epoch in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in curve))
    if final_text is not None:
        (run / "final.json").write_text(final_text)
    elif final is not None:
        (run / "final.json").write_text(json.dumps(final))
    return run


def final(accuracy: float, *, flops: float, best: float | None = None, status: str = "completed", **extra) -> dict:
    return {
        "status": status, "test_acc": accuracy, "best_test_acc": accuracy + 1 if best is None else best,
        "test_loss": 0.5, "actual_sparsity": 0.9, "train_flops": flops, "train_flops_dense": 100.0,
        "wall_time_s": 10.0, "layer_densities": {"conv1.weight": 1.0, "fc.weight": 0.1}, **extra,
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for seed, accuracy in enumerate((93.0, 94.0, 95.0)):  # mean 94, std 1
        write_run(root, "dense", 0.0, seed, final(accuracy, flops=100.0, ece=0.05))
    for seed, accuracy in enumerate((90.0, 91.0, 92.0)):  # mean 91, std 1: 3 below dense
        write_run(root, "rigl", 0.9, seed, final(accuracy, flops=20.0))
    for seed, accuracy in enumerate((88.0, 89.0, 93.0)):  # mean 90, std sqrt(7)
        write_run(root, "set", 0.9, seed, final(accuracy, flops=25.0))
    for seed, accuracy in enumerate((85.0, 87.0)):  # seed 2 never ran
        write_run(root, "rigl", 0.95, seed, final(accuracy, flops=10.0))
    for seed, accuracy in enumerate((80.0, 81.0, 82.0)):  # mean 81, whatever the broken runs below say
        write_run(root, "set", 0.95, seed, final(accuracy, flops=12.0))
    write_run(root, "set", 0.95, 3, None, final_text='{"status": "completed", "test_acc": 1')
    write_run(root, "set", 0.95, 4, final(10.0, flops=12.0, status="diverged", diverged_at_step=42))
    write_run(root, "set", 0.95, 5, final(math.nan, flops=12.0))
    torn = [{"epoch": 1, "test_acc": 20.0}, {"epoch": 2, "test_acc": 25.0}]
    run = write_run(root, "set", 0.95, 6, None, metrics=torn)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"epoch": 3, "test_a')  # killed mid-write
    return root


def report(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def reported(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main([str(tree), "--out", str(out), "--no-plots"]) == 0
    return out


def summary_row(out: Path, method: str, sparsity: float) -> pd.Series:
    summary = pd.read_csv(out / "summary.csv")
    return summary[(summary["method"] == method) & (summary["sparsity"] == sparsity)].iloc[0]


def test_mean_std_delta_and_flops_are_exact(reported):
    rigl = summary_row(reported, "rigl", 0.9)
    assert rigl["n"] == 3 and rigl["seeds"] == "0 1 2"
    assert rigl["test_acc_mean"] == pytest.approx(91.0) and rigl["test_acc_std"] == pytest.approx(1.0)
    assert rigl["test_acc_delta_vs_dense"] == pytest.approx(-3.0)
    assert rigl["flops_vs_dense_mean"] == pytest.approx(0.2)
    assert rigl["flops_vs_dense_run"] == pytest.approx(0.2)
    assert rigl["paper_test_acc"] == pytest.approx(91.5)
    assert summary_row(reported, "set", 0.9)["test_acc_std"] == pytest.approx(math.sqrt(7))


def test_paper_table_cells(reported):
    markdown = (reported / "report.md").read_text()
    assert "final test accuracy" in markdown  # the caption names the compared column
    table = markdown.split("| Method")[1]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in table.splitlines()[2:] if line.startswith("|")}
    # Columns: 90%, 90% paper, 95%. Dense repeats in every column; best sparse mean in bold.
    assert rows["dense"] == ["94.00 ± 1.00", "—", "94.00 ± 1.00"]
    assert rows["rigl"] == ["**91.00 ± 1.00**", "91.50", "**86.00 ± 1.41** (n=2)"]
    assert rows["set"] == ["90.00 ± 2.65", "—", "81.00 ± 1.00"]
    assert "| set      | -4.00 | -13.00 |" in markdown
    assert "0.2× (0.2×)" in markdown
    assert "0.050 ± 0.000" in markdown  # ECE of the dense runs


def test_broken_runs_are_listed_and_not_averaged(reported):
    runs = pd.read_csv(reported / "runs.csv")
    states = runs.set_index("seed")[runs.set_index("seed")["method"] == "set"].query("sparsity == 0.95")["state"]
    # Seed 3's final.json is torn (a copy cut short): no result yet, so incomplete rather than failed.
    assert states.to_dict() == {
        0: "ok", 1: "ok", 2: "ok", 3: "incomplete", 4: "diverged", 5: "diverged", 6: "incomplete",
    }
    broken = summary_row(reported, "set", 0.95)
    assert broken["n"] == 3 and broken["test_acc_mean"] == pytest.approx(81.0)
    health = (reported / "report.md").read_text().split("## Health")[1]
    incomplete = health.split("### Incomplete runs")[1].split("###")[0]
    assert "final.json is not valid JSON" in incomplete
    assert "diverged at step 42" in health
    assert "completed with non-finite test_acc" in health
    assert "last evaluation at epoch 2 of 3" in health  # the torn third line is skipped


def test_missing_seed_is_flagged(reported):
    health = (reported / "report.md").read_text().split("## Health")[1]
    assert "Groups missing seeds: 1" in health
    gap = next(line for line in health.splitlines() if "| rigl" in line)
    assert "0.95" in gap and "2 (no run)" in gap


def test_best_metric_is_selectable(tree, tmp_path, capsys):
    code, out, _ = report([str(tree), "--out", str(tmp_path), "--no-plots", "--metric", "best_test_acc"], capsys)
    assert code == 0
    assert "best test accuracy" in out and "**92.00 ± 1.00**" in out


def test_latex_uses_booktabs_and_escapes(reported):
    latex = (reported / "report.tex").read_text()
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex
    assert "\\caption{tiny\\_imagenet" in latex
    typeset = [line for line in latex.splitlines() if not line.startswith("\\label")]  # labels are not typeset
    assert not any("_" in line.replace("\\_", "") for line in typeset)
    assert "\\textbf{91.00 $\\pm$ 1.00}" in latex


def test_html_embeds_plots_and_tables(tree, tmp_path, capsys):
    code, _, _ = report([str(tree), "--out", str(tmp_path)], capsys)
    assert code == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # accuracy, curves, layer densities
    assert "<table" in page and "<b>91.00 ± 1.00</b>" in page
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == [
        f"{DATASET}-{MODEL}-erk-{kind}.png" for kind in ("accuracy", "curves", "layers")
    ]


def test_report_directory_is_not_scanned(tmp_path, capsys):
    write_run(tmp_path, "dense", 0.0, 0, final(90.0, flops=100.0))
    (tmp_path / "report" / "stray").mkdir(parents=True)
    (tmp_path / "report" / "stray" / "config.yaml").write_text("seed: 0\n")
    code, out, _ = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0 and "1 runs under" in out
    assert (tmp_path / "report" / "report.md").exists()


def test_seed_run_twice_names_the_differing_key(tmp_path, capsys):
    for learning_rate in (0.1, 0.2):
        write_run(tmp_path, "rigl", 0.9, 0, final(90.0, flops=20.0), optimizer={"name": "sgd", "lr": learning_rate})
    code, out, _ = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0
    assert "Seeds run more than once: 1" in out and "optimizer.lr" in out


def test_group_by_splits_on_config_keys(tree, tmp_path, capsys):
    group_by = "dataset,model,method,distribution,sparsity,method.update_frequency"
    code, out, _ = report([str(tree), "--out", str(tmp_path), "--no-plots", "--group-by", group_by], capsys)
    assert code == 0 and "method.update_frequency=100" in out
    assert "-3.00" in out  # dense still matches: it shares no method options


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "does not exist"),
    (["{empty}"], "no runs under"),
    (["{tree}", "--group-by", "dataset,model,method,sparsity,lr"], "unknown --group-by column 'lr'"),
    (["{tree}", "--group-by", "dataset,method,sparsity"], "missing: model"),
    (["{tree}", "--metric", "top5"], "invalid choice"),
])
def test_user_mistakes_are_one_line(argv, message, tree, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "tree": tree}
    code, out, err = report([arg.format(**paths) for arg in argv], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sparsebench report: error: ") and message in err


def test_script_entry_point_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"sparsebench report: error: {tmp_path / 'nope'} does not exist"]


def test_results_layer_never_imports_torch(tree, tmp_path):
    probe = (
        "import sys; from sparsebench.report import main; "
        f"code = main([{str(tree)!r}, '--out', {str(tmp_path)!r}]); "
        "print(code, sorted(name for name in ('torch', 'sparsebench.models') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "0 []"


def test_parallel_loading_matches_serial(tree, monkeypatch):
    from sparsebench.reporting import load

    serial = load.load_runs(tree, tree / "report", jobs=1)
    monkeypatch.setattr(load, "_RUNS_PER_WORKER", 1)  # small trees normally stay in one process
    parallel = load.load_runs(tree, tree / "report", jobs=2)
    # "problem" says how many seconds ago an unfinished run last wrote, which moves on between loads.
    pd.testing.assert_frame_equal(serial.drop(columns="problem"), parallel.drop(columns="problem"))



# ---------------------------------------------------------------------------- junk results trees
def runs_csv(out: Path) -> pd.DataFrame:
    """runs.csv indexed by the seed in each run's directory name: a failed config gives no seed column."""
    runs = pd.read_csv(out / "runs.csv")
    return runs.set_index(runs["run"].str.extract(r"seed=(\w+)-", expand=False).rename("dir_seed"))


def test_bad_config_values_fail_their_run_and_the_report_goes_on(tmp_path, capsys):
    for seed, accuracy in enumerate((90.0, 92.0)):
        write_run(tmp_path, "dense", 0.0, seed, final(accuracy + 3, flops=100.0))
        # powerprop 1 is off: the same group as no powerprop key.
        write_run(tmp_path, "rigl", 0.9, seed, final(accuracy, flops=20.0), **({"powerprop": 1.0} if seed else {}))
    write_run(tmp_path, "rigl", 0.9, 2, final(10.0, flops=20.0), powerprop="abc")
    write_run(tmp_path, "rigl", 0.9, 10**22, final(10.0, flops=20.0))  # 23 digits
    write_run(tmp_path, "rigl", math.nan, 3, final(10.0, flops=20.0))  # written as `sparsity: .nan`
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    assert "7 runs under" in out and "4 completed" in out and "3 failed" in out
    runs = runs_csv(tmp_path / "report")
    failed = runs.loc[runs["state"] == "failed", "problem"].tolist()
    assert sorted(problem.split("=")[0] for problem in failed) == [
        "config.yaml: powerprop", "config.yaml: seed", "config.yaml: sparsity",
    ]
    assert all("\n" not in problem for problem in failed)
    rigl = summary_row(tmp_path / "report", "rigl", 0.9)
    assert rigl["n"] == 2 and rigl["test_acc_mean"] == pytest.approx(91.0)
    health = out.split("## Health")[1]
    assert "Failed runs (unreadable, corrupt or invalid files): 3" in health


def read_one(root: Path, config: dict | str, final_json: dict | str | None = None) -> dict:
    """The loader's record of a single run directory holding `config` (a dict, or raw YAML text)."""
    from sparsebench.reporting.load import read_run

    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    if final_json is not None:
        (run / "final.json").write_text(final_json if isinstance(final_json, str) else json.dumps(final_json))
    return read_run(run, root)


GOOD_CONFIG = {
    "seed": 0, "epochs": 3, "sparsity": 0.9, "powerprop": 1.0, "method": {"name": "rigl"},
    "model": {"name": MODEL}, "dataset": {"name": DATASET}, "distribution": {"name": "erk"},
}


BAD_CONFIG_VALUES = [
    ("sparsity", math.nan, "config.yaml: sparsity=nan is not a fraction in [0, 1)"),
    ("sparsity", math.inf, "config.yaml: sparsity=inf"),
    ("sparsity", 1.0, "config.yaml: sparsity=1.0"),
    ("sparsity", -0.1, "config.yaml: sparsity=-0.1"),
    ("sparsity", "0.9", "config.yaml: sparsity='0.9'"),
    ("sparsity", True, "config.yaml: sparsity=True"),
    ("sparsity", 10**400, "config.yaml: sparsity=1000000000"),
    ("seed", 10**22, "config.yaml: seed=10000000000000000000000 is not a whole number in [0, 4294967295]"),
    ("seed", 2**32, "config.yaml: seed=4294967296"),
    ("seed", -1, "config.yaml: seed=-1"),
    ("seed", True, "config.yaml: seed=True"),
    ("seed", "3", "config.yaml: seed='3'"),
    ("seed", 1.5, "config.yaml: seed=1.5"),
    ("epochs", 0, "config.yaml: epochs=0 is not a whole number >= 1"),
    ("epochs", "ten", "config.yaml: epochs='ten'"),
    ("powerprop", "abc", "config.yaml: powerprop='abc' is not a number >= 1"),
    ("powerprop", 0.5, "config.yaml: powerprop=0.5"),
    ("powerprop", math.inf, "config.yaml: powerprop=inf"),
    ("powerprop", True, "config.yaml: powerprop=True"),
    ("method", {"name": ["rigl"]}, "config.yaml: method=['rigl'] is not a name"),
    ("model", {"name": 20}, "config.yaml: model=20 is not a name"),
    ("dataset", {"name": "cifar\n10"}, "config.yaml: dataset='cifar\\n10' is not a name"),
    ("distribution", {"name": "x" * 1000}, "config.yaml: distribution='xxxxxxxx"),
]


@pytest.mark.parametrize(
    "key, value, problem", BAD_CONFIG_VALUES, ids=[f"{key}={str(value)[:12]}" for key, value, _ in BAD_CONFIG_VALUES]
)
def test_each_config_value_the_report_uses_is_validated(key, value, problem, tmp_path):
    record = read_one(tmp_path, {**GOOD_CONFIG, key: value}, final(90.0, flops=20.0))
    assert record["state"] == "failed"
    assert record["problem"].startswith(problem) and len(record["problem"]) < 200


@pytest.mark.parametrize("config_text, problem", [
    ("seed: 1" + "1" * 5000 + "\n", "config.yaml unreadable"),  # past Python's int-from-text limit
    ("day: 2020-13-45\n", "config.yaml unreadable"),  # a date libyaml matches but Python refuses
    ("a:\n" + "".join(f"{'  ' * depth}k:\n" for depth in range(1, 40)) + f"{'  ' * 40}1\n", "nests deeper than 32"),
    ("".join(f"setting{index}: 1\n" for index in range(5000)), "more than 2000 settings"),
])
def test_junk_yaml_fails_its_run(config_text, problem, tmp_path):
    base = yaml.safe_dump(GOOD_CONFIG) if not config_text.startswith("seed") else yaml.safe_dump(
        {key: value for key, value in GOOD_CONFIG.items() if key != "seed"})
    record = read_one(tmp_path, base + config_text, final(90.0, flops=20.0))
    assert record["state"] == "failed" and problem in record["problem"]
    assert "\n" not in record["problem"] and len(record["problem"]) <= 300


@pytest.mark.parametrize("final_json, problem", [
    ('{"status": "completed", "test_acc": 1' + "0" * 400 + "}", "final.json: test_acc is not a number"),
    ({**final(90.0, flops=20.0), "layer_densities": "dense"}, "final.json: layer_densities is not a mapping"),
    ({**final(90.0, flops=20.0), "layer_densities": {"fc.weight": "0.1"}}, "final.json: layer_densities"),
    ("[" * 100000, "final.json nests too deeply"),
])
def test_junk_final_json_fails_its_run(final_json, problem, tmp_path):
    record = read_one(tmp_path, GOOD_CONFIG, final_json)
    assert record["state"] == "failed" and record["problem"].startswith(problem)


@pytest.mark.parametrize("final_text", ["", '{"status": "completed", "test_a', "\xff\xfe\x00garbage"])
def test_unparseable_final_json_is_incomplete(final_text, tmp_path):
    record = read_one(tmp_path, GOOD_CONFIG, final_text)
    assert record["state"] == "incomplete" and record["problem"].startswith("final.json is not valid JSON")


def test_config_keys_never_pass_for_results(tmp_path):
    record = read_one(tmp_path, {**GOOD_CONFIG, "test_acc": 99.0, "paper_test_acc": 99.0, "state": "ok"})
    assert record["state"] == "incomplete"
    assert "test_acc" not in record and "paper_test_acc" not in record


def billion_laughs(levels: int) -> str:
    """Nested YAML aliases: `levels` lists of nine, each the previous one nine times."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{level}: &l{level} [{','.join([f'*l{level - 1}'] * 9)}]" for level in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_fails_its_run_and_runs_csv_stays_small(tmp_path, capsys):
    # * and & in plain values are no aliases or anchors: such a config still loads.
    write_run(tmp_path, "rigl", 0.9, 0, final(90.0, flops=20.0), exp="a&b",
              distribution={"name": "erk", "dense_layers": ["*.bias", "fc*"]})
    bomb = write_run(tmp_path, "rigl", 0.9, 1, final(91.0, flops=20.0))
    config = (bomb / "config.yaml").read_text() + billion_laughs(7)
    assert len(config.encode()) < 800  # ~600 bytes that expand to ~40 MB of text
    (bomb / "config.yaml").write_text(config)
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    runs = runs_csv(tmp_path / "report")
    assert runs["state"].to_dict() == {"0": "ok", "1": "failed"}
    assert runs.loc["1", "problem"].startswith("config.yaml uses YAML anchors or aliases")
    assert runs.loc["0", "distribution.dense_layers"] == '["*.bias", "fc*"]'
    assert (tmp_path / "report" / "runs.csv").stat().st_size < 10_000


def test_special_and_oversized_files_fail_without_blocking(tmp_path):
    """FIFOs and devices in a run file's place are refused before they are opened; big files are capped."""
    write_run(tmp_path, "dense", 0.0, 0, final(93.0, flops=100.0))
    write_run(tmp_path, "rigl", 0.9, 0, final(90.0, flops=20.0))
    fifo_final = write_run(tmp_path, "rigl", 0.9, 1, None)
    os.mkfifo(fifo_final / "final.json")
    zero_final = write_run(tmp_path, "rigl", 0.9, 2, None)
    (zero_final / "final.json").symlink_to("/dev/zero")
    fifo_config = write_run(tmp_path, "rigl", 0.9, 3, final(90.0, flops=20.0))
    (fifo_config / "config.yaml").unlink()
    os.mkfifo(fifo_config / "config.yaml")
    huge_final = write_run(tmp_path, "rigl", 0.9, 4, None)
    (huge_final / "final.json").write_text(" " * (2 << 20) + json.dumps(final(90.0, flops=20.0)))
    dangling = write_run(tmp_path, "rigl", 0.9, 5, None)
    (dangling / "final.json").symlink_to(dangling / "gone.json")
    fifo_metrics = write_run(tmp_path, "rigl", 0.9, 6, None)  # unfinished: its progress reads metrics.jsonl
    (fifo_metrics / "metrics.jsonl").unlink()
    os.mkfifo(fifo_metrics / "metrics.jsonl")
    healthy_fifo_metrics = write_run(tmp_path, "rigl", 0.9, 7, final(92.0, flops=20.0))  # plots read its curve
    (healthy_fifo_metrics / "metrics.jsonl").unlink()
    os.mkfifo(healthy_fifo_metrics / "metrics.jsonl")

    result = subprocess.run(  # a blocking read would hang the test: bound it
        [sys.executable, str(REPO / "scripts" / "report.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    runs = runs_csv(tmp_path / "report")
    assert runs.loc[runs["run"].str.contains("/rigl/"), "state"].to_dict() == {
        "0": "ok", "1": "failed", "2": "failed", "3": "failed", "4": "failed", "5": "failed", "6": "incomplete",
        "7": "ok",
    }
    problems = runs.loc[runs["run"].str.contains("/rigl/"), "problem"]
    assert problems["1"] == "final.json is not a regular file but a FIFO"
    assert problems["2"] == "final.json is not a regular file but a character device"
    assert problems["4"].startswith("final.json is 2 MiB, over the 1 MiB")
    assert problems["5"] == "final.json is a symbolic link to nothing"
    assert problems["3"] == "config.yaml is not a regular file but a FIFO"
    assert problems["6"] == "no final.json, and metrics.jsonl is not a regular file but a FIFO"


def test_run_at_chance_level_is_averaged_but_flagged(tmp_path, capsys):
    write_run(tmp_path, "dense", 0.0, 0, final(93.0, flops=100.0, chance_acc=10.0))
    for seed, accuracy in enumerate((10.4, 50.0, 60.0)):
        write_run(tmp_path, "rigl", 0.9, seed, final(accuracy, flops=20.0, chance_acc=10.0, num_classes=10))
    write_run(tmp_path, "set", 0.9, 0, final(11.5, flops=20.0, chance_acc=10.0))  # above the 1-point margin
    write_run(tmp_path, "set", 0.9, 1, final(10.0, flops=20.0))  # an older run: no chance_acc, no check
    write_run(tmp_path, "set", 0.9, 2, final(1.2, flops=20.0, chance_acc=1.0))  # 100 classes: margin 0.5
    write_run(tmp_path, "set", 0.95, 0, final(1.6, flops=20.0, chance_acc=1.0))
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    rigl = summary_row(tmp_path / "report", "rigl", 0.9)
    assert rigl["n"] == 3 and rigl["test_acc_mean"] == pytest.approx((10.4 + 50 + 60) / 3)
    assert "except the 2 runs at chance level, which are averaged but flagged" in out
    health = out.split("## Health")[1]
    assert "### Runs at chance level: 2" in health
    flagged = health.split("### Runs at chance level")[1].split("###")[0]
    assert "final accuracy at chance level (10.40 %, chance 10.00 %)" in flagged
    assert "final accuracy at chance level (1.20 %, chance 1.00 %)" in flagged
    assert "11.50" not in flagged and "1.60" not in flagged
    runs = runs_csv(tmp_path / "report")
    assert (runs["state"] == "ok").all() and runs["chance_acc"].notna().sum() == 7
