"""The report as a list of blocks (headings, text, tables, figures) that every renderer walks.

Tables stay functions of the output style until rendering, so Markdown, LaTeX and HTML each
get properly escaped text from the same numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Union

import pandas as pd

from sparsebench.reporting.aggregate import Comparison, TableSlice
from sparsebench.reporting.health import Health
from sparsebench.reporting.load import DIVERGED, FAILED, INCOMPLETE, OK
from sparsebench.reporting.tables import (
    METRIC_LABELS, Style, accuracy_table, delta_table, ece_table, flops_table, has_ece, plain_table, table_title,
)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    caption: str
    cells: Callable[[Style], pd.DataFrame]
    # A results table holds numbers (right-aligned) and goes to report.tex; otherwise it is a
    # text list, such as the health section, which has no place in a paper.
    results: bool
    label: str = ""


@dataclass(frozen=True)
class Image:
    title: str
    filename: str  # relative to the report directory
    png: bytes


Block = Union[Heading, Text, Table, Image]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._=]+", "-", text.lower()).strip("-")


def build_document(
    source: str,
    runs: pd.DataFrame,
    comparison: Comparison,
    tables: list[TableSlice],
    health: Health,
    figures: list[list[Image]] | None,
) -> list[Block]:
    """Overview, then each table with its figures (`figures[i]` belongs to `tables[i]`), then health."""
    overview = _overview(source, runs, comparison, len(health.suspicious))
    blocks: list[Block] = [Heading("sparsebench report", 1), overview]
    for index, table in enumerate(tables):
        blocks += _result_blocks(table, comparison)
        if figures is not None:
            blocks += figures[index]
    return blocks + _health_blocks(health, comparison.modal_n)


def _overview(source: str, runs: pd.DataFrame, comparison: Comparison, at_chance: int) -> Text:
    counts = runs["state"].value_counts()
    states = ", ".join(
        f"{counts.get(state, 0)} {word}"
        for state, word in ((OK, "completed"), (INCOMPLETE, "incomplete"), (FAILED, "failed"), (DIVERGED, "diverged"))
    )
    if comparison.summary.empty:
        return Text(f"{len(runs)} runs under {source}: {states}. No run finished healthy yet, so no tables: see Health.")
    left_out = " Runs listed under Health are left out of every mean"
    if at_chance == 1:
        left_out += ", except the run at chance level, which is averaged but flagged."
    elif at_chance:
        left_out += f", except the {at_chance} runs at chance level, which are averaged but flagged."
    else:
        left_out += "."
    return Text(
        f"{len(runs)} runs under {source}: {states}. Tables compare the {METRIC_LABELS[comparison.metric]}"
        f" as mean ± sample std over seeds, n = {comparison.modal_n} per cell unless marked.{left_out}"
    )


def _result_blocks(table: TableSlice, comparison: Comparison) -> list[Block]:
    title, metric, modal_n = table_title(table), comparison.metric, comparison.modal_n
    label = f"tab:{slug(title)}"
    blocks: list[Block] = [
        Heading(title, 2),
        Table(_accuracy_caption(table, title, metric), partial(accuracy_table, table, metric, modal_n), True, label),
    ]
    if table.sparse_methods and table.dense is None:
        blocks.append(Text("No healthy dense run of this dataset and model: no deltas to dense."))
    elif table.sparse_methods:
        blocks.append(Table(
            f"{title}: {metric} minus the dense baseline's, in percentage points (difference of means).",
            partial(delta_table, table, metric), True, f"{label}-delta",
        ))
    if table.sparse_methods:
        blocks.append(Table(_flops_caption(table, title), partial(flops_table, table), True, f"{label}-flops"))
    if has_ece(table):
        blocks.append(Table(
            f"{title}: expected calibration error, mean ± std over seeds.",
            partial(ece_table, table, modal_n), True, f"{label}-ece",
        ))
    return blocks


def _accuracy_caption(table: TableSlice, title: str, metric: str) -> str:
    caption = f"{title}: {METRIC_LABELS[metric]}, mean ± std over seeds."
    if len(table.sparse_methods) > 1:
        caption += " Bold: best sparse method at each sparsity."
    if table.dense is not None and table.sparse_methods:
        caption += " The dense row repeats the same dense runs in every column."
    sources = _paper_sources(table)
    if sources:
        caption += f" Columns marked paper: published test accuracy from {'; '.join(sources)}."
    return caption


def _paper_sources(table: TableSlice) -> list[str]:
    sources = list(table.sparse["paper_source"].dropna())
    if table.dense is not None and pd.notna(table.dense["paper_source"]):
        sources.append(table.dense["paper_source"])
    return sorted(set(map(str, sources)))


def _flops_caption(table: TableSlice, title: str) -> str:
    caption = f"{title}: training FLOPs relative to dense, as train_flops / train_flops_dense reported by each run"
    if table.dense is not None:
        caption += "; in parentheses, relative to the dense run's measured train_flops"
    return caption + "."


_PROBLEM_SECTIONS = (
    (INCOMPLETE, "Incomplete runs (no readable final.json: still running, killed, or still being copied)"),
    (FAILED, "Failed runs (unreadable, corrupt or invalid files)"),
    (DIVERGED, "Diverged runs"),
)


def _health_blocks(health: Health, modal_n: int) -> list[Block]:
    blocks: list[Block] = [Heading("Health", 2)]
    if health.clean:
        return blocks + [Text("Every run completed and every group has the same number of seeds: nothing left out.")]
    problems = health.problems
    for state, title in _PROBLEM_SECTIONS:
        listed = problems.loc[problems["state"] == state, ["run", "problem"]]
        if len(listed):
            blocks += [
                Heading(f"{title}: {len(listed)}", 3),
                Table("Left out of every mean.", partial(plain_table, listed), False),
            ]
    if len(health.suspicious):
        blocks += [
            Heading(f"Runs at chance level: {len(health.suspicious)}", 3),
            Table(
                "Averaged with the other seeds, since a terrible config is still a result, but flagged: the final "
                "test accuracy is at most min(1, chance/2) points above chance (100 / classes %), so the run "
                "learned nothing.",
                partial(plain_table, health.suspicious), False,
            ),
        ]
    if len(health.seed_gaps):
        blocks += [
            Heading(f"Groups missing seeds: {len(health.seed_gaps)}", 3),
            Table(
                f"Groups with fewer healthy runs than the usual {modal_n}; their cells are marked (n=…).",
                partial(plain_table, health.seed_gaps), False,
            ),
        ]
    if len(health.duplicate_seeds):
        blocks += [
            Heading(f"Seeds run more than once: {len(health.duplicate_seeds)}", 3),
            Table(
                "These runs are all averaged; add the key they differ in to --group-by to split them.",
                partial(plain_table, health.duplicate_seeds), False,
            ),
        ]
    return blocks
