"""Compaction: bounded fragments and bytes for a store that is written all day.

Every commit adds files: an ingest or a ``log_impressions`` call a fragment, a
refresh the embeddings of a version, an encode a chunk of the semantic cache,
and every rewrite (the registry, an upsert) leaves the previous version's
files behind for readers that still read it. :func:`compact`

* merges small fragments of each dataset (Lance ``compact_files``; a reader
  sees the same rows before and after),
* removes dataset versions that stopped being the newest more than
  ``retain_seconds`` ago, with their files (a statement or a pinned
  connection older than that may fail; the default is an hour), and files of
  writes that died before their commit,
* removes orphans of versions whose registry commit never happened (a
  ``kill -9`` in ``refresh``): their embedding rows, model files and index.

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
import os
import shutil
from typing import Any

from .catalog import TABLES, Catalog
from .errors import StoreBusy
from .lock import writer_lock
from .registry import registry_table
from .results import CompactResult

__all__ = ["compact", "maybe_compact", "dataset_stats"]


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass  # removed while we walked (a concurrent cleanup)
    return total


def dataset_stats(ds, uri: str) -> dict:
    """``{"fragments", "versions", "bytes"}`` of a Lance dataset (zeros when absent)."""
    if ds is None:
        return {"fragments": 0, "versions": 0, "bytes": 0}
    try:
        n_versions = len(os.listdir(os.path.join(uri, "_versions")))
    except OSError:
        n_versions = 0
    return {"fragments": len(ds.get_fragments()), "versions": n_versions, "bytes": _size(uri)}


def _datasets(catalog: Catalog) -> list[tuple[str, str, str]]:
    """``(name, uri, lock kind)`` of every dataset of the store."""
    out = [(t, catalog.uri(t), f"ingest-{t}") for t in TABLES]
    out += [("embeddings", catalog.uri("embeddings"), "versions"),
            ("versions", catalog.uri("versions"), "versions")]
    if os.path.isdir(catalog.uri("batch_recommendations")):  # score-all overwrites it: old versions pile up
        out.append(("batch_recommendations", catalog.uri("batch_recommendations"), "score-all"))
    cache_dir = catalog.path / "cache"
    if cache_dir.is_dir():
        for d in sorted(cache_dir.iterdir()):
            if d.suffix == ".lance":
                out.append((f"cache/{d.name}", str(d), "encode"))
    return out


def _compact_one(uri: str, retain_seconds: float, *, force: bool) -> dict:
    """Compact one dataset and drop its versions superseded more than ``retain_seconds`` ago.
    The caller holds the dataset's writer lock."""
    import lance

    ds = lance.dataset(uri)
    before = dataset_stats(ds, uri)
    if before["fragments"] > 1:
        ds.optimize.compact_files()
        ds = lance.dataset(uri)
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
        ds = lance.dataset(uri)
    after = dataset_stats(ds, uri)
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
            lance.dataset(catalog.uri("embeddings")).delete(f"version IN ({', '.join(map(str, orphan))})")
            removed["embedding_rows"] = n
    models = catalog.path / "models"
    if models.is_dir():
        for f in sorted(models.iterdir()):
            stem = f.name.split(".")[0]
            if stem.startswith("v") and stem[1:].isdigit() and int(stem[1:]) not in known:
                f.unlink()
                removed["files"].append(f"models/{f.name}")
    idx = catalog.path / "index"
    if idx.is_dir():
        for d in sorted(idx.iterdir()):
            stem = d.name.split(".")[0]
            if stem.startswith("v") and stem[1:].isdigit() and int(stem[1:]) not in known:
                shutil.rmtree(catalog.index_uri(int(stem[1:])), ignore_errors=True)
                removed["files"].append(f"index/{d.name}")
    return removed


def _unused_encoders(catalog: Catalog) -> list[str]:
    """Fine-tuned encoders no version and not the config use (a refresh killed while
    fine-tuning, or a candidate that was never promoted and is gone). The caller holds
    the ``refresh`` lock (no fine-tuning is running)."""
    enc = catalog.path / "encoders"
    if not enc.is_dir():
        return []
    used = {catalog.config.model, catalog.config.switch_from}
    models = catalog.path / "models"
    for f in models.glob("v*.json") if models.is_dir() else ():
        try:
            used.add(json.loads(f.read_text()).get("encoder_model"))
        except (OSError, ValueError):
            continue
    gone = []
    for d in sorted(enc.iterdir()):
        rel = f"encoders/{d.name}"
        if d.is_dir() and rel not in used:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(rel)
    return gone


def compact(catalog: Catalog, *, retain_seconds: float | None = None, wait: float = 2.0) -> CompactResult:
    """Compact every dataset, drop superseded versions and orphans; see the module docstring.

    Returns ``{"datasets": {name: {"fragments": [before, after], "versions": [...],
    "bytes": [...]}}, "orphans": {...}, "encoders_removed": [...], "skipped": {name: why}}``.
    """
    retain = catalog.config.retain_seconds if retain_seconds is None else float(retain_seconds)
    out: dict[str, Any] = {"datasets": {}, "orphans": {}, "encoders_removed": [], "skipped": {},
                           "retain_seconds": retain}
    try:
        with writer_lock(catalog.path, "versions", wait=wait):
            out["orphans"] = _orphans(catalog)
    except StoreBusy:
        out["skipped"]["orphans"] = "a version is being written"
    for name, uri, lock in _datasets(catalog):
        if not os.path.isdir(os.path.join(uri, "_versions")):
            continue
        try:
            with writer_lock(catalog.path, lock, wait=wait):
                out["datasets"][name] = _compact_one(uri, retain, force=True)
        except StoreBusy:
            out["skipped"][name] = f"busy: another {lock} is writing"
    try:
        with writer_lock(catalog.path, "refresh", wait=0):
            out["encoders_removed"] = _unused_encoders(catalog)
    except StoreBusy:
        out["skipped"]["encoders"] = "a refresh is running"
    tmp = catalog.path / "dynstore.toml.tmp"
    if tmp.exists():
        try:
            with writer_lock(catalog.path, "config", wait=0):
                tmp.unlink(missing_ok=True)
        except StoreBusy:
            pass
    return CompactResult(**out)


def maybe_compact(catalog: Catalog, name: str) -> dict | None:
    """After a commit to ``name`` (held under its writer lock by the caller): compact it
    when it has more than ``compact_fragments`` fragments. Never fails the commit."""
    limit = int(catalog.config.compact_fragments)
    if limit <= 0 or catalog.read_only:
        return None
    uri = catalog.uri(name) if not name.startswith("cache/") else str(catalog.path / name)
    ds = catalog.open(uri)
    # rewritten datasets (the registry, upserted items) stay one fragment but pile
    # up versions: every limit-th version cleans those up too
    if ds is None or (len(ds.get_fragments()) <= limit and ds.version % limit):
        return None
    try:
        return _compact_one(uri, float(catalog.config.retain_seconds), force=False)
    except OSError:
        return None  # a full disk fails compaction, not the write that was committed
