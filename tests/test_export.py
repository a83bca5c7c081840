"""Sparse kernels and `sparsebench export`: outputs equal the masked dense model's within
kernels.TOLERANCE (CSR and BSR on the CPU), export files load with plain torch.load(weights_only=True),
and every refusal is one line with exit code 2."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsebench.cli import main
from sparsebench.errors import UserError
from sparsebench.export import load_exported
from sparsebench.models import create_model
from sparsebench.sparse import kernels
from sparsebench.sparse.kernels import (
    SparseConv1d, SparseConv2d, SparseFormatError, SparseLinear, relative_error, sparsify, to_sparse,
)
from sparsebench.sparse.masked import MaskedModel
from sparsebench.sparse.structure import SparsityStructure, StructureKind

TOL = kernels.TOLERANCE[torch.float32]
CUDA_24 = kernels.semi_structured_device_problem(None) is None


def masked_(module: nn.Module, sparsity: float = 0.9, block: int = 1, seed: int = 0) -> nn.Module:
    """Zero a random fraction of the weight (in block x block squares of its (out, in*k) matrix)."""
    g = torch.Generator().manual_seed(seed)
    matrix = module.weight.detach().reshape(module.weight.shape[0], -1)
    rows, cols = matrix.shape
    keep = torch.rand(rows // block, cols // block, generator=g) >= sparsity
    keep = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    with torch.no_grad():
        module.weight.mul_(keep.reshape(module.weight.shape).to(module.weight.dtype))
    return module


FORMATS = [("csr", None), ("bsr", 16), ("bsr", 8)]


# ---------------------------------------------------------------------------- modules
@pytest.mark.parametrize("fmt,block", FORMATS)
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense(fmt, block, chunk, bias):
    torch.manual_seed(0)
    dense = masked_(nn.Linear(64, 48, bias=bias), block=block or 1)
    sparse = SparseLinear.from_dense(dense, fmt, block)
    if chunk:
        sparse.chunk = chunk  # force the chunked product on a small layer
    # the last input is a transposed view, as a sparse layer's output is: its x^T needs no copy
    for x in (torch.randn(100, 64), torch.randn(1, 64), torch.randn(3, 5, 64), torch.randn(64, 100).t()):
        assert relative_error(sparse(x), dense(x)) <= TOL
    assert sparse.weight.layout == {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}[fmt]
    assert sparse.weight.crow_indices().dtype == torch.int32


@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_copy_is_the_transpose_exactly(threads):
    """Tiles or not (one thread), ragged edges, strided inputs: always m.t().contiguous(), bit for bit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for shape in [(256, 512), (100, 37), (16, 16), (33, 17), (5, 300), (300, 5), (1, 64), (64, 1)]:
            m = torch.randn(*shape, generator=g)
            copy = kernels.transposed_copy(m)
            assert copy.is_contiguous() and torch.equal(copy, m.t().contiguous()), shape
        strided = torch.randn(40, 64, generator=g)[:, ::2]
        sliced = torch.randn(50, 100, generator=g)[3:, 5:69]  # rows further apart than they are long
        expanded = torch.randn(1, 64, generator=g).expand(48, 64)  # a row stride of 0 (a broadcast gradient)
        for m in (strided, sliced, expanded):
            assert torch.equal(kernels.transposed_copy(m), m.t().contiguous())
        already = torch.randn(64, 48, generator=g).t()  # its transpose is contiguous: no copy
        assert kernels.transposed_copy(already).data_ptr() == already.data_ptr()
    finally:
        torch.set_num_threads(previous)


CONV_SETTINGS = [
    {},
    {"stride": 2, "padding": 1},
    {"padding": "same", "dilation": 2},
    {"padding": 2, "padding_mode": "reflect"},
    {"padding": 1, "padding_mode": "circular", "stride": 3},
    {"padding": "valid", "bias": False},
]


@pytest.mark.parametrize("fmt,block", FORMATS)
@pytest.mark.parametrize("settings", CONV_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_conv_matches_dense(fmt, block, settings):
    torch.manual_seed(0)
    conv1 = masked_(nn.Conv1d(16, 32, 3, **settings), block=block or 1)
    conv2 = masked_(nn.Conv2d(16, 32, 3, **settings), block=block or 1)
    x1, x2 = torch.randn(7, 16, 40), torch.randn(5, 16, 12, 10)
    for dense, cls, x in ((conv1, SparseConv1d, x1), (conv2, SparseConv2d, x2)):
        sparse = cls.from_dense(dense, fmt, block)
        assert relative_error(sparse(x), dense(x)) <= TOL
        sparse.chunk = 50  # a few samples per sparse call
        assert relative_error(sparse(x), dense(x)) <= TOL


def test_grouped_conv_csr_and_refusals():
    torch.manual_seed(0)
    conv = masked_(nn.Conv2d(16, 32, 3, padding=1, groups=4))
    x = torch.randn(3, 16, 8, 8)
    assert relative_error(SparseConv2d.from_dense(conv, "csr")(x), conv(x)) <= TOL
    with pytest.raises(SparseFormatError, match="groups=4"):
        SparseConv2d.from_dense(conv, "bsr", 8)
    with pytest.raises(SparseFormatError, match="Conv3d"):
        kernels.to_sparse_module(nn.Conv3d(4, 4, 3), "csr", name="c3.weight")


def test_backward_csr_works_bsr_refused_in_one_line_on_cpu():
    linear = masked_(nn.Linear(32, 32), block=16)
    x = torch.randn(4, 32, requires_grad=True)
    SparseLinear.from_dense(linear, "csr")(x).sum().backward()
    assert torch.allclose(x.grad, linear.weight.sum(0).expand(4, 32), atol=1e-5)
    chunked = SparseLinear.from_dense(linear, "csr")
    chunked.chunk = 16  # more columns than a chunk: the chunked product has no autograd, one call has
    wide = torch.randn(100, 32, requires_grad=True)
    chunked(wide).sum().backward()
    assert torch.allclose(wide.grad, linear.weight.sum(0).expand(100, 32), atol=1e-5)
    bsr = SparseLinear.from_dense(linear, "bsr", 16)
    with pytest.raises(SparseFormatError, match="BSR backward") as error:
        bsr(x)
    assert "\n" not in str(error.value)
    with torch.no_grad():
        assert relative_error(bsr(x), linear(x)) <= TOL
    conv = SparseConv2d.from_dense(nn.Conv2d(16, 16, 3), "bsr", 16)
    with pytest.raises(SparseFormatError, match="BSR backward"):
        conv(torch.randn(2, 16, 6, 6, requires_grad=True))


def test_bsr_refuses_a_shape_not_divisible_by_the_block():
    with pytest.raises(SparseFormatError) as error:
        to_sparse(torch.randn(32, 30), "bsr", 16, name="fc.weight")
    message = str(error.value)
    assert "fc.weight" in message and "32x30" in message and "\n" not in message
    with pytest.raises(SparseFormatError, match="block side"):
        to_sparse(torch.randn(32, 32), "bsr", None)


@pytest.mark.skipif(CUDA_24, reason="this machine runs 2:4 kernels")
def test_semi_structured_refused_on_cpu():
    problem = kernels.semi_structured_device_problem("cpu")
    assert problem and "CUDA" in problem and "8.0" in problem
    with pytest.raises(SparseFormatError, match="CUDA"):
        kernels.to_sparse_module(nn.Linear(64, 64).half(), "semi_structured")


def test_semi_structured_weight_checks_are_device_independent():
    ok = torch.randn(64, 64)
    ok.view(64, 16, 4)[..., 1:3] = 0  # 2 of every 4 kept
    assert kernels.semi_structured_weight_problem(ok.half()) is None
    assert "float16 or bfloat16" in kernels.semi_structured_weight_problem(ok)
    assert "multiple" in kernels.semi_structured_weight_problem(ok[:8].half())
    dense = kernels.semi_structured_weight_problem(torch.randn(64, 64).half(), "l.weight")
    assert "l.weight" in dense and "1024 of 1024 groups" in dense
    values, positions = kernels.pack_2_4(ok)
    assert values.shape == (64, 32) and torch.equal(kernels.unpack_2_4(values, positions), ok)


@pytest.mark.skipif(not CUDA_24, reason="2:4 semi-structured kernels need a CUDA GPU of compute capability 8.0+")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_linear_matches_dense_on_cuda(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(256, 128).to("cuda", dtype)
    with torch.no_grad():
        dense.weight.view(128, 64, 4)[..., 1:3] = 0
    sparse = kernels.to_sparse_module(dense, "semi_structured")
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    assert relative_error(sparse(x).float(), dense(x).float()) <= kernels.TOLERANCE[dtype]


def random_masked_model(name, input_shape, sparsity, structure=SparsityStructure()):
    torch.manual_seed(0)
    model = create_model(name, input_shape, 10)
    engine = MaskedModel(model, dense_first=True, dense_last=True, structure=structure)
    densities = engine.round_densities({n: 1 - sparsity for n in engine.names})
    engine.set_masks(engine.random_masks(densities, torch.Generator().manual_seed(1)), densities)
    return model.eval(), engine.names


@pytest.mark.parametrize("name,shape,fmt,block,structure", [
    ("cnn1d_bn", (1, 40), "csr", None, SparsityStructure()),
    ("cnn1d_bn", (1, 40), "bsr", 16, SparsityStructure(StructureKind.block, block=16)),
    ("resnet20", (3, 32, 32), "bsr", 16, SparsityStructure(StructureKind.block, block=16)),
    ("resnet20", (3, 32, 32), "csr", None, SparsityStructure()),
])
def test_whole_model_matches_masked_dense(name, shape, fmt, block, structure):
    model, names = random_masked_model(name, shape, 0.9, structure)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model(x)
        sparse = sparsify(model, fmt, block, names)
        swapped = [m for m in sparse.modules() if isinstance(m, kernels._SparseModule)]
        assert len(swapped) == len(names)
        assert relative_error(sparse(x), expected) <= TOL


def test_sparsify_checks_every_layer_before_changing_any():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 30))
    with pytest.raises(SparseFormatError, match="2.weight"):
        sparsify(model, "bsr", 16)
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in model.modules())
    with pytest.raises(SparseFormatError, match="no layer named"):
        sparsify(model, "csr", layer_names=["7.weight"])


# ---------------------------------------------------------------------------- export
def train(tmp: Path, *overrides: str) -> Path:
    code = main(["train", "method=static", "epochs=1", "dataset.num_samples=200", "progress=none",
                 f"results_root={tmp}", *overrides])
    assert code == 0
    (final,) = [p.parent for p in tmp.rglob("final.json")]
    return final


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One unstructured and one 16x16-block run of the default model (cnn1d_bn, 90 %)."""
    root = tmp_path_factory.mktemp("export_runs")
    return {
        "unstructured": train(root / "u"),
        "block": train(root / "b", "distribution.structure=block", "distribution.block=16"),
    }


def dense_logits(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    model = create_model("cnn1d_bn", (1, 40), 10)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    with torch.no_grad():
        return model.eval()(x)


def one_error_line(capsys, command: str = "export") -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sparsebench {command}: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.slow
@pytest.mark.parametrize("kind,fmt,extra,filename", [
    ("unstructured", "csr", [], "model_csr.pt"),
    ("block", "bsr", [], "model_bsr16.pt"),
    ("unstructured", "bsr", ["--block", "16"], "model_bsr16.pt"),  # explicit block: padded blocks
])
def test_export_round_trip(runs, capsys, kind, fmt, extra, filename):
    run_dir = runs[kind]
    assert main(["export", str(run_dir), "--format", fmt, *extra]) == 0
    path = run_dir / filename
    assert path.is_file()
    payload = torch.load(path, weights_only=True)  # plain torch, no sparsebench code needed
    assert payload["format"] == fmt and payload["sparsebench_export"] == 1
    assert set(payload["sparse"]) == {"3.weight", "6.weight", "9.weight"}
    for entry in payload["sparse"].values():
        matrix = entry["matrix"]
        assert matrix.layout == {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}[fmt]
        assert matrix.shape == (64, 192)
    state = torch.load(run_dir / "model.pt", weights_only=True)
    dense_matrix = state["3.weight"].reshape(64, -1)
    assert torch.equal(payload["sparse"]["3.weight"]["matrix"].to_dense(), dense_matrix)
    if kind == "block":  # the run's own blocks: every stored block full of kept weights
        assert int((payload["sparse"]["3.weight"]["matrix"].values() != 0).sum()) == int((dense_matrix != 0).sum())
        assert payload["sparse"]["3.weight"]["matrix"].values().numel() == int((dense_matrix != 0).sum())
    x = torch.randn(16, 1, 40)
    model = load_exported(path)
    assert sum(isinstance(m, kernels._SparseModule) for m in model.modules()) == 3
    assert relative_error(model(x), dense_logits(run_dir, x)) <= TOL  # an inference model: no no_grad needed
    assert payload["verified_relative_error"] <= TOL
    assert "wrote" in capsys.readouterr().err


@pytest.mark.slow
def test_export_out_path(runs, tmp_path):
    out = tmp_path / "elsewhere.pt"
    assert main(["export", str(runs["unstructured"]), "--format", "csr", "--out", str(out)]) == 0
    assert isinstance(load_exported(out), nn.Module)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.pt", "final.json", "config.yaml", "metrics.jsonl"])
def test_export_never_overwrites_the_runs_own_files(runs, capsys, name):
    run = runs["unstructured"]
    before = (run / name).read_bytes()
    assert main(["export", str(run), "--format", "csr", "--out", str(run / name)]) == 2
    assert f"{name} is a file of the run directory" in one_error_line(capsys)
    assert (run / name).read_bytes() == before


@pytest.mark.slow
def test_export_refuses_partial_blocks_without_block(runs, capsys):
    assert main(["export", str(runs["unstructured"]), "--format", "bsr"]) == 2
    err = one_error_line(capsys)
    assert "partially filled" in err and "--block" in err


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["--format", "bsr", "--block", "7"], "3.weight"),
    (["--format", "csr", "--block", "16"], "--block applies to --format bsr only"),
    (["--format", "coo"], "invalid choice"),
    (["--format", "bsr", "--block", "0"], "positive whole number"),
    ([], "--format"),
])
def test_export_bad_arguments(runs, capsys, args, expected):
    assert main(["export", str(runs["block"]), *args]) == 2
    assert expected in one_error_line(capsys)


@pytest.mark.slow
@pytest.mark.skipif(CUDA_24, reason="this machine runs 2:4 kernels")
def test_export_semi_structured_on_cpu_is_one_line(runs, capsys):
    assert main(["export", str(runs["unstructured"]), "--format", "semi_structured"]) == 2
    assert "CUDA" in one_error_line(capsys)


@pytest.mark.slow
def test_export_refuses_broken_runs(runs, tmp_path, capsys):
    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(runs["unstructured"], target)
        for old in target.glob("model_*.pt"):
            old.unlink()
        return target

    no_model = copy("no_model")
    (no_model / "model.pt").unlink()
    assert main(["export", str(no_model), "--format", "csr"]) == 2
    assert "model.pt" in one_error_line(capsys)

    garbage = copy("garbage")
    (garbage / "model.pt").write_bytes(b"\x80\x04not a torch file at all" * 10)
    assert main(["export", str(garbage), "--format", "csr"]) == 2
    assert "model.pt" in one_error_line(capsys)

    wrong = copy("wrong_model")
    torch.save({"weight": torch.zeros(3)}, wrong / "model.pt")
    assert main(["export", str(wrong), "--format", "csr"]) == 2
    assert "does not fit model" in one_error_line(capsys)

    unfinished = copy("unfinished")
    (unfinished / "final.json").unlink()
    assert main(["export", str(unfinished), "--format", "csr"]) == 2
    assert "has not completed" in one_error_line(capsys)

    assert main(["export", str(tmp_path / "nowhere"), "--format", "csr"]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not list(tmp_path.rglob("model_*.pt"))


@pytest.mark.slow
def test_load_exported_refuses_garbage_and_bad_indices(runs, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"junk" * 100)
    with pytest.raises(UserError, match="not a readable sparsebench export"):
        load_exported(garbage)
    assert main(["export", str(runs["unstructured"]), "--format", "csr", "--out", str(tmp_path / "ok.pt")]) == 0
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    good = payload["sparse"]["3.weight"]["matrix"]
    cols = good.col_indices().clone()
    cols[0] = 10_000  # out of range: torch's weights-only loader checks sparse invariants
    payload["sparse"]["3.weight"]["matrix"] = torch.sparse_csr_tensor(
        good.crow_indices(), cols, good.values(), good.shape, check_invariants=False)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(UserError):
        load_exported(tmp_path / "bad.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a sparsebench export"):
        load_exported(tmp_path / "other.pt")


def test_semi_structured_export_checks_and_storage_without_a_gpu():
    """The device-independent half of a 2:4 export: the pattern check and the packed storage."""
    from sparsebench.export import RunModel, build_payload, check_layers

    nm = SparsityStructure(StructureKind.nm, n=2, m=4)
    model, names = random_masked_model("cnn1d_bn", (1, 40), 0.5, nm)
    run = RunModel(model, "cnn1d_bn", {}, (1, 40), 10, names, {"structure": "nm", "n": 2, "m": 4})
    assert check_layers(run, "semi_structured", None, False, torch.float16) == []
    payload = build_payload(run, "semi_structured", None, "float16")
    params = dict(model.named_parameters())
    for name, entry in payload["sparse"].items():
        assert entry["values"].dtype == torch.float16 and entry["positions"].dtype == torch.uint8
        restored = kernels.unpack_2_4(entry["values"], entry["positions"]).reshape(params[name].shape)
        assert torch.equal(restored, params[name].detach().half())
    unstructured, names = random_masked_model("cnn1d_bn", (1, 40), 0.5)
    run = RunModel(unstructured, "cnn1d_bn", {}, (1, 40), 10, names, {"structure": "unstructured"})
    with pytest.raises(SparseFormatError, match="groups of 4 consecutive weights hold more than 2"):
        check_layers(run, "semi_structured", None, False, torch.float16)


def test_load_exported_refuses_a_malformed_payload(tmp_path):
    model, names = random_masked_model("cnn1d_bn", (1, 40), 0.9)
    from sparsebench.export import RunModel, build_payload

    payload = build_payload(RunModel(model, "cnn1d_bn", {}, (1, 40), 10, names), "csr")
    del payload["sparse"]["3.weight"]["matrix"]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="holds no csr matrix"):
        load_exported(tmp_path / "bad.pt")
    payload["model"] = "cnn1d_bn"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="malformed"):
        load_exported(tmp_path / "bad.pt")
