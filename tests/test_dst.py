"""Dynamic sparse training (`rigl`, `set`) on tiny hand-computed masks and with the real engine."""
import copy
import math

import pytest
import torch
from torch import nn

from sparsebench.errors import UserError
from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
from sparsebench.methods.dst import DropSchedule, Timing
from sparsebench.methods.rigl import GrowScore
from sparsebench.methods.set import SETProtocol, SETRegrowInit
from sparsebench.schedules import cosine_drop_fraction
from sparsebench.sparse.masked import MaskedModel, target_nnz


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def make(method, engine, options, total_steps=10, steps_per_epoch=10, seed=1):
    cls = METHODS.get(method)
    densities = {n: t.density for n, t in engine.tensors.items()}
    target = SparsityTarget(1 - next(iter(densities.values())), "uniform", densities)
    return cls(cls.Options(**options), engine, target, total_steps, steps_per_epoch, torch.Generator().manual_seed(seed))


def ctx_at(step, optimizer=None, total_steps=10):
    return StepContext(step, total_steps, 10, optimizer, lambda: None, lambda n: None, lambda m: None)


def hand_layer(weights, mask, density):
    """One bias-free linear layer with the given weights and mask installed through the engine."""
    layer = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    engine = MaskedModel(layer)
    engine.set_mask("weight", mask, density)
    with torch.no_grad():
        layer.weight.copy_(weights * mask)
    return layer, engine


class Loop:
    """The trainer's step order (as tests/test_methods.py's Harness), one step at a time."""

    def __init__(self, method, sparsity, options=None, total_steps=40, steps_per_epoch=10, optimizer="sgd", seed=1):
        torch.manual_seed(0)
        self.model = mlp()
        self.engine = MaskedModel(self.model, dense_first=True, dense_last=True)
        densities = {n: 1.0 - sparsity for n in self.engine.names}
        cls = METHODS.get(method)
        self.method = cls(cls.Options(**(options or {})), self.engine, SparsityTarget(sparsity, "uniform", densities),
                          total_steps, steps_per_epoch, torch.Generator().manual_seed(seed))
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        self.ctx = StepContext(0, total_steps, steps_per_epoch, self.optimizer, lambda: None, lambda n: None,
                               lambda m: None)
        self.x, self.y = torch.randn(64, 5), torch.randint(0, 3, (64,))
        self.total_steps = total_steps

    def start(self):
        self.method.start(self.ctx)
        return self

    def step(self, step, after_before_step=None, after_step=None):
        self.ctx.step = step
        self.method.before_step(self.ctx)
        if after_before_step:
            after_before_step(step)
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        finish_step(self.method, self.engine, self.ctx, self.optimizer.step)
        if after_step:
            after_step(step)

    def run(self, steps=None, **hooks):
        self.start()
        for step in range(steps or self.total_steps):
            self.step(step, **hooks)
        return self


def assert_exact(engine):
    for name, t in engine.tensors.items():
        assert int(t.mask.sum()) == target_nnz(t.numel, t.density), name
        assert torch.all(t.param[~t.mask] == 0), name


# ------------------------------------------------------------------------------ schedules
def test_cosine_drop_fraction_formula():
    for step in (0, 10, 250, 500, 999, 1000):
        assert cosine_drop_fraction(step, 0.3, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi * step / 1000)))
    assert cosine_drop_fraction(0, 0.3, 1000) == pytest.approx(0.3)
    assert cosine_drop_fraction(500, 0.3, 1000) == pytest.approx(0.15)
    assert cosine_drop_fraction(1000, 0.3, 1000) == pytest.approx(0.0, abs=1e-12)
    assert cosine_drop_fraction(1001, 0.3, 1000) == 0.0 and cosine_drop_fraction(5000, 0.3, 1000) == 0.0


def test_method_schedule_and_update_steps():
    layer, engine = hand_layer(torch.ones(4, 5), torch.ones(4, 5, dtype=torch.bool), 1.0)
    rigl = make("rigl", engine, {"delta_t": 100, "end": 0.75, "alpha": 0.3}, total_steps=1000)
    assert rigl.mask_update_steps() == [100, 200, 300, 400, 500, 600, 700]  # t < T_end = 750
    for step in (0, 100, 300, 700, 749):
        assert rigl.schedule_value(step) == ("drop_fraction", pytest.approx(0.15 * (1 + math.cos(math.pi * step / 750))))
    assert rigl.schedule_value(750) == ("drop_fraction", 0.0) and rigl.schedule_value(900) == ("drop_fraction", 0.0)
    const = make("rigl", engine, {"drop_schedule": DropSchedule.constant, "alpha": 0.2}, total_steps=1000)
    assert const.schedule_value(10) == ("drop_fraction", 0.2) and const.schedule_value(750) == ("drop_fraction", 0.0)
    assert [rigl.dense_weight_grad(s) for s in (99, 100, 101, 750)] == [False, True, False, False]
    assert rigl.densities_at(500) == {"weight": 1.0}

    original = make("set", engine, {}, total_steps=60, steps_per_epoch=10)
    assert original.mask_update_steps() == [10, 20, 30, 40, 50]  # after every epoch but the last
    assert original.schedule_value(50) == ("drop_fraction", 0.3) and original.schedule_value(55) == ("drop_fraction", 0.0)
    assert not any(original.dense_weight_grad(s) for s in range(60))
    set_rigl = make("set", engine, {"protocol": SETProtocol.rigl, "delta_t": 5}, total_steps=60)
    assert set_rigl.mask_update_steps() == list(range(5, 45, 5))
    assert set_rigl.schedule_value(20)[1] == pytest.approx(cosine_drop_fraction(20, 0.3, 45))


def test_rigl_reference_timing_updates_from_step_0_through_t_end():
    layer, engine = hand_layer(torch.ones(4, 5), torch.ones(4, 5, dtype=torch.bool), 1.0)
    ref = make("rigl", engine, {"delta_t": 100, "end": 0.75, "timing": Timing.reference}, total_steps=1000)
    assert ref.mask_update_steps() == [0, 100, 200, 300, 400, 500, 600, 700]  # 0 <= t <= T_end = 750
    assert ref.schedule_value(0) == ("drop_fraction", pytest.approx(0.3))  # the random mask is updated at once
    assert [ref.skips_optimizer_step(s) for s in (0, 1, 100, 150, 700, 750)] == [True, False, True, False, True, False]
    assert [ref.dense_weight_grad(s) for s in (0, 1, 100)] == [True, False, True]
    on_t_end = make("rigl", engine, {"delta_t": 250, "end": 0.75, "timing": Timing.reference}, total_steps=1000)
    assert on_t_end.mask_update_steps() == [0, 250, 500, 750]  # a round at T_end, as the reference's <=
    assert on_t_end.schedule_value(750) == ("drop_fraction", pytest.approx(0.0, abs=1e-12))  # cosine: drops nothing
    const = make("rigl", engine, {"delta_t": 250, "end": 0.75, "timing": Timing.reference,
                                  "drop_schedule": DropSchedule.constant}, total_steps=1000)
    assert const.schedule_value(750) == ("drop_fraction", 0.3) and const.schedule_value(751) == ("drop_fraction", 0.0)
    default = make("rigl", engine, {"delta_t": 100}, total_steps=1000)
    assert default.timing is Timing.sparsebench and not any(default.skips_optimizer_step(s) for s in range(1000))


@pytest.mark.parametrize("timing", [Timing.sparsebench, Timing.reference])
def test_rigl_reference_timing_replaces_the_optimizer_step_of_update_steps(timing):
    loop = Loop("rigl", 0.8, {"delta_t": 5, "timing": timing}, total_steps=20)
    updates = loop.method.mask_update_steps()
    assert updates == ([0, 5, 10, 15] if timing is Timing.reference else [5, 10])  # T_end = 15
    before, changed = {}, {}

    def snapshot(step):
        before[step] = ({n: t.param.detach().clone() for n, t in loop.engine.tensors.items()},
                        {n: t.mask.clone() for n, t in loop.engine.tensors.items()},
                        {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                         for p, s in loop.optimizer.state.items()})

    def compare(step):
        params, masks, state = before[step]
        # Weights kept through the round (active before and after, not regrown) and their momentum.
        kept_moved = any(bool((t.param.detach()[masks[n] & t.mask] != params[n][masks[n] & t.mask]).any())
                         for n, t in loop.engine.tensors.items())
        # Optimizer state of the parameters the mask update does not touch (biases, dense layers).
        untouched = [p for p in loop.model.parameters() if not any(p is t.param for t in loop.engine.tensors.values())]
        state_moved = any(
            set(loop.optimizer.state.get(p, {})) != set(state.get(id(p), {}))
            or any(torch.is_tensor(v) and not torch.equal(v, state[id(p)][k]) for k, v in loop.optimizer.state[p].items())
            for p in untouched
        )
        changed[step] = (kept_moved, state_moved)

    loop.run(after_before_step=snapshot, after_step=compare)
    for step in range(20):
        skipped = timing is Timing.reference and step in updates
        # A skipped step moves no weight and no optimizer state (biases, dense layers included).
        assert changed[step] == (not skipped, not skipped), step


def test_set_reset_optimizer_each_epoch_clears_the_state_at_every_epoch_boundary():
    resets = []
    loop = Loop("set", 0.8, {"reset_optimizer_each_epoch": True}, total_steps=40, steps_per_epoch=10)
    loop.ctx.reset_optimizer = lambda: (resets.append(loop.ctx.step), loop.optimizer.state.clear())
    loop.run()
    assert resets == [10, 20, 30]  # the first step of every epoch but the first, as a fresh Keras optimizer
    plain = Loop("set", 0.8, {}, total_steps=40, steps_per_epoch=10)
    plain.ctx.reset_optimizer = lambda: resets.append(("plain", plain.ctx.step))
    plain.run()
    assert resets == [10, 20, 30]


@pytest.mark.parametrize("method,options,message", [
    ("rigl", {"alpha": 0.0}, "method.alpha=0.0"),
    ("rigl", {"alpha": 1.5}, "method.alpha=1.5"),
    ("rigl", {"delta_t": 0}, "method.delta_t=0"),
    ("rigl", {"end": 0.0}, "method.end=0.0"),
    ("set", {"end": 1.2}, "method.end=1.2"),
    ("set", {"zeta": 0.0}, "method.zeta=0.0"),
    ("set", {"zeta": 1.0}, "method.zeta=1.0"),
    ("set", {"init_std": 0.0}, "method.init_std=0.0"),
    ("rigl", {"explore_c": -1.0}, "method.explore_c=-1.0"),
])
def test_validate_rejects_bad_options(method, options, message):
    layer, engine = hand_layer(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), 1.0)
    with pytest.raises(UserError, match=message.replace(".", r"\.")) as info:
        make(method, engine, options)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ RigL by hand
def rigl_hand_case(grad_values):
    #        positions:   0     1    2    3     4     5    6    7
    weights = torch.tensor([[0.5, -0.1, 0.0, 0.0], [0.3, -0.8, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    layer, engine = hand_layer(weights, mask, 0.5)
    rigl = make("rigl", engine, {"alpha": 0.5, "drop_schedule": DropSchedule.constant, "delta_t": 1, "end": 1.0})
    layer.weight.grad = torch.tensor(grad_values).view(2, 4)
    ctx = ctx_at(1)
    rigl.after_backward(ctx)
    rigl.after_step(ctx)  # the update runs after the optimizer step of the update step
    return layer, engine


def test_rigl_drops_smallest_magnitude_and_grows_largest_gradient():
    # k = floor(0.5 * 4) = 2: drop |-0.1| and |0.3| (positions 1, 4), keep 0.5 and -0.8 (0, 5).
    # Grow among the rest by |grad|: position 0 has the largest gradient but is kept (excluded);
    # |-0.7| at 3 and |0.6| at 7 beat 0.3 (6), 0.2 (1), 0.1 (4) and 0.05 (2).
    layer, engine = rigl_hand_case([9.0, 0.2, 0.05, -0.7, 0.1, 0.0, 0.3, 0.6])
    assert engine.tensors["weight"].mask.view(-1).tolist() == [True, False, False, True, False, True, False, True]
    assert layer.weight.view(-1).tolist() == pytest.approx([0.5, 0, 0, 0, 0, -0.8, 0, 0])  # grown start at 0


def test_rigl_regrown_just_dropped_weight_keeps_its_value():
    # Same drop; now the just-dropped position 1 has the second largest |grad|: it comes back as -0.1.
    layer, engine = rigl_hand_case([9.0, 0.65, 0.05, -0.7, 0.1, 0.0, 0.3, 0.6])
    assert engine.tensors["weight"].mask.view(-1).tolist() == [True, True, False, True, False, True, False, False]
    assert layer.weight.view(-1).tolist() == pytest.approx([0.5, -0.1, 0, 0, 0, -0.8, 0, 0])


def test_rigl_drops_exactly_the_smallest_magnitudes_on_a_bigger_layer():
    gen = torch.Generator().manual_seed(3)
    magnitudes = (torch.randperm(200, generator=gen).float() + 1) * 0.01  # distinct, 0.01 apart
    signs = torch.where(torch.rand(200, generator=gen) < 0.5, -1.0, 1.0)
    weights = (magnitudes * signs).view(10, 20)
    mask = torch.zeros(200, dtype=torch.bool)
    mask[torch.randperm(200, generator=gen)[:100]] = True
    mask = mask.view(10, 20)
    layer, engine = hand_layer(weights, mask, 0.5)
    rigl = make("rigl", engine, {"alpha": 0.3, "drop_schedule": DropSchedule.constant, "delta_t": 1, "end": 1.0})
    layer.weight.grad = torch.where(mask, 0.0, 1.0 + torch.rand(10, 20, generator=gen))  # grow only at inactive
    rigl.after_backward(ctx_at(1))
    rigl.after_step(ctx_at(1))
    active = weights.abs()[mask]
    threshold = active.sort().values[30 - 1]  # k = floor(0.3 * 100) = 30 dropped
    expected_kept = mask & (weights.abs() > threshold)
    new = engine.tensors["weight"].mask
    assert torch.equal(new & mask, expected_kept)
    assert int(new.sum()) == 100 and int((new & ~mask).sum()) == 30


def test_rigl_reads_the_dense_gradient_only_on_update_steps():
    loop = Loop("rigl", 0.9, {"delta_t": 7}, total_steps=40)
    calls = []
    original = loop.method.read_dense_gradients

    def spy():
        calls.append(loop.ctx.step)
        return original()

    loop.method.read_dense_gradients = spy
    loop.run()
    assert calls == loop.method.mask_update_steps() == [7, 14, 21, 28]  # T_end = 30
    assert [s for s in range(40) if loop.method.dense_weight_grad(s)] == calls


def test_set_never_reads_gradients():
    loop = Loop("set", 0.8, {"protocol": SETProtocol.rigl, "delta_t": 5})
    loop.method.read_dense_gradients = lambda: pytest.fail("SET read the dense gradient")
    loop.run()


# ------------------------------------------------------------------------------ SET by hand
def set_hand_case(protocol, zeta=0.5, alpha=0.5, seed=1):
    #                      0    1     2    3    4      5     6    7    8    9
    weights = torch.tensor([0.9, 0.2, 0.0, 0.5, -0.3, -0.05, 0.0, -0.7, 0.0, 0.0]).view(2, 5)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 0, 0], dtype=torch.bool).view(2, 5)
    layer, engine = hand_layer(weights, mask, 0.6)
    options = {"protocol": protocol, "zeta": zeta, "alpha": alpha, "drop_schedule": DropSchedule.constant,
               "delta_t": 1, "end": 1.0}
    method = make("set", engine, options, total_steps=20, steps_per_epoch=1, seed=seed)
    return layer, engine, method, weights, mask


def test_set_original_drops_smallest_positive_and_largest_negative():
    layer, engine, method, weights, mask = set_hand_case(SETProtocol.original)
    # 3 positive (0.9, 0.2, 0.5) and 3 negative (-0.3, -0.05, -0.7): floor(0.5 * 3) = 1 of each.
    drop = method.select_drop("weight", engine.tensors["weight"], 1)
    assert drop.view(-1).nonzero().view(-1).tolist() == [1, 5]  # 0.2 and -0.05
    # RigL protocol: the 3 smallest |W| over all active: 0.2, -0.3, -0.05 (floor(0.5 * 6) = 3).
    layer, engine, method, weights, mask = set_hand_case(SETProtocol.rigl)
    drop = method.select_drop("weight", engine.tensors["weight"], 1)
    assert drop.view(-1).nonzero().view(-1).tolist() == [1, 4, 5]


def test_set_original_lopsided_signs_keep_the_count_exact():
    weights = torch.tensor([0.4, 0.1, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0]).view(2, 4)
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool).view(2, 4)
    layer, engine = hand_layer(weights, mask, 0.5)
    method = make("set", engine, {"zeta": 0.5}, total_steps=20, steps_per_epoch=1)
    changes = method.update_masks(1, None)
    new = engine.tensors["weight"].mask
    assert int(new.sum()) == 4 and bool(new.view(-1)[0]) and bool(new.view(-1)[2])  # 0.1 and 0.2 went
    dropped, grown = changes["weight"]
    assert dropped == grown


def test_set_grows_uniformly_at_random_among_positions_not_kept():
    counts = torch.zeros(10)
    trials = 600
    for seed in range(trials):
        layer, engine, method, weights, mask = set_hand_case(SETProtocol.original, seed=seed)
        method.update_masks(1, None)
        new = engine.tensors["weight"].mask.view(-1)
        kept = torch.tensor([0, 3, 4, 7])
        assert new[kept].all() and int(new.sum()) == 6  # the kept four stay; 2 grown
        grown = new & ~mask.view(-1)
        assert torch.all(layer.weight.view(-1)[grown] == 0)  # zero init
        counts += new.float()
    candidates = torch.tensor([1, 2, 5, 6, 8, 9])  # 4 inactive + the 2 just dropped
    freq = counts[candidates] / trials
    assert torch.allclose(freq, torch.full_like(freq, 2 / 6), atol=0.07), freq


# ------------------------------------------------------------------------------ engine, for real
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("method,options", [
    ("rigl", {"delta_t": 4}),
    ("rigl", {"delta_t": 4, "grow_score": GrowScore.gradient_explore, "explore_c": 0.01}),
    ("set", {}),
    ("set", {"protocol": SETProtocol.rigl, "delta_t": 4, "regrow_init": SETRegrowInit.normal}),
    ("set", {"regrow_init": SETRegrowInit.keep}),
])
def test_exact_counts_after_every_update(method, options, sparsity):
    loop = Loop(method, sparsity, options, total_steps=40, steps_per_epoch=5)
    changed = []

    def check(step):
        assert_exact(loop.engine)
        changed.extend(loop.engine.pop_mask_events())

    def check_counts(step):  # after RigL's update, which runs in after_step
        for t in loop.engine.tensors.values():
            assert int(t.mask.sum()) == target_nnz(t.numel, t.density)

    loop.start()
    loop.engine.pop_mask_events()  # the initial random masks
    for step in range(loop.total_steps):
        loop.step(step, after_before_step=check, after_step=check_counts)
    assert_exact(loop.engine)
    assert changed and all(dropped == grown for _, dropped, grown in changed)  # masks really moved
    for name, t in loop.engine.tensors.items():
        assert t.density == pytest.approx(1 - sparsity)


def _state_tensors(optimizer, param):
    return {k: v for k, v in optimizer.state[param].items() if torch.is_tensor(v) and v.shape == param.shape}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method,options", [
    ("rigl", {"delta_t": 6}),
    ("set", {"protocol": SETProtocol.rigl, "delta_t": 6}),
    ("set", {"protocol": SETProtocol.original}),
    ("set", {"regrow_init": SETRegrowInit.normal}),
])
def test_grown_weights_start_at_zero_with_reset_optimizer_state(method, options, optimizer):
    loop = Loop(method, 0.8, options, total_steps=30, steps_per_epoch=6, optimizer=optimizer)
    updates = set(loop.method.mask_update_steps())
    assert updates
    seen = []
    before = {}

    def fill_state(step):  # make every entry's state non-zero so a reset is visible
        if step in updates:
            before.update(loop.engine.masks())
            for t in loop.engine.tensors.values():
                for value in _state_tensors(loop.optimizer, t.param).values():
                    value.fill_(1.0)

    def check(step):
        if step not in updates:
            return
        for name, t in loop.engine.tensors.items():
            grown = t.mask & ~before[name]
            if not grown.any():
                continue
            state = _state_tensors(loop.optimizer, t.param)
            assert state, "optimizer has per-entry state"
            for key, value in state.items():
                assert torch.all(value[grown] == 0), (key, step)
                assert torch.all(value[t.mask & ~grown] != 0), (key, step)  # others untouched
            if options.get("regrow_init") is SETRegrowInit.normal:
                assert torch.all(t.param[grown] != 0)
            else:
                assert torch.all(t.param[grown] == 0)
            seen.append(step)

    loop.start()
    # Written out, not finish_step: the optimizer state must be filled between the optimizer step
    # and RigL's update in after_step, so that a reset is visible.
    for step in range(30):
        loop.ctx.step = step
        if method == "set":  # SET changes masks in before_step
            fill_state(step)
        loop.method.before_step(loop.ctx)
        if method == "set":
            check(step)
        loop.optimizer.zero_grad()
        nn.functional.cross_entropy(loop.model(loop.x), loop.y).backward()
        loop.method.after_backward(loop.ctx)
        loop.engine.mask_gradients()
        loop.optimizer.step()
        if method == "rigl":  # RigL changes masks after the optimizer step of the update step
            fill_state(step)
        loop.method.after_step(loop.ctx)
        if method == "rigl":
            check(step)
        loop.engine.apply_masks()
    assert set(seen) == updates


def test_set_normal_regrow_init_has_std_init_std():
    torch.manual_seed(0)
    layer = nn.Linear(300, 300, bias=False)
    engine = MaskedModel(layer)
    method = make("set", engine, {"regrow_init": SETRegrowInit.normal}, total_steps=20, steps_per_epoch=1)
    engine.set_masks(engine.random_masks({"weight": 0.5}, torch.Generator().manual_seed(0)), {"weight": 0.5})
    old = engine.masks()["weight"]
    method.update_masks(1, None)
    grown = engine.tensors["weight"].mask & ~old
    values = layer.weight.detach()[grown]
    assert values.numel() > 5000
    assert values.std().item() == pytest.approx(0.1, abs=0.005)
    assert abs(values.mean().item()) < 0.005


def test_set_keep_regrows_the_last_dropped_value():
    loop = Loop("set", 0.7, {"regrow_init": SETRegrowInit.keep}, total_steps=40, steps_per_epoch=4)
    loop.run(steps=12)  # two updates (4, 8): dropped values are remembered
    name = loop.engine.names[0]
    t = loop.engine.tensors[name]
    memory_before = loop.method.memory[name].clone()
    old_mask, old_values = t.mask.clone(), t.param.detach().clone()
    loop.method.update_masks(12, loop.optimizer)
    grown = t.mask & ~old_mask
    dropped = old_mask & ~t.mask
    assert grown.any() and (memory_before[grown] != 0).any()  # some grown were dropped before
    assert torch.equal(t.param[grown], memory_before[grown])
    assert torch.equal(loop.method.memory[name][dropped], old_values[dropped])


# ------------------------------------------------------------------------------ exploration (DST-EE style)
def test_exploration_counter_counts_rounds_active():
    loop = Loop("rigl", 0.8, {"delta_t": 5, "grow_score": GrowScore.gradient_explore}, total_steps=40)
    expected = {}
    masks_before = {}

    def snapshot(step):
        if step in loop.method.mask_update_steps():
            masks_before[step] = loop.engine.masks()

    loop.run(after_before_step=snapshot)
    for name in loop.engine.names:
        expected[name] = sum(m[name].int() for m in masks_before.values())
        assert torch.equal(loop.method.active_rounds[name], expected[name])
    assert len(masks_before) == 5  # steps 5..25, T_end = 30
    name = loop.engine.names[0]
    always = torch.stack([m[name] for m in masks_before.values()]).all(0)
    assert torch.all(loop.method.active_rounds[name][always] == 5)


def test_exploration_bonus_prefers_rarely_active_connections():
    weights = torch.tensor([[0.5, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    options = {"alpha": 0.5, "drop_schedule": DropSchedule.constant, "delta_t": 1, "end": 1.0,
               "grow_score": GrowScore.gradient_explore, "explore_c": 1.0, "explore_eps": 1.0}
    grads = torch.tensor([[0.0, 0.0, 0.5, 0.3]])
    # Without exploration position 2 (|grad| 0.5) wins; position 3 was never active, position 2
    # 9 rounds: 0.5 + ln(8)/(10) = 0.71 < 0.3 + ln(8)/1 = 2.38 (the round counts the active ones).
    for grow_score, expected in ((GrowScore.gradient, [True, False, True, False]),
                                 (GrowScore.gradient_explore, [True, False, False, True])):
        layer, engine = hand_layer(weights, mask, 0.5)
        rigl = make("rigl", engine, {**options, "grow_score": grow_score})
        rigl.counter("weight").copy_(torch.tensor([[0, 0, 9, 0]]))
        layer.weight.grad = grads.clone()
        rigl.after_backward(ctx_at(7))
        rigl.after_step(ctx_at(7))
        assert engine.tensors["weight"].mask.view(-1).tolist() == expected


# ------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("method,options", [
    ("rigl", {"delta_t": 5, "grow_score": GrowScore.gradient_explore}),
    ("set", {"regrow_init": SETRegrowInit.normal}),
    ("set", {"regrow_init": SETRegrowInit.keep}),
    ("set", {"protocol": SETProtocol.rigl, "delta_t": 5}),
])
def test_state_dict_round_trip_reproduces_the_next_update(method, options):
    first = Loop(method, 0.8, options, total_steps=40, steps_per_epoch=5, seed=1).run(steps=12)
    saved = {
        "model": copy.deepcopy(first.model.state_dict()), "engine": copy.deepcopy(first.engine.state_dict()),
        "optimizer": copy.deepcopy(first.optimizer.state_dict()), "method": copy.deepcopy(first.method.state_dict()),
    }
    for step in range(12, 16):  # the next update is at step 15
        first.step(step)

    second = Loop(method, 0.8, options, total_steps=40, steps_per_epoch=5, seed=99)  # other generator seed
    second.model.load_state_dict(saved["model"])
    second.engine.load_state_dict(saved["engine"])
    second.optimizer.load_state_dict(saved["optimizer"])
    second.method.load_state_dict(saved["method"])
    for step in range(12, 16):
        second.step(step)
    assert 15 in first.method.mask_update_steps()
    for name in first.engine.names:
        assert torch.equal(first.engine.tensors[name].mask, second.engine.tensors[name].mask), name
        assert torch.equal(first.engine.tensors[name].param, second.engine.tensors[name].param), name


def test_rigl_cifar_preset_sets_the_reference_t_end():
    # google-research/rigl CIFAR-10: mask updates end at step 75 000 of 97 656 (issue #9 section 4).
    from sparsebench import cli

    for method in ("rigl", "set"):
        cfg = cli.resolve(cli.compose_config(["experiment=cifar10_wrn22_2_rigl", f"method={method}"]))
        assert cfg["method"]["end"] == pytest.approx(75_000 / 97_656, abs=5e-4)
    assert "end" not in cli.resolve(cli.compose_config(["experiment=cifar10_wrn22_2_rigl", "method=static"]))["method"]
    assert cli.resolve(cli.compose_config(["method=rigl"]))["method"]["end"] == 0.75  # the default elsewhere
