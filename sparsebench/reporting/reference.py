"""Published numbers supplied at report time: `sparsebench report PATH --reference FILE`.

FILE is YAML: one entry, or a list of entries, each

    - source: "Evci et al. 2020, Table 2"      # required: where the numbers are published
      dataset: cifar10                        # optional filters: any column of runs.csv (a config
      model: wrn22_2                          #   key such as epochs or method.variant, or an identity
      epochs: 250                             #   column); a run matches if it has every value given
      test_acc:                               # method -> {sparsity: accuracy in %}, or -> accuracy
        rigl: {0.9: 91.5, 0.95: 89.9}         #   at any sparsity (natural for dense)
        dense: 94.1

An entry's numbers go to the runs it matches, in place of the experiment preset's `paper:`
numbers; where several entries match a run, the first one in the file wins. Methods are matched
by the name the report shows before any option split (`gmp+powerprop2`, `gap`). A file that does
not parse or has another shape ends the report with one line naming the entry and key.
"""
from __future__ import annotations

import difflib
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from sparsebench.errors import UserError
from sparsebench.reporting.aggregate import COLUMN_KEY, ROW_KEY
from sparsebench.reporting.load import EXPLICIT_NULL, RESULT_COLUMNS

_CAP = 1 << 20
_RESERVED = ("source", "test_acc")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Entry:
    source: str
    filters: dict  # column -> value
    numbers: dict  # (method, sparsity or None) -> accuracy


def read_reference(path: Path) -> list[Entry]:
    """The entries of a reference file, validated; every problem is a UserError of one line."""
    where = f"--reference {path}"
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{where}: not a regular file")
        if info.st_size > _CAP:
            raise UserError(f"{where}: {info.st_size} bytes, more than a reference file's 1 MiB")
        with open(path, "rb") as handle:
            data = handle.read(_CAP + 1)
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except OSError as error:
        raise UserError(f"{where}: unreadable: {error.strerror or error}") from None
    try:
        for event in yaml.parse(data, Loader=_LOADER):  # no alias expansion: nothing is built here
            if isinstance(event, yaml.AliasEvent):
                raise UserError(f"{where}: YAML aliases are not supported")
        document = yaml.load(data, Loader=_LOADER)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - YAMLError, and ValueError from odd scalars
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise UserError(f"{where}: not valid YAML ({text[:200]})") from None
    entries = document if isinstance(document, list) else [document]
    if not entries or not all(isinstance(entry, dict) for entry in entries):
        raise UserError(f"{where}: expected an entry (a mapping with source and test_acc) or a list of them")
    return [_entry(entry, f"{where}: entry {index}" if len(entries) > 1 else where)
            for index, entry in enumerate(entries, 1)]


def _entry(entry: dict, where: str) -> Entry:
    source = entry.get("source")
    if not (isinstance(source, str) and source.strip() and source.isprintable()):
        raise UserError(f"{where}: source must be one line of text saying where the numbers are published")
    published = entry.get("test_acc")
    if not isinstance(published, dict) or not published:
        raise UserError(f"{where}: test_acc must map methods to {{sparsity: accuracy}} or to an accuracy")
    numbers = {}
    for method, by_sparsity in published.items():
        if not isinstance(method, str):
            raise UserError(f"{where}: test_acc key {method!r} is not a method name")
        if not isinstance(by_sparsity, dict):
            numbers[(method, None)] = _accuracy(by_sparsity, f"{where}: test_acc.{method}")
            continue
        for sparsity, accuracy in by_sparsity.items():
            if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
                raise UserError(f"{where}: test_acc.{method}: {sparsity!r} is not a sparsity in [0, 1)")
            numbers[(method, round(float(sparsity), 6))] = _accuracy(accuracy, f"{where}: test_acc.{method}.{sparsity}")
    filters = {}
    for key, value in entry.items():
        if key in _RESERVED:
            continue
        if not isinstance(key, str) or not (value is None or isinstance(value, (str, int, float, bool))):
            raise UserError(f"{where}: {key!r} must be a column name with one value (str, number or bool)")
        filters[key] = value
    return Entry(source.strip(), filters, numbers)


def _accuracy(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value <= 100):
        raise UserError(f"{where}: {value!r} is not an accuracy in % (0 to 100)")
    return float(value)


def apply_reference(runs: pd.DataFrame, entries: list[Entry], where: str) -> pd.DataFrame:
    """`runs` with paper_test_acc and paper_source taken from the entries wherever one matches."""
    known = [column for column in runs.columns if column not in RESULT_COLUMNS]
    for entry in entries:
        for key in entry.filters:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"--reference {where}: no column {key!r} in the runs{hint}")
    runs = runs.copy()
    runs["paper_source"] = runs["paper_source"].astype(object)
    taken = pd.Series(False, index=runs.index)
    for entry in entries:
        matches = ~taken
        for key, value in entry.filters.items():
            matches &= _equals(runs[key], value)
        if not matches.any():
            continue
        for (method, sparsity), accuracy in entry.numbers.items():
            rows = matches & (runs[ROW_KEY] == method)
            if sparsity is not None:
                rows &= runs[COLUMN_KEY] == sparsity
            runs.loc[rows, "paper_test_acc"] = accuracy
            runs.loc[rows, "paper_source"] = entry.source
            taken |= rows
    return runs


def _equals(column: pd.Series, value) -> pd.Series:
    if value is None:  # a setting written as null, or absent from the run's config
        return column.isna() | column.map(lambda cell: cell == EXPLICIT_NULL)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers = pd.to_numeric(column.where(column.map(lambda cell: not isinstance(cell, bool))), errors="coerce")
        return (numbers - value).abs() <= 1e-9 * max(1.0, abs(value))
    return column.map(lambda cell: cell == value and type(cell) is type(value))
