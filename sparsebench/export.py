"""`sparsebench export RUN_DIR --format csr|bsr|semi_structured`: a finished run as real sparse tensors.

    sparsebench export RUN_DIR --format csr
    sparsebench export RUN_DIR --format bsr [--block 16|32|64]
    sparsebench export RUN_DIR --format semi_structured [--dtype float16|bfloat16]   (CUDA, SM 8.0+)
    sparsebench export RUN_DIR --format csr --out somewhere/model.pt

Reads the run's config.yaml (safe YAML, size-capped, no anchors), final.json and model.pt
(``torch.load(weights_only=True)``: nothing in a results tree is ever unpickled), rebuilds the
model with `sparsebench.models.create_model`, converts every sparse tensor of the run (the keys
of final.json's ``layer_densities``; ``dense_layers`` stay dense) and writes, atomically,
``RUN_DIR/model_<format>.pt`` (``model_bsr<block>.pt`` for BSR) or ``--out``. Before writing, the
sparse model's outputs on a random batch are compared with the dense model's; the export is
refused if they differ by more than the kernel tolerance (kernels.TOLERANCE).

The file is a plain dict that ``torch.load(path, weights_only=True)`` reads without sparsebench:

    sparsebench_export  1 (the version of this layout)
    format              "csr" | "bsr" | "semi_structured"
    block               BSR block side, else None
    dtype               "float32", or the 16-bit type of a semi-structured export
    model               {"name": ..., "options": {...}}: sparsebench.models.create_model's arguments
    input_shape, num_classes
    state_dict          every tensor of the model's state_dict except the converted weights (dense)
    sparse              {weight name: {"module": "Linear"|"Conv1d"|"Conv2d", "shape": [original
                        weight shape], "groups": g, and either "matrix": a torch sparse CSR/BSR
                        tensor of the (out, in/g * k) matrix with int32 indices, or, for 2:4,
                        "values" (out, in/2) and "positions" (uint8 (out, in/2), 0..3 within each
                        group of 4): torch's SparseSemiStructuredTensor cannot be loaded with
                        weights_only, so it is rebuilt on the GPU by `load_exported`}
    tolerance, verified_relative_error, source {run_dir, method, sparsity, actual_sparsity, test_acc}

`load_exported(path)` turns such a file back into an inference nn.Module (eval mode, no parameter
requires grad) with `kernels.SparseLinear` / `SparseConv1d` / `SparseConv2d` in place of the
converted layers, using only sparsebench.models and sparsebench.sparse.kernels (no trainer, no
Hydra).

BSR and block sizes. A run trained with ``distribution.structure=block`` exports at its own block
side by default, and every stored block is full. For any other run (or another side), some
blocks hold both kept and pruned weights: without ``--block`` the export is refused, naming how
many blocks are partially filled; passing ``--block N`` explicitly is the consent to store those
blocks padded with zeros (the fill is printed). A side that does not divide both sides of a
weight's (out, in*k) matrix is refused by name. 2:4 needs at most 2 non-zeros in every group of 4
consecutive weights of a row (``distribution.structure=nm``, n=2, m=4), float16/bfloat16 and a
CUDA GPU of compute capability 8.0+; anything else is refused with one line.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from sparsebench import results
from sparsebench.errors import UserError
from sparsebench.sparse import kernels
from sparsebench.sparse.kernels import FORMATS, SparseFormatError

PROG = "sparsebench export"
EXPORT_VERSION = 1
_MiB = 1 << 20
CAPS = {results.CONFIG_FILE: _MiB, results.FINAL_FILE: _MiB}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VERIFY_BATCH = 4


# ---------------------------------------------------------------------------- reading a run
@dataclass
class RunModel:
    """A dense model with its sparse tensors: from a finished run (`read_run`) or built by bench."""

    model: nn.Module  # eval mode, on the CPU, float32, masked weights exactly zero
    name: str
    options: dict
    input_shape: tuple[int, ...]
    num_classes: int
    sparse_names: list[str]  # weight names ("3.weight") of the tensors trained sparse
    structure: dict = field(default_factory=dict)  # the config's distribution (structure, n, m, block)
    run_dir: Path | None = None
    final: dict = field(default_factory=dict)


def _read_capped(path: Path) -> bytes:
    """A run file's bytes: a regular file within its size cap, or a one-line UserError."""
    cap = CAPS[path.name]
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as error:
        raise UserError(f"{path} unreadable: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path} is not a regular file")
    if info.st_size > cap:
        raise UserError(f"{path} is {info.st_size} bytes, over the {cap} a run's {path.name} may have")
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as error:
        raise UserError(f"{path} unreadable: {error.strerror or error}") from None
    if len(data) > cap:
        raise UserError(f"{path} is larger than the {cap} bytes a run's {path.name} may have")
    return data


def _read_config(path: Path) -> dict:
    data = _read_capped(path)
    try:
        for event in yaml.parse(data, Loader=yaml.SafeLoader):  # no anchors/aliases: never expanded
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise UserError(f"{path} uses YAML anchors or aliases, which sparsebench never writes")
        config = yaml.safe_load(data)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any junk is one line
        raise UserError(f"{path} unreadable: {_first_line(error)}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a mapping")
    return config


def _read_final(path: Path) -> dict:
    try:
        final = json.loads(_read_capped(path))
    except UserError:
        raise
    except (ValueError, RecursionError) as error:
        raise UserError(f"{path} is not valid JSON ({_first_line(error)})") from None
    if not isinstance(final, dict):
        raise UserError(f"{path} is not a JSON object")
    return final


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:297] + "..."


def load_state_dict_file(path: Path) -> dict:
    """model.pt with weights_only=True: a dict of tensors, or a one-line UserError."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path.parent} has no {path.name}: the run did not save a model") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path} is not a regular file")
    try:
        state = weights_only_load(path)
    except Exception as error:  # noqa: BLE001 - truncated, garbled or not weights-only: one line
        reason = f"{type(error).__name__}: {_first_line(error)}"
        raise UserError(f"{path} is not a readable weights-only state_dict ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{path} is not a state_dict (a dict of named tensors)")
    return state


def weights_only_load(path: Path | str):
    """torch.load(weights_only=True) on the CPU, without torch's UserWarnings on stderr: that it
    checks every sparse tensor's invariants (wanted), that sparse layouts are beta, that a junk
    file's pickle protocol is unusual; a file it refuses raises, and callers make that one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def _whole(value, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {key} must be a positive whole number, got {value!r}")
    return value


def read_run(run_dir: Path) -> RunModel:
    """The finished run in `run_dir` as a dense model on the CPU (eval mode), checked."""
    from sparsebench.models import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} {'is not a directory' if run_dir.exists() else 'does not exist'}")
    config_path, final_path = run_dir / results.CONFIG_FILE, run_dir / results.FINAL_FILE
    if not config_path.exists():
        raise UserError(f"{run_dir} is not a run directory (no {results.CONFIG_FILE})")
    if not results.is_complete(run_dir):
        raise UserError(f"run {run_dir} has not completed (no readable {results.FINAL_FILE}); nothing to export")
    config, final = _read_config(config_path), _read_final(final_path)
    if final.get("status") != "completed":
        raise UserError(f"run {run_dir} ended with status {final.get('status')!r}, not 'completed'; nothing to export")
    if "svd" in final:  # its weights are dense low-rank products: no zeros for a sparse format to drop
        raise UserError(f"run {run_dir} is SVD training (low-rank, not sparse): its model.pt holds dense weights of "
                        "the ranks in final.json's svd entry; sparse formats and kernels do not apply")
    model_cfg = config.get("model")
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("name"), str):
        raise UserError(f"{config_path}: model.name is missing")
    name = model_cfg["name"]
    options = {k: v for k, v in model_cfg.items() if k != "name"}
    shape = final.get("input_shape")
    if not isinstance(shape, list) or not shape:
        raise UserError(f"{final_path}: input_shape is missing")
    input_shape = tuple(_whole(s, "input_shape", final_path) for s in shape)
    num_classes = _whole(final.get("num_classes"), "num_classes", final_path)
    densities = final.get("layer_densities")
    if not isinstance(densities, dict):
        raise UserError(f"{final_path}: layer_densities is missing")
    dense_layers = final.get("dense_layers") or []
    sparse_names = [n for n in densities if n not in dense_layers]
    state = load_state_dict_file(run_dir / results.MODEL_FILE)
    torch.manual_seed(0)
    model = create_model(name, input_shape, num_classes, **options)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = _first_line(error).replace("Error(s) in loading state_dict for ", "")
        raise UserError(f"{run_dir / results.MODEL_FILE} does not fit model {name!r}: {reason}") from None
    model.float().eval()
    params = dict(model.named_parameters())
    missing = [n for n in sparse_names if n not in params]
    if missing:
        raise UserError(f"{final_path}: sparse tensor {missing[0]!r} is not a parameter of model {name!r}")
    distribution = config.get("distribution") if isinstance(config.get("distribution"), dict) else {}
    return RunModel(model, name, options, input_shape, num_classes, sparse_names, dict(distribution), run_dir, final)


# ---------------------------------------------------------------------------- checks
def block_fill(weight_2d: torch.Tensor, block: int) -> tuple[int, int, int]:
    """(blocks holding any non-zero, of which only partly non-zero, all blocks) at side `block`."""
    rows, cols = weight_2d.shape
    nonzero = (weight_2d != 0).reshape(rows // block, block, cols // block, block).sum(dim=(1, 3))
    stored = int((nonzero > 0).sum())
    partial = int(((nonzero > 0) & (nonzero < block * block)).sum())
    return stored, partial, nonzero.numel()


def choose_block(run: RunModel, block: int | None) -> tuple[int, bool]:
    """(block side, padding allowed): the run's own block side unless `--block` says otherwise."""
    if block is not None:
        return block, True
    if run.structure.get("structure") == "block" and isinstance(run.structure.get("block"), int):
        return int(run.structure["block"]), False
    return kernels.DEFAULT_BLOCK, False


def check_layers(run: RunModel, fmt: str, block: int | None, allow_padding: bool, dtype: torch.dtype) -> list[str]:
    """Refuse (one line) what the format cannot store; return notes to print (block fill)."""
    params = dict(run.model.named_parameters())
    modules = dict(run.model.named_modules())
    notes = []
    partial_total = stored_total = 0
    first_partial = None
    for name in run.sparse_names:
        module = modules[kernels._module_name(name)]
        if type(module) not in kernels.SPARSE_MODULES:
            raise SparseFormatError(
                f"{name}: {type(module).__name__} has no sparse module (Linear, Conv1d and Conv2d do)"
            )
        matrix = kernels.weight_matrix(params[name])
        groups = getattr(module, "groups", 1)
        if groups > 1 and fmt != "csr":
            raise SparseFormatError(
                f"{name}: grouped convolution (groups={groups}) is supported only as csr, not {fmt}"
            )
        if fmt == "bsr":
            kernels.check_block(tuple(matrix.shape), block, name)
            stored, partial, total = block_fill(matrix, block)
            stored_total += stored
            partial_total += partial
            if partial and first_partial is None:
                first_partial = f"{name}: {partial} of {stored} stored {block}x{block} blocks partially filled"
        elif fmt == "semi_structured":
            problem = kernels.semi_structured_weight_problem(matrix.to(dtype), name)
            if problem:
                kept = run.structure
                if kept.get("structure") == "nm" and "groups of 4" in problem:
                    problem += f" (this run kept {kept.get('n')}:{kept.get('m')})"
                raise SparseFormatError(problem)
    if fmt == "bsr" and partial_total:
        if not allow_padding:
            raise SparseFormatError(
                f"{partial_total} of {stored_total} {block}x{block} blocks are partially filled ({first_partial}): "
                f"the run's masks are not {block}x{block} block-sparse; pass --block {block} to store them padded "
                "with zeros, or export as csr"
            )
        notes.append(
            f"{partial_total} of {stored_total} stored {block}x{block} blocks are partially filled and padded with zeros"
        )
    return notes


# ---------------------------------------------------------------------------- the file
def build_payload(run: RunModel, fmt: str, block: int | None = None, dtype: str = "float32") -> dict:
    """The export dict (see the module docstring); `fmt` "dense" keeps every weight dense (bench)."""
    params = dict(run.model.named_parameters())
    modules = dict(run.model.named_modules())
    sparse = {}
    names = [] if fmt == "dense" else run.sparse_names
    for name in names:
        module = modules[kernels._module_name(name)]
        matrix = kernels.weight_matrix(params[name])
        entry = {
            "module": type(module).__name__, "shape": list(params[name].shape), "groups": getattr(module, "groups", 1)
        }
        if fmt == "semi_structured":
            values, positions = kernels.pack_2_4(matrix.to(DTYPES[dtype]))
            entry.update(values=values, positions=positions)
        else:
            entry["matrix"] = kernels.to_sparse(matrix.contiguous(), fmt, block, name)
        sparse[name] = entry
    state = {k: v.detach().clone() for k, v in run.model.state_dict().items() if k not in sparse}
    final = run.final or {}
    return {
        "sparsebench_export": EXPORT_VERSION,
        "format": fmt,
        "block": block if fmt == "bsr" else None,
        "dtype": dtype,
        "model": {"name": run.name, "options": _plain(run.options)},
        "input_shape": list(run.input_shape),
        "num_classes": run.num_classes,
        "state_dict": state,
        "sparse": sparse,
        "tolerance": kernels.TOLERANCE[DTYPES[dtype]],
        "source": {
            "run_dir": str(run.run_dir) if run.run_dir else None,
            **{k: final.get(k) for k in ("method", "sparsity", "actual_sparsity", "test_acc") if k in final},
        },
    }


def _plain(value):
    """Model options as weights-only-loadable plain values (YAML gives lists, numbers, strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def payload_to_model(payload: dict, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the sparse model of an export dict (see `load_exported`)."""
    from sparsebench.models import create_model

    fmt = payload["format"]
    dtype = DTYPES[payload["dtype"]]
    model = create_model(payload["model"]["name"], tuple(payload["input_shape"]), int(payload["num_classes"]),
                         **payload["model"]["options"])
    sparse = payload["sparse"]
    params = dict(model.named_parameters())
    # The converted weights are filled in below; start them at zero so strict loading passes.
    state = dict(payload["state_dict"])
    for name in sparse:
        if name not in params:
            raise UserError(f"export names weight {name!r}, which model {payload['model']['name']!r} does not have")
        state[name] = torch.zeros_like(params[name])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        model_name = payload["model"]["name"]
        raise UserError(f"the exported state_dict does not fit model {model_name!r}: {_first_line(error)}") from None
    model.eval().requires_grad_(False)  # an inference model: BSR has no CPU backward (kernels docstring)
    if fmt == "semi_structured":
        device = torch.device(device or "cuda")
        problem = kernels.semi_structured_device_problem(device)
        if problem:
            raise SparseFormatError(problem)
        with torch.no_grad():
            for name, entry in sparse.items():
                weight = kernels.unpack_2_4(entry["values"], entry["positions"]).reshape(params[name].shape)
                params[name].copy_(weight.to(params[name].dtype))
        model = model.to(device=device, dtype=dtype)
        return kernels.sparsify(model, fmt, None, list(sparse))
    modules = dict(model.named_modules())
    for name, entry in sparse.items():
        module_name = kernels._module_name(name)
        module = modules[module_name]
        matrix = entry.get("matrix")
        layout = {"csr": torch.sparse_csr, "bsr": torch.sparse_bsr}.get(fmt)
        if not torch.is_tensor(matrix) or matrix.layout != layout:
            raise UserError(f"export entry {name!r} holds no {fmt} matrix")
        expected = tuple(kernels.weight_matrix(params[name]).shape)
        if tuple(matrix.shape) != expected:
            raise UserError(
                f"export entry {name!r} has a {tuple(matrix.shape)} matrix; the model's weight is {expected}"
            )
        block = int(matrix.values().shape[-1]) if fmt == "bsr" else None  # the blocks as stored
        replacement = _sparse_module_from_matrix(module, matrix.to(torch.float32), fmt, block, name)
        parent_name, _, child = module_name.rpartition(".")
        if not module_name:
            model = replacement
        else:
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model.to(device) if device is not None else model


def _sparse_module_from_matrix(
    module: nn.Module, matrix: torch.Tensor, fmt: str, block: int | None, name: str
) -> nn.Module:
    """The drop-in for dense template `module` (shapes, bias, conv settings) with weight `matrix`."""
    if isinstance(module, nn.Linear):
        return kernels.SparseLinear(matrix, module.bias, fmt, block)
    if getattr(module, "groups", 1) > 1:  # CSR only: stored as (out, C/g*k), run as block-diagonal
        with torch.no_grad():
            module.weight.copy_(matrix.to_dense().reshape(module.weight.shape))
        return kernels.to_sparse_module(module, fmt, block, name)
    cls = kernels.SPARSE_MODULES[type(module)]
    return cls(matrix, module.bias, fmt, block, tuple(module.weight.shape), module.stride, module.padding,
               module.dilation, module.groups, module.padding_mode)


def load_exported(path: Path | str, device: torch.device | str | None = None) -> nn.Module:
    """The model of an export file, with sparse modules in place of the converted layers (eval mode).

    Reads with ``torch.load(weights_only=True)``. Semi-structured exports are rebuilt on a CUDA
    device (default ``cuda``) in their 16-bit dtype; CSR/BSR ones on the CPU unless `device`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist" if not path.exists() else f"{path} is not a regular file")
    try:
        payload = weights_only_load(path)
    except Exception as error:  # noqa: BLE001 - garbled, truncated, invalid sparse indices: one line
        reason = f"{type(error).__name__}: {_first_line(error)}"
        raise UserError(f"{path} is not a readable sparsebench export ({reason})") from None
    if not isinstance(payload, dict) or payload.get("sparsebench_export") != EXPORT_VERSION:
        raise UserError(f"{path} is not a sparsebench export (version {EXPORT_VERSION})")
    if payload.get("format") not in (*FORMATS, "dense") or payload.get("dtype") not in DTYPES:
        raise UserError(f"{path}: unknown format {payload.get('format')!r} or dtype {payload.get('dtype')!r}")
    try:
        return payload_to_model(payload, device)
    except (KeyError, TypeError, AttributeError) as error:  # a key missing or of the wrong type: edited by hand?
        reason = f"{type(error).__name__}: {_first_line(error)}"
        raise UserError(f"{path} is a malformed sparsebench export ({reason})") from None


def verify(run: RunModel, payload: dict) -> float:
    """Relative error (kernels.relative_error) of the exported model against the dense one on a random batch."""
    sparse_model = payload_to_model(payload)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((VERIFY_BATCH, *run.input_shape), generator=generator)
    with torch.no_grad():
        if payload["format"] == "semi_structured":
            device = next(iter(sparse_model.buffers())).device
            dtype = DTYPES[payload["dtype"]]
            dense = run.model.to(device=device, dtype=dtype)
            try:
                x = x.to(device, dtype)
                return kernels.relative_error(sparse_model(x).float(), dense(x).float())
            finally:
                run.model.to(device="cpu", dtype=torch.float32)
        return kernels.relative_error(sparse_model(x), run.model(x))


def export_run(
    run_dir: Path, fmt: str, block: int | None, out: Path | None, dtype: str
) -> tuple[Path, dict, list[str]]:
    if fmt == "semi_structured":
        problem = kernels.semi_structured_device_problem(None)
        if problem:  # before reading anything: the answer does not depend on the run
            raise SparseFormatError(f"--format semi_structured: {problem}")
        if dtype == "float32":
            dtype = "float16"
    elif dtype != "float32":
        raise UserError(f"--dtype {dtype} applies to --format semi_structured only (csr and bsr keep float32)")
    if block is not None and fmt != "bsr":
        raise UserError(f"--block applies to --format bsr only, not {fmt}")
    run = read_run(run_dir)
    block, allow_padding = choose_block(run, block) if fmt == "bsr" else (None, False)
    notes = check_layers(run, fmt, block, allow_padding, DTYPES[dtype])
    payload = build_payload(run, fmt, block, dtype)
    error = verify(run, payload)
    tolerance = payload["tolerance"]
    if not error <= tolerance:
        raise UserError(
            f"the {fmt} model's outputs differ from the dense model's by {error:.3g} (relative), "
            f"over the tolerance {tolerance:g}"
        )
    payload["verified_relative_error"] = error
    target = default_path(run_dir, fmt, block)
    if out is not None:
        target = out / target.name if out.is_dir() else out
    if not target.parent.is_dir():
        raise UserError(f"--out {out}: directory {target.parent} does not exist")
    if results.overwrites_run_file(target):
        raise UserError(f"--out {out}: {target.name} is a file of the run directory {target.parent}; "
                        "write the export under another name")
    try:
        results.atomic_torch_save(target, payload)
    except OSError as err:
        raise UserError(f"cannot write {target}: {err.strerror or err}") from None
    return target, payload, notes


def default_path(run_dir: Path, fmt: str, block: int | None) -> Path:
    return Path(run_dir) / (f"model_bsr{block}.pt" if fmt == "bsr" else f"model_{fmt}.pt")


# ---------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message} (see {PROG} --help)")


def _block(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Write a finished run's model with real torch sparse tensors.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a completed run directory (holds final.json and model.pt)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="csr (any mask), bsr (square blocks), semi_structured (2:4, CUDA)")
    parser.add_argument("--block", type=_block, metavar="N",
                        help="BSR block side (default: the run's distribution.block for block-structured runs); "
                             "given explicitly, partially filled blocks are stored padded with zeros")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="semi_structured only: float16 (default for 2:4) or bfloat16")
    parser.add_argument("--out", type=Path, metavar="PATH",
                        help="file (or existing directory) to write; default RUN_DIR/model_<format>.pt")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        target, payload, notes = export_run(args.run_dir, args.format, args.block, args.out, args.dtype)
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help printed its text
        return int(done.code or 0)
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    dense_bytes = (args.run_dir / results.MODEL_FILE).stat().st_size
    size = target.stat().st_size
    block = f" {payload['block']}x{payload['block']}" if payload["block"] else ""
    print(f"{PROG}: wrote {target} ({payload['format']}{block}, {len(payload['sparse'])} sparse tensors, "
          f"{size / 1e6:.3g} MB vs {dense_bytes / 1e6:.3g} MB model.pt; max relative error "
          f"{payload['verified_relative_error']:.2g} <= {payload['tolerance']:g})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
