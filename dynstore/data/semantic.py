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

import pyarrow as pa

from dynstore.storage.catalog import Catalog, open_catalog
from dynstore.encoders import check_batch_size
from dynstore.errors import DynstoreError
from dynstore.storage.lancescan import SCAN_IO_BYTES
from dynstore.results import EncodeResult
from dynstore.encoders.cache import cache_dataset, encoder_info, record_encoder, semantic_index, store_encoder, write_cache
from dynstore.data.views import views_connection

__all__ = ["encode", "encode_on_ray", "DocEncoder", "semantic_vectors", "cached_vectors", "item_docs",
           "CatalogueVectors"]

VECTOR_SCAN_ROWS = 1024  # rows per batch when a catalogue's vectors are read in one pass

CHUNK = 2048          # most documents per commit
FIRST_CHUNK = 64      # the first commit comes early, whatever the encoder's speed
CHUNK_SECONDS = 10.0  # later chunks are sized to take about this long
RAY_BLOCK = 2048      # most documents per actor call on the Ray engine


def encode(catalog: Catalog, *, all: bool = False, batch_size: int = 64, device: str | None = None,
           progress: bool = False, engine: str = "local", workers: int | None = None) -> EncodeResult:
    """Encode the stale items of ``store`` (every item with ``all``).

    Returns counts: ``items`` (total), ``stale``, ``encoded`` (distinct
    documents sent to the encoder), ``reused`` (items served from the cache),
    plus ``seconds`` and ``items_per_s``. ``engine="ray"`` encodes on a Ray
    actor pool of ``workers`` actors (see :func:`encode_on_ray`); the cache it
    fills is the same.

    Examples
    --------
    >>> import tempfile, dynstore, polars as pl
    >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
    >>> _ = store.ingest("items", pl.DataFrame({"item_id": [1, 2], "title": ["red shoe", "red shoe"]}))
    >>> r = store.encode()
    >>> (r.stale, r.encoded)
    (2, 1)
    """
    from dynstore.data.compaction import maybe_compact  # the write path's: imported here, not by readers
    from dynstore.engines.ray import check_engine, require_ray

    check_batch_size(batch_size)  # before the model loads, not after
    if check_engine(engine) == "ray":
        require_ray()  # the one-line error before any work
    t0 = time.perf_counter()
    enc, enc_id, (total, stale, docs) = _stale_and_encoder(catalog, all, device, engine)
    bar = None
    if progress and docs:
        from tqdm import tqdm

        bar = tqdm(total=len(docs), unit="doc", desc="encoding", file=sys.stderr, dynamic_ncols=True)
    extra: dict[str, Any] = {}
    try:
        if enc is not None:
            _encode_local(catalog, enc, docs, batch_size, bar)
            used_device = getattr(enc, "device", "cpu")
        elif engine == "local":
            used_device = "none"  # nothing to encode: no encoder loaded, no device chosen
        else:
            used_device, n = encode_on_ray(catalog, enc_id, docs, batch_size=batch_size, device=device,
                                           workers=workers, bar=bar)
            extra = {"engine": "ray", "workers": n}
    finally:
        if bar is not None:
            bar.close()
    maybe_compact(catalog, "cache/" + catalog.cache_uri(enc_id).rsplit("/", 1)[-1])
    seconds = time.perf_counter() - t0
    out = {"items": total, "stale": stale, "encoded": len(docs), "reused": total - stale,
           "encoder": enc_id, "device": used_device, "seconds": round(seconds, 3),
           "items_per_s": round(len(docs) / seconds, 1) if seconds > 0 else None}
    return EncodeResult(**out, **extra)


def _stale_and_encoder(catalog: Catalog, all: bool, device: str | None, engine: str):
    """``(encoder or None, encoder id, (items, stale, documents))`` for :func:`encode`.

    What is stale needs only the encoder's id (recorded in the config, or read
    from the model's files): the model itself is loaded only when there are
    documents to encode here (``engine="local"``), so ``encode`` with nothing
    stale imports neither torch nor transformers.
    """
    enc_id, dim = encoder_info(catalog)
    record_encoder(catalog, (enc_id, dim))
    found = _documents(catalog, all)
    enc = store_encoder(catalog, device=device) if engine == "local" and found[2] else None
    if enc is not None and (enc.id, int(enc.dim)) != (enc_id, dim):  # the files misled: trust the model
        enc_id = enc.id
        record_encoder(catalog, (enc_id, int(enc.dim)))
        found = _documents(catalog, all)
    return enc, enc_id, found


def _documents(catalog: Catalog, all: bool) -> tuple[int, int, list[tuple[str, str | None]]]:
    """``(items, stale items, [(doc_hash, document)])``: the distinct documents to encode."""
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
    return total, stale, docs


def _encode_local(catalog: Catalog, enc, docs: list, batch_size: int, bar) -> None:
    """Encode ``docs`` in this process, committing chunks that grow to about ``CHUNK_SECONDS``."""
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


class DocEncoder:
    """A Ray actor holding the store's encoder: opens the store read-only (once),
    loads the encoder, and turns blocks of ``(doc_hash, document)`` into
    ``(doc_hash, vector)``. Refuses to run when its encoder is not the driver's."""

    def __init__(self, path: str, encoder_id: str, device: str, batch_size: int):
        self.encoder = store_encoder(open_catalog(path, read_only=True), device=device)
        if self.encoder.id != encoder_id:
            raise DynstoreError(f"{path}: a worker's encoder is {self.encoder.id}, the driver's {encoder_id}; "
                                "rerun encode (the store's encoder changed)")
        self.batch_size = batch_size

    def __call__(self, block: pa.Table) -> pa.Table:
        vecs = np.asarray(self.encoder.encode(block.column("document").to_pylist(), batch_size=self.batch_size),
                          np.float32)
        flat = pa.array(vecs.reshape(-1), pa.float32())
        return pa.table({"doc_hash": block.column("doc_hash"),
                         "vector": pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1])})


def encode_on_ray(catalog: Catalog, encoder_id: str, docs: list, *, batch_size: int = 64,
                  device: str | None = None, workers: int | None = None, bar=None) -> tuple[str, int]:
    """Encode ``docs`` on a Ray actor pool (:class:`DocEncoder`, one GPU each when the
    cluster has GPUs: fp16 by the ``auto`` precision) and commit the vectors to the
    cache as they come back, in chunks of at most :data:`CHUNK`: an interrupted run
    keeps what was committed. Returns ``(device, actors)``."""
    from dynstore.engines.ray import block_rows, blocks, cluster_gpus, init_ray, map_actors, pool_size

    if not docs:
        return (device or "cpu"), 0
    init_ray()
    gpus = cluster_gpus() if device != "cpu" else 0
    if device == "cuda" and not gpus:
        raise DynstoreError("--device cuda: the Ray cluster has no GPU")
    used = "cuda" if gpus else "cpu"
    table = pa.table({"doc_hash": pa.array([h for h, _ in docs], pa.string()),
                      "document": pa.array([d for _, d in docs], pa.string())})
    parts = blocks(table, block_rows(len(docs), workers, 64, RAY_BLOCK))
    kwargs = {"path": str(catalog.path), "encoder_id": encoder_id, "device": used, "batch_size": batch_size}
    pending: list[pa.Table] = []
    for out in map_actors(parts, DocEncoder, kwargs, workers=workers, num_gpus=1 if gpus else 0):
        pending.append(out)
        if bar is not None:
            bar.update(out.num_rows)
        if sum(t.num_rows for t in pending) >= CHUNK:
            _write_vectors(catalog, encoder_id, pending)
            pending = []
    if pending:
        _write_vectors(catalog, encoder_id, pending)
    return used, pool_size(workers, len(parts))


def _write_vectors(catalog: Catalog, encoder_id: str, parts: list[pa.Table]) -> None:
    t = pa.concat_tables(parts)
    dim = t.schema.field("vector").type.list_size
    vecs = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    write_cache(catalog, encoder_id, t.column("doc_hash").to_pylist(), vecs)


def semantic_vectors(catalog: Catalog, item_ids: list[Any], *, encode_missing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Semantic vectors of ``item_ids`` and a mask of which items exist.

    Stale items (no cached vector for their document) are encoded in memory
    when ``encode_missing``, else left as zero rows; nothing is ever written
    here: only :func:`encode` (a writer, under its lock) fills the cache, so
    a reader neither writes nor locks. Unknown items get a zero row and ``False``.
    """
    out, found, cached = _lookup(catalog, item_ids)
    if encode_missing:
        _encode_stale(catalog, [item_ids[pos] for pos in np.flatnonzero(found & ~cached)],
                      np.flatnonzero(found & ~cached), out)
    return out, found


def _encode_stale(catalog: Catalog, item_ids: list[Any], rows: np.ndarray, out: np.ndarray) -> None:
    """Encode the documents of ``item_ids`` (known items without a cached vector) in memory
    into ``out[rows]``: each distinct document once, in the order of its first item."""
    if not len(rows):
        return
    docs = item_docs(catalog)
    missing: dict[str, list[int]] = {}
    texts: dict[str, str | None] = {}
    for item, pos in zip(item_ids, rows):
        h, text = docs[item]
        missing.setdefault(h, []).append(int(pos))
        texts[h] = text
    hashes = list(missing)
    vecs = np.asarray(store_encoder(catalog).encode([texts[h] for h in hashes]), np.float32)
    for h, v in zip(hashes, vecs):
        out[missing[h]] = v


def cached_vectors(catalog: Catalog, item_ids: list[Any],
                   encoder: tuple[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cached semantic vectors of ``item_ids`` and a mask of the items that have one
    (known items whose current document was encoded); never loads the encoder.
    ``encoder`` (``(id, dim)``, default the store's) names the cache: a version serves
    the vectors of the encoder it was built with.

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
    out, _, cached = _lookup(catalog, item_ids, encoder, _doc_hashes(catalog, item_ids))
    return out, cached


def _doc_hashes(catalog: Catalog, item_ids: list[Any]) -> dict[Any, tuple[str, None]]:
    """item_id -> (doc_hash, None) of ``item_ids``: their documents are hashed, none
    travels to Python (serving looks vectors up; a document may be megabytes)."""
    if not item_ids:
        return {}
    con = views_connection(catalog)
    try:
        con.register("_dynstore_wanted", pa.table({"item_id": list(item_ids)}))
        rows = con.execute("SELECT item_id, doc_hash FROM item_documents "
                           "WHERE item_id IN (SELECT item_id FROM _dynstore_wanted)").fetchall()
    finally:
        con.close()
    return {r[0]: (r[1], None) for r in rows}


def _lookup(catalog: Catalog, item_ids: list[Any], encoder: tuple[str, int] | None = None,
            docs: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, item exists, vector cached) from the semantic cache (of ``encoder``)."""
    _, dim = encoder or encoder_info(catalog)
    docs = item_docs(catalog) if docs is None else docs
    idx = semantic_index(catalog, encoder)
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
    cached = catalog.memo.get("docs")
    if cached is None or cached[0] != key:
        con = views_connection(catalog)
        try:
            rows = con.execute("SELECT item_id, doc_hash, document FROM item_documents").fetchall()
        finally:
            con.close()
        cached = (key, {r[0]: (r[1], r[2]) for r in rows})
        catalog.memo.put("docs", cached)
    return cached[1]


class CatalogueVectors:
    """The semantic vectors of a catalogue's worth of items, read from the cache
    dataset without holding a copy of it.

    :func:`semantic_vectors` looks items up in the in-memory cache
    (:func:`~dynstore.encoders.cache.semantic_index`, every cached vector) through the item
    documents (:func:`item_docs`, every document's text): two catalogue-sized copies
    beside the vectors asked for. Building a version or a training window reads each
    item once, so this maps every item to its row of the cache (item -> doc hash ->
    row, as Arrow arrays) and reads the vectors from the dataset: a block of items at
    a time (:meth:`block`) or all of them in one pass (:meth:`matrix`). The numbers
    are :func:`semantic_vectors`' (a stale item is encoded in memory, nothing written).

    Parameters
    ----------
    catalog : Catalog
    item_ids : list or pyarrow.Array
        The items, in the order of the rows returned.

    Attributes
    ----------
    hashes : pyarrow.StringArray
        Each item's document hash (null for an unknown item).
    found : bool [n]
        Which items exist.
    """

    def __init__(self, catalog: Catalog, item_ids, encoder: tuple[str, int] | None = None):
        import pyarrow.compute as pc

        self.catalog = catalog
        enc_id, self.dim = encoder or encoder_info(catalog)
        #: stale items are encoded in memory only by the store's own encoder; with
        #: another's (a version built before an encoder change) they stay zero rows
        self.encodes = encoder is None or tuple(encoder) == tuple(encoder_info(catalog))
        con = views_connection(catalog)
        try:
            docs = con.sql("SELECT item_id, doc_hash FROM item_documents").to_arrow_table()
        finally:
            con.close()
        keys = docs.column("item_id").combine_chunks()
        ids = item_ids.combine_chunks() if isinstance(item_ids, pa.ChunkedArray) else item_ids
        self.ids = pa.array(ids, keys.type) if not isinstance(ids, pa.Array) else ids.cast(keys.type)
        at = pc.index_in(self.ids, value_set=keys)
        self.found = at.is_valid().to_numpy(zero_copy_only=False)
        self.hashes = docs.column("doc_hash").combine_chunks().take(at)
        del docs, keys, at
        # one version of the cache for the row numbers and the reads: a row is an
        # offset into that version (deleted rows skipped, as ``take`` counts them)
        self.ds = cache_dataset(catalog, enc_id)
        if self.ds is None:
            self.row = np.full(len(self.ids), -1, np.int64)
        else:
            # the doc hash is the cache's key (``write_cache`` upserts on it): one row each
            cached = self.ds.to_table(columns=["doc_hash"]).column("doc_hash").combine_chunks()
            self.row = pc.index_in(self.hashes, value_set=cached).fill_null(-1).to_numpy().astype(np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [stop - start, dim], found)`` of items ``start:stop``: their rows of
        the cache taken from the dataset, memory following the block."""
        out = np.zeros((stop - start, self.dim), np.float32)
        rows = self.row[start:stop]
        have = rows >= 0
        if have.any():
            uniq, inv = np.unique(rows[have], return_inverse=True)
            col = self.ds.take(uniq, columns=["vector"]).column("vector").combine_chunks()
            out[have] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)[inv]
        self._encode_stale(out, start, self.found[start:stop] & ~have)
        return out, self.found[start:stop]

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [n, dim], found)`` of every item, filled in one pass over the cache
        batch by batch: the result is the only catalogue-sized array."""
        out = np.zeros((len(self.ids), self.dim), np.float32)
        have = np.flatnonzero(self.row >= 0)
        order = have[np.argsort(self.row[have], kind="stable")]
        rows = self.row[order]
        offset = 0
        # small batches: what the scan frees stays with the allocators until the end, and
        # Lance's default batches left 80-100 MB more of it at 200,000 items (no slower)
        scan = self.ds.to_batches(columns=["vector"], batch_size=VECTOR_SCAN_ROWS,
                                  io_buffer_size=SCAN_IO_BYTES) if have.size else ()
        for batch in scan:
            m = batch.num_rows
            lo, hi = np.searchsorted(rows, [offset, offset + m])
            if hi > lo:
                vecs = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(m, self.dim)
                out[order[lo:hi]] = vecs[rows[lo:hi] - offset]
            offset += m
        self._encode_stale(out, 0, self.found & (self.row < 0))
        return out, self.found

    def _encode_stale(self, out: np.ndarray, start: int, stale: np.ndarray) -> None:
        rows = np.flatnonzero(stale)
        if not self.encodes:
            return
        _encode_stale(self.catalog, [self.ids[start + int(p)].as_py() for p in rows], rows, out)
