"""The 2:4 path of the sparse training backend: N:M-masked Linear layers through torch's 2:4 kernels.

Under `backend=sparse` with `distribution.structure=nm` and `amp=true` on a CUDA GPU of compute
capability 8.0+ (cuSPARSELt on Hopper and later), a chosen Linear layer computes its training
forward with `torch.sparse.to_sparse_semi_structured`'s product. What that product can do sets
the design:

* It multiplies only 16-bit operands (float16/bfloat16) with the compressed matrix itself,
  so only the forward y = x W^T can use it. The input gradient dL/dx = dL/dy W needs W^T as the
  compressed operand, and W^T is 2:4 only for masks that are 2:4 along columns too. torch's own
  2:4 training examples prune such "transposable" masks (`_sparse_semi_structured_tile`); the
  engine's N:M masks are 2:4 along rows only, and making them transposable would change every
  method's masks. So the input gradient and the weight gradient dL/dW = dL/dy^T x are dense
  16-bit GEMMs, as autocast would run them, and the weight gradient reaches `.grad` dense: the
  engine masks it and the torch optimizer steps it exactly as under `backend=masked`.
* The compressed weight is a copy. It is rebuilt after every optimizer step and whenever else the
  parameter has been written (a mask change, a checkpoint load: its version counter moved), the
  re-sparsification torch's semi-structured training examples do after each optimizer step. Its
  cost, one compression of the layer per step, is part of what `backend.probe_two_four` times.
* Only a 16-bit forward takes the path: the training forward under autocast (`amp=true`). An
  evaluation forward in float32 runs the layer's own dense forward, so metrics are computed as
  under `masked`.
* A group of 4 consecutive weights may hold at most 2 non-zeros: N:M masks qualify when M is a
  multiple of 4 and the current level n is at most 2 (density at most 2/M). GMP's ramp through
  3:4 keeps the layer dense until it reaches 2:4 (`max_density`).

What a step can gain is bounded: one of its three GEMMs is 2:4. bench_gpu.py measures it.
UNMEASURED on a GPU so far: no GPU was lent to the sessions that wrote this. On the CPU the
Function is tested with a stand-in for the compression (the pattern checked, the matrix kept
dense; `compress` is the one seam), under CPU bfloat16 autocast, against the masked backend.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsebench.sparse import kernels
from sparsebench.sparse.kernels import SEMI_STRUCTURED_DTYPES, SparseFormatError

TWO_FOUR = "semi_structured"  # the format name a layer's Decision carries


def nm_problem(n: int, m: int) -> str | None:
    """Why n:m masks cannot run on 2:4 kernels (None: they can)."""
    if m % 4:
        return (f"distribution.m={m}: 2:4 kernels read groups of 4 consecutive weights, so m must be a multiple "
                "of 4")
    if n > 2:
        return (f"distribution.n={n} of every m={m}: 2:4 kernels hold at most 2 of every 4 consecutive weights, "
                "so n must be at most 2")
    return None


def max_density(m: int) -> float:
    """The highest N:M density whose masks are 2:4: level n <= 2 of every m."""
    return 2 / m


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype a forward on `x` runs in (autocast's, else x's own); None: not 16-bit."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    return dtype if dtype in SEMI_STRUCTURED_DTYPES else None


def compress(weight_16: torch.Tensor) -> torch.Tensor:
    """The 2:4 compressed operand of a 16-bit masked weight (torch's kernels; CUDA only). Unchecked:
    `CompressedWeight` checks the pattern once per mask, not once per step."""
    return kernels.semi_structured_from_dense(weight_16)


class CompressedWeight:
    """One layer's masked weight in 16 bits: the compressed forward operand and the dense copy the
    input gradient multiplies with, rebuilt whenever `param` has been written since.

    "Written" is read from the parameter's version counter, which in-place writes move: the engine's
    `apply_masks`, a mask change, a checkpoint load, and most optimizers' updates. A fused
    optimizer's kernel (AdamW(fused=True)) leaves it as it was, so the backend also calls
    `invalidate` after every optimizer step (tests/test_two_four.py checks both). The mask's own counter moves
    only when the engine installs a new mask; only then is its 2:4 pattern checked (a count that
    costs a GPU-to-CPU sync), since the kernels would silently drop a third non-zero of a group."""

    def __init__(self):
        self._key: tuple | None = None
        self._mask_key: tuple | None = None
        self.sparse: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None
        self.builds = 0  # compressions so far (one per parameter update)

    def _check_pattern(self, mask: torch.Tensor) -> None:
        key = (mask._version, mask.data_ptr())
        if key != self._mask_key:
            over = kernels.count_nm_violations(mask.reshape(mask.shape[0], -1), 2, 4)
            if over:
                raise SparseFormatError(f"{over} groups of 4 consecutive weights hold more than 2 active weights: "
                                        "the mask is not 2:4 and the 2:4 kernels would drop weights")
            self._mask_key = key

    def invalidate(self) -> None:
        """Rebuild at the next forward whatever the version counter says."""
        self._key = None

    def of(self, weight: torch.Tensor, param: torch.Tensor, mask: torch.Tensor,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_pattern(mask)
        key = (param._version, param.data_ptr(), dtype)
        if key != self._key:
            with torch.no_grad():
                self.dense = weight.detach().to(dtype)
                self.sparse = compress(self.dense)  # looked up here: the seam the CPU tests use
            self._key = key
            self.builds += 1
        return self.sparse, self.dense


class TwoFourLinear(torch.autograd.Function):
    """y = x W^T + b with W's 2:4 compressed copy; dense 16-bit gradients (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, sparse, dense):
        dtype = dense.dtype
        # contiguous: the 2:4 kernels read the dense operand as a plain row-major matrix
        x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
        with torch.autocast(x.device.type, enabled=False):  # operands are 16-bit already; no casts of the 2:4 copy
            y = F.linear(x2, sparse, None if bias is None else bias.to(dtype)).contiguous()
        ctx.save_for_backward(x2, dense)
        ctx.input_shape, ctx.input_dtype, ctx.weight_dtype = x.shape, x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # y over its own storage, not a reshape: a custom Function's output that is a view may not be
        # modified in place, and the next layer's ReLU(inplace=True) does exactly that
        return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, grad_y):
        x2, dense = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(dense.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ dense).reshape(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ x2).to(ctx.weight_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, param: torch.Tensor,
            mask: torch.Tensor, weights: CompressedWeight,
            dense_forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A layer's forward on the 2:4 path: the Function for a 16-bit forward, `dense_forward` otherwise."""
    dtype = compute_dtype(x)
    if dtype is None:
        return dense_forward(x)
    sparse, dense = weights.of(weight, param, mask, dtype)
    return TwoFourLinear.apply(x, weight, bias, sparse, dense)
