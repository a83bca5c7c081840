"""Powerpropagation: the re-parameterisation, its initialisation, and its composition with methods."""
import json
import math

import pytest
import torch
from torch import nn

from sparsebench import cli
from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
from sparsebench.methods.dst import DropSchedule
from sparsebench.methods.set import SETProtocol, SETRegrowInit
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.powerprop import PowerPropagation, apply_powerprop, export_state_dict

# Methods that mask weights (node-mask methods are tested in tests/test_search.py, SVD training's
# ranks in tests/test_svd.py).
# Methods that refuse Powerpropagation (`powerprop_conflict`: CigL) are tested for the refusal.
WEIGHT_MASK_METHODS = [name for name in METHODS.names() if METHODS.get(name).masks_weights
                       and not METHODS.get(name).removes_units and not METHODS.get(name).powerprop_conflict]


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


# ------------------------------------------------------------------------------ composition with every method
# (issue #9 section 3: masking v made 1 < alpha < 2 diverge and left every weight regrown at v = 0 dead)

REGROWING = {"rigl", "set", "acdc", "gap", "dpf"}  # methods that turn masked entries back on
FAST_OPTIONS = {  # what makes each method change masks within 60 steps of 10 per epoch
    "rigl": {"delta_t": 4},
    "set": {"protocol": SETProtocol.rigl, "delta_t": 4},
    "gap": {"kappa": 2},
    "gmp": {"frequency": 5},
    "dpf": {"frequency": 4},
}


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0])
def test_forward_is_finite_and_its_gradient_is_analytic_at_zero(alpha):
    v = torch.tensor([0.0, 0.5, -0.5, 2.0], requires_grad=True)
    w = PowerPropagation(alpha)(v)
    assert torch.allclose(w.detach(), torch.sign(v.detach()) * v.detach().abs() ** alpha)
    w.sum().backward()
    # alpha |v|^(alpha-1): 0 at v = 0 (the product-rule form v|v|^(alpha-1) gave NaN for alpha < 2).
    expected = alpha * v.detach().abs() ** (alpha - 1)
    assert torch.isfinite(v.grad).all() and torch.allclose(v.grad, expected)
    assert v.grad[0] == 0


def test_weight_grad_is_recorded_only_while_captured():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.25, -1.0, 4.0]]))
    apply_powerprop(model, ["0.weight"], alpha=2.0)
    engine = MaskedModel(model)
    engine.set_mask("0.weight", torch.tensor([[True, True, False]]), 2 / 3)  # v = 0 at position 2
    x = torch.tensor([[1.0, 2.0, 3.0]])
    model(x).sum().backward()
    assert engine.weight_grad("0.weight") is None  # nothing recorded unless asked
    engine.capture_weight_grads(True)
    model.zero_grad()
    model(x).sum().backward()
    # dL/dw = x everywhere, the masked entry included; dL/dv there is 0.
    assert torch.equal(engine.weight_grad("0.weight"), x)
    assert model[0].parametrizations.weight.original.grad[0, 2] == 0
    engine.capture_weight_grads(False)
    assert engine.weight_grad("0.weight") is None


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_engine_regrows_powerprop_entries_at_fresh_initial_values_not_at_zero(alpha):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300))
    initial_std = model[0].weight.detach().std().item()
    apply_powerprop(model, ["0.weight"], alpha=alpha)
    engine = MaskedModel(model)
    t = engine.tensors["0.weight"]
    engine.set_masks(engine.magnitude_masks({"0.weight": 0.1}), {"0.weight": 0.1})
    pruned = ~t.mask.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine.grow_dense(["0.weight"], optimizer)  # regrow_init="zero", as GaP and AC/DC ask
    v = t.param.detach()
    assert torch.all(v[pruned] != 0)
    # The regrown effective weights follow the initial distribution (truncated normal, same variance).
    w = model[0].weight.detach()[pruned]
    assert w.std().item() == pytest.approx(initial_std, rel=0.05)
    assert w.abs().max().item() <= 2 * initial_std / 0.87962566 + 1e-6
    # A callable's non-zero values are kept; its zeros are drawn afresh too.
    engine.set_masks(engine.magnitude_masks({"0.weight": 0.5}), {"0.weight": 0.5})
    grown_values = torch.full_like(t.param, 0.3)
    grown_values.view(-1)[::2] = 0.0
    old = t.mask.clone()
    engine.set_mask("0.weight", torch.ones_like(old), 1.0, regrow_init=lambda *_: grown_values)
    grown = ~old
    chosen = grown_values != 0
    assert torch.all(t.param[grown & chosen] == 0.3)
    assert torch.all(t.param[grown & ~chosen] != 0)


class PowerpropHarness:
    """The trainer's step order with Powerprop on every prunable weight, as train.build_run wires it."""

    def __init__(self, method, alpha, options=None, total_steps=60, seed=0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24),
                                   nn.ReLU(), nn.Linear(24, 3))
        names = MaskedModel(self.model, dense_first=True, dense_last=True).names
        apply_powerprop(self.model, names, alpha)
        self.engine = MaskedModel(self.model, dense_first=True, dense_last=True)
        cls = METHODS.get(method)
        sparsity = 0.8 if cls.uses_sparsity else 0.0
        target = SparsityTarget(sparsity, "uniform", {n: 1 - sparsity for n in self.engine.names})
        opts = cls.Options(**{**FAST_OPTIONS.get(method, {}), **(options or {})})
        self.method = cls(opts, self.engine, target, total_steps, 10, torch.Generator().manual_seed(1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.ctx = StepContext(0, total_steps, 10, self.optimizer, lambda: self.optimizer.state.clear(),
                               lambda n: None, lambda m: None)
        gen = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(64, 5, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        self.total_steps = total_steps

    def run(self):
        """Returns (growth events, steps at which pruned DPF shadows moved). A growth event is
        (name, grown entries, their v right after the step that grew them, v two steps later)."""
        self.method.start(self.ctx)
        events, pending, shadow_moves = [], [], []
        for step in range(self.total_steps):
            self.ctx.step = step
            masks = self.engine.masks()
            shadows = {n: d.clone() for n, d in getattr(self.method, "dense", {}).items()}
            self.method.before_step(self.ctx)
            self.optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
            assert torch.isfinite(loss), step
            loss.backward()
            finish_step(self.method, self.engine, self.ctx, self.optimizer.step)
            for name, t in self.engine.tensors.items():
                assert torch.isfinite(t.param).all(), (step, name)
                grown = t.mask & ~masks[name]
                if grown.any():
                    pending.append((step + 2, name, grown, t.param.detach()[grown].clone()))
                if name in shadows and self.method.feeds_back(step):
                    pruned = ~t.mask & ~masks[name]  # pruned throughout the step
                    if bool((self.method.dense[name][pruned] != shadows[name][pruned]).any()):
                        shadow_moves.append(step)
            for _, name, grown, then in [p for p in pending if p[0] == step]:
                t = self.engine.tensors[name]  # two steps after the growth: did the grown v move?
                events.append((name, t.mask[grown], then, t.param.detach()[grown].clone()))
            pending = [p for p in pending if p[0] > step]
        return events, shadow_moves


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("method", WEIGHT_MASK_METHODS)
def test_every_method_trains_its_regrown_weights_under_powerprop(method, alpha):
    h = PowerpropHarness(method, alpha)
    events, shadow_moves = h.run()
    if method not in REGROWING:
        return  # static, magnitude, gmp and dense never regrow: finite losses and weights suffice
    assert events, f"{method} regrew nothing in {h.total_steps} steps"
    nonzero = moved = active = 0
    for _name, still, then, now in events:
        nonzero += int((then != 0).sum())
        active += int(still.sum())
        moved += int(((now != then) & still).sum())
    total = sum(int(e[1].numel()) for e in events)
    assert nonzero == total  # no entry starts at v = 0, which is absorbing for alpha > 1
    assert active and moved >= 0.9 * active  # and the regrown entries train
    if method == "dpf":  # pruned weights keep training in the dense copy (exactly: next test)
        assert shadow_moves


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_dpf_feeds_pruned_weights_back_through_their_dense_value(alpha):
    # One SGD step (no momentum, no weight decay) at the pruned model: the dense copy of a pruned
    # v moves by -lr * alpha |v_dense|^(alpha-1) dL/dw, dL/dw taken at the pruned model.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    apply_powerprop(model, ["0.weight"], alpha)
    engine = MaskedModel(model)
    cls = METHODS.get("dpf")
    dpf = cls(cls.Options(begin=0.0, end=0.1, frequency=1), engine, SparsityTarget(0.5, "uniform", {"0.weight": 0.5}),
              20, 20, torch.Generator())
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    ctx = StepContext(0, 20, 20, optimizer, lambda: None, lambda n: None, lambda m: None)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    dpf.start(ctx)
    for step in (0, 1):  # step 0: sparsity 0; step 1: pruned (cubic schedule, 5 of 12 entries)
        ctx.step = step
        dpf.before_step(ctx)
        t = engine.tensors["0.weight"]
        v_dense, mask = dpf.dense["0.weight"].clone(), t.mask.clone()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        finish_step(dpf, engine, ctx, optimizer.step)
    assert int((~mask).sum()) == 5
    w = (torch.sign(v_dense) * v_dense.abs() ** alpha * mask).requires_grad_()
    nn.functional.cross_entropy(x @ w.T, y).backward()
    expected = v_dense - lr * alpha * v_dense.abs() ** (alpha - 1) * w.grad
    assert torch.allclose(dpf.dense["0.weight"], expected, atol=1e-6)
    assert bool((dpf.dense["0.weight"][~mask] != v_dense[~mask]).all())


@pytest.mark.parametrize("regrow_init", [SETRegrowInit.keep, SETRegrowInit.normal])
def test_set_regrow_inits_under_powerprop(regrow_init):
    h = PowerpropHarness("set", 2.0, {"protocol": SETProtocol.original, "regrow_init": regrow_init})
    events, _ = h.run()
    assert events
    for _name, still, then, now in events:
        assert torch.all(then != 0)


def test_set_normal_regrow_init_draws_effective_weights_under_powerprop():
    torch.manual_seed(0)
    h = PowerpropHarness("set", 2.0, {"regrow_init": SETRegrowInit.normal, "init_std": 0.1})
    name = h.engine.names[0]
    init = h.method.regrow_init(name)
    v = init(torch.Size([200, 200]), torch.device("cpu"), torch.float32)
    w = torch.sign(v) * v.abs() ** 2
    assert w.std().item() == pytest.approx(0.1, rel=0.05)  # N(0, 0.1^2) in w, stored as v


def test_rigl_grows_by_the_effective_weight_gradient_under_powerprop():
    # Inactive entries have v = 0, so dL/dv = 0 there: the grow score must be |dL/dw|.
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.1, 0.0, 0.0]]))
    apply_powerprop(model, ["0.weight"], alpha=2.0)
    engine = MaskedModel(model)
    engine.set_mask("0.weight", torch.tensor([[True, True, False, False]]), 0.5)
    cls = METHODS.get("rigl")
    options = cls.Options(alpha=0.5, drop_schedule=DropSchedule.constant, delta_t=1, end=1.0)
    rigl = cls(options, engine, SparsityTarget(0.5, "uniform", {"0.weight": 0.5}), 10, 10, torch.Generator())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = StepContext(1, 10, 10, optimizer, lambda: None, lambda n: None, lambda m: None)
    x = torch.tensor([[1.0, 1.0, 1.0, -5.0]])  # dL/dw = x: position 3 has the largest |dL/dw|
    rigl.before_step(ctx)
    optimizer.zero_grad()
    model(x).sum().backward()
    finish_step(rigl, engine, ctx, optimizer.step)
    # k = floor(0.5 * 2) = 1: -0.1 (position 1) is dropped; position 3 grows (|-5| > |1|).
    assert engine.tensors["0.weight"].mask.tolist() == [[True, False, False, True]]
    assert engine.tensors["0.weight"].param[0, 3] != 0  # and can train: not at v = 0


@pytest.mark.slow
@pytest.mark.parametrize("method", WEIGHT_MASK_METHODS)
def test_every_method_completes_a_real_run_under_powerprop(tmp_path, method):
    # alpha = 1.5 made `static` diverge at step 1 and `gmp` at step 11 through the trainer; the
    # harness above covers alpha = 2 and 3 and the regrowth, in the trainer's step order.
    alpha = "1.5"
    fast = {"rigl": ["method.delta_t=2"], "set": ["method.protocol=rigl", "method.delta_t=2"],
            "gmp": ["method.frequency=2"], "dpf": ["method.frequency=2"]}.get(method, [])
    args = ["train", f"method={method}", f"powerprop={alpha}", "sparsity=0.8", "epochs=3",
            "dataset.num_samples=500", "progress=none", f"results_root={tmp_path}", *fast]
    assert cli.main(args) == 0
    (run,) = [p.parent for p in tmp_path.rglob("final.json")]
    final = json.loads((run / "final.json").read_text())
    assert final["status"] == "completed" and math.isfinite(final["test_loss"])
    state = torch.load(run / "model.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.slow
def test_powerprop_regrowth_resumes_to_identical_result(tmp_path, interrupted_then_resumed):
    # Regrown v are drawn from torch's global generator, which checkpoints save and restore.

    args = ["train", "method=acdc", "powerprop=2", "epochs=4", "dataset.num_samples=600", "progress=none"]
    assert cli.main([*args, f"results_root={tmp_path / 'whole'}"]) == 0
    killed = interrupted_then_resumed(args, tmp_path / "killed", 3)
    (whole,) = [p.parent for p in (tmp_path / "whole").rglob("final.json")]
    sa, sb = torch.load(whole / "model.pt"), torch.load(killed / "model.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
