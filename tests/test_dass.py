"""DASS (`sparsebench search method=dass`) and the model that rebuilds what it finds (`model=dass`):
the search end to end, its discretisation rule, its sparse operations, its data split, resume
after SIGKILL, and the genotype file's errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from sparsebench import cli, results, sweep_status
from sparsebench.data import load_dataset as real_load_dataset
from sparsebench.errors import UserError
from sparsebench.models import create_model
from sparsebench.models import dass_net
from sparsebench.models.dass_net import GENOTYPE_FORMAT, GENOTYPE_VERSION, read_genotype
from sparsebench.search import dass
from sparsebench.search.base import STATE_FILE, SearchJob, plan_search
from sparsebench.sparse.masked import target_nnz
from cli_process import run_cli

# A supernet of a few hundred weights and five candidates per edge (a dense conv and both kinds of
# sparse operation among them) on 160 MNIST-1D training signals: seconds per search.
TINY = ["method=dass", "dataset.num_samples=200", "batch_size=32", "method.channels=2", "method.nodes=2",
        "method.operations=[none,skip_connect,max_pool_3,conv_3,sparse_conv_3,sparse_linear]",
        "method.search_epochs=2", "progress=none"]


def resolved_config(overrides: list[str]) -> dict:
    return cli.resolve(cli.compose_config(overrides))


def genotype_file(tmp_path: Path, normal=None, reduce=None, **changes) -> Path:
    """A hand-written genotype: two nodes per cell."""
    normal = normal if normal is not None else [[{"op": "sparse_conv_3", "input": 1}, {"op": "skip_connect", "input": 0}],
                        [{"op": "conv_5", "input": 2}, {"op": "sparse_linear", "input": 1}]]
    reduce = reduce if reduce is not None else [[{"op": "max_pool_3", "input": 0}, {"op": "sparse_conv_5", "input": 1}],
                        [{"op": "avg_pool_3", "input": 2}, {"op": "skip_connect", "input": 0}]]
    data = {"format": GENOTYPE_FORMAT, "version": GENOTYPE_VERSION, "normal": normal, "normal_concat": [2, 3],
            "reduce": reduce, "reduce_concat": [2, 3], **changes}
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------ the search end to end
@pytest.mark.slow
def test_search_through_the_cli_is_deterministic_and_retrains_what_it_found(tmp_path):
    overrides = [*TINY, "method.retrain=[gmp]", "epochs=1", f"results_root={tmp_path / 'a'}"]
    (own, later) = sweep_status.planned_runs(overrides, search=True)  # `status search`: before the search
    assert later == sweep_status.AfterSearch(own, ("gmp",)) and sweep_status.run_state(own)[0] == "missing"
    first = run_cli("search", *overrides)
    assert first.returncode == 0, first.stderr
    second = run_cli("search", *TINY, f"results_root={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr

    def search_dir(root: Path) -> Path:
        (final,) = [p for p in root.rglob(results.FINAL_FILE) if p.parts[-4] == "dass"]  # method dass
        return final.parent

    a, b = search_dir(tmp_path / "a"), search_dir(tmp_path / "b")
    final = json.loads((a / results.FINAL_FILE).read_text())
    assert final["status"] == "completed" and final["kind"] == "search" and final["method"] == "dass"
    summary = final["search"]
    assert summary["weight_examples"] + summary["arch_examples"] == 160
    assert summary["search_epochs"] == 2 and summary["weight_steps"] == 2 * 3  # 80 examples, batches of 32
    assert not (a / STATE_FILE).exists()
    genotype = json.loads((a / dass.GENOTYPE_FILE).read_text())
    assert genotype["format"] == GENOTYPE_FORMAT and genotype["supernet"]["nodes"] == 2
    assert genotype == json.loads((b / dass.GENOTYPE_FILE).read_text())  # same seed, same genotype
    assert summary["alphas"] == json.loads((b / results.FINAL_FILE).read_text())["search"]["alphas"]
    assert len((a / results.METRICS_FILE).read_text().splitlines()) == 2
    # method.retrain=[gmp]: the derived network was trained as an ordinary run of model=dass.
    (arm,) = [p.parent for p in (tmp_path / "a").rglob(results.FINAL_FILE) if "/gmp/" in str(p)]
    trained = json.loads((arm / results.FINAL_FILE).read_text())
    assert trained["status"] == "completed" and arm.parts[-4] == "dass"
    assert 0.85 < trained["actual_sparsity"] <= 0.9  # 2-channel layers: each keeps N - floor(0.9 N) weights
    assert sweep_status.planned_runs(overrides, search=True) == [own, arm] and own == a  # once searched: all known
    # The retrain names the genotype's content, so a changed file is refused rather than reused.
    retrain_model = yaml.safe_load((arm / results.CONFIG_FILE).read_text())["model"]
    assert retrain_model["genotype_sha256"] == dass_net.genotype_digest(str(a / dass.GENOTYPE_FILE))
    changed = tmp_path / "changed.json"
    changed.write_text((a / dass.GENOTYPE_FILE).read_text() + "\n")
    with pytest.raises(UserError, match="the file changed since this run was configured"):
        dass_net.dass((1, 40), 10, genotype=str(changed), genotype_sha256=retrain_model["genotype_sha256"])


# ------------------------------------------------------------------------------ discretisation
def test_discretisation_keeps_the_two_strongest_edges_and_their_strongest_real_operation():
    operations = ["none", "skip_connect", "conv_3", "sparse_conv_3"]
    weights = torch.tensor([
        # node 0: inputs 0 and 1 (both kept: a node has exactly two candidates)
        [0.70, 0.10, 0.15, 0.05],  # `none` is strongest but never chosen: conv_3 at 0.15
        [0.10, 0.20, 0.30, 0.40],  # sparse_conv_3 at 0.40
        # node 1: inputs 0, 1 and 2
        [0.90, 0.05, 0.03, 0.02],  # a large `none` does not make an edge strong: dropped (0.05)
        [0.25, 0.25, 0.25, 0.25],  # a tie between operations goes to the earlier one: skip_connect
        [0.10, 0.10, 0.50, 0.30],  # conv_3 at 0.50, the strongest edge
    ])
    assert dass.discretise(weights, operations, nodes=2) == [
        [("sparse_conv_3", 1), ("conv_3", 0)],
        [("conv_3", 2), ("skip_connect", 1)],
    ]
    # A tie between edges goes to the lower input index.
    even = torch.full((5, 4), 0.25)
    assert dass.discretise(even, operations, nodes=2) == [
        [("skip_connect", 0), ("skip_connect", 1)], [("skip_connect", 0), ("skip_connect", 1)]]


def test_derived_genotype_round_trips_through_the_model(tmp_path):
    torch.manual_seed(0)
    architecture = dass.Architecture(nodes=3, operations=len(dass.OPERATIONS))
    genotype = dass.derive_genotype(architecture, list(dass.OPERATIONS), nodes=3)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(genotype.to_json()))
    assert read_genotype(str(path)) == genotype
    assert all(len(node) == 2 and all(op != "none" for op, _ in node) for node in genotype.normal + genotype.reduce)


# ------------------------------------------------------------------------------ sparse operations
def test_sparse_operations_hold_exactly_the_target_count_after_each_weight_step(tmp_path):
    """A real search epoch (three weight steps) at sparsity 0.7; the checkpoint it leaves after
    the epoch (which ends with a weight step) holds the masks and weights."""
    overrides = [*TINY, "sparsity=0.7", "method.search_epochs=1", f"results_root={tmp_path}"]
    search = plan_search(resolved_config(overrides)).search
    search.search(SearchJob(tmp_path, lambda message: None))
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)["supernet"]
    masks = {k[: -len(".mask")]: v for k, v in state.items() if k.endswith(".mask")}
    assert masks, "the supernet has sparse operations"
    for name, mask in masks.items():
        weight = state[f"{name}.weight"]
        nnz = target_nnz(weight.numel(), 0.3)
        assert int(mask.sum()) == nnz, name
        assert int(torch.count_nonzero(weight)) == nnz, name  # pruned_weights=zero: pruned entries are 0
        kept = weight[mask].abs()
        assert kept.min() >= weight[~mask].abs().max()  # the kept entries are the top |W|


def test_sparse_conv_passes_the_gradient_to_pruned_entries():
    """The forward uses W * M; the gradient reaches all of W, so pruned weights can grow back."""
    torch.manual_seed(0)
    layers = dass.dass_net.layers_for("dass", (1, 8))
    conv = dass.sparse_conv_factory(0.25, dass.PrunedWeights.keep)(layers, 2, 2, 3, 1, 1, True)
    assert int(conv.mask.sum()) == target_nnz(conv.weight.numel(), 0.25)
    x = torch.randn(4, 2, 8)
    out = conv(x)
    expected = nn.functional.conv1d(x, conv.weight.detach() * conv.mask, padding=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    assert bool((conv.weight.grad[~conv.mask] != 0).any())


# ------------------------------------------------------------------------------ the data split
def test_split_is_a_seeded_partition_of_the_training_split():
    weights, arch = dass.split_training(4000, 0.5, seed=3)
    assert len(weights) == len(arch) == 2000
    assert not set(weights) & set(arch)
    assert sorted(weights + arch) == list(range(4000))
    assert dass.split_training(4000, 0.5, seed=3) == (weights, arch)
    assert dass.split_training(4000, 0.5, seed=4) != (weights, arch)
    with pytest.raises(UserError, match="val_fraction"):
        dass.split_training(3, 0.1, seed=0)


class Forbidden(Dataset):
    def __len__(self):
        raise AssertionError("the search read the test split")

    def __getitem__(self, index):
        raise AssertionError("the search read the test split")


class Recorded(Dataset):
    def __init__(self, inner: Dataset):
        self.inner, self.seen = inner, set()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.seen.add(int(index))
        return self.inner[index]


def test_search_reads_both_parts_of_the_training_split_and_never_the_test_split(tmp_path, monkeypatch):
    bundles = []

    def load_without_test(name, **options):
        bundle = real_load_dataset(name, **options)
        bundle.train, bundle.test = Recorded(bundle.train), Forbidden()
        bundles.append(bundle)
        return bundle

    monkeypatch.setattr(dass, "load_dataset", load_without_test)
    overrides = [*TINY, "method.search_epochs=1", "method.val_fraction=0.25", f"results_root={tmp_path}"]
    search = plan_search(resolved_config(overrides)).search
    summary = search.search(SearchJob(tmp_path, lambda message: None))
    (bundle,) = bundles
    weight_idx, arch_idx = dass.split_training(160, 0.25, seed=0)
    assert (summary["weight_examples"], summary["arch_examples"]) == (len(weight_idx), len(arch_idx)) == (120, 40)
    assert bundle.train.seen == set(range(160))  # every training example, in one of the two parts


# ------------------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_a_search_killed_by_sigkill_resumes_to_the_same_genotype_and_metrics(tmp_path):
    overrides = [*TINY, "dataset.num_samples=400", "method.search_epochs=4"]
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    path = results.run_dir(resolved_config([*overrides, f"results_root={killed_root}"]))
    command = [sys.executable, "-m", "sparsebench", "search", *overrides, f"results_root={killed_root}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = path / results.METRICS_FILE
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, "the search ended before its first epoch line"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (path / results.FINAL_FILE).exists(), "killed too late: the search had finished"

    resumed = run_cli("search", *overrides, f"results_root={killed_root}")
    assert resumed.returncode == 0, resumed.stderr
    clean = run_cli("search", *overrides, f"results_root={clean_root}")
    assert clean.returncode == 0, clean.stderr
    clean_path = results.run_dir(resolved_config([*overrides, f"results_root={clean_root}"]))

    def lines(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in results.read_jsonl(run / results.METRICS_FILE)]

    assert len(lines(path)) == 4
    assert lines(path) == lines(clean_path)
    assert (path / dass.GENOTYPE_FILE).read_text() == (clean_path / dass.GENOTYPE_FILE).read_text()


# ------------------------------------------------------------------------------ model=dass
def test_a_bad_genotype_is_one_line_exit_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    root = tmp_path / "results"
    outcome = run_cli("train", "model=dass", f"model.genotype={bad}", f"results_root={root}", "epochs=1")
    assert outcome.returncode == 2
    assert len(outcome.stderr.strip().splitlines()) == 1
    assert str(bad) in outcome.stderr and "not valid JSON" in outcome.stderr
    assert not root.exists()


@pytest.mark.parametrize("changes, message", [
    ({"format": "something-else"}, "not a DASS genotype"),
    ({"version": 99}, "version 99"),
    ({"normal": [[{"op": "sep_conv_3", "input": 0}]]}, "unknown operation 'sep_conv_3'"),
    ({"normal": [[{"op": "none", "input": 0}]]}, "unknown operation 'none'"),
    ({"reduce": [[{"op": "conv_3", "input": 2}]]}, "input 2"),
    ({"reduce": [[{"op": "conv_3", "input": True}]]}, "input True"),
    ({"normal_concat": [2, 9]}, "normal_concat"),
    ({"normal": []}, "non-empty list of nodes"),
])
def test_genotype_errors_name_the_file_in_one_line(tmp_path, changes, message):
    path = genotype_file(tmp_path, **changes)
    with pytest.raises(UserError, match=message) as error:
        create_model("dass", (1, 40), 10, genotype=str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_genotype_option_or_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model.genotype=PATH"):
        create_model("dass", (1, 40), 10)
    with pytest.raises(UserError, match="no such file"):
        create_model("dass", (1, 40), 10, genotype=str(tmp_path / "absent.json"))
    with pytest.raises(UserError, match="expects inputs shaped"):
        create_model("dass", (40,), 10, genotype=str(genotype_file(tmp_path)))


@pytest.mark.parametrize("shape", [(1, 40), (3, 16, 16)])
def test_derived_network_runs_forward_in_module_order_on_signals_and_images(tmp_path, shape):
    torch.manual_seed(0)
    model = create_model("dass", shape, 7, genotype=str(genotype_file(tmp_path)), channels=4, cells=4)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    assert all(type(m) in (nn.Conv1d, nn.Conv2d, nn.Linear) for m in layers)  # plain layers: the engine prunes them
    called = []
    hooks = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in layers]
    out = model(torch.randn(2, *shape))
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 7) and called == layers
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.device("meta"):  # `train` dry-builds every model on the meta device
        create_model("dass", shape, 7, genotype=str(genotype_file(tmp_path)))


def test_supernet_handles_images(tmp_path):
    torch.manual_seed(0)
    options = dass.DassOptions(channels=2, nodes=2)
    supernet = dass.Supernet((3, 8, 8), 10, options, density=0.2)
    architecture = dass.Architecture(2, len(options.operations))
    assert supernet(torch.randn(2, 3, 8, 8), architecture).shape == (2, 10)
    assert 0 < dass.DensityCost(supernet, options.operations, 2)(architecture).item() < 1


@pytest.mark.slow
def test_the_derived_network_trains_under_gmp(tmp_path):
    root = tmp_path / "results"
    outcome = run_cli("train", "model=dass", f"model.genotype={genotype_file(tmp_path)}", "method=gmp", "epochs=1",
                      "dataset.num_samples=200", "batch_size=32", "progress=none", f"results_root={root}")
    assert outcome.returncode == 0, outcome.stderr
    (final,) = root.rglob(results.FINAL_FILE)
    record = json.loads(final.read_text())
    assert record["status"] == "completed" and record["steps"] == 5
    assert abs(record["actual_sparsity"] - 0.9) < 0.01


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("override, message", [
    ("method.nodes=0", "method.nodes=0: expected a positive integer"),
    ("method.val_fraction=1.0", "method.val_fraction=1.0: expected a fraction in (0, 1)"),
    ("method.operations=[none]", "needs at least one operation besides 'none'"),
    ("method.operations=[conv_3,conv_7]", "unknown operation 'conv_7'"),
    ("method.cost_weight=-1", "method.cost_weight=-1.0: expected a value >= 0"),
    ("method.mask_refresh=batch", "method.mask_refresh='batch': expected one of step, epoch"),
    ("method.retrain=[gmpp]", "unknown method 'gmpp'"),
])
def test_bad_options_are_one_line_user_errors(override, message):
    with pytest.raises(UserError) as error:
        plan_search(resolved_config(["method=dass", override]))
    assert message in str(error.value) and "\n" not in str(error.value)
