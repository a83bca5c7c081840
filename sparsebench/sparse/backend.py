"""The sparse training backend (`backend=sparse`): prunable layers computed with sparse kernels.

`backend=masked` (the default) trains as sparsebench always has: dense kernels on weights whose
masked entries are exact zeros (masked.py). `backend=sparse` changes only how chosen prunable
layers *compute*; everything the engine owns stays the engine's, so the same run under both
backends gives the same masks and the same metrics within floating-point tolerance:

* The dense weight Parameter stays the single source of truth. The engine, every method,
  checkpoints, optimizer-state resets and model.pt see the same tensors as under `masked`.
* A layer on the sparse path replaces its forward by a custom autograd Function taking
  (x, weight): the forward gathers the active values of the weight (index cached per mask
  change: the CSR structure of the (out, in*k) mask, and of its transpose with the permutation
  that maps the values into it) and computes y^T = W x^T with a CSR x dense product (MKL on CPU,
  cuSPARSE on CUDA; `kernels.sparse_mm_t`); the input gradient goes through the transposed CSR,
  and the weight gradient is computed only at the active positions by a sampled dense-dense
  product (`torch.sparse.sampled_addmm`). On steps where the method reads the gradient of
  every weight (`method.dense_weight_grad(step)`: RigL's update steps, DPF's feedback phase) or
  where it updates masked entries (`not method.mask_gradients_at(step)`), the weight gradient
  is the full dense product instead, into `.grad` as under `masked`. Convolutions (Conv1d,
  Conv2d, groups=1, zero padding) use the same products on im2col patches (strided views: F.unfold
  measured 8-100x slower).
* The optimizer touches only active values. On a sparse-path step the active-value gradient is
  kept beside the parameter (its `.grad` stays None, so the torch optimizer skips it and the
  engine has nothing to mask); a step post-hook on the run's optimizer then runs the *same
  optimizer class* (SGD, Adam, AdamW) with the same hyper-parameters on the compact values and
  the compact optimizer state. The parameter's active entries are written back at once (methods
  read the weights before the next step); the compact optimizer state stays the authority until
  `settle` writes it into the dense state: the active entries get the compact values, the
  inactive ones the decay torch's dense steps would have applied to them meanwhile (momentum x
  mu^k, Adam's moments x beta^k, one multiplication; masked weights stay 0). `settle` runs
  before anything reads the optimizer state: a mask change, a step on which the torch optimizer
  steps the layer (dense gradient, dense phase), a checkpoint (the trainer calls it), `remove`;
  other code that reads optimizer state mid-run must call it first. The compact parameter
  values are cached while the parameter's version counter shows no other write. Under Powerprop
  (`module.weight` is sign(v)|v|^alpha of the parameter v), under AMP's gradient scaler and
  for other optimizer classes the Function returns the weight gradient as a dense tensor (zeros
  but for the active positions) and the torch optimizer steps it as under `masked`.
* Masks are re-applied by the engine as always (`apply_masks` after the step), except for the
  layers whose update above touched only their active entries: their masked entries are still
  exactly zero, so the engine's per-step multiplication is skipped for them (`_skip_apply_masks`;
  it is restored at the next step and by every mask change).

Which layers (`backend_layers`):

* `measured` (default): once per run, before the first step, every prunable Linear/Conv is timed
  at the run's batch size and the layer's final planned density (`method.densities_at(last
  step)`): its share of a training step on each path (`probe`: masked = dense forward and
  backward, gradient masked, the run's optimizer class on the dense weight, weight re-masked;
  sparse = the Functions, the active-values step and its write-back; one CSR call and column
  chunks of `kernels.chunk_columns`, and the same in BSR for block masks, the fastest kept), a
  few interleaved repeats on synthetic
  weights drawn from a private generator (the run's RNG streams are untouched). A layer goes on
  the sparse path if sparse <= `PAYS` x masked. One line per layer is logged; the decisions are
  stored in the checkpoint (a resumed run uses the same paths and stays bit-identical) and in
  final.json (`backend`, `backend_layers`, `sparse_layers`, `backend_decisions`).
* `all`: every prunable layer that can run sparse does (tests, benchmarks), one CSR call (BSR
  for block masks, `bsr_block`).

Rule for densities that change during training (GMP's ramp, GaP's dense partitions, AC/DC's
phases): a chosen layer computes sparse only while 0 < density < 1 and density <= its
`max_density`, the crossover estimated from the one measurement by assuming the sparse time
grows linearly with density: max_density = d_final x t_dense / t_sparse(d_final). Sparse costs
are sub-linear in density (fixed overheads), so this underestimates the true crossover: the
layer may stay masked a little longer than it has to, never the reverse. Under `all`,
max_density is 1 (sparse whenever not dense).

Measured (benchmarks/bench_training_step.py, CPU, 2 threads on 2 cores shared with other work,
load average 3.4-3.9; a whole training step as the trainer runs it, / the dense step, median of
9 paired interleaved ratios): MLP 3072-4096-4096-4096-10 (the two 4096x4096 layers prunable),
batch 128: s=0.95 0.675 (masked 1.111), s=0.9 0.732 (masked 1.084); ResNet-18 32x32, batch 64,
s=0.9: 1.041 with the measured choice (3 of 19 layers sparse: the 1x1 downsampling convs; the
3x3 convs measure 1.3-3x slower sparse) against masked 1.085, and 1.681 with every conv forced
sparse (`all`). The optimizer restricted to active values is part of the MLP figure: torch's SGD
step (momentum, weight decay) over one dense 4096x4096 weight measured 100 ms against 56 ms for
its forward GEMM (load 4.5), about a third of that layer's dense step.

Block masks (`distribution.structure=block`, b x b blocks): the same Functions take BSR operands
(`BlockIndex`: the compact values in block order, so the forward's BSR matrix is a view of them;
W^T's BSR holds the transposed blocks; the weight gradient is CSR's sampled product over the same
entries, reordered). `measured` times CSR and BSR side by side and keeps the faster per layer;
`all` uses BSR. On the CPU (MKL) they measured alike for a whole step (bench_training_step.py
--block 16/32, MLP above: s=0.9 0.61/0.62 and 0.59/0.58, s=0.95 0.41/0.41 and 0.45/0.43, CSR/BSR
step over the dense step): the weight gradient, computed alike, dominates. BSR is there for
GPUs, where torch multiplies BSR through its Triton kernels.

Devices: CPU is what was measured. CUDA runs the same Functions with torch's CUDA kernels
(cuSPARSE CSR and SDDMM; BSR through torch's Triton kernel, which it takes only for power-of-two
block sides of at least 16 and a dense operand whose column count is a multiple of the side:
`bsr_block` keeps other sides on CSR, `kernels.sparse_mm_t` pads the columns) - UNMEASURED, no GPU
was available. On CUDA `probe` calls every candidate once untimed first (handles, compiles).

N:M masks (`distribution.structure=nm`, CUDA, `amp=true`): chosen Linear layers compute their
16-bit training forward with torch's 2:4 kernels and their gradients dense (two_four.py, where
the reasons are); `measured` times it per layer (`probe_two_four`), `all` takes every Linear
whose shape torch's 2:4 kernels accept. Convolutions, and AMP with CSR/BSR, are refused or kept
masked with one line. UNMEASURED on a GPU.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.errors import UserError
from sparsebench.sparse.flops import layer_inputs
from sparsebench.sparse import two_four
from sparsebench.sparse.kernels import (
    chunk_columns,
    semi_structured_device_problem,
    semi_structured_shape_problem,
    sparse_mm_t,
    transposed_copy,
)
from sparsebench.sparse.masked import MaskedModel, PrunableTensor
from sparsebench.sparse.structure import UNSTRUCTURED, SparsityStructure, StructureKind

MASKED, SPARSE = "masked", "sparse"
CSR, BSR = "csr", "bsr"
MEASURED, ALL = "measured", "all"

# A layer goes sparse when its measured share of a sparse step costs at most this fraction of its
# share of a masked step (a margin against timing noise on a shared machine).
PAYS = 0.9
PROBE_REPEATS = 3
PROBE_BUDGET_S = 2.0  # per distinct layer signature: fewer repeats when one call is slow
# A first measurement this many times slower than dense ends the probe early (clearly masked).
HOPELESS = 3.0

# Optimizers whose update is elementwise, with the factor each per-entry state tensor is
# multiplied by on a step whose gradient (and weight) is 0 there: what the masked backend's
# dense step does to masked entries.
_ZERO_GRAD_DECAY: dict[type, Callable[[dict], dict[str, float]]] = {
    torch.optim.SGD: lambda g: {"momentum_buffer": g["momentum"]},
    torch.optim.Adam: lambda g: {"exp_avg": g["betas"][0], "exp_avg_sq": g["betas"][1], "max_exp_avg_sq": 1.0},
    torch.optim.AdamW: lambda g: {"exp_avg": g["betas"][0], "exp_avg_sq": g["betas"][1], "max_exp_avg_sq": 1.0},
}


@contextlib.contextmanager
def _one_thread(tensor: torch.Tensor | None = None):
    """Run nnz-sized elementwise work (gathers, scatters, the compact optimizer step) on one intra-op
    thread. Measured (4096x4096 at s=0.95, 838 861 values; 2 cores shared with other work): SGD on
    the compact values 1.5 ms on one thread, 48 ms on two - each parallel region waits for a
    descheduled thread - and the parameter write-back 7 ms against 16 ms; on an idle machine two
    threads could save well under a millisecond. Kernels (CSR products) keep the run's threads.
    Work on a GPU `tensor` leaves the thread count alone (it would only change a global setting,
    from autograd's device thread in a backward pass)."""
    threads = torch.get_num_threads()
    if threads == 1 or (tensor is not None and tensor.device.type != "cpu"):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- config-level checks
def check(cfg) -> None:
    """One-line refusals of `backend=sparse` set-ups it cannot run (before any directory exists)."""
    if cfg.run.backend.value != SPARSE:
        return
    from sparsebench.methods import METHODS  # the methods import this module's engine helpers

    if not METHODS.get(cfg.method).runs_on_sparse_backend:
        raise UserError(f"backend=sparse with method={cfg.method}: the method changes each step beyond the mask "
                        "and the sparse training kernels do not implement that; use backend=masked")
    cuda = cfg.run.device.value != "cpu" and torch.cuda.is_available()
    d = cfg.distribution_options
    if d.structure is StructureKind.nm:
        if not cuda:
            raise UserError(
                "backend=sparse with distribution.structure=nm: 2:4 sparse kernels need CUDA "
                "(torch.sparse.to_sparse_semi_structured, compute capability 8.0+) and this run is on the CPU; "
                "use backend=masked"
            )
        problem = two_four.nm_problem(d.n, d.m) or semi_structured_device_problem(torch.device("cuda"))
        if problem:
            raise UserError(f"backend=sparse with distribution.structure=nm: {problem}; use backend=masked")
        if not cfg.run.amp:
            raise UserError("backend=sparse with distribution.structure=nm trains through 16-bit 2:4 kernels: "
                            "set amp=true (float16 autocast), or use backend=masked")
    elif cfg.run.amp and cuda:
        raise UserError("backend=sparse with amp=true: the CSR/BSR training kernels run in float32 only "
                        "(mixed precision through them is not implemented; the 2:4 path of "
                        "distribution.structure=nm is 16-bit); use amp=false or backend=masked")


# ---------------------------------------------------------------------------- the sparse index
def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": once per process, not ours to show
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _small(crow: torch.Tensor, col: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 row pointers and column indices (MKL's LP64 interface converts int64 on every call)
    when both fit; always one dtype for both (cuSPARSE reads the index type from the row pointers)."""
    fits = (crow.numel() == 0 or int(crow[-1]) < 2**31 - 1) and columns < 2**31 - 1
    return (crow.to(torch.int32), col.to(torch.int32)) if fits else (crow, col)


class SparseIndex:
    """The structure of one mask seen as the (out, in*k) matrix: active positions in row-major
    order (`flat`, the order of the values), its CSR indices, and the CSR indices of its
    transpose with `perm` (values of W^T = values[perm]). Built once per mask change."""

    def __init__(self, mask: torch.Tensor, transpose: bool = True):
        rows_n = mask.shape[0]
        cols_n = mask.numel() // rows_n
        self.shape = (rows_n, cols_n)
        self.flat = mask.reshape(-1).nonzero().squeeze(1)
        self.nnz = self.flat.numel()
        self._compress(self.flat // cols_n, self.flat % cols_n, rows_n, cols_n, transpose)
        self._pattern: torch.Tensor | None = None

    def _compress(self, rows: torch.Tensor, cols: torch.Tensor, rows_n: int, cols_n: int,
                  transpose: bool = True) -> None:
        """CSR indices of the (rows_n, cols_n) pattern of (rows, cols), given in row-major order,
        and (`transpose`) of its transpose with `perm` (the entries of the transpose, in its
        row-major order)."""
        crow = torch.zeros(rows_n + 1, dtype=torch.int64, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=rows_n).cumsum(0)
        if not transpose:
            self.crow, self.col = _small(crow, cols, cols_n)
            return
        self.perm = torch.argsort(cols * rows_n + rows)
        crow_t = torch.zeros(cols_n + 1, dtype=torch.int64, device=rows.device)
        crow_t[1:] = torch.bincount(cols, minlength=cols_n).cumsum(0)
        self.crow, self.col = _small(crow, cols, cols_n)
        self.crow_t, self.col_t = _small(crow_t, rows[self.perm], rows_n)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.col, values, self.shape)

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        with _one_thread(values):
            values_t = values.index_select(0, self.perm)
        return _csr(self.crow_t, self.col_t, values_t, (self.shape[1], self.shape[0]))

    def sampled(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(left @ right) at the active positions only, as values in `flat` order: left (out, n),
        right (n, in*k); right is fastest with contiguous columns (the transpose of an (in*k, n))."""
        if self._pattern is None or self._pattern.dtype != left.dtype:
            self._pattern = self.matrix(torch.zeros(self.nnz, dtype=left.dtype, device=left.device))
        return torch.sparse.sampled_addmm(self._pattern, left, right, beta=0.0).values()

    def scatter(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A dense tensor shaped like `like`: `values` at the active positions, 0 elsewhere."""
        out = torch.zeros(like.numel(), dtype=values.dtype, device=values.device)
        return out.index_copy_(0, self.flat, values).view_as(like)


def _bsr(crow: torch.Tensor, col: torch.Tensor, blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_bsr_tensor(crow, col, blocks, shape, check_invariants=False)


class BlockIndex(SparseIndex):
    """The structure of a block mask (`distribution.structure=block`, square `block` x `block`
    blocks of the (out, in*k) matrix) for BSR kernels. The active values are kept in *block*
    order (block rows, then block columns, then the b x b entries of each block row-major), so
    the BSR operand is a view of the compact values: no gather in the forward. The transpose is
    the BSR of W^T: its blocks are the transposed blocks, reordered (`perm`, per block). The
    weight gradient at the active entries is the CSR sampled product over the same entries (torch
    has no CPU sampled product for BSR), reordered into block order (`from_row_major`)."""

    def __init__(self, mask: torch.Tensor, block: int):
        rows_n = mask.shape[0]
        cols_n = mask.numel() // rows_n
        if rows_n % block or cols_n % block:
            raise ValueError(f"a {rows_n}x{cols_n} matrix is not made of {block}x{block} blocks")
        self.shape, self.block = (rows_n, cols_n), block
        grid_rows, grid_cols = rows_n // block, cols_n // block
        active = mask.reshape(grid_rows, block, grid_cols, block).any(dim=3).any(dim=1)
        block_rows, block_cols = active.nonzero(as_tuple=True)  # row-major over the block grid
        inside = (torch.arange(block, device=mask.device).unsqueeze(1) * cols_n
                  + torch.arange(block, device=mask.device)).reshape(-1)
        starts = block_rows * (block * cols_n) + block_cols * block
        self.flat = (starts.unsqueeze(1) + inside).reshape(-1)
        self.nnz = self.flat.numel()
        if self.nnz != int(mask.sum()):
            raise ValueError(f"the mask is not made of whole {block}x{block} blocks")
        self._compress(block_rows, block_cols, grid_rows, grid_cols)  # BSR's indices are its block grid's CSR
        # the same entries in row-major (CSR) order, for the sampled weight gradient only
        self.rows_major = SparseIndex(mask, transpose=False)
        self.from_row_major = torch.searchsorted(self.rows_major.flat, self.flat)
        self._pattern = None

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return _bsr(self.crow, self.col, values.view(-1, self.block, self.block), self.shape)

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        with _one_thread(values):
            blocks = values.view(-1, self.block, self.block).index_select(0, self.perm).transpose(1, 2).contiguous()
        return _bsr(self.crow_t, self.col_t, blocks, (self.shape[1], self.shape[0]))

    def sampled(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        values = self.rows_major.sampled(left, right)
        with _one_thread(values):
            return values.index_select(0, self.from_row_major)


def bsr_block(block: int | None, device: torch.device) -> int | None:
    """The block side the sparse backend runs BSR with on `device`, None for CSR. torch's CUDA BSR
    product reaches its Triton kernel only for power-of-two sides of at least 16 (others fall back
    to a gather, a batched product and an atomic index_add_: slower, and not reproducible); MKL
    takes any side of at least 2."""
    if not block or block < 2:
        return None
    if device.type == "cuda" and (block < 16 or block & (block - 1)):
        return None
    return block


def make_index(mask: torch.Tensor, fmt: str, block: int | None) -> SparseIndex:
    """The index for `fmt` ("csr" or "bsr"); a mask that is not made of whole blocks (a method
    that broke the structure would have been refused by the engine: defensive) gets CSR."""
    if fmt == BSR and block:
        try:
            return BlockIndex(mask, block)
        except ValueError:
            pass
    return SparseIndex(mask)


# ---------------------------------------------------------------------------- the autograd Functions
def _transposed_output(y_t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """y of shape (*lead, out) over the storage of y^T (out, n): no copy, and not an autograd
    view (a view returned by a custom Function may not be modified in place, and the next layer's
    ReLU(inplace=True) does exactly that)."""
    y_t = y_t.contiguous()
    out, n = y_t.shape
    strides, step = [], 1
    for size in reversed(lead):
        strides.append(step)
        step *= size
    return y_t.new_empty(0).set_(y_t.untyped_storage(), y_t.storage_offset(), (*lead, out), (*reversed(strides), n))


@dataclass
class _Grad:
    """How a Function hands back the weight gradient (set per step by the backend)."""

    dense: bool = False  # the full dense product (every weight's gradient)
    compact: bool = False  # keep the active-value gradient beside the parameter (`layer.take`)


def _weight_grad(plan, left: torch.Tensor, right: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """dL/dW from dL/dY^T (`left`, (out, n)) and the layer's input matrix (`right`, (n, in*k))."""
    if plan.grad.dense:
        return (left @ right).view_as(weight)
    values = plan.index.sampled(left, right)
    if plan.grad.compact:
        plan.take(values, plan.index)
        return None
    return plan.index.scatter(values, weight)


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, plan):
        x_t = transposed_copy(x.reshape(-1, x.shape[-1]))  # (in, n): no copy after a sparse layer
        y_t = sparse_mm_t(plan.index.matrix(values), x_t, plan.chunk, bias)  # (out, n)
        ctx.save_for_backward(x_t, values)
        ctx.plan, ctx.weight_meta = plan, weight.detach()
        ctx.has_bias, ctx.input_shape = bias is not None, x.shape
        return _transposed_output(y_t, tuple(x.shape[:-1]))

    @staticmethod
    def backward(ctx, grad_y):
        x_t, values = ctx.saved_tensors
        plan = ctx.plan
        g_t = transposed_copy(grad_y.reshape(-1, grad_y.shape[-1]))  # (out, n): no copy before a sparse layer
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_mm_t(plan.index.transposed(values), g_t, plan.chunk).t().reshape(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            # x_t.t(): contiguous columns, sampled_addmm's fast layout
            grad_w = _weight_grad(plan, g_t, x_t.t(), ctx.weight_meta)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_t.sum(1)
        return grad_x, grad_w, grad_b, None, None



@dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs of a Conv1d/Conv2d (groups 1, zero padding)."""

    dims: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]  # F.pad amounts, last dimension first

    @classmethod
    def of(cls, module: nn.Module) -> "ConvGeometry":
        dims = 1 if isinstance(module, nn.Conv1d) else 2
        kernel, stride, dilation = (tuple(int(v) for v in a)
                                    for a in (module.kernel_size, module.stride, module.dilation))
        pads: list[int] = []
        for axis in reversed(range(dims)):
            if module.padding == "same":
                total = dilation[axis] * (kernel[axis] - 1)
                pads += [total // 2, total - total // 2]
            elif module.padding == "valid":
                pads += [0, 0]
            else:
                pads += [int(module.padding[axis])] * 2
        return cls(dims, kernel, stride, dilation, tuple(pads))

    def as2d(self, values: tuple[int, ...], fill: int) -> tuple[int, ...]:
        return ((fill,) * (2 - self.dims)) + values


def conv_problem(module: nn.Module) -> str | None:
    """Why a conv cannot take the sparse path (None: it can)."""
    if isinstance(module, nn.Conv3d):
        return "Conv3d has no sparse path"
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups}) has no sparse path"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode} has no sparse path"
    return None


def _im2col(x4: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """The (C*kh*kw, N*Ho*Wo) patch matrix of a padded (N, C, H, W) input, rows in the weight's
    (c, i, j) order: strided views (Tensor.unfold) and one copy. F.unfold is 8-100x slower on the
    CPU here (1 s for a (128, 32, 1, 42) input, measured against 8 ms)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    patches = x4.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, c, ho, wo = patches.shape[:4]
    return patches.permute(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * ho * wo)


def _col2im(cols: torch.Tensor, shape, kernel, stride, dilation, out_hw) -> torch.Tensor:
    """The adjoint of `_im2col`: patch gradients summed back into a (N, C, H, W) gradient. One
    strided add per kernel offset; F.fold where it measured faster (a single input row, Conv1d)."""
    n, c, h, w = shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = out_hw
    if h == 1:
        return F.fold(cols.view(c * kh * kw, n, ho * wo).transpose(0, 1), (h, w), kernel, dilation=dilation,
                      stride=stride)
    g = cols.view(c, kh, kw, n, ho, wo)
    out = torch.zeros(shape, dtype=cols.dtype, device=cols.device)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            columns = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            out[:, :, rows, columns] += g[:, i, j].permute(1, 0, 2, 3)
    return out


class _SparseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, plan):
        geo: ConvGeometry = plan.geometry
        padded = F.pad(x, geo.pads) if any(geo.pads) else x
        x4 = padded.unsqueeze(2) if geo.dims == 1 else padded
        kernel, dilation, stride = geo.as2d(geo.kernel, 1), geo.as2d(geo.dilation, 1), geo.as2d(geo.stride, 1)
        operand = _im2col(x4, kernel, stride, dilation)  # (C*k, N*L)
        n = x4.shape[0]
        out_hw = tuple((s - d * (k - 1) - 1) // st + 1 for s, k, d, st in zip(x4.shape[2:], kernel, dilation, stride))
        length = out_hw[0] * out_hw[1]
        y_t = sparse_mm_t(plan.index.matrix(values), operand, plan.chunk)  # (out, N*L)
        out = y_t.shape[0]
        y = torch.empty((n, out, *out_hw[2 - geo.dims:]), dtype=y_t.dtype, device=y_t.device)
        y.view(n, out, length).copy_(y_t.view(out, n, length).transpose(0, 1))
        if bias is not None:
            y.view(n, out, length).add_(bias.view(1, out, 1))
        ctx.save_for_backward(operand, values)
        ctx.plan, ctx.weight_meta = plan, weight.detach()
        ctx.has_bias = bias is not None
        ctx.shapes = (x.shape, x4.shape, out_hw, (kernel, stride, dilation))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        operand, values = ctx.saved_tensors
        plan = ctx.plan
        geo: ConvGeometry = plan.geometry
        x_shape, x4_shape, out_hw, (kernel, stride, dilation) = ctx.shapes
        n, out, length = x4_shape[0], grad_y.shape[1], out_hw[0] * out_hw[1]
        g = grad_y.reshape(n, out, length).transpose(0, 1).reshape(out, n * length)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            g_cols = sparse_mm_t(plan.index.transposed(values), g, plan.chunk)  # (C*k, N*L)
            g_x4 = _col2im(g_cols, x4_shape, kernel, stride, dilation, out_hw)
            g_x = g_x4.squeeze(2) if geo.dims == 1 else g_x4
            if any(geo.pads):
                crop = [slice(None), slice(None)]
                for axis in range(geo.dims):
                    before, after = geo.pads[2 * (geo.dims - 1 - axis)], geo.pads[2 * (geo.dims - 1 - axis) + 1]
                    crop.append(slice(before, g_x.shape[2 + axis] - after))
                g_x = g_x[tuple(crop)]
            grad_x = g_x.reshape(x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(plan, g, operand.t(), ctx.weight_meta)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(1)
        return grad_x, grad_w, grad_b, None, None


# ---------------------------------------------------------------------------- one layer
@dataclass
class Decision:
    """One prunable layer's path, decided once per run (stored in checkpoint and final.json)."""

    path: str  # "sparse" or "masked"
    max_density: float = 0.0  # sparse while 0 < density < 1 and density <= this
    chunk: int | None = None  # columns per sparse call (None: one call)
    final_density: float | None = None
    sparse_ms: float | None = None  # measured step share (forward, backward, update) at the final density
    dense_ms: float | None = None  # the same on the masked path
    reason: str = ""
    format: str = CSR  # the kernel: "csr", "bsr" for block masks (`block` x `block`), "semi_structured" (2:4)
    block: int | None = None

    def line(self, name: str) -> str:
        if self.sparse_ms is not None and self.dense_ms is not None:
            kernel = {BSR: f"BSR {self.block}x{self.block}", two_four.TWO_FOUR: "2:4"}.get(self.format, "CSR")
            timing = (f"final density {self.final_density:.4f}: sparse ({kernel}) {self.sparse_ms:.2f} ms vs masked "
                      f"{self.dense_ms:.2f} ms per step ({self.sparse_ms / self.dense_ms:.2f}x"
                      f"{', chunks of ' + str(self.chunk) if self.chunk else ''})")
        else:
            timing = self.reason
        where = (f"sparse path while density <= {self.max_density:.4f}" if self.path == SPARSE else "masked path")
        return f"backend sparse: {name}: {timing} -> {where}"


class _Layer:
    """A prunable layer under `backend=sparse`: its forward, its compact gradient and its
    active-values optimizer step."""

    def __init__(self, name: str, tensor: PrunableTensor, decision: Decision, compact_ok: bool):
        self.name, self.t, self.module, self.decision = name, tensor, tensor.module, decision
        self.geometry = None if isinstance(self.module, nn.Linear) else ConvGeometry.of(self.module)
        self.chunk = decision.chunk
        self.two_four = two_four.CompressedWeight() if decision.format == two_four.TWO_FOUR else None
        # Compact gradients need the parameter to be the weight (not Powerprop's v); the 2:4 path
        # hands back dense gradients (two_four.py).
        self.grad = _Grad(compact=compact_ok and tensor.powerprop is None and self.two_four is None)
        self.index: SparseIndex | None = None
        self._mask_key: tuple | None = None
        self._values: torch.Tensor | None = None  # the compact parameter values (the shadow optimizer's param)
        self._values_key: tuple | None = None
        self.pending: torch.Tensor | None = None  # compact gradient of this step
        self.pending_index: SparseIndex | None = None
        self._shadow: torch.optim.Optimizer | None = None
        # state key -> (dense state tensor, its compact authority, decay owed by its inactive
        # entries), all for `_owed_index`; empty while the dense state is the authority.
        self._owed: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._owed_index: SparseIndex | None = None
        self._dense_forward = self.module.forward
        self.module.forward = self.forward  # instance attribute: nn.Module.__call__ finds it first

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") == self.forward:
            del self.module.forward

    # ------------------------------------------------------------ forward
    def on_sparse_path(self) -> bool:
        density = self.t.density
        return self.decision.path == SPARSE and 0.0 < density < 1.0 and density <= self.decision.max_density

    def refresh_index(self) -> SparseIndex:
        mask = self.t.mask
        key = (mask._version, mask.data_ptr())
        if key != self._mask_key:
            self.settle()  # the old index's inactive entries owe their optimizer-state decay
            self.index = make_index(mask, self.decision.format, self.decision.block)
            self._mask_key = key
            self._values = None
            self._shadow = None
        return self.index

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        """The active values of `weight`: cached while the parameter has not been written."""
        index = self.index
        if self.t.powerprop is not None:  # w is recomputed from v at every access
            return weight.detach().reshape(-1).index_select(0, index.flat)
        p = self.t.param
        key = (p._version, p.data_ptr(), id(index))
        if self._values is None or key != self._values_key:
            with _one_thread(p):
                self._values = p.detach().reshape(-1).index_select(0, index.flat)
            self._values_key = key
        return self._values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.on_sparse_path():
            return self._dense_forward(x)
        if self.two_four is not None:
            return two_four.forward(x, self.module.weight, self.module.bias, self.t.param, self.t.mask,
                                    self.two_four, self._dense_forward)
        self.refresh_index()
        if self.index.nnz == 0:
            return self._dense_forward(x)
        weight = self.module.weight
        values = self.values(weight)
        function = _SparseLinear if self.geometry is None else _SparseConv
        return function.apply(x, weight, self.module.bias, values, self)

    def take(self, values: torch.Tensor, index: SparseIndex) -> None:
        """The compact gradient of one backward pass (summed if the layer ran twice)."""
        if self.pending is not None and self.pending_index is index:
            self.pending = self.pending + values
        else:
            self.pending, self.pending_index = values, index

    # ------------------------------------------------------------ the active-values optimizer step
    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, group: dict) -> bool:
        with _one_thread(self.t.param):
            return self._step(optimizer, group)

    def _step(self, optimizer: torch.optim.Optimizer, group: dict) -> bool:
        """Apply this step's compact gradient with `optimizer`'s own update rule on the active
        values; True if done (the dense weight changed only at active entries).

        The parameter is written back at once (methods read it before the next step); the
        optimizer state stays compact, and is owed to the dense state until `settle`."""
        grad, index = self.pending, self.pending_index
        self.pending = self.pending_index = None
        if grad is None or index is not self.index:
            return False
        p = self.t.param
        values = self.values(p)
        options = {k: v for k, v in group.items() if k != "params"}
        if self._shadow is None or self._shadow.param_groups[0]["params"][0] is not values:
            self.settle()  # the compact state of the old values, if any, goes home first
            self._shadow = type(optimizer)([{**options, "params": [values]}])
        shadow = self._shadow
        shadow.param_groups[0].update(options)
        dense_state = optimizer.state.get(p) or {}
        if self._owed and (self._owed_index is not index or any(
                dense_state.get(k) is not owed[0] for k, owed in self._owed.items())):
            self._owed, self._owed_index = {}, None  # the dense state was replaced (reset, loaded): it rules
        if not self._owed:  # the dense state is the authority: gather its active entries
            shadow.state[values] = {
                k: (v.reshape(-1).index_select(0, index.flat) if torch.is_tensor(v) and v.shape == p.shape else v)
                for k, v in dense_state.items()  # Adam's step count: the same tensor object, counted in place
            }
        compact = shadow.state[values]
        values.grad = grad
        shadow.step()
        values.grad = None
        p.reshape(-1).index_copy_(0, index.flat, values)
        self._values_key = (p._version, p.data_ptr(), id(index))
        state = optimizer.state[p]
        factors = _ZERO_GRAD_DECAY[type(optimizer)](group)
        for key, value in compact.items():
            if torch.is_tensor(value) and value.dim() == 1 and value.shape == values.shape:
                dense = state.get(key)
                if dense is None:  # first step: the dense buffer exists from now on (zeros until settled)
                    dense = state[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                factor = self._owed[key][2] if key in self._owed else 1.0
                self._owed[key] = (dense, value, factor * factors.get(key, 1.0))
            else:
                state[key] = value
        self._owed_index = index
        return True

    @torch.no_grad()
    def settle(self) -> None:
        """Write the compact optimizer state into the dense state: the active entries get their
        values, the inactive ones the decay the masked backend's dense steps would have applied
        (momentum x mu^k, Adam's moments x beta^k) in one multiplication. Afterwards the dense
        state is the authority again (gathered afresh at the next compact step)."""
        owed, index = self._owed, self._owed_index
        self._owed, self._owed_index = {}, None
        if not owed:
            return
        state = self._optimizer.state.get(self.t.param) if self._optimizer is not None else None
        for key, (dense, compact, factor) in owed.items():
            if not state or state.get(key) is not dense:
                continue  # cleared or replaced since (reset_optimizer, a loaded checkpoint): not ours
            flat = dense.reshape(-1)
            if factor != 1.0:
                flat.mul_(factor)
            flat.index_copy_(0, index.flat, compact)

    _optimizer: torch.optim.Optimizer | None = None


# ---------------------------------------------------------------------------- measuring
def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


class _ProbePlan:
    """A stand-in layer for timing: keeps the last compact gradient."""

    def __init__(self, index: SparseIndex, geometry: ConvGeometry | None, chunk: int | None, compact: bool = True):
        self.index, self.geometry, self.chunk = index, geometry, chunk
        self.grad = _Grad(compact=compact)
        self.taken: torch.Tensor | None = None

    def take(self, values: torch.Tensor, index: SparseIndex) -> None:
        self.taken = values


def _optimizer_like(optimizer: torch.optim.Optimizer | None, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """An optimizer of `optimizer`'s class and first group's hyper-parameters over `params`
    (SGD with momentum when there is none)."""
    if optimizer is None:
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    options = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return type(optimizer)([{**options, "params": params}])


def _probe_mask(weight_shape: tuple[int, ...], density: float, block: int | None,
                generator: torch.Generator) -> torch.Tensor:
    """A random mask of about `density`: single entries, or whole `block` x `block` blocks of the
    (out, in*k) matrix."""
    if not block:
        return torch.rand(weight_shape, generator=generator) < density
    rows = weight_shape[0]
    cols = math.prod(weight_shape[1:])
    grid = torch.rand(rows // block, cols // block, generator=generator) < density
    return grid.repeat_interleave(block, 0).repeat_interleave(block, 1).reshape(weight_shape)


def probe(module: nn.Module, input_shape: tuple[int, ...], density: float, batch: int, device: torch.device,
          optimizer: torch.optim.Optimizer | None = None, compact: bool = True,
          repeats: int = PROBE_REPEATS, block: int | None = None) -> tuple[float, float, int | None, str]:
    """(dense ms, best sparse ms, its chunk, its format): one layer's share of a training step,
    shaped like `module`, at `density`, on a batch of `batch` inputs of `input_shape`, each path
    as the trainer runs it: masked = forward, backward, gradient masked, the optimizer's step on
    the dense weight, weight re-masked; sparse = the sparse Functions forward and backward, then
    the active-values optimizer step with its write-back (or, without `compact`, the masked
    path's bookkeeping on a dense gradient). With `block` (block masks), the mask is made of
    whole blocks and BSR is timed beside CSR. Synthetic weights from a private generator (the
    run's RNG streams are untouched), interleaved repeats, medians."""
    generator = torch.Generator().manual_seed(0)
    weight_shape = tuple(module.weight.shape)
    dtype = torch.float32
    mask = _probe_mask(weight_shape, density, block, generator).to(device)
    keep = mask.to(dtype)
    weight = (torch.randn(weight_shape, generator=generator).to(device) * mask).requires_grad_()
    x = torch.randn((batch, *input_shape), generator=generator).to(device=device, dtype=dtype).requires_grad_()
    geometry = None if isinstance(module, nn.Linear) else ConvGeometry.of(module)
    if geometry is None:
        dense_fn = lambda: F.linear(x, weight)  # noqa: E731
        rows_of_operand = weight_shape[1]
    else:
        conv = F.conv1d if geometry.dims == 1 else F.conv2d
        dense_fn = lambda: conv(x, weight, None, module.stride, module.padding, module.dilation)  # noqa: E731
        rows_of_operand = math.prod(weight_shape[1:])
    function = _SparseLinear if geometry is None else _SparseConv
    formats = [CSR] + ([BSR] if block else [])
    indices = {fmt: make_index(mask, fmt, block) for fmt in formats}
    values = {fmt: weight.detach().reshape(-1)[index.flat] for fmt, index in indices.items()}
    plans: dict[tuple[str, int | None], _ProbePlan] = {}
    for fmt, index in indices.items():
        plans[fmt, None] = _ProbePlan(index, geometry, None, compact)
        chunk = chunk_columns(fmt, rows_of_operand, 4, block) if device.type == "cpu" else None
        if chunk is not None:
            plans[fmt, chunk] = _ProbePlan(index, geometry, chunk, compact)
    with torch.no_grad():
        grad_y = torch.randn(dense_fn().shape, generator=generator).to(device)
    dense_optimizer = _optimizer_like(optimizer, [weight])
    compact_optimizers = {fmt: _optimizer_like(optimizer, [v]) for fmt, v in values.items()}

    @torch.no_grad()
    def masked_update():
        weight.grad.mul_(keep)
        dense_optimizer.step()
        weight.mul_(keep)

    def dense_path():
        x.grad = weight.grad = None
        dense_fn().backward(grad_y)
        masked_update()

    def sparse_path(fmt: str, plan: _ProbePlan):
        compact_values, compact_optimizer = values[fmt], compact_optimizers[fmt]

        def go():
            x.grad = weight.grad = None
            function.apply(x, weight, None, compact_values, plan).backward(grad_y)
            if not compact:
                masked_update()
                return
            with torch.no_grad(), _one_thread(weight):
                compact_values.grad = plan.taken
                compact_optimizer.step()
                compact_values.grad = None
                weight.detach().reshape(-1).index_copy_(0, plan.index.flat, compact_values)
        return go

    candidates = {"dense": dense_path}
    for key, plan in plans.items():
        candidates[key] = sparse_path(key[0], plan)
    timed = _timer(device)
    if device.type == "cuda":  # first calls there pay seconds once (cuSPARSE handles, Triton compiles): not timed
        for fn in candidates.values():
            fn()
        torch.cuda.synchronize(device)
    times: dict = {k: [] for k in candidates}
    started = time.perf_counter()
    for k, fn in candidates.items():  # warm-up on the CPU (allocator, MKL handles, optimizer state) and a first look
        times[k].append(timed(fn))
    # Every one-call sparse product clearly slower than dense: masked, without more repeats.
    fastest = min(((fmt, None) for fmt in formats), key=lambda key: times[key][0])
    if times[fastest][0] > HOPELESS * times["dense"][0]:
        return times["dense"][0] * 1e3, times[fastest][0] * 1e3, None, fastest[0]
    for _ in range(repeats):
        if time.perf_counter() - started > PROBE_BUDGET_S:
            break
        for k, fn in candidates.items():
            times[k].append(timed(fn))
    median = {k: statistics.median(v[1:] or v) * 1e3 for k, v in times.items()}
    fmt, chunk = min(plans, key=lambda key: median[key])
    return median["dense"], median[fmt, chunk], chunk, fmt


def probe_two_four(module: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device,
                   optimizer: torch.optim.Optimizer | None = None,
                   repeats: int = PROBE_REPEATS) -> tuple[float, float]:
    """(masked ms, 2:4 ms): one Linear layer's share of a training step under autocast (the dtype
    autocast uses on `device`), on a batch of `batch` inputs of `input_shape`, with a random 2:4
    mask: masked = autocast F.linear forward and backward; 2:4 = `two_four.TwoFourLinear` with the
    weight compressed afresh (it changes every step); both then mask the gradient, step the
    optimizer on the dense weight and re-mask it, as the trainer does. Synthetic weights from a
    private generator, interleaved repeats, medians."""
    generator = torch.Generator().manual_seed(0)
    shape = tuple(module.weight.shape)
    scores = torch.rand(shape, generator=generator)
    mask = SparsityStructure(StructureKind.nm, 2, 4).topk(scores, 0.5).to(device)
    keep = mask.float()
    weight = (torch.randn(shape, generator=generator).to(device) * keep).requires_grad_()
    x = torch.randn((batch, *input_shape), generator=generator).to(device).requires_grad_()
    dtype = torch.get_autocast_dtype(device.type)
    grad_y = torch.randn((batch, *input_shape[:-1], shape[0]), generator=generator).to(device, dtype)
    weights = two_four.CompressedWeight()
    updates = _optimizer_like(optimizer, [weight])

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def go():
            x.grad = weight.grad = None
            with torch.autocast(device.type, dtype=dtype):
                y = forward()
            y.backward(grad_y)
            with torch.no_grad():
                weight.grad.mul_(keep)
                updates.step()
                weight.mul_(keep)
        return go

    candidates = {
        "masked": step(lambda: F.linear(x, weight)),
        two_four.TWO_FOUR: step(lambda: two_four.forward(x, weight, None, weight, mask, weights, None)),
    }
    timed = _timer(device)
    for fn in candidates.values():  # untimed first calls: cuSPARSELt handles, autocast caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    started = time.perf_counter()
    for i in range(repeats):
        if i and time.perf_counter() - started > PROBE_BUDGET_S:
            break
        for k, fn in candidates.items():
            times[k].append(timed(fn))
    return (statistics.median(times["masked"]) * 1e3, statistics.median(times[two_four.TWO_FOUR]) * 1e3)


def compact_steps(optimizer: torch.optim.Optimizer | None, amp: bool) -> bool:
    """Whether active-values optimizer steps can stand in for `optimizer`'s: an elementwise torch
    optimizer whose masked-entry decay is known, and no gradient scaler between backward and
    step (AMP unscales .grad, which compact gradients bypass)."""
    return (optimizer is None or type(optimizer) in _ZERO_GRAD_DECAY) and not amp


# ---------------------------------------------------------------------------- the backends
class MaskedBackend:
    """`backend=masked`: nothing to do; the trainer's step is the engine's masked step."""

    kind = MASKED

    def begin_step(self, step: int) -> None:
        pass

    def settle(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"backend": MASKED}

    def remove(self) -> None:
        pass


class SparseBackend:
    """`backend=sparse` over an engine's prunable layers (see the module docstring)."""

    kind = SPARSE

    def __init__(self, engine: MaskedModel, optimizer: torch.optim.Optimizer, decisions: Mapping[str, Decision],
                 dense_grad_at: Callable[[int], bool], layers_mode: str = MEASURED, amp: bool = False):
        self.engine, self.optimizer, self.layers_mode = engine, optimizer, layers_mode
        self.dense_grad_at = dense_grad_at
        self.decisions = dict(decisions)
        compact_ok = compact_steps(optimizer, amp)
        self.layers: dict[str, _Layer] = {}
        for name, decision in self.decisions.items():
            if decision.path == SPARSE:
                layer = _Layer(name, engine.tensors[name], decision, compact_ok)
                layer._optimizer = optimizer
                self.layers[name] = layer
        self._groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._hook = optimizer.register_step_post_hook(self._after_optimizer_step) if self.layers else None
        self._step_dense = False

    # ------------------------------------------------------------ per step
    def begin_step(self, step: int) -> None:
        """Before the forward of `step` (after method.before_step): the weight-gradient mode of
        the step, and every owed optimizer-state decay paid before a dense step reads it."""
        self._step_dense = bool(self.dense_grad_at(step))
        self.engine._refresh_sparse_names()  # undo the last step's apply_masks skip
        for layer in self.layers.values():
            layer.pending = layer.pending_index = None
            layer.grad.dense = self._step_dense
            sparse_now = layer.on_sparse_path()
            if sparse_now and layer.two_four is None:
                layer.refresh_index()  # a mask change since the last step settles the old index
            if self._step_dense or not sparse_now:
                layer.settle()  # the torch optimizer steps this layer's dense state this step

    def settle(self) -> None:
        """Before anyone else reads the optimizer state (the trainer: before a checkpoint)."""
        for layer in self.layers.values():
            layer.settle()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        done = set()
        for name, layer in self.layers.items():
            if layer.two_four is not None:
                layer.two_four.invalidate()  # a fused optimizer's write leaves the version counter as it was
            if layer.pending is not None and layer.step(optimizer, self._groups[id(layer.t.param)]):
                done.add(name)
        if done:
            _skip_apply_masks(self.engine, done)

    # ------------------------------------------------------------ records
    def state_dict(self) -> dict:
        return {"backend": SPARSE, "layers_mode": self.layers_mode,
                "decisions": {n: asdict(d) for n, d in self.decisions.items()}}

    def remove(self) -> None:
        """Restore the layers' own forwards and drop the optimizer hook (benchmarks, tests)."""
        self.settle()
        for layer in self.layers.values():
            layer.uninstall()
        if self._hook is not None:
            self._hook.remove()
        self.engine._refresh_sparse_names()


def _skip_apply_masks(engine: MaskedModel, names: set[str]) -> None:
    """The layers whose update touched only active entries need no re-masking this step: leave
    them out of the engine's per-step list until the next `begin_step` (any mask change refreshes
    the list too, so a mask installed in `after_step` is applied in full)."""
    engine._sparse_names = [n for n in engine._sparse_names if n not in names]


# ---------------------------------------------------------------------------- deciding
def _two_four_problem(module: nn.Module, structure: SparsityStructure) -> str | None:
    """Why a layer of an N:M run cannot take the 2:4 path (None: it can)."""
    if not isinstance(module, nn.Linear):
        return "the 2:4 path takes Linear layers only (a convolution keeps its dense kernel)"
    rows, cols = module.weight.shape
    # float16 and bfloat16 share their shape multiples; the run's autocast dtype is float16
    return two_four.nm_problem(structure.n, structure.m) or semi_structured_shape_problem(
        rows, cols, torch.float16, "weight")


def decide(engine: MaskedModel, final_densities: Mapping[str, float], input_shape: tuple[int, ...],
           batch: int, device: torch.device, layers_mode: str, optimizer: torch.optim.Optimizer | None = None,
           amp: bool = False) -> dict[str, Decision]:
    """Each prunable layer's path: `all` (every layer that can; BSR for block masks, 2:4 for N:M
    masks) or `measured` (`probe` with the run's optimizer class and hyper-parameters; for block
    masks the faster of CSR and BSR; for N:M masks `probe_two_four`)."""
    structure = engine.structure
    nm = structure.kind is StructureKind.nm
    block = bsr_block(structure.block if structure.kind is StructureKind.block else None, device)
    decisions: dict[str, Decision] = {}
    modules = {n: t.module for n, t in engine.tensors.items()}
    shapes = layer_inputs(engine.model, modules, input_shape) if layers_mode == MEASURED else {}
    cache: dict[tuple, tuple[float, float, int | None, str]] = {}
    for name, t in engine.tensors.items():
        module, density = t.module, float(final_densities.get(name, t.density))
        if nm:
            problem = _two_four_problem(module, structure)
        else:
            problem = conv_problem(module) if not isinstance(module, nn.Linear) else None
        if problem:
            decisions[name] = Decision(MASKED, final_density=density, reason=problem)
        elif density >= 1.0:
            decisions[name] = Decision(MASKED, final_density=density, reason="dense at the end of training")
        elif layers_mode == ALL:
            if nm:
                decisions[name] = Decision(SPARSE, max_density=two_four.max_density(structure.m),
                                           final_density=density, format=two_four.TWO_FOUR, reason="backend_layers=all")
            else:
                decisions[name] = Decision(SPARSE, max_density=1.0, final_density=density,
                                           format=BSR if block else CSR, block=block, reason="backend_layers=all")
        else:
            if name not in shapes:
                decisions[name] = Decision(MASKED, final_density=density, reason="not reached by a forward pass")
                continue
            signature = (type(module), tuple(module.weight.shape), shapes[name], round(density, 6),
                         getattr(module, "stride", None), getattr(module, "padding", None),
                         getattr(module, "dilation", None))
            if signature not in cache:
                if nm:
                    cache[signature] = (*probe_two_four(module, shapes[name], batch, device, optimizer),
                                        None, two_four.TWO_FOUR)
                else:
                    compact = compact_steps(optimizer, amp) and t.powerprop is None
                    cache[signature] = probe(module, shapes[name], density, batch, device, optimizer=optimizer,
                                             compact=compact, block=block)
            dense_ms, sparse_ms, chunk, fmt = cache[signature]
            pays = sparse_ms <= PAYS * dense_ms
            if nm:  # a 2:4 product costs the same at every level n <= 2
                max_density = two_four.max_density(structure.m) if pays else 0.0
            else:
                max_density = min(1.0, density * dense_ms / sparse_ms) if pays else 0.0
            decisions[name] = Decision(SPARSE if pays else MASKED, max_density, chunk if pays else None, density,
                                       round(sparse_ms, 3), round(dense_ms, 3), format=fmt,
                                       block=block if fmt == BSR else None)
    return decisions


def summary(record: Mapping | None) -> dict:
    """final.json's backend keys from a backend's `state_dict()` record."""
    if not record or record.get("backend") != SPARSE:
        return {"backend": MASKED, "sparse_layers": []}
    decisions = record["decisions"]
    return {"backend": SPARSE, "backend_layers": record["layers_mode"],
            "sparse_layers": [n for n, d in decisions.items() if d["path"] == SPARSE],
            "backend_decisions": decisions}


def create(run, saved: Mapping | None, log: Callable[[str], None]):
    """The trainer's backend for `run` (train.Run): `saved` is the checkpoint's record (a
    resumed run keeps its decisions, nothing is measured again)."""
    cfg = run.cfg
    if cfg.run.backend.value != SPARSE:
        return MaskedBackend()
    layers_mode = cfg.run.backend_layers.value
    method = run.method
    amp = cfg.run.amp and run.device.type == "cuda"
    if saved and saved.get("backend") == SPARSE:
        decisions = {n: Decision(**d) for n, d in saved["decisions"].items()}
        for name, decision in decisions.items():
            problem = decision.format == two_four.TWO_FOUR and _two_four_problem(run.engine.tensors[name].module,
                                                                                 run.engine.structure)
            if problem:  # resumed on a GPU whose 2:4 backend has other shape multiples
                decisions[name] = Decision(MASKED, final_density=decision.final_density, reason=f"resumed here: {problem}")
                log(decisions[name].line(name))
        log(f"backend sparse: resumed with {sum(d.path == SPARSE for d in decisions.values())} of "
            f"{len(decisions)} prunable layers on the sparse path")
    else:
        started = time.perf_counter()
        final = method.densities_at(method.total_steps - 1)
        decisions = decide(run.engine, final, run.data.input_shape, cfg.run.batch_size, run.device, layers_mode,
                           run.optimizer, amp)
        for name, decision in decisions.items():
            log(decision.line(name))
        chosen = sum(d.path == SPARSE for d in decisions.values())
        log(f"backend sparse: {chosen} of {len(decisions)} prunable layers on the sparse path "
            f"(backend_layers={layers_mode}, decided in {time.perf_counter() - started:.1f} s)")

    def dense_grad_at(step: int) -> bool:
        return method.dense_weight_grad(step) or not method.mask_gradients_at(step)

    return SparseBackend(run.engine, run.optimizer, decisions, dense_grad_at, layers_mode, amp)


# ---------------------------------------------------------------------------- `sparsebench bench`
BENCH_BLOCKS = (64, 32, 16, 8)  # block sides `sparse_bsr` looks for, largest first


def _mask_block(masks: Mapping[str, torch.Tensor]) -> int | None:
    """The largest side b in BENCH_BLOCKS such that every mask is made of whole b x b blocks of
    its (out, in*k) matrix (a `distribution.structure=block` run's masks), else None."""
    for block in BENCH_BLOCKS:
        structure = SparsityStructure(StructureKind.block, block=block)
        if all(m.shape[0] % block == 0 and m[0].numel() % block == 0 and structure.follows(m.reshape(m.shape[0], -1))
               for m in masks.values()):
            return block
    return None


def _bench_factory(kernel: str):
    def factory(model: nn.Module, masks: Mapping[str, torch.Tensor]):
        """One training step (SGD, momentum 0.9, lr 1e-3 as the bench's other steps) under
        `backend=sparse`, every prunable layer on `kernel` (bsr: masks of whole blocks only),
        with `masks` installed through the engine."""
        block = None
        if kernel == BSR:
            block = _mask_block(masks)
            if block is None:
                raise UserError("BSR training needs masks made of whole blocks (a run trained with "
                                "distribution.structure=block)")
            device = next(model.parameters()).device
            if bsr_block(block, device) is None:
                raise UserError(f"BSR training on {device.type} needs blocks of a power-of-two side of at least 16 "
                                f"(these masks are {block}x{block} blocks)")
        names = list(masks)
        prunable = [f"{n}.weight" if n else "weight" for n, m in model.named_modules()
                    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        structure = SparsityStructure(StructureKind.block, block=block) if block else UNSTRUCTURED
        engine = MaskedModel(model, dense_patterns=[n for n in prunable if n not in masks], structure=structure)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        densities = {n: int(masks[n].sum()) / masks[n].numel() for n in names}
        engine.set_masks({n: masks[n] for n in names}, densities)
        decisions = decide(engine, densities, (), 0, next(model.parameters()).device, ALL)
        backend = SparseBackend(engine, optimizer, decisions, lambda step: False, ALL)
        step_count = [0]

        def step(x, y):
            backend.begin_step(step_count[0])
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            engine.mask_gradients()
            optimizer.step()
            engine.apply_masks()
            step_count[0] += 1
        return step
    return factory


BENCH_TRAIN_BACKENDS = {"sparse_all": _bench_factory(CSR), "sparse_bsr": _bench_factory(BSR)}
