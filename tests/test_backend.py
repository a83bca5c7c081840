"""`backend=sparse` (sparse/backend.py): the sparse layers compute what the masked layers compute,
the active-values optimizer step leaves what torch's dense step leaves, whole runs give the same
masks and metrics as `backend=masked`, and the per-layer decision is logged, stored and kept."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsebench import cli, results
from sparsebench.errors import UserError
from sparsebench.sparse import backend as sb
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.powerprop import apply_powerprop
from sparsebench.sparse.structure import UNSTRUCTURED, SparsityStructure, StructureKind
from trainer_step import trainer_step

# fp32: max |sparse - masked| <= TOL * max(1, max |masked|): summation order only (observed ~1e-6).
TOL = 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    scale = max(1.0, float(expected.abs().max()))
    return float((actual.double() - expected.double()).abs().max()) / scale


class Plan:
    """A stand-in layer for one Function call: keeps the compact weight gradient it is given."""

    def __init__(self, index, geometry, dense=False, compact=False, chunk=None):
        self.index, self.geometry, self.chunk = index, geometry, chunk
        self.grad = sb._Grad(dense=dense, compact=compact)
        self.taken = None

    def take(self, values, index):
        self.taken = values


LAYERS = {
    "linear": (lambda: nn.Linear(37, 23), (6, 37)),
    "linear-3d": (lambda: nn.Linear(37, 23), (2, 3, 37)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 5, padding=2, stride=2), (3, 6, 17)),
    "conv1d-same": (lambda: nn.Conv1d(6, 8, 4, padding="same", bias=False), (3, 6, 16)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1), (3, 6, 9, 7)),
    "conv2d-strided": (lambda: nn.Conv2d(6, 8, (3, 2), stride=2, padding=(1, 2), dilation=(1, 2)), (3, 6, 11, 10)),
}


BLOCK_LAYERS = {  # (out, in*k) matrices made of 8x8 blocks
    "linear": (lambda: nn.Linear(32, 24), (5, 32)),
    "conv1d": (lambda: nn.Conv1d(4, 8, 4, padding=2, stride=2), (3, 4, 17)),
    "conv2d": (lambda: nn.Conv2d(8, 16, 3, padding=1), (3, 8, 9, 7)),
}


def block_mask(shape: tuple[int, ...], block: int, density: float) -> torch.Tensor:
    rows, cols = shape[0], torch.Size(shape[1:]).numel()
    grid = torch.rand(rows // block, cols // block) < density
    grid[0, 0] = True  # never empty
    return grid.repeat_interleave(block, 0).repeat_interleave(block, 1).reshape(shape)


@pytest.mark.parametrize("mode", ["compact", "scatter", "dense"])
@pytest.mark.parametrize("fmt,kind", [*(("csr", k) for k in LAYERS), *(("bsr", k) for k in BLOCK_LAYERS)])
def test_function_matches_the_masked_layer(fmt, kind, mode):
    """Output, input gradient, weight gradient (active entries; every entry in dense mode) and bias
    gradient; CSR on random masks, BSR on 8x8 block masks (chunked products)."""
    torch.manual_seed(0)
    make, shape = (LAYERS if fmt == "csr" else BLOCK_LAYERS)[kind]
    module = make()
    mask = torch.rand(module.weight.shape) < 0.3 if fmt == "csr" else block_mask(module.weight.shape, 8, 0.4)
    with torch.no_grad():
        module.weight.mul_(mask)
    index = sb.SparseIndex(mask) if fmt == "csr" else sb.BlockIndex(mask, 8)
    geometry = None if isinstance(module, nn.Linear) else sb.ConvGeometry.of(module)
    plan = Plan(index, geometry, dense=mode == "dense", compact=mode == "compact", chunk=None if fmt == "csr" else 16)
    function = sb._SparseLinear if geometry is None else sb._SparseConv
    x = torch.randn(shape)
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    values = module.weight.detach().reshape(-1)[index.flat]
    ys = function.apply(xs, module.weight, module.bias, values, plan)
    ym = module(xm)
    grad_y = torch.randn_like(ym)
    inputs_s = [xs, module.weight] + ([module.bias] if module.bias is not None else [])
    inputs_m = [xm, module.weight] + ([module.bias] if module.bias is not None else [])
    gs = torch.autograd.grad(ys, inputs_s, grad_y, allow_unused=True)
    gm = torch.autograd.grad(ym, inputs_m, grad_y)
    assert ys.shape == ym.shape and rel_err(ys, ym) <= TOL
    assert rel_err(gs[0], gm[0]) <= TOL
    if mode == "dense":
        assert rel_err(gs[1], gm[1]) <= TOL  # every entry: what RigL's grow score reads
    elif mode == "scatter":
        assert rel_err(gs[1], gm[1] * mask) <= TOL and bool((gs[1][~mask] == 0).all())
    else:  # compact: no dense gradient at all, the active values handed to the layer
        assert gs[1] is None
        assert rel_err(plan.taken, gm[1].reshape(-1)[index.flat]) <= TOL
    if module.bias is not None:
        assert rel_err(gs[2], gm[2]) <= TOL


def test_block_index_holds_the_blocks_in_block_order():
    """The BSR operand is a view of the compact values; its transpose and the sampled gradient
    agree with the dense matrix; a mask that is not whole blocks gets CSR."""
    torch.manual_seed(0)
    mask = block_mask((24, 32), 8, 0.4)
    weight = torch.randn(24, 32) * mask
    index = sb.make_index(mask, sb.BSR, 8)
    assert isinstance(index, sb.BlockIndex) and index.nnz == int(mask.sum())
    values = weight.reshape(-1)[index.flat]
    first_row, first_col = divmod(int(index.flat[0]), 32)
    assert torch.equal(values[:64].view(8, 8), weight[first_row:first_row + 8, first_col:first_col + 8])
    matrix = index.matrix(values)
    assert matrix.layout == torch.sparse_bsr and matrix.values().data_ptr() == values.data_ptr()
    assert torch.equal(matrix.to_dense(), weight)
    assert torch.equal(index.transposed(values).to_dense(), weight.t())
    left, right = torch.randn(24, 5), torch.randn(5, 32)
    assert rel_err(index.sampled(left, right), (left @ right).reshape(-1)[index.flat]) <= TOL
    assert rel_err(index.scatter(values, weight), weight) == 0.0
    ragged = mask.clone()
    ragged[index.flat[0] // 32, index.flat[0] % 32] = False
    assert type(sb.make_index(ragged, sb.BSR, 8)) is sb.SparseIndex


def test_bsr_block_sides_each_device_takes():
    """MKL takes any side >= 2; torch's CUDA Triton kernel only powers of two >= 16 (others: CSR)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [sb.bsr_block(b, cpu) for b in (None, 1, 2, 8, 24)] == [None, None, 2, 8, 24]
    assert [sb.bsr_block(b, cuda) for b in (8, 16, 24, 32, 64)] == [None, 16, None, 32, 64]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("batch", [8, 5])  # 5 * L columns: not a multiple of the block (CUDA pads)
def test_functions_match_dense_on_each_device(device, fmt, kind, batch, monkeypatch):
    """The Functions against the dense layer on the same device, 32x32 blocks (a side torch's CUDA
    BSR kernel takes); what scripts/gpu_checks.sh runs on a GPU with -k cuda."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # dense convs in full fp32, as the sparse ones
    torch.manual_seed(0)
    module = (nn.Linear(128, 96) if kind == "linear" else nn.Conv2d(32, 64, 3, padding=1)).to(device)
    shape = (batch, 128) if kind == "linear" else (batch, 32, 5, 6)
    mask = block_mask(module.weight.shape, 32, 0.5).to(device)
    with torch.no_grad():
        module.weight.mul_(mask)
    index = sb.make_index(mask, fmt, 32)
    assert isinstance(index, sb.BlockIndex) == (fmt == "bsr")
    geometry = None if kind == "linear" else sb.ConvGeometry.of(module)
    plan = Plan(index, geometry, compact=True)
    function = sb._SparseLinear if geometry is None else sb._SparseConv
    x = torch.randn(shape, device=device)
    xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys = function.apply(xs, module.weight, module.bias, module.weight.detach().reshape(-1)[index.flat], plan)
    ym = module(xm)
    grad_y = torch.randn_like(ym)
    gs = torch.autograd.grad(ys, [xs, module.bias], grad_y)
    gm = torch.autograd.grad(ym, [xm, module.weight, module.bias], grad_y)
    assert ys.device.type == device and rel_err(ys, ym) <= TOL
    assert rel_err(gs[0], gm[0]) <= TOL and rel_err(gs[1], gm[2]) <= TOL
    assert rel_err(plan.taken, gm[1].reshape(-1)[index.flat]) <= TOL


def test_sparse_output_takes_an_inplace_relu():
    """The next layer's ReLU(inplace=True) modifies the Function's output (must not be a view)."""
    torch.manual_seed(0)
    module, mask = nn.Linear(8, 5), torch.rand(5, 8) < 0.5
    index = sb.SparseIndex(mask)
    x = torch.randn(4, 8, requires_grad=True)
    y = sb._SparseLinear.apply(x, module.weight, module.bias, module.weight.detach().reshape(-1)[index.flat],
                               Plan(index, None, compact=True))
    F.relu(y, inplace=True).sum().backward()
    assert x.grad is not None


def test_unsupported_convs_are_named():
    assert "groups=2" in sb.conv_problem(nn.Conv2d(4, 4, 3, groups=2))
    assert "padding_mode=reflect" in sb.conv_problem(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert "Conv3d" in sb.conv_problem(nn.Conv3d(2, 2, 3))
    assert sb.conv_problem(nn.Conv2d(4, 4, 3)) is None


# ------------------------------------------------------------------------------ whole models, in-process
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(inplace=True),
                         nn.Linear(32, 4))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, dampening=0.0),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05, amsgrad=True),
}


class Twin:
    """One model trained under one backend by the trainer's step order (hooks of a method elided)."""

    def __init__(self, make, make_optimizer, backend: bool, density=0.3, powerprop=1.0, dense_steps=(),
                 structure=UNSTRUCTURED):
        torch.manual_seed(0)
        self.model = make()
        self.engine = MaskedModel(self.model, structure=structure)
        if powerprop != 1.0:
            apply_powerprop(self.model, self.engine.names, powerprop)
            self.engine = MaskedModel(self.model)
        self.optimizer = make_optimizer(self.model.parameters())
        densities = self.engine.round_densities({n: density for n in self.engine.names})
        self.engine.set_masks(self.engine.random_masks(densities, torch.Generator().manual_seed(1)), densities,
                              self.optimizer)
        self.backend = sb.MaskedBackend()
        if backend:
            decisions = sb.decide(self.engine, densities, (), 0, torch.device("cpu"), sb.ALL)
            self.backend = sb.SparseBackend(self.engine, self.optimizer, decisions, lambda step: step in dense_steps)
        self.steps = 0

    def step(self, x, y) -> float:
        return trainer_step(self, x, y)

    def state(self) -> dict:
        self.backend.settle()
        out = {f"param:{n}": p.detach().clone() for n, p in self.model.named_parameters()}
        for p, s in self.optimizer.state.items():
            name = next(n for n, q in self.model.named_parameters() if q is p)
            out.update({f"{k}:{name}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
        return out


def assert_same(a: Twin, b: Twin) -> None:
    sa, sb_ = a.state(), b.state()
    assert sa.keys() == sb_.keys()
    for key in sa:
        assert rel_err(sb_[key], sa[key]) <= 1e-4, key  # a few steps of fp differences


def batches(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((16, *shape), generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_active_values_optimizer_step_leaves_what_the_dense_step_leaves(optimizer):
    """Parameters and the whole optimizer state, masked entries included, after steps, a dense-gradient
    step, a regrowth that keeps optimizer state (DPF, AC/DC reset_momentum=none) and one that resets it."""
    masked, sparse = (Twin(mlp, OPTIMIZERS[optimizer], backend, dense_steps={4}) for backend in (False, True))
    data = batches((12,), 12)
    for x, y in data[:6]:
        assert masked.step(x, y) == pytest.approx(sparse.step(x, y), rel=1e-5)
    # compact updates touched only active entries: masked weights are still exactly zero
    for t in sparse.engine.tensors.values():
        assert bool((t.param[~t.mask] == 0).all())
    for twin in (masked, sparse):  # grow everything back with the optimizer state kept, then re-prune
        names = twin.engine.names
        twin.engine.grow_dense(names, optimizer=None)
    for x, y in data[6:8]:
        masked.step(x, y), sparse.step(x, y)
    for twin in (masked, sparse):
        densities = {n: 0.25 for n in twin.engine.names}
        twin.engine.set_masks(twin.engine.magnitude_masks(densities), densities, twin.optimizer)
    for x, y in data[8:]:
        masked.step(x, y), sparse.step(x, y)
    assert_same(masked, sparse)
    assert masked.engine.masks().keys() == sparse.engine.masks().keys()
    assert all(torch.equal(masked.engine.masks()[n], sparse.engine.masks()[n]) for n in masked.engine.names)


def test_reset_optimizer_clears_the_compact_state_too():
    masked, sparse = (Twin(mlp, OPTIMIZERS["sgd"], backend) for backend in (False, True))
    data = batches((12,), 6)
    for i, (x, y) in enumerate(data):
        if i == 3:
            masked.optimizer.state.clear(), sparse.optimizer.state.clear()  # ctx.reset_optimizer
        masked.step(x, y), sparse.step(x, y)
    assert_same(masked, sparse)


def test_conv_model_and_powerprop_train_alike():
    for make, shape, powerprop in ((cnn, (2, 6, 6), 1.0), (mlp, (12,), 2.0)):
        masked, sparse = (Twin(make, OPTIMIZERS["sgd"], b, powerprop=powerprop, dense_steps={2}) for b in (False, True))
        for x, y in batches(shape, 5):
            assert masked.step(x, y) == pytest.approx(sparse.step(x, y), rel=1e-5)
        assert_same(masked, sparse)


BLOCKS_4 = SparsityStructure(StructureKind.block, block=4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_block_masks_train_on_bsr_as_under_masked(optimizer):
    """Block masks under `all` run on BSR, and steps (one with the dense gradient, a mask change
    between) leave the parameters and optimizer state the masked backend leaves."""
    masked = Twin(mlp, OPTIMIZERS[optimizer], False, structure=BLOCKS_4, dense_steps=(2,))
    sparse = Twin(mlp, OPTIMIZERS[optimizer], True, structure=BLOCKS_4, dense_steps=(2,))
    assert {(d.format, d.block) for d in sparse.backend.decisions.values()} == {("bsr", 4)}
    data = batches((12,), 5)
    for i, (x, y) in enumerate(data):
        if i == 3:  # a mask change: the compact state settles, the next index is built afresh
            for twin in (masked, sparse):
                densities = twin.engine.round_densities({n: 0.5 for n in twin.engine.names})
                twin.engine.set_masks(twin.engine.magnitude_masks(densities), densities, twin.optimizer)
        assert sparse.step(x, y) == pytest.approx(masked.step(x, y), rel=1e-5)
    assert all(isinstance(layer.index, sb.BlockIndex) for layer in sparse.backend.layers.values())
    assert_same(masked, sparse)


def test_measured_decisions_weigh_bsr_for_block_masks(monkeypatch):
    seen = []

    def fake_probe(module, shape, density, batch, device, **options):
        seen.append(options["block"])
        return 10.0, 4.0, None, "bsr"

    monkeypatch.setattr(sb, "probe", fake_probe)
    twin = Twin(mlp, OPTIMIZERS["sgd"], False, structure=BLOCKS_4)
    decisions = sb.decide(twin.engine, {}, (12,), 16, torch.device("cpu"), sb.MEASURED)
    assert seen and set(seen) == {4}
    assert all((d.path, d.format, d.block) == ("sparse", "bsr", 4) for d in decisions.values())
    assert "sparse (BSR 4x4) 4.00 ms vs masked 10.00 ms" in decisions["0.weight"].line("0.weight")
    # the real probe times both kernels on a block mask and names the faster one
    dense_ms, sparse_ms, _, fmt = sb.probe(nn.Linear(32, 32), (32,), 0.25, 16, torch.device("cpu"), block=8,
                                           repeats=1)
    assert fmt in ("csr", "bsr") and dense_ms > 0 and sparse_ms > 0


def test_bench_bsr_step_needs_block_masks():
    """`sparsebench bench`'s sparse_bsr step: the largest block side the masks are made of; masks
    that are not whole blocks get one line (shown as skipped), not a traceback."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    blocks = {"0.weight": block_mask((64, 64), 32, 0.5), "2.weight": block_mask((32, 64), 16, 0.5)}
    assert sb._mask_block(blocks) == 16
    assert sb._mask_block({"0.weight": torch.rand(64, 64) < 0.5}) is None
    with torch.no_grad():
        for name, mask in blocks.items():
            model.get_parameter(name).mul_(mask)
    step = sb.BENCH_TRAIN_BACKENDS["sparse_bsr"](model, blocks)
    step(torch.randn(8, 64), torch.randint(0, 32, (8,)))
    assert all(bool((model.get_parameter(n)[~m] == 0).all()) for n, m in blocks.items())  # still the masks
    with pytest.raises(UserError, match="whole blocks"):
        sb.BENCH_TRAIN_BACKENDS["sparse_bsr"](model, {"0.weight": torch.rand(64, 64) < 0.5})


def test_layers_run_sparse_only_while_sparse_enough():
    twin = Twin(mlp, OPTIMIZERS["sgd"], True)
    layer = next(iter(twin.backend.layers.values()))
    layer.decision.max_density = 0.5
    assert layer.on_sparse_path()  # density 0.3
    twin.engine.grow_dense([layer.name], twin.optimizer)
    assert not layer.on_sparse_path()  # dense now: the masked path
    layer.decision.max_density = 0.2
    densities = {layer.name: 0.3}
    twin.engine.set_masks(twin.engine.magnitude_masks(densities), densities, twin.optimizer)
    assert not layer.on_sparse_path()  # above its crossover


def test_remove_restores_the_layers():
    twin = Twin(mlp, OPTIMIZERS["sgd"], True)
    x, _ = batches((12,), 1)[0]
    before = twin.model(x)
    twin.backend.remove()
    assert all("forward" not in m.__dict__ for m in twin.model.modules())
    assert rel_err(twin.model(x), before) <= TOL


# ------------------------------------------------------------------------------ the CLI
def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(results.CONFIG_FILE))


MLP_RUN = ["train", "model=mlp", "model.hidden=[128,128,128]", "epochs=4", "dataset.num_samples=2000", "batch_size=64",
           "progress=none"]


def the_run(root: Path) -> tuple[Path, dict]:
    (run,) = run_dirs(root)
    return run, json.loads((run / results.FINAL_FILE).read_text())


BLOCKS_16 = ["distribution.structure=block", "distribution.block=16"]


@pytest.mark.slow
@pytest.mark.parametrize("method", [["method=static"], ["method=gmp", "method.frequency=10"],
                                    ["method=rigl", "method.delta_t=10"], ["method=gmp", "method.frequency=10", *BLOCKS_16],
                                    ["method=rigl", "method.delta_t=10", *BLOCKS_16]],
                         ids=lambda m: m[0].split("=")[1] + ("-bsr" if BLOCKS_16[0] in m else ""))
def test_same_run_under_both_backends_gives_the_same_masks_and_metrics(method, tmp_path):
    """A linear-heavy model with every prunable layer forced onto the sparse path (BSR kernels
    for block masks: RigL's dense-gradient steps and GMP's pruning rounds go through them too)."""
    for backend in ("masked", "sparse"):
        args = [*MLP_RUN, *method, f"backend={backend}", "backend_layers=all", f"results_root={tmp_path / backend}"]
        assert cli.main(args) == 0
    (ra, fa), (rb, fb) = the_run(tmp_path / "masked"), the_run(tmp_path / "sparse")
    assert fa["backend"] == "masked" and fb["backend"] == "sparse"
    assert fb["sparse_layers"] == ["3.weight", "5.weight"]
    expected_kernel = ("bsr", 16) if BLOCKS_16[0] in method else ("csr", None)
    assert {(d["format"], d["block"]) for d in fb["backend_decisions"].values() if d["path"] == "sparse"} == {
        expected_kernel}
    assert fa["layer_densities"] == fb["layer_densities"] and fa["actual_sparsity"] == fb["actual_sparsity"]
    assert fa["itop_rate"] == fb["itop_rate"] and fa["train_flops"] == fb["train_flops"]
    assert results.read_jsonl(ra / results.MASK_UPDATES_FILE) == results.read_jsonl(rb / results.MASK_UPDATES_FILE)
    if method[0] != "method=static":
        assert results.read_jsonl(ra / results.MASK_UPDATES_FILE)  # masks did change
    ma, mb = torch.load(ra / results.MODEL_FILE), torch.load(rb / results.MODEL_FILE)
    assert all(torch.equal(ma[k] == 0, mb[k] == 0) for k in ma)  # the same zero pattern
    assert all(rel_err(mb[k], ma[k]) <= 1e-4 for k in ma)
    one_example = 100.0 / 400  # 2000 samples, 400 held out for testing
    for a, b in zip(results.read_jsonl(ra / results.METRICS_FILE), results.read_jsonl(rb / results.METRICS_FILE)):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
        assert abs(b["test_acc"] - a["test_acc"]) <= one_example + 1e-9
        assert b["weights_changed"] == a["weights_changed"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_decisions_are_logged_stored_and_kept_on_resume(fmt, tmp_path, monkeypatch, capsys, interrupt_at_checkpoint):
    # Timing is machine noise: fixed measurements make the decisions (and this test) deterministic.
    monkeypatch.setattr(sb, "probe", lambda module, shape, density, batch, device, **_: (10.0, 4.0, None, fmt))
    args = [*MLP_RUN, "epochs=3", "method=gmp", "method.frequency=10", "backend=sparse", "backend_layers=measured",
            *(BLOCKS_16 if fmt == "bsr" else [])]
    assert cli.main([*args, f"results_root={tmp_path / 'whole'}"]) == 0
    out = capsys.readouterr().out
    kernel = "BSR 16x16" if fmt == "bsr" else "CSR"
    density = 7 / 64 if fmt == "bsr" else 0.1  # 128x128 in 16x16 blocks: 7 of 64 blocks is the count for 0.1
    for name in ("3.weight", "5.weight"):  # sparse while density <= final density * 10 / 4
        assert (f"backend sparse: {name}: final density {density:.4f}: sparse ({kernel}) 4.00 ms vs masked "
                "10.00 ms") in out
        assert f"-> sparse path while density <= {density * 2.5:.4f}" in out
    whole, final = the_run(tmp_path / "whole")
    assert final["backend"] == "sparse" and final["backend_layers"] == "measured"
    assert final["sparse_layers"] == ["3.weight", "5.weight"]
    assert final["backend_decisions"]["3.weight"]["max_density"] == pytest.approx(density * 2.5)
    assert final["backend_decisions"]["3.weight"]["format"] == fmt

    interrupt = interrupt_at_checkpoint(2)
    try:
        assert cli.main([*args, f"results_root={tmp_path / 'killed'}"]) != 0  # interrupted after epoch 2's metrics
    except KeyboardInterrupt:
        pass
    interrupt.remove()
    (killed,) = run_dirs(tmp_path / "killed")
    assert not (killed / results.FINAL_FILE).exists() and (killed / results.CHECKPOINT_FILE).exists()

    def no_measuring(*_, **__):
        raise AssertionError("a resumed run must not measure again")

    monkeypatch.setattr(sb, "probe", no_measuring)
    capsys.readouterr()
    assert cli.main([*args, f"results_root={tmp_path / 'killed'}"]) == 0
    assert "backend sparse: resumed with 2 of 2 prunable layers on the sparse path" in capsys.readouterr().out
    killed, resumed = the_run(tmp_path / "killed")
    for key in ("test_acc", "best_test_acc", "test_loss", "actual_sparsity", "itop_rate", "train_flops",
                "layer_densities", "backend_decisions", "sparse_layers"):
        assert resumed[key] == final[key], key
    sa, sb_ = torch.load(whole / results.MODEL_FILE), torch.load(killed / results.MODEL_FILE)
    assert all(torch.equal(sa[k], sb_[k]) for k in sa)  # bit-identical to the uninterrupted run


def test_the_backend_is_part_of_the_run_directory():
    """Masked and sparse runs of one config agree only within fp tolerance: two directories."""
    resolved = {"sparsity": 0.9, "seed": 0, "results_root": "r", "exp": "e", "method": {"name": "gmp"},
                "model": {"name": "mlp"}, "dataset": {"name": "mnist1d"}, "backend_layers": "measured"}
    assert results.run_dir({**resolved, "backend": "masked"}) != results.run_dir({**resolved, "backend": "sparse"})


BAD_BACKEND = {
    ("backend=fast",): "backend='fast': expected one of masked, sparse",
    ("backend=sparse", "backend_layers=some"): "backend_layers='some': expected one of measured, all",
    ("backend=sparse", "distribution.structure=nm", "sparsity=0.5", "method=static", "device=cpu"):
        "backend=sparse with distribution.structure=nm: 2:4 sparse kernels need CUDA",
}


@pytest.mark.parametrize("overrides", list(BAD_BACKEND), ids=lambda o: o[-1] if len(o) < 3 else "nm-on-cpu")
def test_bad_backend_values_are_one_line_before_any_directory(overrides, tmp_path, capsys):
    code = cli.main(["train", *overrides, f"results_root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and BAD_BACKEND[overrides] in err, err
    assert not any(tmp_path.iterdir())
