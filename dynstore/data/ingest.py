"""Loading interactions, items and users into the store's Lance datasets.

Every ingest is one Lance commit: either the whole source lands or nothing
does. Sources are read through DuckDB (CSV, TSV, Parquet, JSON/NDJSON) or
taken from Arrow / Polars / pandas objects, normalised by one SQL projection
that also computes, per row, the first thing wrong with it (``__bad``), and
streamed in batches so memory follows the batch size, not the file size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from dynstore.storage.catalog import Catalog
from dynstore.errors import IdTypeError, IngestError
from dynstore.storage.lancescan import is_text, stored_type
from dynstore.results import IngestResult
from dynstore.sqltext import lit, q

__all__ = ["KINDS", "ingest", "ids_fixed", "RESERVED", "FUTURE_TOLERANCE_S"]

KINDS = {"interactions": ("user_id", "item_id"), "items": ("item_id",), "users": ("user_id",)}
FORMATS = ("csv", "tsv", "parquet", "json", "ndjson")
BATCH_ROWS = 64 * 1024
#: Columns the store's views add to a table (see sql/views.sql): a source may not bring
#: its own, or the view's would be shadowed. Names starting with "__" or "_dynstore"
#: are dynstore's own in every table.
RESERVED = {"interactions": ("label",), "items": (), "users": ()}
#: Timestamps more than this many seconds after the ingest are refused unless
#: ``allow_future``: one row from year 2999 would end every relative window.
FUTURE_TOLERANCE_S = 86400

_INT_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
              "UINTEGER", "UBIGINT", "UHUGEINT"}
_FLOAT_TYPES = {"FLOAT", "DOUBLE", "REAL"}
_STRING_TYPES = {"VARCHAR"}


@dataclass
class Source:
    """One input, opened as a DuckDB relation named ``name`` in ``con``."""

    label: str          # what error messages call it: the file path or "<DataFrame>"
    relation: str       # SQL name of the registered relation
    columns: dict[str, str]  # column -> DuckDB type, after --map renames
    renames: dict[str, str]  # new -> old column name


def _detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise IngestError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    name = path.name.lower()
    for suffix in (".gz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    mapping = {"csv": "csv", "tsv": "tsv", "tab": "tsv", "txt": "csv", "parquet": "parquet",
               "pq": "parquet", "json": "json", "ndjson": "ndjson", "jsonl": "ndjson"}
    if ext not in mapping:
        raise IngestError(f"{path}: cannot tell the format from the extension; pass --format")
    return mapping[ext]


def expand_sources(sources: Sequence[Any]) -> list[Any]:
    """File paths with glob patterns (``day-*.csv``) expanded, each match a source of its own
    (so messages name the file); a pattern that matches nothing is an error.

    >>> expand_sources(["/no/such/dir/*.csv"])
    Traceback (most recent call last):
    ...
    dynstore.errors.IngestError: /no/such/dir/*.csv: no file matches this pattern
    """
    import glob

    out: list[Any] = []
    for src in sources:
        if isinstance(src, (str, os.PathLike)) and glob.has_magic(str(src)) and not Path(src).exists():
            hits = sorted(glob.glob(str(src)))
            if not hits:
                raise IngestError(f"{src}: no file matches this pattern")
            out.extend(hits)
        else:
            out.append(src)
    return out


def _check_file(path: Path, label: str) -> None:
    """Refuse a path that cannot be read as one file, naming why."""
    if not path.exists():
        raise IngestError(f"{label}: no such file")
    if path.is_dir():
        raise IngestError(f"{label}: is a directory; name the files (a pattern such as {label}/*.csv works)")
    if not os.access(path, os.R_OK):
        raise IngestError(f"{label}: cannot read the file (permission denied)")
    if path.is_file() and path.stat().st_size == 0:
        raise IngestError(f"{label}: the file is empty (0 bytes): no header, no rows")


def _read_csv_sql(con: duckdb.DuckDBPyConnection, path: Path, kind: str, label: str,
                  text_columns: set[str]) -> str:
    """The ``read_csv(...)`` call for ``path``, with ``text_columns`` read as VARCHAR
    when the header has them."""
    p = lit(str(path))
    opts = ["header=true"]
    delim = _csv_delimiter(con, path, kind, label)
    if delim is not None:
        opts.append(f"delim={lit(delim)}")
    try:
        header = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_csv({p}, {', '.join(opts)})").fetchall()}
    except duckdb.Error as exc:
        why = _long_line(path, _unicode_column(path, _one_line(exc), delim))
        raise IngestError(f"{label}: cannot read as {kind}: {why}") from None
    _check_header(path, label, delim)
    if text_columns & header:
        opts.append("types={" + ", ".join(f"{lit(c)}: 'VARCHAR'" for c in sorted(text_columns & header)) + "}")
    return f"read_csv({p}, {', '.join(opts)})"


def _open_file(con: duckdb.DuckDBPyConnection, src: Any, rel_name: str, fmt: str | None,
               mapping: dict[str, str], force_varchar: set[str]) -> tuple[str, list]:
    """Register the file ``src`` as the view ``rel_name``; returns (label, DESCRIBE rows)."""
    path = Path(src)
    label = str(src)
    _check_file(path, label)
    kind = _detect_format(path, fmt)
    if kind in ("csv", "tsv"):
        # Id columns are read as text when the store's ids are strings, so
        # "007" stays "007" instead of being auto-detected as the integer 7;
        # ts is always text in CSV, parsed by our rules rather than sniffed
        # (a lone "T" would otherwise become a BOOLEAN column).
        old_names = {mapping.get(c, c) for c in force_varchar | {"ts"}}
        sql = _read_csv_sql(con, path, kind, label, old_names)
    elif kind == "parquet":
        sql = f"read_parquet({lit(str(path))})"
    else:
        fmt_opt = "newline_delimited" if kind == "ndjson" else "auto"
        sql = f"read_json({lit(str(path))}, format={lit(fmt_opt)})"
    try:
        con.execute(f"CREATE OR REPLACE TEMP VIEW {rel_name} AS SELECT * FROM {sql}")
        described = con.execute(f"DESCRIBE {rel_name}").fetchall()
    except duckdb.Error as exc:
        raise IngestError(f"{label}: cannot read as {kind}: {_one_line(exc)}") from None
    return label, described


def _open_frame(con: duckdb.DuckDBPyConnection, src: Any, rel_name: str) -> tuple[str, list]:
    """Register an in-memory table as the view ``rel_name``; returns (label, DESCRIBE rows)."""
    label, table = _to_arrow(src)
    con.register(rel_name + "_arrow", table)
    con.execute(f"CREATE OR REPLACE TEMP VIEW {rel_name} AS SELECT * FROM {rel_name}_arrow")
    return label, con.execute(f"DESCRIBE {rel_name}").fetchall()


def _renamed_columns(label: str, raw_cols: dict[str, str],
                     mapping: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Apply ``--map new=old`` to ``raw_cols``; returns (columns, renames new -> old)."""
    renames = {}
    for new, old in mapping.items():
        if old in raw_cols:
            renames[new] = old
        elif new not in raw_cols:
            raise IngestError(f"{label}: --map {new}={old}: no column {old!r} (columns: {', '.join(raw_cols)})")
    columns: dict[str, str] = {}
    renamed_old = set(renames.values())
    for name, typ in raw_cols.items():
        if name in renamed_old:
            continue
        columns[name] = typ
    for new, old in renames.items():
        columns[new] = raw_cols[old]
    return columns, renames


def _open_source(con: duckdb.DuckDBPyConnection, src: Any, index: int, fmt: str | None,
                 mapping: dict[str, str], force_varchar: set[str]) -> Source:
    """Register ``src`` in ``con`` and describe its columns."""
    rel_name = f"__src{index}"
    is_file = isinstance(src, (str, os.PathLike))
    if is_file:
        label, described = _open_file(con, src, rel_name, fmt, mapping, force_varchar)
    else:
        label, described = _open_frame(con, src, rel_name)
    raw_cols = {row[0]: row[1] for row in described}
    columns, renames = _renamed_columns(label, raw_cols, mapping)
    if not con.execute(f"SELECT 1 FROM {rel_name} LIMIT 1").fetchall():
        what = "has a header but no rows" if is_file else "has no rows"
        raise IngestError(f"{label}: {what}; nothing to ingest")
    return Source(label=label, relation=rel_name, columns=columns, renames=renames)


def check_reserved(src: Source, kind: str) -> None:
    """Refuse a column whose name a view or dynstore itself uses (see :data:`RESERVED`)."""
    for name in src.columns:
        own = name.startswith("__") or name.lower().startswith("_dynstore")
        if not own and name.lower() not in RESERVED[kind]:
            continue
        why = ("names starting with '__' or '_dynstore' are dynstore's own" if own else
               f"the {kind} view derives {name} from the store's labelling rules")
        old = src.renames.get(name)
        fix = (f"map another column name to {old!r}, e.g. --map user_{old.strip('_')}={old}" if old else
               f"rename it, e.g. --map user_{name.strip('_')}={name}")
        raise IngestError(f"{src.label}: column {name} is reserved ({why}); {fix}")


def _csv_delimiter(con, path: Path, kind: str, label: str) -> str | None:
    """The delimiter to read ``path`` with (None: DuckDB's own guess), after checking
    the file's shape when DuckDB's sniffer had to bend it.

    DuckDB's sniffer, given a row with more or fewer fields than the header, may
    take a later line as the header or fall back to one column per line. The
    header is the first line here: when the sniffer disagrees, the rows are
    counted and the first one of the wrong width is named.
    """
    import csv
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else (open if not path.name.lower().endswith(".zst") else None)
    if opener is None:
        return "\t" if kind == "tsv" else None
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
            first = fh.readline()
    except OSError as exc:
        raise IngestError(f"{label}: cannot read as {kind}: {exc}") from None
    expected = "\t" if kind == "tsv" else ("," if "," in first else None)
    try:
        sniff = con.execute("SELECT Delimiter, SkipRows, HasHeader FROM sniff_csv(?)", [str(path)]).fetchall()
    except duckdb.Error:
        return expected  # unreadable: the read below names the reason
    delim, skip, has_header = sniff[0] if sniff else (expected, 0, True)
    if expected is None or (delim == expected and not skip and has_header):
        return expected if kind == "tsv" else None
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter=expected)
        header = next(reader, [])
        for row_no, row in enumerate(reader, 1):
            if row and len(row) != len(header):
                raise IngestError(f"{label}: row {row_no} (line {reader.line_num}) has {len(row)} fields, the "
                                  f"header has {len(header)} ({', '.join(header)})")
    return expected


def _long_line(path: Path, message: str) -> str:
    """DuckDB's "Maximum line size ... exceeded" with the line it is on: DuckDB's own
    line number and size are those of the buffer it was sniffing, not of the file."""
    import re

    m = re.search(r"Maximum line size of (\d+) bytes exceeded", message)
    if not m or path.name.lower().endswith((".gz", ".zst")):
        return message
    limit, line, size = int(m.group(1)), 1, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            pieces = chunk.split(b"\n")
            for n, piece in enumerate(pieces):
                size += len(piece)
                if size > limit:
                    return (f"row {line - 1} (line {line}): the line is longer than {limit:,} bytes, the most a "
                            "CSV line may hold; put long texts in a Parquet or JSON file")
                if n < len(pieces) - 1:
                    line, size = line + 1, 0
    return message


def _check_header(path: Path, label: str, delim: str | None) -> None:
    """Refuse a CSV header that names a column twice (DuckDB would store the second as ``name_1``)."""
    import csv
    import gzip

    if path.name.lower().endswith(".zst"):
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
            header = next(csv.reader(fh, delimiter=delim or ","), [])
    except (OSError, csv.Error):
        return  # DuckDB read it; its own errors name what is wrong
    seen: dict[str, int] = {}
    for n, name in enumerate(header, 1):
        key = name.strip()
        if key in seen:
            raise IngestError(f"{label}: line 1 (the header), column {key}: named twice (columns {seen[key]} and "
                              f"{n}); rename or drop one")
        seen[key] = n


def _unicode_column(path: Path, message: str, delim: str | None) -> str:
    """Add the column to DuckDB's "invalid unicode" error on ``row N (line L)``."""
    import re

    m = re.match(r"row (\d+) \(line (\d+)\): Invalid unicode", message)
    if not m or path.name.lower().endswith((".gz", ".zst")):
        return message
    line_no = int(m.group(2))
    with open(path, "rb") as fh:
        lines = [fh.readline() for _ in range(line_no)]
    sep = (delim or ",").encode()
    header = lines[0].rstrip(b"\r\n").decode("utf-8", "replace").split(delim or ",")
    for n, field in enumerate(lines[-1].rstrip(b"\r\n").split(sep)):
        try:
            field.decode("utf-8")
        except UnicodeDecodeError:
            name = header[n] if n < len(header) else f"#{n + 1}"
            return f"row {m.group(1)} (line {line_no}), column {name}: text is not UTF-8 ({field[:20]!r})"
    return message


def _to_arrow(src: Any) -> tuple[str, pa.Table]:
    if isinstance(src, pa.Table):
        return "<arrow table>", src
    if isinstance(src, pa.RecordBatch):
        return "<arrow batch>", pa.Table.from_batches([src])
    mod = type(src).__module__
    if mod.startswith("polars"):
        return "<polars DataFrame>", src.to_arrow()
    if mod.startswith("pandas"):
        try:
            return "<pandas DataFrame>", pa.Table.from_pandas(src, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
            raise IngestError(f"<pandas DataFrame>: {_mixed_column(src) or _one_line(exc)}") from None
    raise IngestError(
        f"cannot ingest a {type(src).__name__}: pass a file path, a Polars or pandas DataFrame, or an Arrow table"
    )


def _mixed_column(df) -> str | None:
    """'row R, column C: ...' for the first object column whose values mix types, or None."""
    for name in df.columns:
        col = df[name]
        if col.dtype != object:
            continue
        first = None
        for n, v in enumerate(col.tolist(), 1):
            if v is None or (isinstance(v, float) and v != v):
                continue
            kind = str if isinstance(v, str) else (int if isinstance(v, int) and not isinstance(v, bool) else type(v))
            if first is None:
                first = (kind, v)
            elif kind is not first[0]:
                return (f"row {n}, column {name}: {v!r} is a {type(v).__name__} but earlier values are "
                        f"{type(first[1]).__name__}s (like {first[1]!r}); make the column one type")
    return None


def _one_line(exc: BaseException) -> str:
    """The useful part of a (multi-line) DuckDB or Lance error, on one line."""
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    if not lines:
        return type(exc).__name__
    head = lines[0].split(", /", 1)[0] if "LanceError" in lines[0] else lines[0]  # no Rust source paths
    # DuckDB's CSV errors put the reason on a later line, after the raw line.
    reason = next((l for l in lines[1:] if not l.startswith(("Original Line", "Possible Solution", "file =",
                                                             "delimiter", "quote", "escape"))
                   and "=" not in l[:20]), None)
    text = f"{head}: {reason}" if reason and "CSV Error" in head and reason not in head else head
    return _csv_row(text)


def _csv_row(text: str) -> str:
    """DuckDB's 'CSV Error on Line: N' as the row (the header is line 1) and column.

    >>> _csv_row('Conversion Error: CSV Error on Line: 7: Error when converting column "item_id". Could not')
    'row 6 (line 7), column item_id: Error when converting column "item_id". Could not'
    """
    import re

    m = re.search(r"CSV Error on Line: (\d+):?\s*(.*)", text)
    if not m:
        return text
    line = int(m.group(1))
    col = re.search(r'column "([^"]+)"', m.group(2))
    where = f"row {line - 1} (line {line})" + (f", column {col.group(1)}" if col else "")
    return f"{where}: {m.group(2)}".rstrip(": ")


def _is_number_type(duckdb_type: str) -> bool:
    """True for DuckDB's numeric types (``DOUBLE``, ``BIGINT``, ``DECIMAL(9,2)`` ...).

    >>> _is_number_type("DECIMAL(9,2)"), _is_number_type("DATE"), _is_number_type("VARCHAR")
    (True, False, False)
    """
    base = duckdb_type.upper().split("(")[0].strip()
    return base in {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                    "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "REAL", "DECIMAL"}


def _col(src: Source, name: str) -> str:
    return q(src.renames.get(name, name))


def _id_expr(src: Source, col: str, store_type: str | None) -> tuple[str, str, str]:
    """Return (expression, bad-row check, resulting id type) for an id column."""
    raw = _col(src, col)
    typ = src.columns[col].upper()
    bad_null = f"WHEN {raw} IS NULL THEN {lit(col + ': missing (NULL) id')} "
    if typ in _INT_TYPES:
        if store_type == "string":
            raise IdTypeError(
                f"{src.label}: column {col} holds integer ids but this store's {col} values are strings; "
                "convert the column to text first"
            )
        expr = f"TRY_CAST({raw} AS BIGINT)"
        bad = bad_null + (f"WHEN {expr} IS NULL THEN {lit(col + ': ')} || CAST({raw} AS VARCHAR) || "
                          f"{lit(' is outside the 64-bit integer range of ids')} ")
        return expr, bad, "int"
    if typ in _FLOAT_TYPES or typ.startswith("DECIMAL"):
        # a CSV id too long for BIGINT is sniffed as DOUBLE: whole numbers in range are ids
        if store_type == "string":
            raise IdTypeError(f"{src.label}: column {col} holds numbers but this store's {col} values are strings; "
                              "convert the column to text first")
        expr = f"TRY_CAST({raw} AS BIGINT)"
        bad = bad_null + (f"WHEN NOT isfinite(CAST({raw} AS DOUBLE)) OR {raw} <> trunc({raw}) THEN "
                          f"{lit(col + ': ')} || CAST({raw} AS VARCHAR) || {lit(' is not an integer id')} "
                          f"WHEN abs(CAST({raw} AS DOUBLE)) >= 9.2e18 OR {expr} IS NULL THEN {lit(col + ': ')} || "
                          f"CAST({raw} AS VARCHAR) || {lit(' is outside the 64-bit integer range of ids')} ")
        return expr, bad, "int"
    if typ in _STRING_TYPES:
        if store_type == "int":
            expr = f"TRY_CAST({raw} AS BIGINT)"
            bad = bad_null + (f"WHEN {expr} IS NULL THEN {lit(col + ': ')} || {raw} || "
                              f"{lit(' is not an integer id (this store uses integer ids)')} ")
            return expr, bad, "int"
        bad = bad_null + f"WHEN trim({raw}) = '' THEN {lit(col + ': empty id')} "
        return f"CAST({raw} AS VARCHAR)", bad, "string"
    raise IdTypeError(f"{src.label}: column {col} has type {typ}; ids must be integers or strings")


def _ts_expr(src: Source, latest: str | None = None) -> tuple[str, str]:
    """(timestamp expression, bad-row checks) for the ts column; ``latest`` (an SQL
    timestamp literal) refuses later times."""
    raw = _col(src, "ts")
    typ = src.columns["ts"].upper()
    # epoch seconds beyond +-10^11 (year ~5138) are no times: TRY_ keeps the overflow a bad row
    if typ in _INT_TYPES:
        expr = (f"CASE WHEN abs(TRY_CAST({raw} AS DOUBLE)) < 1e11 "
                f"THEN make_timestamp(CAST({raw} AS BIGINT) * 1000000) END")
    elif typ in _FLOAT_TYPES or typ.startswith("DECIMAL"):
        expr = (f"CASE WHEN abs(CAST({raw} AS DOUBLE)) < 1e11 "
                f"THEN make_timestamp(CAST(round({raw} * 1000000) AS BIGINT)) END")
    elif typ == "DATE" or typ.startswith("TIMESTAMP") and "TIME ZONE" not in typ:
        expr = f"CAST({raw} AS TIMESTAMP)"
    elif typ == "TIMESTAMP WITH TIME ZONE":
        expr = f"timezone('UTC', {raw})"
    elif typ in _STRING_TYPES:
        # Epoch seconds written as text, else ISO text with or without offset
        # (offsets are honoured, naive times are taken as UTC).
        expr = (f"CASE WHEN regexp_full_match(trim({raw}), '-?[0-9]{{1,12}}') "
                f"THEN make_timestamp(CAST(trim({raw}) AS BIGINT) * 1000000) "
                f"ELSE timezone('UTC', TRY_CAST({raw} AS TIMESTAMPTZ)) END")
    else:
        raise IngestError(f"{src.label}: column ts has type {typ}; use ISO timestamps, dates or epoch seconds")
    # a number too large for epoch seconds is named with the unit it looks like (evaluated for bad rows only)
    number = f"abs(TRY_CAST(trim(CAST({raw} AS VARCHAR)) AS DOUBLE))"
    unit = (f"CASE WHEN {number} >= 1e11 THEN ' is not a timestamp: too large for epoch seconds, it looks like epoch ' "
            f"|| CASE WHEN {number} < 1e14 THEN 'milliseconds (divide by 1,000)' WHEN {number} < 1e17 "
            "THEN 'microseconds (divide by 1,000,000)' ELSE 'nanoseconds (divide by 10^9)' END "
            "|| '; ts takes epoch seconds, dates or ISO text' ELSE ' is not a timestamp' END")
    bad = (f"WHEN {raw} IS NULL THEN 'ts: missing (NULL) timestamp' "
           f"WHEN ({expr}) IS NULL THEN 'ts: ' || CAST({raw} AS VARCHAR) || {unit} "
           f"WHEN NOT isfinite({expr}) THEN 'ts: ' || CAST({raw} AS VARCHAR) || ' is not a finite timestamp' ")
    if latest is not None:
        bad += (f"WHEN ({expr}) > {latest} THEN 'ts: ' || CAST({raw} AS VARCHAR) || "
                f"' is more than a day after the ingest ({latest[11:-1]} UTC at the latest); "
                "fix the clock or the unit, or pass --allow-future to keep it' ")
    return expr, bad


def _check_required(src: Source, kind: str) -> None:
    """Refuse a source without the id (and, for interactions, ts) columns."""
    required = KINDS[kind] + (("ts",) if kind == "interactions" else ())
    missing = [c for c in required if c not in src.columns]
    if missing:
        have = ", ".join(src.columns) or "none"
        raise IngestError(f"{src.label}: missing required column {missing[0]} (columns: {have}); "
                          f"name the column that holds it with --map NEW=OLD, e.g. --map {missing[0]}=YOUR_COLUMN")


def _id_selects(src: Source, kind: str, id_types: dict[str, str]) -> tuple[list[str], str, dict[str, str]]:
    """(select items, bad-row checks, id types) for the id columns of ``kind``."""
    selects: list[str] = []
    bad = ""
    new_types: dict[str, str] = {}
    for col in KINDS[kind]:
        kind_key = col[:-3]  # "user" / "item"
        expr, b, t = _id_expr(src, col, id_types.get(kind_key))
        selects.append(f"{expr} AS {q(col)}")
        bad += b
        new_types[kind_key] = t
    return selects, bad, new_types


def _value_select(src: Source) -> tuple[str, str]:
    """(select item, bad-row checks) for the interactions' value column."""
    if "value" not in src.columns:
        return "1.0::DOUBLE AS value", ""
    raw = _col(src, "value")
    if not _is_number_type(src.columns["value"]):
        # judged on its text: a sniffer can read a lone "inf" as DATE 'infinity'
        raw = f"CAST({raw} AS VARCHAR)"
    # An explicit NULL stays NULL (e.g. logged impressions); only a
    # missing column defaults to 1.
    bad = (f"WHEN {raw} IS NOT NULL AND TRY_CAST({raw} AS DOUBLE) IS NULL "
           f"THEN 'value: ' || CAST({raw} AS VARCHAR) || ' is not a number' "
           # NaN > 0 is true in SQL: the default rule would call it a positive
           f"WHEN NOT isfinite(TRY_CAST({raw} AS DOUBLE)) "
           f"THEN 'value: ' || CAST({raw} AS VARCHAR) || ' is not a finite number' ")
    return f"TRY_CAST({raw} AS DOUBLE) AS value", bad


def _event_selects(src: Source, latest: str | None) -> tuple[list[str], str]:
    """(select items, bad-row checks) for the interactions' ts, event and value."""
    expr, bad = _ts_expr(src, latest)
    selects = [f"{expr} AS ts"]
    if "event" in src.columns:
        selects.append(f"CAST({_col(src, 'event')} AS VARCHAR) AS event")
    else:
        selects.append("CAST(NULL AS VARCHAR) AS event")
    value, value_bad = _value_select(src)
    selects.append(value)
    return selects, bad + value_bad


def _extra_selects(src: Source, handled: set[str], target: dict[str, str]) -> tuple[list[str], str]:
    """(select items, bad-row checks) for the columns not in ``handled``, cast to
    the stored type where the dataset has the column already."""
    selects: list[str] = []
    bad = ""
    for col, typ in src.columns.items():
        if col in handled:
            continue
        raw = _col(src, col)
        want = target.get(col)
        if want and want.upper() != typ.upper():
            expr = f"TRY_CAST({raw} AS {want})"
            selects.append(f"{expr} AS {q(col)}")
            bad += (f"WHEN {raw} IS NOT NULL AND {expr} IS NULL THEN "
                    f"{lit(col + ': ')} || CAST({raw} AS VARCHAR) || {lit(' does not fit the stored type ' + want)} ")
        else:
            selects.append(f"{raw} AS {q(col)}")
    return selects, bad


def build_projection(src: Source, kind: str, id_types: dict[str, str],
                     target: dict[str, str] | None, latest: str | None = None) -> tuple[str, dict[str, str]]:
    """SQL that normalises ``src`` for ``kind`` plus the ``__bad`` column.

    ``target`` is the existing dataset's column -> DuckDB type; columns of
    ``src`` are cast to those types so every batch matches the dataset.
    ``latest`` (an SQL timestamp literal) refuses interactions after it.
    Returns the query and the id types it implies.
    """
    _check_required(src, kind)
    selects, bad, new_types = _id_selects(src, kind, id_types)
    handled = set(KINDS[kind])
    if kind == "interactions":
        event_selects, event_bad = _event_selects(src, latest)
        selects += event_selects
        bad += event_bad
        handled |= {"ts", "event", "value"}
    extra, extra_bad = _extra_selects(src, handled, target or {})
    selects += extra
    bad += extra_bad
    bad_col = f"CASE {bad}END AS __bad" if bad else "CAST(NULL AS VARCHAR) AS __bad"
    return f"SELECT {', '.join(selects)}, {bad_col} FROM {src.relation}", new_types


def checked_batches(reader: pa.RecordBatchReader, label: str, errors: list,
                    start_row: int = 1) -> Iterator[pa.RecordBatch]:
    """Yield batches without ``__bad``; stop at the first bad row.

    On a bad row the error is appended to ``errors`` and a plain exception is
    raised so the Lance writer aborts without committing.
    """
    row = start_row
    batches = iter(reader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (duckdb.Error, pa.ArrowException, OSError) as exc:  # a parse error deep inside the file
            errors.append(IngestError(f"{label}: {_one_line(exc)}"))
            raise _Abort() from None
        bad = batch.column(batch.schema.get_field_index("__bad"))
        if bad.null_count != len(bad):
            idx = pc.index(pc.is_valid(bad), True).as_py()
            message = bad[idx].as_py()
            column, _, what = message.partition(": ")
            errors.append(IngestError(f"{label}: row {row + idx}, column {column}: {what}"))
            raise _Abort()
        row += batch.num_rows
        yield batch.drop_columns(["__bad"])


class _Abort(Exception):
    """Raised inside a batch stream to make the Lance writer abort."""


def describe_target(con: duckdb.DuckDBPyConnection, dataset) -> dict[str, str]:
    """DuckDB types of an existing Lance dataset's columns."""
    if dataset is None:
        return {}
    con.register("__target", dataset.to_table(limit=0))
    out = {row[0]: row[1] for row in con.execute("DESCRIBE __target").fetchall()}
    con.unregister("__target")
    return out


def _checked_sources(kind: str, sources: Iterable[Any]) -> list[Any]:
    """``sources`` with patterns expanded, after refusing an unknown ``kind`` or no source."""
    if kind not in KINDS:
        raise IngestError(f"unknown table {kind!r}; use one of {', '.join(KINDS)}")
    sources = expand_sources(list(sources))
    if not sources:
        raise IngestError("nothing to ingest: no source given")
    return sources


def _latest_allowed(kind: str, allow_future: bool) -> str | None:
    """The SQL timestamp literal no interaction may be later than (None: no limit)."""
    import datetime as _dt

    if kind != "interactions" or allow_future:
        return None
    when = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None) + _dt.timedelta(seconds=FUTURE_TOLERANCE_S)
    return f"TIMESTAMP '{when:%Y-%m-%d %H:%M:%S}'"


def _ingest_connection() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection on every core, with naive times read as UTC."""
    con = duckdb.connect(config={"threads": max(1, os.cpu_count() or 1)})
    con.execute("SET TimeZone = 'UTC'")
    return con


def _projections(con: duckdb.DuckDBPyConnection, catalog: Catalog, kind: str, target: dict[str, str],
                 sources: list[Any], fmt: str | None, mapping: dict[str, str],
                 latest: str | None) -> tuple[list[tuple[Source, str]], dict[str, str]]:
    """Open every source and build its projection; returns ((source, sql) pairs, id types).

    All sources are opened and checked before any projection, so a reserved
    column or an unreadable file is named before an id type mismatch.
    """
    stored = catalog.id_types()  # as the tables hold them: fixed by the commit that stored the first ids
    force_varchar = {c for c in KINDS[kind] if stored.get(c[:-3]) == "string"}
    opened = [_open_source(con, s, i, fmt, mapping, force_varchar) for i, s in enumerate(sources)]
    for src in opened:
        check_reserved(src, kind)
    id_types = dict(stored)
    queries = []
    for src in opened:
        sql, types = build_projection(src, kind, id_types, target, latest)
        for key, t in types.items():
            if id_types.get(key, t) != t:
                raise IdTypeError(f"{src.label}: {key}_id values are {t}s but earlier sources gave {id_types[key]}s")
            id_types[key] = t
        queries.append((src, sql))
    return queries, id_types


def _new_rows(con: duckdb.DuckDBPyConnection, catalog: Catalog, kind: str, queries: list, dataset,
              errors: list, dedupe: bool | str | Sequence[str]):
    """The batch stream to commit; returns (stream, schema, write mode, unknown-items counter or None)."""
    if kind == "interactions":
        unknown = _UnknownItems(catalog)
        stream, schema, mode = _append_stream(con, queries, dataset, errors, dedupe=dedupe, unknown=unknown)
        return stream, schema, mode, unknown
    if dedupe:
        raise IngestError(f"--key / --dedupe apply to interactions; {kind} are upserted by id already")
    stream, schema, mode = _merged_stream(con, kind, queries, dataset, errors)
    return stream, schema, mode, None


def _commit(stream: _Stream, schema: pa.Schema, uri: str, mode: str, errors: list, kind: str,
            storage_options: dict | None = None) -> None:
    """Write ``stream`` to ``uri`` as one Lance commit; a bad row or failure commits nothing."""
    import lance

    reader = pa.RecordBatchReader.from_batches(schema, stream)
    try:
        if stream.pending != 0:  # nothing new after deduplication: no empty commit for refresh to see
            lance.write_dataset(reader, uri, schema=schema, mode=mode, storage_options=storage_options,
                                max_rows_per_file=4 * 1024 * 1024)
    except _Abort:
        raise errors[0] from None
    except Exception as exc:  # the writer wraps our abort in its own error type
        if errors:
            raise errors[0] from None
        if isinstance(exc, IngestError):
            raise
        raise IngestError(f"{kind}: write failed, nothing was committed: {_one_line(exc)}") from None


def ids_fixed(catalog: Catalog, kind: str) -> bool:
    """True when the stored data already fixes the type of every id ``kind`` holds;
    False for a first ingest, which the caller runs under the ``ids`` lock so two
    first ingests of different tables cannot store different types.

    >>> import tempfile, dynstore
    >>> ids_fixed(dynstore.init(tempfile.mkdtemp() + "/s", model="fake").catalog, "items")
    False
    """
    stored = catalog.id_types()
    return all(col[:-3] in stored for col in KINDS.get(kind, ()))


def ingest(catalog: Catalog, kind: str, sources: Iterable[Any], *, mapping: dict[str, str] | None = None,
           fmt: str | None = None, dedupe: bool | str | Sequence[str] = False,
           allow_future: bool = False) -> IngestResult:
    """Validate and commit ``sources`` into the ``kind`` dataset of ``store``.

    Interactions are appended; items and users are upserted by id. Returns a
    summary ``{"kind", "rows", "total", "version"}``, plus
    ``"duplicates_skipped"`` and ``"key"`` with ``dedupe``, and
    ``"unknown_items": {"rows", "ids", "examples"}`` when interactions name
    items that ``items`` does not have (they are stored all the same).

    ``dedupe`` (interactions only): ``True`` skips rows equal in every column
    to a stored row or to an earlier row of this ingest; a column name (or a
    list) compares only those columns, e.g. an ``event_id``. One row per key
    is kept.

    Interactions more than :data:`FUTURE_TOLERANCE_S` after the ingest are
    refused unless ``allow_future``. Columns in :data:`RESERVED` (and names
    starting with ``__``) are refused: rename them with ``mapping``.
    """
    import lance

    mapping = dict(mapping or {})
    sources = _checked_sources(kind, sources)
    latest = _latest_allowed(kind, allow_future)
    con = _ingest_connection()
    try:
        dataset = catalog.dataset(kind)
        target = describe_target(con, dataset)
        queries, _ = _projections(con, catalog, kind, target, sources, fmt, mapping, latest)
        uri = catalog.uri(kind)
        errors: list[IngestError] = []
        stream, schema, mode, unknown = _new_rows(con, catalog, kind, queries, dataset, errors, dedupe)
        _commit(stream, schema, uri, mode, errors, kind, catalog.storage_options)
        rows = stream.rows
    finally:
        con.close()
    # Nothing is written after the commit: the ids' types are the committed
    # schema's (Catalog.id_types), so no lock can turn a stored ingest into a failure.
    ds = catalog.open(uri)
    if ds is None:  # a first ingest with nothing new
        return IngestResult(kind=kind, rows=0, total=0, version=0)
    out = {"kind": kind, "rows": rows, "total": ds.count_rows(), "version": ds.version}
    if dedupe:
        out["duplicates_skipped"] = (stream.offered or 0) - rows
        out["key"] = stream.keys
    unknown_items = unknown.summary() if unknown is not None else None
    if unknown_items:
        out["unknown_items"] = unknown_items
    return IngestResult(**out)


def _cast_to(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    cols = []
    for field in schema:
        idx = batch.schema.get_field_index(field.name)
        if idx < 0:
            cols.append(pa.nulls(batch.num_rows, field.type))
        else:
            col = batch.column(idx)
            cols.append(col if col.type == field.type else col.cast(field.type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class _Stream:
    """Iterator over batches that knows how many new rows it carries.

    ``rows`` is either fixed (upserts know it up front) or counted by the
    producer as it yields new rows; ``offered`` counts the source rows
    before deduplication.
    """

    def __init__(self, batches, rows: int | None = None):
        self.batches = batches
        self.rows = rows or 0
        self.offered: int | None = None if rows is None else rows
        self.keys: list[str] | None = None
        self.pending: int | None = None  # rows to write, when known before writing

    def __iter__(self):
        yield from self.batches


def _query_schema(con, sql: str) -> pa.Schema:
    schema = con.sql(f"SELECT * FROM ({sql}) LIMIT 0").to_arrow_table().schema
    return schema.remove(schema.get_field_index("__bad"))


def _dedupe_query(con, queries, dataset, dedupe) -> tuple[str, list[str]]:
    """SQL over every source's rows without the ones whose key is already stored
    or repeats in this ingest; returns (query, key columns)."""
    new_cols: list[str] = []
    for _, sql in queries:
        for f in _query_schema(con, sql):
            if f.name not in new_cols:
                new_cols.append(f.name)
    if dedupe is True:
        keys = list(new_cols)
    else:
        keys = [dedupe] if isinstance(dedupe, str) else list(dedupe)
        missing = [k for k in keys if k not in new_cols]
        if missing:
            raise IngestError(f"--key {missing[0]}: no such column in the ingested rows "
                              f"(columns: {', '.join(new_cols)})")
    union = " UNION ALL BY NAME ".join(f"SELECT * EXCLUDE (__bad) FROM ({sql})" for _, sql in queries)
    key_sql = ", ".join(q(k) for k in keys)
    sql = f"SELECT DISTINCT ON ({key_sql}) * FROM ({union}) n"
    if dataset is not None and dataset.count_rows():
        con.register("__old", dataset)
        old_cols = {f.name for f in dataset.schema}
        # NULL-safe: logged impressions have a NULL value, and a column the
        # stored rows lack counts as NULL there.
        match = " AND ".join(f"o.{q(k)} IS NOT DISTINCT FROM n.{q(k)}" if k in old_cols else f"n.{q(k)} IS NULL"
                             for k in keys)
        sql += f" WHERE NOT EXISTS (SELECT 1 FROM __old o WHERE {match})"
    return sql, keys


class _UnknownItems:
    """Counts interaction rows whose item is not in ``items`` (they are kept: items may come later)."""

    def __init__(self, catalog: Catalog):
        items = catalog.dataset("items")
        self.known = items.to_table(columns=["item_id"]).column("item_id") if items is not None else None
        self.rows = 0
        self.ids: set = set()

    def see(self, batch: pa.RecordBatch) -> None:
        if self.known is None or not len(self.known) or not batch.num_rows:
            return
        col = batch.column(batch.schema.get_field_index("item_id"))
        unknown = pc.invert(pc.is_in(col, value_set=self.known.cast(col.type)))
        n = pc.sum(unknown).as_py() or 0
        if n:
            self.rows += n
            if len(self.ids) < 100_000:
                self.ids.update(pc.unique(col.filter(unknown)).to_pylist())

    def summary(self) -> dict | None:
        if not self.rows:
            return None
        return {"rows": self.rows, "ids": len(self.ids), "examples": sorted(self.ids, key=str)[:3]}


def _append_stream(con, queries, dataset, errors, *, dedupe=False, unknown=None):
    """Interactions: stream checked batches straight into the Lance writer.

    When a source brings new columns the dataset is rewritten (old rows with
    NULLs in the new columns, then the new rows) in the same single commit.
    With ``dedupe`` (True: all columns, or key column names) every source is
    validated first, then only rows whose key is new are streamed.
    """
    fields = list(dataset.schema) if dataset is not None else []
    names = {f.name for f in fields}
    for _, sql in queries:
        for f in _query_schema(con, sql):
            if f.name not in names:
                # New columns only: a stored column keeps its type (an older store's
                # plain strings stay plain, and every fragment has one schema).
                fields.append(f.with_type(_new_column_type(con, sql, f)))
                names.add(f.name)
    schema = pa.schema(fields)
    rewrite = dataset is not None and len(fields) > len(dataset.schema)
    stream = _Stream(None)
    if dedupe:
        stream.offered = 0
        for src, sql in queries:  # validation pass: a bad row names its own file row
            reader = con.sql(sql).to_arrow_reader(BATCH_ROWS)
            try:
                for batch in checked_batches(reader, src.label, errors):
                    stream.offered += batch.num_rows
            except _Abort:
                raise errors[0] from None
        deduped, stream.keys = _dedupe_query(con, queries, dataset, dedupe)
        stream.pending = con.sql(f"SELECT count(*) FROM ({deduped})").fetchall()[0][0]

    def new_batches():
        if dedupe:
            yield from con.sql(deduped).to_arrow_reader(BATCH_ROWS)
            return
        for src, sql in queries:
            reader = con.sql(sql).to_arrow_reader(BATCH_ROWS)
            yield from checked_batches(reader, src.label, errors)

    def gen():
        if rewrite:
            for batch in dataset.to_batches(batch_size=BATCH_ROWS):
                yield _cast_to(batch, schema)
        for batch in new_batches():
            stream.rows += batch.num_rows
            if unknown is not None:
                unknown.see(batch)
            yield _cast_to(batch, schema)

    stream.batches = gen()
    mode = "create" if dataset is None else ("overwrite" if rewrite else "append")
    return stream, schema, mode


#: Rows of the creating ingest sampled to decide a new string column's encoding.
SAMPLE_ROWS = 100_000


def _new_column_type(con, sql: str, field: pa.Field) -> pa.DataType:
    """Storage type of a new interactions column: low-cardinality strings are
    dictionary-encoded (see :mod:`dynstore.storage.lancescan`)."""
    typ = stored_type(field.name, field.type)
    if typ != field.type or not is_text(field.type) or field.name in KINDS["interactions"]:
        return typ
    distinct, rows = con.sql(f"SELECT count(DISTINCT {q(field.name)}), count({q(field.name)}) "
                             f"FROM (SELECT {q(field.name)} FROM ({sql}) LIMIT {SAMPLE_ROWS})").fetchall()[0]
    return stored_type(field.name, field.type, distinct=distinct, rows=rows)


def _merged_stream(con, kind, queries, dataset, errors):
    """Items/users: validate every source, then stream the upserted table.

    The new rows are held in memory (item and user tables are small next to
    interactions); the merged result replaces the dataset in one commit.
    """
    id_col = KINDS[kind][0]
    merge = duckdb.connect()
    parts = []
    for i, (src, sql) in enumerate(queries):
        reader = con.sql(sql).to_arrow_reader(BATCH_ROWS)
        try:
            batches = list(checked_batches(reader, src.label, errors))
        except _Abort:
            raise errors[0] from None
        table = pa.Table.from_batches(batches, schema=_query_schema(con, sql))
        merge.register(f"__new{i}", table)
        parts.append(f"SELECT * FROM __new{i}")
    merge.execute(f"CREATE VIEW __new AS {' UNION ALL BY NAME '.join(parts)}")
    dup = merge.execute(
        f"SELECT {q(id_col)}, count(*) FROM __new GROUP BY 1 HAVING count(*) > 1 LIMIT 1"
    ).fetchall()
    dup = dup[0] if dup else None
    if dup is not None:
        rows = _rows_of(con, queries, id_col, dup[0])
        raise IngestError(f"{rows}, column {id_col}: duplicate id {dup[0]!r} in one {kind} ingest")
    if dataset is not None and dataset.count_rows():
        merge.register("__old", dataset)
        # Merge: columns the new source has win (NULLs included); columns it
        # lacks keep their stored values; untouched rows stay as they were.
        new_cols = [r[0] for r in merge.execute("DESCRIBE __new").fetchall()]
        old_cols = [f.name for f in dataset.schema]
        keep_sql = "".join(f", o.{q(c)}" for c in old_cols if c not in new_cols)
        sql = (f"SELECT n.*{keep_sql} FROM __new n LEFT JOIN __old o USING ({q(id_col)}) "
               f"UNION ALL BY NAME SELECT * FROM __old WHERE {q(id_col)} NOT IN (SELECT {q(id_col)} FROM __new)")
        extra = [r[0] for r in merge.execute(f"DESCRIBE {sql}").fetchall() if r[0] not in old_cols]
        sql = f"SELECT {', '.join(q(c) for c in old_cols + extra)} FROM ({sql})"
    else:
        sql = "SELECT * FROM __new"
    n_new = merge.execute("SELECT count(*) FROM __new").fetchall()[0][0]
    reader = merge.sql(sql).to_arrow_reader(BATCH_ROWS)
    mode = "create" if dataset is None else "overwrite"
    return _Stream(reader, rows=n_new), reader.schema, mode


def _rows_of(con, queries, id_col, value) -> str:
    """Name the file and rows where ``value`` occurs (for duplicate messages)."""
    for src, sql in queries:
        hits = con.execute(
            f"SELECT rn FROM (SELECT row_number() OVER () AS rn, {q(id_col)} FROM ({sql})) "
            f"WHERE {q(id_col)} = ? ORDER BY rn LIMIT 2", [value]
        ).fetchall()
        if hits:
            return f"{src.label}: rows {' and '.join(str(h[0]) for h in hits)}"
    return queries[0][0].label


def ingest_locked(catalog: Catalog, kind: str, sources: list, *, wait: float = 2.0, **options: Any) -> IngestResult:
    """:func:`ingest` under the table's writer lock (waiting up to ``wait`` seconds);
    a first ingest also under the ``ids`` lock (see :func:`ids_fixed`), then a
    compaction when the table has too many fragments. Nothing is locked after the
    commit: it succeeds whole or fails with nothing stored."""
    from contextlib import nullcontext

    from dynstore.data.compaction import maybe_compact
    from dynstore.storage.catalog import TABLES

    cat = catalog.latest
    cat.require_writable("ingest")
    with cat.writing("ingest"), cat.lock(f"ingest-{kind}" if kind in TABLES else "ingest", wait=wait):
        with nullcontext() if ids_fixed(cat, kind) else cat.lock("ids", wait=wait):
            result = ingest(cat, kind, sources, **options)
        if kind in TABLES:
            maybe_compact(cat, kind)
    return result

