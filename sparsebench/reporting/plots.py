"""The figures of each result table, drawn on matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` rather than pyplot: no global state, no GUI
backend to select, nothing to close. Drawing costs about half a second a figure, so the tables'
figures are drawn in worker processes (see parallel.py) from small, picklable inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from sparsebench.reporting.aggregate import (
    COLUMN_KEY, ROW_KEY, Comparison, TableSlice, by_key, mean_curves, mean_layer_densities,
)
from sparsebench.reporting.document import Image, slug
from sparsebench.reporting.load import DENSE, load_curves
from sparsebench.reporting.parallel import parallel_map
from sparsebench.reporting.tables import METRIC_LABELS, sparsity_label, table_title

_PANEL_COLUMNS = 3
_MAX_LABELLED_LAYERS = 60  # beyond this, layer names overlap into an unreadable smear
_TABLES_PER_WORKER = 4


@dataclass(frozen=True)
class FigureInputs:
    """Everything the figures of one table need, small enough to send to a worker process."""

    title: str
    stem: str
    metric: str
    sparsities: list[float]
    points: pd.DataFrame  # this table's summary rows of sparse methods
    dense: dict | None  # the dense baseline's summary row
    curves: pd.DataFrame | None  # mean test accuracy per method, sparsity and epoch
    dense_curve: pd.DataFrame | None
    densities: pd.DataFrame | None  # mean final density per method, sparsity and layer
    colors: dict


def table_figures(
    root: Path, runs_ok: pd.DataFrame, comparison: Comparison, tables: list[TableSlice], jobs: int = 1
) -> list[list[Image]]:
    """The figures of each table, in the order of `tables`."""
    grouping = comparison.grouping
    is_dense = runs_ok[ROW_KEY] == DENSE
    # Curves are read only here: a --no-plots report never opens metrics.jsonl.
    curves = load_curves(root, list(runs_ok["run"]))
    sparse_curves = by_key(mean_curves(curves, runs_ok[~is_dense], grouping.keys), grouping.table_keys)
    dense_curves = by_key(mean_curves(curves, runs_ok[is_dense], grouping.baseline_keys), grouping.baseline_keys)
    densities = by_key(mean_layer_densities(runs_ok[~is_dense], grouping.keys), grouping.table_keys)
    colors = _method_colors(sorted(runs_ok.loc[~is_dense, ROW_KEY].unique()))
    inputs = [
        FigureInputs(
            title=table_title(table), stem=slug(table_title(table)), metric=comparison.metric,
            sparsities=table.sparsities, points=table.sparse, dense=table.dense,
            curves=sparse_curves.get(tuple(table.key.values())), dense_curve=dense_curves.get(table.baseline_key),
            densities=densities.get(tuple(table.key.values())), colors=colors,
        )
        for table in tables
    ]
    return parallel_map(draw_figures, inputs, _TABLES_PER_WORKER, jobs)


def draw_figures(inputs: FigureInputs) -> list[Image]:
    images = []
    if len(inputs.points):
        images.append(Image(f"{inputs.title}: accuracy vs sparsity", f"plots/{inputs.stem}-accuracy.png",
                            _accuracy_vs_sparsity(inputs)))
    if inputs.curves is not None:
        images.append(Image(f"{inputs.title}: test accuracy during training", f"plots/{inputs.stem}-curves.png",
                            _training_curves(inputs)))
    if inputs.densities is not None:
        images.append(Image(f"{inputs.title}: final density of each layer", f"plots/{inputs.stem}-layers.png",
                            _layer_densities(inputs)))
    return images


def _accuracy_vs_sparsity(inputs: FigureInputs) -> bytes:
    figure = Figure(figsize=(8, 4.5))
    figure.subplots_adjust(left=0.09, right=0.74, top=0.9, bottom=0.12)
    axes = figure.add_subplot()
    # Sweeps crowd near 100% (90, 95, 98, 99): evenly spaced columns read better than a linear axis.
    position = {sparsity: index for index, sparsity in enumerate(inputs.sparsities)}
    mean, std = f"{inputs.metric}_mean", f"{inputs.metric}_std"
    for method, rows in inputs.points.groupby(ROW_KEY):
        color = inputs.colors[method]
        x = rows[COLUMN_KEY].map(position)
        axes.errorbar(x, rows[mean], yerr=rows[std].fillna(0), marker="o", capsize=3, color=color, label=method)
        published = rows[rows["paper_test_acc"].notna()]
        if len(published):
            axes.scatter(published[COLUMN_KEY].map(position), published["paper_test_acc"], marker="x", s=60,
                         color=color, label=f"{method} (paper)")
    if inputs.dense is not None:
        dense_mean, dense_std = inputs.dense[mean], inputs.dense[std]
        axes.axhline(dense_mean, color="black", linestyle="--", label="dense")
        if pd.notna(dense_std):
            axes.axhspan(dense_mean - dense_std, dense_mean + dense_std, color="black", alpha=0.08)
    axes.set_xticks(list(position.values()), [sparsity_label(sparsity) for sparsity in position])
    axes.set(xlabel="sparsity", ylabel=METRIC_LABELS[inputs.metric].split(" (")[0] + " (%)", title=inputs.title)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(figure)


def _training_curves(inputs: FigureInputs) -> bytes:
    """One panel per sparsity, three to a row: each method's mean curve against the dense one."""
    count = len(inputs.sparsities)
    columns, rows = min(_PANEL_COLUMNS, count), math.ceil(count / _PANEL_COLUMNS)
    height = 2.8 * rows + 0.9
    width = 4 * columns + 1.4  # room on the right for one legend of every method
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=0.3 / columns, right=1 - 1.4 / width, top=1 - 0.5 / height, bottom=0.55 / height,
                           hspace=0.35, wspace=0.1)
    panels = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=True).ravel()
    curves = inputs.curves
    for axes, sparsity in zip(panels, inputs.sparsities):
        for method, line in curves[curves[COLUMN_KEY] == sparsity].groupby(ROW_KEY):
            axes.plot(line["epoch"], line["test_acc"], color=inputs.colors[method], label=method)
        if inputs.dense_curve is not None:
            axes.plot(inputs.dense_curve["epoch"], inputs.dense_curve["test_acc"], "k--", label="dense")
        axes.set_title(f"sparsity {sparsity_label(sparsity)}", fontsize="medium")
    for unused in panels[count:]:
        unused.set_visible(False)
    legend = {}  # panels show different methods: one legend with every line, first handle of each
    for axes in panels[:count]:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    figure.legend(list(legend.values()), list(legend), fontsize="x-small", loc="center right")
    figure.suptitle(f"{inputs.title}: test accuracy (%), mean over seeds")
    figure.supxlabel("epoch")
    return _png(figure)


def _layer_densities(inputs: FigureInputs) -> bytes:
    """A heat map: one row per (sparsity, method), one column per layer in model order."""
    densities = inputs.densities
    layers = list(dict.fromkeys(densities["layer"]))  # model order, as the trainer wrote them
    grid = densities.pivot_table(index=[COLUMN_KEY, ROW_KEY], columns="layer", values="density").reindex(columns=layers)
    labels = [f"{sparsity_label(sparsity)} {method}" for sparsity, method in grid.index]
    width = min(16.0, 3.5 + 0.22 * len(layers))
    height = min(20.0, 2.5 + 0.2 * len(labels))
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=2.0 / width, right=0.92, top=1 - 0.5 / height, bottom=1.6 / height)
    axes = figure.add_subplot()
    # Densities span 1 down to 0.01 at high sparsity: a log scale keeps each row's allocation visible.
    values = grid.to_numpy()
    positive = values[values > 0]  # a fully pruned layer (0) or a missing one (NaN) cannot go on a log scale
    smallest = max(float(positive.min()), 1e-4) if positive.size else 1e-4
    image = axes.imshow(values, aspect="auto", cmap="viridis", norm=LogNorm(vmin=smallest, vmax=1.0),
                        interpolation="nearest")
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    if len(layers) <= _MAX_LABELLED_LAYERS:
        axes.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    else:
        axes.set_xlabel("layer (model order)")
    for boundary in _block_boundaries([sparsity for sparsity, _ in grid.index]):
        axes.axhline(boundary, color="white", linewidth=1.5)
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02, label="density (log scale)")
    axes.set_title(f"{inputs.title}: final density per layer, mean over seeds")
    return _png(figure)


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
