"""The inputs of a user's workflow: a JSONL file (one JSON value a line) or one column of a CSV file.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "in.jsonl"
    >>> _ = p.write_text('{"question": "a"}\\n\\n{"question": "b"}\\n')
    >>> load_inputs(p)
    [{'question': 'a'}, {'question': 'b'}]
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from langchain_energy.errors import DataError


def load_inputs(path: str | Path, column: str | None = None) -> list[Any]:
    """Every input in ``path``, in file order.

    A ``.csv`` file gives the values of ``column`` (which may be left out when the file has one column);
    any other file is read as JSONL, blank lines skipped.

    Raises:
        DataError: a missing or empty file, a line that is not JSON, an unknown or missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"inputs file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read inputs file {path}: {exc}") from None
    items = _csv(text, column, path) if path.suffix.lower() == ".csv" else _jsonl(text, path)
    if not items:
        raise DataError(f"inputs file {path} holds no input")
    return items


def _jsonl(text: str, path: Path) -> list[Any]:
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"line {number} of {path} is not JSON ({exc.msg}); write one JSON value a line") from None
    return items


def _csv(text: str, column: str | None, path: Path) -> list[Any]:
    reader = csv.DictReader(text.splitlines())
    fields = reader.fieldnames or []
    if column is None:
        if len(fields) != 1:
            raise DataError(f"{path} has {len(fields)} columns ({', '.join(fields)}); name one with --column")
        column = fields[0]
    if column not in fields:
        raise DataError(f"{path} has no column {column!r} (it has: {', '.join(fields) or 'none'})")
    return [row[column] for row in reader if row.get(column) not in (None, "")]
