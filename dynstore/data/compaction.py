"""Compaction: bounded fragments and bytes for a store that is written all day.

Every commit adds files: an ingest or a ``log_impressions`` call a fragment, a
refresh the embeddings of a version, an encode a chunk of the semantic cache,
and every rewrite (the registry, an upsert) leaves the previous version's
files behind for readers that still read it. :func:`compact`

* removes dataset versions that stopped being the newest more than
  ``retain_seconds`` ago, with their files (a statement or a pinned
  connection older than that may fail; the default is an hour), and files of
  writes that died before their commit,
* merges small fragments of each dataset (Lance ``compact_files``; a reader
  sees the same rows before and after) when ``retain_seconds`` is 0. A merge
  writes the rows again, and the files it replaces belong to the version
  readers may be on now, which must stay for ``retain_seconds``: with a
  retention the merge would leave the store larger than it found it, so
  :func:`compact` keeps the fragments and says so (``kept``). Writers still
  merge a dataset past ``compact_fragments`` fragments (:func:`maybe_compact`),
* removes orphans of versions whose registry commit never happened (a
  ``kill -9`` in ``refresh``): their embedding rows, model files and index.

:func:`compact` never leaves the store larger than it found it; it reports the
store's bytes before and after (``bytes``) and what it kept for readers.

Each dataset is compacted under the writer lock of the commands that write it,
so no writer races it; a dataset whose writer is busy is skipped (and named).
Writers call :func:`maybe_compact` after their commit: a dataset with more than
``compact_fragments`` fragments (config, default 64) is compacted then.

Examples
--------
>>> import tempfile, dynstore, polars as pl
>>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
>>> for n in range(3):
...     _ = store.ingest("users", pl.DataFrame({"user_id": [n]}))
>>> out = store.compact(retain_seconds=0)
>>> out.datasets["users"]["fragments"]
[1, 1]
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from dynstore.storage.catalog import TABLES, Catalog
from dynstore.errors import StoreBusy
from dynstore.storage.registry import registry_table
from dynstore.results import CompactResult
from dynstore.storage.backend import LocalStorage

__all__ = ["compact", "maybe_compact", "dataset_stats"]


def dataset_stats(ds, uri: str, catalog: Catalog | None = None) -> dict:
    """``{"fragments", "versions", "bytes"}`` of the Lance dataset at ``uri`` (zeros when
    absent); ``catalog``: the store holding it (default: a local directory)."""
    if ds is None:
        return {"fragments": 0, "versions": 0, "bytes": 0}
    storage, name = (LocalStorage(uri), "") if catalog is None else (catalog.storage, catalog.relative(uri))
    n_versions = len(storage.names(f"{name}/_versions" if name else "_versions"))
    return {"fragments": len(ds.get_fragments()), "versions": n_versions, "bytes": storage.size(name)}


def _datasets(catalog: Catalog) -> list[tuple[str, str, str]]:
    """``(name, location relative to the store, lock kind)`` of every dataset of the store."""
    out = [(t, f"tables/{t}.lance", f"ingest-{t}") for t in TABLES]
    out += [("embeddings", "embeddings.lance", "versions"), ("versions", "versions.lance", "versions")]
    if catalog.dataset("batch_recommendations") is not None:  # score-all overwrites it: old versions pile up
        out.append(("batch_recommendations", "batch_recommendations.lance", "score-all"))
    for d in catalog.storage.names("cache"):
        if d.endswith(".lance"):
            out.append((f"cache/{d}", f"cache/{d}", "encode"))
    return out


def _compact_one(catalog: Catalog, name: str, retain_seconds: float, *, force: bool, merge: bool = True) -> dict:
    """Compact the dataset ``name`` (relative to the store) and drop its versions superseded
    more than ``retain_seconds`` ago; ``merge``: merge its fragments (else only drop).
    The caller holds the dataset's writer lock."""
    import lance

    uri, so = catalog.where(name), catalog.storage_options
    ds = lance.dataset(uri, storage_options=so)
    before = dataset_stats(ds, uri, catalog)
    if before["fragments"] > 1 and merge:
        ds.optimize.compact_files()
        ds = lance.dataset(uri, storage_options=so)
    versions = ds.versions()
    now = _dt.datetime.now()
    cutoff = now - _dt.timedelta(seconds=retain_seconds)
    old = []
    for v, newer in zip(versions, versions[1:]):
        ts = newer["timestamp"]
        if ts.tzinfo is not None:
            ts = ts.astimezone().replace(tzinfo=None)
        # a version is read by pinned readers until it is superseded, and for
        # retain_seconds after: only then may its files go
        if ts <= cutoff:
            old.append(v["version"])
    if old or force:
        # delete_unverified: files of writes killed before their commit; safe
        # under the writer lock, since no one else writes this dataset now
        ds.cleanup_old_versions(versions=old or None, older_than=None if old else _dt.timedelta(days=36500),
                                delete_unverified=True, error_if_tagged_old_versions=False)
        ds = lance.dataset(uri, storage_options=so)
    after = dataset_stats(ds, uri, catalog)
    return {"fragments": [before["fragments"], after["fragments"]], "versions": [before["versions"], after["versions"]],
            "bytes": [before["bytes"], after["bytes"]]}


def _orphans(catalog: Catalog) -> dict:
    """Remove what versions whose registry commit never happened left behind.
    The caller holds the ``versions`` lock (no version is being built)."""
    import lance

    known = set(registry_table(catalog).column("version").to_pylist())
    removed: dict[str, Any] = {"embedding_rows": 0, "files": []}
    emb = catalog.dataset("embeddings")
    if emb is not None:
        import pyarrow.compute as pc

        present = set(pc.unique(emb.to_table(columns=["version"]).column("version")).to_pylist())
        orphan = sorted(present - known)
        if orphan:
            n = emb.count_rows(filter=f"version IN ({', '.join(map(str, orphan))})")
            latest = lance.dataset(catalog.uri("embeddings"), storage_options=catalog.storage_options)
            latest.delete(f"version IN ({', '.join(map(str, orphan))})")
            removed["embedding_rows"] = n
    for folder in ("models", "index"):
        for f in catalog.storage.names(folder):
            stem = f.split(".")[0]
            if stem.startswith("v") and stem[1:].isdigit() and int(stem[1:]) not in known:
                catalog.storage.remove(f"{folder}/{f}")
                removed["files"].append(f"{folder}/{f}")
    return removed


def _unused_encoders(catalog: Catalog) -> list[str]:
    """Fine-tuned encoders no version and not the config use (a refresh killed while
    fine-tuning, or a candidate that was never promoted and is gone). The caller holds
    the ``refresh`` lock (no fine-tuning is running)."""
    encoders = catalog.storage.names("encoders")
    if not encoders:
        return []
    used = {catalog.config.model, catalog.config.switch_from}
    for f in catalog.storage.names("models"):
        if not (f.startswith("v") and f.endswith(".json")):
            continue
        try:
            used.add(json.loads(catalog.storage.read_bytes(f"models/{f}")).get("encoder_model"))
        except (OSError, ValueError):
            continue
    gone = []
    for d in encoders:
        rel = f"encoders/{d}"
        if rel not in used:
            catalog.storage.remove(rel)
            gone.append(rel)
    return gone


def compact(catalog: Catalog, *, retain_seconds: float | None = None, wait: float = 2.0) -> CompactResult:
    """Compact every dataset, drop superseded versions and orphans; see the module docstring.

    Returns ``{"datasets": {name: {"fragments": [before, after], "versions": [...],
    "bytes": [...]}}, "orphans": {...}, "encoders_removed": [...], "skipped": {name: why},
    "kept": {name: what readers may still need}, "bytes": [store before, store after]}``.
    Fragments are merged only with ``retain_seconds=0`` (see the module docstring), so
    the store is never larger after than before.
    """
    retain = catalog.config.retain_seconds if retain_seconds is None else float(retain_seconds)
    out: dict[str, Any] = {"datasets": {}, "orphans": {}, "encoders_removed": [], "skipped": {},
                           "retain_seconds": retain, "kept": {}}
    try:
        with catalog.lock("versions", wait=wait):
            out["orphans"] = _orphans(catalog)
    except StoreBusy:
        out["skipped"]["orphans"] = "a version is being written"
    # a merge keeps the files it replaces for readers (retain_seconds): only without a
    # retention can it free them at once, so only then does it not grow the store
    merge = retain <= 0
    size_before = _store_bytes(catalog)
    for name, where, lock in _datasets(catalog):
        if catalog.storage.dataset_stamp(catalog.where(where)) is None:
            continue
        try:
            with catalog.lock(lock, wait=wait):
                out["datasets"][name] = d = _compact_one(catalog, where, retain, force=True, merge=merge)
        except StoreBusy:
            out["skipped"][name] = f"busy: another {lock} is writing"
            continue
        _note_kept(out["kept"], name, d, merge, retain)
    try:
        with catalog.lock("refresh", wait=0):
            out["encoders_removed"] = _unused_encoders(catalog)
    except StoreBusy:
        out["skipped"]["encoders"] = "a refresh is running"
    if catalog.storage.exists("dynstore.toml.tmp"):
        try:
            with catalog.lock("config", wait=0):
                catalog.storage.remove("dynstore.toml.tmp")
        except StoreBusy:
            pass
    out["bytes"] = [size_before, _store_bytes(catalog)]
    return CompactResult(**out)


def _store_bytes(catalog: Catalog) -> int:
    """The store's bytes, its lock files (a few bytes each, written by every writer) left out."""
    return catalog.storage.size("") - catalog.storage.size("locks")


def _note_kept(kept: dict, name: str, stats: dict, merged: bool, retain: float) -> None:
    """Record what ``compact`` left in ``name`` for readers that may still read it: older
    versions (superseded less than ``retain`` seconds ago) and unmerged fragments."""
    if retain <= 0:
        return
    entry = {"versions": max(0, stats["versions"][1] - 1),
             "fragments": stats["fragments"][1] if not merged and stats["fragments"][1] > 1 else 0}
    if any(entry.values()):
        kept[name] = entry


def maybe_compact(catalog: Catalog, name: str) -> dict | None:
    """After a commit to ``name`` (held under its writer lock by the caller): compact it
    when it has more than ``compact_fragments`` fragments. Never fails the commit."""
    limit = int(catalog.config.compact_fragments)
    if limit <= 0 or catalog.read_only:
        return None
    where = name if name.startswith("cache/") else catalog.relative(catalog.uri(name))
    ds = catalog.open(catalog.where(where))
    # rewritten datasets (the registry, upserted items) stay one fragment but pile
    # up versions: every limit-th version cleans those up too
    if ds is None or (len(ds.get_fragments()) <= limit and ds.version % limit):
        return None
    try:
        return _compact_one(catalog, where, float(catalog.config.retain_seconds), force=False)
    except OSError:
        return None  # a full disk fails compaction, not the write that was committed
