"""The report's "Searches" section: what each search found and what it cost.

A search's own directory (EvoPress, DASS: `"kind": "search"` in final.json) is no training run,
so it never enters the accuracy tables; Random Search's arms are training runs and do (their
`sparsity` is the fraction of hidden units removed). This section lists, per search: EvoPress's
fitness from the uniform allocation to the one found, with the densities and a plot of the
fitness per generation; DASS's derived cell and cost; Random Search's candidates, the proxy
scores and the search's FLOPs against the run's own training FLOPs (docs/search.md).
Files are read with the same size caps and regular-file checks as every run file.
"""
from __future__ import annotations

import json
from functools import partial
from io import BytesIO
from pathlib import Path

import pandas as pd

from sparsebench.reporting.document import Block, Heading, Image, Table, slug
from sparsebench.reporting.load import FINAL_FILE, METRICS_FILE, _Unusable, read_capped
from sparsebench.reporting.tables import plain_table
from sparsebench.results import SEARCH_DIRECTORY_METHODS


def split_searches(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training runs, search directories) of a loaded results tree."""
    is_search = (runs["method"].isin(SEARCH_DIRECTORY_METHODS) if "method" in runs
                 else pd.Series(False, index=runs.index))
    return runs[~is_search], runs[is_search]


def _read_json(path: Path) -> dict | None:
    try:
        content = read_capped(path)
        data = json.loads(content[0]) if content else None
    except (_Unusable, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _trajectory(path: Path) -> list[float]:
    try:
        content = read_capped(path)
    except _Unusable:
        return []
    values = []
    for line in (content[0].decode(errors="replace").splitlines() if content else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("fitness"), (int, float)):
            values.append(float(record["fitness"]))
    return values


def _densities_text(densities: dict) -> str:
    items = [f"{name} {value:.3f}" for name, value in densities.items() if isinstance(value, (int, float))]
    return ", ".join(items[:8]) + (f", … ({len(items)} tensors)" if len(items) > 8 else "")


def search_blocks(root: Path, searches: pd.DataFrame, training_runs: pd.DataFrame, plots: bool) -> list[Block]:
    blocks: list[Block] = []
    evopress, dass = [], []
    for record in searches.to_dict("records"):
        final = _read_json(root / record["run"] / FINAL_FILE)
        summary = (final or {}).get("search") if isinstance((final or {}).get("search"), dict) else {}
        row = {"dataset": record.get("dataset"), "model": record.get("model"), "sparsity": record.get("sparsity"),
               "seed": record.get("seed"), "state": "done" if summary else "running or unfinished"}
        if record.get("method") == "evopress":
            row.update(generations=summary.get("generations"), step=summary.get("step"),
                       fitness=summary.get("fitness"), uniform=_round(summary.get("fitness_uniform")),
                       found=_round(summary.get("fitness_final")),
                       densities=_densities_text(summary.get("densities") or {}))
            row["trajectory"] = _trajectory(root / record["run"] / METRICS_FILE)
            evopress.append(row)
        else:
            row.update(search_epochs=summary.get("search_epochs"), wall_time_s=_round(summary.get("wall_time_s"), 1),
                       genotype=_genotype_text(summary.get("genotype")))
            dass.append(row)
    random = _random_search_rows(root, training_runs)
    if not (evopress or dass or random):
        return []
    blocks.append(Heading("Searches", 2))
    if evopress:
        frame = pd.DataFrame([{k: v for k, v in row.items() if k != "trajectory"} for row in evopress])
        blocks.append(Table(
            "EvoPress: fitness (lower is better) of the uniform allocation and of the one found, on one fresh "
            "calibration batch of the last stage's size; densities per tensor (use the run's densities.yaml with "
            "distribution=custom distribution.file=...).", partial(plain_table, frame), False))
        if plots:
            blocks += _trajectory_images(evopress)
    if dass:
        blocks.append(Table("DASS: the derived cell and the search's cost (retrain it with "
                            "model=dass model.genotype=<run dir>/genotype.json).",
                            partial(plain_table, pd.DataFrame(dass)), False))
    if random:
        blocks.append(Table(
            "Random Search: candidates scored by the proxy (training-split loss, lower is better), the one "
            "trained, and the search's FLOPs as a multiple of the run's own training FLOPs.",
            partial(plain_table, pd.DataFrame(random)), False))
    return blocks


def _round(value, digits: int = 4):
    return round(value, digits) if isinstance(value, (int, float)) else None


def _genotype_text(genotype) -> str:
    if not isinstance(genotype, dict):
        return ""
    parts = []
    for cell in ("normal", "reduce"):
        nodes = genotype.get(cell)
        if isinstance(nodes, list):  # per intermediate node, its kept edges {"op", "input"}
            parts.append(f"{cell}: " + " | ".join(
                ", ".join(f"{e.get('op')}<-{e.get('input')}" for e in node if isinstance(e, dict))
                for node in nodes if isinstance(node, list)))
    return "; ".join(parts)


def _random_search_rows(root: Path, runs: pd.DataFrame) -> list[dict]:
    if "method" not in runs:
        return []
    rows = []
    for record in runs[runs["method"] == "random_search"].to_dict("records"):
        final = _read_json(root / record["run"] / FINAL_FILE) or {}
        info = final.get("node_search")
        if not isinstance(info, dict):
            continue
        scores = [s for s in info.get("scores") or [] if isinstance(s, (int, float))]
        flops, own = info.get("search_flops"), final.get("train_flops")
        rows.append({
            "dataset": record.get("dataset"), "model": record.get("model"), "sparsity": record.get("sparsity"),
            "seed": record.get("seed"), "candidates": info.get("candidates"), "proxy": info.get("proxy"),
            "chosen": info.get("chosen"), "chosen loss": _round(min(scores)) if scores else None,
            "median loss": _round(float(pd.Series(scores).median())) if scores else None,
            "search FLOPs / run": _round(flops / own, 3) if isinstance(flops, (int, float)) and own else None,
        })
    return rows


def _trajectory_images(rows: list[dict]) -> list[Image]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["trajectory"]:
            groups.setdefault((row["dataset"], row["model"], row["sparsity"]), []).append(row)
    for (dataset, model, sparsity), members in sorted(groups.items(), key=lambda item: str(item[0])):
        figure = Figure(figsize=(5.5, 3.2), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for row in sorted(members, key=lambda r: r["seed"]):
            axes.plot(range(len(row["trajectory"])), row["trajectory"], label=f"seed {row['seed']}")
        axes.set_xlabel("generation")
        axes.set_ylabel(f"fitness ({members[0].get('fitness') or 'kl'})")
        title = f"EvoPress on {dataset} {model}, sparsity {sparsity:g}"
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=7)
        buffer = BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        images.append(Image(title, f"plots/{slug(f'evopress-{dataset}-{model}-sparsity={sparsity:g}')}.png",
                            buffer.getvalue()))
    return images
