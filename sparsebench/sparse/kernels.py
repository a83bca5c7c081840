"""Sparse kernels: a masked dense weight turned into a real sparse operand, and multiplied by it.

Training keeps masks on dense tensors (masked.py). For inference this module converts each
prunable weight, seen as the matrix (out, in * k) that structure.py describes, into one of

* ``csr``: torch's sparse CSR (any mask), multiplied by MKL's sparse BLAS on CPU, cuSPARSE on CUDA;
* ``bsr``: torch's block-sparse rows with square b x b blocks (``to_sparse_bsr((b, b))``): both
  sides must be multiples of b (refused by name otherwise); a block mask of the same side
  (``distribution.structure=block``) stores exactly its blocks, any other mask stores every
  block that holds a non-zero, zeros included;
* ``semi_structured``: torch's 2:4 ``to_sparse_semi_structured``: CUDA only, compute
  capability 8.0+, float16/bfloat16, the shape multiples torch's backend requires, at most 2
  non-zeros in every group of 4 consecutive weights of a row. Anything else is refused with one
  line naming the reason (``semi_structured_problem``).

and provides drop-in modules: `SparseLinear` and `SparseConv1d` / `SparseConv2d` (im2col: a
strided view copied into patches, then one sparse GEMM), and `sparsify(model, fmt, ...)`, which
swaps them in place.

How y = x W^T is computed (measured, benchmarks/bench_kernels.py; 4096x4096 fp32, batch 256,
2 threads). torch offers no dense @ sparse product on CPU and ``F.linear(x, W_csr)`` is 3-15x
slower than dense, so the product is taken transposed, y^T = W x^T, with
``torch.sparse.mm(W, x^T)`` / ``torch.addmm`` (MKL ``mkl_sparse_s_mm``), and y is returned as the
transposed view of y^T (no copy back). Three things decide the speed:

1. int32 indices. torch's MKL bridge is LP64: int64 CSR/BSR indices are converted to int32 on
   every call. `to_sparse` stores int32 indices (when they fit): CSR 1.4x -> 2.0x dense at s=0.9.
2. Batch chunks that fit the cache. MKL's row-major CSR x dense product adds, for every stored
   weight W[i, k], the whole row k of x^T (batch floats) into row i of the result, at random k: it
   runs at cache speed only while the dense operand x^T (in x batch) fits in L2 (2 MiB a core
   here). So x^T is cut into column chunks of at most ``CSR_CHUNK_BYTES`` (1 MiB: 64 columns of a
   4096-wide layer), each copied contiguous and multiplied with ``torch.addmm(..., out=)``
   straight into its column slice of the result (7 % faster than concatenating pieces). At
   s = 0.9 this took CSR from 1.15x to 2.0x and from 1.1x to 2.8x dense in two measurements on
   a quiet-ish machine. BSR reads a b-row slab of x^T per block, so its chunk is sized for L1
   (``BSR_CHUNK_BYTES`` = 32 KiB: no chunking at batch 256 for 16 and 32 blocks, 128 columns
   for 64 blocks, which measured best for each side). Chunking runs one MKL parallel region per
   chunk; on a machine whose cores are busy with other work every region waits for a
   descheduled thread, which can make chunked calls slower than one call.
3. The copies around the product. At s = 0.98 the product itself is so short that making x^T
   contiguous was a third of the call: `transposed_copy` copies it in 16 x 16 tiles (0.74 ms
   instead of 1.18 ms for 256 x 4096 on 2 threads), and in one-call products the bias is the C
   that MKL accumulates into instead of a separate pass. Together, in one interleaved run at
   s = 0.98: CSR 6.1x -> 7.8x, BSR-32 7.5x -> 9.7x dense (the input's transpose only; the
   bias' share was measured separately: 7-16 % of one call).
4. Nothing else helped: ``W @ x^T`` (the same call), a contiguous copy of x^T before one call (no
   gain), a column-major operand and output (x itself and ``out=`` a transposed buffer, so
   neither x nor y is transposed: MKL's column-major product is 4-8x slower), and scipy.sparse
   (single-threaded: 0.7x dense at s = 0.9; not a dependency).

Convolutions use the same product on im2col patches: the (explicitly ``F.pad``-ded, so every
padding mode and ``padding='same'`` work) input's receptive fields are taken as a strided view
(N, C, *out, *kernel) and copied once, per chunk of samples, into the (C*k, n*L) operand; the
product is written into (N, out, L). That copy is half the cost of ``F.unfold`` plus a transpose
(measured on a 64-channel 3x3 conv, 16x16 inputs, batch 64), but the im2col still copies k times
the input, so against oneDNN's direct dense convolution the sparse conv wins only at high
sparsity (about break-even at s = 0.9 on that layer, one thread); `bench` measures it per model.
``groups > 1`` is supported for CSR (the grouped weight is stored as its block-diagonal
(out, C*k) matrix, whose extra zeros CSR does not store) and refused by name for BSR and
semi-structured. Conv3d is refused by name.

Equality with the masked dense model: for fp32, ``relative_error(sparse, dense) <= 1e-4``
(max |difference| over max(1, max |dense output|)); tests/test_export.py checks it on CPU for
CSR and BSR, for Linear, Conv1d, Conv2d and whole registered models. Observed errors are about
1e-6 (summation order only). Semi-structured fp16/bf16 outputs are compared with the dense
model in the same dtype at 1e-2 (fp16) / 2e-2 (bf16), on CUDA only.

The modules are for inference: the sparse weight is a buffer, not a parameter, so it gets no
gradient (2:4 has no autograd through the sparse weight either). Gradients with respect to the
input flow through CSR; torch has no CPU kernel for the transposed BSR (BSC) product they need,
so a BSR module on the CPU refuses, in one line, an input that requires grad while grad mode is
on. Sparse *training* belongs to `sparsebench.sparse.backend`.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.errors import UserError

FORMATS = ("csr", "bsr", "semi_structured")
BLOCK_SIZES = (16, 32, 64)  # the block sides benchmarked; any side dividing both matrix sides works
DEFAULT_BLOCK = 32

# fp32: max |sparse - dense| <= RTOL * max(1, max |dense|); see `relative_error`.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# Bytes of the dense operand x^T per chunk (see the module docstring, point 2).
CSR_CHUNK_BYTES = 1 << 20
BSR_CHUNK_BYTES = 32 << 10
MIN_CHUNK = 16  # columns; never chunk finer than this
TRANSPOSE_TILE = 16  # see `transposed_copy`

_INT32_MAX = 2**31 - 1

_BETA_WARNING = r"Sparse (CSR|CSC|BSR|BSC) tensor support is in beta state"


@contextlib.contextmanager
def quiet_beta_warning() -> Iterator[None]:
    """torch warns that compressed sparse layouts are "beta" on first use; known, and stated here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING)
        yield


class SparseFormatError(UserError):
    """A weight or device that cannot use the requested sparse format; one line, naming why."""


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|): the measure `TOLERANCE` bounds."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return float((actual - expected).abs().max()) / scale if expected.numel() else 0.0


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D (out, in * k) view of a linear or conv weight that kernels multiply with."""
    return weight.detach().reshape(weight.shape[0], -1)


# ---------------------------------------------------------------------------- conversions
def _int32_indices(sparse: torch.Tensor) -> torch.Tensor:
    """The same CSR/BSR tensor with int32 indices (MKL's LP64 interface), when they fit."""
    crow, col = sparse.crow_indices(), sparse.col_indices()
    if crow.dtype == torch.int32 or (crow.numel() and int(crow[-1]) > _INT32_MAX) or max(sparse.shape) > _INT32_MAX:
        return sparse
    build = torch.sparse_csr_tensor if sparse.layout == torch.sparse_csr else torch.sparse_bsr_tensor
    # The indices come from torch's own conversion: valid by construction, so no O(nnz) re-check.
    return build(crow.to(torch.int32), col.to(torch.int32), sparse.values(), sparse.shape,
                 dtype=sparse.dtype, device=sparse.device, check_invariants=False)


def check_block(shape: tuple[int, int], block: int | None, name: str = "weight") -> int:
    """The block side, after checking that it divides both sides of the (out, in*k) matrix."""
    if block is None:
        raise SparseFormatError(f"{name}: format bsr needs a block side (e.g. --block {DEFAULT_BLOCK})")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise SparseFormatError(f"{name}: BSR block side must be a positive whole number, got {block!r}")
    rows, cols = shape
    if rows % block or cols % block:
        raise SparseFormatError(
            f"{name}: BSR with {block}x{block} blocks needs both sides of its {rows}x{cols} matrix to be "
            f"multiples of {block}; keep the layer dense or choose a block side dividing both"
        )
    return block


def to_sparse(weight_2d: torch.Tensor, fmt: str, block: int | None = None, name: str = "weight") -> torch.Tensor:
    """A dense (out, in*k) matrix as a sparse operand: CSR, BSR (b x b blocks) or 2:4 semi-structured.

    CSR and BSR get int32 indices; their values equal the dense entries exactly. BSR refuses a
    shape whose sides are not multiples of `block`; semi-structured refuses anything
    `semi_structured_problem` names. Errors are `SparseFormatError` (one line, naming `name`).
    """
    if weight_2d.dim() != 2:
        raise SparseFormatError(f"{name}: expected a 2-D matrix, got shape {tuple(weight_2d.shape)}")
    weight_2d = weight_2d.detach()
    if fmt == "csr":
        with quiet_beta_warning():
            return _int32_indices(weight_2d.to_sparse_csr())
    if fmt == "bsr":
        block = check_block(tuple(weight_2d.shape), block, name)
        with quiet_beta_warning():
            return _int32_indices(weight_2d.contiguous().to_sparse_bsr((block, block)))
    if fmt == "semi_structured":
        return to_semi_structured(weight_2d, name)
    raise SparseFormatError(f"unknown sparse format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (sparse or dense) tensor holds: values plus indices or metadata."""
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (tensor.crow_indices(), tensor.col_indices(), tensor.values())
    elif tensor.layout == torch.sparse_coo:
        parts = (tensor._indices(), tensor._values())
    elif isinstance(tensor, torch.sparse.SparseSemiStructuredTensor):
        names, _ = tensor.__tensor_flatten__()  # packed values and metadata (and their transposes)
        parts = tuple(t for t in (getattr(tensor, n) for n in names) if t is not None)
    else:
        parts = (tensor,)
    return sum(p.numel() * p.element_size() for p in parts)


# ---------------------------------------------------------------------------- 2:4 on CUDA
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def _semi_structured_backend():
    """The torch class `to_sparse_semi_structured` would use: cuSPARSELt unless forced/absent."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_cusparselt = bool(cusparselt is not None and cusparselt.is_available())
    if SparseSemiStructuredTensor._FORCE_CUTLASS or not has_cusparselt:
        return SparseSemiStructuredTensorCUTLASS, has_cusparselt
    return SparseSemiStructuredTensorCUSPARSELT, has_cusparselt


def semi_structured_device_problem(device: torch.device | str | None = None) -> str | None:
    """Why 2:4 semi-structured kernels cannot run on `device` (None: they can).

    Requirements (torch/sparse/semi_structured.py): a CUDA tensor; compute capability 8.0+; the
    CUTLASS kernels are built for SM 8.x only, so newer GPUs (Hopper SM 9.0, ...) need cuSPARSELt.
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    )
    prefix = ("2:4 semi-structured sparsity (torch.sparse.to_sparse_semi_structured) runs only on CUDA GPUs of "
              "compute capability 8.0+")
    if device.type != "cuda":
        if not torch.cuda.is_available():
            return f"{prefix}; no CUDA GPU is available here"
        return f"{prefix}; the model is on {device.type}"
    if not torch.cuda.is_available():
        return f"{prefix}; no CUDA GPU is available here"
    major, minor = torch.cuda.get_device_capability(device)
    gpu = torch.cuda.get_device_name(device)
    if major < 8:
        return f"{prefix}; {gpu} has compute capability {major}.{minor}"
    backend, has_cusparselt = _semi_structured_backend()
    if major >= 9 and backend.BACKEND == "cutlass":
        why = "this torch build has no cuSPARSELt" if not has_cusparselt else "CUTLASS is forced"
        return (f"{prefix} with CUTLASS kernels built for SM 8.x only; {gpu} (SM {major}.{minor}) needs cuSPARSELt, "
                f"and {why}")
    return None


def semi_structured_problem(weight_2d: torch.Tensor, name: str = "weight") -> str | None:
    """Why `weight_2d` cannot become a 2:4 semi-structured tensor (None: it can).

    Checks, in order: device and capability, dtype (float16/bfloat16), the shape multiples of
    torch's backend (cuSPARSELt: 16 x 16, CUTLASS: 32 rows x 64 columns for 16-bit types), and
    the 2:4 pattern (at most 2 non-zeros in every group of 4 consecutive weights of a row).
    """
    problem = semi_structured_device_problem(weight_2d.device)
    if problem:
        return problem
    return semi_structured_weight_problem(weight_2d, name)


def semi_structured_weight_problem(weight_2d: torch.Tensor, name: str = "weight") -> str | None:
    """The device-independent part of `semi_structured_problem`: dtype, shape multiples
    (`semi_structured_shape_problem`), 2:4 pattern."""
    if weight_2d.dtype not in SEMI_STRUCTURED_DTYPES:
        return (f"{name}: 2:4 semi-structured kernels need float16 or bfloat16 weights, got "
                f"{str(weight_2d.dtype).replace('torch.', '')} (convert the model with .half() or .bfloat16())")
    rows, cols = weight_2d.shape
    problem = semi_structured_shape_problem(rows, cols, weight_2d.dtype, name)
    if problem:
        return problem
    over = count_nm_violations(weight_2d, 2, 4)
    if over:
        return (f"{name}: {over} of {rows * cols // 4} groups of 4 consecutive weights hold more than 2 non-zeros; "
                "2:4 semi-structured needs a run trained with distribution.structure=nm (n=2, m=4)")
    return None


def semi_structured_shape_problem(rows: int, cols: int, dtype: torch.dtype, name: str = "weight") -> str | None:
    """Why a rows x cols matrix of `dtype` misses the shape multiples of the 2:4 backend torch would
    use here (cuSPARSELt when available, else CUTLASS; without CUDA both backends' multiples)."""
    if torch.cuda.is_available():
        backends = [_semi_structured_backend()[0]]
    else:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

        backends = [SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS]
    for backend in backends:
        need = backend._DTYPE_SHAPE_CONSTRAINTS[dtype]
        if rows % need.sparse_min_rows or cols % need.sparse_min_cols:
            return (f"{name}: 2:4 semi-structured ({backend.BACKEND}) needs the {rows}x{cols} matrix's rows to be a "
                    f"multiple of {need.sparse_min_rows} and its columns of {need.sparse_min_cols} for "
                    f"{str(dtype).replace('torch.', '')}; keep the layer dense")
    return None


def count_nm_violations(weight_2d: torch.Tensor, n: int, m: int) -> int:
    """Groups of m consecutive weights of a row holding more than n non-zeros (cols % m == 0)."""
    rows, cols = weight_2d.shape
    if cols % m:
        raise SparseFormatError(f"rows of {cols} weights cannot be cut into groups of {m}")
    groups = (weight_2d.detach() != 0).reshape(rows, cols // m, m).sum(-1)
    return int((groups > n).sum())


def to_semi_structured(weight_2d: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """A 2:4 `SparseSemiStructuredTensor` of `weight_2d`, or a one-line `SparseFormatError`."""
    problem = semi_structured_problem(weight_2d, name)
    if problem:
        raise SparseFormatError(problem)
    return semi_structured_from_dense(weight_2d)


def semi_structured_from_dense(weight_2d: torch.Tensor) -> torch.Tensor:
    """`to_semi_structured` without its checks, for a caller that made them once (the 2:4 training
    path compresses every step, and the pattern check would cost a GPU-to-CPU sync each time)."""
    # The class whose shape rules semi_structured_shape_problem checks (torch's to_sparse_semi_structured
    # picks cuSPARSELt unless CUTLASS is forced, even where this torch has no cuSPARSELt).
    backend, _ = _semi_structured_backend()
    return backend.from_dense(weight_2d.detach().contiguous())


def pack_2_4(weight_2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-independent 2:4 storage: (values (out, in/2), positions uint8 (out, in/2) in 0..3).

    Each group of 4 keeps its 2 non-zeros (padded with zero-valued entries at zero positions when
    a group has fewer), in increasing position order; `unpack_2_4` inverts it exactly.
    """
    rows, cols = weight_2d.shape
    groups = weight_2d.detach().reshape(rows, cols // 4, 4)
    # Non-zeros first (ties in position order): stable sort on "is zero".
    order = torch.sort((groups == 0).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    positions = torch.sort(order, dim=-1).values
    values = torch.gather(groups, -1, positions)
    return values.reshape(rows, cols // 2).contiguous(), positions.to(torch.uint8).reshape(rows, cols // 2).contiguous()


def unpack_2_4(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    rows, half = values.shape
    dense = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions.reshape(rows, half // 2, 2).long(), values.reshape(rows, half // 2, 2))
    return dense.reshape(rows, half * 2)


# ---------------------------------------------------------------------------- the product
def chunk_columns(fmt: str, rows_of_operand: int, element_size: int, block: int | None = None) -> int | None:
    """Columns of x^T per sparse call on CPU (None: one call), see the module docstring, point 2."""
    if fmt == "csr":
        per_column = rows_of_operand * element_size
        budget = CSR_CHUNK_BYTES
    elif fmt == "bsr":
        per_column = (block or DEFAULT_BLOCK) * element_size
        budget = BSR_CHUNK_BYTES
    else:
        return None
    columns = budget // max(per_column, 1)
    return max(MIN_CHUNK, columns // MIN_CHUNK * MIN_CHUNK)


def transposed_copy(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix.t().contiguous()``, the same values, copied faster where that was measured.

    The (in, n) operand of the product is the transpose of the (n, in) input, and on 2 threads
    torch's plain transposing copy of a 256 x 4096 fp32 input took 1.18 ms, a third of a whole
    s = 0.98 BSR product. Copied as 16 x 16 tiles (the same copy seen as a 4-D permute, whose
    inner loop reads and writes 16 contiguous floats) it took 0.74 ms on 2 threads, but 1.40 ms
    against the plain 0.93 ms on one thread; so tiles are used on CPU with more than one thread
    (measured with 1 and 2 threads only, on this project's 2-core machine). No copy at all when
    the transpose is already contiguous (the input is the output of a sparse layer)."""
    transpose = matrix.t()
    if transpose.is_contiguous():
        return transpose
    rows, cols = matrix.shape
    tile = TRANSPOSE_TILE
    if (matrix.device.type != "cpu" or torch.get_num_threads() < 2 or matrix.stride(1) != 1
            or rows < tile or cols < tile):
        return transpose.contiguous()
    out = torch.empty((cols, rows), dtype=matrix.dtype, device=matrix.device)
    r0, c0 = rows - rows % tile, cols - cols % tile
    # out[c, r] = matrix[r, c] over whole tiles: tile (i, j) of the input becomes tile (j, i)
    out[:c0, :r0].view(c0 // tile, tile, r0 // tile, tile).copy_(
        matrix[:r0, :c0].view(r0 // tile, tile, c0 // tile, tile).permute(2, 3, 0, 1))
    if r0 < rows:  # the ragged edges, plainly
        out[:, r0:].copy_(matrix[r0:].t())
    if c0 < cols:
        out[c0:, :r0].copy_(matrix[:r0, c0:].t())
    return out


def sparse_mm_t(weight: torch.Tensor, x_t: torch.Tensor, chunk: int | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """W @ x_t (+ bias per row), (out, n), for a CSR/BSR `weight` and a dense (in, n) `x_t`,
    `chunk` columns at a time."""
    n = x_t.shape[1]
    if x_t.device.type != "cpu" and weight.layout == torch.sparse_bsr:
        # torch's CUDA BSR product takes its Triton kernel only when n is a multiple of the block
        # side (else a slower gather / index_add_ path with atomics): pad with zero columns.
        block = weight.values().shape[-1]
        pad = -n % block
        if pad:
            y_t = torch.sparse.mm(weight, F.pad(x_t, (0, pad)))[:, :n]
            return y_t if bias is None else y_t.add_(bias.unsqueeze(1))
    # out= products have no autograd: a product that needs a gradient is one call
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (weight, x_t, bias))
    if chunk is None or n <= chunk or x_t.device.type != "cpu" or differentiable:
        operand = transposed_copy(x_t.t())  # x_t itself when it is contiguous
        if bias is None:
            return torch.sparse.mm(weight, operand)
        # The bias as the product's C, which MKL accumulates into: 7-16 % faster than adding it
        # afterwards at s = 0.9-0.98 (CSR and BSR, 4096 x 4096, 64-256 columns, 2 threads).
        return torch.addmm(bias.unsqueeze(1), weight, operand)
    out = torch.empty(weight.shape[0], n, dtype=x_t.dtype, device=x_t.device)
    for start in range(0, n, chunk):
        # Written in place into the column slice (beta=0: its old contents are never read); 7 %
        # faster than concatenating the pieces afterwards. Here the bias goes in afterwards: as C
        # of every chunk's product it measured no faster for BSR and slower for CSR.
        piece = out[:, start:start + chunk]
        torch.addmm(piece, weight, transposed_copy(x_t[:, start:start + chunk].t()), beta=0, out=piece)
    return out if bias is None else out.add_(bias.unsqueeze(1))


# ---------------------------------------------------------------------------- modules
class _SparseModule(nn.Module):
    """Common state: the sparse (out, in*k) weight (a buffer), the bias, the format and chunk."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, block: int | None,
                 weight_shape: tuple[int, ...], chunk: int | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise SparseFormatError(f"unknown sparse format {fmt!r}; choose one of: {', '.join(FORMATS)}")
        self.fmt = fmt
        self.block = block if fmt == "bsr" else None
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if chunk is None and fmt in ("csr", "bsr"):
            chunk = chunk_columns(fmt, int(weight.shape[1]), weight.element_size(), self.block)
        self.chunk = chunk

    def _check_backward(self, x: torch.Tensor) -> None:
        """Refuse, in one line, a forward whose backward torch cannot run (instead of a traceback later)."""
        if self.fmt == "bsr" and x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad:
            raise SparseFormatError(
                "BSR backward: torch has no CPU kernel for the transposed (BSC) product that input gradients need; "
                "run the model under torch.no_grad() or torch.inference_mode(), or use csr"
            )

    def _matmul_t(self, x_t: torch.Tensor) -> torch.Tensor:
        """W @ x_t (out, n) for a dense (in, n) operand and a CSR/BSR W, with the bias added per row."""
        return sparse_mm_t(self.weight, x_t, self.chunk, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor of the original shape (for checks and export)."""
        return self.weight.to_dense().reshape(self.weight_shape)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel() if self.fmt in ("csr", "bsr") else "2:4"
        block = f", block={self.block}" if self.block else ""
        return f"{self.fmt}{block}, weight={tuple(self.weight_shape)}, stored={nnz}, bias={self.bias is not None}"


class SparseLinear(_SparseModule):
    """nn.Linear with a CSR, BSR or 2:4 weight; same outputs (within `TOLERANCE`), inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, block: int | None = None,
                 chunk: int | None = None):
        super().__init__(weight, bias, fmt, block, tuple(weight.shape), chunk)
        self.out_features, self.in_features = (int(s) for s in weight.shape)

    @classmethod
    def from_dense(cls, linear: nn.Linear, fmt: str, block: int | None = None, name: str = "weight") -> "SparseLinear":
        weight = to_sparse(weight_matrix(linear.weight), fmt, block, name)
        return cls(weight, linear.bias, fmt, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_backward(x)
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        if self.fmt == "semi_structured":  # torch's 2:4 kernels take dense @ sparse^T; padding is torch's
            y = F.linear(x2d, self.weight, self.bias)
        else:
            y = self._matmul_t(x2d.t()).t()
        return y.reshape(*lead, self.out_features)


def _pair(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class _SparseConvNd(_SparseModule):
    """Convolution as im2col (a strided view, copied once) + one sparse GEMM per chunk of samples;
    groups via a block-diagonal weight."""

    dims = 2

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, block: int | None,
                 weight_shape: tuple[int, ...], stride, padding, dilation, groups: int = 1,
                 padding_mode: str = "zeros", chunk: int | None = None):
        super().__init__(weight, bias, fmt, block, weight_shape, chunk)
        self.out_channels = int(weight_shape[0])
        self.in_channels = int(weight_shape[1]) * groups
        self.kernel_size = tuple(int(k) for k in weight_shape[2:])
        self.stride = _pair(stride, self.dims)
        self.dilation = _pair(dilation, self.dims)
        self.groups = groups
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * self.dims
            elif padding != "same":
                raise SparseFormatError(f"unknown conv padding {padding!r}")
        self.padding = padding if padding == "same" else _pair(padding, self.dims)
        self._pads = self._pad_amounts()

    @classmethod
    def from_dense(cls, conv: nn.Module, fmt: str, block: int | None = None, name: str = "weight") -> "_SparseConvNd":
        if conv.groups > 1 and fmt != "csr":
            raise SparseFormatError(
                f"{name}: grouped convolution (groups={conv.groups}) is supported only as csr, not {fmt}; "
                "keep the layer dense or export as csr"
            )
        matrix = weight_matrix(conv.weight)
        if conv.groups > 1:
            matrix = block_diagonal(conv.weight.detach(), conv.groups)
        weight = to_sparse(matrix, fmt, block, name)
        return cls(weight, conv.bias, fmt, block, tuple(conv.weight.shape), conv.stride, conv.padding,
                   conv.dilation, conv.groups, conv.padding_mode)

    def _pad_amounts(self) -> tuple[int, ...]:
        """F.pad's (last-dim-first) amounts that the module's padding adds, 'same' included."""
        pads: list[int] = []
        for axis in reversed(range(self.dims)):
            if self.padding == "same":
                total = self.dilation[axis] * (self.kernel_size[axis] - 1)
                left = total // 2
                pads += [left, total - left]
            else:
                pads += [self.padding[axis], self.padding[axis]]
        return tuple(pads)

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """The (padded) input's receptive fields as a strided view (N, C, *out_spatial, *kernel): no copy."""
        spatial = x.shape[2:]
        out_spatial = [
            (size - d * (k - 1) - 1) // s + 1
            for size, k, d, s in zip(spatial, self.kernel_size, self.dilation, self.stride)
        ]
        if any(o < 1 for o in out_spatial):
            raise RuntimeError(
                f"input of spatial size {tuple(spatial)} is smaller than the (dilated) kernel {self.kernel_size}"
            )
        strides = x.stride()
        return x.as_strided(
            (*x.shape[:2], *out_spatial, *self.kernel_size),
            (*strides[:2], *(st * s for st, s in zip(strides[2:], self.stride)),
             *(st * d for st, d in zip(strides[2:], self.dilation))),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_backward(x)
        if any(self._pads):
            if self.padding_mode == "zeros":
                x = F.pad(x, self._pads)
            else:
                x = F.pad(x, self._pads, mode=self.padding_mode)
        view = self.windows(x)  # (N, C, *O, *K)
        n, dims = x.shape[0], self.dims
        out_spatial = view.shape[2:2 + dims]
        length = math.prod(out_spatial)
        # im2col in the layout the product needs, (C * k, samples * L), in one strided copy
        # (2x faster than F.unfold followed by a transpose).
        order = (1, *range(2 + dims, 2 + 2 * dims), 0, *range(2, 2 + dims))
        rows = self.weight.shape[1]
        if self.fmt == "semi_structured":  # torch's 2:4 kernels take dense @ sparse^T: patches as rows
            patches = view.permute(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)).reshape(n * length, rows)
            y = F.linear(patches, self.weight, self.bias)  # (N * L, out)
            return y.reshape(n, length, self.out_channels).transpose(1, 2).reshape(n, self.out_channels, *out_spatial)
        y = torch.empty(n, self.out_channels, length, dtype=x.dtype, device=x.device)
        per_call = n if self.chunk is None or x.device.type != "cpu" else max(1, self.chunk // max(length, 1))
        for start in range(0, n, per_call):
            part = view[start:start + per_call]
            count = part.shape[0]
            out = torch.sparse.mm(self.weight, part.permute(order).reshape(rows, count * length))
            if self.bias is not None:
                out.add_(self.bias.unsqueeze(1))
            y[start:start + count] = out.reshape(self.out_channels, count, length).transpose(0, 1)
        return y.reshape(n, self.out_channels, *out_spatial)


class SparseConv2d(_SparseConvNd):
    dims = 2


class SparseConv1d(_SparseConvNd):
    dims = 1


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight (out, C/g, *k) as the dense (out, C*k) matrix of the equivalent
    ungrouped conv: group g's rows see only group g's input channels (zeros elsewhere)."""
    out, per_group = weight.shape[0], weight.shape[1]
    kernel = math.prod(weight.shape[2:])
    out_per_group = out // groups
    matrix = torch.zeros(out, groups, per_group * kernel, dtype=weight.dtype, device=weight.device)
    flat = weight.reshape(groups, out_per_group, per_group * kernel)
    for g in range(groups):
        matrix[g * out_per_group:(g + 1) * out_per_group, g] = flat[g]
    return matrix.reshape(out, groups * per_group * kernel)


SPARSE_MODULES = {nn.Linear: SparseLinear, nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d}


def to_sparse_module(module: nn.Module, fmt: str, block: int | None = None, name: str = "weight") -> nn.Module:
    """The sparse drop-in for one nn.Linear / nn.Conv1d / nn.Conv2d (others refused by name)."""
    sparse_cls = SPARSE_MODULES.get(type(module))
    if sparse_cls is None:
        raise SparseFormatError(
            f"{name}: {type(module).__name__} has no sparse module (Linear, Conv1d and Conv2d do); keep it dense"
        )
    if fmt == "semi_structured":  # every check before any conversion, so the refusal names the layer
        matrix = weight_matrix(module.weight)
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1:
            raise SparseFormatError(
                f"{name}: grouped convolution (groups={module.groups}) cannot be 2:4 semi-structured"
            )
        problem = semi_structured_problem(matrix, name)
        if problem:
            raise SparseFormatError(problem)
    return sparse_cls.from_dense(module, fmt, block, name)


def _module_name(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else ("" if name == "weight" else name)


def sparsify(
    model: nn.Module, fmt: str, block: int | None = None, layer_names: Iterable[str] | None = None
) -> nn.Module:
    """Replace layers of `model` by their sparse drop-ins, in place; returns the model.

    `layer_names` are module names or weight names (``"3.weight"``, as MaskedModel and final.json
    name tensors); None converts every Linear, Conv1d and Conv2d. Every requested layer is
    checked before any is replaced, so a refusal leaves the model unchanged. When `model` itself
    is a single layer, the returned module is its replacement.
    """
    modules = dict(model.named_modules())
    if layer_names is None:
        names = [n for n, m in modules.items() if type(m) in SPARSE_MODULES]
    else:
        names = [_module_name(n) for n in layer_names]
    for name in names:
        if name not in modules:
            raise SparseFormatError(f"no layer named {name!r} in the model")
    replacements = {name: to_sparse_module(modules[name], fmt, block, f"{name or 'model'}.weight") for name in names}
    for name, replacement in replacements.items():
        if not name:
            return replacement
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model
