"""Mean, std and count over seeds, and each group's comparison with its dense baseline.

Only healthy runs (state "ok") come in here: health.py lists the others, so nothing unusable
is ever averaged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from sparsebench.reporting.load import DENSE

ROW_KEY, COLUMN_KEY = "method", "sparsity"
# Tables put methods against sparsities and compare with the dense run of the same dataset and model.
REQUIRED_KEYS = ("dataset", "model", ROW_KEY, COLUMN_KEY)
DEFAULT_GROUP_BY = ("dataset", "model", ROW_KEY, "distribution", COLUMN_KEY)
ACCURACIES = ("test_acc", "best_test_acc")
AVERAGED = (*ACCURACIES, "ece", "test_loss", "actual_sparsity", "train_flops", "flops_vs_dense", "wall_time_s")


@dataclass(frozen=True)
class Grouping:
    keys: tuple[str, ...]

    @property
    def table_keys(self) -> tuple[str, ...]:
        """One table per value of these; methods and sparsities are its rows and columns."""
        return tuple(key for key in self.keys if key not in (ROW_KEY, COLUMN_KEY))

    @property
    def baseline_keys(self) -> tuple[str, ...]:
        """What a dense run shares with the sparse runs it is the baseline of.

        Dense runs have no allocation and no method options, so those keys cannot match.
        """
        return tuple(
            key for key in self.table_keys if key != "distribution" and not key.startswith(f"{ROW_KEY}.")
        )


def modal_count(counts: pd.Series) -> int:
    """The usual number of seeds per group (the larger one on a tie): what 'complete' means."""
    return int(counts.mode().max()) if len(counts) else 0


def summarize(runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """One row per group: mean and sample std of every result, run count, seeds, paper number."""
    grouped = runs.groupby(list(keys), dropna=False, sort=True)
    summary = grouped[list(AVERAGED)].agg(["mean", "std"])
    summary.columns = [f"{column}_{statistic}" for column, statistic in summary.columns]
    summary["n"] = grouped.size()
    summary["seeds"] = grouped["seed"].agg(lambda seeds: " ".join(map(str, sorted(seeds))))
    summary[["paper_test_acc", "paper_source"]] = grouped[["paper_test_acc", "paper_source"]].first()
    summary = summary.reset_index()
    return summary[[*keys, "n", "seeds", *(column for column in summary if column not in (*keys, "n", "seeds"))]]


@dataclass(frozen=True)
class Comparison:
    grouping: Grouping
    metric: str
    summary: pd.DataFrame  # one row per group, with deltas and FLOPs relative to dense
    baseline: pd.DataFrame  # dense runs pooled by the baseline keys
    modal_n: int


def compare(runs_ok: pd.DataFrame, grouping: Grouping, metric: str) -> Comparison:
    summary = summarize(runs_ok, grouping.keys)
    baseline = summarize(runs_ok[runs_ok[ROW_KEY] == DENSE], grouping.baseline_keys)
    baseline = baseline.assign(**{ROW_KEY: DENSE, COLUMN_KEY: 0.0})  # reads like any other group's row
    summary = _attach_dense(summary, baseline, grouping.baseline_keys)
    summary["best_in_column"] = _best_in_column(summary, grouping.table_keys, f"{metric}_mean")
    return Comparison(grouping, metric, summary, baseline, modal_count(summary["n"]))


def _best_in_column(summary: pd.DataFrame, table_keys: tuple[str, ...], mean: str) -> pd.Series:
    """True where a sparse method has the best mean of its table column, when two or more compete."""
    sparse = summary[summary[ROW_KEY] != DENSE]
    column = sparse.groupby([*table_keys, COLUMN_KEY], dropna=False)[mean]
    best = (sparse[mean] == column.transform("max")) & (column.transform("count") >= 2)
    return best.reindex(summary.index, fill_value=False)


def _attach_dense(summary: pd.DataFrame, baseline: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    compared = [f"{accuracy}_mean" for accuracy in ACCURACIES] + ["train_flops_mean"]
    dense = baseline[[*keys, *compared]].rename(columns={column: f"dense_{column}" for column in compared})
    summary = summary.merge(dense, on=list(keys), how="left")
    for accuracy in ACCURACIES:
        summary[f"{accuracy}_delta_vs_dense"] = summary[f"{accuracy}_mean"] - summary[f"dense_{accuracy}_mean"]
    summary["flops_vs_dense_run"] = summary["train_flops_mean"] / summary["dense_train_flops_mean"]
    return summary


@dataclass
class TableSlice:
    """The groups of one paper table, plus the dense baseline shown in every one of its columns."""

    key: dict
    baseline_key: tuple
    sparse: pd.DataFrame
    dense: dict | None
    _cells: dict = field(init=False, repr=False)

    def __post_init__(self):
        # Plain dicts: formatting reads thousands of cells, and Series lookups are slow at that.
        self._cells = {(row[ROW_KEY], row[COLUMN_KEY]): row for row in self.sparse.to_dict("records")}

    @property
    def sparse_methods(self) -> list[str]:
        return sorted(self.sparse[ROW_KEY].unique())

    @property
    def methods(self) -> list[str]:
        return ([DENSE] if self.dense is not None else []) + self.sparse_methods

    @property
    def sparsities(self) -> list[float]:
        # A dense-only table still needs a column: the dense run's own sparsity, 0.
        return sorted(self.sparse[COLUMN_KEY].unique()) or [0.0]

    def stats(self, method: str, sparsity: float) -> dict | None:
        return self.dense if method == DENSE else self._cells.get((method, sparsity))


def by_key(frame: pd.DataFrame, keys: tuple[str, ...]) -> dict[tuple, pd.DataFrame]:
    return dict(iter(frame.groupby(list(keys), dropna=False, sort=False)))


def table_slices(comparison: Comparison) -> list[TableSlice]:
    table_keys, baseline_keys = comparison.grouping.table_keys, comparison.grouping.baseline_keys
    positions = [table_keys.index(key) for key in baseline_keys]

    def baseline_of(table_key: tuple) -> tuple:
        return tuple(table_key[position] for position in positions)

    dense_rows = {tuple(row[key] for key in baseline_keys): row for row in comparison.baseline.to_dict("records")}
    summary = comparison.summary
    is_dense = summary[ROW_KEY] == DENSE
    tables = by_key(summary[~is_dense], table_keys)
    covered = {baseline_of(key) for key in tables}
    # A dense baseline that no sparse table uses still gets a table of its own.
    for key, part in by_key(summary[is_dense], table_keys).items():
        if baseline_of(key) not in covered:
            tables[key] = part.iloc[:0]
    slices = [
        TableSlice(dict(zip(table_keys, key)), baseline_of(key), part, dense_rows.get(baseline_of(key)))
        for key, part in tables.items()
    ]
    return sorted(slices, key=lambda table: [str(value) for value in table.key.values()])


def mean_curves(curves: pd.DataFrame, runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Test accuracy per epoch, averaged over the seeds of each group."""
    located = curves.merge(runs[["run", *keys]], on="run")
    return located.groupby([*keys, "epoch"], dropna=False, sort=True)["test_acc"].mean().reset_index()


def mean_layer_densities(runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Final density of each layer, averaged over the seeds of each group, in model order."""
    rows = [
        (position, layer, density)
        for position, densities in zip(runs.index, runs["layer_densities"])
        if isinstance(densities, dict)
        for layer, density in densities.items()
    ]
    long = pd.DataFrame(rows, columns=["position", "layer", "density"])
    long = long.join(runs[list(keys)], on="position")
    # sort=False keeps layers in the order the trainer wrote them, which is the model's order.
    return long.groupby([*keys, "layer"], dropna=False, sort=False)["density"].mean().reset_index()
