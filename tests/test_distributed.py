"""Several processes for one run (torchrun, gloo on CPU): one directory, rank 0 writes, identical
masks on every rank, the final.json contract of a single-process run, resume."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsebench import cli, distributed, results

TINY = ["method=rigl", "method.delta_t=2", "epochs=3", "dataset.num_samples=600", "progress=none"]


def _isolated_network() -> str | None:
    """torchrun's rendezvous store listens on every interface; the tests run it in a network
    namespace of their own whose only interface is loopback. None if one can be made."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip missing"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot make a network namespace: {probe.stderr.strip()}"


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    reason = _isolated_network()
    if reason:
        pytest.skip(reason)
    command = " ".join([
        "ip link set lo up &&", "exec", sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
        f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
        "-m", "sparsebench", "train", *(f"'{a}'" for a in args),
    ])
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["unshare", "-n", "sh", "-c", command], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_two_ranks_train_one_run_with_the_single_process_contract(tmp_path):
    proc = torchrun([*TINY, f"results_root={tmp_path / 'ddp'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p.parent for p in (tmp_path / "ddp").rglob(results.CONFIG_FILE)]
    assert len(runs) == 1  # one run directory, not one per rank
    run = runs[0]
    final = json.loads((run / results.FINAL_FILE).read_text())
    assert final["world_size"] == 2 and final["provenance"]["world_size"] == 2
    assert final["actual_sparsity"] == pytest.approx(0.9, abs=1e-4)  # exact per-layer counts: 1229 of 12288
    assert proc.stdout.count("done: test_acc") == 1  # rank 0 speaks for both
    assert [m["epoch"] for m in results.read_jsonl(run / results.METRICS_FILE)] == [1, 2, 3]
    assert len(results.read_jsonl(run / results.MASK_UPDATES_FILE)) == 4  # masks changed (steps 2, 4, 6, 8) and were checked

    assert cli.main(["train", *TINY, f"results_root={tmp_path / 'single'}"]) == 0
    (single,) = [p.parent for p in (tmp_path / "single").rglob(results.FINAL_FILE)]
    single_final = json.loads((single / results.FINAL_FILE).read_text())
    assert set(single_final) == set(final) and single_final["world_size"] == 1
    assert final["steps"] == single_final["steps"]  # batch_size is the global batch
    assert final["train_flops"] == pytest.approx(single_final["train_flops"])  # counted once, not per rank
    assert single.name == run.name  # the same config: the same directory, whatever the world size


@pytest.mark.slow
def test_a_last_batch_smaller_than_the_ranks_trains(tmp_path):
    """480 training examples in batches of 479: the last batch holds one example, so rank 1's
    share is empty; its loss is 0, not nan (which stopped the run as diverged)."""
    args = [*TINY, "batch_size=479", "epochs=2"]
    proc = torchrun([*args, f"results_root={tmp_path / 'ddp'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p.parent for p in (tmp_path / "ddp").rglob(results.FINAL_FILE)]
    final = json.loads((run / results.FINAL_FILE).read_text())
    assert final["status"] == "completed" and final["steps"] == 4
    assert all(math.isfinite(m["train_loss"]) for m in results.read_jsonl(run / results.METRICS_FILE))


@pytest.mark.slow
def test_cigl_ranks_draw_the_same_random_mask(tmp_path):
    """Each rank multiplies the all-reduced gradient by its own Z: ranks drawing different masks
    would move their weights apart, and the next RigL round's masks (checked across ranks at
    every change) would differ. The run completes with the averaged model's exact counts."""
    proc = torchrun(["method=cigl", "method.delta_t=2", "method.swa_start=0.5", "epochs=3", "dataset.num_samples=600",
                     "progress=none", f"results_root={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p.parent for p in tmp_path.rglob(results.FINAL_FILE)]
    final = json.loads((run / results.FINAL_FILE).read_text())
    assert final["world_size"] == 2 and final["cigl"]["averaged_snapshots"] == 2
    assert final["actual_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert len(results.read_jsonl(run / results.MASK_UPDATES_FILE)) >= 3  # masks changed, and were checked


@pytest.mark.slow
def test_a_run_killed_in_one_process_resumes_under_torchrun(tmp_path, interrupt_at_checkpoint):
    args = [*TINY, "epochs=4", f"results_root={tmp_path}"]
    interrupt = interrupt_at_checkpoint(3)
    assert cli.main(["train", *args]) == 130
    interrupt.remove()
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from epoch 2" in proc.stdout
    (run,) = [p.parent for p in tmp_path.rglob(results.FINAL_FILE)]
    assert [m["epoch"] for m in results.read_jsonl(run / results.METRICS_FILE)] == [1, 2, 3, 4]


def _ranks_compare_masks(rank: int, store: str, outcome: dict) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        processes = distributed.Processes(rank, 2, rank)
        same = {"a": torch.tensor([True, False, True])}
        distributed.check_masks(same, processes)  # equal: passes on both
        differs = {"a": torch.tensor([True, False, rank == 0])}
        try:
            distributed.check_masks(differs, processes)
            outcome[rank] = "passed"
        except RuntimeError as exc:
            outcome[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def test_a_rank_whose_masks_differ_from_rank_0_stops(tmp_path):
    outcome = mp.Manager().dict()
    mp.spawn(_ranks_compare_masks, args=(str(tmp_path / "store"), outcome), nprocs=2)
    assert outcome[0] == "passed"
    assert outcome[1] == "rank 1: mask of a differs from rank 0's after a mask update"


def test_loss_scale_makes_ranks_average_the_global_mean():
    # 5 samples over 2 ranks: shares of 3 and 2. DDP averages the ranks' gradients, so each
    # rank's mean loss is scaled by local * world / total.
    p0, p1 = distributed.Processes(0, 2, 0), distributed.Processes(1, 2, 1)
    x = torch.arange(5.0)
    assert torch.equal(p0.shard(x), torch.tensor([0.0, 1.0, 2.0])) and torch.equal(p1.shard(x), torch.tensor([3.0, 4.0]))
    averaged = (p0.shard(x).mean() * p0.loss_scale(3, 5) + p1.shard(x).mean() * p1.loss_scale(2, 5)) / 2
    assert averaged.item() == pytest.approx(x.mean().item())


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(i)
        return torch.tensor([float(i)]), i


def rank_loader(dataset, ranks, trains=None, batch=4):
    generator = torch.Generator().manual_seed(3)
    batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(dataset, generator=generator), batch, False)
    return torch.utils.data.DataLoader(dataset, batch_sampler=distributed.RankBatches(batches, ranks, trains),
                                       generator=generator)


def test_each_rank_reads_only_its_share_of_each_batch():
    """10 samples in batches of 4 (4, 4, 2) over 3 ranks: each rank reads its `shard` of every
    batch and nothing else; the 2-sample batch has fewer samples than ranks and is read whole."""
    whole = [y.tolist() for _, y in rank_loader(CountingDataset(10), distributed.SINGLE)]
    assert sorted(sum(whole, [])) == list(range(10)) and [len(b) for b in whole] == [4, 4, 2]
    reads = []
    for rank in range(3):
        ranks = distributed.Processes(rank, 3, rank)
        dataset = CountingDataset(10)
        got = [y.tolist() for _, y in rank_loader(dataset, ranks)]
        for step, (batch, full) in enumerate(zip(got, whole)):
            expected = ranks.shard(torch.tensor(full)).tolist()
            assert (batch if step < 2 else ranks.shard(torch.tensor(batch)).tolist()) == expected
        assert got[2] == whole[2]  # read whole: the trainer shards it
        reads.append(len(dataset.read))
    assert reads == [2 + 2 + 2, 1 + 1 + 2, 1 + 1 + 2]  # against 10 reads each when every rank read every batch


def test_a_replica_rank_reads_nothing_for_the_steps_it_skips():
    dataset = CountingDataset(10)
    kept = [y.tolist() for _, y in rank_loader(dataset, distributed.SINGLE, trains=lambda i: i != 1)]
    whole = [y.tolist() for _, y in rank_loader(CountingDataset(10), distributed.SINGLE)]
    assert kept == [whole[0], whole[2]] and sorted(dataset.read) == sorted(whole[0] + whole[2])


# P-GaP, 3 partitions; 480 training examples in batches of 128: 4 steps an epoch, 24 in all, GaP
# steps of 3 (epochs and replica turns do not line up, so epochs span ranks and rounds).
PGAP = ["method=gap", "method.variant=parallel", "method.kappa=3", "epochs=6", "dataset.num_samples=600",
        "progress=none"]


def _run_files(root) -> tuple[dict, list[dict], list[dict], dict]:
    (run,) = [p.parent for p in root.rglob(results.FINAL_FILE)]
    final = json.loads((run / results.FINAL_FILE).read_text())
    metrics = [{k: v for k, v in m.items() if k != "wall_time_s"} for m in results.read_jsonl(run / results.METRICS_FILE)]
    return final, metrics, results.read_jsonl(run / results.MASK_UPDATES_FILE), torch.load(run / "model.pt")


@pytest.fixture(scope="module")
def pgap_reference(tmp_path_factory):
    """P-GaP trained by one process with one thread, as each torchrun rank has."""
    root = tmp_path_factory.mktemp("pgap_one")
    one = torchrun([*PGAP, f"results_root={root}"], nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    return _run_files(root)


def assert_same_run(files, reference) -> None:
    final, metrics, masks, model = files
    final1, metrics1, masks1, model1 = reference
    assert set(model) == set(model1) and all(torch.equal(model[k], model1[k]) for k in model1)
    assert metrics == metrics1  # every epoch's line, whichever rank trained its steps
    assert masks == masks1
    for key in ("test_acc", "best_test_acc", "train_flops", "train_flops_dense", "itop_rate", "actual_sparsity",
                "steps"):
        assert final[key] == final1[key], key


@pytest.mark.slow
def test_pgap_replicas_on_their_own_ranks_give_the_one_process_run(tmp_path, pgap_reference):
    three = torchrun([*PGAP, f"results_root={tmp_path}"], nproc=3)
    assert three.returncode == 0, three.stderr[-3000:]
    assert "3 ranks train the 3 replicas of each round side by side" in three.stdout
    files = _run_files(tmp_path)
    assert_same_run(files, pgap_reference)
    # One line a step that changed masks: the grow at step 0, a prune and the next grow (two ranks'
    # changes) at steps 3, 6, ..., 15, the last prune at 18.
    assert [m["step"] for m in files[2]] == [0, 3, 6, 9, 12, 15, 18]
    assert files[0]["world_size"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("epochs_done", [2, 3], ids=["mid-round", "replica-0-turn"])
def test_pgap_killed_in_one_process_resumes_on_its_ranks(tmp_path, pgap_reference, interrupt_at_checkpoint,
                                                        epochs_done):
    # Epoch 2 ends at step 7, in replica 2's turn: replicas 0 and 1 are finished in the checkpoint.
    # Epoch 3 ends at step 11, in replica 0's turn of round 2: what a rank-0 checkpoint holds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        interrupt = interrupt_at_checkpoint(epochs_done + 1)
        assert cli.main(["train", *PGAP, f"results_root={tmp_path}"]) == 130
        interrupt.remove()
    finally:
        torch.set_num_threads(threads)
    resumed = torchrun([*PGAP, f"results_root={tmp_path}"], nproc=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from epoch {epochs_done}" in resumed.stdout
    assert_same_run(_run_files(tmp_path), pgap_reference)
