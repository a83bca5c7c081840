"""Metrics every method gets: ECE, ITOP rate, the mask-update log, and the dry-run plan."""
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sparsebench import cli, results
from sparsebench.sparse.masked import MaskedModel
from sparsebench.train import evaluate, expected_calibration_error


def test_ece_matches_hand_computation():
    # Two bins used: confidence 0.9 (accuracy 1/2) and 0.6 (accuracy 1): |0.5-0.9|/2 + |1-0.6|/2 = 0.4
    confidence = torch.tensor([0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.4)
    assert expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([True, True])) == pytest.approx(0.0)


def test_ece_bins_split_what_fewer_bins_pool():
    # 15 bins: 0.62 and 0.68 fall in (0.600, 0.667] and (0.667, 0.733]: 0.38/2 + 0.68/2 = 0.53;
    # 10 bins: both in (0.6, 0.7], accuracy 1/2 against confidence 0.65: 0.15
    confidence, correct = torch.tensor([0.62, 0.68]), torch.tensor([True, False])
    assert expected_calibration_error(confidence, correct, 15) == pytest.approx(0.53)
    assert expected_calibration_error(confidence, correct, 10) == pytest.approx(0.15)


def test_ece_bins_reach_the_evaluation_and_the_default_keeps_old_directories():
    base = {"method": "gmp", "seed": 0, "sparsity": 0.9}
    assert results.config_hash({**base, "ece_bins": 15}) == results.config_hash(base)  # runs from before the key
    assert results.config_hash({**base, "ece_bins": 10}) != results.config_hash(base)
    # the trainer's evaluation on fixed logits: softmax confidences 0.62 and 0.68, as above
    logits = torch.tensor([[math.log(0.62), math.log(0.38)], [math.log(0.32), math.log(0.68)]])
    data = SimpleNamespace(test=TensorDataset(logits, torch.tensor([0, 0])))
    for bins, expected in ((15, 0.53), (10, 0.15)):
        options = SimpleNamespace(eval_batch_size=1000, num_workers=0, ece_bins=bins)
        run = SimpleNamespace(model=nn.Identity(), data=data, cfg=SimpleNamespace(run=options), device="cpu")
        _, accuracy, ece = evaluate(run)
        assert accuracy == 50.0 and ece == pytest.approx(100 * expected)


@pytest.mark.parametrize("bins, message", [("0", "ece_bins=0: expected a positive integer"),
                                           ("5000", "ece_bins=5000: expected at most 1000 bins")])
def test_bad_ece_bins_are_one_line_and_write_nothing(tmp_path, capsys, bins, message):
    assert cli.main(["train", f"ece_bins={bins}", f"results_root={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().endswith(message) and not any(tmp_path.iterdir())


def test_itop_rate_counts_every_entry_ever_active():
    engine = MaskedModel(nn.Sequential(nn.Linear(4, 4, bias=False)))
    first = torch.zeros(4, 4, dtype=torch.bool)
    first[0] = True
    engine.set_mask("0.weight", first, 0.25)
    engine.start_exploration_count()
    assert engine.itop_rate() == pytest.approx(0.25)
    second = torch.zeros(4, 4, dtype=torch.bool)
    second[1] = True
    engine.set_mask("0.weight", second, 0.25)
    assert engine.itop_rate() == pytest.approx(0.5)
    assert engine.pop_mask_events() == [("0.weight", 12, 0), ("0.weight", 4, 4)]  # from all-ones, then a swap


@pytest.mark.slow
def test_dry_run_plans_what_the_run_does(tmp_path, capsys):
    args = ["train", "method=gmp", "method.frequency=10", "epochs=4", "dataset.num_samples=600", "progress=none",
            f"results_root={tmp_path}"]
    assert cli.main([*args, "dry_run=true"]) == 0
    plan = capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    planned = float(re.search(r"training FLOPs: ([0-9.]+) x dense", plan).group(1))
    steps = [int(s) for s in re.search(r"updates at steps ([0-9, ]+)", plan).group(1).split(", ")]
    assert "T_end (last mask change): step 12 = 0.75 of training" in plan
    assert cli.main(args) == 0
    (run,) = [p.parent for p in tmp_path.rglob("final.json")]
    final = json.loads((run / "final.json").read_text())
    assert final["train_flops_ratio"] == pytest.approx(planned, abs=0.01)
    logged = [r["step"] for r in results.read_jsonl(run / "mask_updates.jsonl")]
    assert logged == steps
    assert 0 <= final["ece"] <= 100 and final["itop_rate"] == 1.0  # GMP starts dense: all explored


@pytest.mark.slow
def test_tensorboard_logs_the_metrics_live(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "method=gmp", "epochs=2", "dataset.num_samples=600", "progress=none", "tensorboard=true",
            f"results_root={tmp_path}"]
    assert cli.main(args) == 0
    (run,) = [p.parent for p in tmp_path.rglob("final.json")]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("test_acc")]
    assert logged == pytest.approx([r["test_acc"] for r in results.read_jsonl(run / "metrics.jsonl")])
    assert any(tag.startswith("density/") for tag in events.Tags()["scalars"])
