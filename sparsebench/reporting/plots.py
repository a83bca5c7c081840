"""The figures of each result table, drawn on matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` rather than pyplot: no global state, no GUI
backend to select, nothing to close. Every figure's title states the table's training budget,
wrapped to the figure's width, and every margin is sized from the text it holds, so nothing is
clipped. Drawing costs a few tenths of a second a figure, so the tables' figures are drawn in
worker processes (see parallel.py) from small, picklable inputs.
"""
from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from sparsebench.reporting.aggregate import (
    COLUMN_KEY, ROW_KEY, Comparison, TableSlice, by_key, key_tuple_of, mean_curves, mean_layer_densities, mean_mask_updates,
)
from sparsebench.reporting.document import Image, slug
from sparsebench.reporting.identity import Budget
from sparsebench.reporting.load import DENSE, load_curves, load_mask_updates
from sparsebench.reporting.parallel import parallel_map
from sparsebench.reporting.tables import sparsity_label, table_title

_PANEL_COLUMNS = 3
_MAX_LABELLED_LAYERS = 60  # beyond this, every k-th layer is named so that names never overlap
_TABLES_PER_WORKER = 4
_BAND_ALPHA = 0.18
_MARKERS = "os^Dv<>p"


@dataclass(frozen=True)
class FigureInputs:
    """Everything the figures of one table need, small enough to send to a worker process."""

    title: str
    stem: str
    metric: str
    sparsities: list[float]
    points: pd.DataFrame  # this table's summary rows of sparse methods
    dense: dict | None  # the dense baseline's summary row
    dense_label: str
    curves: pd.DataFrame | None  # mean and std of test accuracy and ITOP rate per method, sparsity and epoch
    dense_curve: pd.DataFrame | None
    densities: pd.DataFrame | None  # mean final density per method, sparsity and layer
    mask_updates: pd.DataFrame | None  # mean weights moved per method, sparsity and mask-changing step
    colors: dict
    budget: str = ""  # one line: the training budget


def table_figures(
    root: Path, runs_ok: pd.DataFrame, comparison: Comparison, tables: list[TableSlice],
    budgets: list[Budget] | None = None, jobs: int = 1,
) -> list[list[Image]]:
    """The figures of each table, in the order of `tables`."""
    grouping = comparison.grouping
    is_dense = runs_ok[ROW_KEY] == DENSE
    # Curves and mask updates are read only here: a --no-plots report never opens them.
    runs = list(runs_ok["run"])
    curves = load_curves(root, runs)
    updates = load_mask_updates(root, list(runs_ok.loc[~is_dense, "run"]))
    sparse_curves = by_key(mean_curves(curves, runs_ok[~is_dense], grouping.keys), grouping.table_keys)
    dense_curves = by_key(mean_curves(curves, runs_ok[is_dense], grouping.baseline_keys), grouping.baseline_keys)
    densities = by_key(mean_layer_densities(runs_ok[~is_dense], grouping.keys), grouping.table_keys)
    moved = by_key(mean_mask_updates(updates, runs_ok[~is_dense], grouping.keys), grouping.table_keys)
    colors = _method_colors(sorted(runs_ok.loc[~is_dense, ROW_KEY].unique()))
    budgets = budgets if budgets is not None else [Budget({}, {}) for _ in tables]
    inputs = []
    for table, budget in zip(tables, budgets):
        inputs.append(FigureInputs(
            title=table_title(table), stem=slug(table_title(table)), metric=comparison.metric,
            sparsities=table.sparsities, points=table.sparse, dense=table.dense, dense_label=table.dense_label,
            curves=sparse_curves.get(table.key_tuple), dense_curve=_dense_curve(table, comparison, dense_curves),
            densities=densities.get(table.key_tuple), mask_updates=moved.get(table.key_tuple), colors=colors,
            budget=budget.short(),
        ))
    return parallel_map(draw_figures, inputs, _TABLES_PER_WORKER, jobs)


def _dense_curve(table: TableSlice, comparison: Comparison, dense_curves: dict) -> pd.DataFrame | None:
    """The curve of the table's dense row: its own budget's dense runs, or the fallback budget's."""
    if table.dense is None:
        return None
    return dense_curves.get(key_tuple_of(table.dense, comparison.grouping.baseline_keys))


def draw_figures(inputs: FigureInputs) -> list[Image]:
    images = []
    if len(inputs.points):
        images.append(Image(f"{inputs.title}: accuracy vs sparsity", f"plots/{inputs.stem}-accuracy.png",
                            _png(accuracy_figure(inputs))))
    if inputs.curves is not None:
        images.append(Image(f"{inputs.title}: test accuracy during training", f"plots/{inputs.stem}-curves.png",
                            _png(curves_figure(inputs))))
    if _has_mask_data(inputs):
        images.append(Image(f"{inputs.title}: mask exploration (ITOP rate) and mask updates",
                            f"plots/{inputs.stem}-masks.png", _png(masks_figure(inputs))))
    if inputs.densities is not None:
        images.append(Image(f"{inputs.title}: final density of each layer", f"plots/{inputs.stem}-layers.png",
                            _png(layers_figure(inputs))))
    return images


# Layout is computed, not searched: matplotlib's constrained layout would fit every label but
# draws each figure twice to measure it, which made the figures half again as slow. Text widths
# are estimated from the character count (DejaVu Sans averages ~0.55-0.6 em a character; 0.62
# errs on the wide side), and every margin is sized from the longest text it must hold.
_CHAR_EM = 0.62
_TITLE_POINTS = 10.5
_SMALL_POINTS = 8.33  # fontsize="small" at matplotlib's default 10 pt


def _text_inches(texts, points: float) -> float:
    return max((len(line) for text in texts for line in str(text).split("\n")), default=0) * _CHAR_EM * points / 72


def _title_lines(text: str, budget: str, width: float) -> list[str]:
    """The title and the budget line, wrapped to the figure's width: a longer line would be clipped."""
    characters = max(24, int((width - 0.3) * 72 / (_CHAR_EM * _TITLE_POINTS)))
    return textwrap.wrap(text, characters) + textwrap.wrap(budget, characters)


def _title_height(lines: list[str]) -> float:
    return len(lines) * _TITLE_POINTS * 1.3 / 72 + 0.15


def _put_title(figure: Figure, lines: list[str]) -> None:
    figure.suptitle("\n".join(lines), fontsize=_TITLE_POINTS, y=1 - 0.08 / figure.get_figheight(), va="top")


_Y_LABELS = {"test_acc": "final test accuracy (%)", "best_test_acc": "best test accuracy (%)"}


def accuracy_figure(inputs: FigureInputs) -> Figure:
    mean, std = f"{inputs.metric}_mean", f"{inputs.metric}_std"
    methods = sorted(inputs.points[ROW_KEY].unique())
    published = sorted(inputs.points.loc[inputs.points["paper_test_acc"].notna(), ROW_KEY].unique())
    labels = [*methods, *(f"{method} (paper)" for method in published)]
    if inputs.dense is not None:
        labels.append(inputs.dense_label)
    legend_width = 0.75 + _text_inches(labels, _SMALL_POINTS)
    left, plot_width, plot_height, bottom = 0.85, 6.0, max(3.8, 0.2 * len(labels) + 0.3), 0.65
    width = left + plot_width + 0.15 + legend_width
    lines = _title_lines(f"{inputs.title}: accuracy vs sparsity, mean ± std over seeds", inputs.budget, width)
    top = _title_height(lines) + 0.1
    height = top + plot_height + bottom
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=left / width, right=(left + plot_width) / width, top=1 - top / height,
                           bottom=bottom / height)
    axes = figure.add_subplot()
    # Sweeps crowd near 100% (90, 95, 98, 99): evenly spaced columns read better than a linear axis.
    position = {sparsity: index for index, sparsity in enumerate(inputs.sparsities)}
    for method, rows in inputs.points.groupby(ROW_KEY):
        color = inputs.colors[method]
        x = rows[COLUMN_KEY].map(position)
        axes.errorbar(x, rows[mean], yerr=rows[std].fillna(0), marker="o", capsize=3, color=color, label=method)
        paper = rows[rows["paper_test_acc"].notna()]
        if len(paper):
            axes.scatter(paper[COLUMN_KEY].map(position), paper["paper_test_acc"], marker="x", s=60,
                         color=color, label=f"{method} (paper)")
    if inputs.dense is not None:
        dense_mean, dense_std = inputs.dense[mean], inputs.dense[std]
        axes.axhline(dense_mean, color="black", linestyle="--", label=inputs.dense_label)
        if pd.notna(dense_std):
            axes.axhspan(dense_mean - dense_std, dense_mean + dense_std, color="black", alpha=0.08)
    axes.set_xticks(list(position.values()), [sparsity_label(sparsity) for sparsity in position])
    axes.set(xlabel="sparsity", ylabel=_Y_LABELS[inputs.metric])
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    _put_title(figure, lines)
    return figure


_PANEL_WIDTH = 3.6
_MIN_PANEL_FIGURE_WIDTH = 7.0
_X_LABEL_HEIGHT = 0.55  # tick labels and the axis label under a panel
_PANEL_TITLE_HEIGHT = 0.3


def _panel_figure(count: int, title: str, budget: str, legend_labels: list[str], rows_per_panel: int = 1,
                  panel_height: float = 2.6, left: float = 0.75) -> tuple[Figure, np.ndarray]:
    """A grid of `count` panels, three to a row, each `rows_per_panel` axes tall (stacked tight,
    sharing x), with room for a wrapped title above and a legend of `legend_labels` below. Axes
    at the same height in their panels share the y axis, labelled on the left only: fewer labels
    to draw, and panels that compare at a glance. Returns the axes as (panel rows x rows_per_panel,
    columns); axes of missing panels are hidden."""
    columns, rows = min(_PANEL_COLUMNS, count), math.ceil(count / _PANEL_COLUMNS)
    gap_width, inner_gap = 0.3, 0.15
    # One or two panels get wider, so that the title and the legend need not wrap into a column.
    panel_width = max(_PANEL_WIDTH, (_MIN_PANEL_FIGURE_WIDTH - left - 0.25 - (columns - 1) * gap_width) / columns)
    width = left + columns * panel_width + (columns - 1) * gap_width + 0.25
    entry = 0.75 + _text_inches(legend_labels, _SMALL_POINTS)
    legend_columns = max(1, min(len(legend_labels), int((width - 0.3) / entry)))
    legend_height = math.ceil(len(legend_labels) / legend_columns) * 0.2 + 0.1 if legend_labels else 0.0
    lines = _title_lines(title, budget, width)
    top = _title_height(lines) + _PANEL_TITLE_HEIGHT
    # Grid rows: each panel's axes, then (between panel rows) a spacer for tick labels and titles.
    spacer = _X_LABEL_HEIGHT + _PANEL_TITLE_HEIGHT - 2 * inner_gap
    heights, axes_rows = [], []
    for row in range(rows):
        if row:
            heights.append(spacer)
        for _ in range(rows_per_panel):
            axes_rows.append(len(heights))
            heights.append(panel_height)
    bottom = _X_LABEL_HEIGHT + legend_height + 0.1
    height = top + sum(heights) + (len(heights) - 1) * inner_gap + bottom
    figure = Figure(figsize=(width, height))
    spec = figure.add_gridspec(
        len(heights), columns, height_ratios=heights, left=left / width, right=1 - 0.25 / width,
        top=1 - top / height, bottom=bottom / height, wspace=gap_width / panel_width,
        hspace=inner_gap / (sum(heights) / len(heights)),
    )
    grid = np.full((len(axes_rows), columns), None, dtype=object)
    for index, grid_row in enumerate(axes_rows):
        for column in range(columns):
            if (index // rows_per_panel) * _PANEL_COLUMNS + column >= count:
                continue  # no panel there: an axes costs ~20 ms to build even hidden
            first_x = grid[0, 0] if index or column else None
            first_y = grid[index % rows_per_panel, 0] if index >= rows_per_panel or column else None
            axes = figure.add_subplot(spec[grid_row, column], sharex=first_x, sharey=first_y)
            axes.tick_params(which="both", labelleft=column == 0,
                             labelbottom=index % rows_per_panel == rows_per_panel - 1)
            grid[index, column] = axes
    figure._sparsebench_legend = legend_columns  # read by _figure_legend
    _put_title(figure, lines)
    return figure, grid


def _figure_legend(figure: Figure, axes_list, extra: list[Line2D] = ()) -> None:
    legend = {}  # panels show different methods: one legend with every line, first handle of each
    for axes in axes_list:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    for handle in extra:
        legend.setdefault(handle.get_label(), handle)
    if legend:
        # Below the panels, where it takes no width from the title and never covers a curve.
        figure.legend(list(legend.values()), list(legend), fontsize="small", loc="lower center",
                      bbox_to_anchor=(0.5, 0.05 / figure.get_figheight()), ncols=figure._sparsebench_legend,
                      frameon=False)


def curves_figure(inputs: FigureInputs) -> Figure:
    """One panel per sparsity: each method's mean curve with a ±std band against the dense one;
    ticks along the bottom mark the method's mask updates."""
    curves, updates = inputs.curves, inputs.mask_updates
    marked = updates is not None and len(updates) > 0
    labels = ([inputs.dense_label] if inputs.dense_curve is not None else []) + sorted(curves[ROW_KEY].unique())
    count = len(inputs.sparsities)
    figure, grid = _panel_figure(count, f"{inputs.title}: test accuracy during training, mean ± std over seeds",
                                 inputs.budget, labels + ["mask update"] * marked)
    panels = grid.ravel()
    for axes, sparsity in zip(panels, inputs.sparsities):
        bands: list = []
        if inputs.dense_curve is not None:
            _band(axes, inputs.dense_curve, "test_acc", "black", inputs.dense_label, bands, linestyle="--")
        for index, (method, line) in enumerate(curves[curves[COLUMN_KEY] == sparsity].groupby(ROW_KEY)):
            _band(axes, line, "test_acc", inputs.colors[method], method, bands)
            if marked:
                steps = updates[(updates[COLUMN_KEY] == sparsity) & (updates[ROW_KEY] == method)]
                if len(steps):
                    # In axes coordinates along y, one row of ticks per method, so they never hide a curve.
                    axes.plot(steps["position"], np.full(len(steps), 0.03 + 0.045 * index), linestyle="none",
                              marker="|", markersize=7, color=inputs.colors[method],
                              transform=axes.get_xaxis_transform(), clip_on=False)
        _draw_bands(axes, bands)
        axes.set_title(f"sparsity {sparsity_label(sparsity)}", fontsize="medium")
        axes.set_xlabel("epoch", fontsize="small")
    for axes in grid[:, 0]:
        axes.set_ylabel("test accuracy (%)", fontsize="small")
    extra = [Line2D([], [], linestyle="none", marker="|", markersize=7, color="grey", label="mask update")] if marked else []
    _figure_legend(figure, panels[:count], extra)
    return figure


def _band(axes, line: pd.DataFrame, column: str, color, label: str, bands: list, linestyle: str = "-") -> None:
    """The mean curve of `column`, and its ±std band added to `bands` (drawn by _draw_bands)."""
    line = line[line[column].notna()]
    if line.empty:
        return
    x, mean, std = (line[name].to_numpy(dtype=float) for name in ("epoch", column, f"{column}_std"))
    axes.plot(x, mean, color=color, label=label, linestyle=linestyle)
    if np.isfinite(std).any():
        std = np.nan_to_num(std)
        bands.append((np.column_stack([np.r_[x, x[::-1]], np.r_[mean - std, (mean + std)[::-1]]]), color))


def _draw_bands(axes, bands: list) -> None:
    # One collection per axes: fill_between per curve costs a y-autoscale of every shared axes each.
    if bands:
        axes.add_collection(PolyCollection([verts for verts, _ in bands], facecolors=[color for _, color in bands],
                                           alpha=_BAND_ALPHA, linewidths=0))


def _has_mask_data(inputs: FigureInputs) -> bool:
    itop = inputs.curves is not None and inputs.curves["itop_rate"].notna().any()
    return itop or (inputs.mask_updates is not None and len(inputs.mask_updates) > 0)


def masks_figure(inputs: FigureInputs) -> Figure:
    """Per sparsity, two panels: the ITOP rate (share of prunable weights ever active, Liu et al.
    2021) per epoch, mean ± std over seeds; and the weights each mask update moved (dropped +
    grown, mean over seeds), from mask_updates.jsonl."""
    curves, updates = inputs.curves, inputs.mask_updates
    methods = set()
    for frame in (curves, updates):
        if frame is not None:
            methods |= set(frame[ROW_KEY].unique())
    count = len(inputs.sparsities)
    figure, grid = _panel_figure(
        count, f"{inputs.title}: mask exploration (ITOP rate, mean ± std over seeds) and weights moved at each "
               "mask update", inputs.budget, sorted(methods), rows_per_panel=2, panel_height=2.0, left=0.95,
    )
    used, any_moved = [], False
    for index, sparsity in enumerate(inputs.sparsities):
        row, column = divmod(index, _PANEL_COLUMNS)
        top, bottom = grid[2 * row, column], grid[2 * row + 1, column]
        used += [top, bottom]
        if curves is not None:
            bands: list = []
            for method, line in curves[curves[COLUMN_KEY] == sparsity].groupby(ROW_KEY):
                _band(top, line, "itop_rate", inputs.colors[method], method, bands)
            _draw_bands(top, bands)
        moved = False
        if updates is not None:
            for index, (method, steps) in enumerate(updates[updates[COLUMN_KEY] == sparsity].groupby(ROW_KEY)):
                steps = steps[steps["moved"] > 0]
                if len(steps):
                    # Hollow markers of different shapes: methods that update alike (GaP's variants) stay visible.
                    bottom.plot(steps["position"], steps["moved"], linestyle="none", fillstyle="none",
                                marker=_MARKERS[index % len(_MARKERS)], markersize=5, color=inputs.colors[method],
                                label=method)
                    moved = True
        if not moved:
            bottom.text(0.5, 0.5, "no mask updates logged", ha="center", va="center", transform=bottom.transAxes,
                        fontsize="small", color="grey")
        top.set_title(f"sparsity {sparsity_label(sparsity)}", fontsize="medium")
        bottom.set_xlabel("epoch", fontsize="small")
        any_moved = any_moved or moved
    if any_moved:  # every "moved" axes shares one y axis: setting the scale once sets it for all
        moved_axes = grid[1, 0]
        moved_axes.set_yscale("log")
        # Plain counts (20k, 1.5M) instead of mathtext powers of ten, which cost more to draw than the data.
        moved_axes.yaxis.set_major_formatter(_CountFormatter())
        moved_axes.yaxis.set_minor_formatter(_CountFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.6)))
    for axes in grid[::2, 0]:
        axes.set_ylabel("ITOP rate", fontsize="small")
    for axes in grid[1::2, 0]:
        axes.set_ylabel("weights moved\nper update", fontsize="small")
    _figure_legend(figure, used)
    return figure


def _count(value: float) -> str:
    for suffix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


class _CountFormatter(LogFormatter):
    """matplotlib's choice of which log ticks to label, written as plain counts (20k, 1.5M)."""

    def _num_to_string(self, x, vmin, vmax):
        return _count(x)


def layer_label(name: str) -> str:
    """A parameter name as a heat-map label: `layer1.0.conv1.weight` reads as `layer1.0.conv1`."""
    return re.sub(r"\.(weight|weight_v|kernel)$", "", name)


_CELL = 0.26  # inches a layer (column) or a (sparsity, method) row takes in the heat map
_ROTATION = 60


def layers_figure(inputs: FigureInputs) -> Figure:
    """A heat map: one row per (sparsity, method), one column per layer in model order."""
    densities = inputs.densities
    layers = list(dict.fromkeys(densities["layer"]))  # model order, as the trainer wrote them
    grid = densities.pivot_table(index=[COLUMN_KEY, ROW_KEY], columns="layer", values="density").reindex(columns=layers)
    labels = [f"{sparsity_label(sparsity)} {method}" for sparsity, method in grid.index]
    every = math.ceil(len(layers) / _MAX_LABELLED_LAYERS)  # name every k-th layer past 60, never none
    shown = list(range(0, len(layers), every))
    names = [layer_label(layers[index]) for index in shown]
    name_points = 8 if len(shown) <= 40 else 7
    name_width = _text_inches(names, name_points)
    angle = math.radians(_ROTATION)
    # Names hang down and to the left of their tick: room below for their height, and on the
    # left for the first name's overhang as well as the row labels.
    left = max(_text_inches(labels, 8) + 0.3, name_width * math.cos(angle) - 0.05 + 0.2)
    plot_width = min(max(3.0, _CELL * len(layers)), 16.0)
    width = left + plot_width + 1.35  # colour bar, its ticks and its label
    lines = _title_lines(f"{inputs.title}: final density per layer, mean over seeds", inputs.budget, width)
    top = _title_height(lines) + 0.1
    plot_height = min(max(1.2, _CELL * len(labels)), 18.0)
    bottom = name_width * math.sin(angle) + 0.2 + 0.35  # the names, then the axis label
    height = top + plot_height + bottom
    figure = Figure(figsize=(width, height))
    axes = figure.add_axes((left / width, bottom / height, plot_width / width, plot_height / height))
    colorbar_axes = figure.add_axes(((left + plot_width + 0.15) / width, bottom / height, 0.15 / width,
                                     plot_height / height))
    # Densities span 1 down to 0.01 at high sparsity: a log scale keeps each row's allocation visible.
    values = grid.to_numpy()
    positive = values[values > 0]  # a fully pruned layer (0) or a missing one (NaN) cannot go on a log scale
    smallest = max(float(positive.min()), 1e-4) if positive.size else 1e-4
    image = axes.imshow(values, aspect="auto", cmap="viridis", norm=LogNorm(vmin=smallest, vmax=1.0),
                        interpolation="nearest")
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.set_xticks(shown, names, rotation=_ROTATION, ha="right", rotation_mode="anchor", fontsize=name_points)
    axes.set_xlabel("layer (model order)" + (f", every {every}th named" if every > 1 else ""), fontsize="small")
    for boundary in _block_boundaries([sparsity for sparsity, _ in grid.index]):
        axes.axhline(boundary, color="white", linewidth=1.5)
    figure.colorbar(image, cax=colorbar_axes, label="density (log scale)")
    _put_title(figure, lines)
    return figure


def _block_boundaries(sparsities: list[float]) -> list[float]:
    # White lines between sparsity blocks make the rows of one sparsity read as a group.
    return [index - 0.5 for index in range(1, len(sparsities)) if sparsities[index] != sparsities[index - 1]]


def _method_colors(methods: list[str]) -> dict[str, tuple]:
    # The same method keeps its colour in every figure of the report.
    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {method: palette(index % palette.N) for index, method in enumerate(methods)}


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
