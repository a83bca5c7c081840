"""Structured sparsity (`distribution.structure=nm|block`): hand-computed masks, every supporting
method's masks after every step, the refusals, and one run end to end."""
import pytest
import torch
from torch import nn

from sparsebench import cli
from sparsebench.errors import UserError
from sparsebench.methods import METHODS, SparsityTarget, StepContext, finish_step
from sparsebench.methods.set import SETProtocol
from sparsebench.sparse.masked import MaskedModel, MaskInvariantError, target_nnz
from sparsebench.sparse.structure import SparsityStructure, StructureKind

NM = SparsityStructure(StructureKind.nm, n=2, m=4)
BLOCK = SparsityStructure(StructureKind.block, block=4)
SUPPORTING = ["cigl", "dstee", "static", "gmp", "rigl", "set"]


def mlp() -> nn.Module:  # sparse tensors 16x16: rows of 16 (four 2:4 groups), 4x4 blocks of side 4
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def cnn() -> nn.Module:  # sparse convs (8, 8, 3): the matrix 8 x 24 (six groups a row, 2 x 6 blocks)
    return nn.Sequential(nn.Conv1d(5, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 3))


def group_counts(mask: torch.Tensor, m: int = 4) -> torch.Tensor:
    """Active entries per group of m consecutive entries of a row of the (out, in*k) matrix."""
    rows = mask.reshape(mask.shape[0], -1)
    return rows.reshape(rows.shape[0], -1, m).sum(-1)


def block_sums(mask: torch.Tensor, b: int) -> torch.Tensor:
    rows = mask.reshape(mask.shape[0], -1).int()
    r, c = rows.shape
    return rows.reshape(r // b, b, c // b, b).sum((1, 3))


def assert_structured(engine: MaskedModel) -> None:
    s = engine.structure
    for name, t in engine.tensors.items():
        nnz = int(t.mask.sum())
        assert nnz == target_nnz(t.numel, t.density), name
        assert torch.all(t.param[~t.mask] == 0), name
        if s.kind is StructureKind.nm:
            counts = group_counts(t.mask, s.m)
            assert torch.all(counts == counts.flatten()[0]), name  # the same n in every group
            assert nnz == counts.numel() * int(counts.flatten()[0]), name
        elif s.kind is StructureKind.block:
            sums = block_sums(t.mask, s.block)
            assert torch.all((sums == 0) | (sums == s.block**2)), name  # whole blocks only
            blocks = sums.numel()
            rounded_density = target_nnz(blocks, t.density) / blocks  # block rounding is idempotent
            assert int((sums > 0).sum()) == target_nnz(blocks, rounded_density), name


class Loop:
    """The trainer's step order (as tests/test_methods.py's Harness) on a structured engine."""

    def __init__(self, method, sparsity, structure, options=None, model=None, total_steps=40, steps_per_epoch=10):
        torch.manual_seed(0)
        self.model = (model or mlp)()
        self.engine = MaskedModel(self.model, dense_first=True, dense_last=True, structure=structure)
        densities = {n: 1.0 - sparsity for n in self.engine.names}
        cls = METHODS.get(method)
        self.method = cls(cls.Options(**(options or {})), self.engine, SparsityTarget(sparsity, "uniform", densities),
                          total_steps, steps_per_epoch, torch.Generator().manual_seed(1))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        self.ctx = StepContext(0, total_steps, steps_per_epoch, self.optimizer, lambda: None, lambda n: None,
                               lambda m: None)
        in_features = 5
        shape = (64, in_features) if model in (None, mlp) else (64, in_features, 6)
        self.x, self.y = torch.randn(*shape), torch.randint(0, 3, (64,))
        self.total_steps = total_steps

    def run(self):
        """Runs every step; returns the masks seen after each step (invariants checked each time)."""
        self.method.start(self.ctx)
        assert_structured(self.engine)
        history = [self.engine.masks()]
        for step in range(self.total_steps):
            self.ctx.step = step
            self.method.before_step(self.ctx)
            self.optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(self.x), self.y).backward()
            finish_step(self.method, self.engine, self.ctx, self.optimizer.step)
            assert_structured(self.engine)
            history.append(self.engine.masks())
        return history


# ------------------------------------------------------------------------------ by hand
def test_nm_topk_keeps_the_two_largest_of_each_group():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 3.0, 1.0, 2.0, 0.0],
                           [-1.0, -2.0, 4.0, 4.5, 0.3, 0.2, 0.1, 0.4]])
    expected = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 0],
                             [0, 0, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(NM.topk(scores, 0.5), expected)
    # A conv weight (out=2, in=2, k=2) is the matrix (2, in*k=4): one group per row, in order (in, k).
    conv = torch.tensor([[[5.0, 1.0], [2.0, 7.0]], [[0.0, 3.0], [1.0, 2.0]]])
    assert torch.equal(NM.topk(conv, 0.5), torch.tensor([[[1, 0], [0, 1]], [[0, 1], [0, 1]]], dtype=torch.bool))
    # GMP's intermediate level 3:4 keeps the three largest of every group.
    assert torch.equal(NM.topk(scores, 0.75).sum(1), torch.tensor([6, 6]))
    with pytest.raises(ValueError):
        NM.topk(scores, 0.4)  # not a whole number per group: the caller must round first


def test_block_topk_keeps_whole_blocks_with_the_largest_sums():
    s = SparsityStructure(StructureKind.block, block=2)
    scores = torch.tensor([[1.0, 1.0, 0.0, 9.0],
                           [1.0, 1.0, 0.0, 0.0],
                           [0.5, 0.5, 2.0, 2.0],
                           [0.5, 0.5, 0.0, 0.1]])  # block sums: [[4, 9], [2, 4.1]]
    mask = s.topk(scores, 0.5)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(s.topk(scores, 0.25), torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]],
                                                          dtype=torch.bool))


def test_round_density_gives_exact_structured_counts():
    # N:M: the level n/M at or above the density (s_t rounded down to a multiple of 1/M).
    assert [NM.round_density((16, 16), d) for d in (1.0, 0.9, 0.75, 0.6, 0.5)] == [1.0, 1.0, 0.75, 0.75, 0.5]
    # Blocks: 16 blocks of 4x4 in a 16x16 matrix; density 0.1 keeps target_nnz(16, 0.1) = 2 blocks.
    assert BLOCK.round_density((16, 16), 0.1) == 2 * 16 / 256
    for shape, d in [((64, 64, 3), 0.1), ((64, 64, 3), 0.37), ((8, 8, 3), 0.5), ((16, 16), 0.9)]:
        for s in (NM, BLOCK):
            rounded = s.round_density(shape, d)
            numel = torch.Size(shape).numel()
            assert target_nnz(numel, rounded) % s.unit_size == 0
            assert s.round_density(shape, rounded) == rounded  # idempotent
            assert rounded >= d - 1e-12


def test_engine_refuses_a_non_structured_mask_and_a_ragged_tensor():
    engine = MaskedModel(mlp(), dense_first=True, dense_last=True, structure=NM)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :8] = True  # 128 entries = density 0.5, but groups hold 4, 4, 0, 0
    with pytest.raises(MaskInvariantError, match="2:4"):
        engine.set_mask("2.weight", mask, 0.5)
    with pytest.raises(ValueError, match=r"tensor 0\.weight .* rows of 5 weights"):
        MaskedModel(mlp(), structure=NM)  # the first Linear(5, 16) is no longer kept dense
    with pytest.raises(ValueError, match=r"tensor 0\.weight .*distribution\.block=4"):
        MaskedModel(mlp(), structure=BLOCK)


# ------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("model", [mlp, cnn])
def test_static_draws_random_structured_masks(model):
    nm_loop = Loop("static", 0.5, NM, model=model)
    history = nm_loop.run()
    for name, mask in history[0].items():
        assert torch.all(group_counts(mask) == 2), name
        assert all(torch.equal(mask, h[name]) for h in history)  # never changes
    block_loop = Loop("static", 0.9, BLOCK, model=model)
    block_loop.run()
    for name, t in block_loop.engine.tensors.items():
        blocks = block_sums(t.mask, 4).numel()
        assert int((block_sums(t.mask, 4) > 0).sum()) == target_nnz(blocks, 0.1), name


def test_gmp_nm_passes_through_the_levels_to_2_4():
    loop = Loop("gmp", 0.5, NM, {"begin": 0.1, "end": 0.6, "frequency": 2}, total_steps=40)
    history = loop.run()
    levels = []
    for masks in history:
        counts = group_counts(masks["2.weight"])
        assert torch.all(counts == counts[0, 0])
        levels.append(int(counts[0, 0]))
    assert levels[0] == 4 and levels[-1] == 2  # dense, then 3:4, then 2:4
    assert 3 in levels and levels == sorted(levels, reverse=True)
    for before, after in zip(history, history[1:]):  # pruned entries never come back
        for name in before:
            assert not torch.any(after[name] & ~before[name])
    # the level at each event is s_t rounded down to a multiple of 1/4
    method = loop.method
    for t in method.mask_update_steps():
        expected = target_nnz(4, 1.0 - method.sparsity_at(t))
        assert int(group_counts(history[t + 1]["2.weight"])[0, 0]) == expected, t
    assert method.densities_at(39) == {n: 0.5 for n in loop.engine.names}


@pytest.mark.parametrize("model", [mlp, cnn])
def test_gmp_block_prunes_whole_blocks_on_the_cubic_schedule(model):
    loop = Loop("gmp", 0.8, BLOCK, {"begin": 0.1, "end": 0.6, "frequency": 2}, model=model, total_steps=40)
    history = loop.run()  # whole blocks and exact block counts after every step
    method = loop.method
    name = loop.engine.names[0]
    blocks = block_sums(history[0][name], 4).numel()
    for t in method.mask_update_steps():
        expected = target_nnz(blocks, 1.0 - method.sparsity_at(t))
        assert int((block_sums(history[t + 1][name], 4) > 0).sum()) == expected, t
    assert int((block_sums(history[-1][name], 4) > 0).sum()) == target_nnz(blocks, 0.2)


DST_CASES = [
    ("rigl", {"delta_t": 5, "alpha": 0.5}),
    ("set", {"protocol": SETProtocol.rigl, "delta_t": 5, "alpha": 0.5}),
    ("set", {"zeta": 0.5}),  # original protocol: once per epoch, sign split (nm) / blocks
]


@pytest.mark.parametrize("method,options", DST_CASES)
@pytest.mark.parametrize("model", [mlp, cnn])
def test_dst_nm_drops_and_grows_inside_each_group(method, options, model):
    loop = Loop(method, 0.5, NM, options, model=model)
    history = loop.run()  # every group holds exactly 2 after every step (assert_structured)
    for masks in history:
        for name, mask in masks.items():
            assert torch.all(group_counts(mask) == 2), name
    changed = sum(int((history[t + 1][n] != history[t][n]).sum()) for t in loop.method.mask_update_steps()
                  for n in history[t])
    assert changed > 0  # the masks did move
    moved_at = {t for t in range(len(history) - 1) if any(not torch.equal(history[t + 1][n], history[t][n])
                                                          for n in history[t])}
    assert moved_at <= set(loop.method.mask_update_steps())


@pytest.mark.parametrize("method,options", DST_CASES)
@pytest.mark.parametrize("model", [mlp, cnn])
def test_dst_block_drops_and_grows_whole_blocks(method, options, model):
    loop = Loop(method, 0.5, BLOCK, options, model=model)
    history = loop.run()  # whole blocks, exact block count after every step (assert_structured)
    name = loop.engine.names[0]
    blocks = block_sums(history[0][name], 4).numel()
    for masks in history:
        assert int((block_sums(masks[name], 4) > 0).sum()) == target_nnz(blocks, 0.5)
    assert any(not torch.equal(history[t + 1][name], history[t][name]) for t in loop.method.mask_update_steps())


def test_rigl_nm_regrows_in_the_group_that_lost_by_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(8, 1, bias=False)
    engine = MaskedModel(layer, structure=NM)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    engine.set_mask("weight", mask, 0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.001, 0.5, 0.0, 0.0, 0.4, 0.6, 0.0, 0.0]]))
    cls = METHODS.get("rigl")
    rigl = cls(cls.Options(alpha=0.3, delta_t=1), engine, SparsityTarget(0.5, "uniform", {"weight": 0.5}), 10, 10,
               torch.Generator().manual_seed(0))
    # drop k = floor(0.3 * 4) = 1: the smallest |W| (position 0, group 0). The largest gradient is
    # at position 6 (group 1), but group 0 must regrow its own: position 3 beats 2 and 0.
    rigl._dense_grads = {"weight": torch.tensor([[0.0, 0.0, 0.2, 0.3, 0.0, 0.0, 9.0, 0.0]])}
    rigl.update_masks(step=1, optimizer=None)
    assert torch.equal(engine.tensors["weight"].mask, torch.tensor([[0, 1, 0, 1, 1, 1, 0, 0]], dtype=torch.bool))


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("method", sorted(set(METHODS.names()) - set(SUPPORTING)))
def test_methods_that_cannot_keep_a_structure_refuse_it(method):
    engine = MaskedModel(mlp(), dense_first=True, dense_last=True, structure=NM)
    cls = METHODS.get(method)
    with pytest.raises(UserError, match="distribution.structure=nm") as info:
        cls(cls.Options(), engine, SparsityTarget(0.5, "uniform", {n: 0.5 for n in engine.names}), 60, 10,
            torch.Generator().manual_seed(0))
    assert "\n" not in str(info.value)


BAD_STRUCTURES = {
    ("distribution.structure=nm", "sparsity=0.9", "method=static"):
        "distribution.structure=nm with n=2, m=4 fixes sparsity at 0.5; got sparsity=0.9",
    ("distribution.structure=nm", "sparsity=0.5", "method=gap"):
        "distribution.structure=nm is kept only by methods cigl, dstee, gmp, rigl, set, static; method gap cannot keep it",
    ("distribution.structure=block", "method=magnitude"):
        "distribution.structure=block is kept only by methods",
    ("distribution.structure=nm", "sparsity=0.5", "method=rigl", "distribution=erk"):
        "distribution.structure=nm puts every sparse tensor at density n/m=0.5, so it needs distribution=uniform",
    ("distribution.structure=nm", "distribution.n=4", "sparsity=0.0", "method=static"):
        "distribution.n=4, distribution.m=4: structure=nm needs 1 <= n < m",
    ("distribution.structure=block", "distribution.block=0", "method=static"):
        "distribution.block=0: expected a positive block side",
    ("distribution.structure=diagonal", "method=static"):
        "distribution.structure='diagonal': expected one of unstructured, nm, block",
}


@pytest.mark.parametrize("overrides", list(BAD_STRUCTURES))
def test_bad_structure_config_is_one_line(overrides, tmp_path, capsys):
    code = cli.main(["train", *overrides, f"results_root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and BAD_STRUCTURES[overrides] in err, err
    assert not any(tmp_path.iterdir())


def test_ragged_tensor_is_one_line_naming_it(tmp_path, capsys):
    # cnn1d's sparse convs are (64, 64, 3): rows of 192 weights, not a multiple of m=5.
    args = ["train", "model=cnn1d", "method=static", "distribution.structure=nm", "distribution.n=4", "distribution.m=5",
            "sparsity=0.2", "dataset.num_samples=600", "progress=none", f"results_root={tmp_path}"]
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "tensor 2.weight" in err and "distribution.m" in err and "not a multiple of 5" in err, err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ end to end
def test_static_2_4_run_writes_a_2_4_model(tmp_path):
    args = ["train", "model=cnn1d", "method=static", "distribution.structure=nm", "sparsity=0.5", "epochs=1",
            "dataset.num_samples=600", "progress=none", f"results_root={tmp_path}"]
    assert cli.main(args) == 0
    (model_file,) = tmp_path.rglob("model.pt")
    state = torch.load(model_file, map_location="cpu")
    for name in ("2.weight", "4.weight", "6.weight"):  # cnn1d's prunable convs, (64, 64, 3)
        w = state[name]
        assert w.shape == (64, 64, 3)
        nonzero = group_counts(w != 0)  # the (64, 192) matrix in groups of 4 along in*k
        assert torch.all(nonzero <= 2), name
        assert int(nonzero.sum()) >= 0.99 * w.numel() / 2, name  # 2:4 exactly, up to weights that are 0.0
    assert int((state["0.weight"] != 0).sum()) == state["0.weight"].numel()  # dense_first
