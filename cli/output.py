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
import shutil
import sys
from typing import Any, Iterable, Sequence

from dynstore.formatting import cell, is_numeric, table, to_json

__all__ = ["FORMATS", "render", "to_json", "key_values", "terminal_width", "setting"]

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "markdown")


def _markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    out = ["| " + " | ".join(esc(c) for c in columns) + " |",
           "|" + "|".join("---:" if is_numeric(rows, i) else "---" for i in range(len(columns))) + "|"]
    out += ["| " + " | ".join(esc(cell(v)) for v in r) + " |" for r in rows]
    return "\n".join(out)


def terminal_width() -> int:
    """The width a table is fitted to by default: the terminal's when stdout is one, else 0 (no limit)."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else 0


def setting(name: str, default: Any) -> Any:
    """``--max-width`` / ``--no-headers`` of the command running now (see :func:`options.format_options`)."""
    import click

    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(f"dynstore.{name}", default) if ctx is not None else default


def render(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str = "table", *,
           headers: bool | None = None, max_width: int | None = None, max_rows: int = 0,
           widen: str = "--max-width 0") -> str:
    """Rows under a header in one of :data:`FORMATS` (no trailing newline).

    ``headers`` (default: not ``--no-headers``) drops the header line of table,
    csv, tsv and markdown (JSON keeps its keys). ``max_width`` fits a table to
    that many characters (default: ``--max-width``, else the terminal's width
    when stdout is a terminal), saying what was cut; csv, tsv, JSON and markdown
    are never cut. ``max_rows`` (0: all) limits a table's rows, saying so.

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
    headers = (not setting("no_headers", False)) if headers is None else headers
    if max_width is None:
        max_width = setting("max_width", None)
        max_width = terminal_width() if max_width is None else max_width
    if fmt == "json":
        return to_json([dict(zip(columns, r)) for r in rows])
    if fmt == "jsonl":
        return "\n".join(to_json(dict(zip(columns, r)), indent=None) for r in rows)
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        if headers:
            w.writerow(columns)
        w.writerows([[cell(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        return _markdown(columns, rows) if headers else "\n".join(_markdown(columns, rows).splitlines()[2:])
    if fmt == "table":
        return table(columns, rows, max_width=max_width, max_rows=max_rows, headers=headers, widen=widen)
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
