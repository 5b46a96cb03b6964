"""``dynstore inspect``: what is in a store and what it needs.

Counts, sizes on disk and Lance fragments of every dataset, the versions,
the encoder, how many items are stale (need ``encode``), the last refresh,
and what a ``refresh`` would do now. Reads only; loads no encoder.
"""
from __future__ import annotations


from dynstore.storage.catalog import TABLES, Catalog
from dynstore.errors import error_message
from dynstore.versions.freshness import refresh_plan
from dynstore.storage.registry import headline_metrics, list_versions
from dynstore.encoders.cache import cache_dataset, encoder_info
from dynstore.data.views import views_connection
from dynstore.versions import DEFAULT_SINCE

__all__ = ["inspect_store"]


def _dataset_info(catalog: Catalog, ds, uri: str) -> dict:
    if ds is None:
        return {"rows": 0, "bytes": 0, "fragments": 0, "dataset_version": 0}
    return {"rows": ds.count_rows(), "bytes": catalog.storage.size(catalog.relative(uri)),
            "fragments": len(ds.get_fragments()),
            "dataset_version": ds.version}


def _tables(catalog: Catalog) -> dict[str, dict]:
    """Rows, bytes, fragments, version and column names of every table."""
    tables = {name: _dataset_info(catalog, catalog.dataset(name), catalog.uri(name)) for name in TABLES}
    for name in TABLES:
        ds = catalog.dataset(name)
        tables[name]["columns"] = [f.name for f in ds.schema] if ds is not None else []
    return tables


def _stale_items(catalog: Catalog, item_rows: int) -> tuple[int | None, str | None]:
    """(items that need encoding, None) or, when the document template fails, (None, the error)."""
    import duckdb

    if not item_rows:
        return 0, None
    try:
        con = views_connection(catalog)
        try:
            return con.execute("SELECT count(*) FROM stale_items").fetchall()[0][0], None
        finally:
            con.close()
    except duckdb.Error as exc:
        return None, error_message(exc)


def _versions(rows: list[dict]) -> dict:
    """Count, current and latest version, and how many versions have each status."""
    current = next((r for r in rows if r["status"] == "current"), None)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    return {"count": len(rows), "current": current["version"] if current else None,
            "latest": rows[0]["version"] if rows else None, "by_status": by_status}


def _last_refresh(last: dict | None) -> dict | None:
    """The summary of the newest trained version, or None when none was trained."""
    if last is None:
        return None
    return {"version": last["version"], "created": str(last["created"])[:19], "status": last["status"],
            "verdict": last["verdict"], "train_window": last["train_window"],
            "ndcg@10": headline_metrics(last).get("ndcg@10")}


def inspect_store(catalog: Catalog) -> dict:
    """A JSON-able overview of the store ``catalog`` describes.

    Examples
    --------
    >>> import tempfile, dynstore
    >>> info = inspect_store(dynstore.init(tempfile.mkdtemp() + "/s", model="fake").catalog)
    >>> info["tables"]["items"]["rows"], info["refresh"]["needed"]
    (0, False)
    """
    cfg = catalog.config
    enc_id, dim = encoder_info(catalog)
    tables = _tables(catalog)
    stale, doc_error = _stale_items(catalog, tables["items"]["rows"])
    rows = list_versions(catalog)
    trained = [r for r in rows if r["snapshot"].get("trained_until") is not None]
    last = trained[0] if trained else None
    # a refresh is judged over the window the last one trained on
    since = (last["snapshot"].get("since") if last else None) or DEFAULT_SINCE
    plan = refresh_plan(catalog, since=since)
    out = {
        "store": str(catalog.path),
        "format_version": cfg.format_version,
        "created": cfg.created,
        "id_types": catalog.id_types(),
        "bytes": catalog.storage.size(""),
        "tables": tables,
        "encoder": {"model": cfg.model, "id": enc_id, "dim": dim, "max_length": cfg.max_length},
        "semantic_cache": _dataset_info(catalog, cache_dataset(catalog, enc_id), catalog.cache_uri(enc_id)),
        "embeddings": _dataset_info(catalog, catalog.dataset("embeddings"), catalog.uri("embeddings")),
        "items_stale": stale,
        "versions": _versions(rows),
        "last_refresh": _last_refresh(last),
        "refresh": {"since": since, "needed": plan["needed"], "reason": plan["reason"]},
    }
    if doc_error:
        out["document_error"] = doc_error
    if stale:
        out["encode"] = f"{stale} item(s) need encoding: run `dynstore encode` (refresh also does it first)"
    return out
