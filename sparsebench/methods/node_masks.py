"""`random_search` and `random_nodes`: sub-networks of hidden units, kept with their initial weights.

Random Search as a baseline for sparse architecture search (Farahani 2024, arXiv 2403.08265;
docs/search.md): a candidate is a node mask of the parent network, which keeps
ceil((1 - s) * units) uniformly chosen hidden units of every hidden layer (s = `sparsity`, a
fraction of *units*; the weight sparsity that follows is higher, since a weight survives only
if both of its units do, and final.json's `actual_sparsity` states it). A removed unit's
outgoing weights (the next layer's columns, a channel's block of columns after a flatten) and
its incoming weights (its row) are masked, so the sub-network computes exactly as a narrower
network would. Inputs and classes are never removed.

* `random_search` draws `candidates` node masks, scores each by a short proxy and trains the
  best: `proxy=train` trains a copy of the masked network for `proxy_epochs` epochs (the run's
  optimizer at its base learning rate, the run's batches) and scores its loss on
  `proxy_examples` training examples; `proxy=init` scores the loss of the untrained masked
  network. The paper's search budget and proxy are not stated in what we could read:
  both are options here.
* `random_nodes` is the matched control: one random node mask (candidate 0 of the same draw),
  no selection, trained identically.

The masks never change after the start (a static sub-network). Both methods need every
conv/linear layer in the engine (`distribution.dense_first=false dense_last=false`, which
`sparsebench search method=random_search` sets) and a plain chain of layers (no residual
connections, no grouped convolutions).
"""
from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.errors import UserError
from sparsebench.methods.base import METHODS, SparsityMethod, StepContext
from sparsebench.sparse.flops import FlopCounter, layer_forward_flops
from sparsebench.sparse.masked import masked_training_step


class Proxy(enum.Enum):
    train = "train"  # loss after proxy_epochs of training a copy
    init = "init"  # loss of the untrained sub-network


@dataclass
class RandomSearchOptions:
    candidates: int = 8  # K node masks sampled; the best by the proxy is trained
    proxy: Proxy = Proxy.train
    proxy_epochs: int = 1  # proxy=train: epochs of training per candidate
    proxy_examples: int = 1000  # training examples the proxy loss is measured on


class NodeMaskMethod(SparsityMethod):
    """Hidden-unit masks: drawing them, turning them into weight masks, their densities."""

    removes_units = True

    def validate(self) -> None:
        name = self.registered_name()
        if self.engine.dense_names:
            raise UserError(
                f"method {name} removes hidden units, so every conv/linear layer must be sparsifiable; "
                f"{', '.join(self.engine.dense_names)} kept dense: add distribution.dense_first=false "
                "distribution.dense_last=false (sparsebench search method=random_search sets them)"
            )
        if self.target.allocation != "uniform":
            raise UserError(f"method {name} sets layer densities from kept units; use distribution=uniform")
        if getattr(self.engine.model, "stage_names", None):
            raise UserError(f"method {name} needs a plain chain of layers; model has residual stages")
        tensors = list(self.engine.tensors.values())
        for t in tensors:
            if getattr(t.module, "groups", 1) != 1:
                raise UserError(f"method {name}: {t.name} is a grouped convolution; node masks need groups=1")
        for before, after in zip(tensors, tensors[1:]):
            units, inputs = before.param.shape[0], after.param.shape[1]
            if inputs % units:
                raise UserError(
                    f"method {name}: {after.name} takes {inputs} inputs from {before.name}'s {units} units; "
                    "node masks need a plain chain of layers"
                )

    # ---------------------------------------------------------------- node masks
    def kept_units(self) -> list[int]:
        """Units kept per hidden layer: ceil((1 - s) * units), at least one."""
        s = self.target.sparsity
        hidden = list(self.engine.tensors.values())[:-1]
        return [max(1, math.ceil((1.0 - s) * t.param.shape[0] - 1e-9)) for t in hidden]

    def draw(self) -> list[torch.Tensor]:
        """One node mask: per hidden layer, the indices of its kept units (sorted)."""
        hidden = list(self.engine.tensors.values())[:-1]
        return [
            torch.randperm(t.param.shape[0], generator=self.generator)[:keep].sort().values
            for t, keep in zip(hidden, self.kept_units())
        ]

    def weight_masks(self, units: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Row mask from a layer's own kept units, column mask from the previous layer's (a
        unit feeding a flatten owns a block of consecutive columns: channel-major order)."""
        tensors = list(self.engine.tensors.values())
        masks = {}
        for i, t in enumerate(tensors):
            out_dim, in_dim = t.param.shape[0], t.param.shape[1]
            rows = torch.ones(out_dim, dtype=torch.bool)
            if i < len(tensors) - 1:
                rows = torch.zeros(out_dim, dtype=torch.bool)
                rows[units[i]] = True
            cols = torch.ones(in_dim, dtype=torch.bool)
            if i > 0:
                previous = torch.zeros(tensors[i - 1].param.shape[0], dtype=torch.bool)
                previous[units[i - 1]] = True
                cols = previous.repeat_interleave(in_dim // previous.numel())
            mask = rows[:, None] & cols[None, :]
            mask = mask.reshape(out_dim, in_dim, *([1] * (t.param.dim() - 2))).expand_as(t.param)
            masks[t.name] = mask.to(t.param.device).contiguous()
        return masks

    def densities_of(self, masks: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: int(mask.sum()) / mask.numel() for name, mask in masks.items()}

    def planned_densities(self) -> dict[str, float]:
        """Exact densities from the unit counts alone (no draw): for dry runs and FLOPs."""
        counts = self.kept_units()
        tensors = list(self.engine.tensors.values())
        densities = {}
        for i, t in enumerate(tensors):
            rows = counts[i] / t.param.shape[0] if i < len(tensors) - 1 else 1.0
            cols = counts[i - 1] / tensors[i - 1].param.shape[0] if i > 0 else 1.0
            densities[t.name] = rows * cols
        return densities

    def densities_at(self, step: int) -> dict[str, float]:
        return self.planned_densities()

    def install(self, units: list[torch.Tensor], ctx: StepContext) -> None:
        masks = self.weight_masks(units)
        self.engine.set_masks(masks, self.densities_of(masks), ctx.optimizer)
        self.units = [u.tolist() for u in units]

    def start(self, ctx: StepContext) -> None:
        self.install(self.draw(), ctx)

    def state_dict(self) -> dict:
        return {"units": getattr(self, "units", None)}

    def load_state_dict(self, state: dict) -> None:
        self.units = state.get("units")

    def summary(self) -> dict:
        return {"node_search": {"kept_units": self.kept_units(), "units": getattr(self, "units", None)}}


@METHODS.register("random_nodes")
class RandomNodes(NodeMaskMethod):
    """The control arm: one uniformly random node mask, trained as is."""


@METHODS.register("random_search")
class RandomSearch(NodeMaskMethod):
    """The best of `candidates` random node masks by a short proxy, then trained as is."""

    Options = RandomSearchOptions

    def validate(self) -> None:
        o = self.options
        if o.candidates < 1:
            raise UserError(f"method.candidates={o.candidates}: expected at least one node mask to sample")
        if o.proxy_epochs < 1:
            raise UserError(f"method.proxy_epochs={o.proxy_epochs}: expected a positive number of epochs")
        if o.proxy_examples < 1:
            raise UserError(f"method.proxy_examples={o.proxy_examples}: expected a positive number of examples")
        super().validate()

    def start(self, ctx: StepContext) -> None:
        if ctx.train_batches is None:
            raise UserError("method random_search scores candidates on training data; this harness has none")
        draws = [self.draw() for _ in range(self.options.candidates)]  # candidate 0 is random_nodes' draw
        rng = torch.get_rng_state()  # the proxy must not move the run's own random stream
        self.proxy_examples_seen = [0, 0]  # (examples trained on, examples scored): the search's cost
        scores = [self.proxy_loss(units, ctx) for units in draws]
        torch.set_rng_state(rng)
        best = min(range(len(scores)), key=lambda i: (scores[i], i))
        self.scores, self.chosen = scores, best
        # Search cost in FLOPs, counted as the run's own (sparse/flops.py): every candidate has the
        # same unit counts, hence the same per-example cost.
        x, _ = ctx.first_batch()
        counter = FlopCounter(layer_forward_flops(self.engine.model, tuple(x.shape[1:])))
        densities = self.planned_densities()
        trained, scored = self.proxy_examples_seen
        self.search_flops = trained * counter.train_step(densities) + scored * counter.forward(densities)
        self.install(draws[best], ctx)
        ctx.log(f"random search: {len(scores)} candidates scored by proxy={self.options.proxy.value}, "
                f"chose candidate {best} (loss {scores[best]:.4f}; best-to-worst "
                f"{min(scores):.4f}..{max(scores):.4f})")

    def proxy_loss(self, units: list[torch.Tensor], ctx: StepContext) -> float:
        """Training-split loss of the candidate, untrained or after `proxy_epochs` (on a copy)."""
        model = copy.deepcopy(self.engine.model)
        masks = self.weight_masks(units)
        params = dict(model.named_parameters())
        keep = {name: masks[name].to(params[name].dtype) for name in masks}
        with torch.no_grad():
            for name, k in keep.items():
                params[name].mul_(k)
        if self.options.proxy is Proxy.train:
            defaults = dict(ctx.optimizer.defaults)
            optimizer = type(ctx.optimizer)(model.parameters(), **defaults)
            model.train()
            for epoch in range(self.options.proxy_epochs):
                for x, y in ctx.train_batches(epoch):
                    self.proxy_examples_seen[0] += len(y)
                    masked_training_step(model, optimizer, keep, x, y)
        return self._loss_on_examples(model, ctx)

    @torch.no_grad()
    def _loss_on_examples(self, model: nn.Module, ctx: StepContext) -> float:
        """Mean loss over the first `proxy_examples` examples of epoch 0's batches (training split)."""
        model.eval()
        total, seen = 0.0, 0
        for x, y in ctx.train_batches(0):
            take = min(len(y), self.options.proxy_examples - seen)
            total += F.cross_entropy(model(x[:take]), y[:take], reduction="sum").item()
            seen += take
            self.proxy_examples_seen[1] += take
            if seen >= self.options.proxy_examples:
                break
        return total / max(seen, 1)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scores": getattr(self, "scores", None), "chosen": getattr(self, "chosen", None),
                "search_flops": getattr(self, "search_flops", None)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scores, self.chosen, self.search_flops = state.get("scores"), state.get("chosen"), state.get("search_flops")

    def summary(self) -> dict:
        info = super().summary()
        o = self.options
        info["node_search"].update(candidates=o.candidates, proxy=o.proxy.value, proxy_epochs=o.proxy_epochs,
                                   proxy_examples=o.proxy_examples, scores=getattr(self, "scores", None),
                                   chosen=getattr(self, "chosen", None), search_flops=getattr(self, "search_flops", None),
                                   proxy_epochs_total=o.candidates * o.proxy_epochs if o.proxy is Proxy.train else 0)
        return info
