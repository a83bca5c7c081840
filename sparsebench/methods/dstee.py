"""`dstee`: DST-EE, dynamic sparse training balancing exploration and exploitation (Huang et al.,
DAC 2023, arXiv 2211.16667; docs/methods.md, DST-EE).

RigL's loop (drop the smallest |W|, grow by a score, cosine drop fraction until T_end), with the
grow score an acquisition function: exploitation (the dense gradient's magnitude) plus an
exploration bonus that grows with time and shrinks with N_w, the number of update rounds in
which connection w was active (the per-weight count the paper keeps):

    bonus=log  (default):  |grad| + c * ln(t + 1) / (N_w + eps)
    bonus=sqrt (UCB1 form): |grad| + c * sqrt(ln(t + 1) / (N_w + eps))

Neither form could be verified: no code is public and the paper's body was not available to us
(only its abstract: "an acquisition function" of exploitation and exploration with convergence
guarantees). Both candidate forms are options. The paper's coverage (the fraction of connections
ever explored) is final.json's `itop_rate`: the share of prunable weights active at any time.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from sparsebench.methods.base import METHODS
from sparsebench.methods.rigl import GrowScore, RigL, RigLOptions
from sparsebench.sparse.masked import PrunableTensor


class Bonus(enum.Enum):
    log = "log"  # c ln(t+1) / (N_w + eps)
    sqrt = "sqrt"  # c sqrt(ln(t+1) / (N_w + eps)), UCB1's shape


@dataclass
class DSTEEOptions(RigLOptions):
    grow_score: GrowScore = GrowScore.gradient_explore
    bonus: Bonus = Bonus.log


@METHODS.register("dstee")
class DSTEE(RigL):
    name = "dstee"
    Options = DSTEEOptions

    def grow_scores(self, name: str, t: PrunableTensor, step: int) -> torch.Tensor:
        if not self.explores or self.options.bonus is Bonus.log:
            return super().grow_scores(name, t, step)
        o = self.options
        count = self.counter(name).float()
        return self._dense_grads[name] + o.explore_c * torch.sqrt(math.log(step + 1) / (count + o.explore_eps))
