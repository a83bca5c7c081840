"""The 2:4 path of `backend=sparse` (sparse/two_four.py): N:M-masked Linear layers whose 16-bit
training forward goes through torch's 2:4 kernels train as under `backend=masked`.

torch's 2:4 kernels run only on CUDA GPUs of compute capability 8.0+. On the CPU the tests swap
the one seam, `two_four.compress`, for a stand-in that checks the 2:4 pattern and keeps the matrix
in the device-independent 2:4 storage (`kernels.pack_2_4`), round-tripped, under CPU bfloat16
autocast: everything but the kernel is the real path. On a CUDA GPU (scripts/gpu_checks.sh runs
`-k cuda`) the same tests run the real kernels under float16 autocast."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.sparse import backend as sb
from sparsebench.sparse import two_four
from sparsebench.sparse import kernels as sk
from sparsebench.sparse.kernels import (
    SparseFormatError,
    count_nm_violations,
    pack_2_4,
    semi_structured_device_problem,
    unpack_2_4,
)
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.structure import SparsityStructure, StructureKind
from trainer_step import trainer_step

TWO_OF_FOUR = SparsityStructure(StructureKind.nm, 2, 4)
CUDA_PROBLEM = semi_structured_device_problem("cuda")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(bool(CUDA_PROBLEM), reason=str(CUDA_PROBLEM)))]


def stand_in_compress(weight_16: torch.Tensor) -> torch.Tensor:
    """What the CPU can do of `to_semi_structured`: refuse a non-2:4 matrix, keep 2 of every 4."""
    assert count_nm_violations(weight_16, 2, 4) == 0, "a matrix that is not 2:4 reached the 2:4 kernel"
    return unpack_2_4(*pack_2_4(weight_16))


@pytest.fixture
def kernels(request, monkeypatch):
    """The device, with the compression the tests count (the stand-in on the CPU)."""
    device = torch.device(request.param)
    real = stand_in_compress if device.type == "cpu" else two_four.compress
    calls = []

    def counted(weight_16):
        calls.append(weight_16.shape)
        return real(weight_16)

    monkeypatch.setattr(two_four, "compress", counted)
    return device, calls


def mlp() -> nn.Module:
    # 64x64 weights: shapes both torch 2:4 backends take; the 4x64 classifier is too few rows. The
    # in-place ReLUs are the registry's: they modify the 2:4 layers' outputs in place.
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 64), nn.ReLU(inplace=True),
                         nn.Linear(64, 4))


class Twin:
    """One model trained under autocast by the trainer's step order, on one backend."""

    def __init__(self, device: torch.device, sparse: bool, density: float = 0.5):
        torch.manual_seed(0)
        self.device = device
        self.model = mlp().to(device)
        self.engine = MaskedModel(self.model, structure=TWO_OF_FOUR)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.set_density(density)
        self.backend = sb.MaskedBackend()
        if sparse:
            decisions = sb.decide(self.engine, {n: 0.5 for n in self.engine.names}, (), 0, device, sb.ALL)
            self.backend = sb.SparseBackend(self.engine, self.optimizer, decisions, lambda step: False, amp=True)
        self.steps = 0

    def set_density(self, density: float) -> None:
        densities = self.engine.round_densities({n: density for n in self.engine.names})
        self.engine.set_masks(self.engine.magnitude_masks(densities), densities, self.optimizer)

    def step(self, x, y) -> float:
        return trainer_step(self, x, y, autocast=True)


def batches(device, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 64, generator=g).to(device), torch.randint(0, 4, (16,), generator=g).to(device))
            for _ in range(n)]


@pytest.mark.parametrize("kernels", DEVICES, indirect=True)
def test_two_four_layers_train_as_under_masked(kernels):
    """Same losses, weights and momentum as the masked backend under the same autocast; one
    compression per layer per step (the weight changes every step), none for a float32 forward."""
    device, calls = kernels
    masked, sparse = Twin(device, False), Twin(device, True)
    chosen = [n for n, d in sparse.backend.decisions.items() if d.path == sb.SPARSE]
    assert chosen == ["0.weight", "2.weight"]  # the classifier's 4 rows are too few for the kernels
    assert "multiple of" in sparse.backend.decisions["4.weight"].reason
    # bfloat16 on the CPU, float16 on CUDA: summation order may differ from the dense kernel's
    tol = 0.0 if device.type == "cpu" else 2e-2
    for i, (x, y) in enumerate(batches(device, 6)):
        assert sparse.step(x, y) == pytest.approx(masked.step(x, y), rel=tol, abs=tol)
        assert len(calls) == 2 * (i + 1)
    for name, p in masked.model.named_parameters():
        q = sparse.model.get_parameter(name)
        assert torch.allclose(q, p, rtol=tol, atol=tol), name
        assert torch.allclose(sparse.optimizer.state[q]["momentum_buffer"],
                              masked.optimizer.state[p]["momentum_buffer"], rtol=tol, atol=tol), name
    for name, mask in masked.engine.masks().items():
        assert torch.equal(sparse.engine.masks()[name], mask)
        assert bool((sparse.model.get_parameter(name)[~mask] == 0).all())
    with torch.no_grad():  # evaluation in float32: the layers' own dense forward
        sparse.model(batches(device, 1)[0][0])
    assert len(calls) == 12


@pytest.mark.parametrize("kernels", ["cpu"], indirect=True)
def test_levels_above_two_of_four_stay_dense(kernels):
    """GMP passes 3:4 on its way to 2:4: a 3:4 mask never reaches the 2:4 kernel."""
    device, calls = kernels
    twin = Twin(device, True, density=0.75)
    x, y = batches(device, 1)[0]
    twin.step(x, y)
    assert calls == []
    assert count_nm_violations(twin.model[0].weight, 2, 4) > 0  # 3:4 indeed
    twin.set_density(0.5)
    twin.step(x, y)
    assert len(calls) == 2


def test_decisions_name_why_a_layer_stays_masked():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4), nn.Conv1d(4, 32, 1), nn.Flatten(), nn.Linear(64, 64))
    engine = MaskedModel(model, structure=TWO_OF_FOUR)
    decisions = sb.decide(engine, {n: 0.5 for n in engine.names}, (), 0, torch.device("cpu"), sb.ALL)
    assert decisions["0.weight"].path == sb.SPARSE and decisions["0.weight"].format == two_four.TWO_FOUR
    assert decisions["0.weight"].max_density == 0.5
    assert decisions["1.weight"].path == sb.MASKED and "multiple of" in decisions["1.weight"].reason
    assert decisions["2.weight"].path == sb.MASKED and "Linear layers only" in decisions["2.weight"].reason
    eight = MaskedModel(nn.Sequential(nn.Linear(64, 64)), structure=SparsityStructure(StructureKind.nm, 4, 8))
    decision = sb.decide(eight, {"0.weight": 0.5}, (), 0, torch.device("cpu"), sb.ALL)["0.weight"]
    assert decision.path == sb.MASKED and "at most 2" in decision.reason


@pytest.mark.parametrize("kernels", DEVICES, indirect=True)
def test_measured_decisions_time_the_two_four_step(kernels):
    device, calls = kernels
    engine = MaskedModel(nn.Sequential(nn.Linear(64, 64)).to(device), structure=TWO_OF_FOUR)
    decision = sb.decide(engine, {"0.weight": 0.5}, (64,), 32, device, sb.MEASURED)["0.weight"]
    assert decision.format == two_four.TWO_FOUR and decision.sparse_ms > 0 and decision.dense_ms > 0
    assert "sparse (2:4)" in decision.line("0.weight")
    assert calls  # the compression is part of what was timed
    assert decision.max_density == (0.5 if decision.path == sb.SPARSE else 0.0)


def test_nm_levels_two_four_kernels_take():
    assert two_four.nm_problem(2, 4) is None and two_four.nm_problem(1, 4) is None and two_four.nm_problem(2, 8) is None
    assert "multiple of 4" in two_four.nm_problem(1, 3)
    assert "at most 2" in two_four.nm_problem(3, 4)
    assert two_four.max_density(8) == 0.25


def two_four_weight(rows=64, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    mask = TWO_OF_FOUR.topk(weight.abs(), 0.5)
    return (weight * mask).requires_grad_(), mask


@pytest.mark.parametrize("kernels", ["cpu"], indirect=True)
@pytest.mark.parametrize("lead", [(5,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_function_equals_autocast_linear(kernels, lead, bias):
    """Outputs and all three gradients equal autocast's F.linear, for an odd batch, a 3-D input,
    with and without bias, and with the output then modified in place (a view would be refused)."""
    weight, mask = two_four_weight()
    b = torch.randn(64).requires_grad_() if bias else None
    x = torch.randn(*lead, 64).requires_grad_()
    grads = []
    for forward in (lambda: F.linear(x, weight, b),
                    lambda: two_four.forward(x, weight, b, weight, mask, two_four.CompressedWeight(), None)):
        x.grad = weight.grad = None
        if b is not None:
            b.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = nn.functional.relu(forward(), inplace=True)
        y.float().square().sum().backward()
        grads.append((y.detach().clone(), x.grad, weight.grad, None if b is None else b.grad))
    assert grads[1][0].shape == (*lead, 64) and grads[1][0].dtype == torch.bfloat16
    for dense, sparse in zip(*grads):
        assert (dense is None) == (sparse is None)
        if dense is not None:
            assert torch.equal(sparse, dense)


def test_forward_multiplies_the_compressed_operand(monkeypatch):
    """The forward's product is with what `compress` returned, not with the dense copy: a stand-in
    returning zeros leaves only the bias, while the input gradient still uses the dense weight."""
    monkeypatch.setattr(two_four, "compress", torch.zeros_like)
    weight, mask = two_four_weight()
    bias = torch.arange(64.0)
    x = torch.randn(8, 64).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = two_four.forward(x, weight, bias, weight, mask, two_four.CompressedWeight(), None)
    assert torch.equal(y.float(), bias.expand(8, 64))
    y.float().sum().backward()
    assert torch.equal(x.grad, torch.ones(8, 64).bfloat16() @ weight.detach().bfloat16())


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    lambda p: torch.optim.Adam(p, lr=0.1, foreach=True),
    lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
], ids=["sgd", "sgd-foreach", "adam-foreach", "adamw-fused"])
def test_every_optimizer_update_recompresses(monkeypatch, optimizer):
    """Every optimizer kind's update rebuilds the compressed copy: most move the parameter's version
    counter; AdamW(fused=True) does not, and the backend's optimizer hook invalidates the copy."""
    monkeypatch.setattr(two_four, "compress", stand_in_compress)
    weight, mask = two_four_weight()
    update = optimizer([weight])
    weights = two_four.CompressedWeight()
    update.register_step_post_hook(lambda *_: weights.invalidate())  # as SparseBackend._after_optimizer_step
    x = torch.randn(8, 64)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            two_four.forward(x, weight, None, weight, mask, weights, None).float().sum().backward()
        weight.grad.mul_(mask)  # the engine's gradient mask: the update keeps the weight 2:4
        update.step()
        assert weights.builds == step + 1  # the next forward rebuilds
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        two_four.forward(x, weight, None, weight, mask, weights, None)  # after the last update: rebuilt
        two_four.forward(x, weight, None, weight, mask, weights, None)  # no write since: the same copy
    assert weights.builds == 4
    assert torch.equal(weights.dense, weight.detach().bfloat16())


def test_the_pattern_is_checked_once_per_mask(monkeypatch):
    """A mask that is not 2:4 is refused (the kernels would drop its third weight of a group), and
    the check, a GPU-to-CPU sync on CUDA, runs only when the mask changed, not every step."""
    monkeypatch.setattr(two_four, "compress", stand_in_compress)
    counts = []
    real_count = sk.count_nm_violations
    monkeypatch.setattr(sk, "count_nm_violations", lambda *a: counts.append(1) or real_count(*a))
    weight, mask = two_four_weight()
    weights = two_four.CompressedWeight()
    x = torch.randn(8, 64)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            two_four.forward(x, weight, None, weight, mask, weights, None)
            weight.mul_(1.0)  # a write: recompressed, the mask unchanged
    assert weights.builds == 3 and len(counts) == 1
    mask[0, :4] = True  # 4 of 4
    with pytest.raises(SparseFormatError, match="1 groups of 4 .* more than 2"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            two_four.forward(x, weight, None, weight, mask, weights, None)


def test_a_resumed_run_keeps_only_the_layers_this_gpu_takes():
    """A checkpoint's 2:4 decisions are checked again on resume (the GPU's 2:4 backend may need
    other shape multiples): a layer that fails goes to the masked path, with its line logged."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    engine = MaskedModel(model, structure=TWO_OF_FOUR)
    saved_decision = {"path": sb.SPARSE, "max_density": 0.5, "final_density": 0.5, "format": two_four.TWO_FOUR,
                      "reason": "backend_layers=all"}
    saved = {"backend": sb.SPARSE, "layers_mode": sb.ALL,
             "decisions": {"0.weight": dict(saved_decision), "1.weight": dict(saved_decision)}}
    cfg = SimpleNamespace(run=SimpleNamespace(backend=SimpleNamespace(value=sb.SPARSE),
                                              backend_layers=SimpleNamespace(value=sb.ALL), amp=True))
    run = SimpleNamespace(cfg=cfg, method=None, engine=engine, device=torch.device("cpu"),
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    lines = []
    backend = sb.create(run, saved, lines.append)
    assert backend.decisions["0.weight"].path == sb.SPARSE
    assert backend.decisions["1.weight"].path == sb.MASKED
    assert "resumed here" in backend.decisions["1.weight"].reason and "multiple of" in lines[0]
    assert backend.state_dict()["decisions"]["1.weight"]["path"] == sb.MASKED


def test_a_fused_update_leaves_the_version_counter_as_it_was():
    """Why the backend invalidates after each optimizer step: should torch start moving the counter
    in fused kernels, this fails and the hook may go."""
    weight = torch.zeros(4, 4, requires_grad=True)
    weight.grad = torch.ones(4, 4)
    before = weight._version
    torch.optim.AdamW([weight], lr=0.1, fused=True).step()
    assert weight._version == before and bool((weight != 0).all())


@pytest.mark.parametrize("kernels", ["cpu"], indirect=True)
def test_the_backend_invalidates_its_copies_after_every_optimizer_step(kernels):
    """With a fused optimizer and no re-masking write, only the backend's optimizer hook tells the
    2:4 copy that the weight changed: one compression per step all the same."""
    device, calls = kernels
    model = nn.Sequential(nn.Linear(64, 64))
    engine = MaskedModel(model, structure=TWO_OF_FOUR)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    densities = engine.round_densities({n: 0.5 for n in engine.names})
    engine.set_masks(engine.magnitude_masks(densities), densities, optimizer)
    backend = sb.SparseBackend(engine, optimizer, sb.decide(engine, densities, (), 0, device, sb.ALL),
                               lambda step: False, amp=True)
    x = torch.randn(8, 64)
    for step in range(2):
        backend.begin_step(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
        engine.mask_gradients()  # masked gradients and decoupled decay keep the weight 2:4
        optimizer.step()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(x)
    assert len(calls) == 3
