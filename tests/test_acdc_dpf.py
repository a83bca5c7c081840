"""AC/DC and DPF on tiny hand-checked cases, driven in the trainer's step order."""
import io

import pytest
import torch
from torch import nn

from sparsebench.errors import UserError
from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
from sparsebench.methods.acdc import COMPRESSED, DECOMPRESSED, ResetMomentum, phase_boundaries
from sparsebench.schedules import cubic_sparsity
from sparsebench.sparse.masked import MaskedModel, target_nnz


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                         nn.Linear(6, 3))


class Loop:
    """The trainer's step order (train.py `_train_locked`) on one fixed batch, invariants checked."""

    def __init__(self, method, sparsity, options=None, model=None, total_steps=60, optimizer="sgd", lr=0.05,
                 momentum=0.9, allocation="uniform", dense_ends=True):
        self.model = model if model is not None else mlp()
        self.engine = MaskedModel(self.model, dense_first=dense_ends, dense_last=dense_ends)
        densities = None if allocation == "global" else {n: 1.0 - sparsity for n in self.engine.names}
        self.target = SparsityTarget(sparsity, allocation, densities)
        cls = METHODS.get(method)
        self.method = cls(cls.Options(**(options or {})), self.engine, self.target, total_steps, 10,
                          torch.Generator().manual_seed(1))
        params = self.model.parameters()
        self.optimizer = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
                          else torch.optim.SGD(params, lr=lr, momentum=momentum))
        # Looked up at call time: load_state_dict replaces the optimizer's state dict.
        self.ctx = StepContext(0, total_steps, 10, self.optimizer, lambda: self.optimizer.state.clear(),
                               lambda n: None, lambda m: None)
        gen = torch.Generator().manual_seed(2)
        first = next(m for m in self.model.modules() if isinstance(m, nn.Linear))
        self.x = torch.randn(16, first.in_features, generator=gen)
        self.y = torch.randint(0, 3, (16,), generator=gen)
        self.total_steps = total_steps

    def run(self, start=0, stop=None, pre=None, mid=None, fresh=True):
        if fresh:
            self.method.start(self.ctx)
        for step in range(start, self.total_steps if stop is None else stop):
            self.ctx.step = step
            if pre:
                pre(step)
            self.method.before_step(self.ctx)
            if mid:
                mid(step)
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(self.x), self.y).backward()
            finish_step(self.method, self.engine, self.ctx, self.optimizer.step)
            for name, t in self.engine.tensors.items():
                assert int(t.mask.sum()) == target_nnz(t.numel, t.density), (step, name)
                assert torch.all(t.param[~t.mask] == 0), (step, name)
        return self

    def checkpoint(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "engine": self.engine.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict()}, buffer)
        return buffer.getvalue()

    def restore(self, blob: bytes) -> None:
        ckpt = torch.load(io.BytesIO(blob), weights_only=False)
        self.model.load_state_dict(ckpt["model"])
        self.engine.load_state_dict(ckpt["engine"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.method.load_state_dict(ckpt["method"])


# ------------------------------------------------------------------------------ AC/DC
def test_acdc_reproduces_the_official_schedules():
    # ImageNet ResNet-50, 100 epochs (one step per epoch here): the defaults.
    loop = Loop("acdc", 0.9, total_steps=100)
    prunes = [s for s, k in loop.method.boundaries if k == COMPRESSED]
    restores = [s for s, k in loop.method.boundaries if k == DECOMPRESSED]
    assert prunes == [10, 20, 30, 40, 50, 60, 70, 85] and restores == [15, 25, 35, 45, 55, 65, 75]
    # CIFAR-100 WRN-28-10, 200 epochs.
    loop = Loop("acdc", 0.9, {"warmup": 0.05, "phase": 0.1, "final_compressed": 0.15}, total_steps=200)
    assert loop.method.boundaries == [(10, COMPRESSED), (30, DECOMPRESSED), (50, COMPRESSED), (70, DECOMPRESSED),
                                      (90, COMPRESSED), (110, DECOMPRESSED), (130, COMPRESSED),
                                      (150, DECOMPRESSED), (170, COMPRESSED)]
    assert phase_boundaries(20, 2, 3, 15) == [(2, COMPRESSED), (5, DECOMPRESSED), (8, COMPRESSED),
                                              (11, DECOMPRESSED), (15, COMPRESSED)]


def test_acdc_switches_phase_exactly_at_the_boundaries():
    loop = Loop("acdc", 0.9)  # 60 steps: warm-up 6, phases of 3, final compressed from 51
    expected = [(6, COMPRESSED), (9, DECOMPRESSED), (12, COMPRESSED), (15, DECOMPRESSED), (18, COMPRESSED),
                (21, DECOMPRESSED), (24, COMPRESSED), (27, DECOMPRESSED), (30, COMPRESSED), (33, DECOMPRESSED),
                (36, COMPRESSED), (39, DECOMPRESSED), (42, COMPRESSED), (45, DECOMPRESSED), (51, COMPRESSED)]
    assert loop.method.boundaries == expected
    assert loop.method.mask_update_steps() == [s for s, _ in expected]
    seen = {}
    loop.run(mid=lambda step: seen.setdefault(step, loop.engine.densities()))
    kind = {}
    current = DECOMPRESSED
    for step in range(60):
        current = dict(expected).get(step, current)
        kind[step] = current
    for step, densities in seen.items():
        compressed = kind[step] == COMPRESSED
        for name, d in densities.items():
            assert d == (pytest.approx(0.1) if compressed else 1.0), (step, name)
        assert loop.method.densities_at(step) == densities
        assert loop.method.schedule_value(step) == ("compressed", 1.0 if compressed else 0.0)
    assert loop.method.dense_weight_grad(10) is False


@pytest.mark.parametrize("reset", [ResetMomentum.restored, True])  # true: the earlier boolean spelling
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_acdc_restores_pruned_weights_as_zeros_with_zero_optimizer_state(optimizer, reset):
    loop = Loop("acdc", 0.8, {"reset_momentum": reset}, optimizer=optimizer, lr=0.01)
    restores = [s for s, k in loop.method.boundaries if k == DECOMPRESSED]
    before, checked = {}, []

    def pre(step):
        if step in restores:
            before[step] = {n: t.mask.clone() for n, t in loop.engine.tensors.items()}
            # The test is not vacuous: masked entries still carry stale optimizer state.
            stale = [v[~before[step][n]] for n, t in loop.engine.tensors.items()
                     for v in loop.optimizer.state[t.param].values() if torch.is_tensor(v) and v.shape == t.param.shape]
            assert any(bool((s != 0).any()) for s in stale)

    def mid(step):
        if step in restores:
            for name, t in loop.engine.tensors.items():
                was_pruned = ~before[step][name]
                assert t.mask.all() and t.density == 1.0
                assert torch.all(t.param[was_pruned] == 0)
                state = loop.optimizer.state[t.param]
                buffers = ["momentum_buffer"] if optimizer == "sgd" else ["exp_avg", "exp_avg_sq"]
                for key in buffers:
                    assert torch.all(state[key][was_pruned] == 0), (step, name, key)
                    assert bool((state[key][~was_pruned] != 0).any())  # kept entries keep their state
            checked.append(step)

    loop.run(pre=pre, mid=mid)
    assert checked == restores


@pytest.mark.parametrize("reset", [ResetMomentum.none, False])
def test_acdc_without_momentum_reset_keeps_the_state(reset):
    loop = Loop("acdc", 0.8, {"reset_momentum": reset})
    restore = next(s for s, k in loop.method.boundaries if k == DECOMPRESSED)
    stale = {}

    def pre(step):
        if step == restore:
            stale.update({n: loop.optimizer.state[t.param]["momentum_buffer"].clone()
                          for n, t in loop.engine.tensors.items()})

    def mid(step):
        if step == restore:
            for n, t in loop.engine.tensors.items():
                assert torch.equal(loop.optimizer.state[t.param]["momentum_buffer"], stale[n])

    loop.run(stop=restore + 1, pre=pre, mid=mid)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_acdc_default_clears_every_parameters_state_when_a_compressed_phase_ends(optimizer):
    # The official --reset_momentum_after_recycling: every parameter's momentum, biases included.
    loop = Loop("acdc", 0.8, optimizer=optimizer, lr=0.01)
    assert loop.method.reset_momentum is ResetMomentum.all
    restores = [s for s, k in loop.method.boundaries if k == DECOMPRESSED]
    prunes = [s for s, k in loop.method.boundaries if k == COMPRESSED]
    seen = {}

    def mid(step):
        seen[step] = sum(1 for p in loop.model.parameters() if loop.optimizer.state.get(p))

    loop.run(mid=mid)
    n_params = len(list(loop.model.parameters()))
    assert restores and all(seen[s] == 0 for s in restores)  # nothing left for any parameter
    assert all(seen[s] == n_params for s in prunes)  # a prune keeps the state
    assert all(seen[s + 1] == n_params for s in restores)  # the next step rebuilds it


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_acdc_compressed_phases_have_exact_nonzero_counts(allocation):
    loop = Loop("acdc", 0.75, allocation=allocation)
    total = sum(t.numel for t in loop.engine.tensors.values())
    nonzeros = {}

    def mid(step):
        if loop.method.phase_at(step) == COMPRESSED:
            nonzeros[step] = {n: int(t.param.count_nonzero()) for n, t in loop.engine.tensors.items()}

    loop.run(mid=mid)
    assert len(nonzeros) == 3 * 7 + 9  # seven 3-step compressed phases and the final 9 steps
    for step, counts in nonzeros.items():
        if allocation == "uniform":
            assert all(c == target_nnz(36, 0.25) for c in counts.values()), step
        else:
            assert sum(counts.values()) == target_nnz(total, 0.25), step
    assert loop.engine.actual_sparsity() == pytest.approx(1 - target_nnz(total, 0.25) / total)


def test_acdc_saves_the_dense_model_at_the_final_prune():
    loop = Loop("acdc", 0.9)
    final = loop.method.final_start
    snapshot = {}

    def pre(step):
        if step < final:
            assert loop.method.artifacts() == {}
        if step == final:
            snapshot.update({k: v.clone() for k, v in loop.model.state_dict().items()})
            assert all(t.mask.all() for t in loop.engine.tensors.values())  # the last dense phase

    loop.run(pre=pre)
    dense = loop.method.artifacts()["model_dense"]
    assert dense.keys() == snapshot.keys()
    assert all(torch.equal(dense[k], snapshot[k]) for k in dense)
    name = loop.engine.names[0]
    pruned = ~loop.engine.tensors[name].mask
    assert bool((dense[f"{name}"][pruned] != 0).any())  # the pair's dense half is dense
    assert loop.method.state_dict()["dense_model"] is dense


@pytest.mark.parametrize("options, message", [
    ({"warmup": 0.5, "phase": 0.2, "final_compressed": 0.15}, "phases do not fit"),
    ({"phase": 0.001}, "shorter than one step"),
    ({"final_compressed": 0.0}, "method.final_compressed=0.0"),
    ({"warmup": 1.0}, "method.warmup=1.0"),
])
def test_acdc_rejects_impossible_phases(options, message):
    with pytest.raises(UserError, match=message):
        Loop("acdc", 0.9, options)


# ------------------------------------------------------------------------------ DPF
def test_dpf_one_step_updates_the_dense_weights_with_the_gradient_at_the_masked_model():
    torch.manual_seed(3)
    layer = nn.Linear(4, 3, bias=False)
    lr = 0.1
    # 10 steps: refresh at 0 (sparsity 0, nothing to do) and at end = 1 (the target 0.5).
    # 20 steps: refreshes at 0 (sparsity 0, nothing to do), 1 (cubic: 0.4375) and end = 2 (0.5).
    loop = Loop("dpf", 0.5, {"begin": 0.0, "end": 0.1, "frequency": 1}, model=layer, total_steps=20,
                lr=lr, momentum=0.0, dense_ends=False)
    assert loop.method.mask_gradients_at(1) is False and loop.method.dense_weight_grad(1) is True
    loop.run(stop=1)  # one dense step
    t = loop.engine.tensors["weight"]
    assert t.mask.all()
    dense_old = loop.method.dense["weight"].clone()
    assert torch.equal(dense_old, t.param.detach())
    record = {}
    loop.run(start=1, stop=2, fresh=False,
             mid=lambda step: record.update(mask=t.mask.clone(), param=t.param.detach().clone()))
    mask = record["mask"]
    # The mask keeps the 7 largest |dense| (12 - floor(0.4375 * 12)) and the forward pass saw
    # exactly mask * dense.
    assert int(mask.sum()) == 7
    assert torch.equal(mask, dense_old.abs() >= dense_old.abs().flatten().kthvalue(6).values)
    assert torch.equal(record["param"], dense_old * mask)
    # Hand computation: gradient of the loss at the masked weights, applied to the dense weights.
    w = (dense_old * mask).requires_grad_()
    nn.functional.cross_entropy(loop.x @ w.T, loop.y).backward()
    assert bool((w.grad[~mask] != 0).any())  # masked entries get a gradient (the feedback)
    dense_new = dense_old - lr * w.grad
    assert torch.allclose(loop.method.dense["weight"], dense_new, atol=1e-7)
    assert torch.allclose(t.param.detach(), mask * dense_new, atol=1e-7)
    assert torch.all(t.param[~mask] == 0)



def test_dpf_pruned_weight_that_grows_returns_at_its_dense_value():
    loop = Loop("dpf", 0.9, {"begin": 0.0, "end": 0.75, "frequency": 5})
    name = loop.engine.names[1]
    t = loop.engine.tensors[name]
    chosen = {}

    def pre(step):
        if step == 11:  # between refreshes 10 and 15: make a pruned entry large in the dense copy
            idx = int((~t.mask).flatten().nonzero()[0])
            chosen["idx"] = idx
            loop.method.dense[name].view(-1)[idx] = 5.0
        if step == 15:
            chosen["dense"] = loop.method.dense[name].view(-1)[chosen["idx"]].item()
            chosen["momentum"] = loop.optimizer.state[t.param]["momentum_buffer"].clone()

    def mid(step):
        if step == 11:
            assert t.param.view(-1)[chosen["idx"]] == 0  # not active until the next refresh
        if step == 15:
            idx = chosen["idx"]
            assert bool(t.mask.view(-1)[idx])
            assert t.param.view(-1)[idx].item() == chosen["dense"] and abs(chosen["dense"]) > 1.0
            # No optimizer-state reset for re-activated weights: their state is the dense weight's.
            assert torch.equal(loop.optimizer.state[t.param]["momentum_buffer"], chosen["momentum"])

    loop.run(stop=16, pre=pre, mid=mid)
    assert "dense" in chosen


def test_dpf_refreshes_every_frequency_steps_on_the_cubic_schedule():
    loop = Loop("dpf", 0.9, {"begin": 0.1, "end": 0.7, "frequency": 5})
    refresh = [6, 11, 16, 21, 26, 31, 36, 41, 42]
    assert loop.method.refresh_steps == refresh
    assert loop.method.mask_update_steps() == refresh[1:]  # step 6 is at sparsity 0: nothing to prune
    calls, densities, masks = [], {}, {}
    original = loop.engine.set_mask

    def spy(name, *args, **kwargs):
        calls.append(loop.ctx.step)
        return original(name, *args, **kwargs)

    loop.engine.set_mask = spy

    dense_at, params_at = {}, {}

    def mid(step):
        densities[step] = loop.engine.densities()
        masks[step] = loop.engine.masks()
        dense_at[step] = {n: d.clone() for n, d in loop.method.dense.items()}
        params_at[step] = {n: t.param.detach().clone() for n, t in loop.engine.tensors.items()}

    loop.run(mid=mid)
    # Step 6 is the schedule's start (sparsity 0): nothing to prune; every later refresh sets each mask.
    assert sorted(set(calls)) == refresh[1:] and len(calls) == len(loop.engine.names) * len(refresh[1:])
    for step in refresh[1:]:
        s = cubic_sparsity(step, 0.0, 0.9, 6, 42)
        assert loop.method.schedule_value(step) == ("sparsity", pytest.approx(s))
        for name, d in densities[step].items():
            assert d == pytest.approx(1 - s)
        assert loop.method.densities_at(step) == pytest.approx(densities[step])
    assert loop.method.schedule_value(20) == ("sparsity", pytest.approx(cubic_sparsity(16, 0.0, 0.9, 6, 42)))
    for step in range(1, 60):  # masks change only at refresh steps, and are fixed after `end`
        if step not in refresh:
            assert all(torch.equal(masks[step][n], masks[step - 1][n]) for n in masks[step]), step
    assert all(d == pytest.approx(0.1) for d in densities[59].values())
    # Before `end` the dense copy keeps training in the masked entries (feedback) and the model
    # holds m * w; from `end` (42) on the mask is fixed and the copies are no longer updated.
    for name, t in loop.engine.tensors.items():
        dense, mask = dense_at[41][name], masks[41][name]
        assert torch.equal(params_at[41][name], dense * mask)
        assert bool((dense[~mask] != 0).any())
        assert torch.equal(loop.method.dense[name], dense_at[42][name])
        assert not torch.equal(t.param.detach(), dense_at[42][name] * t.mask)  # active weights trained on
    assert [s for s in range(60) if loop.method.dense_weight_grad(s)] == list(range(42))
    assert [s for s in range(60) if not loop.method.mask_gradients_at(s)] == list(range(42))


def test_dpf_global_threshold_keeps_the_largest_dense_weights_overall():
    loop = Loop("dpf", 0.8, {"begin": 0.0, "end": 0.5, "frequency": 7}, allocation="global")
    saved = {}

    def pre(step):
        if step == 30:  # the final refresh
            saved.update({n: w.clone() for n, w in loop.method.dense.items()})

    loop.run(stop=31, pre=pre)
    scores = torch.cat([saved[n].abs().flatten() for n in loop.engine.names])
    keep = target_nnz(scores.numel(), 0.2)
    threshold = scores.topk(keep).values.min()
    for name, t in loop.engine.tensors.items():
        assert torch.equal(t.mask, saved[name].abs() >= threshold)
    assert sum(int(t.mask.sum()) for t in loop.engine.tensors.values()) == keep
    assert len({t.density for t in loop.engine.tensors.values()}) > 1  # not uniform


@pytest.mark.parametrize("method, split", [("dpf", 25), ("acdc", 30), ("acdc", 55)])
def test_state_dict_round_trip_resumes_identically(method, split):
    straight = Loop(method, 0.9, {"frequency": 4} if method == "dpf" else {}).run()
    first = Loop(method, 0.9, {"frequency": 4} if method == "dpf" else {}).run(stop=split)
    blob = first.checkpoint()
    resumed = Loop(method, 0.9, {"frequency": 4} if method == "dpf" else {})
    torch.manual_seed(123)  # a resumed process has a different model initialisation
    for p in resumed.model.parameters():
        nn.init.normal_(p.data)
    resumed.restore(blob)
    resumed.run(start=split, fresh=False)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    for n in straight.engine.names:
        assert torch.equal(straight.engine.tensors[n].mask, resumed.engine.tensors[n].mask)
    sa, sb = straight.method.state_dict(), resumed.method.state_dict()
    inner = "dense" if method == "dpf" else "dense_model"
    assert sa[inner].keys() == sb[inner].keys()
    assert all(torch.equal(sa[inner][k], sb[inner][k]) for k in sa[inner])


@pytest.mark.parametrize("options, message", [
    ({"begin": 0.5, "end": 0.4}, "need 0 <= begin < end < 1"),
    ({"end": 1.0}, "need 0 <= begin < end < 1"),
    ({"frequency": 0}, "method.frequency=0"),
])
def test_dpf_rejects_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        Loop("dpf", 0.9, options)


def test_dpf_rejects_an_empty_pruning_window():
    with pytest.raises(UserError, match="pruning window is empty"):
        Loop("dpf", 0.9, {"begin": 0.0, "end": 0.1}, total_steps=4)


def test_dpf_flops_after_end_are_the_masked_cost():
    # Issue #9: DPF charged a dense weight gradient on every step, also after its mask is fixed.
    from sparsebench.dry_run import planned_flops
    from sparsebench.sparse.flops import FlopCounter

    loop = Loop("dpf", 0.9, {"begin": 0.1, "end": 0.5, "frequency": 5})
    counter = FlopCounter({n: 100 * (i + 1) for i, n in enumerate([*loop.engine.names, "dense.weight"])})
    charged = {}

    def pre(step):  # what the trainer charges for a step: the densities in force and the flag
        if step > 0:
            charged[step - 1] = counter.train_step(loop.engine.densities(), loop.method.dense_weight_grad(step - 1))

    loop.run(pre=pre)
    charged[59] = counter.train_step(loop.engine.densities(), loop.method.dense_weight_grad(59))
    end = loop.method.end_step
    assert end == 30
    masked = counter.train_step(loop.target.densities)  # 3 f_S: forward, two backward passes, masked
    assert all(charged[s] == pytest.approx(masked) for s in range(end, 60))
    with_dense_grad = counter.train_step(loop.target.densities, dense_weight_grad=True)
    assert with_dense_grad > masked and charged[end - 1] > masked  # the feedback phase pays f_D
    assert planned_flops(loop.method, counter, 32) == pytest.approx(sum(charged.values()))


@pytest.mark.slow
def test_dpf_real_run_charges_the_masked_cost_after_end(tmp_path):
    # 500 samples: 400 train = 4 steps per epoch, 16 steps; end = 0.5 is step 8, the start of epoch 3.
    from sparsebench import cli, results

    common = ["train", "sparsity=0.8", "epochs=4", "dataset.num_samples=500", "progress=none",
              f"results_root={tmp_path}"]
    assert cli.main([*common, "method=dpf", "method.end=0.5", "method.frequency=2"]) == 0
    assert cli.main([*common, "method=static"]) == 0
    flops = {}
    for run in (p.parent for p in tmp_path.rglob("final.json")):
        metrics = results.read_jsonl(run / "metrics.jsonl")
        flops[run.parts[-3]] = [r["train_flops"] for r in metrics]
    after_end = {m: f[3] - f[1] for m, f in flops.items()}  # epochs 3 and 4
    assert after_end["dpf"] == pytest.approx(after_end["static"], rel=1e-9)  # the same fixed-mask cost
    assert flops["dpf"][1] > flops["static"][1]  # before `end` DPF pays the dense weight gradient
