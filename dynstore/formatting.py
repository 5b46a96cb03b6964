"""Plain-text rendering of values and tables, shared by the library and the command line.

Nested values (lists, structs, maps, vectors) are written as JSON text, never
as Python ``repr``; dates as ISO text. :func:`table` is the aligned text table
that ``dynstore sql`` prints by default and ``dynstore demo`` shows its steps
with; the command line's other formats are in :mod:`dynstore.cli.output`.
"""
from __future__ import annotations

import datetime as _dt
import decimal
import json
import math
import uuid
from typing import Any, Sequence

__all__ = ["CELL_LIMIT", "to_json", "cell", "is_numeric", "table"]

CELL_LIMIT = 60  # characters of a table cell; longer text ends with "…"


def _plain(value: Any) -> Any:
    """``value`` as a JSON-native object (recursively)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else str(value)
    if isinstance(value, (uuid.UUID, _dt.timedelta)):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _plain(value.tolist())
    return str(value)


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    """JSON text of ``obj`` with dates, decimals and arrays made plain.

    >>> to_json({"when": __import__("datetime").date(2025, 1, 2), "v": [1.5]}, indent=None)
    '{"when": "2025-01-02", "v": [1.5]}'
    """
    return json.dumps(_plain(obj), indent=indent, ensure_ascii=False)


def cell(value: Any) -> str:
    """One value as text: NULL as empty, nested values as JSON.

    >>> cell(None), cell(2.5), cell(["a", 1])
    ('', '2.5', '["a", 1]')
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list, tuple)) or hasattr(value, "tolist"):
        return to_json(value, indent=None)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat(sep=" ") if isinstance(value, _dt.datetime) else value.isoformat()
    return str(_plain(value))


def is_numeric(rows: Sequence[Sequence[Any]], i: int) -> bool:
    """True when column ``i`` of ``rows`` holds numbers only (NULLs aside): it is right-aligned."""
    vals = [r[i] for r in rows if r[i] is not None]
    return bool(vals) and all(isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool) for v in vals)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows under a header as an aligned text table, with a row count (no trailing newline).

    >>> print(table(["id", "n"], [("a1", 3), ("b", None)]))
    id     n
    --  ----
    a1     3
    b   NULL
    (2 rows)
    """
    def clip(text: str) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= CELL_LIMIT else text[: CELL_LIMIT - 1] + "…"

    rows = list(rows)
    body = [["NULL" if v is None else clip(cell(v)) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    right = [is_numeric(rows, i) for i in range(len(columns))]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
