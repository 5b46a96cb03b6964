"""Serving: user vectors, top-k, similar items, scores.

A version's item matrix is loaded once per process and extended in memory
with items added since the version was built (encoded on demand, fused with
the version's parameters), so new items are recommendable at once. User
vectors are computed at query time from the user's attributes and latest
history, so a new interaction changes recommendations at once, without a
refresh.

The bias of an item has a static part (stored with the version) and a
dynamic part: the version's weights on the item's recent behaviour
(:mod:`dynstore.dynamics`) as of the newest interaction, recomputed whenever
interactions change, so popularity follows the data without a refresh. A
user's segments (age band, region ...) add what people in the same segments
picked lately.

Cold start: a user with no history and no attributes gets ``x_u = u0``,
which ranks items by their bias plus ``w_i · u0`` (in the untrained version:
recent popularity); with known attributes, ``U a_u`` and the segment term turn
that into popularity within the user's segments.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import DynstoreError

__all__ = ["recommend", "recommend_many", "serving_state", "MAX_K"]

MAX_K = 10_000
BATCH_USERS = 512
TORCH_TOPK_ROWS = 64  # user batches at least this large use torch.topk
NPROBES_SHARE = 0.2  # share of IVF partitions probed per query (recall vs latency)
HOT_ITEMS = 200  # items with the largest dynamic lift, re-ranked beside the index's candidates


@dataclass
class ServingState:
    version: int
    model: Any
    ids: list
    row: dict
    Wf: np.ndarray
    bias: np.ndarray
    user_row: dict          # user_id -> index into ptr / UA
    ptr: np.ndarray         # CSR over users' history, ordered by ts
    hist_item: np.ndarray
    hist_label: np.ndarray
    hist_ts: np.ndarray
    UA: np.ndarray          # [n_known_users, fu]
    ua_row: dict            # user_id -> row of UA (and of UK)
    UK: np.ndarray          # [n_known_users, segment columns] segment keys (-1: none)
    segment_table: Any      # [n_keys, n_items] what each segment adds to each item, or None
    pos_ptr: np.ndarray     # CSR of positives, for exclusion
    pos_item: np.ndarray
    index: Any = None       # Lance dataset with an IVF index over the version's rows, if built
    n_indexed: int = 0      # rows [0, n_indexed) are in the index; later rows are new items
    nprobes: int = 1
    hot: Any = None         # rows with the highest dynamic bias: index candidates they may miss

    def user_rows(self, user_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Rows into the histories and into the attribute tables (-1: unknown)."""
        hist = np.array([self.user_row.get(u, -1) for u in user_ids], np.int64)
        attr = np.array([self.ua_row.get(u, -1) for u in user_ids], np.int64)
        return hist, attr

    def segment_bias(self, user_ids: Sequence[Any]) -> np.ndarray | float:
        """``[len(user_ids), n_items]``: what the users' segments add (0.0 without)."""
        if self.segment_table is None:
            return 0.0
        _, attr = self.user_rows(user_ids)
        keys = np.where(attr[:, None] >= 0, self.UK[np.maximum(attr, 0)], -1)
        return self.model.segment_bias(self.segment_table, keys)


def check_k(k: Any) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise DynstoreError(f"k must be an integer between 1 and {MAX_K}, got {k!r}") from None
    if not 1 <= k <= MAX_K:
        raise DynstoreError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def serving_state(store, version: int | None = None) -> ServingState:
    from .versions import load_version

    lv = load_version(store, version)
    items = store._dataset("items")
    inter = store._dataset("interactions")
    users = store._dataset("users")
    key = (lv.version, id(lv), *(d.version if d is not None else 0 for d in (items, inter, users)))
    cached = store._cache.get("serving")
    if cached is not None and cached[0] == key:
        return cached[1]
    ids, row, Wf, bias = list(lv.ids), dict(lv.row), lv.Wf, lv.bias
    if items is not None:
        table = items.to_table()
        all_ids = table.column("item_id").to_pylist()
        new_pos = [n for n, i in enumerate(all_ids) if i not in row]
        if new_pos:
            from .semantic import semantic_vectors

            new_ids = [all_ids[n] for n in new_pos]
            V, _ = semantic_vectors(store, new_ids)
            A = lv.item_spec.transform(table.take(new_pos))
            Wn, bn = lv.model.item_side(V, A, None)
            Wf = np.vstack([Wf, Wn.astype(np.float32)])
            bias = np.concatenate([bias, bn.astype(np.float32)])
            for i in new_ids:
                row[i] = len(ids)
                ids.append(i)
        # Items deleted since the version was built are never served: unknown
        # by id, and a bias of -inf keeps them out of every top-k.
        present = set(all_ids)
        gone = [n for n, i in enumerate(ids) if i not in present]
        if gone:
            bias = np.array(bias, np.float32)
            bias[gone] = -np.inf
            for n in gone:
                row.pop(ids[n], None)
    user_row: dict = {}
    ptr = np.zeros(1, np.int64)
    hist_item = np.zeros(0, np.int64)
    hist_label = np.zeros(0, np.int8)
    hist_ts = np.zeros(0, np.int64)
    pos_ptr = np.zeros(1, np.int64)
    pos_item = np.zeros(0, np.int64)
    if inter is not None:
        con = store.connection()
        try:
            t = con.sql("SELECT user_id, item_id, epoch(ts)::BIGINT AS ts, label FROM labelled_events"
                        ).to_arrow_table()
        finally:
            con.close()
        u_ids = t.column("user_id").to_pylist()
        it = t.column("item_id").to_pylist()
        item_idx = np.fromiter((row.get(i, -1) for i in it), np.int64, len(it))
        uniq = {}
        u_idx = np.fromiter((uniq.setdefault(u, len(uniq)) for u in u_ids), np.int64, len(u_ids))
        ts = t.column("ts").to_numpy(zero_copy_only=False)
        lab = t.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
        keep = item_idx >= 0
        u_idx, item_idx, ts, lab = u_idx[keep], item_idx[keep], ts[keep], lab[keep]
        order = np.lexsort((ts, u_idx))
        u_idx, item_idx, ts, lab = u_idx[order], item_idx[order], ts[order], lab[order]
        counts = np.bincount(u_idx, minlength=len(uniq))
        ptr = np.concatenate([[0], np.cumsum(counts)])
        hist_item, hist_label, hist_ts = item_idx, lab, ts
        user_row = uniq
        pos = lab == 1
        pos_counts = np.bincount(u_idx[pos], minlength=len(uniq))
        pos_ptr = np.concatenate([[0], np.cumsum(pos_counts)])
        pos_item = item_idx[pos]
    fu = lv.user_spec.width
    UA = np.zeros((0, fu), np.float32)
    UK = np.zeros((0, len(lv.model.segments)), np.int64)
    ua_row: dict = {}
    if users is not None and (fu or lv.model.segments):
        ut = users.to_table()
        UA = np.asarray(lv.user_spec.transform(ut), np.float32)
        UK = lv.user_spec.segments(ut)
        ua_row = {u: n for n, u in enumerate(ut.column("user_id").to_pylist())}
    # behaviour as of the newest interaction: the dynamic bias and the segment term
    bias = np.asarray(bias, np.float32)
    seg_table = hot = None
    act = None
    if hist_item.size and lv.model.dynamic is not None:
        user_keys = None
        if lv.model.segments and UK.shape[0]:
            inv_ids = [None] * len(user_row)
            for u, r in user_row.items():
                inv_ids[r] = u
            krow = np.array([ua_row.get(u, -1) for u in inv_ids], np.int64)
            ev_user = np.repeat(np.arange(len(user_row)), np.diff(ptr))
            user_keys = np.where(krow[ev_user][:, None] >= 0, UK[np.maximum(krow[ev_user], 0)], -1)
        act = lv.model.activity(hist_item, hist_ts, hist_label, len(ids), user_keys)
        rows = np.arange(len(ids))
        bias = bias + lv.model.dynamic_bias(act.items.features(rows, act.now()))
        seg_table = lv.model.segment_table(act, rows, act.now())
    index = None
    from .versions import index_uri

    uri = index_uri(store, lv.version)
    if os.path.isdir(os.path.join(uri, "_versions")):
        import lance

        index = lance.dataset(uri)
    if index is not None:
        # the index ranks by the version's static bias: the items that behaviour
        # (or a segment) lifts most are always re-ranked exactly as well
        lift = bias - np.concatenate([lv.bias, np.zeros(len(ids) - len(lv.ids), np.float32)])
        if seg_table is not None:
            lift = lift + seg_table.max(axis=0)
        hot = np.argsort(-lift, kind="stable")[:HOT_ITEMS]
    state = ServingState(lv.version, lv.model, ids, row, np.ascontiguousarray(Wf, np.float32),
                         bias, user_row, ptr, hist_item, hist_label, hist_ts,
                         UA, ua_row, UK, seg_table, pos_ptr, pos_item, index, len(lv.ids),
                         max(8, int(max(16, np.sqrt(len(lv.ids))) * NPROBES_SHARE)), hot)
    store._cache["serving"] = (key, state)
    return state


def _gather(ptr: np.ndarray, rows: np.ndarray, *arrays: np.ndarray):
    """CSR slices of ``rows`` (-1 = empty) concatenated: (new_ptr, *values)."""
    starts = np.where(rows >= 0, ptr[np.maximum(rows, 0)], 0)
    ends = np.where(rows >= 0, ptr[np.maximum(rows, 0) + 1], 0)
    lens = ends - starts
    new_ptr = np.concatenate([[0], np.cumsum(lens)])
    idx = np.repeat(starts - new_ptr[:-1], lens) + np.arange(new_ptr[-1])
    return (new_ptr, *(a[idx] for a in arrays))


def _histories(state: ServingState, user_ids: Sequence[Any]):
    rows, _ = state.user_rows(user_ids)
    return _gather(state.ptr, rows, state.hist_item, state.hist_label, state.hist_ts)


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
    r = state.user_row.get(user_id, -1)
    seen = state.pos_item[state.pos_ptr[r]:state.pos_ptr[r + 1]] if r >= 0 else np.zeros(0, np.int64)
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
    out: list[list[dict]] = []
    ids = state.ids
    for start in range(0, len(user_ids), BATCH_USERS):
        batch = list(user_ids[start:start + BATCH_USERS])
        logits = user_logits(state, batch, cand_rows)
        rows = np.array([state.user_row.get(u, -1) for u in batch], np.int64)
        pptr, pitem = _gather(state.pos_ptr, rows, state.pos_item)
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
