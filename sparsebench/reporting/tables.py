"""Cell grids of the paper tables: methods as rows, sparsities as columns, text per output format.

Every function here returns a DataFrame of finished strings; render.py only lays them out.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from sparsebench.reporting.aggregate import TableSlice, format_value
from sparsebench.reporting.load import DENSE

METRIC_LABELS = {
    "test_acc": "final test accuracy (%)",
    "best_test_acc": "best test accuracy over all evaluations (%; picked on the test set, so optimistic)",
}
# Table keys printed bare in titles; any other key is printed as key=value.
_SELF_EXPLAINING_KEYS = ("dataset", "model", "distribution")


@dataclass(frozen=True)
class Style:
    """How one output format writes the few non-ASCII bits of a cell, and escapes plain text."""

    plus_minus: str
    times: str
    missing: str
    bold: str  # format string around a cell's text
    escape: Callable[[str], str]


_LATEX_SPECIALS = str.maketrans({
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    # Spelled out so that the .tex compiles with any engine and input encoding.
    "±": r"$\pm$", "×": r"$\times$", "·": r"$\cdot$", "—": "---", "…": r"\ldots{}",
})

MARKDOWN = Style(" ± ", "×", "—", "**{}**", lambda text: text.replace("|", r"\|"))
HTML = Style(" ± ", "×", "—", "<b>{}</b>", html.escape)
LATEX = Style(r" $\pm$ ", r"$\times$", "--", r"\textbf{{{}}}", lambda text: text.translate(_LATEX_SPECIALS))


def sparsity_label(sparsity: float) -> str:
    return f"{sparsity * 100:g}%"


def table_title(table: TableSlice) -> str:
    return " · ".join(
        str(value) if key in _SELF_EXPLAINING_KEYS else f"{key}={format_value(value)}" for key, value in table.key.items()
    )


CellText = Callable[[str], str]  # method -> text of its cell in one column


def _grid(table: TableSlice, methods: list[str], columns: list[tuple[str, CellText]], style: Style) -> pd.DataFrame:
    rows = [
        [style.escape(table.dense_label if method == DENSE else method), *(cell(method) for _, cell in columns)]
        for method in methods
    ]
    return pd.DataFrame(rows, columns=["Method", *(style.escape(header) for header, _ in columns)])


def _stat_column(table: TableSlice, sparsity: float, text: Callable[[dict], str], style: Style) -> CellText:
    def cell(method: str) -> str:
        stats = table.stats(method, sparsity)
        return style.missing if stats is None else text(stats)

    return cell


def mean_std(stats: dict, column: str, style: Style, modal_n: int, digits: int = 2, bold: bool = False,
             interval: bool = False) -> str:
    """`mean ± std`, then `[±h]` (95 % CI half-width of the mean) if asked and n >= 2, then `(n=…)` if unusual."""
    mean, std, n = stats[f"{column}_mean"], stats[f"{column}_std"], int(stats["n"])
    if pd.isna(mean):
        return style.missing
    text = f"{mean:.{digits}f}" + (f"{style.plus_minus}{std:.{digits}f}" if pd.notna(std) else "")
    if bold:
        text = style.bold.format(text)
    half_width = stats.get(f"{column}_ci95") if interval else None
    if half_width is not None and pd.notna(half_width):
        text += f" [{style.plus_minus.strip()}{half_width:.{digits}f}]"
    return text if n == modal_n else f"{text} (n={n})"


def accuracy_table(table: TableSlice, metric: str, modal_n: int, style: Style) -> pd.DataFrame:
    """Mean ± std [± CI] of the compared accuracy, with a published-number column where one is known."""
    def ours(stats: dict) -> str:
        return mean_std(stats, metric, style, modal_n, bold=stats.get("best_in_column", False), interval=True)

    def paper(stats: dict) -> str:
        return _number(stats["paper_test_acc"], ".2f", style)

    columns: list[tuple[str, CellText]] = []
    for sparsity in table.sparsities:
        columns.append((sparsity_label(sparsity), _stat_column(table, sparsity, ours, style)))
        published = [table.stats(method, sparsity) for method in table.methods]
        if any(stats is not None and pd.notna(stats["paper_test_acc"]) for stats in published):
            columns.append((f"{sparsity_label(sparsity)} paper", _stat_column(table, sparsity, paper, style)))
    return _grid(table, table.methods, columns, style)


def delta_table(table: TableSlice, metric: str, style: Style) -> pd.DataFrame:
    """Difference of means to the dense baseline, in percentage points."""
    columns = [
        (sparsity_label(sparsity),
         _stat_column(table, sparsity, lambda stats: _number(stats[f"{metric}_delta_vs_dense"], "+.2f", style), style))
        for sparsity in table.sparsities
    ]
    return _grid(table, table.sparse_methods, columns, style)


def _cost_rows(table: TableSlice) -> list[tuple[str, float, dict]]:
    """(method, sparsity, stats) of the cost table: the dense row, then each sparsity's methods."""
    rows = [(DENSE, 0.0, table.dense)] if table.dense is not None else []
    for sparsity in table.sparsities:
        rows += [
            (method, sparsity, stats) for method in table.sparse_methods
            if (stats := table.stats(method, sparsity)) is not None
        ]
    return rows


def has_measured(table: TableSlice, column: str) -> bool:
    return table.has_values(column)


def cost_table(table: TableSlice, style: Style) -> pd.DataFrame:
    """What each cell costs: training FLOPs (absolute and relative to dense), inference FLOPs and
    measured speedups where the runs have them, and wall-clock time."""
    times = style.times

    def ratio(value) -> str:
        return _number(value, ".3g", style, times)

    def train_ratio(stats: dict) -> str:
        reported = ratio(stats["flops_vs_dense_mean"])
        measured = stats.get("flops_vs_dense_run", math.nan)
        return reported if pd.isna(measured) else f"{reported} ({ratio(measured)})"

    def speedup(kind: str) -> Callable[[dict], str]:
        def text(stats: dict) -> str:
            value, setting = stats[f"{kind}_speedup_mean"], stats.get(f"{kind}_{_SETTING[kind]}")
            number = _number(value, ".2f", style, times)
            if pd.isna(value):
                return number
            notes = [style.escape(setting)] if isinstance(setting, str) else []
            measured, runs = int(stats.get(f"{kind}_speedup_n", 0)), int(stats["n"])
            if measured < runs:
                notes.append(f"{measured} of {runs} runs")
            return f"{number} ({'; '.join(notes)})" if notes else number

        return text

    def wall(stats: dict) -> str:
        text = _duration(stats["wall_time_s_mean"], style)
        relative = stats.get("wall_time_vs_dense_run", math.nan)
        return text if pd.isna(relative) else f"{text} ({ratio(relative)})"

    columns: list[tuple[str, Callable[[dict], str]]] = [
        ("Train FLOPs", lambda stats: _number(stats["train_flops_mean"], ".3g", style)),
        ("Train FLOPs / dense", train_ratio),
    ]
    if has_measured(table, "inference_flops_vs_dense_mean"):
        columns.append(("Inference FLOPs / dense", lambda stats: ratio(stats["inference_flops_vs_dense_mean"])))
    if has_measured(table, "inference_speedup_mean"):
        columns.append(("Inference speedup (measured)", speedup("inference")))
    if has_measured(table, "train_step_speedup_mean"):
        columns.append(("Train-step speedup (measured)", speedup("train_step")))
    columns.append(("Wall-clock", wall))
    rows = [
        [style.escape(table.dense_label if method == DENSE else method), sparsity_label(sparsity),
         *(text(stats) for _, text in columns)]
        for method, sparsity, stats in _cost_rows(table)
    ]
    return pd.DataFrame(rows, columns=["Method", "Sparsity", *(style.escape(header) for header, _ in columns)])


_SETTING = {"inference": "speedup_setting", "train_step": "setting"}


def _duration(seconds: float, style: Style) -> str:
    if pd.isna(seconds):
        return style.missing
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def has_ece(table: TableSlice) -> bool:
    return table.has_values("ece_mean")


def ece_table(table: TableSlice, modal_n: int, style: Style) -> pd.DataFrame:
    columns = [
        (sparsity_label(sparsity),
         _stat_column(table, sparsity, lambda stats: mean_std(stats, "ece", style, modal_n, digits=3), style))
        for sparsity in table.sparsities
    ]
    return _grid(table, table.methods, columns, style)


def _number(value: float, spec: str, style: Style, unit: str = "") -> str:
    return style.missing if pd.isna(value) else f"{value:{spec}}{unit}"


def plain_table(frame: pd.DataFrame, style: Style) -> pd.DataFrame:
    """Any frame as escaped text: the health lists."""
    text = frame.astype(object).where(frame.notna(), style.missing).astype(str)
    text = text.map(style.escape)
    text.columns = [style.escape(str(column)) for column in frame.columns]
    return text
