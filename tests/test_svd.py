"""`svd`: SVD training's parametrisation, penalties and rank cut against hand-computed values, the
low rank kept through training, resume, the CLI's final.json and model.pt, and its refusals."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparsebench import cli
from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
from sparsebench.methods.svd import Decomposition, FinetuneRegularizers, Regularizer, rows_read
from sparsebench.models import create_model
from sparsebench.sparse.flops import layer_forward_flops
from sparsebench.sparse.low_rank import (
    LowRank, apply_low_rank, choose_ranks, factors, hoyer_penalty, hoyer_square_penalty, kept_parameters, l1_penalty, matrix_shape,
    orthogonality_penalty, ranks_for_energy, cumulative_energy, to_matrix,
)
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.powerprop import export_state_dict


# ------------------------------------------------------------------------------ the parametrisation
@pytest.mark.parametrize("layer, decomposition, shape", [
    (nn.Linear(7, 4), "channel", (4, 7)),
    (nn.Linear(7, 4), "spatial", (4, 7)),
    (nn.Conv2d(3, 5, (2, 4)), "channel", (5, 3 * 2 * 4)),
    (nn.Conv2d(3, 5, (2, 4)), "spatial", (5 * 2, 3 * 4)),
    (nn.Conv1d(6, 4, 3), "channel", (4, 18)),
    (nn.Conv1d(6, 4, 3), "spatial", (12, 6)),
])
def test_parametrisation_starts_at_the_initial_weight_with_full_rank_factors(layer, decomposition, shape):
    torch.manual_seed(0)
    before = layer.weight.detach().clone()
    (low_rank,) = apply_low_rank([layer], decomposition)
    m, n = shape
    assert matrix_shape(before.shape, decomposition) == shape and low_rank.full_rank == min(m, n)
    assert torch.allclose(layer.weight, before, atol=1e-6)
    U, s, V = factors(layer)
    assert U.shape == (m, min(m, n)) and s.shape == (min(m, n),) and V.shape == (n, min(m, n))
    assert {k for k, _ in layer.named_parameters()} >= {f"parametrizations.weight.original{i}" for i in range(3)}
    assert "weight" not in dict(layer.named_parameters())
    assert torch.allclose(U.T @ U, torch.eye(min(m, n)), atol=1e-5) and torch.allclose(V.T @ V, torch.eye(min(m, n)), atol=1e-5)
    assert torch.allclose(s, torch.linalg.svdvals(to_matrix(before, decomposition)), atol=1e-5)


def test_spatial_matrix_pairs_the_first_kernel_axis_with_the_outputs():
    w = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)  # (out, in, kh, kw)
    matrix = to_matrix(w, "spatial")
    for o, i, h, k in [(0, 0, 0, 0), (1, 2, 1, 3), (0, 1, 1, 2), (1, 0, 0, 1)]:
        assert matrix[o * 2 + h, i * 4 + k] == w[o, i, h, k]
    assert torch.equal(to_matrix(w, "channel")[1, 2 * 8 + 1 * 4 + 3], w[1, 2, 1, 3])
    low_rank = LowRank(w.shape, "spatial")
    assert torch.allclose(low_rank(*low_rank.right_inverse(w)), w, atol=1e-4)


def test_export_writes_plain_weights_that_load_into_the_plain_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    apply_low_rank([model[0]], "spatial")
    apply_low_rank([model[3]], "channel")
    with torch.no_grad():
        factors(model[0])[1][1:] = 0.0  # rank 1: not the initial weights any more
    state = export_state_dict(model)
    assert set(state) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    plain.load_state_dict(state)  # strict
    x = torch.randn(5, 2, 5, 5)
    assert torch.allclose(plain(x), model(x), atol=1e-6)
    assert int(torch.linalg.matrix_rank(to_matrix(plain[0].weight.detach(), "spatial"))) == 1
    bare = nn.Linear(3, 2)  # a parametrised module at the top: keys without a module prefix
    apply_low_rank([bare])
    assert set(export_state_dict(bare)) == {"weight", "bias"}


# ------------------------------------------------------------------------------ penalties
def test_orthogonality_penalty_by_hand():
    U = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # U^T U - I = [[0, 1], [1, 1]]: 3
    V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # orthonormal columns: 0
    assert orthogonality_penalty(U, V).item() == pytest.approx(3 / 4)  # / r^2, r = 2
    assert orthogonality_penalty(V, V).item() == 0.0
    W = torch.tensor([[2.0], [0.0]])  # r = 1: (4 - 1)^2 twice
    assert orthogonality_penalty(W, W).item() == pytest.approx(18.0)


def test_l1_and_hoyer_by_hand():
    s = torch.tensor([3.0, -4.0, 0.0])
    assert l1_penalty(s).item() == pytest.approx(7.0)
    assert hoyer_penalty(s).item() == pytest.approx(7 / 5)
    assert hoyer_penalty(torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)  # one value: its minimum
    assert hoyer_penalty(torch.zeros(3)).item() == 0.0
    assert hoyer_square_penalty(s).item() == pytest.approx(49 / 25)
    assert hoyer_square_penalty(torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)
    assert hoyer_square_penalty(torch.ones(4)).item() == pytest.approx(4.0)  # all equal: its maximum, len(s)
    assert hoyer_square_penalty(torch.zeros(3)).item() == 0.0
    # its gradient is 2 H(s) times Hoyer's
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    hoyer_square_penalty(a).backward()
    hoyer_penalty(b).backward()
    assert torch.allclose(a.grad, 2 * (7 / 5) * b.grad)


# ------------------------------------------------------------------------------ the rank cut
# Layer a: 4 x 6 (r(m+n) = 10 r, dense 24), s^2 = 16, 4, 1, 1: cumulative 16/22, 20/22, 21/22, 1.
# Layer b: 3 x 5 (8 r, dense 15),           s^2 = 9, 4, 1:     cumulative 9/14, 13/14, 1.
SPECTRA = {"a": torch.tensor([1.0, 4.0, -1.0, 2.0]), "b": torch.tensor([3.0, 1.0, 2.0])}  # order and sign free
SHAPES = {"a": (4, 6), "b": (3, 5)}


def test_kept_parameters_count_factors_or_the_dense_layer_whichever_is_smaller():
    assert [kept_parameters(r, 4, 6) for r in (1, 2, 3, 4)] == [10, 20, 24, 24]
    assert [kept_parameters(r, 3, 5) for r in (1, 2, 3)] == [8, 15, 15]


def test_cut_finds_the_largest_energy_within_the_parameter_budget():
    dense = 24 + 15
    budget = dense - math.floor(0.3 * dense)  # sparsity 0.3: 28 of 39
    ranks, energy = choose_ranks(SPECTRA, SHAPES, budget)
    # e = 16/22 keeps a at rank 1 (10) and needs b at rank 2 (15): 25 <= 28. Any larger e puts a at
    # rank 2: 20 + 15 = 35 > 28.
    assert ranks == {"a": 1, "b": 2} and energy == pytest.approx(16 / 22)
    cumulative = {n: cumulative_energy(s) for n, s in SPECTRA.items()}
    assert sum(kept_parameters(r, *SHAPES[n]) for n, r in ranks.items()) == 25 <= budget
    above = ranks_for_energy(cumulative, energy + 1e-9)
    assert above == {"a": 2, "b": 2} and sum(kept_parameters(r, *SHAPES[n]) for n, r in above.items()) > budget
    assert choose_ranks(SPECTRA, SHAPES, 35) == ({"a": 2, "b": 2}, pytest.approx(20 / 22))
    assert choose_ranks(SPECTRA, SHAPES, 38) == ({"a": 2, "b": 2}, pytest.approx(20 / 22))  # 13/14 needs a at 3: 39
    assert choose_ranks(SPECTRA, SHAPES, 39) == ({"a": 4, "b": 3}, 1.0)  # capped at dense, every rank fits
    assert choose_ranks(SPECTRA, SHAPES, 18) == ({"a": 1, "b": 1}, pytest.approx(9 / 14))
    with pytest.raises(ValueError, match="rank 1 in every layer keeps 18"):
        choose_ranks(SPECTRA, SHAPES, 17)


# ------------------------------------------------------------------------------ the method, step by step
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def svd_method(model, sparsity=0.8, total_steps=40, **options):
    engine = MaskedModel(model, dense_first=True, dense_last=True)
    cls = METHODS.get("svd")
    target = SparsityTarget(sparsity, "uniform", {n: 1.0 - sparsity for n in engine.names})
    method = cls(cls.Options(**options), engine, target, total_steps, 10, torch.Generator().manual_seed(0))
    return method, engine


class Loop:
    """The trainer's order: before_step, forward, loss + loss_term, backward, finish_step."""

    def __init__(self, sparsity=0.8, total_steps=40, optimizer="sgd", model=None, cut=0.75, **options):
        torch.manual_seed(0)
        self.model = model or mlp()
        self.method, self.engine = svd_method(self.model, sparsity, total_steps, cut=cut, **options)
        params = self.model.parameters()
        self.optimizer = (torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd"
                          else torch.optim.AdamW(params, lr=0.01, weight_decay=0.1))
        self.ctx = StepContext(0, total_steps, 10, self.optimizer, lambda: None, lambda n: None, lambda m: None)
        self.x, self.y = torch.randn(64, 5), torch.randint(0, 3, (64,))
        self.total_steps = total_steps

    def run(self, steps, start=0, after_step=None):
        if start == 0:
            self.method.start(self.ctx)
        for step in range(start, start + steps):
            self.ctx.step = step
            self.method.before_step(self.ctx)
            self.optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
            penalty = self.method.loss_term()
            (loss if penalty is None else loss + penalty).backward()
            finish_step(self.method, self.engine, self.ctx, self.optimizer.step)
            if after_step:
                after_step(step)
        return self


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_after_the_cut_each_weight_has_exactly_its_rank_and_keeps_it(optimizer):
    loop = Loop(optimizer=optimizer)
    assert loop.method.cut_step == 30
    assert loop.method.parameter_densities() == {"2.weight": 1.0, "4.weight": 1.0}

    def check(step):
        if step < 30:
            assert not loop.method.cut_done
            return
        ranks = loop.method.ranks()
        for name, module in loop.method.layers.items():
            assert int(torch.linalg.matrix_rank(module.weight.detach())) == ranks[name], (step, name)
            U, s, V = factors(module)
            removed = ~loop.method.rank_masks[name]
            assert torch.all(s[removed] == 0) and torch.all(U[:, removed] == 0) and torch.all(V[:, removed] == 0)
            assert torch.all(s[~removed] != 0)

    loop.run(40, after_step=check)
    shapes = {"2.weight": (12, 16), "4.weight": (12, 12)}
    kept = sum(kept_parameters(r, *shapes[n]) for n, r in loop.method.ranks().items())
    dense = 12 * 16 + 12 * 12
    assert kept <= dense - math.floor(0.8 * dense) and kept == loop.method.summary()["svd"]["kept_params"]
    densities = loop.method.parameter_densities()
    assert densities == {n: kept_parameters(r, *shapes[n]) / (shapes[n][0] * shapes[n][1])
                         for n, r in loop.method.ranks().items()}
    assert all(t.density == 1.0 and bool(t.mask.all()) for t in loop.engine.tensors.values())  # masks untouched


def test_cut_clears_the_optimizer_state_of_removed_singular_values():
    loop = Loop().run(31)  # the cut ran at step 30, then one optimizer step
    for name, module in loop.method.layers.items():
        removed = ~loop.method.rank_masks[name]
        U, s, V = factors(module)
        for param, entries in ((U, removed.expand_as(U)), (s, removed), (V, removed.expand_as(V))):
            assert bool(entries.any())
            assert torch.all(loop.optimizer.state[param]["momentum_buffer"][entries] == 0)


@pytest.mark.parametrize("regularizer, by_hand", [
    (Regularizer.l1, lambda s: s.abs().sum()),
    (Regularizer.hoyer_square, lambda s: s.abs().sum() ** 2 / (s ** 2).sum()),
])
def test_loss_term_adds_both_penalties_then_as_finetune_regularizers_says(regularizer, by_hand):
    loop = Loop(lambda_orthogonality=0.5, lambda_sparsity=0.2, regularizer=regularizer)
    loop.run(3)
    expected = sum(0.5 * orthogonality_penalty(U, V) + 0.2 * by_hand(s)
                   for U, s, V in (factors(m) for m in loop.method.layers.values()))
    assert loop.method.loss_term().item() == pytest.approx(expected.item(), rel=1e-6)
    loop.run(30, start=3)  # past the cut: the orthogonality of the kept vectors alone
    expected = 0.0
    for name, module in loop.method.layers.items():
        U, _, V = factors(module)
        keep = loop.method.rank_masks[name]
        expected += 0.5 * orthogonality_penalty(U[:, keep], V[:, keep])
    assert loop.method.loss_term().item() == pytest.approx(expected.item(), rel=1e-6)
    none = Loop(finetune_regularizers=FinetuneRegularizers.none).run(31)
    assert none.method.loss_term() is None
    both = Loop(finetune_regularizers=FinetuneRegularizers.both).run(31)
    assert both.method.regularizer_weights() == (1.0, 0.1)


def test_conv_layers_cut_spatially_keep_their_rank():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3))
    loop = Loop(model=model, sparsity=0.6, decomposition=Decomposition.spatial)
    loop.x, loop.y = torch.randn(16, 2, 4, 4), torch.randint(0, 3, (16,))
    loop.run(40)
    assert loop.method.shapes == {"2.weight": (18, 12), "4.weight": (18, 18)}
    for name, module in loop.method.layers.items():
        rank = int(torch.linalg.matrix_rank(to_matrix(module.weight.detach(), "spatial")))
        assert rank == loop.method.ranks()[name] < 12


def test_inference_flops_of_spatial_factors_are_what_the_two_convolutions_cost():
    """Spatially decomposed, each layer runs as a 1 x kw convolution (V) over every input row and a
    kh x 1 one (U) with the layer's stride and padding: built from the trained factors, the two
    give the layer's output, and torch's FLOP counter charges them what `inference_flop_densities`
    says, on a strided and an unpadded layer (where r(m + n) per output position undercounts)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3))
    loop = Loop(model=model, sparsity=0.6, decomposition=Decomposition.spatial)
    loop.x, loop.y = torch.randn(16, 2, 8, 8), torch.randint(0, 3, (16,))
    assert loop.method.inference_flop_densities((2, 8, 8)) == {"2.weight": 1.0, "4.weight": 1.0}  # before the cut
    loop.run(40)
    densities = loop.method.inference_flop_densities((2, 8, 8))
    parameters = loop.method.parameter_densities()
    dense_flops = layer_forward_flops(model, (2, 8, 8))
    inputs = {"2.weight": model[1](model[0](torch.randn(1, 2, 8, 8)))}
    inputs["4.weight"] = model[3](model[2](inputs["2.weight"]))
    for name, x in inputs.items():
        conv = loop.method.layers[name]
        out_channels, in_channels, kh, kw = conv.weight.shape
        U, s, V = (t.detach() for t in factors(conv))
        keep = loop.method.rank_masks[name]
        U, s, V = U[:, keep], s[keep], V[:, keep]
        rank = int(keep.sum())
        v_weight = V.T.reshape(rank, in_channels, 1, kw)
        u_weight = (U * s).reshape(out_channels, kh, rank).permute(0, 2, 1).unsqueeze(-1)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            middle = nn.functional.conv2d(x, v_weight, stride=(1, conv.stride[1]), padding=(0, conv.padding[1]))
            y = nn.functional.conv2d(middle, u_weight, conv.bias.detach(), stride=(conv.stride[0], 1),
                                     padding=(conv.padding[0], 0))
        assert torch.allclose(y, conv(x).detach(), atol=1e-5)
        assert counter.get_total_flops() == pytest.approx(densities[name] * dense_flops[name], rel=1e-9)
        assert densities[name] > parameters[name]  # the V factor's extra rows


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(1, 1, 1, stride=2), 8),  # a 1x1 downsampling shortcut: every other row
    (nn.Conv2d(1, 1, 3, stride=2, padding=1), 8),
    (nn.Conv2d(1, 1, 3), 6),
    (nn.Conv1d(1, 1, 5, stride=2, dilation=2, padding=3), 40),  # odd positions only
    (nn.Conv1d(1, 1, 3, padding="same", dilation=2), 19),
])
def test_rows_read_are_the_rows_whose_input_gradient_is_not_zero(conv, size):
    x = torch.zeros(1, 1, *([size] * (conv.weight.dim() - 2)), requires_grad=True)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    y = conv(x)
    y.sum().backward()
    touched = x.grad.reshape(size, -1).ne(0).any(1).sum().item() if x.dim() == 4 else x.grad.ne(0).sum().item()
    assert rows_read(conv, size, y.shape[2]) == touched


def test_method_state_resumes_the_cut():
    loop = Loop().run(35)
    resumed, _ = svd_method(mlp())
    resumed.load_state_dict(loop.method.state_dict())
    assert resumed.cut_done and resumed.energy == loop.method.energy
    assert all(torch.equal(resumed.rank_masks[n], m) for n, m in loop.method.rank_masks.items())
    assert resumed.ranks() == loop.method.ranks()


def measured_overhead(method, model) -> float:
    """FLOPs torch counts for forming every weight and the penalty, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        total = sum(m.weight.sum() for m in method.layers.values())
        penalty = method.loss_term()
        (total if penalty is None else total + penalty).backward()
    model.zero_grad()
    return counter.get_total_flops()


def test_step_overhead_is_what_torch_counts_before_and_after_the_cut():
    loop = Loop(cut=0.5)
    method = loop.method
    assert method.step_flops_overhead(0) == pytest.approx(measured_overhead(method, loop.model), rel=0.01)
    # a 12 x 16 and a 12 x 12 layer, full rank 12: 6 m n R + 6 R^2 (m + n) each
    assert method.shapes == {"2.weight": (12, 16), "4.weight": (12, 12)}
    assert method.step_flops_overhead(0) == (6 * 12 * 16 * 12 + 6 * 144 * 28) + (6 * 12 * 12 * 12 + 6 * 144 * 24)
    loop.run(21)  # past the cut at step 20: the penalty on the kept columns only
    r2, r4 = method.ranks()["2.weight"], method.ranks()["4.weight"]
    assert max(r2, r4) < 12
    assert method.step_flops_overhead(25) == (6 * 12 * 16 * 12 + 6 * r2 * r2 * 28) + (6 * 12 * 12 * 12 + 6 * r4 * r4 * 24)
    assert method.step_flops_overhead(25) == pytest.approx(measured_overhead(method, loop.model), rel=0.01)
    none, _ = svd_method(mlp(), cut=0.5, finetune_regularizers=FinetuneRegularizers.none)
    assert none.step_flops_overhead(25) == 6 * 12 * 16 * 12 + 6 * 12 * 12 * 12  # the weights are still formed


def test_plan_for_dry_runs():
    method, engine = svd_method(mlp(), total_steps=40, cut=0.75)
    assert method.mask_update_steps() == [30]
    assert method.schedule_value(29) == ("parameter_sparsity", 0.0)
    assert method.schedule_value(30) == ("parameter_sparsity", 0.8)
    assert all(method.densities_at(t) == {n: 1.0 for n in engine.names} for t in (0, 39))  # trained dense


# ------------------------------------------------------------------------------ the CLI
def only_run(root):
    (final,) = list(root.rglob("final.json"))
    return final.parent


def test_cli_run_reports_ranks_and_model_pt_loads_into_the_plain_model(tmp_path):
    args = ["train", "method=svd", "epochs=2", "dataset.num_samples=600", "progress=none", f"results_root={tmp_path}"]
    assert cli.main(args) == 0
    run = only_run(tmp_path)
    final = json.loads((run / "final.json").read_text())
    layers = final["svd"]["layers"]
    assert set(layers) == {"3.weight", "6.weight", "9.weight"}  # first conv and classifier dense
    step = max((info["shape"][0] + info["shape"][1]) / final["svd"]["dense_params"] for info in layers.values())
    assert 0.9 <= final["actual_sparsity"] < 0.9 + step
    for name, info in layers.items():
        assert info["shape"] == [64, 192] and info["full_rank"] == 64 and 1 <= info["rank"] < 64
        assert info["kept_params"] == info["rank"] * 256 and info["dense_params"] == 64 * 192
        assert final["layer_densities"][name] == pytest.approx(info["kept_params"] / info["dense_params"])
    assert final["svd"]["kept_params"] == sum(info["kept_params"] for info in layers.values())
    assert 0.0 < final["svd"]["energy"] <= 1.0 and final["svd"]["cut_step"] == 4  # round(0.5 x 8 steps)
    assert final["inference_flops"] < final["inference_flops_dense"]
    model = create_model("cnn1d_bn", tuple(final["input_shape"]), final["num_classes"])
    model.load_state_dict(torch.load(run / "model.pt"))  # strict: plain names only
    for name, info in layers.items():
        assert int(torch.linalg.matrix_rank(model.get_parameter(name).detach().reshape(64, -1))) == info["rank"]
    # dense low-rank weights are not sparse: export and bench refuse the run in one line
    for command in (["export", str(run)], ["bench", str(run)]):
        assert cli.main(command) == 2
    assert not (run / "export").exists()


def test_killed_run_resumes_after_the_cut_to_the_same_result(tmp_path, interrupted_then_resumed):
    args = ["train", "method=svd", "method.cut=0.4", "epochs=4", "dataset.num_samples=600", "progress=none"]
    assert cli.main([*args, f"results_root={tmp_path / 'whole'}"]) == 0
    # interrupted at its third checkpoint: epochs 1 and 2 saved, the cut (epoch 2) in the checkpoint
    killed = interrupted_then_resumed(args, tmp_path / "killed", 3)
    whole = only_run(tmp_path / "whole")
    a, b = torch.load(whole / "model.pt"), torch.load(killed / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (json.loads((p / "final.json").read_text()) for p in (whole, killed))
    for key in ("test_acc", "test_loss", "actual_sparsity", "layer_densities", "svd", "train_flops"):
        assert fa[key] == fb[key], key


@pytest.mark.parametrize("override, message", [
    ("method.lambda_sparsity=-0.1", "method.lambda_sparsity=-0.1: expected a weight >= 0"),
    ("method.lambda_orthogonality=-1", "method.lambda_orthogonality=-1.0: expected a weight >= 0"),
    ("method.cut=1.0", "method.cut=1.0: expected a fraction of training in (0, 1)"),
    ("method.regularizer=l2", "method.regularizer='l2': expected one of l1, hoyer, hoyer_square"),
    ("method.decomposition=tucker", "method.decomposition='tucker': expected one of channel, spatial"),
    ("distribution=erk", "distribution=erk: method svd allocates ranks by one energy threshold"),
    ("powerprop=2", "method=svd with powerprop: SVD training keeps each layer as U diag(s) V^T"),
    ("sparsity=0.99", "sparsity=0.99: method svd keeps at least rank 1 in every layer, 768 of 36864"),
    ("backend=sparse", "backend=sparse with method=svd"),
    ("epochs=1", "method.cut=0.5: with 1 training steps the cut falls at step 0"),
])
def test_bad_options_fail_in_one_line_and_write_nothing(tmp_path, capsys, override, message):
    extra = ["dataset.num_samples=100", "batch_size=128"] if override == "epochs=1" else []
    code = cli.main(["train", "method=svd", override, *extra, "progress=none", f"results_root={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_sweep_check_builds_it_on_the_meta_device():
    from sparsebench.config import validate
    from sparsebench.train import check_run

    cfg = validate(cli.resolve(cli.compose_config(["method=svd", "method.decomposition=spatial"])))
    check_run(cfg, {})
