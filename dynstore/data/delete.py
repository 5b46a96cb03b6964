"""Deleting rows: ``dynstore delete STORE {interactions,items,users} --where SQL``.

The condition is DuckDB SQL over the table's columns (for interactions also
``label``, by the store's rules), exactly as in ``dynstore sql``. DuckDB
finds the matching rows and one Lance ``delete`` removes them in one commit:
a reader sees all of them gone or none. A deleted item leaves
recommendations at once (serving drops items that are no longer in
``items``) and its vector leaves the next version; interactions that name it
stay as history until they are deleted too.
"""
from __future__ import annotations

import numpy as np

from dynstore.storage.catalog import Catalog
from dynstore.errors import ConfigError
from dynstore.results import DeleteResult
from dynstore.data.rules import condition_error, label_sql
from dynstore.data.views import views_connection

__all__ = ["delete_rows"]

KINDS = ("interactions", "items", "users")


def _ranges(ids: np.ndarray) -> str:
    """A Lance predicate for a set of row ids: runs as BETWEEN, the rest as IN.

    >>> _ranges(np.array([1, 2, 3, 7], np.uint64))
    '(_rowid BETWEEN 1 AND 3) OR _rowid IN (7)'
    """
    ids = np.unique(ids.astype(np.uint64))
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    parts, singles = [], []
    for run in np.split(ids, breaks):
        if len(run) >= 3:
            parts.append(f"(_rowid BETWEEN {int(run[0])} AND {int(run[-1])})")
        else:
            singles.extend(int(x) for x in run)
    if singles:
        parts.append("_rowid IN (" + ", ".join(map(str, singles)) + ")")
    return " OR ".join(parts)


def delete_rows(catalog: Catalog, kind: str, where: str, *, dry_run: bool = False) -> DeleteResult:
    """Delete the rows of ``kind`` for which ``where`` is true; one commit.

    Returns ``{"kind", "deleted", "total", "version"}`` (``total`` after the
    delete; with ``dry_run`` nothing is written and ``deleted`` is the count
    that would go). The caller holds the table's writer lock.

    Examples
    --------
    >>> import tempfile, dynstore, polars as pl
    >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
    >>> _ = store.ingest("items", pl.DataFrame({"item_id": [1, 2, 3], "title": ["a", "b", "c"]}))
    >>> store.delete("items", "title <> 'b'").deleted
    2
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown table {kind!r}; use one of {', '.join(KINDS)}")
    if not where or not where.strip():
        raise ConfigError("--where is empty; to delete every row say so: --where true")
    ds = catalog.dataset(kind)
    if ds is None:
        return DeleteResult(kind=kind, deleted=0, total=0, version=0)
    # the store's views (interactions, items, users) for subqueries in the condition
    # ("item_id NOT IN (SELECT item_id FROM items)"); the rows to delete are scanned once,
    # through their own relation named after the table
    con = views_connection(catalog)
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("_dynstore_src", ds.to_table(limit=0))
        label = ""
        if kind == "interactions":
            label = f", {label_sql(catalog.config)} AS label"
        con.execute(f"CREATE OR REPLACE TEMP VIEW _dynstore_rows AS SELECT *{label} FROM _dynstore_src")
        rows = f"_dynstore_rows AS {kind}"
        why = condition_error(con, where, rows)
        if why is not None:
            cols = ", ".join(r[0] for r in con.execute("DESCRIBE SELECT * FROM _dynstore_rows").fetchall())
            raise ConfigError(f"--where {where!r} is not a condition over {kind} ({cols}): {why}")
        # Scan with Lance row ids; only the matching ids come back to Python.
        con.register("_dynstore_src", ds.scanner(with_row_id=True).to_reader())
        con.execute(f"CREATE OR REPLACE TEMP VIEW _dynstore_rows AS SELECT *{label} FROM _dynstore_src")
        ids = con.execute(f"SELECT _rowid FROM {rows} WHERE ({where})").fetchnumpy()["_rowid"]
    finally:
        con.close()
    ids = np.asarray(ids, np.uint64)
    if len(ids) and not dry_run:
        ds.delete(_ranges(ids))
    import lance

    latest = lance.dataset(catalog.uri(kind), storage_options=catalog.storage_options)
    return DeleteResult(kind=kind, deleted=int(len(ids)), total=latest.count_rows(), version=latest.version,
                        dry_run=dry_run)
