"""dynstore's own SQL functions, registered like any user function.

:func:`register_builtins` registers them, explicitly, when the SQL session
opens its first connection (importing this module registers nothing).

Types depend on the store (its id types, its encoder's dimension), so they
are given as callables of the store. Functions that take a user or item id
are vectorised (Arrow in, Arrow out): ``SELECT recommend(user_id, 10) FROM
users`` runs one matrix product per batch, not one per row.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa

from .functions import SqlHost, register_sql_function, registered
from .recommend import recommend_from_examples, recommend_many, scores, serving_state, similar_items, user_vectors
from .semantic import semantic_vectors
from .semcache import encoder_info, store_encoder


__all__ = ["register_builtins"]

_BUILTINS: list[tuple[str, Callable[..., Any], Any, Any, dict]] = []


def builtin(name: str, parameters, return_type, **options) -> Callable:
    """Mark ``fn`` as one of dynstore's own functions (registered by :func:`register_builtins`)."""

    def wrap(fn):
        _BUILTINS.append((name, fn, parameters, return_type, options))
        return fn

    return wrap


def register_builtins() -> None:
    """Register dynstore's own functions, once; a user's function of the same name
    registered earlier is kept (users' functions win, as when registered later)."""
    have = set(registered())
    for name, fn, parameters, return_type, options in _BUILTINS:
        if name not in have:
            register_sql_function(name, fn, parameters, return_type, **options)
    _BUILTINS.clear()


def _uid(store: SqlHost) -> str:
    return store.catalog.sql_id_type("user")


def _iid(store: SqlHost) -> str:
    return store.catalog.sql_id_type("item")


def _dim(store: SqlHost) -> int:
    return encoder_info(store.catalog)[1]


def _vec(store: SqlHost) -> str:
    return f"FLOAT[{_dim(store)}]"


def _ranked(store: SqlHost) -> str:
    return f"STRUCT(item_id {_iid(store)}, score DOUBLE)[]"


def _arrow_ranked(store: SqlHost, lists: list[list[dict] | None]) -> pa.Array:
    item_t = pa.string() if _iid(store) == "VARCHAR" else pa.int64()
    return pa.array(lists, type=pa.list_(pa.struct([("item_id", item_t), ("score", pa.float64())])))


def _vectors(rows: list[np.ndarray | None], dim: int) -> pa.Array:
    flat = np.zeros((len(rows), dim), np.float32)
    valid = np.zeros(len(rows), bool)
    for n, r in enumerate(rows):
        if r is not None:
            flat[n] = r
            valid[n] = True
    values = pa.array(flat.reshape(-1), pa.float32())
    arr = pa.FixedSizeListArray.from_arrays(values, dim)
    if valid.all():
        return arr
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def _py(arr) -> list:
    return arr.to_pylist()


@builtin("_dynstore_recommend", lambda s: [_uid(s), "BIGINT", "BIGINT"], _ranked)
def _recommend(store: SqlHost, user_ids, ks, versions):
    users, ks, versions = _py(user_ids), _py(ks), _py(versions)
    out: list[list[dict] | None] = [None] * len(users)
    groups: dict[tuple, list[int]] = {}
    for n, (u, k, v) in enumerate(zip(users, ks, versions)):
        if u is not None and k is not None:
            groups.setdefault((k, v), []).append(n)
    for (k, v), rows in groups.items():
        lists = recommend_many(store.catalog, [users[n] for n in rows], k, version=v)
        for n, lst in zip(rows, lists):
            out[n] = lst
    return _arrow_ranked(store, out)


@builtin("recommend_among", lambda s: [_uid(s), "BIGINT", f"{_iid(s)}[]"], _ranked)
def _recommend_among(store: SqlHost, user_ids, ks, candidates):
    """Top-k restricted to candidate items: exactly k when k unseen candidates exist."""
    users, ks, cands = _py(user_ids), _py(ks), _py(candidates)
    out: list[list[dict] | None] = [None] * len(users)
    groups: dict[tuple, list[int]] = {}
    for n, (u, k, c) in enumerate(zip(users, ks, cands)):
        if u is not None and k is not None and c is not None:
            groups.setdefault((k, tuple(c)), []).append(n)
    for (k, c), rows in groups.items():
        lists = recommend_many(store.catalog, [users[n] for n in rows], k, candidates=c)
        for n, lst in zip(rows, lists):
            out[n] = lst
    return _arrow_ranked(store, out)


@builtin("score", lambda s: [_uid(s), _iid(s)], "DOUBLE")
def _score(store: SqlHost, user_ids, item_ids):
    return pa.array(scores(store.catalog, _py(user_ids), _py(item_ids)), pa.float64())


@builtin("similar_items", lambda s: [_iid(s), "BIGINT"], _ranked)
def _similar(store: SqlHost, item_ids, ks):
    return _arrow_ranked(store, [None if i is None or k is None else similar_items(store.catalog, i, k)
                                 for i, k in zip(_py(item_ids), _py(ks))])


@builtin("recommend_from_examples", lambda s: [f"{_iid(s)}[]", f"{_iid(s)}[]", "BIGINT"], _ranked)
def _from_examples(store: SqlHost, positives, negatives, ks):
    return _arrow_ranked(store, [None if k is None else recommend_from_examples(store.catalog, p or [], n or [], k)
                                 for p, n, k in zip(_py(positives), _py(negatives), _py(ks))])


@builtin("embed", ["VARCHAR"], _vec)
def _embed(store: SqlHost, texts):
    values = _py(texts)
    vecs = store_encoder(store.catalog).encode(values)
    return _vectors([None if t is None else v for t, v in zip(values, vecs)], _dim(store))


@builtin("semantic_vector", lambda s: [_iid(s)], _vec)
def _semantic_vector(store: SqlHost, item_ids):
    ids = _py(item_ids)
    vecs, found = semantic_vectors(store.catalog, ids)
    return _vectors([v if ok else None for v, ok in zip(vecs, found)], _dim(store))


@builtin("_dynstore_item_vector", lambda s: [_iid(s), "BIGINT"], _vec)
def _item_vector(store: SqlHost, item_ids, versions):
    ids, vers = _py(item_ids), _py(versions)
    out: list[np.ndarray | None] = []
    for i, v in zip(ids, vers):
        state = serving_state(store.catalog, v)
        r = state.row.get(i)
        out.append(None if r is None else state.Wf[r])
    return _vectors(out, _dim(store))


@builtin("user_vector", lambda s: [_uid(s)], _vec)
def _user_vector(store: SqlHost, user_ids):
    ids = _py(user_ids)
    X = user_vectors(serving_state(store.catalog), [u for u in ids])
    return _vectors([None if u is None else x for u, x in zip(ids, X)], _dim(store))


@builtin("log_impressions", lambda s: [_uid(s), f"{_iid(s)}[]"], "BIGINT", side_effects=True)
def _log_impressions(store: SqlHost, user_ids, item_lists):
    """Append one ``impression`` interaction per shown item; returns rows written."""
    counts = [None if u is None or items is None else store.log_impressions(u, items)
              for u, items in zip(_py(user_ids), _py(item_lists))]
    return pa.array(counts, pa.int64())
