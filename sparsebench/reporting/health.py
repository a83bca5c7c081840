"""What must not be averaged silently: broken runs (left out), and, averaged but flagged, groups
short of seeds, seeds run twice, healthy runs that learned nothing and unusable bench.json files.
document.health_categories says, once for the overview and the Health section, which is which."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import pandas as pd

from sparsebench.reporting.aggregate import Grouping, modal_count
from sparsebench.reporting.load import OK, RESULT_COLUMNS


@dataclass(frozen=True)
class Health:
    problems: pd.DataFrame  # runs left out of every mean: run, state, problem
    suspicious: pd.DataFrame  # healthy runs that are averaged but flagged (at chance level): run, problem
    seed_gaps: pd.DataFrame  # groups with fewer healthy runs than the usual group
    duplicate_seeds: pd.DataFrame  # groups averaging two runs of one seed, and what tells them apart
    bench_problems: pd.DataFrame  # healthy runs whose bench.json is unusable: run, problem
    mixed_code: pd.DataFrame  # groups whose runs come from different sparsebench code: group, versions
    mixed_compute: pd.DataFrame  # groups whose runs ran on different set-ups (device, threads, torch)

    @property
    def clean(self) -> bool:
        return all(frame.empty for frame in (
            self.problems, self.suspicious, self.seed_gaps, self.duplicate_seeds, self.bench_problems,
            self.mixed_code, self.mixed_compute,
        ))


def check_health(runs: pd.DataFrame, grouping: Grouping) -> Health:
    problems = runs.loc[runs["state"] != OK, ["run", "state", "problem"]].reset_index(drop=True)
    # The loader leaves the problem of a healthy run empty unless it found something suspicious.
    flagged = (runs["state"] == OK) & runs["problem"].fillna("").astype(bool)
    suspicious = runs.loc[flagged, ["run", "problem"]].reset_index(drop=True)
    bench = (runs["state"] == OK) & runs["bench_problem"].notna()
    bench_problems = runs.loc[bench, ["run", "bench_problem"]].rename(columns={"bench_problem": "problem"})
    return Health(problems, suspicious, seed_gaps(runs, grouping.keys), duplicate_seeds(runs, grouping.keys),
                  bench_problems.reset_index(drop=True), mixed_code(runs, grouping.keys),
                  mixed_compute(runs, grouping.keys))


def mixed_code(runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Groups averaging runs of different code versions (the run directory's hash covers the
    config, not the code: a run finished before a fix is skipped, not redone, unless rerun=true)."""
    return _mixed(runs, keys, "code_version", "code versions")


def mixed_compute(runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Groups averaging runs made on different set-ups (device, threads, ranks, torch): the
    same seed and code sum floats in another order there, so the runs are not reproductions of
    one another (the directory's hash leaves the set-up out, as it must to let a run resume)."""
    return _mixed(runs, keys, "compute", "set-ups")


def _mixed(runs: pd.DataFrame, keys: tuple[str, ...], column: str, heading: str) -> pd.DataFrame:
    """Groups whose healthy runs take more than one value of `column`, with each value's count."""
    columns = [*keys, heading]
    healthy = runs[(runs["state"] == OK) & runs[column].notna()] if column in runs else runs.iloc[:0]
    rows = []
    for key, part in healthy.groupby(list(keys), dropna=False, sort=True):
        values = sorted(part[column].unique())
        if len(values) > 1:
            counts = part[column].value_counts()
            rows.append([*(key if isinstance(key, tuple) else (key,)),
                         ", ".join(f"{v} ({counts[v]} run{'s' if counts[v] > 1 else ''})" for v in values)])
    return pd.DataFrame(rows, columns=columns)


def seed_gaps(runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Groups with fewer healthy runs than most groups, naming each missing seed and why it is missing."""
    columns = [*keys, "healthy runs", "expected", "missing seeds"]
    identified = runs[runs["method"].notna()]  # a config too broken to name its group is listed as failed
    if identified.empty:
        return pd.DataFrame(columns=columns)
    group = identified.groupby(list(keys), dropna=False, sort=True).ngroup()
    healthy = identified["state"] == OK
    healthy_seeds: dict[int, list] = defaultdict(list)
    for group_id, seed in zip(group[healthy], identified.loc[healthy, "seed"]):
        healthy_seeds[group_id].append(seed)
    expected_n = modal_count(pd.Series([len(seeds) for seeds in healthy_seeds.values()]))
    complete_sets = Counter(frozenset(seeds) for seeds in healthy_seeds.values() if len(seeds) == expected_n)
    expected_seeds = complete_sets.most_common(1)[0][0] if complete_sets else frozenset()
    why_missing = {
        (group_id, seed): state
        for group_id, seed, state in zip(group[~healthy], identified.loc[~healthy, "seed"], identified.loc[~healthy, "state"])
    }
    key_values = identified.groupby(group)[list(keys)].first()
    rows = []
    for group_id in range(group.max() + 1):
        seeds = healthy_seeds.get(group_id, [])
        if len(seeds) >= expected_n:
            continue
        missing = sorted(expected_seeds - set(seeds))
        described = ", ".join(f"{seed} ({why_missing.get((group_id, seed), 'no run')})" for seed in missing)
        rows.append([*key_values.loc[group_id], len(seeds), expected_n, described or "other seeds than usual"])
    return pd.DataFrame(rows, columns=columns)


def duplicate_seeds(runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Groups holding one seed more than once: usually a config key that --group-by does not split on."""
    columns = [*keys, "seed", "runs", "configs differ in"]
    healthy = runs[runs["state"] == OK]
    repeated = healthy[healthy.duplicated([*keys, "seed"], keep=False)]
    config_columns = [column for column in runs.columns if column not in (*RESULT_COLUMNS, *keys, "seed")]
    rows = []
    for key, part in repeated.groupby([*keys, "seed"], dropna=False, sort=True):
        differing = [column for column in config_columns if part[column].nunique(dropna=False) > 1]
        rows.append([*key, len(part), ", ".join(differing) or "nothing: the same config ran twice"])
    return pd.DataFrame(rows, columns=columns)
