"""Serving: user vectors, top-k, similar items, scores.

A version's item matrix is loaded once per process and extended in memory
with items added since the version was built (once ``encode`` has cached
their semantic vector; fused with the version's parameters), so new items are
recommendable without a refresh. User vectors are computed at query time from
the user's attributes and latest history, so a new interaction changes
recommendations at once. What scoring reads is the serving state
(:mod:`dynstore.serving`), which follows appended interactions at a cost
proportional to the new rows.

The bias of an item has a static part (stored with the version) and a
dynamic part: the version's weights on the item's recent behaviour
(:mod:`dynstore.dynamics`) as of the newest interaction, kept current as
interactions arrive, so popularity follows the data without a refresh. A
user's segments (age band, region ...) add what people in the same segments
picked lately.

Cold start: a user with no history and no attributes gets ``x_u = u0``,
which ranks items by their bias plus ``w_i · u0`` (in the untrained version:
recent popularity); with known attributes, ``U a_u`` and the segment term turn
that into popularity within the user's segments.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DynstoreError
from .serving import ServingState, serving_state

__all__ = ["recommend", "recommend_many", "serving_state", "ServingState", "MAX_K"]

MAX_K = 10_000
BATCH_USERS = 512
TORCH_TOPK_ROWS = 64  # user batches at least this large use torch.topk


def check_k(k: Any) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise DynstoreError(f"k must be an integer between 1 and {MAX_K}, got {k!r}") from None
    if not 1 <= k <= MAX_K:
        raise DynstoreError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def _histories(state: ServingState, user_ids: Sequence[Any]):
    rows, _ = state.user_rows(user_ids)
    return state.histories(rows)


def user_vectors(state: ServingState, user_ids: Sequence[Any], histories=None) -> np.ndarray:
    _, attr = state.user_rows(user_ids)
    hptr, hitem, hlab, hts = histories or _histories(state, user_ids)
    UA = np.zeros((len(user_ids), state.UA.shape[1]), np.float32)
    if state.UA.shape[1]:
        UA[attr >= 0] = state.UA[attr[attr >= 0]]
    return np.asarray(state.model.user_vectors(UA, hptr, hitem, hlab, hts, state.Wf), np.float32)


def user_logits(state: ServingState, user_ids: Sequence[Any], rows: np.ndarray | None = None) -> np.ndarray:
    """``w_i . x_u + b_i(now)`` plus the segment and item-item terms, for the users (all
    items, or ``rows``): every term of the score, in one place."""
    hist = _histories(state, user_ids)
    X = user_vectors(state, user_ids, hist)
    extra = state.segment_bias(user_ids)
    ii = state.model.item_item_bias(hist[0], hist[1], hist[2], len(state.ids))
    extra = extra + ii if isinstance(ii, np.ndarray) or isinstance(extra, np.ndarray) else extra
    if rows is None:
        return X @ state.Wf.T + state.bias + extra
    extra = extra[:, rows] if isinstance(extra, np.ndarray) else extra
    return X @ state.Wf[rows].T + state.bias[rows] + extra


def _topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, scores.shape[1])
    if scores.shape[0] < TORCH_TOPK_ROWS and "torch" not in sys.modules:
        # A few users: numpy's partition is as fast, and importing torch
        # would cost seconds of every `dynstore recommend`.
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
            np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
        vals = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1)
    import torch

    t = torch.from_numpy(scores)
    val, idx = torch.topk(t, k, dim=1)
    return val.numpy(), idx.numpy()


def _indexed_one(state: ServingState, user_id: Any, k: int) -> list[dict]:
    """One user's top-k from the version's vector index (plus items added since)."""
    x = user_vectors(state, [user_id])[0]
    seen = state.positives(np.array([state.user_row.get(user_id, -1)], np.int64))[1]
    q = np.concatenate([x, [1.0, 0.0]]).astype(np.float32)  # see versions.build_index
    hits = state.index.to_table(nearest={"column": "vector", "q": q, "k": k + len(np.unique(seen)),
                                         "nprobes": state.nprobes}, columns=["row"])
    cand = np.concatenate([hits.column("row").to_numpy(), np.arange(state.n_indexed, len(state.ids)),
                           state.hot if state.hot is not None else np.zeros(0, np.int64)])
    cand = np.setdiff1d(cand, seen)
    cand = cand[np.isfinite(state.bias[cand])]  # deleted items
    logits = user_logits(state, [user_id], cand)[0]
    order = np.argsort(-logits, kind="stable")[:k]
    prob = 1.0 / (1.0 + np.exp(-logits[order].astype(np.float64)))
    return [{"item_id": state.ids[cand[o]], "score": float(p)} for o, p in zip(order, prob)]


def recommend_many(store, user_ids: Sequence[Any], k: int, *, version: int | None = None,
                   candidates: Iterable[Any] | None = None, exact: bool = False) -> list[list[dict]]:
    """Top-``k`` lists for many users: one matrix product per batch of users.

    Items the user already interacted with positively are excluded. With
    ``candidates`` only those items are ranked, so exactly ``k`` come back
    whenever ``k`` unseen candidates exist. A single user on a version with a
    vector index (large catalogues) is served from the index unless ``exact``.
    """
    k = check_k(k)
    state = serving_state(store, version)
    if state.index is not None and not exact and candidates is None and len(user_ids) == 1:
        return [_indexed_one(state, user_ids[0], k)]
    cand_rows = None
    if candidates is not None:
        cand_rows = np.array(sorted({state.row[c] for c in candidates if c in state.row}), np.int64)
        if not cand_rows.size:  # no candidate is a known item: nothing to rank
            return [[] for _ in user_ids]
    out: list[list[dict]] = []
    ids = state.ids
    for start in range(0, len(user_ids), BATCH_USERS):
        batch = list(user_ids[start:start + BATCH_USERS])
        logits = user_logits(state, batch, cand_rows)
        rows = np.array([state.user_row.get(u, -1) for u in batch], np.int64)
        pptr, pitem = state.positives(rows)
        r = np.repeat(np.arange(len(batch)), np.diff(pptr))
        if cand_rows is None:
            logits[r, pitem] = -np.inf
        elif len(pitem):
            where = np.searchsorted(cand_rows, pitem)
            hit = (where < len(cand_rows)) & (cand_rows[np.minimum(where, len(cand_rows) - 1)] == pitem)
            logits[r[hit], where[hit]] = -np.inf
        val, idx = _topk(logits, k)
        with np.errstate(over="ignore"):  # -inf (excluded) rows are dropped below
            prob = 1.0 / (1.0 + np.exp(-val.astype(np.float64)))
        for n in range(len(batch)):
            ok = np.isfinite(val[n])
            cols = idx[n][ok] if cand_rows is None else cand_rows[idx[n][ok]]
            out.append([{"item_id": ids[c], "score": float(p)} for c, p in zip(cols, prob[n][ok])])
    return out


def recommend(store, user_id: Any, k: int = 10, *, version: int | None = None,
              candidates: Iterable[Any] | None = None, exact: bool = False) -> list[dict]:
    """Top-``k`` for one user; see :func:`recommend_many`."""
    return recommend_many(store, [user_id], k, version=version, candidates=candidates, exact=exact)[0]


def scores(store, user_ids: Sequence[Any], item_ids: Sequence[Any]) -> list[float | None]:
    """``p_ui`` for pairs; None where the item is unknown."""
    state = serving_state(store)
    out: list[float | None] = []
    for start in range(0, len(user_ids), BATCH_USERS):
        users = list(user_ids[start:start + BATCH_USERS])
        rows = np.array([state.row.get(i, -1) for i in item_ids[start:start + BATCH_USERS]], np.int64)
        logits = user_logits(state, users)
        for n, r in enumerate(rows):
            if r < 0 or users[n] is None:
                out.append(None)
            else:
                out.append(float(1.0 / (1.0 + np.exp(-float(logits[n, r])))))
    return out


def similar_items(store, item_id: Any, k: int) -> list[dict] | None:
    """Items whose fused vectors are closest (cosine) to ``item_id``'s."""
    k = check_k(k)
    state = serving_state(store)
    r = state.row.get(item_id)
    if r is None:
        return None
    W = state.Wf
    norms = np.linalg.norm(W, axis=1) + 1e-12
    sims = (W @ W[r]) / (norms * norms[r])
    sims[r] = -np.inf
    sims[~np.isfinite(state.bias)] = -np.inf  # deleted items
    val, idx = _topk(sims[None, :].astype(np.float32), k)
    return [{"item_id": state.ids[c], "score": float(v)} for c, v in zip(idx[0], val[0]) if np.isfinite(v)]


def recommend_from_examples(store, positive: Sequence[Any], negative: Sequence[Any], k: int) -> list[dict]:
    """Rank items for a user described only by liked and disliked examples."""
    k = check_k(k)
    state = serving_state(store)
    pos = [state.row[i] for i in (positive or []) if i in state.row]
    neg = [state.row[i] for i in (negative or []) if i in state.row]
    hist_item = np.array(pos + neg, np.int64)
    hist_label = np.array([1] * len(pos) + [-1] * len(neg), np.int8)
    hist_ts = np.zeros(len(hist_item), np.int64)
    UA = np.zeros((1, state.UA.shape[1]), np.float32)
    X = np.asarray(state.model.user_vectors(UA, np.array([0, len(hist_item)]), hist_item, hist_label,
                                            hist_ts, state.Wf), np.float32)
    logits = X @ state.Wf.T + state.bias
    logits[0, hist_item] = -np.inf
    val, idx = _topk(logits.astype(np.float32), k)
    with np.errstate(over="ignore"):
        prob = 1.0 / (1.0 + np.exp(-val[0].astype(np.float64)))
    return [{"item_id": state.ids[c], "score": float(p)} for c, p, v in zip(idx[0], prob, val[0]) if np.isfinite(v)]
