"""Output formats shared by every command that prints data.

``--format table|csv|tsv|json|jsonl|markdown`` (and ``--json`` for
``--format json``). Every format has a header (column names; JSON objects
carry them as keys). Nested values — lists, structs, maps, vectors — are
written as JSON text in the text formats and as JSON values in JSON, never as
Python ``repr`` (:mod:`dynstore.formatting`, which also draws the table).
"""
from __future__ import annotations

import csv
import io
from typing import Any, Iterable, Sequence

from dynstore.formatting import cell, is_numeric, table, to_json

__all__ = ["FORMATS", "render", "to_json", "key_values"]

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "markdown")


def _markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    out = ["| " + " | ".join(esc(c) for c in columns) + " |",
           "|" + "|".join("---:" if is_numeric(rows, i) else "---" for i in range(len(columns))) + "|"]
    out += ["| " + " | ".join(esc(cell(v)) for v in r) + " |" for r in rows]
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
        w.writerows([[cell(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        return _markdown(columns, rows)
    if fmt == "table":
        return table(columns, rows)
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
