"""A version's vector index: maximum inner-product search through Lance's IVF indexes.

The settings were chosen by a measured grid (``benchmarks/bench_index_grid.py``)
and are recorded with each index, so serving reads them from the index itself.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from dynstore.storage.catalog import Catalog
from dynstore.storage.lancescan import SCAN_IO_BYTES, vector_width

__all__ = ["build_index", "create_vector_index", "index_settings", "recorded_index_settings", "model_dim",
           "BUILD_BATCH"]

BUILD_BATCH = 65536  # rows read (and items fused and written) per batch


def model_dim(emb, version: int | None = None) -> int:
    """Width of the fused vectors in the embeddings dataset (of ``version``: after an
    encoder of another width, the versions' widths differ)."""
    typ = emb.schema.field("vector").type
    if pa.types.is_fixed_size_list(typ) or version is None:
        return typ.list_size
    t = emb.to_table(columns=["vector"], filter=f"version = {int(version)}", limit=1)
    return vector_width(t.column("vector"))


#: the augmented vectors are padded with zeros to a multiple of this width
#: (PQ sub-vectors of 8 dimensions; zeros change no distance)
INDEX_PAD = 16
#: below this many rows the index is IVF_FLAT: too few rows to train PQ codebooks
INDEX_PQ_MIN_ROWS = 50_000
#: search settings of the index, recorded with each index and read by serving:
#: the fastest of the grid with recall@10 >= 0.95 at 1M items, d = 384
#: (benchmarks/bench_index_grid.py; README, Recommendation): IVF_PQ, sqrt(n)
#: partitions, 8-dimension sub-vectors, 10 partitions probed, 100 candidates
#: rescored exactly -- API p50 5.8 ms, p99 8.4 ms, recall@10 0.995
INDEX_NPROBES = 10
INDEX_CANDIDATES = 100


def index_settings(n_rows: int, width: int) -> dict:
    """Build and search settings of a vector index over ``n_rows`` augmented vectors of
    ``width`` dimensions (padded: see :data:`INDEX_PAD`).

    IVF_PQ: ``sqrt(n)`` partitions, PQ sub-vectors of 8 dimensions; a query probes
    ``nprobes`` partitions and takes ``candidates`` rows by the PQ distance, which
    ``recommend`` rescores exactly (the true score, every term), so the lists are
    ranked by the true score. Small catalogues get IVF_FLAT (exact distances).
    """
    parts = max(16, int(np.sqrt(n_rows)))
    if n_rows < INDEX_PQ_MIN_ROWS:
        return {"index_type": "IVF_FLAT", "num_partitions": parts,
                "nprobes": max(8, int(parts * 0.2)), "candidates": 0}
    return {"index_type": "IVF_PQ", "num_partitions": parts, "num_sub_vectors": width // 8,
            "nprobes": INDEX_NPROBES, "candidates": INDEX_CANDIDATES}


INDEX_SETTINGS_KEY = "dynstore.index"  # key of the settings in the index dataset's config


def build_index(catalog: Catalog, version: int, settings: dict | None = None) -> dict:
    """A Lance IVF index for maximum inner-product search over ``[w_i, b_i]``.

    Scoring is ``w_i · x_u + b_i = [w_i, b_i] · [x_u, 1]``. IVF partitions
    are L2 k-means cells, so the vectors get one more coordinate
    ``sqrt(M² - |[w_i, b_i]|²)`` (M the largest norm): then the L2 distance to
    ``[x_u, 1, 0]`` is smallest exactly where the score is largest. The
    version's rows are read back in batches, twice (the largest norm, then the
    vectors), so memory follows a batch, not the catalogue.

    The settings (:func:`index_settings` unless given) are recorded in the
    index dataset's config under :data:`INDEX_SETTINGS_KEY`; serving reads
    them from there. Returns them.
    """
    import lance

    emb = catalog.dataset("embeddings")

    def rows():
        # a quarter of a build batch: the norms take float64 copies, 16 bytes a value
        for batch in emb.to_batches(columns=["vector", "bias"], filter=f"version = {int(version)}",
                                    batch_size=BUILD_BATCH // 4, io_buffer_size=SCAN_IO_BYTES):
            dim = vector_width(batch.column("vector"))
            W = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            b = batch.column("bias").to_numpy(zero_copy_only=False)
            aug = np.hstack([W, b[:, None]]).astype(np.float32, copy=False)
            yield aug, (aug.astype(np.float64) ** 2).sum(axis=1)

    top = max((float(sq.max()) for _, sq in rows() if sq.size), default=0.0)
    width = -(-(model_dim(emb, version) + 2) // INDEX_PAD) * INDEX_PAD
    schema = pa.schema([("row", pa.int64()), ("vector", pa.list_(pa.float32(), width))])

    def augmented():
        n = 0
        for aug, sq in rows():
            full = np.zeros((len(aug), width), np.float32)
            full[:, :aug.shape[1]] = aug
            full[:, aug.shape[1]] = np.sqrt(np.maximum(top - sq, 0.0))
            yield pa.record_batch([pa.array(np.arange(n, n + len(full), dtype=np.int64)),
                                   pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), width)],
                                  schema=schema)
            n += len(full)

    ds = lance.write_dataset(pa.RecordBatchReader.from_batches(schema, augmented()),
                             catalog.index_uri(version), mode="overwrite", storage_options=catalog.storage_options)
    settings = dict(settings or index_settings(ds.count_rows(), width))
    create_vector_index(ds, settings)
    return settings


def create_vector_index(ds, settings: dict) -> None:
    """(Re)create the index of ``settings`` on an augmented dataset and record the settings."""
    build = {"num_partitions": int(settings["num_partitions"])}
    for key in ("num_sub_vectors", "m", "ef_construction"):
        if settings.get(key):
            build[key] = int(settings[key])
    ds.create_index("vector", index_type=settings["index_type"], metric="L2", replace=True, **build)
    ds.update_config({INDEX_SETTINGS_KEY: json.dumps(settings)})


def recorded_index_settings(ds) -> dict:
    """The settings recorded with an index (:func:`build_index`); older indexes recorded
    none: theirs (IVF_FLAT, ``sqrt(n)`` partitions, a fifth of them probed)."""
    raw = (ds.config() or {}).get(INDEX_SETTINGS_KEY)
    if raw:
        return json.loads(raw)
    parts = max(16, int(np.sqrt(ds.count_rows())))
    return {"index_type": "IVF_FLAT", "num_partitions": parts, "nprobes": max(8, int(parts * 0.2)),
            "candidates": 0}


