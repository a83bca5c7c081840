"""MARS-AdamW (Yuan, Liu, Wu, Zhou, Gu 2024, "MARS: Unleashing the Power of Variance Reduction
for Training Large Models", arXiv 2411.10438; official code AGI-Arena/MARS), approximate and exact.

For a matrix or kernel parameter x with gradient g_t = grad f(x_t, xi_t) on this step's batch xi_t,
and g_prev = the previous step's gradient grad f(x_{t-1}, xi_{t-1}) (`variant=approx`, the
official default) or the previous weights' gradient on this step's batch grad f(x_{t-1}, xi_t)
(`variant=exact`, the paper's estimator):

    c_t = g_t + gamma * beta1 / (1 - beta1) * (g_t - g_prev)      variance-reduced gradient
    c_t = c_t / ||c_t||_2   if ||c_t||_2 > 1                       clipped per tensor
    m_t = beta1 m_{t-1} + (1 - beta1) c_t
    v_t = beta2 v_{t-1} + (1 - beta2) c_t^2
    x_{t+1} = x_t - lr * (weight_decay * x_t + (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + eps))

as the official update function writes it (g_prev = 0 at the first step, so it scales g_1 by
1 + gamma beta1/(1 - beta1)). Vectors (biases, norms) take plain AdamW with their own betas and
weight decay, as the official default `optimize_1d=False` does. One difference, stated in
docs/methods.md: the official code sends only 2-D tensors through MARS (conv kernels take the
AdamW path); here every tensor of two or more dimensions does, since a CNN's prunable weights
are kernels (`kernels=adamw` restores the official split).

Sparse training: g_prev is optimizer state shaped like the parameter (`last_grad`), so the
engine's optimizer-state reset zeroes it at regrown entries like the moments, and masked
entries hold zero because their gradients are masked before every step.

The exact variant costs a second forward and backward per step. The official scripts compute it
ahead: before stepping x_t they take x_t's gradient on the *next* batch. sparsebench computes the
same quantity one step later, which needs no look-ahead into the data loader: the optimizer
keeps x_{t-1} (`previous_param`, written just before each update), and at step t
`record_previous_gradients` puts x_{t-1} back into the model, runs the step's loss on the step's
batch, stores the gradient (masked like the step's own) as `last_grad`, and restores x_t and the
model's buffers (BatchNorm statistics are those of the step's own forward only). The first step
after the optimizer state is empty (the first of a run, GaP's restarts) has no x_{t-1}: g_prev = 0,
as in the approximate variant.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class MarsAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma: float = 0.025,
                 betas_1d: tuple[float, float] = (0.9, 0.95), weight_decay_1d: float = 0.1, kernels: bool = True,
                 exact: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, gamma=gamma,
                        betas_1d=tuple(betas_1d), weight_decay_1d=weight_decay_1d, kernels=kernels)
        super().__init__(params, defaults)
        self.exact = exact

    def uses_mars(self, param: torch.Tensor, group: dict) -> bool:
        return param.dim() == 2 or (group["kernels"] and param.dim() > 2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["last_grad"] = torch.zeros_like(p)
                state["step"] += 1
                if self.exact:  # x_{t-1} of the next step's exact pass
                    state.setdefault("previous_param", torch.zeros_like(p)).copy_(p)
                self._update(p, p.grad, state, group)
        return loss

    def record_previous_gradients(self, model: nn.Module, loss: Callable[[], torch.Tensor],
                                  mask_gradients: Callable[[], None]) -> bool:
        """Exact variant: grad f(x_{t-1}, xi_t) into `last_grad` of every parameter, where `loss()`
        computes this step's loss on this step's batch with the model as it stands and
        `mask_gradients()` masks the gradients as the step masks its own. Parameters, buffers and
        `.grad` are left as they were. False (nothing done) before the first update."""
        params = [p for group in self.param_groups for p in group["params"] if "previous_param" in self.state[p]]
        if not params:
            return False
        current = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in model.buffers()]
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        with torch.no_grad():
            for p in params:
                p.copy_(self.state[p]["previous_param"])
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss().backward()
        mask_gradients()
        with torch.no_grad():
            for p, value in zip(params, current):
                state = self.state[p]
                if p.grad is None:
                    state["last_grad"].zero_()
                else:
                    state["last_grad"].copy_(p.grad)
                p.copy_(value)
            for b, value in zip(model.buffers(), buffers):
                b.copy_(value)
        for p, grad in zip((p for group in self.param_groups for p in group["params"]), grads):
            p.grad = grad
        return True

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        step = float(state["step"])
        mars = self.uses_mars(p, group)
        beta1, beta2 = group["betas"] if mars else group["betas_1d"]
        decay = group["weight_decay"] if mars else group["weight_decay_1d"]
        if mars:
            c = grad + (grad - state["last_grad"]) * (group["gamma"] * beta1 / (1.0 - beta1))
            norm = torch.linalg.vector_norm(c)
            if norm > 1.0:
                c = c / norm
            if not self.exact:  # the exact variant's comes from record_previous_gradients
                state["last_grad"].copy_(grad)
        else:
            c = grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(c, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(c, c, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
        denom = (exp_avg_sq / bias2).sqrt_().add_(group["eps"])
        p.add_(p * decay + exp_avg / bias1 / denom, alpha=-group["lr"])

