"""sparsebench status: done, diverged, running, resumable, restart and missing runs, without training."""
import fcntl
import json

from sparsebench import cli, results, sweep_status

TINY = ["method=static", "epochs=2", "dataset.num_samples=400", "progress=none"]


def test_status_of_a_tree_and_of_a_planned_sweep(tmp_path, capsys, interrupt_at_checkpoint):
    root = f"results_root={tmp_path}"
    assert cli.main(["train", *TINY, "seed=0", root]) == 0
    done = sweep_status.planned_runs([*TINY, "seed=0", root])[0]

    interrupt = interrupt_at_checkpoint(2)
    assert cli.main(["train", *TINY, "seed=1", root]) == 130
    interrupt.remove()

    restart = sweep_status.planned_runs([*TINY, "seed=2", root])[0]
    restart.mkdir(parents=True)
    (restart / results.CONFIG_FILE).write_text("seed: 2\n")
    running = sweep_status.planned_runs([*TINY, "seed=3", root])[0]
    running.mkdir(parents=True)
    (running / results.CONFIG_FILE).write_text("seed: 3\n")
    diverged = sweep_status.planned_runs([*TINY, "seed=4", root])[0]
    diverged.mkdir(parents=True)
    (diverged / results.CONFIG_FILE).write_text("seed: 4\n")
    (diverged / results.FINAL_FILE).write_text(json.dumps({"status": "diverged", "diverged_at_step": 7}))
    capsys.readouterr()

    with open(running / results.LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process training it
        assert sweep_status.main([str(tmp_path)]) == 0
        tree = capsys.readouterr().out
        assert sweep_status.main(["-m", *TINY, "seed=0,1,2,3,4,5", root]) == 0
        planned = capsys.readouterr().out
    lines = {line.split()[1]: line.split()[0] for line in tree.splitlines()[:-1]}
    assert lines[str(done)] == "done" and lines[str(restart)] == "restart"
    assert lines[str(running)] == "running" and lines[str(diverged)] == "diverged"
    assert sum(state == "resumable" for state in lines.values()) == 1
    assert tree.splitlines()[-1] == "5 runs: 1 done, 1 diverged, 1 running, 1 resumable, 1 restart; " \
                                    "a relaunch trains 1, resumes 1 and skips 2"
    assert planned.splitlines()[-1].startswith("6 runs: 1 done, 1 diverged, 1 running, 1 resumable, 1 restart, 1 missing")
    assert not (tmp_path / "default" / ".multirun").exists()  # nothing was launched or written


def test_status_errors_are_one_line(tmp_path, capsys):
    assert sweep_status.main([str(tmp_path / "nowhere")]) == 2
    assert sweep_status.main(["-m", "sparsty=0.9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is not a directory" in err[0] and "unknown key 'sparsty'" in err[1]


def test_status_of_a_planned_search(tmp_path, capsys):
    root = f"results_root={tmp_path}"
    # EvoPress runs only as a search: planned as one with or without the word: its dense model, then itself
    for args in (["-m", "method=evopress", root], ["search", "-m", "method=evopress", root]):
        assert sweep_status.main(args) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[1].split("/")[-3] for line in lines[:-1]] == ["dense", "evopress"]
        assert lines[-1] == "2 runs: 2 missing; a relaunch trains 2, resumes 0 and skips 0"
    dense, search = sweep_status.planned_runs(["method=evopress", root], search=True)
    search.mkdir(parents=True)
    (search / results.SEARCH_STATE_FILE).write_bytes(b"")  # a killed search's saved state
    assert sweep_status.run_state(search) == ("resumable", "search state saved")
    # a training method is not a search: one line, exit 2
    assert sweep_status.main(["search", "method=gmp", root]) == 2
    assert capsys.readouterr().err.strip() == (
        "sparsebench status: error: method=gmp is not a search; train method=gmp with `sparsebench train`; "
        "`sparsebench search` runs method=dass|evopress|random_search")
    assert not dense.exists()


def test_a_results_tree_named_search_is_still_a_tree(tmp_path, capsys, monkeypatch):
    (tmp_path / "search").mkdir()
    monkeypatch.chdir(tmp_path)
    assert sweep_status.main(["search"]) == 0
    assert capsys.readouterr().out.strip() == "0 runs: none; a relaunch trains 0, resumes 0 and skips 0"
    assert sweep_status.main(["search", "--help"]) == 0
    assert "usage: sparsebench status" in capsys.readouterr().out
