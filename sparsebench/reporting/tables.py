"""Cell grids of the paper tables: methods as rows, sparsities as columns, text per output format.

Every function here returns a DataFrame of finished strings; render.py only lays them out.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from sparsebench.reporting.aggregate import TableSlice

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
        str(value) if key in _SELF_EXPLAINING_KEYS else f"{key}={value}" for key, value in table.key.items()
    )


CellText = Callable[[str], str]  # method -> text of its cell in one column


def _grid(methods: list[str], columns: list[tuple[str, CellText]], style: Style) -> pd.DataFrame:
    rows = [[style.escape(method), *(cell(method) for _, cell in columns)] for method in methods]
    return pd.DataFrame(rows, columns=["Method", *(style.escape(header) for header, _ in columns)])


def _stat_column(table: TableSlice, sparsity: float, text: Callable[[dict], str], style: Style) -> CellText:
    def cell(method: str) -> str:
        stats = table.stats(method, sparsity)
        return style.missing if stats is None else text(stats)

    return cell


def mean_std(stats: dict, column: str, style: Style, modal_n: int, digits: int = 2, bold: bool = False) -> str:
    mean, std, n = stats[f"{column}_mean"], stats[f"{column}_std"], int(stats["n"])
    if pd.isna(mean):
        return style.missing
    text = f"{mean:.{digits}f}" + (f"{style.plus_minus}{std:.{digits}f}" if pd.notna(std) else "")
    if bold:
        text = style.bold.format(text)
    return text if n == modal_n else f"{text} (n={n})"


def accuracy_table(table: TableSlice, metric: str, modal_n: int, style: Style) -> pd.DataFrame:
    """Mean ± std of the compared accuracy, with a published-number column where the preset gives one."""
    def ours(stats: dict) -> str:
        return mean_std(stats, metric, style, modal_n, bold=stats.get("best_in_column", False))

    def paper(stats: dict) -> str:
        return _number(stats["paper_test_acc"], ".2f", style)

    columns: list[tuple[str, CellText]] = []
    for sparsity in table.sparsities:
        columns.append((sparsity_label(sparsity), _stat_column(table, sparsity, ours, style)))
        published = [table.stats(method, sparsity) for method in table.methods]
        if any(stats is not None and pd.notna(stats["paper_test_acc"]) for stats in published):
            columns.append((f"{sparsity_label(sparsity)} paper", _stat_column(table, sparsity, paper, style)))
    return _grid(table.methods, columns, style)


def delta_table(table: TableSlice, metric: str, style: Style) -> pd.DataFrame:
    """Difference of means to the dense baseline, in percentage points."""
    columns = [
        (sparsity_label(sparsity),
         _stat_column(table, sparsity, lambda stats: _number(stats[f"{metric}_delta_vs_dense"], "+.2f", style), style))
        for sparsity in table.sparsities
    ]
    return _grid(table.sparse_methods, columns, style)


def flops_table(table: TableSlice, style: Style) -> pd.DataFrame:
    """Training FLOPs over the dense FLOPs the run reports, and over the dense run's measured FLOPs."""
    def ratios(stats: dict) -> str:
        reported = _number(stats["flops_vs_dense_mean"], ".3g", style, style.times)
        if pd.isna(stats["dense_train_flops_mean"]):
            return reported
        return f"{reported} ({_number(stats['flops_vs_dense_run'], '.3g', style, style.times)})"

    columns = [(sparsity_label(sparsity), _stat_column(table, sparsity, ratios, style)) for sparsity in table.sparsities]
    return _grid(table.sparse_methods, columns, style)


def has_ece(table: TableSlice) -> bool:
    dense_ece = table.dense is not None and pd.notna(table.dense["ece_mean"])
    return dense_ece or table.sparse["ece_mean"].notna().any()


def ece_table(table: TableSlice, modal_n: int, style: Style) -> pd.DataFrame:
    columns = [
        (sparsity_label(sparsity),
         _stat_column(table, sparsity, lambda stats: mean_std(stats, "ece", style, modal_n, digits=3), style))
        for sparsity in table.sparsities
    ]
    return _grid(table.methods, columns, style)


def _number(value: float, spec: str, style: Style, unit: str = "") -> str:
    return style.missing if pd.isna(value) else f"{value:{spec}}{unit}"


def plain_table(frame: pd.DataFrame, style: Style) -> pd.DataFrame:
    """Any frame as escaped text: the health lists."""
    text = frame.astype(object).where(frame.notna(), style.missing).astype(str)
    text = text.map(style.escape)
    text.columns = [style.escape(str(column)) for column in frame.columns]
    return text
