"""`svd`: SVD training (Yang et al., "Learning Low-rank Deep Neural Networks via Singular Vector
Orthogonality Regularization and Singular Value Sparsification", CVPR-W 2020, arXiv 2004.09031;
docs/methods.md, SVD training).

Every prunable layer is trained in the form W = U diag(s) V^T (sparse/low_rank.py), at full rank
R = min(m, n) and initialised from the SVD of the layer's initial weight, so training starts at
the same function as every other method. The training loss adds (`loss_term`)

    lambda_orthogonality * sum_l (||U_l^T U_l - I||_F^2 + ||V_l^T V_l - I||_F^2) / r_l^2
  + lambda_sparsity      * sum_l L1 ||s_l||_1, Hoyer ||s_l||_1 / ||s_l||_2
                           or Hoyer-Square ||s_l||_1^2 / ||s_l||_2^2          (`regularizer`)

which keeps U and V near orthonormal (so s stays the layer's spectrum) and concentrates the
spectrum on few singular values. At step `cut` x total steps the singular values are cut: each
layer keeps the smallest rank r_l whose largest singular values hold a fraction e of its
sum(s^2), the rest are set to 0 and kept at 0 (a rank mask: their U and V columns too, their
gradients and optimizer state zeroed), and the low-rank model is fine-tuned for the remaining
steps.

The paper cuts at a fixed energy threshold e, so its parameter count is an outcome. sparsebench
instead finds the threshold that meets `sparsity`: one e for all layers, the largest with
sum_l r_l(e)(m_l + n_l) <= (1 - sparsity) sum_l m_l n_l (r_l >= 1; a layer whose factors would
outnumber its dense weights counts m_l n_l), so SVD training is compared with the sparse methods
at an equal parameter count. `sparsity` is the fraction of the prunable layers' dense parameters
removed; final.json's actual_sparsity, layer_densities and inference FLOPs count r(m + n) per
layer (`parameter_densities`), and `svd` in final.json gives each layer's rank.

Choices that are sparsebench's, or unverified (the paper's body was not available to us; the
authors' code, yanghr/SVD_Prune_EDLCV, was read for what it does):

* r_l in the orthogonality term is the layer's current rank (R, then its kept rank): the authors'
  code divides by the size of the r x r Gram matrix, which is this.
* after the cut (`finetune_regularizers`): `orthogonality` (default) keeps the orthogonality term
  and drops the sparsity term, as the authors' fine-tuning commands do (perp_weight 1.0, decay 0,
  reg_type None); `none` drops both, `both` keeps both. Over kept columns only.
* Hoyer is ||s||_1/||s||_2 and Hoyer-Square its square (the code subtracts a constant 1 from
  each, which changes no gradient); all three of the code's options are offered, Hoyer-Square
  untuned here (lambda_sparsity was chosen for Hoyer).
* defaults: lambda_orthogonality = 1 (the code's perp_weight in every command); lambda_sparsity
  and the regulariser were chosen on the default run (docs/methods.md); the code uses 1e-4 to 0.3.
* initialisation from the SVD of the usual initial weights (the code trains from scratch with
  Kaiming-initialised factors and a normal s, or from the SVD of a pretrained model); one
  training run with a cut and fine-tuning in it (the code trains, cuts and fine-tunes in three
  separate runs).

The layers are computed as dense weights from U, s, V on every step, so a step costs a dense
model's FLOPs (the engine's masks stay all ones; `densities_at` says so to dry runs) plus forming
each W and the penalties, forward and backward (`step_flops_overhead`: independent of the batch,
1.17x a dense step in all on the default model at batch 128, far more on wide layers at small
batches); only inference FLOPs count the low-rank form: r(m + n) per output position, and for a spatially
decomposed convolution the V factor's extra rows where the U factor reads more input rows than it
outputs (`inference_flop_densities`). Grouped convolutions are refused. Needs distribution=uniform (its dense_first / dense_last /
dense_layers choose the layers; ranks are allocated by the energy threshold, not per layer),
unstructured sparsity, powerprop=1 and backend=masked.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext
from sparsebench.sparse.flops import layer_shapes
from sparsebench.sparse.low_rank import (
    SPARSITY_PENALTIES, apply_low_rank, choose_ranks, factors, kept_parameters, matrix_shape, orthogonality_penalty,
    top_rank_mask,
)
from sparsebench.sparse.masked import reset_optimizer_state


class Regularizer(enum.Enum):
    l1 = "l1"  # ||s||_1
    hoyer = "hoyer"  # ||s||_1 / ||s||_2
    hoyer_square = "hoyer_square"  # ||s||_1^2 / ||s||_2^2


class Decomposition(enum.Enum):
    channel = "channel"  # C_out x (C_in kh kw)
    spatial = "spatial"  # (C_out kh) x (C_in kw)


class FinetuneRegularizers(enum.Enum):
    orthogonality = "orthogonality"  # the authors' fine-tuning commands
    none = "none"
    both = "both"


@dataclass
class SVDOptions:
    lambda_orthogonality: float = 1.0
    lambda_sparsity: float = 0.1
    regularizer: Regularizer = Regularizer.hoyer
    decomposition: Decomposition = Decomposition.channel
    cut: float = 0.5  # fraction of training after which singular values are cut; the rest fine-tunes
    finetune_regularizers: FinetuneRegularizers = FinetuneRegularizers.orthogonality


def rows_read(conv: torch.nn.Module, size_in: int, size_out: int) -> int:
    """How many of the `size_in` input positions along a convolution's first spatial axis some
    output's kernel window reads (stride, dilation and padding there; zero padding is not read)."""
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    if conv.padding == "same":  # torch pads (kernel - 1) * dilation in all, the smaller half first
        pad = dilation * (kernel - 1) // 2
    elif conv.padding == "valid":
        pad = 0
    else:
        pad = conv.padding[0]
    return len({o * stride - pad + i * dilation for o in range(size_out) for i in range(kernel)} & set(range(size_in)))


@METHODS.register("svd")
class SVDTraining(SparsityMethod):
    name = "svd"
    Options = SVDOptions
    masks_weights = False  # ranks, not masks: tests/test_svd.py, not the per-weight method tests
    runs_on_sparse_backend = False  # the layers are U diag(s) V^T, not masked weights
    powerprop_conflict = "SVD training keeps each layer as U diag(s) V^T, which sign(v)|v|^alpha cannot also be"

    def validate(self) -> None:
        o = self.options
        for key in ("lambda_orthogonality", "lambda_sparsity"):
            if getattr(o, key) < 0:
                raise UserError(f"method.{key}={getattr(o, key)}: expected a weight >= 0")
        if not 0.0 < o.cut < 1.0:
            raise UserError(f"method.cut={o.cut}: expected a fraction of training in (0, 1)")
        if self.target.allocation != "uniform":
            raise UserError(f"distribution={self.target.allocation}: method svd allocates ranks by one energy "
                            "threshold over all layers and uses no per-layer densities; use distribution=uniform "
                            "(its dense_first, dense_last and dense_layers choose the layers)")
        self.cut_step = round(o.cut * self.total_steps)
        if not 0 < self.cut_step < self.total_steps:
            raise UserError(f"method.cut={o.cut}: with {self.total_steps} training steps the cut falls at step "
                            f"{self.cut_step}, leaving no training before it or no fine-tuning after it; raise epochs")
        grouped = [n for n, t in self.engine.tensors.items() if getattr(t.module, "groups", 1) > 1]
        if grouped:
            raise UserError(f"method svd: {grouped[0]} is a grouped convolution, which U diag(s) V^T cannot factor "
                            "into two convolutions of fewer FLOPs; keep it dense with distribution.dense_layers")
        decomposition = o.decomposition.value
        self.layers = {n: t.module for n, t in self.engine.tensors.items()}
        self.shapes = {n: matrix_shape(t.module.weight.shape, decomposition) for n, t in self.engine.tensors.items()}
        self.dense_params = sum(m * n for m, n in self.shapes.values())
        self.budget = self.dense_params - math.floor(self.target.sparsity * self.dense_params + 1e-6)
        least = sum(kept_parameters(1, m, n) for m, n in self.shapes.values())
        if least > self.budget:
            raise UserError(
                f"sparsity={self.target.sparsity}: method svd keeps at least rank 1 in every layer, {least} of "
                f"{self.dense_params} parameters here (sparsity {1 - least / self.dense_params:.4f}); choose a "
                "lower sparsity"
            )
        # Registered before the optimizer is built (build_run), so that it trains U, s and V.
        # The engine's `param` of each tensor is the replaced weight: never read, as its mask stays
        # all ones and the engine skips dense tensors on every step.
        apply_low_rank(self.layers.values(), decomposition)
        self.rank_masks = {n: torch.ones(min(m, k), dtype=torch.bool, device=factors(self.layers[n])[1].device)
                           for n, (m, k) in self.shapes.items()}
        self.cut_done = False
        self.energy: float | None = None
        self._kept: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ hooks
    def start(self, ctx: StepContext) -> None:
        ctx.log(f"SVD training: {len(self.layers)} layers as U diag(s) V^T ({self.options.decomposition.value}-wise); "
                f"singular values cut at step {self.cut_step} to {self.budget} of {self.dense_params} parameters")

    def before_step(self, ctx: StepContext) -> None:
        if not self.cut_done and ctx.step >= self.cut_step:
            self._cut(ctx)

    @torch.no_grad()
    def _cut(self, ctx: StepContext) -> None:
        spectra = {n: factors(module)[1] for n, module in self.layers.items()}
        ranks, self.energy = choose_ranks(spectra, self.shapes, self.budget)
        for name, module in self.layers.items():
            self.rank_masks[name] = top_rank_mask(spectra[name], ranks[name])
            for param, removed in self._removed(name):
                param[removed] = 0.0
                reset_optimizer_state(ctx.optimizer, param, removed)
        self.cut_done = True
        self._index_kept()
        kept = sum(self.kept_params().values())
        ctx.log(f"SVD training: step {ctx.step}: ranks cut to {', '.join(str(r) for r in ranks.values())} "
                f"(energy fraction {self.energy:.4f} in every layer), {kept} of {self.dense_params} parameters kept "
                f"(sparsity {1 - kept / self.dense_params:.4f})")

    def _removed(self, name: str) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """(parameter, entries of it that the cut removed) for U, s and V of layer `name`."""
        U, s, V = factors(self.layers[name])
        removed = ~self.rank_masks[name]
        return [(U, removed.expand_as(U)), (s, removed), (V, removed.expand_as(V))]

    def _index_kept(self) -> None:
        self._kept = {n: m.nonzero().flatten() for n, m in self.rank_masks.items()}

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if self.cut_done:  # removed singular values and their vectors get no update
            for name in self.layers:
                for param, removed in self._removed(name):
                    if param.grad is not None:
                        param.grad[removed] = 0.0

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if self.cut_done:  # exactly 0, whatever the optimizer did (weight decay of a 0 is 0 anyway)
            for name in self.layers:
                for param, removed in self._removed(name):
                    param[removed] = 0.0

    def regularizer_weights(self) -> tuple[float, float]:
        """(lambda_orthogonality, lambda_sparsity) in force now: both before the cut, then as
        `finetune_regularizers` says."""
        o = self.options
        if not self.cut_done or o.finetune_regularizers is FinetuneRegularizers.both:
            return o.lambda_orthogonality, o.lambda_sparsity
        if o.finetune_regularizers is FinetuneRegularizers.orthogonality:
            return o.lambda_orthogonality, 0.0
        return 0.0, 0.0

    def step_flops_overhead(self, step: int) -> float:
        """What a step computes beyond the dense layers, per layer (m x n, full rank R): forming
        W = (U s) V^T, 2mnR FLOPs, and its backward, 4mnR; the orthogonality penalty on r kept
        columns (R before the cut), 2r^2(m + n) forward and twice that backward. Independent of the
        batch, and charged as computed: the removed columns stay in the product as zeros. A dry
        run, which cannot know the ranks, charges the penalty at full rank after the cut too."""
        orthogonality = self.options.lambda_orthogonality > 0 and (
            step < self.cut_step or self.options.finetune_regularizers is not FinetuneRegularizers.none)
        flops = 0.0
        for name, (m, n) in self.shapes.items():
            full = min(m, n)
            flops += 6.0 * m * n * full
            if orthogonality:
                r = full if step < self.cut_step or not self.cut_done else int(self.rank_masks[name].sum())
                flops += 6.0 * r * r * (m + n)
        return flops

    def loss_term(self) -> torch.Tensor | None:
        orthogonality, sparsity = self.regularizer_weights()
        if orthogonality == 0.0 and sparsity == 0.0:
            return None
        penalty = SPARSITY_PENALTIES[self.options.regularizer.value]
        total = None
        for name, module in self.layers.items():
            U, s, V = factors(module)
            term = 0.0
            if orthogonality:
                if self.cut_done:  # the kept singular vectors; r = the kept rank
                    U, V = U[:, self._kept[name]], V[:, self._kept[name]]
                term = orthogonality * orthogonality_penalty(U, V)
            if sparsity:
                term = term + sparsity * penalty(s)  # removed values are 0: no term, no gradient
            total = term if total is None else total + term
        return total

    # ------------------------------------------------------------ what is kept
    def ranks(self) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self.rank_masks.items()}

    def kept_params(self) -> dict[str, int]:
        if not self.cut_done:  # full rank: the dense layer (its factors are not what it would store)
            return {n: m * k for n, (m, k) in self.shapes.items()}
        return {n: kept_parameters(r, *self.shapes[n]) for n, r in self.ranks().items()}

    def parameter_densities(self) -> dict[str, float]:
        return {n: kept / (self.shapes[n][0] * self.shapes[n][1]) for n, kept in self.kept_params().items()}

    def inference_flop_densities(self, input_shape: tuple[int, ...]) -> dict[str, float]:
        """A rank-r layer as two convolutions. Channel-wise, both run at the layer's output
        positions: r(m + n) per position, the parameter density. Spatial-wise, the V factor (a
        1 x kw convolution, or 1 x 1 for a 1-D kernel) runs over every input row of the first
        spatial axis that the U factor (kh x 1, with the layer's stride, padding and dilation
        there) reads, U at the output positions: r(n H_read / H_out + m) per output position,
        more than the parameter density where U's windows read more rows than there are output
        rows (a strided layer with kh > 1, an unpadded one). Full rank (before the cut), factors
        that would cost more than the dense layer, or a layer the probe forward does not reach:
        the parameter density."""
        densities = self.parameter_densities()
        if not self.cut_done or self.options.decomposition is Decomposition.channel:
            return densities
        convs = {n: module for n, module in self.layers.items() if not isinstance(module, torch.nn.Linear)}
        shapes = layer_shapes(self.engine.model, convs, input_shape)
        ranks = self.ranks()
        for name, module in convs.items():
            if name not in shapes:
                continue
            (_, *input_spatial), (_, *output_spatial) = shapes[name]
            m, n = self.shapes[name]
            rows = rows_read(module, input_spatial[0], output_spatial[0]) / output_spatial[0]
            densities[name] = min(1.0, ranks[name] * (n * rows + m) / (m * n))
        return densities

    def summary(self) -> dict:
        kept, ranks = self.kept_params(), self.ranks()
        layers = {
            n: {"rank": ranks[n], "full_rank": min(m, k), "shape": [m, k], "kept_params": kept[n],
                "dense_params": m * k}
            for n, (m, k) in self.shapes.items()
        }
        return {"svd": {"layers": layers, "energy": self.energy, "kept_params": sum(kept.values()),
                        "dense_params": self.dense_params, "cut_step": self.cut_step,
                        "decomposition": self.options.decomposition.value}}

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"cut_done": self.cut_done, "energy": self.energy,
                "rank_masks": {n: m.clone() for n, m in self.rank_masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.cut_done = bool(state["cut_done"])
        self.energy = state["energy"]
        for name, mask in state["rank_masks"].items():
            self.rank_masks[name] = mask.to(dtype=torch.bool, device=self.rank_masks[name].device).clone()
        self._index_kept()

    # ------------------------------------------------------------ the plan, for dry runs
    def mask_update_steps(self) -> list[int]:
        return [self.cut_step]

    def schedule_value(self, step: int) -> tuple[str, float]:
        """The parameter sparsity in force during `step`: 0 (full rank) until the cut, the target after."""
        return "parameter_sparsity", self.target.sparsity if step >= self.cut_step else 0.0

    def densities_at(self, step: int) -> dict[str, float]:
        """All ones: every step computes the dense layers from U, s, V (what the FLOP count charges)."""
        return {n: 1.0 for n in self.engine.names}
