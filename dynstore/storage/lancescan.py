"""Dictionary-encoded string columns in Lance, scanned by DuckDB.

Low-cardinality strings of ``interactions`` (``event``, and a new string column
whose values in the ingest that creates it are few: see :func:`stored_type`)
are stored as Arrow ``dictionary<int32, string>``: Lance keeps them
dictionary-encoded and returns dictionary arrays, and DuckDB groups and joins
on them without converting a million plain strings per scan (the gap to DuckDB
on Parquet, which is dictionary-encoded too; see README *Benchmarks*). In SQL
they read as ``VARCHAR``.

DuckDB pushes a ``WHERE event = 'click'`` into the Lance scan as a pyarrow
expression; Lance serialises it to Substrait against the stored schema, where
comparing a dictionary column with a string needs a cast that PyArrow's
Substrait serializer refuses ("only capable of representing unsafe casts").
:func:`enable_dictionary_filters` retries such an expression against the
schema with dictionary columns read as their value type: Lance resolves
columns by position and compares a dictionary column with a string itself, so
the filter still runs inside Lance.

DuckDB knows a registered pyarrow Table's row count but not a Dataset's, so
every Lance scan was planned as one row: a join of ``interactions`` with
``items`` built its hash table on the million interactions.
:func:`enable_row_estimates` gives the scan a Lance dataset's ``count_rows()``
(manifest metadata of the pinned version, no data read), where DuckDB's source
layer (``duckdb._sources``, DuckDB 2) lets it; elsewhere it does nothing.

>>> import pyarrow as pa
>>> stored_type("event", pa.string())
DictionaryType(dictionary<values=string, indices=int32, ordered=0>)
>>> stored_type("user_id", pa.string()), stored_type("value", pa.float64())
(DataType(string), DataType(double))
>>> stored_type("session", pa.string()), stored_type("device", pa.string(), distinct=3, rows=5000)
(DataType(string), DictionaryType(dictionary<values=string, indices=int32, ordered=0>))
"""
from __future__ import annotations

import sys

import pyarrow as pa

__all__ = ["DICT_STRING", "SCAN_IO_BYTES", "stored_type", "is_text", "install_scan_patches", "patch_targets",
           "enable_dictionary_filters", "enable_row_estimates", "plain_schema", "vector_width"]

#: How low-cardinality strings of ``interactions`` are stored.
DICT_STRING = pa.dictionary(pa.int32(), pa.string())

#: bytes a streamed scan of a catalogue (the semantic cache, a version's rows) may read
#: ahead of the batch in use: Lance's default, sized for object stores, let a scan of a
#: 400,000-item cache hold 500 MB more
SCAN_IO_BYTES = 32 << 20

#: Columns kept as plain values whatever their type (ids are looked up, not grouped).
_PLAIN = frozenset({"user_id", "item_id"})
#: Always dictionary-encoded: the event type is a small vocabulary by contract.
_DICT = frozenset({"event"})
#: A new string column is dictionary-encoded when its sample has at most this
#: many distinct values, and at most one per ``MIN_ROWS_PER_VALUE`` rows. Lance
#: stores a large dictionary once per page: a unique-per-row column as a
#: dictionary took 8x the bytes and scanned 7-30x slower than plain strings.
MAX_DISTINCT = 1000
MIN_ROWS_PER_VALUE = 20

_enabled = False
_estimates = False


def is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(typ))


def stored_type(name: str, typ: pa.DataType, *, distinct: int | None = None, rows: int = 0) -> pa.DataType:
    """The Arrow type a new ``interactions`` column is stored with.

    ``distinct`` and ``rows``: distinct and non-null values of the column in
    (a sample of) the ingest that creates it; unknown keeps it plain.
    """
    if name in _PLAIN or not is_text(typ):
        return typ
    if name in _DICT:
        return DICT_STRING
    if distinct is not None and distinct <= MAX_DISTINCT and distinct * MIN_ROWS_PER_VALUE <= rows:
        return DICT_STRING
    return typ


def vector_width(column) -> int:
    """Width of the vectors in ``column`` (fixed-size lists, or lists of one width:
    a version's rows after an encoder of another width joined the store)."""
    if pa.types.is_fixed_size_list(column.type):
        return column.type.list_size
    return len(pa.chunked_array(column).combine_chunks().flatten()) // max(len(column), 1)


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with every dictionary column as its value type (same positions)."""
    return pa.schema([pa.field(f.name, f.type.value_type, f.nullable, f.metadata)
                      if pa.types.is_dictionary(f.type) else f for f in schema], metadata=schema.metadata)


def install_scan_patches() -> None:
    """The one place dynstore patches third-party internals: both patches above
    (idempotent; the catalog calls it before it opens its first dataset)."""
    enable_dictionary_filters()
    enable_row_estimates()


def patch_targets() -> dict[str, bool]:
    """Whether each patched third-party name is where the patches expect it: a test
    fails (it does not skip) when a release of Lance or DuckDB moves one."""
    import lance.dataset  # noqa: F401

    try:
        from duckdb._sources.pyarrow import PyArrowDatasetSource
    except ImportError:
        PyArrowDatasetSource = None
    return {"lance.dataset._serialize_expression": callable(getattr(sys.modules["lance.dataset"],
                                                                    "_serialize_expression", None)),
            "duckdb._sources.pyarrow.PyArrowDatasetSource.rows": callable(getattr(PyArrowDatasetSource, "rows", None))}


def enable_dictionary_filters() -> None:
    """Let pyarrow filter expressions over dictionary columns reach Lance (idempotent).

    Only expressions Lance would refuse are retried; anything else is
    serialised exactly as before.
    """
    global _enabled
    if _enabled:
        return
    import lance.dataset  # noqa: F401  (the module, not the function lance.dataset)

    module = sys.modules["lance.dataset"]
    original = getattr(module, "_serialize_expression", None)
    if original is None or getattr(original, "_dynstore", False):
        _enabled = True
        return

    def serialize(expression, schema):
        try:
            return original(expression, schema)
        except pa.ArrowInvalid:
            plain = plain_schema(schema)
            if plain.equals(schema):
                raise
            return original(expression, plain)

    serialize._dynstore = True
    module._serialize_expression = serialize
    _enabled = True


def enable_row_estimates() -> None:
    """Tell DuckDB how many rows a registered Lance dataset holds (idempotent)."""
    global _estimates
    if _estimates:
        return
    _estimates = True
    try:
        from duckdb._sources.pyarrow import PyArrowDatasetSource
        from lance.dataset import LanceDataset
    except ImportError:
        return
    original = PyArrowDatasetSource.rows
    if getattr(original, "_dynstore", False):
        return

    def rows(self):
        if isinstance(self.obj, LanceDataset):
            try:
                return self.obj.count_rows()
            except Exception:
                return None
        return original(self)

    rows._dynstore = True
    PyArrowDatasetSource.rows = rows
