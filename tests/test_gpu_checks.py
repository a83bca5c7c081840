"""The prepared GPU checks (benchmarks/bench_gpu.py, scripts/gpu_checks.sh) run rarely, on a lent
GPU: their plumbing is checked here on the CPU so that a GPU's few minutes are not lost to a typo."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU stand-in for the GPU run")
def test_bench_gpu_smoke_run_writes_every_case(tmp_path, capsys, monkeypatch):
    out = tmp_path / "gpu.json"
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--smoke", "--json", str(out)])
    assert bench_gpu().main() == 0
    results = json.loads(out.read_text())["results"]
    assert not [r for r in results if "error" in r], capsys.readouterr().out
    assert results[0]["case"] == "2:4" and "CUDA" in results[0]["skipped"]
    forward = [r for r in results if r["case"].startswith("forward float32")]
    assert len(forward) == 2 and all(set(r["timings"]) == {"dense", "csr", "bsr16", "bsr32", "bsr64"} for r in forward)
    assert all(e <= 1e-4 for r in forward for e in r["relative_errors"].values())
    shares = [r for r in results if r["case"].startswith("training share")]
    assert len(shares) == 2 and all(len(r["timings"]) == 4 for r in shares)
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py"])
    assert bench_gpu().main() == 2  # a real run without a GPU: one line, nothing measured
    assert "no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU stand-in for the GPU run")
def test_a_failing_case_is_one_line_and_the_rest_is_kept(tmp_path, capsys, monkeypatch):
    module = bench_gpu()

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this\nsecond line")

    monkeypatch.setattr(module, "case_forward", broken)
    out = tmp_path / "gpu.json"
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--smoke", "--json", str(out)])
    assert module.main() == 0
    results = json.loads(out.read_text())["results"]
    failed = [r for r in results if "error" in r]
    assert len(failed) == 4 and all(r["error"].startswith("RuntimeError: no kernel for this") for r in failed)
    assert len([r for r in results if r["case"].startswith("training share")]) == 2  # later cases still ran
    assert "forward float32 s=0.9: FAILED: RuntimeError: no kernel for this\n" in capsys.readouterr().out


def test_gpu_checks_script_parses_and_names_its_verbs():
    script = ROOT / "scripts" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: scripts/gpu_checks.sh wheels|run" in usage.stderr
