"""optimizer=mars: MARS-AdamW (approximate) against hand-computed steps, its AdamW path for
vectors, its previous-gradient state reset for regrown entries, and the CLI."""
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsebench.mars import MarsAdamW
from sparsebench.sparse.masked import MaskedModel


def hand_mars(x, grads, lr, beta1, beta2, eps, wd, gamma):
    """The update of docs/methods.md#mars written out element by element, per tensor norm."""
    x = list(x)
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    last = [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        c = [gi + gamma * beta1 / (1 - beta1) * (gi - li) for gi, li in zip(g, last)]
        norm = math.sqrt(sum(ci * ci for ci in c))
        if norm > 1:
            c = [ci / norm for ci in c]
        m = [beta1 * mi + (1 - beta1) * ci for mi, ci in zip(m, c)]
        v = [beta2 * vi + (1 - beta2) * ci * ci for vi, ci in zip(v, c)]
        b1, b2 = 1 - beta1 ** t, 1 - beta2 ** t
        x = [xi - lr * (wd * xi + (mi / b1) / (math.sqrt(vi / b2) + eps)) for xi, mi, vi in zip(x, m, v)]
        last = list(g)
    return x


@pytest.mark.parametrize("scale", [0.1, 3.0])  # below and above the unit-norm clip
def test_two_steps_match_the_hand_computed_update(scale):
    start = [0.5, -1.0, 0.25, 2.0]
    grads = [[scale * g for g in (0.3, -0.2, 0.1, 0.4)], [scale * g for g in (-0.1, 0.5, 0.2, -0.3)]]
    p = nn.Parameter(torch.tensor(start, dtype=torch.float64).view(2, 2))
    opt = MarsAdamW([p], lr=0.01, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.1, gamma=0.025)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64).view(2, 2)
        opt.step()
    expected = hand_mars(start, grads, 0.01, 0.95, 0.99, 1e-8, 0.1, 0.025)
    assert p.detach().view(-1).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert opt.state[p]["last_grad"].view(-1).tolist() == pytest.approx(grads[-1])


def test_vectors_take_adamw_with_their_own_betas_and_decay():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5))
    b = nn.Parameter(a.detach().clone())
    mars = MarsAdamW([a], lr=0.01, betas_1d=(0.9, 0.95), weight_decay_1d=0.1)
    adamw = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for _ in range(3):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        mars.step()
        adamw.step()
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_kernels_follow_the_kernels_option():
    conv = nn.Parameter(torch.zeros(2, 2, 3))
    assert MarsAdamW([conv]).uses_mars(conv, MarsAdamW([conv]).param_groups[0])
    official = MarsAdamW([conv], kernels=False)
    assert not official.uses_mars(conv, official.param_groups[0])


def test_regrown_entries_forget_the_previous_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    engine = MaskedModel(model)
    opt = MarsAdamW(model.parameters(), lr=0.01)
    name = "0.weight"
    tensor = engine.tensors[name]
    mask = torch.rand(tensor.param.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    engine.set_mask(name, mask, int(mask.sum()) / mask.numel(), opt)
    model(torch.randn(4, 6)).sum().backward()
    engine.mask_gradients()
    opt.step()
    engine.apply_masks()
    state = opt.state[tensor.param]
    assert bool((state["last_grad"][~mask] == 0).all()) and bool((state["last_grad"][mask] != 0).any())
    grown = ~mask
    grown_mask = mask | grown  # everything active: the pruned half is regrown
    engine.set_mask(name, grown_mask, 1.0, opt)
    for key in ("last_grad", "exp_avg", "exp_avg_sq"):
        assert bool((state[key][grown] == 0).all()), key
        assert bool((state[key][mask] != 0).any()), key  # kept entries keep their state


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, timeout=600)


def test_mars_trains_a_sparse_run_from_the_cli(tmp_path):
    proc = run_cli("train", "optimizer=mars", "method=rigl", "method.delta_t=5", "epochs=1", "dataset.num_samples=600",
                   "progress=none", f"results_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "done: test_acc" in proc.stdout


@pytest.mark.parametrize("override, message", [
    ("optimizer.gamma=-1", "optimizer.gamma=-1.0: expected a value >= 0"),
    ("optimizer.beta1_1d=1", "optimizer.beta1_1d=1.0: expected a value in [0, 1)"),
])
def test_bad_mars_options_are_one_line(tmp_path, override, message):
    proc = run_cli("train", "optimizer=mars", override, f"results_root={tmp_path / 'r'}")
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "r").exists()
