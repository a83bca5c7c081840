"""`cigl`: Calibrating the Rigged Lottery (Lei, Zhang, Xu, Mallick; ICLR 2023, arXiv 2302.09369;
docs/methods.md, CigL).

RigL's deterministic mask M (its loop, options and schedule unchanged: rigl.py) plus two things
that make the sparse network's confidence better calibrated:

1. A random mask Z drawn afresh at every step over the active weights: each kept with probability
   (p - 1)/p and the kept ones scaled by p/(p - 1) (p = `dpnum`: 100 for CIFAR-10 and 10 for
   CIFAR-100 in the authors' code), so the step is (the paper's Algorithm 1)

       W <- W - lr * Z * grad L(Z * W)

   In the trainer's order: `before_step` stores W and puts Z * W into the model, the forward and
   backward run on it, `after_backward` multiplies the gradient by Z (the chain rule through
   Z * W) and puts W back, and the optimizer steps W. RigL's grow score is the dense gradient of
   that same step, taken at Z * W, as in the authors' code.
2. Weight averaging over the end of training (SWA-style): from the end of epoch
   round(`swa_start` x epochs) on, the model's parameters at every epoch's end are folded into a
   running mean; after the last step the model takes the mean, each prunable tensor multiplied by
   its final mask M, and its BatchNorm statistics are recomputed over one pass of the training
   data (train mode, cumulative average). The averaged model is the run's model: the last epoch's
   metrics, final.json and model.pt are its. Masking the mean by the final M keeps the exact
   non-zero counts of M even if a mask changed while averaging (with the defaults it cannot: RigL's
   masks are fixed from T_end = 0.75 and averaging starts at 0.8).

Read from the authors' code (github StevenBoys/CigL, main.py and sparselearning/core.py) and
where we differ or could not verify:

* The code averages from epoch 200 of 250 (`begin_save`), snapshots at each epoch's end with
  weight 1/(n + 1), and recomputes BatchNorm statistics after each fold; we recompute once, at
  the end, which gives the same final model.
* The code defines an SWA learning-rate schedule (`get_lr`, swa_lr = 0.01) that its training loop
  does not call (it steps a StepLR). By default the run's own schedule goes on while averaging;
  `swa_lr` sets a constant rate from the first averaged epoch on.
* The code keeps its raw weights beside the model and moves values between them with factors
  (p - 1)/p and p/(p - 1) in several places; we implement the update rule above as the paper
  writes it.
* The code measures ECE with 10 bins, sparsebench with 15 by default: `ece_bins=10` for the
  code's (train.expected_calibration_error).
* Z covers every conv and linear weight, as the code's does (its masking covers every layer but
  biases and BatchNorm), including those sparsebench keeps dense (`dense_first`, `dense_last`);
  `random_mask_dense_layers=false` restricts it to the sparse tensors.
* BatchNorm statistics are recomputed on whole training batches on every rank (under DDP each
  rank repeats the same pass; it is not counted in train_flops, under 1 % of a run).

Not combined with Powerpropagation (Z would act on v, not on the weights) or `backend=sparse`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, StepContext
from sparsebench.methods.rigl import RigL, RigLOptions


@dataclass
class CigLOptions(RigLOptions):
    dpnum: int = 100  # p: each active weight is kept with probability (p - 1)/p every step
    random_mask_dense_layers: bool = True  # Z on the layers kept dense too (dense_first/last), as the code
    swa_start: float | None = 0.8  # fraction of the epochs after which averaging starts; null: no averaging
    swa_lr: float | None = None  # constant learning rate while averaging; null: the run's schedule


@METHODS.register("cigl")
class CigL(RigL):
    name = "cigl"
    Options = CigLOptions
    runs_on_sparse_backend = False
    random_forward = True
    powerprop_conflict = "CigL's random mask acts on the weights, which Powerpropagation re-parameterises"

    def validate(self) -> None:
        super().validate()
        o = self.options
        if o.dpnum < 2:
            raise UserError(f"method.dpnum={o.dpnum}: expected an integer >= 2 (weights are kept with "
                            "probability (dpnum - 1)/dpnum)")
        if o.swa_start is not None and not 0.0 < o.swa_start <= 1.0:
            raise UserError(f"method.swa_start={o.swa_start}: expected a fraction of the epochs in (0, 1], "
                            "or null for no weight averaging")
        if o.swa_lr is not None and o.swa_lr <= 0:
            raise UserError(f"method.swa_lr={o.swa_lr}: expected a positive learning rate, or null for the run's schedule")
        self.keep_scale = o.dpnum / (o.dpnum - 1)
        epochs = self.total_steps // self.steps_per_epoch
        # First epoch (1-based) whose end is averaged; None: no averaging.
        self.swa_first_epoch = None if o.swa_start is None else max(1, round(o.swa_start * epochs))
        self.swa_count = 0
        self.swa_mean: dict[str, torch.Tensor] = {}
        # The weights Z acts on: every sparse tensor, and the dense-kept layers' unless turned off.
        self.z_targets = {n: t.param for n, t in self.engine.tensors.items()}
        if o.random_mask_dense_layers:
            self.z_targets.update({n: self.engine.model.get_parameter(n) for n in self.engine.dense_names})
        self._raw: dict[str, torch.Tensor] = {}  # W, while the model holds Z * W
        self._z: dict[str, torch.Tensor] = {}  # Z: 0 or p/(p - 1)
        averaging = ("no weight averaging" if self.swa_first_epoch is None else
                     f"weights averaged from the end of epoch {self.swa_first_epoch} of {epochs}"
                     + (f" at constant lr {o.swa_lr:g}" if o.swa_lr is not None else ""))
        self.description += f"; random mask keeps {o.dpnum - 1}/{o.dpnum} of the active weights every step; {averaging}"

    # ------------------------------------------------------------ the random mask Z
    @torch.no_grad()
    def before_step(self, ctx: StepContext) -> None:
        super().before_step(ctx)
        p = self.options.dpnum
        # One seed a step from the method's generator (checkpointed), Z drawn where the weights
        # are: no host-side draw and copy of every entry each step on a GPU. Every entry is drawn,
        # masked ones too, so resumed and uninterrupted runs (and every DDP rank) draw the same Z.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        draws: dict[torch.device, torch.Generator] = {}
        for name, param in self.z_targets.items():
            device = param.device
            if device not in draws:
                draws[device] = torch.Generator(device=device).manual_seed(seed)
            keep = torch.randint(0, p, param.shape, generator=draws[device], device=device, dtype=torch.int32) < p - 1
            self._raw[name] = param.detach().clone()
            self._z[name] = keep.to(param.dtype) * self.keep_scale
            param.mul_(self._z[name])

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        super().after_backward(ctx)  # RigL's update steps read the gradient at Z * W here
        for name, param in self.z_targets.items():
            if param.grad is not None:
                param.grad.mul_(self._z[name])  # d/dW L(Z * W) = Z * grad L(Z * W)
            param.copy_(self._raw[name])
        self._raw, self._z = {}, {}

    def keep_rate(self) -> float:
        """Fraction of active weights the current step's Z keeps (between before_step and after_backward)."""
        kept = sum(int((self._z[n] > 0)[t.mask].sum()) for n, t in self.engine.tensors.items())
        return kept / sum(int(t.mask.sum()) for t in self.engine.tensors.values())

    # ------------------------------------------------------------ weight averaging
    def learning_rate(self, step: int, scheduled: float) -> float:
        if self.options.swa_lr is None or self.swa_first_epoch is None:
            return scheduled
        averaging = step >= (self.swa_first_epoch - 1) * self.steps_per_epoch
        return self.options.swa_lr if averaging else scheduled

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        super().after_step(ctx)  # RigL's mask update on its update steps
        if self.swa_first_epoch is None or (ctx.step + 1) % self.steps_per_epoch:
            return
        if (ctx.step + 1) // self.steps_per_epoch >= self.swa_first_epoch:
            self._fold_into_mean()
        if ctx.step + 1 == self.total_steps and self.swa_count:
            self._install_mean(ctx)

    def _current(self) -> dict[str, torch.Tensor]:
        """The model's parameters, prunable ones as M * W (the engine re-masks after this hook)."""
        masks = {t.param: t.mask for t in self.engine.tensors.values()}
        return {n: p.detach() * masks[p] if p in masks else p.detach() for n, p in self.engine.model.named_parameters()}

    def _fold_into_mean(self) -> None:
        self.swa_count += 1
        for name, value in self._current().items():
            if name not in self.swa_mean:
                self.swa_mean[name] = value.clone()
            else:  # running mean: mean + (x - mean)/n
                self.swa_mean[name].add_(value - self.swa_mean[name], alpha=1.0 / self.swa_count)

    def _install_mean(self, ctx: StepContext) -> None:
        masks = {t.param: t.mask for t in self.engine.tensors.values()}
        for name, param in self.engine.model.named_parameters():
            mean = self.swa_mean[name]
            param.copy_(mean * masks[param] if param in masks else mean)
        if ctx.train_batches is not None:
            recompute_batchnorm(self.engine.model, ctx.train_batches(ctx.step // self.steps_per_epoch))
        ctx.log(f"cigl: model replaced by the mean of {self.swa_count} epoch-end snapshots, masked by the final masks"
                + (", BatchNorm statistics recomputed" if ctx.train_batches is not None else ""))

    def summary(self) -> dict:
        return {"cigl": {"dpnum": self.options.dpnum, "averaged_snapshots": self.swa_count,
                         "first_averaged_epoch": self.swa_first_epoch}}

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(swa_count=self.swa_count, swa_mean={n: m.clone() for n, m in self.swa_mean.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.swa_count = state.get("swa_count", 0)
        self.swa_mean = {n: m.clone() for n, m in state.get("swa_mean", {}).items()}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches) -> None:
    """BatchNorm running statistics of `model` as the plain average over one pass of `batches`
    (SWA's bn_update): reset, momentum None (cumulative average), forward in train mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for x, _ in batches:
        model(x)
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
