"""Output formats shared by every command that prints data.

``--format table|csv|tsv|json|jsonl|markdown`` (and ``--json`` for
``--format json``). Every format has a header (column names; JSON objects
carry them as keys). Nested values — lists, structs, maps, vectors — are
written as JSON text in the text formats and as JSON values in JSON, never as
Python ``repr``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import decimal
import io
import json
import math
import uuid
from typing import Any, Iterable, Sequence

__all__ = ["FORMATS", "render", "to_json", "key_values"]

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "markdown")
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


def _cell(value: Any) -> str:
    """One value as text: NULL as empty, nested values as JSON."""
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


def _numeric(rows: Sequence[Sequence[Any]], i: int) -> bool:
    vals = [r[i] for r in rows if r[i] is not None]
    return bool(vals) and all(isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool) for v in vals)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def clip(text: str) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= CELL_LIMIT else text[: CELL_LIMIT - 1] + "…"

    body = [["NULL" if v is None else clip(_cell(v)) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    right = [_numeric(rows, i) for i in range(len(columns))]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    out = ["| " + " | ".join(esc(c) for c in columns) + " |",
           "|" + "|".join("---:" if _numeric(rows, i) else "---" for i in range(len(columns))) + "|"]
    out += ["| " + " | ".join(esc(_cell(v)) for v in r) + " |" for r in rows]
    return "\n".join(out)


def render(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str = "table") -> str:
    """Rows under a header in one of :data:`FORMATS` (no trailing newline).

    Examples
    --------
    >>> print(render(["id", "tags"], [("a1", ["x", "y"])], "csv"))
    id,tags
    a1,"[""x"", ""y""]"
    >>> print(render(["id", "n"], [("a1", 3)], "jsonl"))
    {"id": "a1", "n": 3}
    """
    rows = list(rows)
    columns = list(columns)
    if fmt == "json":
        return to_json([dict(zip(columns, r)) for r in rows])
    if fmt == "jsonl":
        return "\n".join(to_json(dict(zip(columns, r)), indent=None) for r in rows)
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_cell(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        return _markdown(columns, rows)
    if fmt == "table":
        return _table(columns, rows)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict) and obj:
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, obj)]


def key_values(obj: dict, fmt: str) -> str:
    """A nested dict (``inspect``, ``eval``, ``config``) as ``key, value`` rows, or as JSON.

    >>> print(key_values({"a": {"b": 1}, "c": "x"}, "csv"))
    key,value
    a.b,1
    c,x
    """
    if fmt == "json":
        return to_json(obj)
    if fmt == "jsonl":
        return to_json(obj, indent=None)
    return render(["key", "value"], _flatten(obj), fmt)
