"""Which runs are one experiment, and the training budget each table states.

The rule: runs are averaged together only if their configs agree on every setting but the
seed, and on what `--pool` names. Rather than averaging runs that differ, or refusing them,
the report splits them, by what the differing setting belongs to:

* setup (epochs, batch_size, optimizer.*, schedule.*, model.*, dataset.*, label_smoothing, ...):
  shared by a table's sparse runs and its dense baseline. A setup setting that differs among
  the runs of one dataset and model (dense runs included) becomes a table key: each value gets
  a table of its own, with the dense runs of that budget as its baseline (aggregate.py says
  what happens when a budget has none);
* allocation (distribution.*): differs only between sparse runs; also a table key;
* method options (method.*, sparse_init, backend, backend_layers): a setting that differs among
  the runs of one method splits its row, which names it: `gap (variant=parallel)` beside
  `gap (variant=cyclic)`, `rigl (backend=sparse)` beside `rigl (backend=masked)`.

Settings that do not change what a run computes (where results go, how progress shows: the
keys the run directory's hash leaves out) never split anything, and powerprop is already part
of the method's name. A setting missing from a run's config (written before the setting
existed, whose default keeps the old behaviour) is taken to be whatever the other runs have:
it splits nothing unless the runs that have it differ; a method option missing that way takes
the value conf/method/<method>.yaml gives it today (the default that kept the old behaviour).
A setting written as null is not missing: `null` is its value (CigL's `swa_start: null` is a
run without averaging). Every table's caption then states the
budget its runs share.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sparsebench.reporting.aggregate import (
    ROW_KEY, Grouping, TableSlice, by_key, format_value, key_scope, key_tuple_of,
)
from sparsebench.config_files import method_defaults
from sparsebench.reporting.load import DENSE, EXPLICIT_NULL, IDENTITY_COLUMNS, RESULT_COLUMNS
from sparsebench.results import NON_SEMANTIC_DATASET_KEYS, NON_SEMANTIC_KEYS

# Config columns that never tell two experiments apart.
NOT_SETTINGS = frozenset(
    (*NON_SEMANTIC_KEYS, *(f"dataset.{key}" for key in NON_SEMANTIC_DATASET_KEYS), "powerprop")
)


def settings(columns) -> list[str]:
    """The config columns that define an experiment, besides the identity columns."""
    return [
        column for column in columns
        if column not in RESULT_COLUMNS and column not in IDENTITY_COLUMNS and column not in NOT_SETTINGS
    ]


@dataclass(frozen=True)
class Identity:
    runs: pd.DataFrame  # the runs, with each method's label naming the options its rows split on
    grouping: Grouping  # the user's keys plus the setup and allocation keys runs differed in
    row_splits: dict  # method -> the option keys its rows are split on
    pooled: tuple[str, ...]  # keys averaged over as --pool asked


def identify(runs: pd.DataFrame, grouping: Grouping, pool: tuple[str, ...] = ()) -> Identity:
    identified = runs[runs[ROW_KEY].notna()]  # a config too broken to name its method has no settings
    candidates = [column for column in settings(runs.columns) if column not in grouping.keys and column not in pool]
    scopes = {column: key_scope(column) for column in candidates}
    split = _differing(identified, grouping.baseline_keys, [c for c in candidates if scopes[c] == "setup"])
    sparse = identified[identified[ROW_KEY] != DENSE]
    split += _differing(sparse, grouping.table_keys, [c for c in candidates if scopes[c] == "distribution"])
    options = [column for column in candidates if scopes[column] == "method"]
    if options and len(sparse):  # an option a run's config predates: the method's YAML default
        runs = _with_method_defaults(runs, options)
        identified = runs[runs[ROW_KEY].notna()]
        sparse = identified[identified[ROW_KEY] != DENSE]
    row_splits = {}
    if options and len(sparse):
        counts = sparse.groupby(ROW_KEY)[options].nunique()
        for method, row in counts.iterrows():
            differing = [column for column in options if row[column] > 1]
            if differing:
                row_splits[method] = differing
    labelled = runs
    if row_splits:
        labelled = runs.copy()
        for method, keys in row_splits.items():
            rows = labelled[ROW_KEY] == method
            labelled.loc[rows, ROW_KEY] = [
                f"{method} ({', '.join(f'{_short(key)}={format_value(value)}' for key, value in zip(keys, values))})"
                for values in zip(*(labelled.loc[rows, key].tolist() for key in keys))
            ]
    return Identity(labelled, Grouping((*grouping.keys, *split), tuple(split)), row_splits, tuple(pool))


def _with_method_defaults(runs: pd.DataFrame, options: list[str]) -> pd.DataFrame:
    """`runs` with each missing method option (a config written before the option existed) set
    to what conf/method/<method>.yaml gives it today, written null as EXPLICIT_NULL; options a
    method's file does not name (a plugin's) stay missing."""
    filled = runs.copy()
    for method in filled[ROW_KEY].dropna().unique():
        defaults = method_defaults(str(method).split("+")[0])  # gmp+powerprop2: gmp's options
        for column in options:
            key = column[len(f"{ROW_KEY}."):]
            if key not in defaults or isinstance(defaults[key], (dict, list)):
                continue
            value = EXPLICIT_NULL if defaults[key] is None else defaults[key]
            rows = (filled[ROW_KEY] == method) & filled[column].isna()
            if rows.any():
                filled[column] = filled[column].astype(object)
                filled.loc[rows, column] = value
    return filled


def _differing(frame: pd.DataFrame, by: tuple[str, ...], columns: list[str]) -> list[str]:
    """The columns that take two or more values (missing ones aside) within a group of `by`."""
    if frame.empty or not columns:
        return []
    counts = frame.groupby(list(by), dropna=False)[columns].nunique()
    return [column for column in columns if (counts[column] > 1).any()]


def _short(key: str) -> str:
    return key[len(f"{ROW_KEY}."):] if key.startswith(f"{ROW_KEY}.") else key


# ---------------------------------------------------------------------------- budgets
_NAMED = ("optimizer", "schedule", "model", "dataset")  # a name with options: `sgd (lr=0.1, ...)`


@dataclass(frozen=True)
class Budget:
    """The training budget of one table's runs: each setting's distinct values, formatted."""

    values: dict  # setting -> tuple of formatted values (one, unless pooled)
    pooled: dict  # --pool key -> its formatted values, where the table averages over two or more

    def _value(self, key: str) -> str | None:
        values = self.values.get(key)
        return " / ".join(values) if values else None

    def _named(self, name: str) -> str | None:
        value = self._value(name)
        if value is None:
            return None
        options = [
            f"{key[len(name) + 1:]}={self._value(key)}"
            for key in self.values if key.startswith(f"{name}.") and self._value(key) is not None
        ]
        return f"{value} ({', '.join(options)})" if options else value

    def long(self) -> str:
        """One sentence for a caption: every setting of the budget."""
        parts = []
        epochs, batch, steps = self._value("epochs"), self._value("batch_size"), self._value("steps")
        if epochs or batch:
            run = f"{epochs or '?'} epochs" + (f" of batch {batch}" if batch else "")
            parts.append(run + (f" ({steps} steps)" if steps else ""))
        labels = {"optimizer": "optimizer", "schedule": "LR schedule", "model": "model", "dataset": "dataset"}
        for name in _NAMED:
            named = self._named(name)
            if named:
                parts.append(f"{labels[name]} {named}")
            if name == "schedule" and self._value("label_smoothing") not in (None, "0"):
                parts.append(f"label smoothing {self._value('label_smoothing')}")
        text = f"Budget: {'; '.join(parts)}." if parts else "Budget: not recorded in the runs' configs."
        if self.pooled:
            averaged = "; ".join(f"{key} {' / '.join(values)}" for key, values in self.pooled.items())
            text += f" Averaged over differing {averaged}, as --pool asked."
        return text

    def short(self) -> str:
        """One line for a figure."""
        parts = []
        epochs, batch = self._value("epochs"), self._value("batch_size")
        if epochs or batch:
            parts.append(f"{epochs or '?'} epochs" + (f" × batch {batch}" if batch else ""))
        optimizer, lr = self._value("optimizer"), self._value("optimizer.lr")
        if optimizer:
            parts.append(optimizer + (f" lr {lr}" if lr else ""))
        if self._value("schedule"):
            parts.append(f"{self._value('schedule')} LR")
        parts += [value for value in (self._value("model"), self._value("dataset")) if value]
        return " · ".join(parts)


def budget_columns(columns) -> list[str]:
    present = set(columns)
    chosen = [key for key in ("epochs", "batch_size", "steps", "label_smoothing") if key in present]
    for name in _NAMED:
        chosen += [name] * (name in present) + sorted(
            column for column in present
            if column.startswith(f"{name}.") and column not in NOT_SETTINGS and column not in RESULT_COLUMNS
        )
    return chosen


def table_budgets(runs_ok: pd.DataFrame, tables: list[TableSlice], grouping: Grouping,
                  pooled: tuple[str, ...] = ()) -> list[Budget]:
    """The budget of each table, in the order of `tables`: its sparse runs' settings, else its dense runs'."""
    columns = budget_columns(runs_ok.columns)
    is_dense = runs_ok[ROW_KEY] == DENSE
    sparse_runs = by_key(runs_ok[~is_dense], grouping.table_keys)
    dense_runs = by_key(runs_ok[is_dense], grouping.baseline_keys)
    budgets = []
    for table in tables:
        part = sparse_runs.get(table.key_tuple)
        own_dense = dense_runs.get(key_tuple_of(table.key, grouping.baseline_keys))
        if part is None:
            part = own_dense
        elif own_dense is not None and not table.dense_differs:
            part = pd.concat([part, own_dense])
        if part is None:
            budgets.append(Budget({}, {}))
            continue
        values = {column: _distinct(part[column]) for column in columns}
        spread = {key: _distinct(part[key]) for key in pooled if key in part}
        budgets.append(Budget(
            {key: value for key, value in values.items() if value},
            {key: value for key, value in spread.items() if len(value) > 1},
        ))
    return budgets


def _distinct(column: pd.Series) -> tuple[str, ...]:
    return tuple(sorted({format_value(value) for value in column.dropna().unique().tolist()}, key=_natural))


def _natural(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)
