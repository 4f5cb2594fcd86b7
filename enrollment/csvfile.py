"""Reading the operator's CSV files (manifests, pairs) with errors that name the file and line."""

from __future__ import annotations

import csv
from pathlib import Path

from kiosk.errors import UsageError


def read_rows(path: Path, required: set[str], columns_hint: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with stripped keys and values) for each data row; UsageError if unreadable
    or if a `required` column is missing from the header."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not required <= {f.strip() for f in reader.fieldnames}:
        raise UsageError(f"{path}: the header must name the columns {columns_hint}; found {reader.fieldnames}")
    return [(reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for row in reader]
