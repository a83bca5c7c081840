"""`rigl`: Rigging the Lottery (Evci et al., ICML 2020, arXiv 1911.11134; docs/methods.md, RigL).

Random masks at the target densities (exact counts), then every `delta_t` steps while
t < T_end = `end` x training, per tensor l:

1. k = floor(f(t) nnz_l), f(t) = alpha/2 (1 + cos(pi t / T_end)) (or constant alpha);
2. drop the k active weights with the smallest |W| (+ N(0, 1e-5) noise to break ties);
3. grow the k entries not kept by step 2 with the largest |dL/d(M*W)| on the current
   mini-batch (the dense gradient, read only on update steps: FLOPs 2 f_S + f_D there);
   a just-dropped entry may be regrown and then keeps its value;
4. grown weights start at 0 and their optimizer state (momentum, Adam moments) is reset
   (`rigl_acc_scale = 0`, `grow_init = zeros` in the reference code).

Defaults are the paper's: delta_t = 100, alpha = 0.3 cosine, T_end = 0.75 of training (the
CIFAR-10 code's 75 000 of 97 656 steps is 0.768: conf/experiment/cifar10_wrn22_2_rigl.yaml).
With `distribution.structure=nm` each group regrows in itself what the drop took from it; with
`block`, whole blocks are dropped and grown by their summed |W| and |gradient| (dst.py).

Timing (`timing`, dst.py): by default (`sparsebench`) the first round is at step delta_t and a
round step also applies its optimizer step before the mask changes. `timing=reference` does what
the reference code does: a first round at step 0, rounds up to and including T_end, and on every
round step the mask update replaces the optimizer step (no weight, momentum or weight-decay
update that step). The default is kept for continuity with earlier sparsebench runs; the two
differ by one round and by 1 % of the weight updates at delta_t = 100.

Under `powerprop=alpha` the grow score is |dL/dw| of the effective weights (|dL/dv| is 0 at
every inactive entry) and grown entries start at a fresh initial value of v, not at 0, where
v would never move (sparse/powerprop.py).

`grow_score=gradient_explore` swaps step 3's score for a DST-EE-style acquisition
(Huang et al., arXiv 2211.16667): |grad| + c ln(t+1) / (N_w + eps), where N_w counts the update
rounds in which connection w was active, t is the training step, c = `explore_c` and
eps = `explore_eps`. DST-EE's exact form is UNVERIFIED (docs/methods.md, DST-EE: only the
idea "exploitation by gradient + exploration of rarely active connections" is verified); this
is a sparsebench reading of it. With eps = 1 a never-active connection gets a bonus of
c ln(t+1); a small eps makes every never-tried connection win over every tried one. The
bonus is added to the raw gradient, so its balance depends on the gradient's scale (including
AMP's loss scale when amp=true).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS
from sparsebench.methods.dst import DropSchedule, DynamicSparseMethod, Timing
from sparsebench.sparse.masked import PrunableTensor


class GrowScore(enum.Enum):
    gradient = "gradient"  # |dense gradient| (RigL)
    gradient_explore = "gradient_explore"  # |grad| + c ln(t+1) / (N_w + eps) (DST-EE style)


@dataclass
class RigLOptions:
    alpha: float = 0.3  # initial drop fraction
    drop_schedule: DropSchedule = DropSchedule.cosine
    delta_t: int = 100  # steps between mask updates
    updates_per_epoch: float | None = None  # instead of delta_t: mask updates per epoch
    total_updates: int | None = None  # instead of delta_t: about this many updates before T_end
    end: float = 0.75  # fraction of training after which masks are fixed (T_end)
    grow_score: GrowScore = GrowScore.gradient
    explore_c: float = 1e-3  # exploration weight c (gradient_explore only)
    explore_eps: float = 1.0  # eps in c ln(t+1) / (N_w + eps) (gradient_explore only)
    timing: Timing = Timing.sparsebench  # reference: rounds from step 0, each replacing its optimizer step


@METHODS.register("rigl")
class RigL(DynamicSparseMethod):
    name = "rigl"
    Options = RigLOptions
    needs_dense_grad = True

    def validate(self) -> None:
        super().validate()
        o = self.options
        if o.explore_c < 0:
            raise UserError(f"method.explore_c={o.explore_c}: expected a non-negative exploration weight")
        if o.explore_eps <= 0:
            raise UserError(f"method.explore_eps={o.explore_eps}: expected a positive number")
        self.explores = o.grow_score is GrowScore.gradient_explore
        # N_w per sparse tensor: update rounds in which each connection was active.
        self.active_rounds: dict[str, torch.Tensor] = {}
        grow = ("|grad| + c ln(t+1)/(N_w+eps), c=" + f"{o.explore_c:g}") if self.explores else "|dense gradient|"
        grown_at = "a fresh Powerprop initial value" if self.engine.powerprop else "0"
        timing = ("; reference timing: rounds from step 0, each replacing its optimizer step"
                  if self.reference_timing else "")
        self.description = (f"drop fraction {o.alpha} {o.drop_schedule.value} to T_end={self.end_step}, "
                            f"drop smallest |W|, grow largest {grow}, grown weights start at {grown_at}{timing}")

    def counter(self, name: str) -> torch.Tensor:
        if name not in self.active_rounds:
            mask = self.engine.tensors[name].mask
            self.active_rounds[name] = torch.zeros(mask.shape, dtype=torch.int32, device=mask.device)
        return self.active_rounds[name]

    def before_update(self, step: int) -> None:
        if self.explores:  # the round that ends now counts for every connection active in it
            for name, t in self.engine.tensors.items():
                self.counter(name).add_(t.mask.to(torch.int32))

    def grow_scores(self, name: str, t: PrunableTensor, step: int) -> torch.Tensor:
        score = self._dense_grads[name]
        if self.explores:
            o = self.options
            score = score + o.explore_c * math.log(step + 1) / (self.counter(name).float() + o.explore_eps)
        return score

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.explores:
            state["active_rounds"] = {n: c.clone() for n, c in self.active_rounds.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name, counts in state.get("active_rounds", {}).items():
            self.active_rounds[name] = counts.clone().to(self.engine.tensors[name].mask.device)
