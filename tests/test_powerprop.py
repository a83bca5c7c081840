"""Powerpropagation: the re-parameterisation, its initialisation, and its composition with methods."""
import json

import pytest
import torch
from torch import nn

from sparsebench import cli
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.powerprop import apply_powerprop, export_state_dict


def test_effective_weights_keep_the_standard_initial_distribution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.Linear(300, 10))
    before = model[0].weight.detach().clone()
    apply_powerprop(model, ["0.weight"], alpha=3.0)
    assert torch.allclose(model[0].weight, before, atol=1e-6)  # w unchanged: standard init
    v = model[0].parametrizations.weight.original
    assert torch.allclose(v, before.sign() * before.abs() ** (1 / 3), atol=1e-6)


def test_gradient_is_scaled_by_alpha_abs_v_to_the_alpha_minus_one():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.25, -1.0, 4.0]]))
    apply_powerprop(model, ["0.weight"], alpha=2.0)
    x = torch.tensor([[1.0, 1.0, 1.0]])
    model(x).sum().backward()
    v = model[0].parametrizations.weight.original
    # dL/dw = x = 1, so dL/dv = 2|v| with v = sign(w) sqrt|w| = (0.5, -1, 2)
    assert torch.allclose(v.grad, torch.tensor([[1.0, 2.0, 4.0]]))


def test_engine_masks_v_and_exports_plain_effective_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    apply_powerprop(model, ["0.weight"], alpha=2.0)
    engine = MaskedModel(model)
    assert engine.tensors["0.weight"].param is model[0].parametrizations.weight.original
    densities = {"0.weight": 0.25}
    engine.set_masks(engine.magnitude_masks(densities), densities)
    state = export_state_dict(model)
    assert "0.weight" in state and not any("parametrizations" in k for k in state)
    assert int(state["0.weight"].count_nonzero()) == 8  # 25 % of 32, masked w exactly zero
    kept = state["0.weight"] != 0
    assert state["0.weight"].abs()[kept].min() >= state["0.weight"].abs()[~kept].max()


@pytest.mark.slow
def test_powerprop_composes_with_gmp_end_to_end(tmp_path):
    args = ["train", "method=gmp", "powerprop=2", "sparsity=0.9", "epochs=3", "dataset.num_samples=600",
            "progress=none", f"results_root={tmp_path}"]
    assert cli.main(args) == 0
    (run,) = [p.parent for p in tmp_path.rglob("final.json")]
    assert "gmp+powerprop2" in run.parts
    final = json.loads((run / "final.json").read_text())
    assert final["method"] == "gmp+powerprop2" and abs(final["actual_sparsity"] - 0.9) < 1e-3
    state = torch.load(run / "model.pt")
    zeros = sum(int((state[n] == 0).sum()) for n in final["layer_densities"])
    assert zeros / sum(state[n].numel() for n in final["layer_densities"]) == pytest.approx(final["actual_sparsity"])
    assert cli.main([*args[:-1], f"results_root={tmp_path}", "powerprop=0.5"]) == 2
