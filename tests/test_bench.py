"""`sparsebench bench`: bench.json with the documented keys (sparsebench/bench.py docstring), the
no-run form, the training-backend hook, and one-line refusals. Timings are not checked: this is
not a timed test (benchmarks/bench_kernels.py measures speed)."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from sparsebench.bench import SCHEMA
from sparsebench.cli import main
from sparsebench.sparse import kernels

FAST = ["--repeats", "2", "--warmup", "1", "--batch-sizes", "1,8"]
ENTRY_KEYS = {"status", "reason", "dtype", "block", "block_fill", "baseline"}
OK_KEYS = ENTRY_KEYS | {"weight_bytes", "file_bytes", "peak_memory_bytes", "inference"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_run")
    assert main(["train", "method=static", "epochs=1", "dataset.num_samples=200", "progress=none",
                 f"results_root={root}", "distribution.structure=block", "distribution.block=16"]) == 0
    (final,) = root.rglob("final.json")
    return final.parent


def check_report(report: dict, batch_sizes: list[int]) -> None:
    assert report["schema"] == SCHEMA
    for key in ("created", "source", "environment", "settings", "flops", "formats", "training", "memory_method"):
        assert key in report
    source_keys = {"run_dir", "overrides", "model", "input_shape", "num_classes", "sparse_layers", "sparsity", "structure"}
    assert source_keys <= set(report["source"])
    assert {"device", "device_name", "threads", "torch", "timer", "load_average"} <= set(report["environment"])
    assert report["settings"]["batch_sizes"] == batch_sizes
    assert 0 < report["flops"]["ratio"] < 1
    formats = report["formats"]
    for name in ("dense", "csr", "bsr"):
        entry = formats[name]
        assert entry["status"] == "ok" and OK_KEYS <= set(entry), (name, entry)
        assert [row["batch"] for row in entry["inference"]] == batch_sizes
        for row in entry["inference"]:
            assert row["latency_ms"] > 0 and row["throughput_per_s"] > 0 and row["speedup"] > 0
        assert entry["weight_bytes"] > 0 and entry["file_bytes"] > 0
    assert formats["dense"]["inference"][0]["speedup"] == 1.0
    assert formats["bsr"]["block"] == 16 and formats["bsr"]["block_fill"] == 1.0
    assert formats["csr"]["weight_bytes"] < formats["dense"]["weight_bytes"]
    if kernels.semi_structured_device_problem(None):
        skipped = formats["semi_structured"]
        assert skipped["status"] == "skipped" and "CUDA" in skipped["reason"] and "\n" not in skipped["reason"]


@pytest.mark.slow
def test_bench_run_writes_bench_json(run_dir, capsys):
    assert main(["bench", str(run_dir), *FAST]) == 0
    report = json.loads((run_dir / "bench.json").read_text())
    check_report(report, [1, 8])
    assert report["source"]["run_dir"] == str(run_dir)
    assert report["environment"]["threads"] == 2
    steps = report["training"]["steps"]
    assert report["training"]["batch"] == 8 and set(steps) >= {"dense", "masked"}
    assert steps["dense"]["speedup"] == 1.0 and steps["masked"]["step_ms"] > 0
    # the sparse backend on CSR, and on BSR since this run's masks are 16x16 blocks
    assert steps["sparse_all"]["status"] == "ok" and steps["sparse_bsr"]["status"] == "ok"
    # CPU peak memory comes from a child process; where /proc allows it, every format has a number.
    if "failed" not in report["memory_method"]:
        assert all(isinstance(report["formats"][n]["peak_memory_bytes"], int) for n in ("dense", "csr", "bsr"))
    out = capsys.readouterr()
    assert "speedup" in out.out and "bench.json" in out.err


@pytest.mark.slow
def test_bench_without_a_run(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["bench", "model=mlp", "model.hidden=[64,64]", "sparsity=0.9", "distribution.structure=block",
            "distribution.block=16", "--input-shape", "1,40", "--num-classes", "10", "--memory", "none",
            "--no-train", "--out", str(out), "--repeats", "2", "--warmup", "1", "--batch-sizes", "4"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    check_report(report, [4])
    assert report["source"]["run_dir"] is None and report["source"]["sparse_layers"] == ["3.weight"]
    assert report["source"]["sparsity"] == pytest.approx(0.9, abs=0.07)  # 16 blocks: whole blocks only
    assert report["training"]["status"] == "skipped"
    assert report["formats"]["csr"]["peak_memory_bytes"] is None


@pytest.mark.slow
def test_bench_training_backend_hook(run_dir, tmp_path, monkeypatch):
    calls = []

    def factory(model, masks):
        calls.append(sorted(masks))
        return lambda x, y: model(x).sum().backward()

    def refusing(model, masks):
        raise kernels.SparseFormatError("this backend needs a GPU")

    backend = types.ModuleType("sparsebench.sparse.backend")
    backend.BENCH_TRAIN_BACKENDS = {"fake": factory, "gpu_only": refusing}
    monkeypatch.setitem(sys.modules, "sparsebench.sparse.backend", backend)
    out = tmp_path / "b.json"
    assert main(["bench", str(run_dir), *FAST, "--formats", "csr", "--memory", "none", "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["training"]["steps"]
    assert steps["fake"]["status"] == "ok" and calls == [["3.weight", "6.weight", "9.weight"]]
    expected = {"status": "skipped", "reason": "this backend needs a GPU", "step_ms": None, "speedup": None}
    assert steps["gpu_only"] == expected


@pytest.mark.parametrize("args,expected", [
    (["--batch-sizes", "0"], "positive whole numbers"),
    (["--formats", "coo"], "unknown format"),
    (["--repeats", "x"], "positive whole number"),
    (["--batch-sizes", "1,100000000"], "batch sizes are at most 65536"),  # torch's allocator failed with a traceback
    (["--threads", "100000"], "at most 1024 threads"),  # torch crashed with SIGSEGV
])
def test_bench_bad_arguments_are_one_line(tmp_path, capsys, args, expected):
    assert main(["bench", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparsebench bench: error: ") and "\n" not in err and expected in err


def test_bench_refuses_a_missing_run_and_mixed_targets(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "model=mlp"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", str(tmp_path)]) == 2  # a directory without config.yaml
    err = capsys.readouterr().err.strip()
    assert "not a run directory" in err and "\n" not in err


def test_bench_never_overwrites_the_runs_own_files(run_dir, capsys):
    model = (run_dir / "model.pt").read_bytes()
    assert main(["bench", str(run_dir), "--out", str(run_dir / "model.pt"), "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.pt is a file of the run directory" in err and "\n" not in err
    assert (run_dir / "model.pt").read_bytes() == model


def test_bench_out_of_memory_is_one_line(run_dir, capsys, monkeypatch):
    import sparsebench.bench as bench

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 160000000000 bytes")

    monkeypatch.setattr(bench, "benchmark", allocate)
    assert main(["bench", str(run_dir), "--batch-sizes", "60000", "--out", str(run_dir / "elsewhere.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sparsebench bench: error: out of memory at --batch-sizes 60000: use smaller batches"
    assert not (run_dir / "elsewhere.json").exists()
