"""`set`: Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018; docs/methods.md, SET).

Two protocols, recorded in the run's config as `method.protocol`:

* `original` (the paper and its code): after every epoch but the last (i.e. at the first step of
  every epoch except the first), each sparse tensor removes the fraction `zeta` of its smallest
  positive and the fraction `zeta` of its largest negative active weights (the ones closest to
  zero, split by sign): floor(zeta n_pos) and floor(zeta n_neg) of them. Active weights that are
  exactly 0 count with the positives, as the smallest ones (the Keras code removes every exact
  zero besides; here zeta keeps its meaning of a fraction). The same number of connections is
  then added at uniformly random positions among those the removal did not keep, so the count
  stays exact whatever the sign split. The paper's initial topology is Erdos-Renyi: run it with
  `distribution=er` (the allocation is not the method's business; the masks are exact-count
  random draws at those densities, where the Keras code samples Bernoulli).
* `rigl` (SET as the baseline of RigL-style papers, the reference's SparseSETOptimizer): every
  `delta_t` steps while t < T_end, drop the k = floor(f(t) nnz) smallest |W| over all active
  weights, grow k at random; f(t) is RigL's cosine (or constant) drop fraction from `alpha`.

Under `distribution.structure=block` both protocols drop whole blocks by smallest sum of |W|
(the original protocol's sign split has no block analogue: it drops zeta of the active blocks);
under `nm` the drop is the protocol's own and each group regrows what it lost (dst.py).

It differs from `rigl` by one function: grow scores are uniform random numbers, so no dense
gradient is needed (FLOPs stay 3 f_S) and the masks change in `before_step` of the update step.

New weights (`regrow_init`): `zero` (default; the RigL protocol and the Keras mask version),
`normal` (N(0, init_std^2), std 0.1 in the sparse-Python original), or `keep` (the value the
weight had when it was last dropped; 0 for a position that was never active). Their optimizer
state is reset in every case.

Optimizer state across epochs (`reset_optimizer_each_epoch`): the Keras original builds and
compiles a fresh model and SGD optimizer for every epoch, so all momentum (of every parameter,
biases included) is forgotten at each epoch boundary; `reset_optimizer_each_epoch=true` does the
same (the whole optimizer state is cleared at the first step of every epoch but the first,
after that step's mask change), with either protocol. The default, false, keeps one optimizer
over the run, as the RigL code's SET baseline does; new weights' state is reset in both cases.

Under `powerprop=alpha` the weights are w = sign(v)|v|^alpha: `normal` draws w ~ N(0, init_std^2)
and stores the matching v; `keep` restores the dropped v (the same w); and a weight that would
start at v = 0 (`zero`, or `keep` at a never-active position) starts at a fresh Powerprop
initial value instead, since v = 0 never trains (sparse/powerprop.py).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, StepContext
from sparsebench.methods.dst import DropSchedule, DynamicSparseMethod
from sparsebench.sparse.masked import PrunableTensor, RegrowInit, topk_mask
from sparsebench.sparse.structure import StructureKind


class SETProtocol(enum.Enum):
    original = "original"  # per epoch, zeta of the smallest positive and largest negative
    rigl = "rigl"  # every delta_t steps, magnitude drop, cosine alpha


class SETRegrowInit(enum.Enum):
    zero = "zero"
    normal = "normal"
    keep = "keep"


@dataclass
class SETOptions:
    protocol: SETProtocol = SETProtocol.original
    zeta: float = 0.3  # original: fraction of positive and of negative weights replaced per epoch
    alpha: float = 0.3  # rigl protocol: initial drop fraction
    drop_schedule: DropSchedule = DropSchedule.cosine  # rigl protocol
    delta_t: int = 100  # rigl protocol: steps between mask updates
    updates_per_epoch: float | None = None  # instead of delta_t: mask updates per epoch
    total_updates: int | None = None  # instead of delta_t: about this many updates before T_end
    end: float = 0.75  # rigl protocol: fraction of training after which masks are fixed
    regrow_init: SETRegrowInit = SETRegrowInit.zero
    init_std: float = 0.1  # std of regrow_init=normal
    reset_optimizer_each_epoch: bool = False  # true: a fresh optimizer every epoch (the Keras original)


@METHODS.register("set")
class SET(DynamicSparseMethod):
    name = "set"
    Options = SETOptions

    def validate(self) -> None:
        super().validate()
        o = self.options
        if not 0.0 < o.zeta < 1.0:
            raise UserError(f"method.zeta={o.zeta}: expected a fraction in (0, 1)")
        if not o.init_std > 0.0:
            raise UserError(f"method.init_std={o.init_std}: expected a positive standard deviation")
        if o.protocol is SETProtocol.original and (o.updates_per_epoch is not None or o.total_updates is not None):
            raise UserError("method.updates_per_epoch and method.total_updates space the updates of protocol=rigl; "
                            "protocol=original updates once per epoch")
        self.memory: dict[str, torch.Tensor] = {}  # last value of each dropped weight (keep)
        init = {SETRegrowInit.zero: "new weights 0", SETRegrowInit.normal: f"new weights N(0, {o.init_std}^2)",
                SETRegrowInit.keep: "new weights at their last value"}[o.regrow_init]
        if o.protocol is SETProtocol.original and self.engine.structure.kind is StructureKind.block:
            self.description = (f"original protocol on {self.engine.structure}: once per epoch, zeta={o.zeta} of the "
                                f"active blocks with the smallest sum of |W| regrown at random, {init}")
        elif o.protocol is SETProtocol.original:
            self.description = (f"original protocol: once per epoch, zeta={o.zeta} of the smallest positive and "
                                f"largest negative weights regrown at random, {init}")
        else:
            self.description = (f"RigL protocol: drop fraction {o.alpha} {o.drop_schedule.value} to "
                                f"T_end={self.end_step}, drop smallest |W|, grow at random, {init}")
        if o.reset_optimizer_each_epoch:
            self.description += "; optimizer state reset every epoch"

    def before_step(self, ctx: StepContext) -> None:
        super().before_step(ctx)  # the mask change of an update step
        spe = self.steps_per_epoch
        if self.options.reset_optimizer_each_epoch and ctx.step > 0 and ctx.step % spe == 0:
            ctx.reset_optimizer()  # the Keras original's fresh optimizer for the new epoch

    # ------------------------------------------------------------ schedule
    @property
    def original(self) -> bool:
        return self.options.protocol is SETProtocol.original

    def update_steps(self) -> list[int]:
        if self.original:  # the first step of every epoch but the first
            return list(range(self.steps_per_epoch, self.total_steps, self.steps_per_epoch))
        return super().update_steps()

    def drop_fraction(self, step: int) -> float:
        if self.original:
            return self.options.zeta if self.updates and step <= self.updates[-1] else 0.0
        return super().drop_fraction(step)

    # ------------------------------------------------------------ drop and grow
    def select_drop(self, name: str, t: PrunableTensor, step: int) -> torch.Tensor:
        if not self.original:
            return super().select_drop(name, t, step)
        w = t.param.detach()
        nonneg, neg = t.mask & (w >= 0), t.mask & (w < 0)
        zeta = self.options.zeta
        k_pos, k_neg = math.floor(zeta * int(nonneg.sum())), math.floor(zeta * int(neg.sum()))
        smallest_positive = topk_mask((-w).masked_fill(~nonneg, -math.inf), k_pos)
        largest_negative = topk_mask(w.masked_fill(~neg, -math.inf), k_neg)
        return smallest_positive | largest_negative

    def grow_scores(self, name: str, t: PrunableTensor, step: int) -> torch.Tensor:
        return self.random_scores(t)

    def regrow_init(self, name: str) -> RegrowInit:
        kind = self.options.regrow_init
        if kind is SETRegrowInit.normal:
            return self._normal_init(name)
        if kind is SETRegrowInit.keep:
            return self._memory_init(name)
        return "zero"

    def _normal_init(self, name: str) -> Callable[[torch.Size, torch.device, torch.dtype], torch.Tensor]:
        def init(shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            weights = torch.randn(shape, generator=self.generator) * self.options.init_std
            # N(0, init_std^2) is the distribution of the weights w; under Powerprop store its v.
            return self.engine.param_value(name, weights).to(device=device, dtype=dtype)

        return init

    def _memory_init(self, name: str) -> Callable[[torch.Size, torch.device, torch.dtype], torch.Tensor]:
        def init(shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
            return self._memory(name).to(device=device, dtype=dtype)

        return init

    def _memory(self, name: str) -> torch.Tensor:
        if name not in self.memory:
            param = self.engine.tensors[name].param
            self.memory[name] = torch.zeros(param.shape, dtype=param.dtype, device=param.device)
        return self.memory[name]

    def remember_dropped(self, name: str, t: PrunableTensor, drop: torch.Tensor) -> None:
        if self.options.regrow_init is SETRegrowInit.keep:
            memory = self._memory(name)
            memory[drop] = t.param.detach()[drop]

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.memory:
            state["memory"] = {n: m.clone() for n, m in self.memory.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name, values in state.get("memory", {}).items():
            self.memory[name] = values.clone().to(self.engine.tensors[name].param.device)
