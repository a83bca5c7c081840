"""optimizer=mars: MARS-AdamW (approximate) against hand-computed steps, its AdamW path for
vectors, its previous-gradient state reset for regrown entries, and the CLI."""
import json
import math

import pytest
import torch
from torch import nn

from sparsebench.mars import MarsAdamW
from sparsebench.sparse.masked import MaskedModel
from cli_process import run_cli


def hand_update(x, m, v, t, g, g_prev, lr=0.01, beta1=0.95, beta2=0.99, eps=1e-8, wd=0.0, gamma=0.5):
    """One MARS-AdamW update of flat lists with an explicit g_prev (docs/methods.md#mars)."""
    c = [gi + gamma * beta1 / (1 - beta1) * (gi - pi) for gi, pi in zip(g, g_prev)]
    norm = math.sqrt(sum(ci * ci for ci in c))
    if norm > 1:
        c = [ci / norm for ci in c]
    m = [beta1 * mi + (1 - beta1) * ci for mi, ci in zip(m, c)]
    v = [beta2 * vi + (1 - beta2) * ci * ci for vi, ci in zip(v, c)]
    b1, b2 = 1 - beta1 ** t, 1 - beta2 ** t
    x = [xi - lr * (wd * xi + (mi / b1) / (math.sqrt(vi / b2) + eps)) for xi, mi, vi in zip(x, m, v)]
    return x, m, v


def hand_mars(x, grads, lr, beta1, beta2, eps, wd, gamma):
    """Approximate MARS over several steps: g_prev is the previous step's gradient (0 at first)."""
    x, m, v, last = list(x), [0.0] * len(x), [0.0] * len(x), [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        x, m, v = hand_update(x, m, v, t, g, last, lr, beta1, beta2, eps, wd, gamma)
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


def test_exact_variant_corrects_with_the_previous_weights_gradient_on_this_batch():
    """Two steps of the trainer's order: the exact pass (nothing before the first update), this
    batch's backward, the step; against gradients taken by hand at x_1 and x_2."""
    torch.manual_seed(0)
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)) for _ in range(2)]
    layer = nn.Linear(3, 2, bias=False).double()
    start = layer.weight.detach().clone()
    opt = MarsAdamW(layer.parameters(), lr=0.01, gamma=0.5, exact=True)

    def loss_at(weight, batch):
        x, target = batch
        return ((x @ weight.T - target) ** 2).mean()

    def grad_at(weight, batch):
        w = weight.detach().clone().requires_grad_(True)
        loss_at(w, batch).backward()
        return w.grad.view(-1).tolist()

    passes = []
    for batch in batches:
        passes.append(opt.record_previous_gradients(layer, lambda b=batch: loss_at(layer.weight, b), lambda: None))
        opt.zero_grad()
        loss_at(layer.weight, batch).backward()
        opt.step()
    assert passes == [False, True]
    x1 = start.view(-1).tolist()
    g1 = grad_at(start, batches[0])
    x2, m, v = hand_update(x1, [0.0] * 6, [0.0] * 6, 1, g1, [0.0] * 6)
    w2 = torch.tensor(x2, dtype=torch.float64).view(2, 3)
    g2, g_prev = grad_at(w2, batches[1]), grad_at(start, batches[1])  # grad f(x_1, xi_2), not grad f(x_1, xi_1)
    assert g_prev != pytest.approx(g1)
    x3, _, _ = hand_update(x2, m, v, 2, g2, g_prev)
    assert layer.weight.detach().view(-1).tolist() == pytest.approx(x3, rel=1e-10, abs=1e-12)
    assert opt.state[layer.weight]["last_grad"].view(-1).tolist() == pytest.approx(g_prev, rel=1e-10)


def test_exact_pass_leaves_weights_buffers_and_gradients_as_they_were():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    opt = MarsAdamW(model.parameters(), lr=0.05, exact=True)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    nn.functional.cross_entropy(model(x), y).backward()  # .grad of a second batch, left in place
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    assert opt.record_previous_gradients(model, lambda: nn.functional.cross_entropy(model(x), y), lambda: None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


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


def test_mars_trains_a_sparse_run_from_the_cli(tmp_path):
    proc = run_cli("train", "optimizer=mars", "method=rigl", "method.delta_t=5", "epochs=1", "dataset.num_samples=600",
                   "progress=none", f"results_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "done: test_acc" in proc.stdout


def test_exact_mars_trains_from_the_cli_at_twice_the_step_cost(tmp_path):
    finals = {}
    for variant in ("approx", "exact"):
        proc = run_cli("train", "optimizer=mars", f"optimizer.variant={variant}", "method=rigl", "method.delta_t=5",
                       "epochs=1", "dataset.num_samples=600", "progress=none", f"results_root={tmp_path / variant}")
        assert proc.returncode == 0, proc.stderr
        (final,) = (tmp_path / variant).rglob("final.json")
        finals[variant] = json.loads(final.read_text())
    # every step but the first adds a second masked forward and backward (3 f_S): about twice the FLOPs
    ratio = finals["exact"]["train_flops"] / finals["approx"]["train_flops"]
    steps = finals["exact"]["steps"]
    assert 1.0 + (steps - 1) / steps * 0.9 < ratio < 2.0
    assert finals["exact"]["test_acc"] != finals["approx"]["test_acc"] or finals["exact"]["test_loss"] != finals["approx"]["test_loss"]


@pytest.mark.parametrize("override, message", [
    ("optimizer.gamma=-1", "optimizer.gamma=-1.0: expected a value >= 0"),
    ("optimizer.beta1_1d=1", "optimizer.beta1_1d=1.0: expected a value in [0, 1)"),
    ("optimizer.variant=exactly", "optimizer.variant='exactly': expected one of approx, exact"),
    ("optimizer.variant=exact amp=true", "optimizer.variant=exact with amp=true"),
    ("optimizer.variant=exact backend=sparse", "optimizer.variant=exact with backend=sparse"),
])
def test_bad_mars_options_are_one_line(tmp_path, override, message):
    proc = run_cli("train", "optimizer=mars", *override.split(), f"results_root={tmp_path / 'r'}")
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "r").exists()
