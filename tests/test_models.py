"""Model registry tests: every registered model is built, run forwards and backwards, and checked
against its Hydra config, so registering a model is enough to get it tested."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sparsebench.errors import UserError
from sparsebench.models import create_model, list_models, model_options

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
NUM_CLASSES = 7  # not 10, so a stray hard-coded CIFAR head cannot pass
BATCH = 2
RESIDUAL = {"resnet20", "resnet32", "resnet56", "wrn22_2", "wrn28_10", "resnet18", "resnet50"}
SHAPES = {"cnn1d": [(1, 40)], "cnn1d_bn": [(1, 40)], "dass": [(1, 40), (3, 32, 32)], "mlp": [(1, 28, 28), (3, 32, 32)], "lenet5": [(1, 28, 28), (3, 32, 32)]}
# A genotype written by `sparsebench search method=dass` (MNIST-1D, seed 0): `dass` needs one.
DASS_GENOTYPE = Path(__file__).resolve().parent / "fixtures" / "dass_genotype.json"
FAST = {"resnet18": {"cifar_stem": True}, "resnet50": {"cifar_stem": True}, "dass": {"genotype": str(DASS_GENOTYPE)}}
CASES = [
    pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
    for name in list_models()
    for shape in SHAPES.get(name, [(3, 32, 32)])
]


def config(name: str) -> dict:
    return yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())


@functools.cache
def built(name: str, shape: tuple[int, ...]) -> nn.Module:
    """Each model once per shape, with its config's options (the costly part of this file)."""
    torch.manual_seed(0)
    options = {key: value for key, value in config(name).items() if key != "name"}
    return create_model(name, shape, NUM_CLASSES, **{**options, **FAST.get(name, {})})


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("name", list_models())
def test_config_lists_the_factory_options_with_their_defaults(name):
    path = CONF_DIR / f"{name}.yaml"
    assert path.is_file(), f"missing {path}"
    conf = config(name)
    assert conf.pop("name") == name
    defaults = {key: list(value) if isinstance(value, tuple) else value for key, value in model_options(name).items()}
    assert conf == defaults


@pytest.mark.parametrize("name,shape", CASES)
def test_forward_backward(name, shape):
    model = built(name, shape)
    model.train()
    out = model(torch.randn(BATCH, *shape))
    assert out.shape == (BATCH, NUM_CLASSES)
    model.zero_grad()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name,shape", CASES)
def test_module_order_is_forward_order(name, shape):
    """The sparsity engine orders layers by named_modules(); it must match the order they run in."""
    model = built(name, shape)
    layers = weighted_layers(model)
    called: list[nn.Module] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: called.append(m)) for layer in layers]
    with torch.no_grad():
        model.eval()(torch.randn(1, *shape))
    for hook in hooks:
        hook.remove()
    assert called == layers
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == NUM_CLASSES


@pytest.mark.parametrize("name,shape", CASES)
def test_stage_names_exist_for_residual_models(name, shape):
    model = built(name, shape)
    if name in RESIDUAL:
        assert model.stage_names
    module_names = {module_name for module_name, _ in model.named_modules()}
    assert set(getattr(model, "stage_names", [])) <= module_names


@pytest.mark.parametrize(
    "name,published",
    [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("wrn22_2", 1.1e6)],
)
def test_parameter_counts_match_the_papers(name, published):
    count = sum(p.numel() for p in create_model(name, (3, 32, 32), 10).parameters())
    assert abs(count - published) / published < 0.10, count


def test_resnet_width_multiplies_channels():
    assert create_model("resnet32", (3, 32, 32), 10, width=2).fc.in_features == 128


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="resnet21"):
        create_model("resnet21", (3, 32, 32), 10)


def test_unknown_option_is_a_one_line_user_error():
    with pytest.raises(UserError) as error:
        create_model("resnet20", (3, 32, 32), 10, widht=2)
    message = str(error.value)
    assert "\n" not in message
    assert "resnet20" in message and "widht" in message and "width" in message


@pytest.mark.parametrize(
    "name,shape,options",
    [("resnet20", (1, 40), {}), ("resnet20", (3, 32, 32), {"width": 0}), ("wrn22_2", (3, 32, 32), {"dropout": 1.5}),
     ("vgg16", (3, 16, 16), {}), ("mlp", (1, 28, 28), {"hidden": 300})],
)
def test_bad_shapes_and_values_are_user_errors(name, shape, options):
    with pytest.raises(UserError, match=name):
        create_model(name, shape, 10, **options)
