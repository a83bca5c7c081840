"""`sparsebench report PATH`: paper tables, plots and a self-contained page from a results tree.

Reads every run under PATH (config.yaml, final.json, metrics.jsonl, mask_updates.jsonl and any
bench.json), averages healthy runs over seeds (only runs whose configs agree on every setting but
the seed: tables split by budget, rows by method option, see reporting/identity.py), compares
each method with the dense run of the same dataset, model and budget, states every table's
budget in its caption, and lists every run or group it did not average or flagged. Writes
report.md (also printed), report.tex, report.html, runs.csv, summary.csv and plots/ to
PATH/report/ unless --out says otherwise. --reference FILE supplies published numbers.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import pandas as pd

from sparsebench.errors import UserError
from sparsebench.reporting.aggregate import DEFAULT_GROUP_BY, REQUIRED_KEYS, Grouping, compare, table_slices
from sparsebench.reporting.document import Block, Image, build_document
from sparsebench.reporting.health import check_health
from sparsebench.reporting.identity import identify, settings, table_budgets
from sparsebench.reporting.load import CONFIG_FILE, OK, RESULT_COLUMNS, load_runs
from sparsebench.reporting.parallel import usable_cpus
from sparsebench.reporting.reference import apply_reference, read_reference
from sparsebench.reporting.render import to_html, to_latex, to_markdown
from sparsebench.reporting.searches import search_blocks, split_searches
from sparsebench.reporting.tables import METRIC_LABELS

PROG = "sparsebench report"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like every other user mistake, instead of argparse's usage block.
        raise UserError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Paper tables, plots and a self-contained HTML page from a results tree.")
    parser.add_argument("path", type=Path, metavar="PATH", help="results tree to read (searched recursively)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="report directory (default: PATH/report)")
    parser.add_argument(
        "--group-by", default=",".join(DEFAULT_GROUP_BY), metavar="COLUMNS",
        help="comma-separated columns that define a group of seeds: identity columns or any flattened "
             f"config key such as method.update_frequency; must include {', '.join(REQUIRED_KEYS)} "
             "(default: %(default)s)",
    )
    parser.add_argument(
        "--metric", choices=sorted(METRIC_LABELS), default="test_acc",
        help="accuracy compared in the tables: final (test_acc) or best over evaluations (default: %(default)s)",
    )
    parser.add_argument(
        "--pool", default="", metavar="COLUMNS",
        help="comma-separated config keys to average over like seeds instead of splitting on them (runs that "
             "differ in any other setting are never averaged together; captions name what was pooled)",
    )
    parser.add_argument(
        "--reference", type=Path, metavar="FILE",
        help="YAML of published numbers to show beside ours: entries of source, optional filters (dataset: "
             "cifar10, epochs: 250, ...) and test_acc: {method: {sparsity: accuracy}}; replaces a preset's "
             "paper: numbers where it matches",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the figures (much faster on big trees)")
    parser.add_argument(
        "--jobs", type=_positive_int, default=usable_cpus(), metavar="N",
        help="processes for reading big trees and drawing figures (default: the usable CPUs, %(default)s)",
    )
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        out = write_report(
            args.path, args.out or args.path / "report", args.group_by, args.metric, not args.no_plots, args.jobs,
            pool=args.pool, reference=args.reference,
        )
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help printed its text
        return int(done.code or 0)
    print(f"{PROG}: wrote {out}/report.{{md,tex,html}}, runs.csv, summary.csv", file=sys.stderr)
    return 0


def write_report(root: Path, out: Path, group_by: str, metric: str, plots: bool, jobs: int = 1,
                 pool: str = "", reference: Path | None = None) -> Path:
    if not root.is_dir():
        raise UserError(f"{root} {'is not a directory' if root.exists() else 'does not exist'}")
    grouping = parse_group_by(group_by)
    pooled = parse_pool(pool, grouping)
    entries = read_reference(reference) if reference is not None else None  # a bad file fails before the load
    runs, searches = split_searches(load_runs(root, skip=out, jobs=jobs))
    if runs.empty and searches.empty:
        raise UserError(f"no runs under {root} (a run directory holds a {CONFIG_FILE})")
    if runs.empty:
        raise UserError(f"only searches under {root}, no training run: report the tree that holds their arms "
                        "(a search's trained models sit beside it)")
    check_group_by_columns(grouping, runs.columns)
    check_pool_columns(pooled, runs.columns)
    if entries is not None:
        runs = apply_reference(runs, entries, str(reference))
    identity = identify(runs, grouping, pooled)
    grouping, labelled = identity.grouping, identity.runs
    healthy = labelled[labelled["state"] == OK]
    comparison = compare(healthy, grouping, metric)
    tables = table_slices(comparison)
    budgets = table_budgets(healthy, tables, grouping, pooled)
    figures = None
    if plots:
        from sparsebench.reporting.plots import table_figures  # matplotlib costs a second to import

        figures = table_figures(root, healthy, comparison, tables, budgets, jobs)
    health = check_health(labelled, grouping)
    blocks = build_document(str(root), runs, comparison, tables, health, figures, budgets, identity,
                            search_blocks(root, searches, runs, plots))
    markdown = to_markdown(blocks)
    try:
        _write_outputs(out, root, blocks, markdown, runs, comparison.summary)
    except OSError as error:
        raise UserError(f"cannot write the report to {out}: {error.strerror or error}") from None
    print(markdown, end="")
    return out


def _write_outputs(
    out: Path, root: Path, blocks: list[Block], markdown: str, runs: pd.DataFrame, summary: pd.DataFrame
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    (out / "report.tex").write_text(to_latex(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks, f"sparsebench report: {root}"), encoding="utf-8")
    runs.drop(columns="layer_densities").to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    for image in (block for block in blocks if isinstance(block, Image)):
        (out / image.filename).parent.mkdir(exist_ok=True)
        (out / image.filename).write_bytes(image.png)


def parse_group_by(text: str) -> Grouping:
    """The --group-by keys, checked before the (slow) load for what needs no data."""
    keys = tuple(dict.fromkeys(key.strip() for key in text.split(",") if key.strip()))
    if "seed" in keys:
        raise UserError("--group-by cannot include seed: the report averages over seeds")
    missing = [key for key in REQUIRED_KEYS if key not in keys]
    if missing:
        raise UserError(
            f"--group-by must include {', '.join(REQUIRED_KEYS)} (tables put methods against sparsities "
            f"and compare with the dense run of the same dataset and model); missing: {', '.join(missing)}"
        )
    return Grouping(keys)


def parse_pool(text: str, grouping: Grouping) -> tuple[str, ...]:
    keys = tuple(dict.fromkeys(key.strip() for key in text.split(",") if key.strip()))
    for key in keys:
        if key == "seed" or key in grouping.keys:
            raise UserError(f"--pool cannot include {key}: it is a --group-by key" if key != "seed"
                            else "--pool need not include seed: the report always averages over seeds")
    return keys


def check_pool_columns(pool: tuple[str, ...], columns) -> None:
    poolable = settings(columns)
    for key in pool:
        if key not in poolable:
            close = difflib.get_close_matches(key, poolable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown --pool column {key!r}{hint}; available: {', '.join(sorted(poolable))}")


def check_group_by_columns(grouping: Grouping, columns) -> None:
    groupable = [column for column in columns if column not in RESULT_COLUMNS and column != "seed"]
    for key in grouping.keys:
        if key not in groupable:
            close = difflib.get_close_matches(key, groupable, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown --group-by column {key!r}{hint}; available: {', '.join(sorted(groupable))}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
