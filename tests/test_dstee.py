"""`dstee`: both candidate bonus forms against hand-computed scores, the per-weight activity
count after update rounds, and the CLI."""
import math

import pytest
import torch
from torch import nn

from sparsebench.methods import METHODS, SparsityTarget
from sparsebench.methods.dstee import Bonus
from sparsebench.sparse.masked import MaskedModel
from cli_process import run_cli


def dstee(options):
    layer = nn.Linear(4, 2, bias=False)
    engine = MaskedModel(layer)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    engine.set_mask("weight", mask, 0.5)
    cls = METHODS.get("dstee")
    method = cls(cls.Options(**options), engine, SparsityTarget(0.5, "uniform", {"weight": 0.5}), 100, 10,
                 torch.Generator().manual_seed(0))
    return method, engine, mask


@pytest.mark.parametrize("bonus", ["log", "sqrt"])
def test_grow_score_adds_the_bonus_form_asked_for(bonus):
    method, engine, mask = dstee({"bonus": Bonus(bonus), "explore_c": 0.5, "explore_eps": 1.0, "delta_t": 10})
    method.before_update(10)  # one round ends: active connections counted once
    method.before_update(20)  # and twice
    counts = method.counter("weight")
    assert torch.equal(counts, mask.to(torch.int32) * 2)
    grads = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    method._dense_grads = {"weight": grads}
    step = 20
    scores = method.grow_scores("weight", engine.tensors["weight"], step)
    for (i, j), g in zip([(0, 0), (0, 1), (1, 3)], [0.1, 0.2, 0.8]):
        n = int(counts[i, j])
        ratio = math.log(step + 1) / (n + 1.0)
        expected = g + 0.5 * (ratio if bonus == "log" else math.sqrt(ratio))
        assert scores[i, j].item() == pytest.approx(expected, rel=1e-6)


def test_counts_follow_masks_that_change_between_rounds():
    method, engine, mask = dstee({})
    method.before_update(100)
    new = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    engine.set_mask("weight", new, 0.5)
    method.before_update(200)
    assert torch.equal(method.counter("weight"), mask.to(torch.int32) + new.to(torch.int32))


def test_dstee_runs_from_the_cli_and_refuses_an_unknown_bonus(tmp_path):
    proc = run_cli("train", "method=dstee", "method.bonus=sqrt", "method.delta_t=5", "epochs=1",
                   "dataset.num_samples=600", "progress=none", f"results_root={tmp_path / 'ok'}")
    assert proc.returncode == 0 and "done: test_acc" in proc.stdout, proc.stderr
    proc = run_cli("train", "method=dstee", "method.bonus=cube", f"results_root={tmp_path / 'bad'}")
    assert proc.returncode == 2 and "method.bonus='cube'" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "bad").exists()
