"""`cigl`: the per-step random mask (keep rate, scale, the update rule W - lr Z grad L(Z W)),
the averaged model's exact counts and recomputed BatchNorm statistics, its learning rate, and
the CLI's refusals."""

import pytest
import torch
from torch import nn

from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
from sparsebench.methods.cigl import recompute_batchnorm
from sparsebench.sparse.masked import MaskedModel, target_nnz
from cli_process import run_cli


def cigl(model, options, sparsity=0.5, total_steps=100, steps_per_epoch=10, **engine_flags):
    engine = MaskedModel(model, **engine_flags)
    cls = METHODS.get("cigl")
    densities = {n: 1.0 - sparsity for n in engine.names}
    method = cls(cls.Options(**options), engine, SparsityTarget(sparsity, "uniform", densities), total_steps,
                 steps_per_epoch, torch.Generator().manual_seed(0))
    return method, engine


def context(optimizer, total_steps, steps_per_epoch=10, batches=None):
    return StepContext(0, total_steps, steps_per_epoch, optimizer, lambda: None, lambda n: None, lambda m: None,
                       train_batches=batches)


def test_random_mask_keeps_active_weights_at_rate_and_scale_then_restores_them():
    torch.manual_seed(0)
    layer = nn.Linear(200, 200, bias=False)
    method, engine = cigl(layer, {"dpnum": 10, "swa_start": None})
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    ctx = context(optimizer, 100)
    method.start(ctx)
    raw = layer.weight.detach().clone()
    mask = engine.tensors["weight"].mask.clone()
    method.before_step(ctx)
    held = layer.weight.detach()
    kept = mask & (held != 0)
    # 20 000 active weights, each kept with probability 0.9: 0.9 within 5 binomial std (0.0021)
    assert method.keep_rate() == pytest.approx(0.9, abs=0.011)
    assert int(kept.sum()) == pytest.approx(0.9 * int(mask.sum()), abs=220)
    assert torch.allclose(held[kept], raw[kept] * 10 / 9)  # kept ones scaled by p/(p-1)
    assert torch.all(held[~mask] == 0)
    layer(torch.randn(3, 200)).sum().backward()
    method.after_backward(ctx)
    assert torch.equal(layer.weight.detach(), raw)  # W is back before the optimizer steps it


@pytest.mark.parametrize("on_dense", [True, False])
def test_random_mask_covers_the_dense_kept_layers_unless_turned_off(on_dense):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 50))
    method, engine = cigl(model, {"dpnum": 2, "swa_start": None, "random_mask_dense_layers": on_dense},
                          dense_first=True, dense_last=True)
    assert engine.dense_names == ["0.weight", "4.weight"]
    ctx = context(torch.optim.SGD(model.parameters(), lr=0.1), 100)
    method.start(ctx)
    before = model[0].weight.detach().clone()
    method.before_step(ctx)
    dropped = int((model[0].weight == 0).sum()) - int((before == 0).sum())
    if on_dense:  # p = 2: about half of the 2 500 weights of the dense first layer dropped this step
        assert 1000 < dropped < 1500
    else:
        assert dropped == 0 and torch.equal(model[0].weight, before)
    assert 0.4 < method.keep_rate() < 0.6


def test_step_is_w_minus_lr_z_times_gradient_at_z_w():
    torch.manual_seed(1)
    layer = nn.Linear(4, 3, bias=False)
    method, engine = cigl(layer, {"dpnum": 2, "swa_start": None}, sparsity=0.25)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    ctx = context(optimizer, 100)
    method.start(ctx)
    w = layer.weight.detach().clone()
    m = engine.tensors["weight"].mask.clone()
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0]])
    method.before_step(ctx)
    z = layer.weight.detach() / torch.where(w == 0, torch.ones_like(w), w)  # 0 or 2 (p=2: kept x 2)
    assert set(z[m].unique().tolist()) <= {0.0, 2.0}
    out = layer(x)
    loss = (out ** 2).sum()
    loss.backward()
    finish_step(method, engine, ctx, optimizer.step)
    # By hand: y = (Z W) x, dL/d(ZW) = 2 y x^T summed over the batch; dL/dW = Z * that; masked.
    y = x @ (z * w).T
    grad_zw = 2 * y.T @ x
    expected = (w - 0.1 * z * grad_zw) * m
    assert torch.allclose(layer.weight.detach(), expected, atol=1e-6)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def train_steps(method, engine, model, optimizer, ctx, total_steps, batches, on_epoch_end=None):
    method.start(ctx)
    for step in range(total_steps):
        ctx.step = step
        x, y = batches[step % len(batches)]
        method.before_step(ctx)
        for group in optimizer.param_groups:
            group["lr"] = method.learning_rate(step, 0.05)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        finish_step(method, engine, ctx, optimizer.step)
        if on_epoch_end and (step + 1) % ctx.steps_per_epoch == 0:
            on_epoch_end(step)


def test_averaged_model_is_the_masked_mean_of_epoch_end_snapshots_with_exact_counts():
    torch.manual_seed(2)
    model = SmallNet()
    # Masks keep changing while averaging (end 0.95 > swa_start 0.5): the mean of differently
    # masked snapshots is denser than any mask; the installed model must keep the final mask's counts.
    method, engine = cigl(model, {"delta_t": 3, "end": 0.95, "swa_start": 0.5, "dpnum": 5}, sparsity=0.75,
                          total_steps=40, steps_per_epoch=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(5)]
    ctx = context(optimizer, 40, steps_per_epoch=5, batches=lambda epoch: iter(batches))
    snapshots = []

    def snapshot(step):  # epochs 4..7 (1-based) end here; epoch 8's end is caught before the install
        if (step + 1) // 5 >= 4 and step + 1 < 40:
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    install = method._install_mean

    def last_snapshot_then_install(ctx):
        masks = {t.param: t.mask for t in engine.tensors.values()}
        snapshots.append({n: (p * masks[p] if p in masks else p).detach().clone() for n, p in model.named_parameters()})
        install(ctx)

    method._install_mean = last_snapshot_then_install
    train_steps(method, engine, model, optimizer, ctx, 40, batches, snapshot)
    assert method.swa_first_epoch == 4 and method.swa_count == 5 and len(snapshots) == 5
    changed = [n for n in engine.names if not torch.equal(snapshots[0][n] != 0, snapshots[-1][n] != 0)]
    assert changed, "the masks should have changed while averaging in this test"
    final_masks = engine.masks()
    for name, param in model.named_parameters():
        mean = sum(s[name] for s in snapshots) / 5
        expected = mean * final_masks[name] if name in final_masks else mean
        assert torch.allclose(param.detach(), expected, atol=1e-6), name
    for name, t in engine.tensors.items():
        nonzero = int(t.param.count_nonzero())
        assert nonzero == int(t.mask.sum()) == target_nnz(t.numel, 0.25), name
    # BatchNorm statistics: one cumulative pass over the epoch's batches with the averaged weights
    fc1 = nn.Linear(6, 16)
    fc1.load_state_dict(model.fc1.state_dict())
    with torch.no_grad():
        expected_mean = torch.stack([fc1(x).mean(0) for x, _ in batches]).mean(0)
    assert torch.allclose(model.bn.running_mean, expected_mean, atol=1e-5)


def test_batchnorm_statistics_are_the_plain_average_over_one_pass():
    torch.manual_seed(3)
    bn = nn.BatchNorm1d(4, momentum=0.3)
    bn.running_mean.fill_(7.0)
    batches = [(torch.randn(10, 4) + i, None) for i in range(3)]
    recompute_batchnorm(bn, batches)
    expected = torch.stack([x.mean(0) for x, _ in batches]).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-6)
    assert bn.momentum == 0.3 and bn.training


def test_swa_lr_is_constant_from_the_first_averaged_epoch():
    method, _ = cigl(nn.Linear(4, 4), {"swa_start": 0.8, "swa_lr": 0.01}, total_steps=100, steps_per_epoch=10)
    assert method.swa_first_epoch == 8
    assert method.learning_rate(69, 0.5) == 0.5  # epoch 7
    assert method.learning_rate(70, 0.5) == 0.01  # epoch 8: averaged at its end
    plain, _ = cigl(nn.Linear(4, 4), {"swa_start": 0.8}, total_steps=100, steps_per_epoch=10)
    assert plain.learning_rate(90, 0.5) == 0.5


def test_cigl_runs_from_the_cli_with_its_averaged_model(tmp_path):
    proc = run_cli("train", "method=cigl", "method.delta_t=5", "method.swa_start=0.5", "epochs=4",
                   "dataset.num_samples=600", "progress=none", f"results_root={tmp_path}")
    assert proc.returncode == 0 and "done: test_acc" in proc.stdout, proc.stderr
    assert "mean of 3 epoch-end snapshots" in proc.stdout
    import json
    (final,) = tmp_path.rglob("final.json")
    summary = json.loads(final.read_text())
    assert summary["cigl"] == {"dpnum": 100, "averaged_snapshots": 3, "first_averaged_epoch": 2}
    assert summary["actual_sparsity"] == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize("args, message", [
    (["method.dpnum=1"], "method.dpnum=1: expected an integer >= 2"),
    (["method.swa_start=1.5"], "method.swa_start=1.5: expected a fraction"),
    (["method.swa_lr=-0.1"], "method.swa_lr=-0.1: expected a positive learning rate"),
    (["powerprop=2"], "method=cigl with powerprop"),
    (["backend=sparse"], "backend=sparse with method=cigl"),
    (["optimizer=mars", "optimizer.variant=exact"], "optimizer.variant=exact with method=cigl"),
])
def test_bad_options_are_refused_in_one_line_before_anything_is_written(tmp_path, args, message):
    proc = run_cli("train", "method=cigl", *args, f"results_root={tmp_path / 'r'}")
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "r").exists()
