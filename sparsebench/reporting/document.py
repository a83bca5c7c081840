"""The report as a list of blocks (headings, text, tables, figures) that every renderer walks.

Tables stay functions of the output style until rendering, so Markdown, LaTeX and HTML each
get properly escaped text from the same numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Union

import pandas as pd

from sparsebench.reporting.aggregate import Comparison, TableSlice
from sparsebench.reporting.health import Health
from sparsebench.reporting.identity import Budget, Identity
from sparsebench.reporting.load import DIVERGED, FAILED, INCOMPLETE, OK
from sparsebench.reporting.tables import (
    METRIC_LABELS, Style, accuracy_table, cost_table, delta_table, ece_table, has_ece, has_measured, plain_table,
    table_title,
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
    caption: str = ""  # what a paper's caption says: the title and the training budget

    @property
    def text(self) -> str:
        return self.caption or self.title


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
    budgets: list[Budget] | None = None,
    identity: Identity | None = None,
    searches: list[Block] = (),
) -> list[Block]:
    """Overview, then each table with its figures (`figures[i]` and `budgets[i]` belong to `tables[i]`),
    the searches (reporting/searches.py), then health."""
    budgets = budgets if budgets is not None else [Budget({}, {}) for _ in tables]
    categories = health_categories(health, comparison.modal_n)
    overview = _overview(source, runs, comparison, identity, categories)
    blocks: list[Block] = [Heading("sparsebench report", 1), overview]
    for index, (table, budget) in enumerate(zip(tables, budgets)):
        blocks += _result_blocks(table, comparison, budget)
        if figures is not None:
            caption = f"{budget.long()}{_dense_note(table)}"
            blocks += [replace(image, caption=f"{image.title}. {caption}") for image in figures[index]]
    return blocks + list(searches) + _health_blocks(categories)


def _overview(source: str, runs: pd.DataFrame, comparison: Comparison, identity: Identity | None,
              categories: list[HealthCategory]) -> Text:
    counts = runs["state"].value_counts()
    states = ", ".join(
        f"{counts.get(state, 0)} {word}"
        for state, word in ((OK, "completed"), (INCOMPLETE, "incomplete"), (FAILED, "failed"), (DIVERGED, "diverged"))
    )
    if comparison.summary.empty:
        return Text(f"{len(runs)} runs under {source}: {states}. No run finished healthy yet, so no tables: see Health.")
    return Text(
        f"{len(runs)} runs under {source}: {states}. Tables compare the {METRIC_LABELS[comparison.metric]}"
        f" as mean ± sample std over seeds, then in brackets [±h] the half-width of the 95 % confidence"
        f" interval of the mean (Student's t, n − 1 degrees of freedom) where a cell has two or more seeds;"
        f" n = {comparison.modal_n} per cell unless marked (n=…). {_identity_sentence(comparison, identity)}"
        f" {health_sentence(categories)}"
    )


def _identity_sentence(comparison: Comparison, identity: Identity | None) -> str:
    text = "Only runs whose configs agree on every setting but the seed are averaged together"
    pooled = identity.pooled if identity is not None else ()
    if pooled:
        text += f" (and on every setting but {', '.join(pooled)}, as --pool asked)"
    splits = []
    if comparison.grouping.split:
        splits.append(f"tables are split by {', '.join(comparison.grouping.split)}")
    for method, keys in (identity.row_splits.items() if identity is not None else ()):
        splits.append(f"{method} rows by {', '.join(keys)}")
    text += f": {'; '.join(splits)}." if splits else "."
    return text + " Each caption states its table's training budget."


@dataclass(frozen=True)
class HealthCategory:
    """One list of the Health section; `averaged` says whether its runs are in the means."""

    heading: str
    frame: pd.DataFrame
    caption: str
    averaged: bool
    summary: str  # how the overview names it


_PROBLEM_SECTIONS = (
    (INCOMPLETE, "Incomplete runs (no readable final.json: still running, killed, or still being copied)", "incomplete"),
    (FAILED, "Failed runs (unreadable, corrupt or invalid files)", "failed"),
    (DIVERGED, "Diverged runs", "diverged"),
)


def health_categories(health: Health, modal_n: int) -> list[HealthCategory]:
    """The Health section's lists, in order; the overview and the section both read them."""
    categories = []
    problems = health.problems
    for state, title, word in _PROBLEM_SECTIONS:
        listed = problems.loc[problems["state"] == state, ["run", "problem"]]
        if len(listed):
            categories.append(HealthCategory(
                title, listed, "Left out of every mean.", False, f"{len(listed)} {word} run{_s(len(listed))}",
            ))
    # Averaged lists: (rows, heading, caption, how the overview names them; {s} is the plural "s").
    averaged = (
        (health.suspicious, "Runs at chance level",
         "Averaged with the other seeds, since a terrible config is still a result, but flagged: the final "
         "test accuracy is at most min(1, chance/2) points above chance (100 / classes %), so the run "
         "learned nothing.", "run{s} at chance level"),
        (health.seed_gaps, "Groups missing seeds",
         f"Groups with fewer healthy runs than the usual {modal_n}: averaged over the seeds they have, and "
         "their cells are marked (n=…).", "group{s} missing seeds (marked n=…)"),
        (health.duplicate_seeds, "Seeds run more than once",
         "Averaged, each run counting as one seed; the last column says what tells them apart: a --pool key "
         "(pool fewer to split them), or nothing (the same config ran twice, e.g. a tree copied in twice).",
         "group{s} that ran a seed more than once"),
        (health.mixed_code, "Groups mixing code versions",
         "Averaged, but their runs were trained by different sparsebench code (final.json's provenance): "
         "relaunch the older ones with rerun=true if the change matters.", "group{s} mixing code versions"),
        (health.mixed_compute, "Groups mixing set-ups",
         "Averaged, but their runs ran on different set-ups (device, thread count, ranks, torch; final.json's "
         "provenance), which sum floats in another order: a seed's numbers there are another draw, not a "
         "reproduction. Relaunch with rerun=true on one set-up (e.g. OMP_NUM_THREADS=1) to compare like with like.",
         "group{s} mixing set-ups"),
        (health.bench_problems, "Unusable bench.json",
         "The runs' results are averaged; their measured speedups are left out.",
         "run{s} with an unusable bench.json (speedups left out)"),
    )
    for frame, heading, caption, summary in averaged:
        if len(frame):
            count = len(frame)
            categories.append(HealthCategory(heading, frame, caption, True, f"{count} {summary.format(s=_s(count))}"))
    return categories


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def health_sentence(categories: list[HealthCategory]) -> str:
    if not categories:
        return "Health lists nothing: every run completed healthy and every group has the usual seeds."
    left_out = [category.summary for category in categories if not category.averaged]
    flagged = [category.summary for category in categories if category.averaged]
    sentences = []
    if left_out:
        sentences.append(f"Left out of every mean and listed under Health: {_and(left_out)}.")
    if flagged:
        sentences.append(f"Averaged but flagged under Health: {_and(flagged)}.")
    return " ".join(sentences)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _result_blocks(table: TableSlice, comparison: Comparison, budget: Budget) -> list[Block]:
    title, metric, modal_n = table_title(table), comparison.metric, comparison.modal_n
    label = f"tab:{slug(title)}"
    context = f"{budget.long()}{_dense_note(table)}"
    blocks: list[Block] = [
        Heading(title, 2),
        Table(f"{_accuracy_caption(table, title, metric)} {context}",
              partial(accuracy_table, table, metric, modal_n), True, label),
    ]
    if table.sparse_methods and table.dense is None:
        blocks.append(Text("No healthy dense run of this dataset and model at this budget (nor a single other "
                           "budget to fall back on): no deltas to dense."))
    elif table.sparse_methods:
        blocks.append(Table(
            f"{title}: {metric} minus the dense baseline's, in percentage points (difference of means). {context}",
            partial(delta_table, table, metric), True, f"{label}-delta",
        ))
    if table.sparse_methods or table.dense is not None:
        blocks.append(Table(f"{_cost_caption(table, title)} {context}", partial(cost_table, table), True,
                            f"{label}-cost"))
    if has_ece(table):
        blocks.append(Table(
            f"{title}: expected calibration error, mean ± std over seeds. {context}",
            partial(ece_table, table, modal_n), True, f"{label}-ece",
        ))
    return blocks


def _dense_note(table: TableSlice) -> str:
    if not table.dense_differs or table.dense is None:
        return ""
    return (f" No dense run has this budget: the dense row is the dense runs of the same dataset and model with "
            f"{table.dense_differs}, so deltas and ratios to dense compare across budgets.")


def _accuracy_caption(table: TableSlice, title: str, metric: str) -> str:
    caption = f"{title}: {METRIC_LABELS[metric]}, mean ± std over seeds [± half-width of the 95 % CI of the mean]."
    if len(table.sparse_methods) > 1:
        caption += " Bold: best sparse method at each sparsity, among cells of two or more seeds."
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


def _cost_caption(table: TableSlice, title: str) -> str:
    caption = (
        f"{title}: cost, mean over seeds. Train FLOPs: total training FLOPs, comparable across tables and "
        "budgets. Train FLOPs / dense: over the FLOPs of a dense model on the same schedule, as each run "
        "reports (train_flops / train_flops_dense)"
    )
    if table.dense is not None:
        caption += "; in parentheses, over the measured train_flops of the dense row's runs"
    caption += "."
    if has_measured(table, "inference_flops_vs_dense_mean"):
        caption += (" Inference FLOPs / dense: forward FLOPs of one example at the final masks over the dense "
                    "model's (final.json's inference_flops, else bench.json's flops.ratio).")
    if has_measured(table, "inference_speedup_mean") or has_measured(table, "train_step_speedup_mean"):
        caption += (" Measured speedups (sparsebench bench, bench.json beside each run): dense time over sparse "
                    "time on the machine that ran the bench, above 1× is faster; inference: the best format at "
                    "the largest batch measured; train step: a sparse training backend if one was measured, "
                    "else the masked step the trainer takes.")
    caption += " Wall-clock: training time"
    if table.dense is not None:
        caption += ", in parentheses over the dense row's"
    return caption + "."


def _health_blocks(categories: list[HealthCategory]) -> list[Block]:
    blocks: list[Block] = [Heading("Health", 2)]
    if not categories:
        return blocks + [Text("Every run completed and every group has the same number of seeds: nothing left out.")]
    for category in categories:
        blocks += [
            Heading(f"{category.heading}: {len(category.frame)}", 3),
            Table(category.caption, partial(plain_table, category.frame), False),
        ]
    return blocks
