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

import sys
import time
from typing import Any

import numpy as np

from .catalog import Catalog
from .compaction import maybe_compact
from .encoders import check_batch_size
from .results import EncodeResult
from .semcache import encoder_info, record_encoder, semantic_index, store_encoder, write_cache
from .views import views_connection

__all__ = ["encode", "semantic_vectors", "cached_vectors", "item_docs"]

CHUNK = 2048          # most documents per commit
FIRST_CHUNK = 64      # the first commit comes early, whatever the encoder's speed
CHUNK_SECONDS = 10.0  # later chunks are sized to take about this long


def encode(catalog: Catalog, *, all: bool = False, batch_size: int = 64, device: str | None = None,
           progress: bool = False) -> EncodeResult:
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
    >>> (r.stale, r.encoded)
    (2, 1)
    """
    check_batch_size(batch_size)  # before the model loads, not after
    t0 = time.perf_counter()
    enc = store_encoder(catalog, device=device)
    record_encoder(catalog, (enc.id, int(enc.dim)))
    con = views_connection(catalog)
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
            write_cache(catalog, enc.id, [h for h, _ in part], np.asarray(vecs, dtype=np.float32))
            start += len(part)
            rate = len(part) / max(time.perf_counter() - t_part, 1e-3)
            size = int(min(CHUNK, max(FIRST_CHUNK, rate * CHUNK_SECONDS)))
    finally:
        if bar is not None:
            bar.close()
    maybe_compact(catalog, "cache/" + catalog.cache_uri(enc.id).rsplit("/", 1)[-1])
    seconds = time.perf_counter() - t0
    out = {"items": total, "stale": stale, "encoded": len(docs), "reused": total - stale,
           "encoder": enc.id, "device": getattr(enc, "device", "cpu"), "seconds": round(seconds, 3),
           "items_per_s": round(len(docs) / seconds, 1) if seconds > 0 else None}
    return EncodeResult(**out)


def semantic_vectors(catalog: Catalog, item_ids: list[Any], *, encode_missing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Semantic vectors of ``item_ids`` and a mask of which items exist.

    Stale items (no cached vector for their document) are encoded in memory
    when ``encode_missing``, else left as zero rows; nothing is ever written
    here: only :func:`encode` (a writer, under its lock) fills the cache, so
    a reader neither writes nor locks. Unknown items get a zero row and ``False``.
    """
    out, found, cached = _lookup(catalog, item_ids)
    missing: dict[str, list[int]] = {}
    texts: dict[str, str | None] = {}
    if encode_missing:
        docs = item_docs(catalog)
        for pos in np.flatnonzero(found & ~cached):
            h, text = docs[item_ids[pos]]
            missing.setdefault(h, []).append(int(pos))
            texts[h] = text
    if missing:
        hashes = list(missing)
        vecs = np.asarray(store_encoder(catalog).encode([texts[h] for h in hashes]), np.float32)
        for h, v in zip(hashes, vecs):
            out[missing[h]] = v
    return out, found


def cached_vectors(catalog: Catalog, item_ids: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Cached semantic vectors of ``item_ids`` and a mask of the items that have one
    (known items whose current document was encoded); never loads the encoder.

    Examples
    --------
    >>> import tempfile, dynstore, polars as pl
    >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
    >>> _ = store.ingest("items", pl.DataFrame({"item_id": [1], "title": ["red shoe"]}))
    >>> cached_vectors(store.catalog, [1, 2])[1].tolist()
    [False, False]
    >>> _ = store.encode()
    >>> cached_vectors(store.catalog, [1, 2])[1].tolist()
    [True, False]
    """
    out, _, cached = _lookup(catalog, item_ids)
    return out, cached


def _lookup(catalog: Catalog, item_ids: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, item exists, vector cached) from the semantic cache."""
    _, dim = encoder_info(catalog)
    docs = item_docs(catalog)
    idx = semantic_index(catalog)
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


def item_docs(catalog: Catalog) -> dict[Any, tuple[str, str | None]]:
    """item_id -> (doc_hash, document) for the latest items (cached per items version)."""
    items = catalog.dataset("items")
    inter = catalog.dataset("interactions") if catalog.config.behaviour_summary else None
    key = (items.version if items is not None else 0, inter.version if inter is not None else 0,
           catalog.config.item_text, catalog.config.behaviour_summary)
    cached = catalog.memo.docs
    if cached is None or cached[0] != key:
        con = views_connection(catalog)
        try:
            rows = con.execute("SELECT item_id, doc_hash, document FROM item_documents").fetchall()
        finally:
            con.close()
        cached = (key, {r[0]: (r[1], r[2]) for r in rows})
        catalog.memo.docs = cached
    return cached[1]
