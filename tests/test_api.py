"""sparsebench.run: the Python API composes and validates like the CLI and returns the results."""
import pytest
import torch

import sparsebench
from sparsebench import cli, results
from sparsebench.api import overrides_from
from sparsebench.errors import UserError

TINY = dict(epochs=2, progress="none")


def test_overrides_from_python_values():
    assert overrides_from(("method=gap",), {"sparsity": 0.8, "amp": True, "paper": None,
                                            "schedule.milestones": [1, 2], "exp": "a b"}) == [
        "method=gap", "sparsity=0.8", "amp=true", "paper=null", "schedule.milestones=[1,2]", "exp='a b'"]
    with pytest.raises(UserError, match="positional arguments are overrides"):
        overrides_from(("gap",), {})


@pytest.mark.slow
def test_run_returns_metrics_model_and_path_like_the_cli(tmp_path):
    result = sparsebench.run("method=static", **TINY, **{"dataset.num_samples": 400}, results_root=str(tmp_path))
    cli_args = ["method=static", "epochs=2", "progress=none", "dataset.num_samples=400", f"results_root={tmp_path}"]
    assert result.path == results.run_dir(cli.resolve(cli.compose_config(cli_args)))  # the CLI's directory
    assert result.final["status"] == "completed" and result.test_acc == result.final["test_acc"]
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    model = result.model()
    state = torch.load(result.path / results.MODEL_FILE, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    x = torch.zeros(3, *result.final["input_shape"])
    assert model(x).shape == (3, result.final["num_classes"])
    # The same call again finds the finished run instead of training it.
    again = sparsebench.run("method=static", **TINY, **{"dataset.num_samples": 400}, results_root=str(tmp_path))
    assert again.path == result.path and again.final == result.final


def test_bad_input_raises_the_cli_message(tmp_path):
    with pytest.raises(UserError, match=r"sparsity=1.5: expected a fraction of zeros in \[0, 1\)"):
        sparsebench.run(sparsity=1.5, results_root=str(tmp_path))
    with pytest.raises(UserError, match="unknown key 'sparsty'"):
        sparsebench.run(sparsty=0.5, results_root=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_dry_run_returns_none(tmp_path, capsys):
    assert sparsebench.run(method="gmp", dry_run=True, results_root=str(tmp_path), **{"dataset.num_samples": 400}) is None
    assert "training FLOPs" in capsys.readouterr().out
