"""sparse_init: the default model and the sparsity-aware rescaling of initial weights."""

import pytest
import torch
from torch import nn

from sparsebench import cli
from sparsebench.sparse.initialisation import SparseInit, rescale_for_sparsity
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.powerprop import apply_powerprop


def engine_with_known_masks(powerprop: float = 1.0) -> MaskedModel:
    """One 4x8 linear of ones; unit i keeps its first 2*(i+1) inputs (densities 2/8, 4/8, 6/8, 8/8)."""
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    nn.init.ones_(model[0].weight)
    if powerprop != 1.0:
        apply_powerprop(model, ["0.weight"], powerprop)
    engine = MaskedModel(model)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    for unit in range(4):
        mask[unit, : 2 * (unit + 1)] = True
    engine.set_mask("0.weight", mask, 20 / 32)
    return engine


def test_unit_mode_scales_each_unit_by_its_own_fan_in():
    engine = engine_with_known_masks()
    rescale_for_sparsity(engine, SparseInit.unit)
    w = engine.model[0].weight
    for unit in range(4):
        kept = 2 * (unit + 1)
        assert torch.allclose(w[unit, :kept], torch.full((kept,), (8 / kept) ** 0.5))
        assert torch.all(w[unit, kept:] == 0)


def test_layer_mode_scales_by_the_tensor_density():
    engine = engine_with_known_masks()
    rescale_for_sparsity(engine, SparseInit.layer)
    w, mask = engine.model[0].weight, engine.tensors["0.weight"].mask
    assert torch.allclose(w[mask], torch.full((20,), (32 / 20) ** 0.5))
    assert torch.all(w[~mask] == 0)


def test_powerprop_rescales_the_effective_weights():
    engine = engine_with_known_masks(powerprop=2.0)
    rescale_for_sparsity(engine, SparseInit.unit)
    w = engine.model[0].weight  # the effective w = v|v|, not v
    assert torch.allclose(w[0, :2], torch.full((2,), 2.0))


def test_none_and_dense_tensors_are_untouched():
    engine = engine_with_known_masks()
    before = engine.model[0].weight.detach().clone()
    rescale_for_sparsity(engine, SparseInit.none)
    assert torch.equal(engine.model[0].weight, before)
    dense = MaskedModel(nn.Sequential(nn.Linear(8, 4)))
    weight = dense.model[0].weight.detach().clone()
    rescale_for_sparsity(dense, SparseInit.unit)
    assert torch.equal(dense.model[0].weight, weight)


@pytest.mark.slow
def test_sparse_init_restores_the_signal_of_the_unnormalised_model(tmp_path):
    """cnn1d at 90 %: with sparse_init=unit the last conv's activations keep the dense scale."""
    from sparsebench.config import validate
    from sparsebench.train import build_run

    def last_activation_std(*overrides):
        cfg = validate(cli.resolve(cli.compose_config(
            ["model=cnn1d", "method=static", "dataset.num_samples=500", *overrides])))
        run = build_run(cfg)
        run.method.random_start(type("Ctx", (), {"optimizer": run.optimizer})())
        init = [o.partition("=")[2] for o in overrides if o.startswith("sparse_init=")]
        rescale_for_sparsity(run.engine, SparseInit(init[0]) if init else SparseInit.none)
        x = run.data.train.inputs[:256]
        with torch.no_grad():
            return run.model[:-2](x).std().item()  # up to the last ReLU

    dense = last_activation_std("sparsity=0.0")
    sparse = last_activation_std("sparsity=0.9")
    rescaled = last_activation_std("sparsity=0.9", "sparse_init=unit")
    assert sparse < dense / 10  # the collapse the issue measured (0.18 -> 0.007)
    assert dense / 2 < rescaled < dense * 2


def test_default_model_is_the_normalised_one(capsys):
    assert cli.main(["train", "--cfg", "job"]) == 0
    assert "name: cnn1d_bn" in capsys.readouterr().out
