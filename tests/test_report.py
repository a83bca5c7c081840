"""`sparsebench report` on small synthetic results trees whose numbers are known exactly."""
from __future__ import annotations

import json
import math
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
    assert states.to_dict() == {0: "ok", 1: "ok", 2: "ok", 3: "failed", 4: "diverged", 5: "diverged", 6: "incomplete"}
    broken = summary_row(reported, "set", 0.95)
    assert broken["n"] == 3 and broken["test_acc_mean"] == pytest.approx(81.0)
    health = (reported / "report.md").read_text().split("## Health")[1]
    assert "final.json is not valid JSON" in health
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
