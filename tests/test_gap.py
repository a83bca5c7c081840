"""GaP as the official code runs it (issue #9): a dense first partition at its initial weights,
1 + kappa*rounds steps, P-GaP's combine by copy, and the presets' step arithmetic.

The methods are driven through the trainer's hooks by the Harness of test_methods.py.
"""
import pytest
import torch
from test_methods import Harness, assert_invariants, mlp
from torch import nn

from sparsebench import cli
from sparsebench.config import validate
from sparsebench.errors import UserError
from sparsebench.methods import METHODS
from sparsebench.methods.gap import Combine, FirstPartition, GaPVariant, stage_partitions, state_owners
from sparsebench.models import create_model
from sparsebench.sparse.masked import MaskedModel, target_nnz
from sparsebench.sparse.powerprop import apply_powerprop


def mlp_bn() -> nn.Module:
    """Linear-BN-ReLU blocks: prunable linears 3, 6, 9 (0 and 12 are kept dense by the Harness)."""
    layers, width = [], 6
    for i in range(4):
        layers += [nn.Linear(5 if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def seeded(factory, seed=7):
    torch.manual_seed(seed)
    return factory()


def engine_densities(engine):
    return {n: t.density for n, t in engine.tensors.items()}


# ------------------------------------------------------------------ first partition dense at init
@pytest.mark.parametrize("factory", [lambda: mlp(4), lambda: create_model("resnet20", (3, 32, 32), 10)],
                         ids=["mlp", "resnet20-stages"])
def test_first_partition_is_dense_at_step_0_with_its_initial_values(factory):
    initial = seeded(factory).state_dict()  # the same model, built again with the same seed
    h = Harness("gap", 0.9, {"kappa": 3, "rounds": 2}, model=seeded(factory), total_steps=60)
    assert h.method.options.first_partition is FirstPartition.auto and h.method.dense_first_partition
    h.method.start(h.ctx)
    h.ctx.step = 0
    h.method.before_step(h.ctx)  # step 0's boundary "grows" partition 0: nothing may change
    first, others = h.method.partitions[0], [n for p in h.method.partitions[1:] for n in p]
    for name in first:
        t = h.engine.tensors[name]
        assert t.density == 1.0 and bool(t.mask.all()), name
        assert torch.equal(t.param.detach(), initial[name]), name  # not zeroed, not redrawn
    for name in others:
        t = h.engine.tensors[name]
        assert int(t.mask.sum()) == target_nnz(t.numel, 0.1), name
        assert torch.equal(t.param.detach(), initial[name] * t.mask), name  # kept where active
    assert all(name in others for name, _, _ in h.engine.pop_mask_events())  # partition 0 never changed
    assert engine_densities(h.engine) == h.method.densities_at(0)
    assert_invariants(h.engine)


def test_first_partition_sparse_keeps_the_old_start_grown_from_zeros():
    h = Harness("gap", 0.9, {"kappa": 3, "first_partition": FirstPartition.sparse}, model=mlp(4))
    h.method.start(h.ctx)
    start_masks = h.engine.masks()
    assert all(int(m.sum()) == target_nnz(m.numel(), 0.1) for m in start_masks.values())
    h.ctx.step = 0
    h.method.before_step(h.ctx)
    for name in h.method.partitions[0]:
        t = h.engine.tensors[name]
        assert t.density == 1.0 and torch.all(t.param[~start_masks[name]] == 0), name


def test_parallel_gap_starts_every_partition_sparse():
    h = Harness("gap", 0.9, {"variant": GaPVariant.parallel}, model=mlp(4))
    assert not h.method.dense_first_partition
    h.method.start(h.ctx)
    assert all(t.density == pytest.approx(0.1) for t in h.engine.tensors.values())


# ------------------------------------------------------------------ schedule
@pytest.mark.parametrize("options", [
    {},
    {"first_partition": FirstPartition.sparse},
    {"initial_step": True},
    {"variant": GaPVariant.parallel},
    {"variant": GaPVariant.parallel, "combine": Combine.average},
], ids=["dense-first", "sparse-first", "initial-step", "parallel-copy", "parallel-average"])
def test_run_follows_the_plan_at_every_step(options):
    """What a dry run and the FLOPs count assume (densities_at) is what the hooks do."""
    h = Harness("gap", 0.9, {"kappa": 3, "rounds": 2, "finetune_fraction": 0.2, **options}, model=mlp_bn(),
                total_steps=70)
    updates = set(h.method.mask_update_steps())
    seen = []

    def on_step(step):
        assert engine_densities(h.engine) == h.method.densities_at(step), step
        seen.append(step)

    h.run(on_step=on_step)
    assert len(seen) == 70
    assert {s for s in range(1, 70) if h.method.densities_at(s) != h.method.densities_at(s - 1)} <= updates


@pytest.mark.parametrize("variant", [GaPVariant.cyclic, GaPVariant.parallel])
def test_no_finetune_still_ends_at_the_target_sparsity(variant):
    # finetune_fraction=0 once left the last grown partition dense (60 % sparse instead of 90 %):
    # its prune was due at step 60 of a 60-step run. Now at least one step is left to the fine-tune
    # (here 59 steps make 6 GaP steps of 9, and the 6 left over fine-tune).
    h = Harness("gap", 0.9, {"variant": variant, "kappa": 3, "rounds": 2, "finetune_fraction": 0.0}, model=mlp_bn(),
                total_steps=60)
    assert h.method.finetune_start == 54 and h.method.step_length == 9
    h.run()
    assert engine_densities(h.engine) == h.method.target.densities
    assert_invariants(h.engine)


def test_initial_step_gives_the_official_one_plus_kappa_rounds_steps():
    h = Harness("gap", 0.9, {"kappa": 3, "rounds": 2, "finetune_fraction": 0.2, "initial_step": True,
                             "restart_each_step": True}, model=mlp(4), total_steps=70)
    m = h.method
    assert m.n_steps == 7 and m.step_length == 56 // 7 and m.finetune_start == 56
    dense_partition = [next(i for i, p in enumerate(m.partitions) if m.densities_at(j * 8)[p[0]] == 1.0)
                       for j in range(7)]
    assert dense_partition == [0, 1, 2, 0, 1, 2, 0]  # partition 0: rounds + 1 times, last step included
    assert all(d == pytest.approx(0.1) for d in m.densities_at(56).values())
    h.run()
    assert h.resets == [0, 8, 16, 24, 32, 40, 48, 56]
    assert h.lr_restarts == [(s, 8) for s in range(0, 56, 8)] + [(56, 14)]


@pytest.mark.parametrize("options, message", [
    ({"variant": GaPVariant.parallel, "first_partition": FirstPartition.dense},
     "method.first_partition=dense is for variant=cyclic"),
    ({"variant": GaPVariant.parallel, "initial_step": True}, "method.initial_step=true is for variant=cyclic"),
    ({"combine": Combine.average}, "method.combine=average is for variant=parallel"),
])
def test_options_of_the_other_variant_are_refused_in_one_line(options, message):
    with pytest.raises(UserError, match=message) as info:
        Harness("gap", 0.9, options, model=mlp(4))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ P-GaP combine
def run_parallel(combine: Combine):
    """P-GaP on mlp_bn; returns the round-1 replicas' model states, the assembled one and the method."""
    h = Harness("gap", 0.8, {"variant": GaPVariant.parallel, "kappa": 3, "rounds": 2, "finetune_fraction": 0.2,
                             "combine": combine}, model=mlp_bn())
    captured = {}
    assemble = h.method._assemble

    def spy():
        captured.setdefault("pieces", [p["model"] for p in h.method.pieces])
        assemble()

    def on_step(step):
        if step == 3 * h.method.step_length:  # round 2 starts from the model just assembled
            captured["assembled"] = h.method.combined["model"]

    h.method._assemble = spy
    h.run(on_step=on_step)
    return captured["pieces"], captured["assembled"], h.method


EXPECTED_OWNERS = {"0": None, "1": None, "3": 0, "4": 0, "6": 1, "7": 1, "9": 2, "10": 2, "12": None}


def test_parallel_combine_copies_partition_layers_from_their_replica_and_the_rest_from_replica_0():
    pieces, assembled, method = run_parallel(Combine.copy)
    owners = method.state_owners()
    assert set(owners) == set(assembled)
    for key, owner in owners.items():
        assert owner == EXPECTED_OWNERS[key.split(".")[0]], key  # weights, biases and BatchNorm alike
        assert torch.equal(assembled[key], pieces[0 if owner is None else owner][key]), key
    # The replicas differ where it matters, so a copy from the wrong one (or an average) would fail.
    for key, replica in (("7.weight", 1), ("7.running_mean", 1), ("6.bias", 1), ("10.bias", 2), ("12.weight", 1),
                         ("1.running_var", 2)):
        assert not torch.equal(pieces[0][key], pieces[replica][key]), key


def test_parallel_combine_average_still_averages_everything_but_the_partition_weights():
    pieces, assembled, method = run_parallel(Combine.average)
    for i, part in enumerate(method.partitions):
        for name in part:
            assert torch.equal(assembled[name], pieces[i][name])
    for key in ("3.bias", "4.weight", "4.running_mean", "12.weight", "0.bias"):
        assert torch.allclose(assembled[key], torch.stack([p[key] for p in pieces]).mean(0)), key
    assert torch.equal(assembled["4.num_batches_tracked"], pieces[-1]["4.num_batches_tracked"])


def test_state_owners_of_residual_stages_take_whole_blocks():
    model = create_model("resnet20", (3, 32, 32), 10)
    engine = MaskedModel(model, dense_first=True, dense_last=True)
    parts = stage_partitions(engine.names, model.stage_names)
    owners = state_owners(model, engine, parts, model.stage_names)
    assert set(owners) == set(model.state_dict())
    assert owners["conv1.weight"] is None and owners["bn1.running_mean"] is None and owners["fc.bias"] is None
    assert owners["layer1.0.bn1.weight"] == 0 and owners["layer2.0.shortcut.1.running_var"] == 1
    assert all(owner == int(key[5]) - 1 for key, owner in owners.items() if key.startswith("layer"))
    engine = MaskedModel(model, dense_first=False, dense_last=False)  # stem and head are pruned too
    owners = state_owners(model, engine, stage_partitions(engine.names, model.stage_names), model.stage_names)
    assert owners["conv1.weight"] == owners["bn1.weight"] == 0 and owners["fc.weight"] == owners["fc.bias"] == 2


def test_state_owners_of_a_pre_activation_stage_include_its_leading_norm():
    model = create_model("wrn22_2", (3, 32, 32), 10)
    engine = MaskedModel(model, dense_first=True, dense_last=True)
    owners = state_owners(model, engine, stage_partitions(engine.names, model.stage_names), model.stage_names)
    assert owners["layer2.0.bn1.weight"] == 1  # runs before layer2's first conv, still layer 2's
    assert owners["bn.weight"] == 2 and owners["fc.weight"] is None


def test_state_owners_follow_powerprop_parametrisations():
    model = mlp_bn()
    names = MaskedModel(model, dense_first=True, dense_last=True).names
    apply_powerprop(model, names, 2.0)
    engine = MaskedModel(model, dense_first=True, dense_last=True)  # as the trainer rebuilds it
    parts = [[n] for n in engine.names]
    owners = state_owners(model, engine, parts)
    assert owners["3.parametrizations.weight.original"] == 0 and owners["9.bias"] == 2 and owners["10.weight"] == 2


# ------------------------------------------------------------------ presets
PRESETS = {
    # preset: (variant, kappa, GaP steps, model input shape, classes)
    "cifar10_resnet32_gap": (GaPVariant.cyclic, 3, 31, (3, 32, 32), 10),
    "imagenet_resnet50_gap": (GaPVariant.cyclic, 4, 41, (3, 224, 224), 1000),
    "imagenet_resnet50_pgap": (GaPVariant.parallel, 4, 40, (3, 224, 224), 1000),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_give_10_epoch_steps_and_a_40_epoch_fine_tune(preset):
    """The dry run needs the dataset, so the presets' step arithmetic is checked here."""
    from sparsebench.train import sparsity_target

    variant, kappa, n_steps, shape, classes = PRESETS[preset]
    cfg = validate(cli.resolve(cli.compose_config([f"experiment={preset}"])))
    o = cfg.method_options
    assert cfg.method == "gap" and o.variant is variant and o.kappa == kappa and o.restart_each_step
    assert cfg.run.epochs == 10 * n_steps + 40
    model = create_model(cfg.model, shape, classes, **cfg.model_options)
    d = cfg.distribution_options
    engine = MaskedModel(model, d.dense_first, d.dense_last)
    target = sparsity_target(cfg, engine)
    for steps_per_epoch in (1, 7, 391, 5005):  # any data set size: CIFAR-10 at batch 128, ImageNet at 256
        total = cfg.run.epochs * steps_per_epoch
        method = METHODS.get("gap")(o, engine, target, total, steps_per_epoch, torch.Generator().manual_seed(0))
        assert method.n_steps == n_steps and method.step_length == 10 * steps_per_epoch
        assert total - method.finetune_start == 40 * steps_per_epoch
        assert method.partitions == stage_partitions(engine.names, model.stage_names)
    assert method.dense_first_partition == (variant is GaPVariant.cyclic)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_set_gap_options_only_for_gap(preset):
    rigl = validate(cli.resolve(cli.compose_config([f"experiment={preset}", "method=rigl"])))
    assert rigl.method == "rigl"  # the GaP-only file is not merged into another method's options
    gap = validate(cli.resolve(cli.compose_config([f"experiment={preset}", "method.rounds=3"])))
    assert gap.method_options.rounds == 3  # the command line still wins
