"""A prune-at-init method as a sparsebench plug-in: SNIP (Lee et al., "SNIP: Single-shot Network
Pruning based on Connection Sensitivity", ICLR 2019).

Before the first step, score every weight by |w * dL/dw| on one training batch and keep, in each
prunable tensor, the entries with the largest scores at that tensor's target density; the mask
then stays fixed. Use it without touching sparsebench:

    sparsebench train plugins=[examples/snip_plugin.py] method=snip sparsity=0.9
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsebench.methods import METHODS, SparsityMethod, StepContext


@dataclass
class SNIPOptions:
    batches: int = 1  # training batches the scores are summed over (the paper uses one)


@METHODS.register("snip")
class SNIP(SparsityMethod):
    Options = SNIPOptions

    def start(self, ctx: StepContext) -> None:
        model, engine = self.engine.model, self.engine
        scores = {name: torch.zeros_like(t.param) for name, t in engine.tensors.items()}
        x, y = ctx.first_batch()  # the trainer's first batch: no training step happens before the prune
        for chunk_x, chunk_y in zip(x.chunk(self.options.batches), y.chunk(self.options.batches)):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(chunk_x), chunk_y).backward()
            for name, t in engine.tensors.items():
                scores[name] += (t.param.detach() * t.param.grad).abs()
        model.zero_grad(set_to_none=True)
        densities = engine.round_densities(self.target.densities)
        masks = {name: engine.structured_topk(scores[name], densities[name]) for name in engine.names}
        engine.set_masks(masks, densities, ctx.optimizer)
        ctx.log(f"snip: pruned at initialisation by |w * grad| on {len(y)} examples")
