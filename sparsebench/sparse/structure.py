"""Structured sparsity patterns: which masks a sparse kernel can use, as a *sparsity type*.

A `SparsityStructure` constrains the masks the engine installs, whatever the method:

* `unstructured` (default): any entries;
* `nm`: N:M semi-structured sparsity (torch's 2:4 kernels, `to_sparse_semi_structured`). The
  weight is viewed as the 2-D matrix (out, in * k) a kernel multiplies with (a Linear weight as
  it is, a conv weight flattened over in_channels x kernel), and each run of M consecutive
  weights of a row is a group. A mask at level n keeps exactly n entries in every group, so its
  density is n/M; the run's final level is N (density N/M), and GMP passes through the levels
  M, M-1, ..., N on its way there;
* `block`: square b x b blocks of that 2-D view (BSR kernels, `to_sparse_bsr(blocksize=(b, b))`);
  a block is all active or all masked, a block's score is the sum of its entries' scores.

Exact counts. The engine keeps `target_nnz(numel, density)` active entries per tensor; a
structure only admits some counts (multiples of numel/M for N:M, of b*b for blocks), so a
method first rounds each density with `round_density` (N:M: n = target_nnz(M, d) per group;
blocks: target_nnz(num_blocks, d) blocks) and hands the engine the rounded density, stored as
count / numel, which `target_nnz` turns back into the count exactly.

Tensors whose rows are not a multiple of M (N:M), or whose rows or columns are not a multiple of
b (blocks), are refused by `check` with a message naming the tensor: a ragged group or edge
block would make the counts above inexact and no kernel could use the tensor anyway; keep such a
tensor dense with `distribution.dense_layers`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class StructureKind(enum.Enum):
    unstructured = "unstructured"
    nm = "nm"
    block = "block"


def _target_nnz(numel: int, density: float) -> int:
    from sparsebench.sparse.masked import target_nnz  # masked imports this module

    return target_nnz(numel, density)


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    from sparsebench.sparse.masked import topk_mask

    return topk_mask(scores, k)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view (out, in * k) a sparse kernel multiplies with."""
    rows = int(shape[0])
    cols = 1
    for s in shape[1:]:
        cols *= int(s)
    return rows, cols


@dataclass(frozen=True)
class SparsityStructure:
    kind: StructureKind = StructureKind.unstructured
    n: int = 2  # nm: kept entries per group at the final level
    m: int = 4  # nm: group size
    block: int = 16  # block: side of a square block

    @property
    def unstructured(self) -> bool:
        return self.kind is StructureKind.unstructured

    def __str__(self) -> str:
        if self.kind is StructureKind.nm:
            return f"{self.n}:{self.m}"
        if self.kind is StructureKind.block:
            return f"{self.block}x{self.block} blocks"
        return "unstructured"

    @property
    def unit_size(self) -> int:
        """Entries in one block (block), in one group (nm), 1 (unstructured)."""
        if self.kind is StructureKind.block:
            return self.block * self.block
        if self.kind is StructureKind.nm:
            return self.m
        return 1

    # ------------------------------------------------------------------ shape checks
    def check(self, name: str, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise ValueError (one line, naming the tensor) if `shape` cannot carry the structure."""
        rows, cols = matrix_shape(shape)
        keep_dense = f"keep it dense with distribution.dense_layers=[{name}]"
        if self.kind is StructureKind.nm and cols % self.m:
            raise ValueError(
                f"distribution.structure=nm groups m={self.m} consecutive weights of a row, but tensor {name} "
                f"{tuple(shape)} has rows of {cols} weights, not a multiple of {self.m}; {keep_dense} or choose "
                "another distribution.m"
            )
        if self.kind is StructureKind.block and (rows % self.block or cols % self.block):
            raise ValueError(
                f"distribution.structure=block needs both sides of tensor {name} {tuple(shape)} as the matrix "
                f"{rows}x{cols} to be multiples of distribution.block={self.block}; {keep_dense} or choose "
                "another distribution.block"
            )

    # ------------------------------------------------------------------ densities
    def round_density(self, shape: torch.Size | tuple[int, ...], density: float) -> float:
        """The closest density at or above `density` (as target_nnz rounds) that the structure
        admits, as count / numel; unchanged when unstructured."""
        if self.unstructured:
            return density
        rows, cols = matrix_shape(shape)
        numel = rows * cols
        if self.kind is StructureKind.nm:
            count = (numel // self.m) * _target_nnz(self.m, density)
        else:
            blocks = (rows // self.block) * (cols // self.block)
            count = _target_nnz(blocks, density) * self.block * self.block
        return count / numel

    # ------------------------------------------------------------------ blocks <-> entries
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over each block: shape (rows / b, cols / b). Only for `block`."""
        rows, cols = matrix_shape(x.shape)
        b = self.block
        return x.reshape(rows // b, b, cols // b, b).sum(dim=(1, 3))

    def unpool(self, blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Entry-level tensor of `shape` from a per-block tensor (each block's value repeated)."""
        rows, cols = matrix_shape(shape)
        b = self.block
        return blocks[:, None, :, None].expand(rows // b, b, cols // b, b).reshape(shape)

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """N:M groups as rows of an (numel / M, M) view. Only for `nm`."""
        return x.reshape(-1, self.m)

    # ------------------------------------------------------------------ masks
    def topk(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """Boolean mask with exactly target_nnz(numel, density) entries at the largest scores
        that the structure allows: per group (nm) the n largest, or the blocks with the largest
        score sums. `density` must already be rounded (`round_density`)."""
        count = _target_nnz(scores.numel(), density)
        if self.unstructured:
            return _topk(scores, count)
        scores = scores.float()
        if self.kind is StructureKind.nm:
            grouped = self.groups(scores)
            per_group, rest = divmod(count, grouped.shape[0])
            if rest:
                raise ValueError(f"density {density} is not a whole number of entries per group of {self.m}")
            mask = torch.zeros(grouped.shape, dtype=torch.bool, device=scores.device)
            if per_group:
                mask.scatter_(1, grouped.topk(per_group, dim=1).indices, True)
            return mask.view(scores.shape)
        blocks, rest = divmod(count, self.unit_size)
        if rest:
            raise ValueError(f"density {density} is not a whole number of {self}")
        return self.unpool(_topk(self.pool(scores), blocks), scores.shape)

    def grow(self, scores: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Entries to grow after `drop` left the mask: as many as were dropped, where `scores`
        is largest; `scores` is -inf at the entries the drop kept.

        nm: each group regrows as many entries as it lost (so it keeps its n); block: `drop` is
        whole blocks, and as many whole blocks grow, by the sum of their scores."""
        k = int(drop.sum())
        if self.unstructured:
            return _topk(scores, k)
        if self.kind is StructureKind.nm:
            grouped = self.groups(scores)
            lost = self.groups(drop).sum(dim=1, keepdim=True)
            order = grouped.argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(self.m, device=order.device).expand_as(order).contiguous()
            )
            return (rank < lost).view(scores.shape)
        blocks = k // self.unit_size
        return self.unpool(_topk(self.pool(scores), blocks), scores.shape)

    def follows(self, mask: torch.Tensor) -> bool:
        """Does `mask` have the structure? nm: the same count in every group; block: whole blocks."""
        if self.unstructured:
            return True
        if self.kind is StructureKind.nm:
            counts = self.groups(mask).sum(dim=1)
            return bool((counts == counts[0]).all())
        sums = self.pool(mask.to(torch.int32))
        return bool(((sums == 0) | (sums == self.unit_size)).all())


UNSTRUCTURED = SparsityStructure()
