"""Embedding versions: fused item embeddings and parameters, written and read back.

A version is (1) a row in ``versions.lance`` (:mod:`dynstore.storage.registry`), (2)
one row per item in ``embeddings.lance`` holding the fused vector ``w_i`` and
bias ``b_i``, and (3) ``models/v<N>.safetensors`` + ``models/v<N>.json`` with
the fusion and user-model parameters and the attribute-feature specs.
Embeddings and parameters are written first and the registry row last, in one
Lance commit, so a reader (or a crash) sees the whole version or none of it.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dynstore.storage import switch
from dynstore.storage.catalog import Catalog
from dynstore.encoders import encoder_fingerprint
from dynstore.errors import StoreBusy, StoreCorrupt, VersionNotFound, first_line
from dynstore.model.features import FeatureSpec
from dynstore.memory import release_freed
from dynstore.storage.lancescan import vector_width
from dynstore.model.fusion import FusionModel
from dynstore.results import RollbackResult
from dynstore.storage.registry import (VERDICT_OF_STATUS, current_version, embedding_schema, list_versions, next_version,
                       registry_table, write_registry)
from dynstore.encoders.cache import encoder_info, record_encoder
from dynstore.data.semantic import CatalogueVectors
from dynstore.versions.index import build_index

__all__ = ["build_version", "rollback", "load_version", "version_loaded", "LoadedVersion", "load_parameters",
           "VersionParameters", "items_table", "users_table"]

# items fused and written per batch of a version's rows: a batch's vectors, fused rows,
# their temporaries and Arrow copies are what the write holds beyond Lance's own buffers;
# 16,384 rows (not the index build's 65,536) took the first version of a 200,000-item
# store from 909 to 627 MB while its rows were written, in the same time (5.7-6.2 s)
ROWS_BATCH = 16_384


def items_table(catalog: Catalog) -> pa.Table:
    """Every item row (an empty ``item_id`` column before the first ingest)."""
    ds = catalog.dataset("items")
    return ds.to_table() if ds is not None else pa.table({"item_id": pa.array([], pa.int64())})


def users_table(catalog: Catalog) -> pa.Table:
    """Every user row (an empty ``user_id`` column before the first ingest)."""
    ds = catalog.dataset("users")
    return ds.to_table() if ds is not None else pa.table({"user_id": pa.array([], pa.int64())})


def build_version(catalog: Catalog, model, item_spec, user_spec, *, parent: int | None, status: str,
                  train_window: str = "", counts: dict | None = None, metrics: dict | None = None,
                  residuals: tuple | None = None, snapshot: dict | None = None,
                  items: pa.Table | None = None, verdict: str | None = None,
                  switch_encoder: bool = False) -> int:
    """Write a new version (embeddings, parameters, registry row); return its number.

    ``verdict`` (see :data:`~dynstore.storage.registry.VERDICTS`) defaults from
    ``status``: current -> promoted, candidate -> passed, rejected -> rejected.

    ``switch_encoder`` makes the encoder in ``catalog.config.model`` (a
    fine-tuned one) the store's, in the same registry commit (see
    :mod:`dynstore.storage.switch`).

    ``residuals`` is ``(R, rb)`` aligned with the rows of ``items``: the
    collaborative residuals (and version 1's popularity prior in ``rb``);
    None fuses every item from content alone.
    """
    items = items if items is not None else items_table(catalog)
    enc_id, dim = encoder_info(catalog)
    with catalog.lock("versions", wait=30):
        settle_switch_keeping(catalog)
        number = next_version(catalog)
        tensors = _write_parameters(catalog, number, model, item_spec, user_spec, enc_id)
        _write_rows(catalog, number, model, item_spec, items, residuals)
        if items.num_rows >= catalog.config.index_min_items:
            # the rows are written and the index reads them back: the semantic cache's
            # vectors and the item documents (read again on their next use) would only
            # sit under the k-means, a catalogue's worth of memory
            catalog.memo.invalidate("semantic", "docs")
            release_freed()  # what the rows' writer freed would count under the k-means
            build_index(catalog, number)
        rows = registry_table(catalog).to_pylist()
        if status == "current":
            for r in rows:
                if r["status"] == "current":
                    r["status"] = "retired"
        rows.append({
            "version": number, "parent": parent, "status": status,
            "created": _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None),
            "encoder": enc_id, "alpha": float(np.ravel(tensors["alpha"])[0]) if "alpha" in tensors else None,
            "train_window": train_window, "counts": json.dumps(counts or {}),
            "metrics": json.dumps(metrics or {}), "snapshot": json.dumps(snapshot or {}),
            "verdict": verdict or VERDICT_OF_STATUS.get(status, status),
        })
        _commit_registry(catalog, rows, number, (enc_id, dim) if switch_encoder else None)
    return number


def _write_parameters(catalog: Catalog, number: int, model, item_spec, user_spec, enc_id: str) -> dict:
    """``models/v<N>.safetensors`` and ``v<N>.json``; returns the tensors."""
    from safetensors.numpy import save

    tensors, meta = model.state()
    meta = {"model": meta, "item_features": item_spec.to_dict(), "user_features": user_spec.to_dict(),
            "encoder": enc_id, "encoder_model": catalog.config.model, "version": number}
    # parameters keep their dtype (the item-item component's indices are integers)
    catalog.storage.write_bytes(catalog.model_name(number),
                                save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))
    catalog.storage.write_bytes(catalog.model_name(number, ".json"), json.dumps(meta, indent=1).encode())
    return tensors


def _write_rows(catalog: Catalog, number: int, model, item_spec, items: pa.Table, residuals) -> None:
    """Append the version's rows to ``embeddings.lance``, streamed in batches:
    peak memory follows a batch, not the catalogue."""
    import lance

    schema = embedding_schema(catalog, model.d)
    emb = catalog.dataset("embeddings")
    batches = _fused_batches(catalog, model, item_spec, items, residuals, number, schema)
    mode = "append" if emb is not None else "create"
    if emb is not None and not emb.schema.field("vector").type.equals(schema.field("vector").type):
        # a version of an encoder of another width (`config --model`): every version's
        # vectors become variable-length lists, the old rows rewritten in the same commit
        batches, schema, mode = _widened(emb, batches, schema)
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches), catalog.uri("embeddings"),
                        mode=mode, storage_options=catalog.storage_options)


def _widened(emb, batches, schema: pa.Schema) -> tuple[Any, pa.Schema, str]:
    """``(batches, schema, mode)`` that write ``batches`` into ``emb`` with variable-length
    vectors: an append when ``emb`` already has them, else an overwrite that carries every
    existing row over (one commit: a reader sees the old dataset or the new one whole)."""
    wide = schema.set(schema.get_field_index("vector"), pa.field("vector", pa.list_(pa.float32())))
    mode = "append" if pa.types.is_list(emb.schema.field("vector").type) else "overwrite"
    old = emb.to_batches(batch_size=ROWS_BATCH) if mode == "overwrite" else iter(())

    def rows():
        for batch in itertools.chain(old, batches):
            yield batch.select(wide.names).cast(wide)

    return rows(), wide, mode


def _commit_registry(catalog: Catalog, rows: list[dict], number: int, new_encoder: tuple | None) -> None:
    """The registry commit that publishes a version (and switches the encoder with it)."""
    from dynstore.data.compaction import maybe_compact  # the write path's: readers of versions never import it

    if new_encoder is not None:
        cfg = catalog.config
        fp = encoder_fingerprint(cfg.encoder_spec(catalog.storage.local_dir("")), max_length=cfg.max_length,
                                 precision=cfg.precision)
        begin_switch(catalog, number, cfg.model, (*new_encoder, fp))
    write_registry(catalog, rows)
    if new_encoder is not None:
        _after_commit(settle_switch, catalog)
    maybe_compact(catalog, "embeddings")
    maybe_compact(catalog, "versions")


def _after_commit(step, catalog: Catalog) -> None:
    """Tidy the config after the registry commit: a busy config must not turn the
    committed command into a failure. Left undone, a pending switch is resolved by
    every reader and settled by the next registry writer (see :mod:`dynstore.storage.switch`),
    and a stale encoder id is recomputed (its fingerprint no longer matches)."""
    try:
        step(catalog)
    except StoreBusy:
        pass


def _fused_batches(catalog: Catalog, model, item_spec, items: pa.Table, residuals, number: int, schema: pa.Schema):
    """Record batches of a version's rows: each item's fused vector and static bias."""
    # each block's vectors are read from the cache's dataset: neither the in-memory cache
    # nor the item documents (two catalogue-sized copies) are held while the rows stream out
    vectors = CatalogueVectors(catalog, items.column("item_id"))
    for start in range(0, items.num_rows, ROWS_BATCH):
        part = items.slice(start, ROWS_BATCH)
        n = part.num_rows
        V, _ = vectors.block(start, start + n)
        res = None if residuals is None else tuple(np.asarray(r)[start:start + n] for r in residuals)
        Wf, bias = model.item_side(V, item_spec.transform(part), res)
        del V
        yield pa.record_batch([
            pa.array(np.full(n, number, np.int64)),
            part.column("item_id").combine_chunks().cast(schema.field("item_id").type),  # no Python objects
            vectors.hashes.slice(start, n).cast(pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(Wf.astype(np.float32, copy=False).reshape(-1)),
                                              Wf.shape[1]),
            pa.array(bias.astype(np.float32)),
        ], schema=schema)


def rollback(catalog: Catalog, version: int) -> RollbackResult:
    """Make ``version`` current; the previous current becomes ``retired``.

    Only the serving status changes: each version keeps its verdict, so a
    rejected version served for a while and retired again still reads
    ``rejected``. Rolling back to a version refresh rejected returns a
    ``"warning"`` saying so.
    """
    with catalog.lock("versions", wait=30):
        settle_switch_keeping(catalog)
        rows = registry_table(catalog).to_pylist()
        target = next((r for r in rows if r["version"] == version), None)
        if target is None:
            have = ", ".join(str(r["version"]) for r in sorted(rows, key=lambda r: r["version"])) or "none"
            raise VersionNotFound(f"no version {version} in {catalog.path} (versions: {have})")
        previous = next((r["version"] for r in rows if r["status"] == "current"), None)
        for r in rows:
            if r["status"] == "current":
                r["status"] = "retired"
        target["status"] = "current"
        switched = _restore_encoder(catalog, version)
        write_registry(catalog, rows)
        if switched:
            _after_commit(settle_switch, catalog)
    if switched:
        _after_commit(record_encoder, catalog)
    out = {"version": version, "previous": previous, "status": "current", "verdict": target["verdict"]}
    if target["verdict"] == "rejected":
        m = json.loads(target["metrics"] or "{}")
        cand, cur = (m.get("candidate") or {}).get("ndcg@10"), (m.get("current") or {}).get("ndcg@10")
        why = f" (holdout NDCG@10 {cand:.4f} against {cur:.4f})" if cand is not None and cur is not None else ""
        out["warning"] = f"version {version} was rejected by refresh{why}; it is served now all the same"
    return RollbackResult(**out)


def _restore_encoder(catalog: Catalog, version: int) -> bool:
    """Point the config at the encoder ``version`` was built with (it may be a
    fine-tuned one), so new items are encoded into the same space: pending
    until the registry commit that follows (see :mod:`dynstore.storage.switch`).
    Returns whether the encoder changes."""
    try:
        model = json.loads(catalog.storage.read_bytes(catalog.model_name(version, ".json"))).get("encoder_model")
    except FileNotFoundError:
        model = None
    except (OSError, ValueError):
        model = None  # a damaged version file: load_version says so when it is served
    if model and model != catalog.config.model:
        begin_switch(catalog, version, model)
        return True
    return False


@dataclass
class LoadedVersion:
    """A version's item matrix and parameters, loaded once per process."""

    version: int
    model: Any
    item_spec: Any
    user_spec: Any
    ids: list
    row: dict
    Wf: np.ndarray
    bias: np.ndarray
    #: id of the encoder the version was built with ("" when the registry does not say)
    encoder: str = ""


def current_or(catalog: Catalog, version: int | None) -> int:
    """``version``, or the current one; :class:`VersionNotFound` before the first version."""
    if version is None:
        version = current_version(catalog)
        if version is None:
            raise VersionNotFound(f"{catalog.path}: no embedding version yet; run `dynstore encode` first")
    return int(version)


def resolve_version(catalog: Catalog, version: int | None) -> int:
    """:func:`current_or`, checked against the registry: :class:`VersionNotFound` for a
    version it does not list (the one rule of every reader of a version)."""
    version = current_or(catalog, version)
    if not any(r["version"] == version for r in list_versions(catalog)):
        raise VersionNotFound(f"no version {version} in {catalog.path}")
    return version


def load_version(catalog: Catalog, version: int | None = None) -> LoadedVersion:
    """Load (and cache) ``version`` or the current one.

    A missing or damaged file of the version raises
    :class:`~dynstore.errors.StoreCorrupt` naming the file and the way out.
    """
    version = current_or(catalog, version)
    emb = catalog.dataset("embeddings")
    key = (int(version), emb.version if emb is not None else 0)
    cache = catalog.memo.setdefault("versions", dict)
    if key in cache:
        return cache[key]
    row = next((r for r in list_versions(catalog) if r["version"] == version), None)
    if row is None:
        raise VersionNotFound(f"no version {version} in {catalog.path}")
    loaded = _read_version(catalog, int(version), emb)
    loaded.encoder = row.get("encoder") or ""
    while len(cache) >= 4:  # a few versions side by side (current, a candidate, a rollback)
        cache.pop(next(iter(cache)))
    cache[key] = loaded
    return loaded


def version_loaded(catalog: Catalog, version: int) -> bool:
    """Whether this process holds ``version`` as :func:`load_version` loaded it (rows read)."""
    emb = catalog.dataset("embeddings")
    return (int(version), emb.version if emb is not None else 0) in (catalog.memo.get("versions") or {})


@dataclass
class VersionParameters:
    """A version's parameters and feature specs, without its item rows."""

    version: int
    model: Any
    item_spec: Any
    user_spec: Any


def load_parameters(catalog: Catalog, version: int | None = None) -> VersionParameters:
    """The parameters of ``version`` (or the current one) without reading its rows:
    what scoring needs when the item side is recomputed from content (a popularity
    rule), so the catalogue's item matrix is not held as well.

    Raises :class:`~dynstore.errors.VersionNotFound` and
    :class:`~dynstore.errors.StoreCorrupt` as :func:`load_version` does.
    """
    version = resolve_version(catalog, version)
    model, item_spec, user_spec, broken = _read_parameters(catalog, version)
    if item_spec.width != model.fa or user_spec.width != model.fu:
        raise broken(f"models/v{version}.safetensors", f"its shapes (fa={model.fa}, fu={model.fu}) do not fit "
                     f"the features (fa={item_spec.width}, fu={user_spec.width})")
    return VersionParameters(int(version), model, item_spec, user_spec)


def _read_parameters(catalog: Catalog, version: int):
    """``(model, item_spec, user_spec, broken)`` of ``version``; ``broken(name, why)`` makes
    the :class:`StoreCorrupt` that names a file of the version and the way out."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    way_out = (f"serve another version with `dynstore rollback {catalog.path} N` or build a new one with "
               f"`dynstore refresh {catalog.path} --force`")

    def broken(name: str, why: Any) -> StoreCorrupt:
        why = first_line(why if isinstance(why, BaseException) else ValueError(why))
        return StoreCorrupt(f"{catalog.where(name)}: version {version} cannot be loaded ({why}); {way_out}")

    meta_name, weights_name = f"models/v{version}.json", f"models/v{version}.safetensors"
    try:
        meta = json.loads(catalog.storage.read_bytes(meta_name).decode("utf-8"))
        model_meta, item_meta, user_meta = meta["model"], meta["item_features"], meta["user_features"]
        item_spec, user_spec = FeatureSpec.from_dict(item_meta), FeatureSpec.from_dict(user_meta)
    except FileNotFoundError:
        raise broken(meta_name, "the file is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise broken(meta_name, f"not a version description: {exc}") from None
    try:
        tensors = load(catalog.storage.read_bytes(weights_name))
    except FileNotFoundError:
        raise broken(weights_name, "the file is missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise broken(weights_name, exc) from None
    try:
        model = FusionModel.from_state(tensors, model_meta)
    except (ValueError, KeyError, TypeError) as exc:
        raise broken(weights_name, exc) from None
    return model, item_spec, user_spec, broken


def _read_version(catalog: Catalog, version: int, emb) -> LoadedVersion:
    """Parameters, specs and rows of ``version``, checked to fit together."""
    model, item_spec, user_spec, broken = _read_parameters(catalog, version)
    weights_name = f"models/v{version}.safetensors"
    if emb is None:
        raise broken("embeddings.lance", "the embeddings dataset is missing")
    try:
        t = emb.to_table(columns=["item_id", "vector", "bias"], filter=f"version = {int(version)}")
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise broken("embeddings.lance", exc) from None
    if t.num_rows == 0:
        raise broken("embeddings.lance", "it holds no rows of this version")
    dim = vector_width(t.column("vector"))
    Wf = np.array(t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim),
                  np.float32)
    ids = t.column("item_id").to_pylist()
    # the parts must fit: a weights file from another store or a truncated spec
    # fails here, once, not in the middle of every query
    if dim != model.d or item_spec.width != model.fa or user_spec.width != model.fu:
        raise broken(weights_name, f"its shapes (d={model.d}, fa={model.fa}, fu={model.fu}) do not fit the "
                                   f"embeddings (d={dim}) and features (fa={item_spec.width}, "
                                   f"fu={user_spec.width})")
    try:
        model.item_side(np.zeros((1, dim), np.float32), np.zeros((1, model.fa), np.float32))
        model.user_vectors(np.zeros((1, model.fu), np.float32), np.array([0, 1]), np.array([0]),
                           np.array([1], np.int8), np.array([0]), Wf[:1])
        if model.item_item is not None and model.item_item.ptr.size > len(ids) + 1:
            raise ValueError(f"item-item weights for {model.item_item.ptr.size - 1} items, the version has {len(ids)}")
    except (ValueError, IndexError) as exc:
        raise broken(weights_name, exc) from None
    return LoadedVersion(version=int(version), model=model, item_spec=item_spec, user_spec=user_spec,
                         ids=ids, row={i: n for n, i in enumerate(ids)}, Wf=Wf,
                         bias=t.column("bias").to_numpy().astype(np.float32))


# The encoder switch's writes (dynstore/storage/switch.py explains the protocol).

def begin_switch(catalog: Catalog, version: int, model: str, identity: tuple | None = None) -> None:
    """Write ``model`` into the config, pending until ``version`` is the registry's current one.

    ``identity`` is the new encoder's ``(id, dim, fingerprint)``, recorded with it
    so readers need not hash its files.
    """
    with catalog.lock("config", wait=30):
        disk = catalog.load_config()
        old = switch.effective(catalog.storage, disk).model
        disk.switch_version, disk.switch_from, disk.model = int(version), old, model
        if identity is not None:
            disk.encoder_id, disk.encoder_dim, disk.encoder_fingerprint = identity[0], int(identity[1]), identity[2]
        catalog.save_config(disk)


def settle_switch(catalog: Catalog) -> None:
    """Clear a pending switch in the config file by what the registry says (writers only)."""
    if catalog.read_only:
        return
    disk = catalog.load_config()
    if not disk.switch_version:
        return
    with catalog.lock("config", wait=30):
        disk = catalog.load_config()
        if disk.switch_version:
            catalog.save_config(switch.effective(catalog.storage, disk))
    catalog.reload_config()


def settle_switch_keeping(catalog: Catalog) -> None:
    """:func:`settle_switch`, keeping the in-memory encoder of a refresh that is trying a
    fine-tuned one (``store.config.model`` set by the refresh, not by the file)."""
    if catalog.read_only or not catalog.load_config().switch_version:
        return
    model = catalog.config.model
    settle_switch(catalog)
    catalog.config.model = model
