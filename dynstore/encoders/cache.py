"""The semantic cache and the encoder's identity as the store knows it.

The cache is one Lance dataset per encoder (``cache/<encoder-id>.lance``)
keyed by the hash of the document text, so identical documents are encoded
once and a new encoder starts an empty cache while the old vectors stay.
The encoder's id and dimension are recorded in the config, so readers know
them without loading the model.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dynstore.storage.catalog import TABLES, Catalog
from dynstore.encoders import encoder_fingerprint, encoder_identity, get_encoder

__all__ = ["store_encoder", "encoder_info", "record_encoder", "cache_dataset", "register_cache",
           "write_cache", "SemanticIndex", "semantic_index", "snapshot", "pinned_at"]


def store_encoder(catalog: Catalog, device: str | None = None):
    """The store's encoder (loaded once per process)."""
    cfg = catalog.config
    return get_encoder(cfg.encoder_spec(catalog.storage.local_dir("")), device=device, max_length=cfg.max_length,
                       precision=cfg.precision)


def encoder_info(catalog: Catalog) -> tuple[str, int]:
    """(id, dim) of the store's encoder, without loading it where possible.

    In order: the id the store config recorded, while its fingerprint (spec,
    max_length, sizes and mtimes of the model files) still matches; the
    model's files (:func:`~dynstore.encoders.encoder_identity`: hashes the
    weights, imports no torch); loading the encoder (a registered factory).
    """
    cfg = catalog.config
    spec, max_length = cfg.encoder_spec(catalog.storage.local_dir("")), cfg.max_length
    fp = encoder_fingerprint(spec, max_length=max_length, precision=cfg.precision)
    hit = _INFO.get(fp)
    if hit is None:
        if cfg.encoder_id and cfg.encoder_dim > 0 and cfg.encoder_fingerprint == fp:
            hit = (cfg.encoder_id, int(cfg.encoder_dim))
        else:
            hit = encoder_identity(spec, max_length=max_length, precision=cfg.precision)
            if hit is None:
                enc = store_encoder(catalog)
                hit = (enc.id, int(enc.dim))
        _INFO[fp] = hit
    return hit


_INFO: dict[str, tuple[str, int]] = {}


def record_encoder(catalog: Catalog, identity: tuple[str, int] | None = None) -> None:
    """Write the encoder's id, dim and fingerprint into the store config (writers only).

    Skipped while the in-memory encoder differs from the config file's
    (a fine-tuned encoder on trial during ``refresh``).
    """
    if catalog.read_only:
        return
    cfg = catalog.config
    fp = encoder_fingerprint(cfg.encoder_spec(catalog.storage.local_dir("")), max_length=cfg.max_length,
                             precision=cfg.precision)
    enc_id, dim = identity or encoder_info(catalog)
    if (cfg.encoder_id, cfg.encoder_dim, cfg.encoder_fingerprint) == (enc_id, dim, fp):
        return
    with catalog.lock("config"):
        disk = catalog.load_config()
        if (disk.model, disk.max_length, disk.precision) != (cfg.model, cfg.max_length, cfg.precision):
            return
        disk.encoder_id, disk.encoder_dim, disk.encoder_fingerprint = enc_id, int(dim), fp
        catalog.save_config(disk)
    catalog.config = disk
    if catalog.latest is not catalog:
        catalog.latest.config = disk


def cache_dataset(catalog: Catalog, encoder_id: str | None = None):
    """The semantic cache of ``encoder_id`` (default: the store's encoder), or None."""
    return catalog.cache_dataset(encoder_id or encoder_info(catalog)[0])


def cache_schema(dim: int) -> pa.Schema:
    return pa.schema([("doc_hash", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def register_cache(catalog: Catalog, con) -> None:
    """Expose the current encoder's cache to SQL as ``_dynstore_semantic``."""
    enc_id, dim = encoder_info(catalog)
    ds = cache_dataset(catalog, enc_id)
    con.register("_dynstore_semantic", ds if ds is not None else cache_schema(dim).empty_table())


def write_cache(catalog: Catalog, enc_id: str, hashes: list[str], vectors: np.ndarray) -> None:
    import lance

    dim = vectors.shape[1]
    table = pa.table({"doc_hash": pa.array(hashes, pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)},
                     schema=cache_schema(dim))
    ds = cache_dataset(catalog, enc_id)
    if ds is None:
        lance.write_dataset(table, catalog.cache_uri(enc_id), mode="create", storage_options=catalog.storage_options)
    else:
        # Upsert: `encode --all` rewrites vectors of documents already cached.
        ds.merge_insert("doc_hash").when_matched_update_all().when_not_matched_insert_all().execute(table)


class SemanticIndex:
    """In-memory view of the cache for fast lookups (one per cache version)."""

    def __init__(self, ds, dim: int):
        if ds is None:
            self.hashes: dict[str, int] = {}
            self.vectors = np.zeros((0, dim), np.float32)
            return
        # filled batch by batch: reading the whole table and then combining its chunks
        # held the vectors twice
        self.vectors = np.empty((ds.count_rows(), dim), np.float32)
        self.hashes = {}
        n = 0
        for batch in ds.to_batches(columns=["doc_hash", "vector"]):
            m = batch.num_rows
            self.vectors[n:n + m] = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(m, dim)
            self.hashes.update(zip(batch.column("doc_hash").to_pylist(), range(n, n + m)))
            n += m
        self.vectors = self.vectors[:n]


def semantic_index(catalog: Catalog, encoder: tuple[str, int] | None = None) -> SemanticIndex:
    """The cache of the store's encoder (or ``encoder``: ``(id, dim)``, a version's) in
    memory (rebuilt when the cache commits)."""
    enc_id, dim = encoder or encoder_info(catalog)
    ds = cache_dataset(catalog, enc_id)
    key = ("semantic", enc_id, ds.version if ds is not None else 0)
    idx = catalog.memo.get("semantic")
    if idx is None or idx[0] != key:
        idx = catalog.memo.put("semantic", (key, SemanticIndex(ds, dim)))
    return idx[1]



def snapshot(catalog: Catalog) -> dict[str, int]:
    """Committed version of every dataset as ``catalog`` sees it (what a new query reads)."""
    out = {name: catalog.version_of(name) for name in TABLES + ("embeddings", "versions", "batch_recommendations")}
    cache = cache_dataset(catalog)
    out["semantic"] = cache.version if cache is not None else 0
    return out


def pinned_at(catalog: Catalog, at: dict[str, int]) -> Catalog:
    """A read view of ``catalog`` at the versions ``at`` (what :func:`snapshot` returned,
    perhaps in another process): the tables, the registry, the embeddings and the
    store encoder's semantic cache."""
    view = catalog.pinned(at)
    if at.get("semantic"):
        uri = view.cache_uri(encoder_info(view)[0])
        view.pin(uri, view.latest.open(uri, at["semantic"]))
    return view
