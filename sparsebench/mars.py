"""MARS-AdamW (Yuan, Liu, Wu, Zhou, Gu 2024, "MARS: Unleashing the Power of Variance Reduction
for Training Large Models", arXiv 2411.10438; official code AGI-Arena/MARS), approximate variant.

For a matrix or kernel parameter, with gradient g_t and the previous step's gradient g_{t-1}
(MARS-approx; the exact variant re-evaluates the previous parameters on the current batch):

    c_t = g_t + gamma * beta1 / (1 - beta1) * (g_t - g_{t-1})     variance-reduced gradient
    c_t = c_t / ||c_t||_2   if ||c_t||_2 > 1                       clipped per tensor
    m_t = beta1 m_{t-1} + (1 - beta1) c_t
    v_t = beta2 v_{t-1} + (1 - beta2) c_t^2
    x_{t+1} = x_t - lr * (weight_decay * x_t + (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + eps))

as the official update function writes it (g_0 = 0, so the first step scales g_1 by
1 + gamma beta1/(1 - beta1)). Vectors (biases, norms) take plain AdamW with their own betas and
weight decay, as the official default `optimize_1d=False` does. One difference, stated in
docs/methods.md: the official code sends only 2-D tensors through MARS (conv kernels take the
AdamW path); here every tensor of two or more dimensions does, since a CNN's prunable weights
are kernels (`kernels=adamw` restores the official split).

Sparse training: g_{t-1} is optimizer state shaped like the parameter (`last_grad`), so the
engine's optimizer-state reset zeroes it at regrown entries like the moments, and masked
entries hold zero because their gradients are masked before every step.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class MarsAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma: float = 0.025,
                 betas_1d: tuple[float, float] = (0.9, 0.95), weight_decay_1d: float = 0.1, kernels: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, gamma=gamma,
                        betas_1d=tuple(betas_1d), weight_decay_1d=weight_decay_1d, kernels=kernels)
        super().__init__(params, defaults)

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
                self._update(p, p.grad, state, group)
        return loss

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
            state["last_grad"].copy_(grad)
        else:
            c = grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(c, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(c, c, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
        denom = (exp_avg_sq / bias2).sqrt_().add_(group["eps"])
        p.add_(p * decay + exp_avg / bias1 / denom, alpha=-group["lr"])

