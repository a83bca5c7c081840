"""Your own code as plug-ins: imported before validation, in every job, with no YAML needed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsebench import cli, plugins, results

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "snip_plugin.py"
TINY = ["epochs=2", "dataset.num_samples=400", "progress=none"]


def test_snip_plugin_prunes_at_init_by_connection_sensitivity(tmp_path, capsys):
    args = ["train", f"plugins=[{EXAMPLE}]", "method=snip", "method.batches=2", *TINY, f"results_root={tmp_path}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "snip: pruned at initialisation by |w * grad| on 128 examples" in out
    (run,) = [p.parent for p in tmp_path.rglob(results.FINAL_FILE)]
    final = json.loads((run / results.FINAL_FILE).read_text())
    assert final["method"] == "snip" and final["actual_sparsity"] == pytest.approx(0.9, abs=1e-4)
    # The mask never changed after the prune at init: ITOP counts from the SNIP mask, so it equals
    # the density, and no mask update was logged.
    assert final["itop_rate"] == pytest.approx(1 - final["actual_sparsity"], abs=1e-4)
    assert not results.read_jsonl(run / results.MASK_UPDATES_FILE)
    assert "keep_ratio" not in (run / results.CONFIG_FILE).read_text() and "batches: 2" in (run / results.CONFIG_FILE).read_text()


def test_snip_masks_keep_the_largest_sensitivities():
    from sparsebench.config import validate
    from sparsebench.train import build_run

    plugins.load([str(EXAMPLE)])
    cfg = validate(cli.resolve(cli.compose_config(["method=snip", "dataset.num_samples=400"])))
    run = build_run(cfg)
    x, y = next(iter(torch.utils.data.DataLoader(run.data.train, batch_size=128, shuffle=True,
                                                 generator=torch.Generator().manual_seed(0))))
    run.model.zero_grad()
    torch.nn.functional.cross_entropy(run.model(x), y).backward()
    expected = {n: (t.param.detach() * t.param.grad).abs() for n, t in run.engine.tensors.items()}
    run.model.zero_grad(set_to_none=True)
    ctx = type("Ctx", (), {"first_batch": lambda self: (x, y), "optimizer": run.optimizer, "log": print})()
    run.method.start(ctx)
    for name, t in run.engine.tensors.items():
        kept, dropped = expected[name][t.mask], expected[name][~t.mask]
        assert int(t.mask.sum()) == 1229 and kept.min() >= dropped.max()  # exact count, top scores


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("raise ValueError('boom')\n")
    assert cli.main(["train", f"plugins=[{broken}]", *TINY, f"results_root={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sparsebench train: error: plugins: cannot import '{broken}': ValueError: boom"
    assert cli.main(["train", "plugins=[no_such_module_xyz]", *TINY]) == 2
    assert "No module named 'no_such_module_xyz'" in capsys.readouterr().err


def test_unknown_method_without_the_plugin_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "method=snipx", *TINY, f"results_root={tmp_path}"]) == 2
    assert "Could not find 'method/snipx'" in capsys.readouterr().err


@pytest.mark.slow
def test_plugin_reaches_submitit_workers(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsebench", "train", "-m", "hydra/launcher=submitit_local",
         f"plugins=[{EXAMPLE}]", "method=snip,static", *TINY, f"results_root={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    finals = [json.loads(p.read_text()) for p in tmp_path.rglob(results.FINAL_FILE)]
    assert sorted(f["method"] for f in finals) == ["snip", "static"]


def test_entry_points_are_loaded_in_every_process(tmp_path):
    site = tmp_path / "site"
    (site / "fake_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "fake_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n")
    (site / "fake_plugin-0.1.dist-info" / "entry_points.txt").write_text("[sparsebench.methods]\nkeepall = fake_methods\n")
    (site / "fake_methods.py").write_text(
        "from dataclasses import dataclass\n"
        "from sparsebench.methods import METHODS, SparsityMethod\n"
        "@dataclass\nclass Options:\n    strength: float = 0.5\n"
        "@METHODS.register('keepall')\nclass KeepAll(SparsityMethod):\n    Options = Options\n"
        "    def start(self, ctx):\n        self.random_start(ctx)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-m", "sparsebench", "train", "method=keepall", "method.strength=0.25",
                           "--cfg", "job"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: keepall" in proc.stdout and "strength: 0.25" in proc.stdout
