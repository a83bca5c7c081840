"""`sparsebench search method=random_search`: Random Search against its controls (Farahani 2024).

The comparison the paper makes, as three ordinary training runs with the same training keys,
seed and budget (docs/search.md):

    random_search   the best of K random node masks by a short proxy (methods/node_masks.py)
    random_nodes    one random node mask of the same sparsity, no selection (the control)
    dense           the parent network

Every conv/linear layer joins the engine (dense_first/dense_last false) so that every hidden
unit can be removed; the dense parent is unaffected by that. The search cost (candidates,
proxy epochs, FLOPs) is in the random_search run's final.json under `node_search`.
"""
from __future__ import annotations

from sparsebench.methods.node_masks import RandomSearchOptions
from sparsebench.search.base import SEARCHES, Search, arm_config

ALL_LAYERS = {"distribution.dense_first": False, "distribution.dense_last": False}


@SEARCHES.register("random_search")
class RandomSearchArms(Search):
    name = "random_search"
    Options = RandomSearchOptions
    has_directory = False

    def arms_after(self) -> list[dict]:
        rerun = {"rerun": bool(self.resolved.get("rerun"))}  # this search's own work is these two runs
        searched = arm_config(self.resolved, "random_search", **ALL_LAYERS, **rerun)
        searched["method"] = dict(self.resolved["method"])  # the search's own options
        control = arm_config(self.resolved, "random_nodes", **ALL_LAYERS, **rerun)
        return [searched, control, arm_config(self.resolved, "dense")]
