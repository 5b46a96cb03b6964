"""``score-all``: every user's top-k of the current version, as a table.

The lists are what :func:`dynstore.serving.recommend.recommend_many` serves for the
same users (positives excluded, the exact all-items product; never the vector
index): best first; equal scores in the order of the items' rows in the
version's matrix (the order items entered it), as every exact path of
``recommend`` orders them. "Every user" is each id in ``users`` or with
interactions, in id order.

The result goes to the Lance dataset ``batch_recommendations.lance`` (columns
``user_id, rank, item_id, score, version``, view ``batch_recommendations``) in
one overwrite commit per run, so a reader sees the old table or the new one,
whole. Users are scored in batches by the ``local`` engine (this process) or
by an actor pool on Ray (:mod:`dynstore.engines.ray`): each actor opens the
store read-only at the driver's snapshot and runs :func:`score_users`, the
same code; the driver sorts what comes back and commits it.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from dynstore.storage.catalog import Catalog, open_catalog
from dynstore.errors import DynstoreError
from dynstore.engines.ray import block_rows, blocks, check_engine, map_actors, pool_size, require_ray
from dynstore.serving.precision import check_precision
from dynstore.serving.recommend import all_items_lists, check_k
from dynstore.storage.registry import current_version
from dynstore.results import ScoreAllResult
from dynstore.encoders.cache import pinned_at, snapshot
from dynstore.serving.state import serving_state
from dynstore.data.views import BATCH_TABLE, batch_schema, views_connection

__all__ = ["score_all", "score_users", "all_users", "UserScorer"]

LOCAL_BATCH = 8192  # users per call of score_users on the local engine
RAY_BLOCK = 4096    # most users per actor call on the Ray engine


def all_users(catalog: Catalog) -> list:
    """Every user id in ``users`` or in ``interactions``, in id order."""
    con = views_connection(catalog)
    try:
        rows = con.execute("SELECT user_id FROM users WHERE user_id IS NOT NULL UNION "
                           "SELECT user_id FROM interactions WHERE user_id IS NOT NULL ORDER BY 1").fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def score_users(catalog: Catalog, user_ids: Sequence[Any], k: int, version: int,
                precision: str = "fp32") -> pa.Table:
    """The rows of :data:`~dynstore.data.views.BATCH_TABLE` for ``user_ids``: each user's
    top-``k`` of ``version`` (what both engines run), the product at ``precision``."""
    lists = all_items_lists(serving_state(catalog, version), list(user_ids), k, precision=precision)
    n = np.fromiter((len(x) for x in lists), np.int64, len(lists))
    users = [u for u, m in zip(user_ids, n.tolist()) for _ in range(m)]
    rank = np.concatenate([np.arange(1, m + 1, dtype=np.int32) for m in n.tolist()] or [np.zeros(0, np.int32)])
    items = [e["item_id"] for x in lists for e in x]
    scores = [e["score"] for x in lists for e in x]
    schema = batch_schema(catalog)
    return pa.table([pa.array(users, schema.field("user_id").type), pa.array(rank, pa.int32()),
                     pa.array(items, schema.field("item_id").type), pa.array(scores, pa.float64()),
                     pa.array(np.full(len(items), version, np.int64))], schema=schema)


class UserScorer:
    """A Ray actor: opens the store read-only at the driver's snapshot (once) and
    scores blocks of ``user_id`` with :func:`score_users`."""

    def __init__(self, path: str, at: dict[str, int], k: int, version: int, precision: str = "fp32"):
        self.catalog = pinned_at(open_catalog(path, read_only=True), at)
        self.k, self.version, self.precision = k, version, precision

    def __call__(self, block: pa.Table) -> pa.Table:
        return score_users(self.catalog, block.column("user_id").to_pylist(), self.k, self.version, self.precision)


def score_all(catalog: Catalog, *, k: int = 100, engine: str = "local", workers: int | None = None,
              precision: str = "fp32") -> ScoreAllResult:
    """Write every user's top-``k`` of the current version to ``batch_recommendations``
    (the caller holds the ``score-all`` writer lock: :meth:`dynstore.Store.score_all`).

    ``precision="fp16"`` or ``"bf16"`` runs the user-item product in half precision (faster
    where the hardware has a half-precision GEMM: GPUs, CPUs with AMX) as a prefilter whose
    candidates are rescored in float32, so the lists are the float32 ones
    (:mod:`dynstore.serving.precision`); without such hardware it is slower than ``"fp32"``.

    Examples
    --------
    >>> import tempfile, dynstore, polars as pl
    >>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
    >>> _ = store.ingest("items", pl.DataFrame({"item_id": [1, 2, 3], "title": ["a", "b", "c"]}))
    >>> _ = store.ingest("users", pl.DataFrame({"user_id": [7, 8]}))
    >>> _ = store.encode()
    >>> r = store.score_all(k=2)
    >>> (r.users, r.rows, r.version)
    (2, 4, 1)
    >>> store.sql("SELECT count(*) FROM batch_recommendations WHERE rank = 1").fetchall()[0][0]
    2
    """
    k, engine, precision = check_k(k), check_engine(engine), check_precision(precision)
    if engine == "ray":
        require_ray()  # the one-line error before any work
    t0 = time.perf_counter()
    view = catalog if catalog.is_pinned else catalog.pinned()
    version = current_version(view)
    if version is None:
        raise DynstoreError(f"{catalog.path}: no version to score yet; run `dynstore encode` first")
    users = all_users(view)
    if engine == "local":
        parts = [score_users(view, users[s:s + LOCAL_BATCH], k, version, precision) for s in range(0, len(users), LOCAL_BATCH)]
        used = None
    else:
        parts, used = _ray_parts(view, users, k, version, workers, precision)
    table = pa.concat_tables([batch_schema(view).empty_table(), *parts]).sort_by([("user_id", "ascending"),
                                                                                   ("rank", "ascending")])
    table_version = _commit(catalog.latest, table)
    seconds = time.perf_counter() - t0
    return ScoreAllResult(users=len(users), rows=table.num_rows, k=k, version=version, engine=engine,
                          seconds=round(seconds, 3), users_per_s=round(len(users) / seconds, 1) if seconds > 0 else None,
                          table_version=table_version, workers=used, precision=precision)


def _ray_parts(view: Catalog, users: list, k: int, version: int, workers: int | None,
               precision: str = "fp32") -> tuple[list[pa.Table], int]:
    """Score ``users`` on the Ray engine: blocks of :data:`RAY_BLOCK` users, one actor call each."""
    if not users:
        return [], 0
    ids = pa.table({"user_id": pa.array(users, batch_schema(view).field("user_id").type)})
    parts = blocks(ids, block_rows(len(users), workers, 256, RAY_BLOCK))
    kwargs = {"path": str(view.path), "at": snapshot(view), "k": k, "version": version, "precision": precision}
    out = list(map_actors(parts, UserScorer, kwargs, workers=workers))
    return out, pool_size(workers, len(parts))


def _commit(catalog: Catalog, table: pa.Table) -> int:
    """Overwrite ``batch_recommendations`` with ``table`` in one commit; its new version."""
    import lance

    mode = "overwrite" if catalog.dataset(BATCH_TABLE) is not None else "create"
    return lance.write_dataset(table, catalog.uri(BATCH_TABLE), mode=mode).version
