"""`sparsebench report` on small synthetic results trees whose numbers are known exactly."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # Columns: 90%, 90% paper, 95%. Dense repeats in every column; best sparse mean in bold; the
    # 95 % CI half-width in brackets: t(0.975, n-1) * std / sqrt(n).
    assert rows["dense"] == ["94.00 ± 1.00 [±2.48]", "—", "94.00 ± 1.00 [±2.48]"]
    assert rows["rigl"] == ["**91.00 ± 1.00** [±2.48]", "91.50", "**86.00 ± 1.41** [±12.71] (n=2)"]
    assert rows["set"] == ["90.00 ± 2.65 [±6.57]", "—", "81.00 ± 1.00 [±2.48]"]
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
    typeset = [  # labels and file names are not typeset
        line for line in latex.splitlines() if not line.startswith(("\\label", "\\includegraphics"))
    ]
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
    code, out, _ = report([str(tmp_path), "--no-plots", "--pool", "optimizer.lr"], capsys)
    assert code == 0
    assert "Seeds run more than once: 1" in out and "optimizer.lr" in out
    assert "Averaged over differing optimizer.lr 0.1 / 0.2, as --pool asked." in out


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
    (["{tree}", "--pool", "optimizer.learning_rate"], "unknown --pool column 'optimizer.learning_rate'"),
    (["{tree}", "--pool", "method"], "--pool cannot include method"),
    (["{tree}", "--reference", "{missing}"], "no such file"),
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
    assert "Averaged but flagged under Health: 2 runs at chance level" in out
    health = out.split("## Health")[1]
    assert "### Runs at chance level: 2" in health
    flagged = health.split("### Runs at chance level")[1].split("###")[0]
    assert "final accuracy at chance level (10.40 %, chance 10.00 %)" in flagged
    assert "final accuracy at chance level (1.20 %, chance 1.00 %)" in flagged
    assert "11.50" not in flagged and "1.60" not in flagged
    runs = runs_csv(tmp_path / "report")
    assert (runs["state"] == "ok").all() and runs["chance_acc"].notna().sum() == 7


# ---------------------------------------------------------------------------- what a table compares (#12, #9, #10)
BUDGET = {
    "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "cosine", "warmup_epochs": 1.0}, "model": {"name": MODEL, "width": 2},
}
BUDGET_TEXT = (
    "Budget: {epochs} epochs of batch 64 ({steps} steps); optimizer sgd (lr=0.05, momentum=0.9); "
    f"LR schedule cosine (warmup_epochs=1); model {MODEL} (width=2); dataset {DATASET}."
)


def budget_run(root: Path, method: str, sparsity: float, seed: int, accuracy: float, *, epochs: int = 3,
               flops: float = 20.0, options: dict | None = None, results: dict | None = None) -> Path:
    """A run with the full BUDGET config, 10 steps an epoch, and method `options` (variant=...)."""
    run = write_run(root, method, sparsity, seed, final(accuracy, flops=flops, steps=10 * epochs, **(results or {})),
                    epochs=epochs, **BUDGET)
    if options:
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["method"].update(options)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def captions(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("*") and line.endswith("*")]


def test_every_table_and_figure_caption_states_its_budget(tmp_path, capsys):
    for seed, accuracy in enumerate((93.0, 94.0)):
        budget_run(tmp_path, "dense", 0.0, seed, accuracy, flops=100.0, results={"ece": 0.05})
        budget_run(tmp_path, "rigl", 0.9, seed, accuracy - 3)
    code, out, err = report([str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    expected = BUDGET_TEXT.format(epochs=3, steps=30)
    table_captions = [caption for caption in captions(out) if "Budget" in caption or "|" not in caption]
    results = [caption for caption in table_captions if "Left out" not in caption and "Averaged" not in caption]
    # accuracy, delta, cost, ECE, and the accuracy, curves and layer figures
    assert len(results) == 7 and all(expected in caption for caption in results), results
    latex = (tmp_path / "out" / "report.tex").read_text()
    assert latex.count("\\caption{") == 7 and latex.count("Budget: 3 epochs of batch 64 (30 steps)") == 7
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("Budget: 3 epochs of batch 64 (30 steps)") == 7


def test_two_budgets_are_never_averaged_together(tmp_path, capsys):
    for epochs, offset in ((3, 0.0), (6, 5.0)):
        for seed, accuracy in enumerate((90.0, 91.0)):
            budget_run(tmp_path, "dense", 0.0, seed, accuracy + offset + 4, epochs=epochs, flops=100.0 * epochs)
            budget_run(tmp_path, "rigl", 0.9, seed, accuracy + offset, epochs=epochs, flops=20.0 * epochs)
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    rigl = summary[summary["method"] == "rigl"].set_index("epochs")
    assert rigl["n"].to_dict() == {3: 2, 6: 2}
    assert rigl["test_acc_mean"].to_dict() == {3: pytest.approx(90.5), 6: pytest.approx(95.5)}
    assert rigl["test_acc_delta_vs_dense"].to_dict() == {3: pytest.approx(-4.0), 6: pytest.approx(-4.0)}
    assert "## tiny_imagenet · resnet20 · erk · epochs=3" in out and "## tiny_imagenet · resnet20 · erk · epochs=6" in out
    assert BUDGET_TEXT.format(epochs=6, steps=60) in out and "tables are split by epochs" in out
    assert "Seeds run more than once" not in out


def test_gap_at_its_own_budget_and_its_variants_are_separate(tmp_path, capsys):
    """GaP at equal epochs and at its own budget (no dense run of that budget), C-GaP beside P-GaP."""
    for seed, accuracy in enumerate((93.0, 95.0)):
        budget_run(tmp_path, "dense", 0.0, seed, accuracy, flops=100.0)
        for variant, shift in (("cyclic", 0.0), ("parallel", -2.0)):
            budget_run(tmp_path, "gap", 0.9, seed, accuracy - 4 + shift, flops=35.0, options={"variant": variant})
        budget_run(tmp_path, "gap", 0.9, seed, accuracy - 1, epochs=9, flops=105.0, options={"variant": "cyclic"},
                   results={"train_flops_dense": 300.0})
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    gap = summary[summary["method"] != "dense"].set_index(["method", "epochs"])["test_acc_mean"]
    assert gap.to_dict() == {
        ("gap (variant=cyclic)", 3): pytest.approx(90.0), ("gap (variant=parallel)", 3): pytest.approx(88.0),
        ("gap (variant=cyclic)", 9): pytest.approx(93.0),
    }
    own_budget = out.split("## tiny_imagenet · resnet20 · erk · epochs=9")[1].split("## ")[0]
    # No dense run of 9 epochs: the 3-epoch dense runs, named as such; FLOPs 0.35x a dense run of its
    # own schedule and 1.05x the 3-epoch dense run.
    assert "| dense (epochs=3)" in own_budget and "with epochs=3, so deltas and ratios to dense compare across budgets" in own_budget
    assert "0.35× (1.05×)" in own_budget and "| -1.00 |" in own_budget
    assert "gap rows by method.variant" in out


def test_an_option_written_as_null_is_a_value_and_a_missing_one_takes_its_default(tmp_path, capsys):
    """`swa_start: null` (CigL without averaging) is a setting of its own, not a missing one; a run
    written before an option existed takes the value conf/method/<method>.yaml gives it."""
    for seed in (0, 1):
        budget_run(tmp_path, "dense", 0.0, seed, 95.0, flops=100.0)
        budget_run(tmp_path, "cigl", 0.9, seed, 92.0, flops=20.0, options={"swa_start": 0.8} if seed else {})
        budget_run(tmp_path, "cigl", 0.9, seed, 90.0, flops=20.0, options={"swa_start": None})
        # updates_per_epoch: missing (seed 0) and null (seed 1) are the same experiment; 4 is another
        budget_run(tmp_path, "rigl", 0.9, seed, 91.0 + seed, flops=20.0, options={"updates_per_epoch": None} if seed else {})
        budget_run(tmp_path, "rigl", 0.9, seed, 88.0, flops=20.0, options={"updates_per_epoch": 4})
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    means = summary.set_index("method")["test_acc_mean"].to_dict()
    assert means["cigl (swa_start=0.8)"] == pytest.approx(92.0) and means["cigl (swa_start=null)"] == pytest.approx(90.0)
    assert means["rigl (updates_per_epoch=null)"] == pytest.approx(91.5)
    assert means["rigl (updates_per_epoch=4)"] == pytest.approx(88.0)
    assert len(means) == 5  # dense and the four rows: nothing left as "unset"


def test_single_seed_cell_is_never_marked_best(tmp_path, capsys):
    write_run(tmp_path, "rigl", 0.9, 0, final(99.0, flops=20.0))  # the highest mean, from one seed
    for seed, (set_accuracy, static_accuracy) in enumerate(((90.0, 85.0), (91.0, 86.0), (92.0, 87.0))):
        write_run(tmp_path, "set", 0.9, seed, final(set_accuracy, flops=20.0))
        write_run(tmp_path, "static", 0.9, seed, final(static_accuracy, flops=20.0))
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    accuracy = out.split("| Method")[1].split("\n\n")[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in accuracy.splitlines()
            if line.startswith(("| rigl", "| set", "| static"))}
    assert rows["rigl"] == "99.00 (n=1)"
    assert rows["set"].startswith("**91.00 ± 1.00**") and "**" not in rows["static"]
    summary = pd.read_csv(tmp_path / "report" / "summary.csv").set_index("method")
    assert not summary.loc["rigl", "best_in_column"] and summary.loc["set", "best_in_column"]


def test_standard_error_and_confidence_interval_are_exact(reported):
    rigl = summary_row(reported, "rigl", 0.9)  # 90, 91, 92
    assert rigl["test_acc_sem"] == pytest.approx(1 / math.sqrt(3))
    assert rigl["test_acc_ci95"] == pytest.approx(4.302653 / math.sqrt(3))
    spread = summary_row(reported, "set", 0.9)  # 88, 89, 93: std sqrt(7)
    assert spread["test_acc_ci95"] == pytest.approx(4.302653 * math.sqrt(7 / 3))
    pair = summary_row(reported, "rigl", 0.95)  # 85, 87: std sqrt(2), sem 1
    assert pair["test_acc_sem"] == pytest.approx(1.0) and pair["test_acc_ci95"] == pytest.approx(12.706205)
    from sparsebench.reporting.aggregate import t95

    assert t95(40) == pytest.approx(2.021075, abs=1e-5) and t95(1000) == pytest.approx(1.962339, abs=1e-5)
    assert math.isnan(t95(0))


REFERENCE = """
- source: "Evci et al. 2020, Table 2"
  dataset: tiny_imagenet
  test_acc:
    rigl: {0.9: 91.7, 0.95: 88.1}
    dense: 94.5
- source: "somewhere else"
  test_acc:
    rigl: {0.9: 50.0}
"""


def test_reference_numbers_at_report_time(tree, tmp_path, capsys):
    reference = tmp_path / "published.yaml"
    reference.write_text(REFERENCE)
    code, out, err = report([str(tree), "--out", str(tmp_path / "out"), "--no-plots", "--reference", str(reference)],
                            capsys)
    assert code == 0, err
    table = out.split("| Method")[1]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in table.splitlines()[2:] if line.startswith("|")}
    # Columns: 90%, 90% paper, 95%, 95% paper; the first matching entry wins over the preset's 91.5.
    assert rows["dense"][1] == "94.50" and rows["dense"][3] == "94.50"
    assert rows["rigl"][1] == "91.70" and rows["rigl"][3] == "88.10" and rows["set"][1] == "—"
    assert "published test accuracy from Evci et al. 2020, Table 2." in out
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert set(runs.loc[runs["method"] == "rigl", "paper_source"].dropna()) == {"Evci et al. 2020, Table 2"}


@pytest.mark.parametrize("text, message", [
    ("rigl: [unclosed", "not valid YAML"),
    ("- 1\n- 2\n", "expected an entry"),
    ("test_acc: {rigl: {0.9: 91}}\n", "source must be"),
    ("source: x\ntest_acc: [91]\n", "test_acc must map methods"),
    ("source: x\ntest_acc: {rigl: {0.9: 191}}\n", "test_acc.rigl.0.9: 191 is not an accuracy"),
    ("source: x\ntest_acc: {rigl: {1.5: 91}}\n", "1.5 is not a sparsity"),
    ("source: x\ndatset: cifar10\ntest_acc: {rigl: 91}\n", "no column 'datset' in the runs (did you mean 'dataset'?)"),
    ("source: x\ndataset: [a, b]\ntest_acc: {rigl: 91}\n", "'dataset' must be a column name with one value"),
    ("a: &a [1]\nsource: x\ntest_acc: {rigl: *a}\n", "aliases are not supported"),
])
def test_bad_reference_file_is_one_line(text, message, tree, tmp_path, capsys):
    reference = tmp_path / "published.yaml"
    reference.write_text(text)
    code, out, err = report([str(tree), "--out", str(tmp_path / "out"), "--no-plots", "--reference", str(reference)],
                            capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"sparsebench report: error: --reference {reference}") and message in err


def cost_rows(markdown: str) -> dict[tuple[str, str], dict[str, str]]:
    """The cost table's cells by (method, sparsity) and column header."""
    table = markdown.split("| Method")[1:]
    cost = next("| Method" + part for part in table if part.split("\n")[0].split("|")[1].strip() == "Sparsity")
    lines = [line for line in cost.split("\n\n")[0].splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].split("|")[1:-1]]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        rows[(cells[0], cells[1])] = dict(zip(headers, cells))
    return rows


def test_cost_table_has_wall_clock_and_inference_flops(tmp_path, capsys):
    write_run(tmp_path, "dense", 0.0, 0, final(94.0, flops=100.0, wall_time_s=100.0,
                                             inference_flops=4e6, inference_flops_dense=4e6))
    write_run(tmp_path, "rigl", 0.9, 0, final(90.0, flops=20.0, wall_time_s=150.0,
                                            inference_flops=1e6, inference_flops_dense=4e6))
    write_run(tmp_path, "rigl", 0.9, 1, final(91.0, flops=20.0, wall_time_s=150.0,
                                            inference_flops=1e6, inference_flops_dense=4e6))
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    rows = cost_rows(out)
    assert rows[("dense", "0%")]["Wall-clock"] == "100.0 s"
    assert rows[("rigl", "90%")]["Wall-clock"] == "2.5 min (1.5×)"
    assert rows[("rigl", "90%")]["Inference FLOPs / dense"] == "0.25×"
    assert rows[("rigl", "90%")]["Train FLOPs"] == "20" and rows[("rigl", "90%")]["Train FLOPs / dense"] == "0.2× (0.2×)"
    assert "Inference speedup (measured)" not in out  # no bench.json: no speedup column


def bench_json(csr: float) -> dict:
    """A bench.json as `sparsebench bench` writes it (schema sparsebench.bench/1), abridged."""
    def entry(name: str, baseline: str, points: list[tuple[int, float | None]], status: str = "ok") -> dict:
        return {"status": status, "reason": None if status == "ok" else "CUDA only", "dtype": "float32",
                "baseline": baseline, "inference": [{"batch": batch, "latency_ms": 1.0, "speedup": speedup}
                                                    for batch, speedup in points]}
    return {
        "schema": "sparsebench.bench/1", "flops": {"dense_per_example": 4e6, "sparse_per_example": 1e6, "ratio": 0.25},
        "formats": {
            "dense": entry("dense", "dense", [(1, 1.0), (256, 1.0)]),
            "csr": entry("csr", "dense", [(1, 3.0), (256, csr)]),  # batch 1 (latency): not the throughput shown
            "bsr": entry("bsr", "dense", [(1, 2.0), (256, 1.4)]),
            "semi_structured": {"status": "skipped", "reason": "CUDA only", "baseline": "dense_float16"},
        },
        "training": {"status": "ok", "reason": None, "batch": 256, "steps": {
            "dense": {"status": "ok", "step_ms": 10.0, "speedup": 1.0},
            "masked": {"status": "ok", "step_ms": 11.0, "speedup": 0.9},
        }},
    }


def test_measured_speedups_from_bench_json(tmp_path, capsys):
    write_run(tmp_path, "dense", 0.0, 0, final(94.0, flops=100.0))
    for seed, (accuracy, csr) in enumerate(((90.0, 1.6), (91.0, 2.0))):
        run = write_run(tmp_path, "rigl", 0.9, seed, final(accuracy, flops=20.0))
        (run / "bench.json").write_text(json.dumps(bench_json(csr)))
    write_run(tmp_path, "rigl", 0.95, 0, final(80.0, flops=10.0))
    (write_run(tmp_path, "rigl", 0.95, 1, final(81.0, flops=10.0)) / "bench.json").write_text(json.dumps(bench_json(3.0)))
    junk = write_run(tmp_path, "set", 0.9, 0, final(89.0, flops=20.0))
    broken = bench_json(1.5)
    broken["formats"]["csr"]["inference"][1]["speedup"] = "fast"
    (junk / "bench.json").write_text(json.dumps(broken))
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    rows = cost_rows(out)
    assert rows[("rigl", "90%")]["Inference speedup (measured)"] == "1.80× (csr, batch 256)"
    assert rows[("rigl", "90%")]["Train-step speedup (measured)"] == "0.90× (masked)"
    assert rows[("rigl", "95%")]["Inference speedup (measured)"] == "3.00× (csr, batch 256; 1 of 2 runs)"
    assert rows[("rigl", "90%")]["Inference FLOPs / dense"] == "0.25×"  # bench.json's flops.ratio: final.json has none
    assert rows[("set", "90%")]["Inference speedup (measured)"] == "—"
    assert rows[("dense", "0%")]["Inference speedup (measured)"] == "—"
    assert "Unusable bench.json: 1" in out and "formats.csr.inference[1].speedup='fast'" in out
    assert summary_row(tmp_path / "report", "set", 0.9)["test_acc_mean"] == pytest.approx(89.0)  # still averaged


def test_header_and_health_agree_on_what_is_averaged(tmp_path, capsys):
    write_run(tmp_path, "dense", 0.0, 0, final(93.0, flops=100.0, chance_acc=10.0))
    write_run(tmp_path, "dense", 0.0, 1, final(94.0, flops=100.0, chance_acc=10.0))
    write_run(tmp_path, "rigl", 0.9, 0, final(10.2, flops=20.0, chance_acc=10.0))  # at chance: averaged
    write_run(tmp_path, "rigl", 0.9, 1, final(60.0, flops=20.0, chance_acc=10.0))
    write_run(tmp_path, "rigl", 0.9, 2, final(10.0, flops=20.0, status="diverged"))  # left out
    write_run(tmp_path, "set", 0.9, 0, final(80.0, flops=20.0))  # seed 1 missing: averaged, marked
    for _ in range(2):  # the same config and seed twice (a copied tree): averaged
        write_run(tmp_path, "static", 0.9, 0, final(70.0, flops=20.0))
    write_run(tmp_path, "static", 0.9, 1, final(71.0, flops=20.0))
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    header = out.split("\n\n")[1]
    health = out.split("## Health")[1]
    sections = {part.split("\n")[0].rsplit(":", 1)[0]: part.split("\n\n")[1] for part in health.split("### ")[1:]}
    assert set(sections) == {"Diverged runs", "Runs at chance level", "Groups missing seeds", "Seeds run more than once"}
    # Today's header said every run listed under Health is left out of every mean; three of these lists are averaged.
    assert "Runs listed under Health are left out of every mean" not in header
    left_out = header.split("Left out of every mean and listed under Health: ")[1].split(".")[0]
    averaged = header.split("Averaged but flagged under Health: ")[1].split(".")[0]
    assert left_out == "1 diverged run"
    assert averaged == ("1 run at chance level, 1 group missing seeds (marked n=…) "
                        "and 1 group that ran a seed more than once")
    assert sections["Diverged runs"] == "*Left out of every mean.*"
    for name in ("Runs at chance level", "Groups missing seeds", "Seeds run more than once"):
        assert sections[name].startswith("*Averaged") or "averaged over the seeds they have" in sections[name]
        assert "left out" not in sections[name].lower()
    static = summary_row(tmp_path / "report", "static", 0.9)
    assert static["n"] == 3  # the header's "averaged" is what the numbers did


def test_groups_mixing_code_versions_are_flagged_and_still_averaged(tmp_path, capsys):
    # A run directory's hash covers the config, not the code: a seed finished before a fix sits
    # beside seeds trained after it. The report must say so rather than average them silently.
    old = {"sparsebench": "0.1.0", "commit": "a" * 40}
    new = {"sparsebench": "0.1.0", "commit": "b" * 40, "dirty": True}
    write_run(tmp_path, "rigl", 0.9, 0, final(90.0, flops=20.0, provenance=old))
    write_run(tmp_path, "rigl", 0.9, 1, final(92.0, flops=20.0, provenance=new))
    write_run(tmp_path, "set", 0.9, 0, final(88.0, flops=20.0, provenance=new))
    write_run(tmp_path, "set", 0.9, 1, final(89.0, flops=20.0, provenance=new))
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    health = out.split("## Health")[1]
    section = health.split("### Groups mixing code versions")[1].split("###")[0]
    row = next(line for line in section.splitlines() if "| rigl" in line)
    assert "0.1.0 aaaaaaa (1 run)" in row and "0.1.0 bbbbbbb-dirty (1 run)" in row
    assert "| set" not in section  # one version: nothing to say
    assert summary_row(tmp_path / "report", "rigl", 0.9)["n"] == 2  # flagged, still averaged
    runs = pd.read_csv(tmp_path / "report" / "runs.csv")
    assert set(runs["code_version"]) == {"0.1.0 aaaaaaa", "0.1.0 bbbbbbb-dirty"}


def test_groups_mixing_thread_counts_are_flagged_and_still_averaged(tmp_path, capsys):
    # The same seed and code on another thread count sum floats in another order: a rerun there
    # is another draw (rigl at 90 %, seed 1: 93.8 with two threads, 93.5 with one).
    def provenance(threads):
        return {"sparsebench": "0.1.0", "commit": "a" * 40, "device": "cpu", "threads": threads, "torch": "2.14.1",
                "world_size": 1}

    write_run(tmp_path, "rigl", 0.9, 0, final(90.0, flops=20.0, provenance=provenance(1)))
    write_run(tmp_path, "rigl", 0.9, 1, final(92.0, flops=20.0, provenance=provenance(2)))
    write_run(tmp_path, "set", 0.9, 0, final(88.0, flops=20.0, provenance=provenance(1)))
    write_run(tmp_path, "set", 0.9, 1, final(89.0, flops=20.0, provenance=provenance(1)))
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    assert "1 group mixing set-ups" in out.split("## Health")[0]
    section = out.split("### Groups mixing set-ups")[1].split("###")[0]
    row = next(line for line in section.splitlines() if "| rigl" in line)
    assert "cpu, 1 thread, torch 2.14.1 (1 run)" in row and "cpu, 2 threads, torch 2.14.1 (1 run)" in row
    assert not any("| set " in line for line in section.splitlines()) and "### Groups mixing code versions" not in out
    assert summary_row(tmp_path / "report", "rigl", 0.9)["n"] == 2  # flagged, still averaged


# ---------------------------------------------------------------------------- figures
def figure_tree(root: Path) -> Path:
    for seed in (0, 1):
        for method, sparsity, base in (("dense", 0.0, 60.0), ("rigl", 0.9, 50.0), ("set", 0.9, 45.0)):
            curve = [
                {"epoch": epoch, "step": 10 * epoch, "test_acc": base + 10 * epoch + seed, "itop_rate": 0.1 + 0.05 * epoch,
                 "layer_densities": {"layer1.0.conv1.weight": 1.0, "fc.weight": 1 - sparsity}}
                for epoch in (1, 2, 3)
            ]
            densities = {"layer1.0.conv1.weight": 1.0, "fc.weight": 1 - sparsity}
            run = write_run(root, method, sparsity, seed, final(base + 30 + seed, flops=20.0, steps=30,
                                                               layer_densities=densities), metrics=curve)
            if method != "dense":
                updates = [{"step": step, "epoch": step // 10 + 1,
                            "layers": {"fc.weight": {"dropped": 50 - step, "grown": 50 - step}}} for step in (4, 9, 14, 19)]
                (run / "mask_updates.jsonl").write_text("".join(json.dumps(line) + "\n" for line in updates))
    return root


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_figures_have_std_bands_mask_markers_and_a_mask_evolution_plot(tmp_path, capsys, monkeypatch):
    from matplotlib.collections import FillBetweenPolyCollection, PolyCollection
    from sparsebench.reporting import plots

    drawn = {}
    original = plots._png

    def keep(figure):
        data = original(figure)
        drawn[" ".join(figure.get_suptitle().split()).split(": ")[1].split(" ")[0]] = figure  # wrapped
        return data

    monkeypatch.setattr(plots, "_png", keep)
    code, _, err = report([str(figure_tree(tmp_path)), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    files = {path.name.rsplit("-", 1)[1]: path.read_bytes() for path in (tmp_path / "out" / "plots").iterdir()}
    assert sorted(files) == ["accuracy.png", "curves.png", "layers.png", "masks.png"]
    for data in files.values():
        width, height = png_size(data)
        assert width >= 400 and height >= 250 and len(data) > 15_000
    curves = drawn["test"].axes[0]
    bands = [path for c in curves.collections if isinstance(c, (PolyCollection, FillBetweenPolyCollection))
             for path in c.get_paths()]
    assert len(bands) == 3  # dense, rigl, set: mean ± std over the two seeds
    assert all(np.ptp(path.vertices[:, 1]) > 0 for path in bands)  # seeds differ by 1 point: the band has width
    markers = [line for line in curves.lines if line.get_marker() == "|"]
    assert len(markers) == 2 and all(len(line.get_xdata()) == 4 for line in markers)
    assert list(markers[0].get_xdata()) == pytest.approx([0.5, 1.0, 1.5, 2.0])  # (step + 1) / 10 steps per epoch
    masks = drawn["mask"]
    itop, moved = masks.axes[0], masks.axes[1]
    assert itop.get_ylabel() == "ITOP rate" and len(itop.lines) == 2
    assert moved.get_yscale() == "log" and sum(len(line.get_xdata()) for line in moved.lines) == 8


def drawn_tick_labels(axes) -> list:
    """The tick labels matplotlib draws: those of ticks inside the axis' view limits."""
    labels = []
    for axis in (axes.xaxis, axes.yaxis):
        low, high = sorted(axis.get_view_interval())
        labels += [tick.label1 for tick in axis.get_major_ticks()
                   if low - 1e-9 <= tick.get_loc() <= high + 1e-9 and tick.label1.get_visible()]
    return labels


def test_layer_heatmap_names_are_readable_and_no_text_is_clipped(tmp_path, capsys, monkeypatch):
    from sparsebench.reporting import plots

    drawn = []
    original = plots._png
    monkeypatch.setattr(plots, "_png", lambda figure: (drawn.append(figure), original(figure))[1])
    code, _, err = report([str(figure_tree(tmp_path)), "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    heatmap = next(figure for figure in drawn if figure.axes[0].images)
    labels = [label.get_text() for label in heatmap.axes[0].get_xticklabels()]
    assert labels == ["layer1.0.conv1", "fc"] and min(label.get_fontsize() for label in heatmap.axes[0].get_xticklabels()) >= 7
    for figure in drawn:
        renderer = figure.canvas.get_renderer()
        bounds = figure.bbox
        legends = [legend for legend in (*figure.legends, *(axes.get_legend() for axes in figure.axes)) if legend]
        texts = [figure._suptitle, *(text for axes in figure.axes if axes.get_visible() for text in
                                     (axes.title, axes.xaxis.label, axes.yaxis.label, *drawn_tick_labels(axes))
                                     if text.get_visible() and text.get_text()),
                 *(text for legend in legends for text in legend.get_texts())]
        for text in texts:
            box = text.get_window_extent(renderer)
            assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= bounds.x1 + 1 and box.y1 <= bounds.y1 + 1, (
                figure.get_suptitle(), text.get_text())


def test_a_setting_older_configs_lack_splits_nothing_but_differing_values_do(tmp_path, capsys):
    """An older config without `backend` is the same experiment as backend=masked; backend=sparse
    (a sparse training backend, same numbers, another wall-clock) is a row of its own."""
    write_run(tmp_path, "dense", 0.0, 0, final(94.0, flops=100.0))
    write_run(tmp_path, "rigl", 0.9, 0, final(90.0, flops=20.0))  # written before `backend` existed
    write_run(tmp_path, "rigl", 0.9, 1, final(92.0, flops=20.0), backend="masked")
    write_run(tmp_path, "set", 0.9, 0, final(88.0, flops=20.0), backend="masked")
    write_run(tmp_path, "set", 0.9, 1, final(86.0, flops=20.0, wall_time_s=5.0), backend="sparse")
    code, out, err = report([str(tmp_path), "--no-plots"], capsys)
    assert code == 0, err
    summary = pd.read_csv(tmp_path / "report" / "summary.csv").set_index("method")
    assert summary.loc["rigl", "n"] == 2 and summary.loc["rigl", "test_acc_mean"] == pytest.approx(91.0)
    assert summary.loc["set (backend=masked)", "test_acc_mean"] == pytest.approx(88.0)
    assert summary.loc["set (backend=sparse)", "wall_time_s_mean"] == pytest.approx(5.0)
    assert out.count("## ") == 2  # one table (and Health): the dense baseline matches every row
