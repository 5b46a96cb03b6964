"""dynstore's own SQL functions, registered like any user function.

:func:`register_builtins` registers them, explicitly, when the SQL session
opens its first connection (importing this module registers nothing).

Types depend on the store (its id types, its encoder's dimension), so they
are given as callables of the store. Functions that take a user or item id
are vectorised (Arrow in, Arrow out): ``SELECT recommend(user_id, 10) FROM
users`` runs one matrix product per batch, not one per row. Each function imports
what it serves with when it first runs: a statement that calls none of them
(``SELECT count(*) FROM items``) loads no serving module.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from dynstore.sql.functions import SqlHost, register_sql_function, registered
from dynstore.storage.registry import list_versions
from dynstore.encoders.cache import encoder_info, store_encoder


__all__ = ["id_type_hint", "register_builtins"]

_BUILTINS: list[tuple[str, Callable[..., Any], Any, Any, dict]] = []

#: The id arguments of dynstore's functions, by the name DuckDB reports: (the name users call,
#: the kind of each argument: "user", "item", "item[]" or None for other arguments).
ID_ARGUMENTS: dict[str, tuple[str, tuple[str | None, ...]]] = {
    "_dynstore_recommend": ("recommend", ("user", None, None)),
    "recommend_among": ("recommend_among", ("user", None, "item[]")),
    "score": ("score", ("user", "item")),
    "similar_items": ("similar_items", ("item", None)),
    "recommend_from_examples": ("recommend_from_examples", ("item[]", "item[]", None)),
    "_dynstore_item_vector": ("item_vector", ("item", None)),
    "user_vector": ("user_vector", ("user",)),
    "semantic_vector": ("semantic_vector", ("item",)),
    "log_impressions": ("log_impressions", ("user", "item[]")),
}
_NO_MATCH = re.compile(r"No function matches the given name and argument types '(\w+)\((.*?)\)'")
_NOT_INT = re.compile(r"Could not convert string '([^']*)' to (?:U?INT\d*|BIGINT)")


def _top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets, parentheses and quotes."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return out + [cur.strip()] if cur.strip() else out


def _call_args(query: str, name: str) -> tuple[str, list[str]] | None:
    """The name and arguments of the first call of ``name`` (or of its table macro) in ``query``."""
    m = re.search(rf"\b({name}|recommendations)\s*\(" if name == "recommend" else rf"\b({name})\s*\(", query, re.I)
    if not m:
        return None
    depth, start = 1, m.end()
    for n in range(start, len(query)):
        depth += {"(": 1, ")": -1}.get(query[n], 0)
        if depth == 0:
            return m.group(1), _top_level(query[start:n])
    return None


def _as_type(arg: str, text: bool) -> str:
    """``arg`` written for ids that are text (``text``) or integers."""
    if arg.startswith("[") and arg.endswith("]"):
        return "[" + ", ".join(_as_type(a, text) for a in _top_level(arg[1:-1])) + "]"
    if arg.startswith("'") or re.fullmatch(r"-?\d+", arg):
        return f"'{arg}'" if text and not arg.startswith("'") else arg
    return f"CAST({arg} AS {'VARCHAR' if text else 'BIGINT'})"


def id_type_hint(store: SqlHost, message: str, query: str) -> str | None:
    """One line for an id of the wrong type passed to one of dynstore's functions, or None.

    It names the store's id type and the call that works, written from the query's own call
    (never the internal name DuckDB reports, such as ``_dynstore_recommend``).
    """
    m = _NO_MATCH.search(message)
    if m and m.group(1) in ID_ARGUMENTS:
        name, kinds = ID_ARGUMENTS[m.group(1)]
        given = _top_level(m.group(2))
        for n, (kind, typ) in enumerate(zip(kinds, given)):
            if kind is None:
                continue
            text = store.catalog.sql_id_type(kind.rstrip("[]")) == "VARCHAR"
            if ("VARCHAR" in typ or "STRING" in typ) != text:
                return _hint(name, kinds, kind, text, _call_args(query, name), n)
        return None
    m = _NOT_INT.search(message)
    if not m:
        return None
    for name, kinds in ID_ARGUMENTS.values():
        call = _call_args(query, name)
        for n, kind in enumerate(kinds):
            if kind and call and n < len(call[1]) and f"'{m.group(1)}'" in call[1][n]:
                return _hint(name, kinds, kind, False, call, n)
    return None


def _hint(name: str, kinds: tuple[str | None, ...], kind: str, text: bool,
          call: tuple[str, list[str]] | None, n: int) -> str:
    ids = kind.rstrip("[]")
    what = f"this store's {ids} ids are {'text (VARCHAR)' if text else 'integers (BIGINT)'}"
    if not call or n >= len(call[1]):
        return f"{name}(): {what}"
    name, args = call
    if not text and args[n].startswith("'") and not re.fullmatch(r"'-?\d+'", args[n]):
        # a text id on an integer store: nothing to rewrite it into
        example = ", ".join(("42" if ids == "user" else "7") if i == n else a for i, a in enumerate(args))
        return f"{name}(): {what} and {args[n]} is not one; write an integer id, as in {name}({example})"
    same = [k is not None and k.rstrip("[]") == ids for k in kinds]
    fixed = ", ".join(_as_type(a, text) if i < len(same) and same[i] else a for i, a in enumerate(args))
    return f"{name}(): {what}; write {name}({fixed})"


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


def _fused_dim(store: SqlHost) -> int:
    """Width of the current version's fused vectors: the encoder's, unless the version
    was built with an encoder of another width (before a `config --model`)."""
    enc_id, dim = encoder_info(store.catalog)
    built = next((r.get("encoder") for r in list_versions(store.catalog) if r["status"] == "current"), None)
    if not built or built == enc_id:
        return dim
    ds = store.catalog.cache_dataset(built)
    return ds.schema.field("vector").type.list_size if ds is not None else dim


def _fused(store: SqlHost) -> str:
    return f"FLOAT[{_fused_dim(store)}]"


def _ranked(store: SqlHost) -> str:
    return f"STRUCT(item_id {_iid(store)}, score DOUBLE)[]"


def _arrow_ranked(store: SqlHost, lists: list[list[dict] | None]) -> pa.Array:
    item_t = pa.string() if _iid(store) == "VARCHAR" else pa.int64()
    return pa.array(lists, type=pa.list_(pa.struct([("item_id", item_t), ("score", pa.float64())])))


def _vectors(rows: list[np.ndarray | None], dim: int) -> pa.Array:
    flat = np.zeros((len(rows), dim), np.float32)
    valid = np.zeros(len(rows), bool)
    for n, r in enumerate(rows):
        if r is not None and len(r) == dim:  # (a version of another width: NULL)
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
    from dynstore.serving.recommend import recommend_many

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
    from dynstore.serving.recommend import recommend_many

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
    from dynstore.serving.recommend import scores

    return pa.array(scores(store.catalog, _py(user_ids), _py(item_ids)), pa.float64())


@builtin("similar_items", lambda s: [_iid(s), "BIGINT"], _ranked)
def _similar(store: SqlHost, item_ids, ks):
    from dynstore.serving.recommend import similar_items

    return _arrow_ranked(store, [None if i is None or k is None else similar_items(store.catalog, i, k)
                                 for i, k in zip(_py(item_ids), _py(ks))])


@builtin("recommend_from_examples", lambda s: [f"{_iid(s)}[]", f"{_iid(s)}[]", "BIGINT"], _ranked)
def _from_examples(store: SqlHost, positives, negatives, ks):
    from dynstore.serving.recommend import recommend_from_examples

    return _arrow_ranked(store, [None if k is None else recommend_from_examples(store.catalog, p or [], n or [], k)
                                 for p, n, k in zip(_py(positives), _py(negatives), _py(ks))])


@builtin("embed", ["VARCHAR"], _vec)
def _embed(store: SqlHost, texts):
    values = _py(texts)
    vecs = store_encoder(store.catalog).encode(values)
    return _vectors([None if t is None else v for t, v in zip(values, vecs)], _dim(store))


@builtin("semantic_vector", lambda s: [_iid(s)], _vec)
def _semantic_vector(store: SqlHost, item_ids):
    from dynstore.data.semantic import semantic_vectors

    ids = _py(item_ids)
    vecs, found = semantic_vectors(store.catalog, ids)
    return _vectors([v if ok else None for v, ok in zip(vecs, found)], _dim(store))


@builtin("_dynstore_item_vector", lambda s: [_iid(s), "BIGINT"], _fused)
def _item_vector(store: SqlHost, item_ids, versions):
    from dynstore.serving.state import serving_state

    ids, vers = _py(item_ids), _py(versions)
    out: list[np.ndarray | None] = []
    for i, v in zip(ids, vers):
        state = serving_state(store.catalog, v)
        r = state.row.get(i)
        out.append(None if r is None else state.Wf[r])
    return _vectors(out, _fused_dim(store))


@builtin("user_vector", lambda s: [_uid(s)], _fused)
def _user_vector(store: SqlHost, user_ids):
    from dynstore.serving.recommend import serving_state, user_vectors

    ids = _py(user_ids)
    X = user_vectors(serving_state(store.catalog), [u for u in ids])
    return _vectors([None if u is None else x for u, x in zip(ids, X)], _fused_dim(store))


@builtin("log_impressions", lambda s: [_uid(s), f"{_iid(s)}[]"], "BIGINT", side_effects=True)
def _log_impressions(store: SqlHost, user_ids, item_lists):
    """Append one ``impression`` interaction per shown item; returns rows written."""
    from dynstore.data.feedback import log_impressions  # a write, routed to the data wing

    counts = [None if u is None or items is None else log_impressions(store.catalog, u, items)
              for u, items in zip(_py(user_ids), _py(item_lists))]
    return pa.array(counts, pa.int64())
