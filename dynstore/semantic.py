"""Semantic vectors: the cache, stale detection and incremental encoding.

The cache is one Lance dataset per encoder (``cache/<encoder-id>.lance``)
keyed by the hash of the document text, so identical documents are encoded
once, an item whose document did not change is never re-encoded, and a new
encoder starts an empty cache while the old vectors stay. Encoding commits
every chunk, so an interrupted run loses at most one chunk and a rerun
resumes with what is still stale. Chunks start small and grow to about
``CHUNK_SECONDS`` of work, so even a few hundred documents on a slow CPU
are committed in several steps.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["encode", "store_encoder", "encoder_info", "record_encoder", "semantic_vectors", "cached_vectors",
           "register_cache"]

CHUNK = 2048          # most documents per commit
FIRST_CHUNK = 64      # the first commit comes early, whatever the encoder's speed
CHUNK_SECONDS = 10.0  # later chunks are sized to take about this long


def store_encoder(store, device: str | None = None):
    """The store's encoder (loaded once per process)."""
    from .encoders import get_encoder

    cfg = store.config
    return get_encoder(cfg.encoder_spec(store.path), device=device, max_length=cfg.max_length,
                       precision=cfg.precision)


def encoder_info(store) -> tuple[str, int]:
    """(id, dim) of the store's encoder, without loading it where possible.

    In order: the id the store config recorded, while its fingerprint (spec,
    max_length, sizes and mtimes of the model files) still matches; the
    model's files (:func:`~dynstore.encoder.encoder_identity`: hashes the
    weights, imports no torch); loading the encoder (a registered factory).
    """
    from .encoders import encoder_fingerprint, encoder_identity

    cfg = store.config
    spec, max_length = cfg.encoder_spec(store.path), cfg.max_length
    fp = encoder_fingerprint(spec, max_length=max_length, precision=cfg.precision)
    hit = _INFO.get(fp)
    if hit is None:
        if cfg.encoder_id and cfg.encoder_dim > 0 and cfg.encoder_fingerprint == fp:
            hit = (cfg.encoder_id, int(cfg.encoder_dim))
        else:
            hit = encoder_identity(spec, max_length=max_length, precision=cfg.precision)
            if hit is None:
                enc = store_encoder(store)
                hit = (enc.id, int(enc.dim))
        _INFO[fp] = hit
    return hit


_INFO: dict[str, tuple[str, int]] = {}


def record_encoder(store, identity: tuple[str, int] | None = None) -> None:
    """Write the encoder's id, dim and fingerprint into the store config (writers only).

    Skipped while the in-memory encoder differs from the config file's
    (a fine-tuned encoder on trial during ``refresh``).
    """
    from .config import CONFIG_NAME, StoreConfig
    from .encoders import encoder_fingerprint
    from .lock import writer_lock

    if store.read_only:
        return
    cfg = store.config
    fp = encoder_fingerprint(cfg.encoder_spec(store.path), max_length=cfg.max_length, precision=cfg.precision)
    enc_id, dim = identity or encoder_info(store)
    if (cfg.encoder_id, cfg.encoder_dim, cfg.encoder_fingerprint) == (enc_id, dim, fp):
        return
    with writer_lock(store.path, "config"):
        disk = StoreConfig.load(store.path / CONFIG_NAME)
        if (disk.model, disk.max_length, disk.precision) != (cfg.model, cfg.max_length, cfg.precision):
            return
        disk.encoder_id, disk.encoder_dim, disk.encoder_fingerprint = enc_id, int(dim), fp
        disk.save(store.path / CONFIG_NAME)
    store.config = disk
    store._con_state = None


def cache_uri(store, encoder_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_id)
    return str(store.path / "cache" / f"{slug}.lance")


def cache_dataset(store, encoder_id: str | None = None):
    return store._open_dataset(cache_uri(store, encoder_id or encoder_info(store)[0]))


def _cache_schema(dim: int) -> pa.Schema:
    return pa.schema([("doc_hash", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def register_cache(store, con) -> None:
    """Expose the current encoder's cache to SQL as ``_dynstore_semantic``."""
    enc_id, dim = encoder_info(store)
    ds = cache_dataset(store, enc_id)
    con.register("_dynstore_semantic", ds if ds is not None else _cache_schema(dim).empty_table())


def _write_cache(store, enc_id: str, hashes: list[str], vectors: np.ndarray) -> None:
    import lance

    dim = vectors.shape[1]
    table = pa.table({"doc_hash": pa.array(hashes, pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)},
                     schema=_cache_schema(dim))
    ds = cache_dataset(store, enc_id)
    if ds is None:
        lance.write_dataset(table, cache_uri(store, enc_id), mode="create")
    else:
        # Upsert: `encode --all` rewrites vectors of documents already cached.
        ds.merge_insert("doc_hash").when_matched_update_all().when_not_matched_insert_all().execute(table)


def encode(store, *, all: bool = False, batch_size: int = 64, device: str | None = None,
           progress: bool = False) -> dict:
    """Encode the stale items of ``store`` (every item with ``all``).

    Returns counts: ``items`` (total), ``stale``, ``encoded`` (distinct
    documents sent to the encoder), ``reused`` (items served from the cache),
    plus ``seconds`` and ``items_per_s``.

    Examples
    --------
    >>> import tempfile, dynstore, polars as pl
    >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
    >>> _ = store.ingest("items", pl.DataFrame({"item_id": [1, 2], "title": ["red shoe", "red shoe"]}))
    >>> r = store.encode()
    >>> (r["stale"], r["encoded"])
    (2, 1)
    """
    from .encoders import check_batch_size as _check_batch_size

    _check_batch_size(batch_size)  # before the model loads, not after
    t0 = time.perf_counter()
    enc = store_encoder(store, device=device)
    record_encoder(store, (enc.id, int(enc.dim)))
    con = store.connection()
    try:
        total = con.execute("SELECT count(*) FROM item_documents").fetchall()[0][0]
        view = "item_documents" if all else "stale_items"
        stale = con.execute(f"SELECT count(*) FROM {view}").fetchall()[0][0]
        docs = con.execute(
            f"SELECT doc_hash, any_value(document) FROM {view} GROUP BY doc_hash ORDER BY doc_hash"
        ).fetchall()
    finally:
        con.close()
    bar = None
    if progress and docs:
        from tqdm import tqdm

        bar = tqdm(total=len(docs), unit="doc", desc="encoding", file=sys.stderr, dynamic_ncols=True)
    try:
        start, size = 0, min(FIRST_CHUNK, CHUNK)
        while start < len(docs):
            part = docs[start:start + size]
            t_part = time.perf_counter()
            vecs = enc.encode([d for _, d in part], batch_size=batch_size,
                              progress=bar.update if bar is not None else None)
            _write_cache(store, enc.id, [h for h, _ in part], np.asarray(vecs, dtype=np.float32))
            start += len(part)
            rate = len(part) / max(time.perf_counter() - t_part, 1e-3)
            size = int(min(CHUNK, max(FIRST_CHUNK, rate * CHUNK_SECONDS)))
    finally:
        if bar is not None:
            bar.close()
    from .compaction import maybe_compact

    maybe_compact(store, "cache/" + cache_uri(store, enc.id).rsplit("/", 1)[-1])
    seconds = time.perf_counter() - t0
    out = {"items": total, "stale": stale, "encoded": len(docs), "reused": total - stale,
           "encoder": enc.id, "device": getattr(enc, "device", "cpu"), "seconds": round(seconds, 3),
           "items_per_s": round(len(docs) / seconds, 1) if seconds > 0 else None}
    from .versions import ensure_first_version

    version = ensure_first_version(store)
    if version is not None:
        out["version"] = version
    return out


class SemanticIndex:
    """In-memory view of the cache for fast lookups (one per cache version)."""

    def __init__(self, ds, dim: int):
        if ds is None:
            self.hashes: dict[str, int] = {}
            self.vectors = np.zeros((0, dim), np.float32)
            return
        t = ds.to_table(columns=["doc_hash", "vector"])
        self.vectors = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        self.hashes = {h: i for i, h in enumerate(t.column("doc_hash").to_pylist())}


def _index(store) -> SemanticIndex:
    enc_id, dim = encoder_info(store)
    ds = cache_dataset(store, enc_id)
    key = ("semantic", enc_id, ds.version if ds is not None else 0)
    idx = store._cache.get("semantic")
    if idx is None or idx[0] != key:
        idx = (key, SemanticIndex(ds, dim))
        store._cache["semantic"] = idx
    return idx[1]


def semantic_vectors(store, item_ids: list[Any], *, encode_missing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Semantic vectors of ``item_ids`` and a mask of which items exist.

    Stale items (no cached vector for their document) are encoded in memory
    when ``encode_missing``, else left as zero rows; nothing is ever written
    here: only :func:`encode` (a writer, under its lock) fills the cache, so
    a reader neither writes nor locks. Unknown items get a zero row and ``False``.
    """
    out, found, cached = _lookup(store, item_ids)
    missing: dict[str, list[int]] = {}
    texts: dict[str, str | None] = {}
    if encode_missing:
        docs = item_docs(store)
        for pos in np.flatnonzero(found & ~cached):
            h, text = docs[item_ids[pos]]
            missing.setdefault(h, []).append(int(pos))
            texts[h] = text
    if missing:
        hashes = list(missing)
        vecs = np.asarray(store_encoder(store).encode([texts[h] for h in hashes]), np.float32)
        for h, v in zip(hashes, vecs):
            out[missing[h]] = v
    return out, found


def cached_vectors(store, item_ids: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Cached semantic vectors of ``item_ids`` and a mask of the items that have one
    (known items whose current document was encoded); never loads the encoder.

    Examples
    --------
    >>> import tempfile, dynstore, polars as pl
    >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
    >>> _ = store.ingest("items", pl.DataFrame({"item_id": [1], "title": ["red shoe"]}))
    >>> cached_vectors(store, [1, 2])[1].tolist()
    [False, False]
    >>> _ = store.encode()
    >>> cached_vectors(store, [1, 2])[1].tolist()
    [True, False]
    """
    out, _, cached = _lookup(store, item_ids)
    return out, cached


def _lookup(store, item_ids: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, item exists, vector cached) from the semantic cache."""
    _, dim = encoder_info(store)
    docs = item_docs(store)
    idx = _index(store)
    out = np.zeros((len(item_ids), dim), np.float32)
    found = np.zeros(len(item_ids), bool)
    cached = np.zeros(len(item_ids), bool)
    for pos, item in enumerate(item_ids):
        entry = docs.get(item)
        if entry is None:
            continue
        found[pos] = True
        row = idx.hashes.get(entry[0])
        if row is not None:
            out[pos] = idx.vectors[row]
            cached[pos] = True
    return out, found, cached


def item_docs(store) -> dict[Any, tuple[str, str | None]]:
    """item_id -> (doc_hash, document) for the latest items (cached per items version)."""
    items = store._dataset("items")
    inter = store._dataset("interactions") if store.config.behaviour_summary else None
    key = (items.version if items is not None else 0, inter.version if inter is not None else 0,
           store.config.item_text, store.config.behaviour_summary)
    cached = store._cache.get("docs")
    if cached is None or cached[0] != key:
        con = store._views_connection()
        try:
            rows = con.execute("SELECT item_id, doc_hash, document FROM item_documents").fetchall()
        finally:
            con.close()
        cached = (key, {r[0]: (r[1], r[2]) for r in rows})
        store._cache["docs"] = cached
    return cached[1]
