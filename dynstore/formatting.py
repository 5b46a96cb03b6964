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

__all__ = ["to_json", "cell", "is_numeric", "table"]


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


def _fit(natural: list[int], floors: list[int], max_width: int) -> list[int]:
    """Column widths: ``natural`` unless the table would be wider than ``max_width`` (0: no limit);
    then the widest columns are narrowed to a common cap (never below ``floors``)."""
    if not max_width or sum(natural) + 2 * (len(natural) - 1) <= max_width:
        return natural
    budget = max_width - 2 * (len(natural) - 1)

    def widths(cap: int) -> list[int]:
        return [min(w, max(cap, f)) for w, f in zip(natural, floors)]

    lo, hi = 1, max(natural)
    while lo < hi:  # the largest cap that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(widths(mid)) <= budget else (lo, mid - 1)
    return widths(lo)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, max_width: int = 0, max_rows: int = 0,
          headers: bool = True, widen: str = "--max-width 0") -> str:
    """Rows under a header as an aligned text table, with a row count (no trailing newline).

    Nothing is cut silently: with ``max_width`` (characters; 0, the default: no
    limit) the widest columns are narrowed until the table fits, their longer
    values end with "…", and the row count says how many were cut and what
    shows them whole (``widen``). ``max_rows`` (0: all) shows the first rows
    only, and says so. ``headers=False`` prints the values alone.

    >>> print(table(["id", "n"], [("a1", 3), ("b", None)]))
    id     n
    --  ----
    a1     3
    b   NULL
    (2 rows)
    >>> print(table(["id", "text"], [(1, "a long sentence that will not fit")], max_width=20))
    id  text
    --  ----------------
     1  a long sentence…
    (1 row; 1 value cut to fit 20 characters: --max-width 0 shows it whole)
    """
    rows = list(rows)
    shown = rows[:max_rows] if max_rows and len(rows) > max_rows else rows
    body = [["NULL" if v is None else cell(v).replace("\n", "\\n") for v in r] for r in shown]
    natural = [max([len(c) if headers else 1] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    floors = [min(w, max(6, min(len(c), 12))) for w, c in zip(natural, columns)]
    widths = _fit(natural, floors, max_width)
    cut = sum(1 for r in body for v, w in zip(r, widths) if len(v) > w)
    body = [[v if len(v) <= w else v[: w - 1] + "…" for v, w in zip(r, widths)] for r in body]
    right = [is_numeric(rows, i) for i in range(len(columns))]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    if not headers:
        return "\n".join(line(r) for r in body)
    out = [line([c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(columns, widths)]),
           "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    count = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    if len(shown) < len(rows):
        count += f", the first {len(shown)} shown (.maxrows 0 shows all)"
    if cut:
        count += (f"; {cut} value{'s' if cut != 1 else ''} cut to fit {max_width} characters: {widen} shows "
                  f"{'them' if cut != 1 else 'it'} whole")
    out.append(f"({count})")
    return "\n".join(out)
