"""The network a DASS search found (`sparsebench search method=dass`), rebuilt for retraining.

DASS (Mousavi et al., "DASS: Differentiable Architecture Search for Sparse Neural Networks",
ACM TECS 2023, arXiv:2207.06968) searches a DARTS cell (Liu et al., "DARTS: Differentiable
Architecture Search", ICLR 2019). This module holds what the search and the derived network
share: the candidate operations, the cell skeleton of DARTS (two inputs, `nodes` intermediate
nodes, the output is the concatenation of the nodes), the network skeleton (a stem, `cells`
cells with reductions at 1/3 and 2/3 of the depth, global pooling, a linear classifier) and the
genotype file. The search itself (the supernet, alphas, sparse weights) is in
sparsebench/search/dass.py; the file format and options are in docs/dass.md.

In the derived network every operation is built from plain nn.Conv1d/Conv2d, BatchNorm and
pooling layers, so the sparsity engine prunes it like any other model: a `sparse_conv_*` op is
an ordinary convolution here, whose sparsity the retraining method sets. No grouped or
depthwise convolution is used (backend=sparse has no path for them).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.errors import UserError
from sparsebench.models import MODELS
from sparsebench.models.common import kaiming_init, require_positive_int

GENOTYPE_FORMAT = "sparsebench-dass-genotype"
GENOTYPE_VERSION = 1
GENOTYPE_MAX_BYTES = 1 << 20  # a genotype is a few hundred bytes; refuse to read anything huge
STEM_MULTIPLIER = 3  # the stem has 3x the first cell's channels, as in DARTS

# Candidate operations: name -> (kind, kernel). Kernel sizes are per spatial axis, so the same
# names serve 1-D signals and 2-D images. `sparse_*` operations hold masked weights during the
# search (DASS's SparseConv / SparseLinear); `sparse_linear` is a linear map of the channels at
# every position, i.e. a 1x1 convolution (our reading of a linear op inside a conv cell).
OPERATIONS: dict[str, tuple[str, int]] = {
    "none": ("none", 0),
    "skip_connect": ("skip", 0),
    "max_pool_3": ("max_pool", 3),
    "avg_pool_3": ("avg_pool", 3),
    "conv_3": ("conv", 3),
    "conv_5": ("conv", 5),
    "sparse_conv_3": ("sparse_conv", 3),
    "sparse_conv_5": ("sparse_conv", 5),
    "sparse_linear": ("sparse_conv", 1),
}
# What a derived cell may contain: every candidate except `none` (discretisation never picks it).
DERIVED_OPERATIONS = tuple(name for name in OPERATIONS if name != "none")


# ---------------------------------------------------------------------------- layers by input rank
@dataclass(frozen=True)
class Layers:
    """The 1-D or 2-D layer classes for inputs (C, L) or (C, H, W)."""

    dims: int
    conv: type
    batch_norm: type
    max_pool: type
    avg_pool: type
    global_pool: type


def layers_for(model: str, input_shape: tuple[int, ...]) -> Layers:
    if len(input_shape) == 2:
        return Layers(1, nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
    if len(input_shape) == 3:
        return Layers(2, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    raise UserError(
        f"model {model!r} expects inputs shaped (C, L) or (C, H, W), got {tuple(input_shape)}; pick a matching dataset"
    )


# A convolution factory: (layers, in_channels, out_channels, kernel, stride, padding, sparse) ->
# module. The derived network uses plain convolutions; the search passes one that makes masked
# convolutions for the `sparse_*` operations.
ConvFactory = Callable[[Layers, int, int, int, int, int, bool], nn.Module]


def plain_conv(layers: Layers, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
               sparse: bool) -> nn.Module:
    return layers.conv(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)  # BN follows: no bias


class ReLUConvBN(nn.Sequential):
    """ReLU, convolution, BatchNorm: DARTS's parametric op order (pre-activation)."""

    def __init__(self, layers: Layers, c_in: int, c_out: int, kernel: int, stride: int, affine: bool,
                 conv: ConvFactory = plain_conv, sparse: bool = False):
        # Not in place: in the supernet one input feeds every candidate operation of an edge.
        super().__init__(
            nn.ReLU(inplace=False),
            conv(layers, c_in, c_out, kernel, stride, kernel // 2, sparse),
            layers.batch_norm(c_out, affine=affine),
        )


class FactorizedReduce(nn.Module):
    """Halve the resolution with two stride-2 1x1 convolutions, the second on the input shifted
    by one position (so together they see every position), concatenated: DARTS's parametric
    skip connection across a reduction."""

    def __init__(self, layers: Layers, c_in: int, c_out: int, affine: bool, conv: ConvFactory = plain_conv):
        super().__init__()
        self.dims = layers.dims
        self.relu = nn.ReLU(inplace=False)
        self.conv_a = conv(layers, c_in, c_out // 2, 1, 2, 0, False)
        self.conv_b = conv(layers, c_in, c_out - c_out // 2, 1, 2, 0, False)
        self.bn = layers.batch_norm(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        # Pad one position at the end and drop the first: both halves get ceil(size / 2) outputs.
        shifted = F.pad(x, (0, 1) * self.dims)[(..., *[slice(1, None)] * self.dims)]
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(shifted)], dim=1))


def build_operation(name: str, layers: Layers, channels: int, stride: int, affine: bool,
                    conv: ConvFactory = plain_conv) -> nn.Module:
    """One candidate operation from `channels` to `channels` channels at `stride` (1 or 2).
    `affine=False` gives the parameter-free BatchNorm DARTS uses in its supernet."""
    kind, kernel = OPERATIONS[name]
    if kind == "skip":
        return nn.Identity() if stride == 1 else FactorizedReduce(layers, channels, channels, affine, conv)
    if kind == "max_pool":
        return layers.max_pool(kernel, stride=stride, padding=kernel // 2)
    if kind == "avg_pool":
        return layers.avg_pool(kernel, stride=stride, padding=kernel // 2, count_include_pad=False)
    if kind in ("conv", "sparse_conv"):
        return ReLUConvBN(layers, channels, channels, kernel, stride, affine, conv, sparse=kind == "sparse_conv")
    raise ValueError(f"operation {name!r} has no module")  # `none`: the supernet skips it, genotypes never hold it


# ---------------------------------------------------------------------------- skeleton
def reduction_cells(cells: int) -> set[int]:
    """Indices of the reduction cells: at 1/3 and 2/3 of the depth, as in DARTS."""
    return {cells // 3, 2 * cells // 3}


def cell_inputs(cell, layers: Layers, c_prev_prev: int, c_prev: int, channels: int, reduction_prev: bool,
                affine: bool, conv: ConvFactory = plain_conv) -> None:
    """Give `cell` its two input adapters (`preprocess0`, `preprocess1`), registered first since
    they run first. The cell before a reduction cell has twice the resolution of the previous
    one, so its output is reduced on the way in."""
    if reduction_prev:
        cell.preprocess0 = FactorizedReduce(layers, c_prev_prev, channels, affine, conv)
    else:
        cell.preprocess0 = ReLUConvBN(layers, c_prev_prev, channels, 1, 1, affine, conv)
    cell.preprocess1 = ReLUConvBN(layers, c_prev, channels, 1, 1, affine, conv)


class CellNetwork(nn.Module):
    """Stem, cells, global pooling and classifier; `make_cell(index, c_prev_prev, c_prev,
    channels, reduction, reduction_prev)` builds each cell, which reports `out_channels`."""

    def __init__(self, layers: Layers, input_shape: tuple[int, ...], num_classes: int, channels: int, cells: int,
                 make_cell: Callable[..., nn.Module], affine: bool = True):
        super().__init__()
        stem_channels = STEM_MULTIPLIER * channels
        self.stem = nn.Sequential(
            layers.conv(input_shape[0], stem_channels, 3, padding=1, bias=False),
            layers.batch_norm(stem_channels, affine=affine),
        )
        c_prev_prev, c_prev, width = stem_channels, stem_channels, channels
        reduction_prev = False
        self.cells = nn.ModuleList()
        for index in range(cells):
            reduction = index in reduction_cells(cells)
            if reduction:
                width *= 2  # channels double where the resolution halves
            cell = make_cell(index, c_prev_prev, c_prev, width, reduction, reduction_prev)
            self.cells.append(cell)
            c_prev_prev, c_prev, reduction_prev = c_prev, cell.out_channels, reduction
        self.global_pool = layers.global_pool(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def run_cell(self, cell: nn.Module, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        return cell(s0, s1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, self.run_cell(cell, s0, s1)
        return self.classifier(self.global_pool(s1).flatten(1))


# ---------------------------------------------------------------------------- genotype
@dataclass(frozen=True)
class Genotype:
    """A discretised cell pair. `normal[i]` lists node i's incoming edges as (operation, input):
    input 0 is the output of the cell two back, 1 the previous cell's, 2 + j intermediate node j."""

    normal: list[list[tuple[str, int]]]
    normal_concat: list[int]
    reduce: list[list[tuple[str, int]]]
    reduce_concat: list[int]

    def to_json(self) -> dict:
        def cell(nodes):
            return [[{"op": op, "input": index} for op, index in node] for node in nodes]

        return {"format": GENOTYPE_FORMAT, "version": GENOTYPE_VERSION,
                "normal": cell(self.normal), "normal_concat": list(self.normal_concat),
                "reduce": cell(self.reduce), "reduce_concat": list(self.reduce_concat)}


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_cell(data: dict, key: str) -> tuple[list[list[tuple[str, int]]], list[int]]:
    """One cell of a genotype file; ValueError with the reason."""
    nodes = data.get(key)
    if not isinstance(nodes, list) or not nodes:
        raise ValueError(f"{key!r} must be a non-empty list of nodes")
    cell = []
    for i, node in enumerate(nodes):
        if not isinstance(node, list) or not node:
            raise ValueError(f"{key}[{i}] must be a non-empty list of edges")
        edges = []
        for edge in node:
            op = edge.get("op") if isinstance(edge, dict) else None
            index = edge.get("input") if isinstance(edge, dict) else None
            if op not in DERIVED_OPERATIONS:
                raise ValueError(f"{key}[{i}] has unknown operation {op!r} (known: {', '.join(DERIVED_OPERATIONS)})")
            if not _int(index) or not 0 <= index < 2 + i:
                raise ValueError(f"{key}[{i}] has input {index!r}; node {i} takes inputs 0..{i + 1}")
            edges.append((op, index))
        cell.append(edges)
    concat = data.get(f"{key}_concat")
    valid = range(2, 2 + len(nodes))
    if (not isinstance(concat, list) or not concat or len(set(map(str, concat))) != len(concat)
            or not all(_int(c) and c in valid for c in concat)):
        raise ValueError(f"'{key}_concat' must list distinct node outputs in {valid.start}..{valid.stop - 1}")
    return cell, concat


def genotype_digest(path: str) -> str:
    """The first 16 hex digits of the sha256 of a genotype file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_genotype(path: str) -> Genotype:
    """Read and check a genotype file written by `sparsebench search method=dass`; one-line
    UserError naming the file for anything wrong with it."""
    file = Path(path)

    def bad(reason: str) -> UserError:
        return UserError(f"model.genotype={path}: {reason}; pass a genotype.json written by "
                         "`sparsebench search method=dass`")

    if not file.is_file():
        raise bad("no such file" if not file.exists() else "not a regular file")
    try:
        if file.stat().st_size > GENOTYPE_MAX_BYTES:
            raise bad(f"larger than {GENOTYPE_MAX_BYTES} bytes, not a genotype")
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise bad(f"cannot read it ({exc.strerror or exc.__class__.__name__})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != GENOTYPE_FORMAT:
        raise bad(f"not a DASS genotype (its 'format' is not {GENOTYPE_FORMAT!r})")
    if data.get("version") != GENOTYPE_VERSION:
        raise bad(f"genotype version {data.get('version')!r}; this sparsebench reads version {GENOTYPE_VERSION}")
    try:
        normal, normal_concat = _parse_cell(data, "normal")
        reduce, reduce_concat = _parse_cell(data, "reduce")
    except ValueError as exc:
        raise bad(str(exc)) from None
    return Genotype(normal, normal_concat, reduce, reduce_concat)


# ---------------------------------------------------------------------------- the derived network
class DerivedCell(nn.Module):
    """A cell with the genotype's edges only (DARTS's evaluation cell, without drop-path)."""

    def __init__(self, layers: Layers, nodes: list[list[tuple[str, int]]], concat: list[int], c_prev_prev: int,
                 c_prev: int, channels: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        cell_inputs(self, layers, c_prev_prev, c_prev, channels, reduction_prev, affine=True)
        # Edges registered in the order forward runs them (the sparsity engine orders by it).
        self.edges = nn.ModuleList(
            build_operation(op, layers, channels, 2 if reduction and index < 2 else 1, affine=True)
            for node in nodes for op, index in node
        )
        self.inputs = [[index for _, index in node] for node in nodes]
        self.concat = list(concat)
        self.out_channels = len(concat) * channels

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        edge = 0
        for inputs in self.inputs:
            total = 0
            for index in inputs:
                total = total + self.edges[edge](states[index])
                edge += 1
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


@MODELS.register("dass")
def dass(input_shape: tuple[int, ...], num_classes: int, *, genotype: str | None = None, channels: int = 8,
         cells: int = 3, genotype_sha256: str | None = None) -> nn.Module:
    """The cell network of a DASS genotype file (`model.genotype=PATH`), with `channels` in the
    first cell and `cells` cells; defaults match the search's supernet (conf/method/dass.yaml),
    and a deeper or wider network than the one searched is the DARTS practice.

    `genotype_sha256` (set by `method.retrain`) ties a run to the file's content: a run's
    directory is named by its config, which holds the path, so a search redone with a different
    result would otherwise leave finished runs of the old cell looking current."""
    if genotype is None:
        raise UserError("model=dass needs model.genotype=PATH: the genotype.json written by "
                        "`sparsebench search method=dass` (in the search's run directory)")
    require_positive_int("dass", "channels", channels)
    require_positive_int("dass", "cells", cells)
    layers = layers_for("dass", input_shape)
    found = read_genotype(genotype)
    if genotype_sha256 is not None and genotype_digest(genotype) != genotype_sha256:
        raise UserError(f"model.genotype={genotype}: the file changed since this run was configured "
                        f"(sha256 {genotype_digest(genotype)}, expected {genotype_sha256}); retrain it with the "
                        "search's method.retrain, or drop model.genotype_sha256")

    def make_cell(index, c_prev_prev, c_prev, width, reduction, reduction_prev):
        nodes, concat = (found.reduce, found.reduce_concat) if reduction else (found.normal, found.normal_concat)
        return DerivedCell(layers, nodes, concat, c_prev_prev, c_prev, width, reduction, reduction_prev)

    model = CellNetwork(layers, input_shape, num_classes, channels, cells, make_cell)
    kaiming_init(model)
    return model
