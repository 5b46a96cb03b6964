"""Embedding versions: the registry, fused item embeddings and parameters.

A version is (1) a row in ``versions.lance``, (2) one row per item in
``embeddings.lance`` holding the fused vector ``w_i`` and bias ``b_i``, and
(3) ``models/v<N>.safetensors`` + ``models/v<N>.json`` with the fusion and
user-model parameters and the attribute-feature specs. Embeddings and
parameters are written first and the registry row last, in one Lance
commit, so a reader (or a crash) sees the whole version or none of it.
The registry is tiny and rewritten whole on every change, which makes a
promotion (old current -> retired, new -> current) a single atomic commit.
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import VersionNotFound

__all__ = ["list_versions", "current_version", "build_version", "ensure_first_version", "rollback",
           "load_version", "register_versions", "is_rule", "rule_window", "headline_metrics", "VERDICTS"]

#: Serving status: ``current`` (served), ``retired`` (served before),
#: ``candidate`` / ``rejected`` (never served yet). It changes with promotions
#: and rollbacks; the verdict below never does.
STATUSES = ("current", "candidate", "rejected", "retired")
#: What produced a version and what refresh decided about it: ``initial``
#: (version 1, the popularity rule), ``promoted``, ``passed`` (not worse, but
#: kept as a candidate by ``--no-promote``), ``rejected``, ``rule`` (the
#: popularity rule published after a rejection).
VERDICTS = ("initial", "promoted", "passed", "rejected", "rule")
_VERDICT_OF_STATUS = {"current": "promoted", "candidate": "passed", "rejected": "rejected"}

REGISTRY_SCHEMA = pa.schema([
    ("version", pa.int64()), ("parent", pa.int64()), ("status", pa.string()),
    ("created", pa.timestamp("us")), ("encoder", pa.string()), ("alpha", pa.float64()),
    ("train_window", pa.string()), ("counts", pa.string()), ("metrics", pa.string()),
    ("snapshot", pa.string()), ("verdict", pa.string()),
])


def _legacy_verdict(row: dict) -> str:
    """Registries written before verdicts were kept: the best reading of a row."""
    if row.get("train_window") == "untrained":
        return "initial" if row.get("parent") is None else "rule"
    return {"rejected": "rejected", "candidate": "passed"}.get(row.get("status"), "promoted")


def _registry(store, pinned: int | None = None) -> pa.Table:
    ds = store._dataset("versions", version=pinned)
    if ds is None:
        return REGISTRY_SCHEMA.empty_table()
    table = ds.to_table()
    if "verdict" not in table.schema.names:
        verdicts = [_legacy_verdict(r) for r in table.to_pylist()]
        table = table.append_column("verdict", pa.array(verdicts, pa.string()))
    return table


def is_rule(row: dict) -> bool:
    """True for a popularity-rule version (version 1, or one published after a rejection)."""
    return row.get("verdict") in ("initial", "rule") or row.get("train_window") == "untrained"


def rule_window(first_ts: float, last_ts: float) -> str:
    """The span a popularity rule was set up on, as ``train_window`` shows it (epoch
    seconds in). The rule itself reads behaviour as of every query.

    >>> rule_window(0.0, 86400.0 * 100)
    '1970-01-01 00:00 .. 1970-04-11 00:00'
    """
    start = _dt.datetime.fromtimestamp(first_ts, _dt.timezone.utc)
    end = _dt.datetime.fromtimestamp(last_ts, _dt.timezone.utc)
    return f"{start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M}"


def headline_metrics(row: dict) -> dict:
    """The holdout figures that describe a version best (its own, not its rival's)."""
    m = row.get("metrics") or {}
    for key in ("candidate", "rule", "holdout"):
        if isinstance(m.get(key), dict) and any(isinstance(v, float) for v in m[key].values()):
            return m[key]
    return {k: v for k, v in m.items() if isinstance(v, float)}


def list_versions(store) -> list[dict]:
    """Every version, newest first, with ``counts`` and ``metrics`` parsed.

    Examples
    --------
    >>> import tempfile, dynstore
    >>> dynstore.init(tempfile.mkdtemp() + "/s").versions()
    []
    """
    ds = store._dataset("versions")
    key = ds.version if ds is not None else 0
    hit = store._cache.get("registry")
    if hit is None or hit[0] != key:
        rows = _registry(store).to_pylist()
        for r in rows:
            for field in ("counts", "metrics", "snapshot"):
                r[field] = json.loads(r[field]) if r[field] else {}
        hit = store._cache["registry"] = (key, sorted(rows, key=lambda r: -r["version"]))
    return [dict(r) for r in hit[1]]


def current_version(store) -> int | None:
    for r in list_versions(store):
        if r["status"] == "current":
            return r["version"]
    return None


def _write_registry(store, rows: list[dict]) -> None:
    import lance

    table = pa.Table.from_pylist(rows, schema=REGISTRY_SCHEMA)
    lance.write_dataset(table, store._dataset_uri("versions"),
                        mode="overwrite" if store._dataset("versions") is not None else "create")


def _embedding_schema(store, dim: int) -> pa.Schema:
    item_t = pa.string() if store.config.id_types.get("item") == "string" else pa.int64()
    return pa.schema([("version", pa.int64()), ("item_id", item_t), ("doc_hash", pa.string()),
                      ("vector", pa.list_(pa.float32(), dim)), ("bias", pa.float32())])


def register_versions(store, con) -> None:
    """Expose the registry and embeddings to SQL (empty until the first version)."""
    from .semantic import encoder_info

    ds = store._dataset("versions")
    if ds is None or "verdict" not in ds.schema.names:
        con.register("_dynstore_versions", _registry(store))  # tiny; fills in verdicts of old registries
    else:
        con.register("_dynstore_versions", ds)
    emb = store._dataset("embeddings")
    if emb is None:
        emb = _embedding_schema(store, encoder_info(store)[1]).empty_table()
    con.register("_dynstore_embeddings", emb)


def _next_version(store) -> int:
    """The next version number. Rows of versions whose registry commit never
    happened (a crash) are removed first: the caller holds the ``versions`` lock,
    so no other version is being written and those rows can never become whole."""
    reg = _registry(store)
    top = max(reg.column("version").to_pylist(), default=0)
    emb = store._dataset("embeddings")
    if emb is not None and emb.count_rows(filter=f"version > {top}"):
        import lance

        lance.dataset(store._dataset_uri("embeddings")).delete(f"version > {top}")
    return top + 1


def items_table(store) -> pa.Table:
    ds = store._dataset("items")
    return ds.to_table() if ds is not None else pa.table({"item_id": pa.array([], pa.int64())})


def users_table(store) -> pa.Table:
    ds = store._dataset("users")
    return ds.to_table() if ds is not None else pa.table({"user_id": pa.array([], pa.int64())})


def build_version(store, model, item_spec, user_spec, *, parent: int | None, status: str,
                  train_window: str = "", counts: dict | None = None, metrics: dict | None = None,
                  residuals: tuple | None = None, snapshot: dict | None = None,
                  items: pa.Table | None = None, verdict: str | None = None,
                  switch_encoder: bool = False) -> int:
    """Write a new version (embeddings, parameters, registry row); return its number.

    ``verdict`` (see :data:`VERDICTS`) defaults from ``status``: current ->
    promoted, candidate -> passed, rejected -> rejected.

    ``switch_encoder`` makes the encoder in ``store.config.model`` (a fine-tuned
    one) the store's, in the same registry commit (see :mod:`dynstore.switch`).

    ``residuals`` is ``(R, rb)`` aligned with the rows of ``items``: the
    collaborative residuals (and version 1's popularity prior in ``rb``);
    None fuses every item from content alone.
    """
    import lance
    from safetensors.numpy import save_file

    from .lock import writer_lock
    from .semantic import encoder_info

    items = items if items is not None else items_table(store)
    n_items = items.num_rows
    from . import switch
    from .encoders import encoder_fingerprint

    enc_id, dim = encoder_info(store)
    with writer_lock(store.path, "versions", wait=30):
        switch.settle_keeping(store)
        number = _next_version(store)
        tensors, meta = model.state()
        meta = {"model": meta, "item_features": item_spec.to_dict(), "user_features": user_spec.to_dict(),
                "encoder": enc_id, "encoder_model": store.config.model, "version": number}
        models = store.path / "models"
        models.mkdir(exist_ok=True)
        # parameters keep their dtype (the item-item component's indices are integers)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  str(models / f"v{number}.safetensors"))
        (models / f"v{number}.json").write_text(json.dumps(meta, indent=1))
        schema = _embedding_schema(store, model.d)
        emb = store._dataset("embeddings")
        # streamed in batches: peak memory follows the batch, not the catalogue
        batches = _fused_batches(store, model, item_spec, items, residuals, number, schema)
        lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches),
                            store._dataset_uri("embeddings"), mode="append" if emb is not None else "create")
        if n_items >= store.config.index_min_items:
            build_index(store, number)
        rows = _registry(store).to_pylist()
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
            "verdict": verdict or _VERDICT_OF_STATUS.get(status, status),
        })
        if switch_encoder:
            fp = encoder_fingerprint(store.config.encoder_spec(store.path), max_length=store.config.max_length,
                                    precision=store.config.precision)
            switch.begin(store, number, store.config.model, (enc_id, dim, fp))
        _write_registry(store, rows)
        if switch_encoder:
            switch.settle(store)
        from .compaction import maybe_compact

        maybe_compact(store, "embeddings")
        maybe_compact(store, "versions")
    store._con_state = None
    return number


BUILD_BATCH = 65536  # items fused and written per batch


def _fused_batches(store, model, item_spec, items: pa.Table, residuals, number: int, schema: pa.Schema):
    """Record batches of a version's rows: each item's fused vector and static bias."""
    from .semantic import item_docs, semantic_vectors

    docs = item_docs(store)
    for start in range(0, items.num_rows, BUILD_BATCH):
        part = items.slice(start, BUILD_BATCH)
        ids = part.column("item_id").to_pylist()
        V, _ = semantic_vectors(store, ids)
        res = None if residuals is None else tuple(np.asarray(r)[start:start + len(ids)] for r in residuals)
        Wf, bias = model.item_side(V, item_spec.transform(part), res)
        yield pa.record_batch([
            pa.array(np.full(len(ids), number, np.int64)),
            pa.array(ids, schema.field("item_id").type),
            pa.array([docs.get(i, (None,))[0] for i in ids], pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(Wf.astype(np.float32).reshape(-1)), Wf.shape[1]),
            pa.array(bias.astype(np.float32)),
        ], schema=schema)


def index_uri(store, version: int) -> str:
    return str(store.path / "index" / f"v{version}.lance")


def model_dim(emb) -> int:
    """Width of the fused vectors in the embeddings dataset."""
    return emb.schema.field("vector").type.list_size


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


def build_index(store, version: int, settings: dict | None = None) -> dict:
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

    emb = store._dataset("embeddings")

    def rows():
        for batch in emb.to_batches(columns=["vector", "bias"], filter=f"version = {int(version)}",
                                    batch_size=BUILD_BATCH):
            dim = batch.schema.field("vector").type.list_size
            W = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            b = batch.column("bias").to_numpy(zero_copy_only=False)
            aug = np.hstack([W, b[:, None]]).astype(np.float32)
            yield aug, (aug.astype(np.float64) ** 2).sum(axis=1)

    top = max((float(sq.max()) for _, sq in rows() if sq.size), default=0.0)
    width = -(-(model_dim(emb) + 2) // INDEX_PAD) * INDEX_PAD
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

    (store.path / "index").mkdir(exist_ok=True)
    ds = lance.write_dataset(pa.RecordBatchReader.from_batches(schema, augmented()),
                             index_uri(store, version), mode="overwrite")
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


def ensure_first_version(store) -> int | None:
    """Create version 1 with the untrained fusion once items are encoded.

    The untrained fusion (documented in :meth:`FusionModel.untrained`) is the
    popularity rule -- positives decayed with a half-life fitted to the span of
    the interactions, read as of every query -- plus a fixed seeded projection
    of the attributes and user vectors from liked/disliked items, so a store
    recommends sensibly before its first ``refresh``.
    """
    if store._dataset("versions") is not None or store._dataset("items") is None:
        return None
    from .dynamics import DynamicSpec, rule_half_life
    from .features import FeatureSpec
    from .model import FusionModel
    from .semantic import semantic_vectors

    items = items_table(store)
    if items.num_rows == 0:
        return None
    ids = items.column("item_id").to_pylist()
    V, _ = semantic_vectors(store, ids)
    item_spec = FeatureSpec.fit(items, "item_id")
    user_spec = FeatureSpec.fit(users_table(store), "user_id")
    A = item_spec.transform(items)
    spec = DynamicSpec()
    lo, hi = _time_span(store)
    model = FusionModel.untrained(V, A, user_spec.width, rule=rule_half_life(spec, (hi - lo) / 86400.0),
                                  dynamic=spec, segments=tuple(n for _, n in user_spec.segment_columns()))
    number = build_version(store, model, item_spec, user_spec, parent=None, status="current",
                           train_window=rule_window(lo, hi) if hi > lo else "", counts={"items": len(ids)},
                           items=items, residuals=model.residuals, verdict="initial")
    _record_rule_metrics(store, number)
    return number


def _time_span(store) -> tuple[float, float]:
    """Epoch seconds of the first and the newest interaction ((0, 0) without any)."""
    if store._dataset("interactions") is None:
        return 0.0, 0.0
    from .refresh import newest_event

    con = store.connection()
    try:
        newest = newest_event(con)
        lo, hi = con.execute("SELECT epoch(min(ts)), epoch(?::TIMESTAMP) FROM interactions", [newest]).fetchall()[0]
    finally:
        con.close()
    return (0.0, 0.0) if hi is None else (float(lo), float(hi))


def _record_rule_metrics(store, number: int) -> None:
    """Holdout figures of version 1, as ``eval`` computes them (the rule scored
    before the newest 10% of events), so the registry shows how it does."""
    from .errors import DynstoreError
    from .lock import writer_lock
    from .refresh import evaluate_version

    from . import switch

    try:
        m = evaluate_version(store, version=number)
        metrics = {"holdout": {k: v for k, v in m.items() if isinstance(v, float)}, "slice": m["slice"]}
    except Exception as exc:  # figures are an annotation: never fail the encode that made the version
        metrics = {"holdout": {}, "note": str(exc) if isinstance(exc, DynstoreError) else
                   f"not evaluated: {type(exc).__name__}: {exc}"}
    with writer_lock(store.path, "versions", wait=30):
        switch.settle_keeping(store)
        rows = _registry(store).to_pylist()
        for r in rows:
            if r["version"] == number:
                r["metrics"] = json.dumps(metrics)
        _write_registry(store, rows)


def rollback(store, version: int) -> dict:
    """Make ``version`` current; the previous current becomes ``retired``.

    Only the serving status changes: each version keeps its verdict, so a
    rejected version served for a while and retired again still reads
    ``rejected``. Rolling back to a version refresh rejected returns a
    ``"warning"`` saying so.
    """
    from . import switch
    from .lock import writer_lock

    with writer_lock(store.path, "versions", wait=30):
        switch.settle_keeping(store)
        rows = _registry(store).to_pylist()
        target = next((r for r in rows if r["version"] == version), None)
        if target is None:
            have = ", ".join(str(r["version"]) for r in sorted(rows, key=lambda r: r["version"])) or "none"
            raise VersionNotFound(f"no version {version} in {store.path} (versions: {have})")
        previous = next((r["version"] for r in rows if r["status"] == "current"), None)
        for r in rows:
            if r["status"] == "current":
                r["status"] = "retired"
        target["status"] = "current"
        switched = _restore_encoder(store, version)
        _write_registry(store, rows)
        if switched:
            switch.settle(store)
    store._con_state = None
    if switched:
        from .semantic import record_encoder

        record_encoder(store)
    out = {"version": version, "previous": previous, "status": "current", "verdict": target["verdict"]}
    if target["verdict"] == "rejected":
        m = json.loads(target["metrics"] or "{}")
        cand, cur = (m.get("candidate") or {}).get("ndcg@10"), (m.get("current") or {}).get("ndcg@10")
        why = f" (holdout NDCG@10 {cand:.4f} against {cur:.4f})" if cand is not None and cur is not None else ""
        out["warning"] = f"version {version} was rejected by refresh{why}; it is served now all the same"
    return out


def _restore_encoder(store, version: int) -> bool:
    """Point the config at the encoder ``version`` was built with (it may be a
    fine-tuned one), so new items are encoded into the same space: pending
    until the registry commit that follows (see :mod:`dynstore.switch`).
    Returns whether the encoder changes."""
    from . import switch

    meta_file = store.path / "models" / f"v{version}.json"
    try:
        model = json.loads(meta_file.read_text()).get("encoder_model") if meta_file.is_file() else None
    except (OSError, ValueError):
        model = None  # a damaged version file: load_version says so when it is served
    if model and model != store.config.model:
        switch.begin(store, version, model)
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


def load_version(store, version: int | None = None) -> LoadedVersion:
    """Load (and cache) ``version`` or the current one.

    A missing or damaged file of the version raises
    :class:`~dynstore.errors.StoreCorrupt` naming the file and the way out.
    """
    if version is None:
        version = current_version(store)
        if version is None:
            raise VersionNotFound(f"{store.path}: no embedding version yet; run `dynstore encode` first")
    emb = store._dataset("embeddings")
    key = (int(version), emb.version if emb is not None else 0)
    cache = store._cache.setdefault("versions", {})
    if key in cache:
        return cache[key]
    if not any(r["version"] == version for r in list_versions(store)):
        raise VersionNotFound(f"no version {version} in {store.path}")
    loaded = _read_version(store, int(version), emb)
    while len(cache) >= 4:  # a few versions side by side (current, a candidate, a rollback)
        cache.pop(next(iter(cache)))
    cache[key] = loaded
    return loaded


def _read_version(store, version: int, emb) -> LoadedVersion:
    """Parameters, specs and rows of ``version``, checked to fit together."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from .errors import StoreCorrupt
    from .features import FeatureSpec
    from .model import FusionModel

    way_out = (f"serve another version with `dynstore rollback {store.path} N` or build a new one with "
               f"`dynstore refresh {store.path} --force`")

    def broken(name: str, why: Any) -> StoreCorrupt:
        why = str(why).strip().splitlines()[0] if str(why).strip() else type(why).__name__
        return StoreCorrupt(f"{store.path / name}: version {version} cannot be loaded ({why}); {way_out}")

    meta_name, weights_name = f"models/v{version}.json", f"models/v{version}.safetensors"
    try:
        meta = json.loads((store.path / meta_name).read_text(encoding="utf-8"))
        model_meta, item_meta, user_meta = meta["model"], meta["item_features"], meta["user_features"]
        item_spec, user_spec = FeatureSpec.from_dict(item_meta), FeatureSpec.from_dict(user_meta)
    except FileNotFoundError:
        raise broken(meta_name, "the file is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise broken(meta_name, f"not a version description: {exc}") from None
    try:
        tensors = load_file(str(store.path / weights_name))
    except FileNotFoundError:
        raise broken(weights_name, "the file is missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise broken(weights_name, exc) from None
    try:
        model = FusionModel.from_state(tensors, model_meta)
    except (ValueError, KeyError, TypeError) as exc:
        raise broken(weights_name, exc) from None
    if emb is None:
        raise broken("embeddings.lance", "the embeddings dataset is missing")
    try:
        t = emb.to_table(columns=["item_id", "vector", "bias"], filter=f"version = {int(version)}")
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise broken("embeddings.lance", exc) from None
    if t.num_rows == 0:
        raise broken("embeddings.lance", "it holds no rows of this version")
    dim = t.schema.field("vector").type.list_size
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
