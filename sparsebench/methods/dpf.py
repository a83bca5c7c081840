"""`dpf`: Dynamic Model Pruning with Feedback (Lin et al., ICLR 2020, arXiv 2006.07253;
docs/methods.md, DPF).

The method keeps a dense copy w_t of every prunable weight. The model always holds the pruned
weights m_t * w_t during forward and backward (so the engine's "masked entries are zero" holds
whenever it checks), the stochastic gradient is taken at the pruned model and applied to the dense
weights:

    w_{t+1} = w_t - lr_t * grad f(m_t * w_t)

so the pruning error w_t - m_t * w_t is fed back and a prematurely pruned weight can grow back.
In the trainer's step order this is:

* `mask_gradients = False`: the gradient of masked entries (taken at the pruned model) reaches
  the optimizer;
* `after_backward`: the dense values are written back into the masked entries, so the optimizer
  (momentum, weight decay included) updates the dense weights;
* `after_step`: the updated weights are saved into the dense copy; the engine then zeroes the
  masked entries again.

Every `frequency` steps (16, as the reproductions' `--prune-freq`) from `begin` to `end`
(fractions of training) the mask is recomputed from |w_t| at the cubic sparsity s_t of Zhu & Gupta
(0 at `begin`, the target at `end`). Re-activated weights take their dense value, with their
optimizer state kept (it is the dense weight's state). After `end` the mask is fixed and training
goes on (fine-tuning the final sparse model; the paper needs no separate retraining).

Once the last mask is installed (from step `end` on) the dense copies of pruned weights can never
come back, so DPF stops feeding them back: from that step it trains like any fixed-mask method
(gradients masked, `mask_gradients_at`), and its FLOPs are the masked cost 3 f_S per example.
Before `end` every step needs the gradient of every weight, pruned ones included: 2 f_S + f_D
(`dense_weight_grad`).

Under `powerprop=alpha` the dense copies hold v (w = sign(v)|v|^alpha). The gradient at the
pruned model w.r.t. a pruned v is 0 (it sits at v = 0), so the feedback for a pruned entry is
taken through its dense value: alpha |v_dense|^(alpha-1) dL/dw, with dL/dw of the pruned model
recorded by the engine (`MaskedModel.weight_grad`); active entries get their usual gradient.

Threshold: follows the run's `distribution` (a sparsebench choice; the paper's is UNVERIFIED):
`distribution=global` puts one magnitude threshold over all dense copies (as the Keras
reimplementation's global quantile); a layer-wise allocation (uniform, ER, ERK, custom) keeps, in
each tensor, the largest |w| at density 1 - (s_t / s)(1 - d_l), the shape `magnitude_prune` uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext
from sparsebench.schedules import cubic_sparsity, last_event
from sparsebench.sparse.allocation import global_topk_counts
from sparsebench.sparse.masked import target_nnz, topk_mask


@dataclass
class DPFOptions:
    begin: float = 0.0  # fraction of training where the sparsity starts to rise from 0
    end: float = 0.75  # fraction of training where the target sparsity is reached; mask fixed after
    frequency: int = 16  # steps between mask refreshes (the paper's p = 16)
    updates_per_epoch: float | None = None  # instead of frequency: mask refreshes per epoch
    total_updates: int | None = None  # instead of frequency: about this many refreshes from begin to end


@METHODS.register("dpf")
class DPF(SparsityMethod):
    Options = DPFOptions
    supports_global_allocation = True
    mask_gradients = False  # until `end`, the gradient at the pruned model updates masked (dense) entries too
    min_updates = 5

    def validate(self) -> None:
        o = self.options
        self.check_pruning_window(o.begin, o.end)
        self.begin_step = round(o.begin * self.total_steps)
        self.end_step = round(o.end * self.total_steps)
        if self.end_step >= self.total_steps or self.end_step <= self.begin_step:
            raise UserError(
                f"method.begin={o.begin}, method.end={o.end}: with {self.total_steps} training steps the "
                "pruning window is empty or ends after training; widen it or raise epochs"
            )
        self.frequency = self.update_interval("frequency", self.end_step - self.begin_step)
        self.refresh_steps = list(range(self.begin_step, self.end_step + 1, self.frequency))
        if self.refresh_steps[-1] != self.end_step:
            self.refresh_steps.append(self.end_step)  # the target is always reached at `end`
        self._refresh = set(self.refresh_steps)
        self.dense = {n: t.param.detach().clone() for n, t in self.engine.tensors.items()}

    # ------------------------------------------------------------ schedule
    def sparsity_at(self, step: int) -> float:
        """Cubic sparsity s_t (Zhu & Gupta eq. 1) from 0 at `begin` to the target at `end`."""
        return cubic_sparsity(step, 0.0, self.target.sparsity, self.begin_step, self.end_step)

    # ------------------------------------------------------------ hooks
    @torch.no_grad()
    def start(self, ctx: StepContext) -> None:
        for name, t in self.engine.tensors.items():
            self.dense[name].copy_(t.param)
        ctx.log(
            f"DPF: mask from |dense weights| every {self.frequency} steps, cubic sparsity from step "
            f"{self.begin_step} to {self.end_step}, "
            f"{'global' if self.target.allocation == 'global' else 'layer-wise'} threshold"
        )

    def feeds_back(self, step: int) -> bool:
        """True while pruned weights are still updated (before `end`); afterwards the mask is fixed."""
        return step < self.end_step

    def mask_gradients_at(self, step: int) -> bool:
        return not self.feeds_back(step)

    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        self._refresh_mask(ctx.step)
        # Powerprop: dL/dw of the pruned model, for the feedback of pruned entries (no-op otherwise).
        pruned = any(t.density < 1.0 for t in self.engine.tensors.values())
        self.engine.capture_weight_grads(self.feeds_back(ctx.step) and pruned and self.engine.powerprop)

    def _refresh_mask(self, step: int) -> None:
        if step not in self._refresh:
            return
        sparsity = self.sparsity_at(step)
        if sparsity <= 0.0:
            return  # nothing pruned yet: every mask is still all-ones
        scores = {n: w.abs() for n, w in self.dense.items()}
        if self.target.allocation == "global":
            total = sum(s.numel() for s in scores.values())
            counts = global_topk_counts(scores, target_nnz(total, 1.0 - sparsity))
            # Density stored as count/N: target_nnz(N, count/N) == count (its 1e-6 guard).
            densities = {n: counts[n] / scores[n].numel() for n in scores}
        else:
            densities = self.scaled_densities(sparsity)
        for name, density in densities.items():
            mask = topk_mask(scores[name], target_nnz(scores[name].numel(), density))
            dense = self.dense[name]
            # Re-activated weights come back at their dense value, optimizer state kept (no reset).
            self.engine.set_mask(name, mask, density, optimizer=None, regrow_init=lambda *_, d=dense: d)

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        if not self.feeds_back(ctx.step):
            return  # fixed mask: the trainer masks the gradients like any sparse method's
        # The gradient was taken at m * w; put w back in the masked entries so the optimizer
        # step updates the dense weights: w <- w - lr * grad f(m * w).
        for name, t in self.engine.tensors.items():
            if t.density < 1.0:
                dense = self.dense[name]
                if t.powerprop is not None and t.param.grad is not None:
                    grad_w = self.engine.weight_grad(name)
                    if grad_w is not None:  # pruned v: the chain rule at its dense value
                        feedback = self.engine.grad_from_weight_grad(name, dense, grad_w)
                        t.param.grad.copy_(torch.where(t.mask, t.param.grad, feedback))
                t.param.copy_(torch.where(t.mask, t.param, dense))
        self.engine.capture_weight_grads(False)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        if not self.feeds_back(ctx.step):
            return  # the dense copies of pruned weights are never read again
        for name, t in self.engine.tensors.items():
            self.dense[name].copy_(t.param)  # the engine re-zeroes masked entries right after

    def dense_weight_grad(self, step: int) -> bool:
        """Before `end` the gradient of every weight is used (2 f_S + f_D per example); from
        `end` on only the active ones (3 f_S): the mask is fixed and pruned weights are not fed back."""
        return self.feeds_back(step)

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"dense": {n: w.clone() for n, w in self.dense.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, w in state["dense"].items():
            self.dense[name].copy_(w)

    # ------------------------------------------------------------ the plan, for dry runs
    def mask_update_steps(self) -> list[int]:
        """Refresh steps that prune (at `begin` the sparsity is still 0: nothing changes)."""
        return [t for t in self.refresh_steps if self.sparsity_at(t) > 0]

    def schedule_value(self, step: int) -> tuple[str, float]:
        last = last_event(self.refresh_steps, step)
        return ("sparsity", 0.0 if last is None else self.sparsity_at(last))

    def densities_at(self, step: int) -> dict[str, float]:
        return self.scaled_densities(self.schedule_value(step)[1])  # global: estimated uniform
