"""Mean, std, standard error and 95 % confidence interval over seeds, and each group's comparison
with its dense baseline.

Only healthy runs (state "ok") come in here: health.py lists the others, so nothing unusable
is ever averaged. Which runs form a group is decided before (identity.py): runs that differ in
any setting but the seed are never averaged together.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd

from sparsebench.reporting.load import DENSE

ROW_KEY, COLUMN_KEY = "method", "sparsity"
# Tables put methods against sparsities and compare with the dense run of the same dataset and model.
REQUIRED_KEYS = ("dataset", "model", ROW_KEY, COLUMN_KEY)
DEFAULT_GROUP_BY = ("dataset", "model", ROW_KEY, "distribution", COLUMN_KEY)
ACCURACIES = ("test_acc", "best_test_acc")
AVERAGED = (
    *ACCURACIES, "ece", "test_loss", "actual_sparsity", "train_flops", "flops_vs_dense", "wall_time_s",
    "inference_flops_vs_dense", "inference_speedup", "train_step_speedup", "itop_rate",
)
# Settings only sparse runs have: a dense run has no mask to allocate, no method options, no
# sparse initialisation and no sparse training backend, so its baseline never has to match them.
SPARSE_ONLY_KEYS = ("sparse_init", "backend", "backend_layers")


def key_scope(key: str) -> str:
    """What a config key belongs to: "method" (row), "distribution" (sparse tables) or "setup" (everything)."""
    if key.startswith(f"{ROW_KEY}.") or key in SPARSE_ONLY_KEYS:
        return "method"
    if key == "distribution" or key.startswith("distribution."):
        return "distribution"
    return "setup"


@dataclass(frozen=True)
class Grouping:
    keys: tuple[str, ...]
    # Keys the report added to the user's because runs that would share a table differed in them.
    split: tuple[str, ...] = ()

    @property
    def table_keys(self) -> tuple[str, ...]:
        """One table per value of these; methods and sparsities are its rows and columns."""
        return tuple(key for key in self.keys if key not in (ROW_KEY, COLUMN_KEY))

    @property
    def baseline_keys(self) -> tuple[str, ...]:
        """What a dense run shares with the sparse runs it is the baseline of.

        Dense runs have no allocation and no method options, so those keys cannot match.
        """
        return tuple(key for key in self.table_keys if key_scope(key) == "setup")

    @property
    def core_baseline_keys(self) -> tuple[str, ...]:
        """The baseline keys the user asked for: a dense run of another budget still shares these."""
        return tuple(key for key in self.baseline_keys if key not in self.split)


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (scipy.stats.t.ppf(0.975, df)).
_T95 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)


def t95(df: float) -> float:
    """The t quantile of a two-sided 95 % interval; past 30 degrees of freedom, Cornish-Fisher (error < 1e-5)."""
    if not df >= 1:
        return math.nan
    if df <= len(_T95):
        return _T95[int(df) - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def modal_count(counts: pd.Series) -> int:
    """The usual number of seeds per group (the larger one on a tie): what 'complete' means."""
    return int(counts.mode().max()) if len(counts) else 0


def summarize(runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """One row per group: mean and sample std of every result, standard error and 95 % CI half-width
    of the accuracies, run count, seeds, published number."""
    grouped = runs.groupby(list(keys), dropna=False, sort=True)
    summary = grouped[list(AVERAGED)].agg(["mean", "std"])
    summary.columns = [f"{column}_{statistic}" for column, statistic in summary.columns]
    summary["n"] = grouped.size()
    summary["seeds"] = grouped["seed"].agg(lambda seeds: " ".join(map(str, sorted(seeds))))
    firsts = ["paper_test_acc", "paper_source", "inference_speedup_setting", "train_step_setting"]
    summary[firsts] = grouped[firsts].first()
    for measured in ("inference_speedup", "train_step_speedup"):  # bench.json is run on some runs only
        summary[f"{measured}_n"] = grouped[measured].count()
    for accuracy in ACCURACIES:
        # Over the seeds that have the number (an older run may lack best_test_acc).
        count = grouped[accuracy].count()
        summary[f"{accuracy}_sem"] = summary[f"{accuracy}_std"] / count.pow(0.5)
        summary[f"{accuracy}_ci95"] = summary[f"{accuracy}_sem"] * (count - 1).map(t95)
    summary = summary.reset_index()
    return summary[[*keys, "n", "seeds", *(column for column in summary if column not in (*keys, "n", "seeds"))]]


def _unset(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


_UNSET = "<unset>"


def key_tuples(frame: pd.DataFrame, keys: tuple[str, ...]) -> list[tuple]:
    """Each row's values of `keys` as a hashable tuple in which every missing value is equal (NaN is not)."""
    if not keys:
        return [()] * len(frame)
    columns = [frame[key].tolist() for key in keys]
    return [tuple(_UNSET if _unset(value) else value for value in values) for values in zip(*columns)]


def key_tuple_of(values: dict, keys: tuple[str, ...]) -> tuple:
    """One mapping's values of `keys`, as key_tuples writes them."""
    return tuple(_UNSET if _unset(values[key]) else values[key] for key in keys)


@dataclass(frozen=True)
class Comparison:
    grouping: Grouping
    metric: str
    summary: pd.DataFrame  # one row per group, with deltas and FLOPs relative to dense
    baseline: pd.DataFrame  # dense runs pooled by the baseline keys
    modal_n: int
    # Baseline key (key_tuples form) -> (row of `baseline` or None, what that dense run's budget differs in).
    dense_of: dict = field(repr=False, default_factory=dict)


def compare(runs_ok: pd.DataFrame, grouping: Grouping, metric: str) -> Comparison:
    summary = summarize(runs_ok, grouping.keys)
    baseline = summarize(runs_ok[runs_ok[ROW_KEY] == DENSE], grouping.baseline_keys)
    baseline = baseline.assign(**{ROW_KEY: DENSE, COLUMN_KEY: 0.0})  # reads like any other group's row
    dense_of = _dense_baselines(summary, baseline, grouping)
    summary = _attach_dense(summary, baseline, grouping, dense_of)
    summary["best_in_column"] = _best_in_column(summary, grouping.table_keys, f"{metric}_mean")
    return Comparison(grouping, metric, summary, baseline, modal_count(summary["n"]), dense_of)


def _dense_baselines(summary: pd.DataFrame, baseline: pd.DataFrame, grouping: Grouping) -> dict:
    """The dense baseline of every baseline key in `summary`: the dense runs of the same budget.

    A budget without dense runs of its own (GaP at its own 450 epochs against dense runs of 40)
    falls back to the dense runs of the same dataset and model (the user's baseline keys) if
    there is exactly one such budget, and says what differs, so a reader sees the comparison
    crosses budgets; with none or several, there is no baseline.
    """
    keys, core = grouping.baseline_keys, grouping.core_baseline_keys
    core_positions = [keys.index(key) for key in core]
    own = {key: index for index, key in enumerate(key_tuples(baseline, keys))}
    by_core = defaultdict(list)
    for key, index in own.items():
        by_core[tuple(key[position] for position in core_positions)].append((key, index))
    found = {}
    for key in set(key_tuples(summary, keys)):
        if key in own:
            found[key] = (own[key], "")
            continue
        candidates = by_core.get(tuple(key[position] for position in core_positions), [])
        if len(candidates) != 1:
            found[key] = (None, "")
            continue
        dense_key, index = candidates[0]
        differs = ", ".join(
            f"{name}={format_value(dense_value)}"
            for name, dense_value, value in zip(keys, dense_key, key) if dense_value != value
        )
        found[key] = (index, differs)
    return found


def format_value(value) -> str:
    """A config value as the report prints it: 0.0005 not 5e-04, true not True."""
    if _unset(value) or value == _UNSET:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        # 30.0 steps read as 30; 0.0005 stays 0.0005 (str gives 0.0005, :g 0.0005, repr 0.0005).
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:g}"
    return str(value)


_DENSE_COMPARED = (*(f"{accuracy}_mean" for accuracy in ACCURACIES), "train_flops_mean", "wall_time_s_mean")


def _attach_dense(summary: pd.DataFrame, baseline: pd.DataFrame, grouping: Grouping, dense_of: dict) -> pd.DataFrame:
    matches = [dense_of.get(key, (None, "")) for key in key_tuples(summary, grouping.baseline_keys)]
    rows = [index for index, _ in matches]
    summary = summary.copy()
    for column in _DENSE_COMPARED:
        values = baseline[column].tolist()
        summary[f"dense_{column}"] = [math.nan if row is None else values[row] for row in rows]
    summary["dense_differs"] = [differs for _, differs in matches]
    for accuracy in ACCURACIES:
        summary[f"{accuracy}_delta_vs_dense"] = summary[f"{accuracy}_mean"] - summary[f"dense_{accuracy}_mean"]
    summary["flops_vs_dense_run"] = summary["train_flops_mean"] / summary["dense_train_flops_mean"]
    summary["wall_time_vs_dense_run"] = summary["wall_time_s_mean"] / summary["dense_wall_time_s_mean"]
    return summary


def _best_in_column(summary: pd.DataFrame, table_keys: tuple[str, ...], mean: str) -> pd.Series:
    """True where a sparse method has the best mean of its table column among two or more cells
    of two or more seeds each: one seed says nothing about which method is better."""
    sparse = summary[(summary[ROW_KEY] != DENSE) & (summary["n"] >= 2)]
    column = sparse.groupby([*table_keys, COLUMN_KEY], dropna=False)[mean]
    best = (sparse[mean] == column.transform("max")) & (column.transform("count") >= 2)
    return best.reindex(summary.index, fill_value=False)


@dataclass
class TableSlice:
    """The groups of one paper table, plus the dense baseline shown in every one of its columns."""

    key: dict
    baseline_key: tuple
    sparse: pd.DataFrame
    dense: dict | None
    # Empty when the dense baseline ran this table's budget; else what its budget differs in.
    dense_differs: str = ""
    _cells: dict = field(init=False, repr=False)

    _sparse_methods: list = field(init=False, repr=False)
    _sparsities: list = field(init=False, repr=False)

    def __post_init__(self):
        # Plain dicts: formatting reads thousands of cells, and Series lookups are slow at that.
        self._cells = {(row[ROW_KEY], row[COLUMN_KEY]): row for row in self.sparse.to_dict("records")}
        self._sparse_methods = sorted({method for method, _ in self._cells})
        # A dense-only table still needs a column: the dense run's own sparsity, 0.
        self._sparsities = sorted({sparsity for _, sparsity in self._cells}) or [0.0]

    def has_values(self, column: str) -> bool:
        """Whether any cell of the table, dense row included, has a value in `column`."""
        dense = self.dense is not None and pd.notna(self.dense.get(column, math.nan))
        return dense or (column in self.sparse and bool(self.sparse[column].notna().any()))

    @property
    def key_tuple(self) -> tuple:
        """`key`'s values as by_key and key_tuples write them."""
        return key_tuple_of(self.key, tuple(self.key))

    @property
    def sparse_methods(self) -> list[str]:
        return self._sparse_methods

    @property
    def methods(self) -> list[str]:
        return ([DENSE] if self.dense is not None else []) + self.sparse_methods

    @property
    def dense_label(self) -> str:
        return DENSE if not self.dense_differs else f"{DENSE} ({self.dense_differs})"

    @property
    def sparsities(self) -> list[float]:
        return self._sparsities

    def stats(self, method: str, sparsity: float) -> dict | None:
        return self.dense if method == DENSE else self._cells.get((method, sparsity))


def by_key(frame: pd.DataFrame, keys: tuple[str, ...]) -> dict[tuple, pd.DataFrame]:
    """Frames of each value of `keys`, keyed as key_tuples writes them (missing values match)."""
    if frame.empty:
        return {}
    if not keys:
        return {(): frame}
    return {key_tuples(part.iloc[:1], keys)[0]: part for _, part in frame.groupby(list(keys), dropna=False, sort=False)}


def table_slices(comparison: Comparison) -> list[TableSlice]:
    table_keys, baseline_keys = comparison.grouping.table_keys, comparison.grouping.baseline_keys
    positions = [table_keys.index(key) for key in baseline_keys]

    def baseline_of(table_key: tuple) -> tuple:
        return tuple(table_key[position] for position in positions)

    dense_rows = comparison.baseline.to_dict("records")
    summary = comparison.summary
    is_dense = summary[ROW_KEY] == DENSE
    tables = {key: (part, part) for key, part in by_key(summary[~is_dense], table_keys).items()}
    covered = {baseline_of(key) for key in tables}
    # A dense baseline that no sparse table uses still gets a table of its own.
    for key, part in by_key(summary[is_dense], table_keys).items():
        if baseline_of(key) not in covered:
            tables[key] = (part, part.iloc[:0])
    slices = []
    for key, (part, sparse) in tables.items():
        row, differs = comparison.dense_of.get(baseline_of(key), (None, ""))
        first = part.iloc[0]
        slices.append(TableSlice(
            {name: first[name] for name in table_keys}, baseline_of(key), sparse,
            None if row is None else dense_rows[row], differs,
        ))
    return sorted(slices, key=lambda table: [str(value) for value in table.key.values()])


def mean_curves(curves: pd.DataFrame, runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Test accuracy and ITOP rate per epoch: mean and std over the seeds of each group."""
    located = curves.merge(runs[["run", *keys]], on="run")
    grouped = located.groupby([*keys, "epoch"], dropna=False, sort=True)
    means = grouped[["test_acc", "itop_rate"]].agg(["mean", "std"])
    means.columns = ["test_acc", "test_acc_std", "itop_rate", "itop_rate_std"]
    return means.reset_index()


def mean_mask_updates(updates: pd.DataFrame, runs: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Weights moved (dropped + grown) at each mask-changing step, mean over the seeds of each group,
    with the step's position in epochs: step s ends at (s + 1) / steps-per-epoch."""
    runs = runs.assign(_per_epoch=runs["steps"] / runs["epochs"] if "epochs" in runs else math.nan)
    located = updates.merge(runs[list(dict.fromkeys(["run", "_per_epoch", *keys]))], on="run")
    per_epoch = located["_per_epoch"]
    # Without the run's step count (older final.json), the update's epoch is as close as it gets.
    located["position"] = ((located["step"] + 1) / per_epoch).where(per_epoch > 0, located["epoch"])
    grouped = located.groupby([*keys, "step"], dropna=False, sort=True)
    return grouped[["position", "moved"]].mean().reset_index()


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
