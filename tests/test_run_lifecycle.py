"""A run's life beyond one training: skipped without being built, trained again on request, its
provenance and inference cost recorded, its schedule explained, its first batch offered to the method."""
import json

import pytest

from sparsebench import cli, results, train
from sparsebench.methods import METHODS

TINY = ["method=rigl", "epochs=2", "dataset.num_samples=400", "progress=none"]


def the_run(root):
    (run,) = [p.parent for p in root.rglob(results.FINAL_FILE)]
    return run


@pytest.mark.slow
def test_finished_run_is_skipped_without_building_and_rerun_trains_it_again(tmp_path, capsys, monkeypatch):
    args = ["train", *TINY, f"results_root={tmp_path}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "0 mask updates planned in 6 steps" in out and "warning: method rigl plans 0 mask update(s)" in out
    run = the_run(tmp_path)
    first = json.loads((run / results.FINAL_FILE).read_text())
    prov = first["provenance"]
    assert prov["torch"] and prov["threads"] >= 1 and prov["world_size"] == 1 and len(prov["commit"]) == 40
    assert 0 < first["inference_flops"] < first["inference_flops_dense"]

    def must_not_build(cfg, *a, **k):
        raise AssertionError("a finished run was built before being skipped")

    monkeypatch.setattr(train, "build_run", must_not_build)
    # killed between writing final.json and removing the checkpoint: the skip removes the leftover
    (run / results.CHECKPOINT_FILE).write_bytes(b"a checkpoint that is never read again")
    assert cli.main(args) == 0
    assert "already complete, skipped" in capsys.readouterr().out
    assert not (run / results.CHECKPOINT_FILE).exists()
    monkeypatch.undo()

    (run / "bench.json").write_text("{}")
    assert cli.main([*args, "rerun=true"]) == 0
    assert "already complete" not in capsys.readouterr().out
    assert the_run(tmp_path) == run  # rerun is not part of the run's identity: same directory
    again = json.loads((run / results.FINAL_FILE).read_text())
    assert again["test_acc"] == first["test_acc"] and again["wall_time_s"] != first["wall_time_s"]
    assert not (run / "bench.json").exists()  # stale measurements of the old model are gone
    assert [m["epoch"] for m in results.read_jsonl(run / results.METRICS_FILE)] == [1, 2]


def test_methods_get_the_first_training_batch(tmp_path, monkeypatch):
    seen = {}
    static = METHODS.get("static")
    original_start = static.start

    def start(self, ctx):
        x, y = ctx.first_batch()
        seen["shapes"] = (tuple(x.shape), tuple(y.shape))
        original_start(self, ctx)

    monkeypatch.setattr(static, "start", start)
    args = ["train", "method=static", "epochs=1", "batch_size=32", "dataset.num_samples=200", "progress=none",
            f"results_root={tmp_path}"]
    assert cli.main(args) == 0
    assert seen["shapes"] == ((32, 1, 40), (32,))


def test_provenance_is_the_code_that_started_training(tmp_path, monkeypatch):
    # A checkout can move on while a long run trains: final.json names the code read before the
    # first evaluation, not after the last.
    evaluations = []
    real_evaluate = train.evaluate

    def counting_evaluate(run):
        evaluations.append(1)
        return real_evaluate(run)

    def recording(device, world_size):
        return {"commit": f"after {len(evaluations)} evaluations", "world_size": world_size}

    monkeypatch.setattr(train, "evaluate", counting_evaluate)
    monkeypatch.setattr(train, "provenance", recording)
    assert cli.main(["train", *TINY, f"results_root={tmp_path}"]) == 0
    final = json.loads((the_run(tmp_path) / results.FINAL_FILE).read_text())
    assert len(evaluations) == 2 and final["provenance"] == {"commit": "after 0 evaluations", "world_size": 1}


def test_code_is_dirty_only_when_the_package_or_its_configs_changed(tmp_path, monkeypatch):
    import subprocess

    import sparsebench
    from sparsebench import provenance

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "sparsebench").mkdir()
    (tmp_path / "conf").mkdir()
    (tmp_path / "sparsebench" / "__init__.py").write_text("")
    (tmp_path / "conf" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "README.md").write_text("hello\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    monkeypatch.setattr(sparsebench, "__file__", str(tmp_path / "sparsebench" / "__init__.py"))
    assert provenance.code_version()["dirty"] is False
    (tmp_path / "README.md").write_text("edited\n")  # documentation is not code
    (tmp_path / "results.txt").write_text("new\n")
    assert provenance.code_version()["dirty"] is False
    (tmp_path / "sparsebench" / "kernels.py").write_text("x = 1\n")  # an uncommitted new module is
    assert provenance.code_version()["dirty"] is True
    (tmp_path / "sparsebench" / "kernels.py").unlink()
    (tmp_path / "conf" / "config.yaml").write_text("seed: 1\n")
    assert provenance.code_version()["dirty"] is True
    assert len(provenance.code_version()["commit"]) == 40
