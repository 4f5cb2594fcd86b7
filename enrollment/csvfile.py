"""Reading the operator's CSV files (manifests, pairs) with errors that name the file and line."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from kiosk.errors import UsageError
from kiosk.files import read_regular_file

MAX_CSV_BYTES = 64 * 1024 * 1024


def read_rows(path: Path, required: set[str], columns_hint: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with stripped keys and values) for each data row; UsageError if unreadable
    or if a `required` column is missing from the header."""
    data = read_regular_file(path, MAX_CSV_BYTES, "CSV file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text: {exc}") from None
    # As CSV defines rows: a quoted field may hold a newline, and U+2028 inside a name is a character.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fields = reader.fieldnames
        if not fields or not required <= {f.strip() for f in fields}:
            raise UsageError(f"{path}: the header must name the columns {columns_hint}; found {fields}")
        rows = []
        for row in reader:  # a row that spans lines (a quoted newline) is named by its first line
            first_line = reader.line_num - sum(str(v).count("\n") for v in row.values())
            rows.append((first_line, {k.strip(): (v or "").strip() for k, v in row.items() if k}))
    except csv.Error as exc:
        raise UsageError(f"{path}: line {reader.line_num}: not valid CSV: {exc}") from None
    return rows
