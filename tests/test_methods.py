"""Every registered method, driven through its hooks exactly as the trainer drives it.

Parameterised over METHODS: a newly registered method is tested by being registered.
"""
import dataclasses

import pytest
import torch
from torch import nn

from sparsebench.errors import UserError
from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
from sparsebench.methods.gap import GaPVariant, PartitionKind, contiguous_partitions, stage_partitions
from sparsebench.models import create_model
from sparsebench.schedules import cubic_sparsity, lr_at
from sparsebench.sparse.masked import MaskedModel, target_nnz

STEPS = 60

# Methods that mask weights (node-mask methods are tested in tests/test_search.py, SVD training's
# ranks in tests/test_svd.py).
WEIGHT_MASK_METHODS = [name for name in METHODS.names()
                      if METHODS.get(name).masks_weights and not METHODS.get(name).removes_units]


def mlp(depth: int = 4) -> nn.Module:
    layers, width = [], 6
    for i in range(depth):
        layers += [nn.Linear(5 if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


class Harness:
    """The trainer's step order, with the invariants checked after every step."""

    def __init__(self, method_name, sparsity, options=None, model=None, total_steps=STEPS, optimizer="sgd"):
        torch.manual_seed(0)
        self.model = model or mlp()
        self.engine = MaskedModel(self.model, dense_first=True, dense_last=True)
        cls = METHODS.get(method_name)
        sparsity = sparsity if cls.uses_sparsity else 0.0
        densities = {n: 1.0 - sparsity for n in self.engine.names}
        self.target = SparsityTarget(sparsity, "uniform", densities)
        opts = cls.Options(**(options or {}))
        self.method = cls(opts, self.engine, self.target, total_steps, 10, torch.Generator().manual_seed(1))
        self.optimizer = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(
            self.model.parameters(), lr=0.05, **({} if optimizer == "adam" else {"momentum": 0.9})
        )
        self.resets, self.lr_restarts = [], []
        self.ctx = StepContext(0, total_steps, 10, self.optimizer, lambda: self.resets.append(self.ctx.step),
                               lambda n: self.lr_restarts.append((self.ctx.step, n)), lambda m: None)
        self.x, self.y = torch.randn(32, 5), torch.randint(0, 3, (32,))
        self.total_steps = total_steps

    def run(self, steps=None, check=True, on_step=None):
        self.method.start(self.ctx)
        for step in range(steps or self.total_steps):
            self.ctx.step = step
            self.method.before_step(self.ctx)
            if on_step:
                on_step(step)
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(self.x), self.y).backward()
            finish_step(self.method, self.engine, self.ctx, self.optimizer.step)
            if check:
                assert_invariants(self.engine)
        return self


def assert_invariants(engine):
    for name, t in engine.tensors.items():
        assert int(t.mask.sum()) == target_nnz(t.numel, t.density), name
        assert torch.all(t.param[~t.mask] == 0), name


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("method", WEIGHT_MASK_METHODS)
def test_every_method_keeps_invariants_and_ends_at_target(method, sparsity):
    h = Harness(method, sparsity).run()
    for name, t in h.engine.tensors.items():
        expected = 1.0 if not METHODS.get(method).uses_sparsity else 1.0 - sparsity
        assert t.density == pytest.approx(expected)
        assert int(t.mask.sum()) == target_nnz(t.numel, expected)


def test_static_masks_fixed_during_training():
    h = Harness("static", 0.8)
    seen = []
    h.run(on_step=lambda step: seen.append(h.engine.masks()))
    assert all(torch.equal(seen[0][n], s[n]) for s in seen for n in s)


def test_magnitude_prunes_once_at_prune_at():
    h = Harness("magnitude", 0.9, {"prune_at": 0.5})
    densities = []
    h.run(on_step=lambda step: densities.append(h.engine.densities()["2.weight"]))
    assert densities[:30] == [1.0] * 30 and densities[30:] == [pytest.approx(0.1)] * 30


def test_gmp_follows_the_cubic_schedule():
    h = Harness("gmp", 0.9, {"begin": 0.2, "end": 0.8, "frequency": 6})
    history = {}
    h.run(on_step=lambda step: history.setdefault(step, 1.0 - h.engine.densities()["2.weight"]))
    for step in (12, 18, 24, 30, 36, 42, 48):  # pruning events: t0 = 12, every 6, end = 48
        expected = 0.9 + (0.0 - 0.9) * (1 - (step - 12) / 36) ** 3  # Zhu & Gupta eq. 1
        assert history[step] == pytest.approx(expected, abs=1 / 36)  # up to one weight of 36
    assert history[59] == pytest.approx(0.9, abs=1 / 36)
    assert history[13] == history[12]  # constant between events


def test_cubic_sparsity_formula():
    assert cubic_sparsity(0, 0.0, 0.9, 100, 1100) == 0.0
    assert cubic_sparsity(600, 0.0, 0.9, 100, 1100) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert cubic_sparsity(2000, 0.0, 0.9, 100, 1100) == 0.9


def test_lr_schedules():
    assert lr_at(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert lr_at(100, 100, 0.1, "cosine") == pytest.approx(0.0)
    assert lr_at(4, 100, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.05)
    assert lr_at(55, 100, 0.1, "multistep", milestones=[50, 75]) == pytest.approx(0.01)
    assert lr_at(80, 100, 0.1, "multistep", milestones=[50, 75]) == pytest.approx(0.001)


# ------------------------------------------------------------------------------ GaP
def test_cyclic_gap_grows_one_partition_at_a_time_from_zero():
    h = Harness("gap", 0.9, {"kappa": 3, "rounds": 2, "finetune_fraction": 0.2}, model=mlp(4))
    parts = h.method.partitions
    assert [len(p) for p in parts] == [1, 1, 1]  # 3 sparse tensors (first and last are dense)
    step_len = h.method.step_length
    assert step_len == 48 // 6 and h.method.finetune_start == 48
    log = {}

    def on_step(step):
        if step % step_len == 0:
            log[step] = {n: (t.density, t.param.detach().clone(), t.mask.clone()) for n, t in h.engine.tensors.items()}

    h.run(on_step=on_step)
    for j in range(6):
        dense_part = parts[j % 3]
        for name, (density, _, _) in log[j * step_len].items():
            assert density == (1.0 if name in dense_part else pytest.approx(0.1)), (j, name)
        if j > 0:  # grown weights that were masked at the previous boundary start at exactly zero
            name = dense_part[0]
            mask_while_sparse = log[(j - 1) * step_len][name][2]
            weights_at_growth = log[j * step_len][name][1]
            assert torch.all(weights_at_growth[~mask_while_sparse] == 0)
    assert all(d == pytest.approx(0.1) for d, _, _ in log[48].values())  # fine-tune: all sparse


def test_gap_restart_each_step_resets_optimizer_and_lr():
    h = Harness("gap", 0.9, {"kappa": 3, "rounds": 1, "finetune_fraction": 0.25, "restart_each_step": True}, model=mlp(4))
    h.run()
    step_len = h.method.step_length
    assert h.resets == [0, step_len, 2 * step_len, 3 * step_len]
    assert h.lr_restarts == [(0, step_len), (step_len, step_len), (2 * step_len, step_len), (45, 15)]


def test_parallel_gap_assembles_each_partition_from_its_replica():
    h = Harness("gap", 0.8, {"variant": GaPVariant.parallel, "kappa": 3, "rounds": 2, "finetune_fraction": 0.2},
                model=mlp(4))
    step_len = h.method.step_length
    captured = {}

    def on_step(step):
        if step == 3 * step_len:  # boundary of round 2: the assembled model was just built
            captured["assembled"] = {n: t.param.detach().clone() for n, t in h.engine.tensors.items()}
            captured["pieces"] = [p["model"] for p in h.method_pieces_of_last_round]
        if step == step_len:  # replica 1 starts from the round's combined model, not replica 0
            captured["restored"] = {n: t.param.detach().clone() for n, t in h.engine.tensors.items()}
            captured["combined"] = h.method.combined["model"]

    original_assemble = h.method._assemble

    def spy_assemble():
        h.method_pieces_of_last_round = list(h.method.pieces)
        original_assemble()

    h.method._assemble = spy_assemble
    h.run(on_step=on_step)
    parts = h.method.partitions
    for i, part in enumerate(parts):
        for name in part:
            assert torch.equal(captured["assembled"][name], captured["pieces"][i][name])
    untouched = parts[0]  # replica 1 grows partition 1; partition 0 must be the combined model's
    for name in untouched:
        assert torch.equal(captured["restored"][name], captured["combined"][name])


def test_contiguous_partitions_balance_parameters():
    names = ["a", "b", "c", "d", "e"]
    sizes = {"a": 10, "b": 10, "c": 40, "d": 20, "e": 20}
    assert contiguous_partitions(names, sizes, 2) == [["a", "b", "c"], ["d", "e"]]
    assert contiguous_partitions(names, sizes, 5) == [[n] for n in names]
    parts = contiguous_partitions(names, {n: 1 for n in names}, 3)
    assert [n for p in parts for n in p] == names and all(parts)


def test_stage_partitions_follow_resnet_stages():
    model = create_model("resnet20", (3, 32, 32), 10)
    engine = MaskedModel(model, dense_first=True, dense_last=True)
    parts = stage_partitions(engine.names, model.stage_names)
    assert [p[0].split(".")[0] for p in parts] == ["layer1", "layer2", "layer3"]
    assert sum(len(p) for p in parts) == len(engine.names)
    h = Harness("gap", 0.9, {"kappa": 3}, model=model, total_steps=40)
    assert h.method.partitions == parts  # partition=auto picks stages when kappa == #stages


def test_random_partition_is_a_seeded_permutation():
    a = Harness("gap", 0.9, {"kappa": 2, "partition": PartitionKind.random}, model=mlp(6)).method.partitions
    b = Harness("gap", 0.9, {"kappa": 2, "partition": PartitionKind.random}, model=mlp(6)).method.partitions
    assert a == b and sorted(n for p in a for n in p) == sorted(Harness("static", 0.9, model=mlp(6)).engine.names)


def test_gap_rejects_kappa_above_layer_count_and_too_short_training():
    with pytest.raises(UserError, match="kappa=4 is larger than the number of prunable layers \\(3\\)"):
        Harness("gap", 0.9, {"kappa": 4}, model=mlp(4))
    with pytest.raises(UserError, match="too few training steps"):
        Harness("gap", 0.9, {"kappa": 3, "rounds": 10}, model=mlp(4), total_steps=20)


def test_options_are_dataclasses_with_defaults():
    for name in METHODS.names():
        assert dataclasses.is_dataclass(METHODS.get(name).Options)
        METHODS.get(name).Options()  # every option has a default


@pytest.mark.parametrize("method", WEIGHT_MASK_METHODS)
def test_plan_changes_only_at_mask_update_steps_and_segment_flops_are_exact(method):
    """The dry run relies on it: densities are asked for once per segment between updates."""
    from sparsebench.dry_run import planned_flops
    from sparsebench.sparse.flops import FlopCounter

    h = Harness(method, 0.9)
    updates = set(h.method.mask_update_steps())
    for step in range(1, STEPS):
        if step not in updates:
            assert h.method.densities_at(step) == h.method.densities_at(step - 1), step
    counter = FlopCounter({n: 100 * (i + 1) for i, n in enumerate(h.engine.names)})
    step_by_step = sum(counter.train_step(h.method.densities_at(t), h.method.dense_weight_grad(t)) for t in range(STEPS))
    assert planned_flops(h.method, counter, 32) == pytest.approx(step_by_step)
