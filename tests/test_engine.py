"""The masked-layer engine's invariants, on tiny hand-computed cases."""
import math

import pytest
import torch
from torch import nn

from sparsebench.errors import UserError
from sparsebench.sparse.allocation import (
    erdos_renyi_densities,
    global_magnitude_densities,
    layer_densities,
)
from sparsebench.sparse.flops import FlopCounter, layer_forward_flops
from sparsebench.sparse.masked import MaskedModel, MaskInvariantError, target_nnz


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_target_nnz_keeps_n_minus_floor_sn():
    assert target_nnz(100, 0.1) == 10
    assert target_nnz(12288, 0.1) == 12288 - math.floor(0.9 * 12288)  # 1229
    assert target_nnz(7, 0.5) == 4  # floor(3.5) = 3 zeros
    assert target_nnz(10, 1.0) == 10 and target_nnz(10, 0.0) == 0
    # density stored as count/N must give back the count, even for large tensors
    assert all(target_nnz(25_557_032, c / 25_557_032) == c for c in (1, 2_555_703, 25_557_031))


def test_only_conv_and_linear_weights_are_prunable():
    model = nn.Sequential(
        nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)
    )
    engine = MaskedModel(model)
    assert engine.names == ["2.weight", "4.weight"]  # no embedding, norm or bias


def test_dense_first_last_and_patterns_are_explicit():
    engine = MaskedModel(tiny_mlp(), dense_first=True, dense_last=True)
    assert engine.names == ["2.weight"]
    assert engine.dense_names == ["0.weight", "4.weight"]
    engine = MaskedModel(tiny_mlp(), dense_patterns=["2.*"])
    assert engine.names == ["0.weight", "4.weight"]


def test_set_mask_rejects_any_count_but_the_target():
    engine = MaskedModel(tiny_mlp())
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask.view(-1)[:7] = True
    with pytest.raises(MaskInvariantError):
        engine.set_mask("2.weight", mask, density=0.5)  # needs exactly 32
    mask.view(-1)[:32] = True
    engine.set_mask("2.weight", mask, density=0.5)
    assert int(engine.tensors["2.weight"].param.count_nonzero()) <= 32
    assert torch.all(engine.tensors["2.weight"].param[~mask] == 0)


def sgd_like_step(engine, optimizer, model, x, y):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    engine.mask_gradients()
    optimizer.step()
    engine.apply_masks()


def test_finish_step_asks_the_method_each_step_whether_to_mask_gradients_and_step():
    from sparsebench.methods import SparsityTarget, StepContext, finish_step
    from sparsebench.methods.base import SparsityMethod

    class Scripted(SparsityMethod):  # masks gradients on even steps, skips the optimizer on step 3
        def mask_gradients_at(self, step):
            return step % 2 == 0

        def skips_optimizer_step(self, step):
            return step == 3

    model = tiny_mlp()
    engine = MaskedModel(model)
    densities = {n: 0.5 for n in engine.names}
    method = Scripted(None, engine, SparsityTarget(0.5, "uniform", densities), 10, 10, torch.Generator())
    engine.set_masks(engine.magnitude_masks(densities), densities)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(0, 10, 10, optimizer, lambda: None, lambda n: None, lambda m: None)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    masked_grads, moved = {}, {}
    for step in range(5):
        ctx.step = step
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        original = optimizer.step
        optimizer.step = lambda: (masked_grads.__setitem__(step, all(
            torch.all(t.param.grad[~t.mask] == 0) for t in engine.tensors.values())), original())
        finish_step(method, engine, ctx, optimizer.step)
        optimizer.step = original
        moved[step] = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert masked_grads == {0: True, 1: False, 2: True, 4: True}  # step 3 never reached the optimizer
    assert moved == {0: True, 1: True, 2: True, 3: False, 4: True}


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_masked_weights_stay_zero_and_frozen_under_any_optimizer(opt):
    model = tiny_mlp()
    engine = MaskedModel(model)
    gen = torch.Generator().manual_seed(0)
    densities = {n: 0.25 for n in engine.names}
    engine.set_masks(engine.random_masks(densities, gen), densities)
    optimizer = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        "adam": lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    }[opt](model.parameters())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    before = {n: t.param.detach().clone() for n, t in engine.tensors.items()}
    for _ in range(5):
        sgd_like_step(engine, optimizer, model, x, y)
    for name, t in engine.tensors.items():
        assert torch.all(t.param[~t.mask] == 0)
        assert int(t.mask.sum()) == target_nnz(t.numel, 0.25)
        assert not torch.equal(t.param[t.mask], before[name][t.mask])  # active ones did train


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_regrown_entries_start_at_zero_with_reset_optimizer_state(opt):
    model = tiny_mlp()
    engine = MaskedModel(model)
    optimizer = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    }[opt](model.parameters())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):  # dense steps: every entry gets optimizer state
        sgd_like_step(engine, optimizer, model, x, y)
    name = "2.weight"
    param = engine.tensors[name].param
    densities = {name: 0.5}
    engine.set_masks(engine.magnitude_masks(densities), densities, optimizer)
    pruned = ~engine.tensors[name].mask.clone()
    state_before = {k: v.clone() for k, v in optimizer.state[param].items() if torch.is_tensor(v) and v.shape == param.shape}
    assert state_before and all(v[pruned].abs().sum() > 0 for v in state_before.values())
    engine.grow_dense([name], optimizer)
    assert torch.all(param[pruned] == 0)
    for key, value in optimizer.state[param].items():
        if torch.is_tensor(value) and value.shape == param.shape:
            assert torch.all(value[pruned] == 0), key  # regrown: reset
            assert torch.equal(value[~pruned], state_before[key][~pruned]), key  # kept: untouched


def test_magnitude_masks_keep_largest_active_weights():
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]]))
    engine = MaskedModel(model)
    mask = engine.magnitude_masks({"0.weight": 0.5})["0.weight"]
    assert mask.tolist() == [[False, True, False], [True, False, True]]


def test_random_masks_exact_and_reproducible():
    engine = MaskedModel(tiny_mlp())
    densities = {n: 0.3 for n in engine.names}
    a = engine.random_masks(densities, torch.Generator().manual_seed(1))
    b = engine.random_masks(densities, torch.Generator().manual_seed(1))
    for n in engine.names:
        assert torch.equal(a[n], b[n])
        assert int(a[n].sum()) == target_nnz(engine.tensors[n].numel, 0.3)


def test_global_magnitude_is_exact_with_ties():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.1]]))
        model[1].weight.copy_(torch.tensor([[5.0, 1.0], [1.0, 0.2]]))
    engine = MaskedModel(model)
    densities = global_magnitude_densities(engine, 0.5)  # keep 4 of 8: 5.0 plus three of the five 1.0s
    counts = {n: target_nnz(4, d) for n, d in densities.items()}
    assert sum(counts.values()) == 4
    assert counts == {"0.weight": 3, "1.weight": 1}  # ties handed out in tensor order


def test_erk_matches_hand_computation_and_overflow_rule():
    # Two layers: a small one whose ERK score would push it past density 1, and a large one.
    shapes = {"small": torch.Size([4, 4]), "big": torch.Size([100, 100])}
    d = erdos_renyi_densities(shapes, sparsity=0.5, kernel=True)
    assert d["small"] == 1.0  # (4+4)/16 = 0.5 raw score: overflows, made dense
    budget = 0.5 * (16 + 10_000)
    assert d["big"] == pytest.approx((budget - 16) / 10_000)
    # Without overflow ERK keeps the global budget exactly: sum d_l N_l = (1-s) sum N_l.
    shapes = {"a": torch.Size([64, 32, 3, 3]), "b": torch.Size([128, 64, 3, 3]), "c": torch.Size([10, 128])}
    d = erdos_renyi_densities(shapes, sparsity=0.9, kernel=True)
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(d[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.1 * total)
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    assert d["a"] / d["b"] == pytest.approx(raw["a"] / raw["b"])


def test_er_uses_only_fan_in_and_fan_out():
    shapes = {"a": torch.Size([8, 4, 3, 3]), "b": torch.Size([16, 8, 3, 3])}
    d = erdos_renyi_densities(shapes, sparsity=0.8, kernel=False)
    assert d["a"] / d["b"] == pytest.approx(((8 + 4) / 32) / ((16 + 8) / 128))


def test_custom_densities_file(tmp_path):
    shapes = {"a": torch.Size([10, 10]), "b": torch.Size([10, 10])}
    good = tmp_path / "d.yaml"
    good.write_text("a: 0.05\nb: 0.15\n")
    assert layer_densities("custom", shapes, 0.9, file=str(good)) == {"a": 0.05, "b": 0.15}
    wrong_total = tmp_path / "w.yaml"
    wrong_total.write_text("a: 0.5\nb: 0.5\n")
    with pytest.raises(UserError, match="global sparsity of 0.5000"):
        layer_densities("custom", shapes, 0.9, file=str(wrong_total))
    missing = tmp_path / "m.json"
    missing.write_text('{"a": 0.1}')
    with pytest.raises(UserError, match="missing tensors \\['b'\\]"):
        layer_densities("custom", shapes, 0.9, file=str(missing))
    with pytest.raises(UserError, match="no such file"):
        layer_densities("custom", shapes, 0.9, file=str(tmp_path / "nope.yaml"))


def test_flops_per_layer_and_rigl_step_formula():
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 10, 5))
    flops = layer_forward_flops(model, (1, 10))
    assert flops == {"0.weight": 2 * 10 * (4 * 1 * 3), "2.weight": 2 * 40 * 5}
    counter = FlopCounter(flops)
    densities = {"0.weight": 1.0, "2.weight": 0.1}
    f_s = 240 + 0.1 * 400
    assert counter.train_step(densities) == pytest.approx(3 * f_s)
    assert counter.train_step(densities, dense_weight_grad=True) == pytest.approx(2 * f_s + 640)
    assert counter.dense_train_step() == 3 * 640
