"""Serving: user vectors, top-k, similar items, scores.

A version's item matrix is loaded once per process and extended in memory
with items added since the version was built (once ``encode`` has cached
their semantic vector; fused with the version's parameters), so new items are
recommendable without a refresh. User vectors are computed at query time from
the user's attributes and latest history, so a new interaction changes
recommendations at once. What scoring reads is the serving state
(:mod:`dynstore.serving.state`), which follows appended interactions at a cost
proportional to the new rows.

The bias of an item has a static part (stored with the version) and a
dynamic part: the version's weights on the item's recent behaviour
(:mod:`dynstore.model.dynamics`) as of the newest interaction, kept current as
interactions arrive, so popularity follows the data without a refresh. A
user's segments (age band, region ...) add what people in the same segments
picked lately.

Cold start: a user with no history and no attributes gets ``x_u = u0``,
which ranks items by their bias plus ``w_i · u0`` (in the untrained version:
recent popularity); with known attributes, ``U a_u`` and the segment term turn
that into popularity within the user's segments. A user with no positive yet gets
the version's new-user bias when refresh chose one (its own popularity column,
``theta_new``: :func:`dynstore.model.score.new_users`).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from dynstore.lazy import attempt_import
from dynstore.errors import DynstoreError
from dynstore.model.metrics import MAX_K, check_k
from dynstore.model.score import logits as score_logits, score_terms as model_terms
from dynstore.storage.catalog import Catalog
from dynstore.serving.precision import (QuantMatrix, check_precision, low_matrix, prefiltered_topk, quant_matrix, quant_scan,
                        round_up32)
from dynstore.serving.state import ServingState, serving_state

__all__ = ["recommend", "recommend_many", "all_items_lists", "serving_state", "ServingState", "MAX_K", "check_k"]
BATCH_USERS = 512
BLOCK_USERS = 1024  # users per matrix product on the all-items path ...
ITEM_BLOCK = 4096  # ... over blocks of this many items (a block's logits stay in cache)
TORCH_TOPK_ROWS = 64  # user batches at least this large use torch.topk
PREFILTER_MIN_ITEMS = 20_000  # single users of catalogues this large: int8 (or float16) prefilter ...
PREFILTER_AFTER = 2  # ... from the third call on a catalogue (a one-shot process never builds it)
SCAN = "int8"  # the prefilter's codes: "int8" (fbgemm; float16 where it is missing) or "fp16"


def _histories(state: ServingState, user_ids: Sequence[Any]):
    rows, _ = state.user_rows(user_ids)
    return state.histories(rows)


def user_attributes(state: ServingState, user_ids: Sequence[Any]) -> np.ndarray:
    """The users' attribute rows ``UA [m, fu]`` (zeros for users without attributes)."""
    _, attr = state.user_rows(user_ids)
    UA = np.zeros((len(user_ids), state.UA.shape[1]), np.float32)
    if state.UA.shape[1]:
        UA[attr >= 0] = state.UA[attr[attr >= 0]]
    return UA


def user_vectors(state: ServingState, user_ids: Sequence[Any], histories=None) -> np.ndarray:
    hptr, hitem, hlab, hts = histories or _histories(state, user_ids)
    UA = user_attributes(state, user_ids)
    return np.asarray(state.model.user_vectors(UA, hptr, hitem, hlab, hts, state.Wf), np.float32)


def score_terms(state: ServingState, user_ids: Sequence[Any], hist=None) -> tuple[np.ndarray, np.ndarray]:
    """``(X [m, d], B)``: the users' vectors and everything else their score adds per item --
    the bias as of now (static + dynamic), the segment, item-item and user-kNN terms -- as
    ``B [m, n_items]``, or ``[n_items]`` when no term depends on the user: the score
    equation (:func:`dynstore.model.score.score_terms`) on what the serving state holds.
    The logit of item ``i`` is ``X @ Wf[i] + B[..., i]``."""
    rows, _ = state.user_rows(user_ids)
    hist = hist if hist is not None else state.histories(rows)
    return model_terms(state.model, state.Wf, state.bias, user_attributes(state, user_ids), hist,
                       state.segment_bias(user_ids), state.bias_new, state.knn_pool, rows)


def user_logits(state: ServingState, user_ids: Sequence[Any], rows: np.ndarray | None = None) -> np.ndarray:
    """``w_i . x_u + b_i(now)`` plus the segment and item-item terms, for the users (all
    items, or ``rows``); see :func:`score_terms`."""
    X, B = score_terms(state, user_ids)
    return score_logits(X, state.Wf, B, rows)


def _probability(logits) -> np.ndarray:
    """``sigmoid(logits)`` in float64 (``-inf`` -> 0, no overflow warning): the served score."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def _one_user(state: ServingState, user_id: Any):
    """``(x, b, seen)``: one user's vector, the per-item rest of their logit (a 1-D copy) and
    the rows of their positives, computed once for scoring and for excluding."""
    X, B = score_terms(state, [user_id])
    b = np.array(B[0] if B.ndim == 2 else B, np.float32)
    seen = state.positives(np.array([state.user_row.get(user_id, -1)], np.int64))[1]
    return X[0], b, seen


def _listed(state: ServingState, rows: np.ndarray, logits: np.ndarray, k: int) -> list[dict]:
    """The top-``k`` of ``logits`` over ``rows`` as served: item ids and scores, best first."""
    val, top = _ranked(rows, logits, k)
    return [{"item_id": state.ids[c], "score": float(p)} for c, p in zip(top.tolist(), _probability(val).tolist())]


def _ranked(rows: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of one user's ``logits`` over ``rows``: best first, ties by row (finite only)."""
    k = min(k, logits.size)
    if k < logits.size:
        part = np.argpartition(-logits, k - 1)[:k]
    else:
        part = np.arange(logits.size)
    val = logits[part]
    order = np.lexsort((rows[part], -val))
    val, r = val[order], rows[part][order]
    ok = np.isfinite(val)
    return val[ok], r[ok]


def _scan_matrix(state: ServingState):
    """What a single user's prefilter scans: the int8 :class:`~dynstore.serving.precision.QuantMatrix`
    of ``Wf`` (fbgemm), else its float16 :class:`~dynstore.serving.precision.LowMatrix`, once a
    process has scored single users of this catalogue a few times (None before, for small
    catalogues, or without either)."""
    h = state.prefilter
    if h.get("matrix") is None:
        if state.Wf.shape[0] < PREFILTER_MIN_ITEMS or h.get("off"):
            return None
        h["calls"] = h.get("calls", 0) + 1
        if h["calls"] <= PREFILTER_AFTER:
            return None  # a one-shot process (the CLI) never pays for it
        try:
            h["matrix"] = quant_matrix(state.Wf) if SCAN == "int8" else None
            if h["matrix"] is None:
                h["matrix"] = _low(state, "fp16")
        except ImportError:  # pragma: no cover - torch is a dependency
            h["matrix"] = None
        h["off"] = h["matrix"] is None  # beyond float16 (or no torch): the exact scan
    return h["matrix"]


def _low(state: ServingState, precision: str):
    """``Wf`` in half ``precision`` (:func:`~dynstore.serving.precision.low_matrix`), made once per
    item matrix and shared by single users and ``score-all``."""
    cache = state.prefilter.setdefault("batch", {})
    if precision not in cache or cache[precision][0] is not state.Wf:
        cache[precision] = (state.Wf, low_matrix(state.Wf, precision))
    return cache[precision][1]


def _half_scan(low, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(y, tol)`` of the float16 scan: every item's ``w_i . x`` within ``tol_i``.

    ``Wf`` is scaled by a power of two ``r`` first (exact). The half-precision logit ``y``
    of item ``i`` (of ``r Wf`` and ``x / max|x|``, both in float16) is within ``tol_i`` of the exact one:
    rounding ``x`` and ``w_i`` to float16 (unit roundoff ``2^-11``) moves the product by at
    most ``2 * 2^-11 * |x| |w_i|``, the float32 accumulation by ``d * 2^-24 * |x| |w_i|``,
    and rounding the result by ``2^-11 |y|``; ``tol_i`` takes twice that, plus what
    float16's subnormals lose (at most ``2^-25`` an entry).
    """
    torch = attempt_import("torch")
    s = float(np.abs(x).max())
    if not np.isfinite(s) or s == 0.0:
        return None
    xs = torch.from_numpy(np.ascontiguousarray(x / s, np.float32)).half()
    # torch's own thread count (switching it per call costs more than the scan gains)
    y = torch.mv(low.W, xs).numpy().astype(np.float32)
    xn = x / s
    nx, d = float(np.linalg.norm(xn)), x.size
    tol = ((2.0 ** -9 * nx + 2.0 ** -24 * np.sqrt(d)) * low.norms + 2.0 ** -10 * np.abs(y)
           + 2.0 ** -24 * float(np.abs(xn).sum()) + 1e-6)
    y *= s / low.r
    tol *= s / low.r
    return y, tol


def _prefiltered(state: ServingState, x: np.ndarray, B: np.ndarray, k: int):
    """Rows whose exact logit may be in the top ``k``, from a low-precision scan, or None.

    A single user's scan is memory-bound: int8 codes (:func:`~dynstore.serving.precision.quant_scan`)
    stream a quarter of float32's bytes, float16 half. The scan's logit ``y_i`` comes with a
    rigorous bound ``tol`` on its distance to the exact float32 logit; every row whose upper
    bound reaches the ``k``-th largest lower bound is kept (:func:`_candidates`), so the
    exact top-``k`` is always among them (they are rescored in float32 by the caller).
    """
    m = _scan_matrix(state)
    if m is None:
        return None
    if isinstance(m, QuantMatrix):
        if not np.isfinite(x).all():
            return None
        y, tol = quant_scan(m, x)
    else:
        got = _half_scan(m, x)
        if got is None:
            return None
        y, tol = got
    if not np.isfinite(y).all():
        return None
    n = y.size
    if k >= n:
        return None
    lo, hi = _score_bounds(y, tol, B)
    cand = _candidates(lo, hi, k)
    return cand if cand is not None and cand.size <= max(64 * k, n // 16) else None


def _score_bounds(y: np.ndarray, tol: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 lower and upper bounds of the exact logits ``x . w_i + B_i`` from the scan's
    ``y`` and its bound ``tol``; rows with ``B_i = -inf`` (seen, deleted) get ``-inf`` and NaN.
    The float32 additions ``y + B`` (here and in the exact score) round too, so the bound
    is ``t = (tol + 2^-22 (|y| + tol + |B|)) (1 + 2^-20)``, its own few roundings covered."""
    tol = round_up32(tol) if tol.dtype != np.float32 else tol
    with np.errstate(invalid="ignore", over="ignore"):
        z = y + B
        t = np.abs(y)
        t += tol
        t += np.abs(B)
        t *= np.float32(2.0 ** -22)
        t += tol
        t *= np.float32(1.0 + 2.0 ** -20)
        lo = z - t
        z += t
    return lo, z


def _candidates(lo: np.ndarray, hi: np.ndarray, k: int) -> np.ndarray | None:
    """The rows whose upper bound reaches the ``k``-th largest lower bound (None when that
    is not finite: fewer than ``k`` rows can be ranked)."""
    L = _kth_largest_bound(lo, k)
    if not np.isfinite(L):
        return None
    cand = np.flatnonzero(hi >= L)  # NaN (excluded rows) never is
    if cand.size > k:
        # the k largest lower bounds are among these rows (each is >= L, and its upper
        # bound is above it): the exact k-th largest from them keeps only what it keeps
        lc = lo[cand]
        cand = cand[hi[cand] >= lc[np.argpartition(lc, lc.size - k)[lc.size - k]]]
    return cand


def _kth_largest_bound(v: np.ndarray, k: int, block: int = 64) -> float:
    """A value at most the ``k``-th largest of ``v`` (``k <= v.size``): the ``k``-th largest of
    its blocks' maxima. Each of the ``k`` largest maxima is a different element of ``v`` at
    least that large. With the top elements in different blocks (the usual case) it is the
    ``k``-th largest itself, at a pass's cost instead of a partition's; where they cluster
    (a sorted ``v``, below) it is lower, and :func:`_candidates` narrows its rows again.

    >>> v = np.arange(4096.0)
    >>> _kth_largest_bound(v, 3, block=64), float(np.sort(v)[-3])
    (3967.0, 4093.0)
    """
    if v.size < 16 * k * block:  # few blocks per wanted row: their maxima would bound loosely
        return float(np.partition(v, v.size - k)[v.size - k])
    cut = v.size // block * block
    m = np.concatenate([v[:cut].reshape(-1, block).max(1), v[cut:]])
    return float(np.partition(m, m.size - k)[m.size - k])


def _exact_one(state: ServingState, user_id: Any, k: int) -> list[dict]:
    """One user's exact top-``k`` over every item."""
    x, B, seen = _one_user(state, user_id)
    B[seen] = -np.inf
    cand = _prefiltered(state, x, B, k)
    if cand is None:
        return _listed(state, np.arange(B.size), state.Wf @ x + B, k)
    return _listed(state, cand, state.Wf[cand] @ x + B[cand], k)


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
    torch = attempt_import("torch")

    t = torch.from_numpy(scores)
    val, idx = torch.topk(t, k, dim=1)
    return val.numpy(), idx.numpy()


def _indexed_one(state: ServingState, user_id: Any, k: int) -> list[dict]:
    """One user's top-k from the version's vector index (plus items added since)."""
    x, B, seen = _one_user(state, user_id)  # the user's terms once: the query and the rescoring
    p = state.index_params
    q = np.zeros(p.get("width", x.size + 2), np.float32)  # [x_u, 1, 0, zero padding]: see versions.build_index
    q[:x.size], q[x.size] = x, 1.0
    n_seen = len(np.unique(seen))
    # the index ranks candidates (approximately, e.g. by PQ codes); they are rescored exactly below
    nearest = {"column": "vector", "q": q, "k": max(k, int(p.get("candidates", 0))) + n_seen,
               "nprobes": int(p["nprobes"])}
    for key in ("refine_factor", "ef"):
        if p.get(key):
            nearest[key] = int(p[key])
    if "ef" in nearest:
        nearest["ef"] = max(nearest["ef"], nearest["k"])  # HNSW: ef below k is an error
    # row ids straight from the index: reading the ``row`` column back costs a take per query
    rid = state.index.to_table(nearest=nearest, columns=[], with_row_id=True).column("_rowid").to_numpy()
    hits = p["row_starts"][rid >> 32] + (rid & 0xFFFFFFFF).astype(np.int64)
    cand = np.concatenate([hits, np.arange(state.n_indexed, len(state.ids)),
                           state.hot if state.hot is not None else np.zeros(0, np.int64)])
    cand = np.setdiff1d(cand, seen)
    cand = cand[np.isfinite(state.bias[cand])]  # deleted items
    return _listed(state, cand, state.Wf[cand] @ x + B[cand], k)  # the exact score (user_logits)


def recommend_many(catalog: Catalog, user_ids: Sequence[Any], k: int, *, version: int | None = None,
                   candidates: Iterable[Any] | None = None, exact: bool = False) -> list[list[dict]]:
    """Top-``k`` lists for many users: one matrix product per batch of users.

    Items the user already interacted with positively are excluded. With
    ``candidates`` only those items are ranked, so exactly ``k`` come back
    whenever ``k`` unseen candidates exist. A single user on a version with a
    vector index (large catalogues) is served from the index unless ``exact``.
    """
    k = check_k(k)
    state = serving_state(catalog, version)
    if candidates is None and len(user_ids) == 1:
        if state.index is not None and not exact:
            return [_indexed_one(state, user_ids[0], k)]
        return [_exact_one(state, user_ids[0], k)]
    cand_rows = None
    if candidates is not None:
        cand_rows = np.array(sorted({state.row[c] for c in candidates if c in state.row}), np.int64)
        if not cand_rows.size:  # no candidate is a known item: nothing to rank
            return [[] for _ in user_ids]
    blocked = cand_rows is None and len(user_ids) >= TORCH_TOPK_ROWS
    step = blocked_step(state) if blocked else BATCH_USERS
    out: list[list[dict]] = []
    for start in range(0, len(user_ids), step):
        out += _batch_lists(state, list(user_ids[start:start + step]), k, cand_rows, blocked)
    return out


def blocked_step(state: ServingState) -> int:
    """Users per batch on the blocked all-items path: :data:`BLOCK_USERS`, fewer when the
    user-dependent terms are dense ``[users, items]`` (a batch of them stays near 256 MB)."""
    n_items = len(state.ids)
    dense = state.counts is not None and state.counts.seg_base is not None or state.model.item_item is not None
    return max(TORCH_TOPK_ROWS, min(BLOCK_USERS, (1 << 26) // max(n_items, 1))) if dense else BLOCK_USERS


def all_items_lists(state: ServingState, user_ids: Sequence[Any], k: int, *,
                    precision: str = "fp32") -> list[list[dict]]:
    """Every item ranked for each of ``user_ids`` by the blocked path, whatever their number:
    what :func:`recommend_many` returns for 64 users or more (positives excluded, ties by
    item row). ``dynstore score-all`` scores every user with it, on any engine.

    ``precision="fp16"`` / ``"bf16"`` runs the product in half precision as a prefilter whose
    candidates are rescored exactly in float32: the same lists (:mod:`dynstore.serving.precision`)."""
    k, precision = check_k(k), check_precision(precision)
    step = blocked_step(state)
    if precision != "fp32":  # the prefilter holds a few float32 [users, items] matrices per batch
        step = max(TORCH_TOPK_ROWS, min(step, (1 << 25) // max(len(state.ids), 1)))
    out: list[list[dict]] = []
    for start in range(0, len(user_ids), step):
        out += _batch_lists(state, list(user_ids[start:start + step]), k, None, True, precision)
    return out


def _batch_lists(state: ServingState, batch: list, k: int, cand_rows: np.ndarray | None,
                 blocked: bool, precision: str = "fp32") -> list[list[dict]]:
    """One batch of users' lists: the blocked all-items product, or logits then top-k."""
    ids = state.ids
    rows = np.array([state.user_row.get(u, -1) for u in batch], np.int64)
    pptr, pitem = state.positives(rows)
    r = np.repeat(np.arange(len(batch)), np.diff(pptr))
    if blocked:
        X, B = score_terms(state, batch)
        if precision == "fp32":
            val, idx = _blocked_topk(state.Wf, X, B, r, pitem, k)
        else:
            val, idx = _low_precision_topk(state, X, B, r, pitem, k, precision)
    else:
        logits = user_logits(state, batch, cand_rows)
        if cand_rows is None:
            logits[r, pitem] = -np.inf
        elif len(pitem):
            where = np.searchsorted(cand_rows, pitem)
            hit = (where < len(cand_rows)) & (cand_rows[np.minimum(where, len(cand_rows) - 1)] == pitem)
            logits[r[hit], where[hit]] = -np.inf
        val, idx = _topk(logits, k)
    prob = _probability(val)  # -inf (excluded) rows are dropped below
    ok = np.isfinite(val)
    cols = idx if cand_rows is None else cand_rows[idx]
    return [[{"item_id": ids[c], "score": p} for c, p, o in zip(c_row, p_row, ok_row) if o]
            for c_row, p_row, ok_row in zip(cols.tolist(), prob.tolist(), ok.tolist())]


def _low_precision_topk(state: ServingState, X: np.ndarray, B: np.ndarray, r: np.ndarray, item: np.ndarray,
                        k: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_blocked_topk` through the half-precision prefilter (the same values and rows);
    users it cannot bound, and matrices beyond float16, go through :func:`_blocked_topk`."""
    low = _low(state, precision)
    if low is None:
        return _blocked_topk(state.Wf, X, B, r, item, k)
    V, I, ok = prefiltered_topk(low, state.Wf, X, B, r, item, k)
    if not ok.all():
        rest = np.flatnonzero(~ok)
        pick = np.isin(r, rest)
        V[rest], I[rest] = _blocked_topk(state.Wf, X[rest], B[rest] if B.ndim == 2 else B,
                                         np.searchsorted(rest, r[pick]), item[pick], k)
    return V, I


def _blocked_topk(W: np.ndarray, X: np.ndarray, B: np.ndarray, r: np.ndarray, item: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``X @ W.T + B`` per row, with ``(r, item)`` pairs excluded, best first
    (ties by item row): the product runs over blocks of :data:`ITEM_BLOCK` items that stay
    in cache while the terms are added, the exclusions masked and the block's top-``k``
    taken, so the logits never make a round trip through memory."""
    torch = attempt_import("torch")

    n = W.shape[0]
    k = min(k, n)
    with warnings.catch_warnings():  # W mapped from a serving snapshot is read-only; it is only read here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        Xt, Wt, Bt = torch.from_numpy(X), torch.from_numpy(W), torch.from_numpy(np.ascontiguousarray(B))
    order = np.argsort(item, kind="stable")
    item_s, r_s = item[order], r[order]
    edges = np.searchsorted(item_s, np.arange(0, n + ITEM_BLOCK, ITEM_BLOCK))
    buf = torch.empty((X.shape[0], min(ITEM_BLOCK, n)), dtype=torch.float32)
    vals, idxs = [], []
    for j, a in enumerate(range(0, n, ITEM_BLOCK)):
        e = min(a + ITEM_BLOCK, n)
        S = buf[:, : e - a]
        torch.matmul(Xt, Wt[a:e].T, out=S)
        S += Bt[a:e] if B.ndim == 1 else Bt[:, a:e]
        lo, hi = edges[j], edges[j + 1]
        if hi > lo:
            S[torch.from_numpy(r_s[lo:hi]), torch.from_numpy(item_s[lo:hi] - a)] = -torch.inf
        v, i = torch.topk(S, min(k, e - a), dim=1)
        vals.append(v)
        idxs.append(i + a)
    V, I = torch.cat(vals, 1), torch.cat(idxs, 1)
    if V.shape[1] > k:
        V, j = torch.topk(V, k, dim=1)
        I = torch.gather(I, 1, j)
    V, I = V.numpy(), I.numpy()
    order = np.lexsort((I, -V), axis=1)  # ties: lower row first, as the single-user path
    return np.take_along_axis(V, order, 1), np.take_along_axis(I, order, 1)


def recommend(catalog: Catalog, user_id: Any, k: int = 10, *, version: int | None = None,
              candidates: Iterable[Any] | None = None, exact: bool = False) -> list[dict]:
    """Top-``k`` for one user; see :func:`recommend_many`."""
    return recommend_many(catalog, [user_id], k, version=version, candidates=candidates, exact=exact)[0]


def scores(catalog: Catalog, user_ids: Sequence[Any], item_ids: Sequence[Any]) -> list[float | None]:
    """``p_ui`` for pairs; None where the item is unknown."""
    state = serving_state(catalog)
    out: list[float | None] = []
    for start in range(0, len(user_ids), BATCH_USERS):
        users = list(user_ids[start:start + BATCH_USERS])
        rows = np.array([state.row.get(i, -1) for i in item_ids[start:start + BATCH_USERS]], np.int64)
        logits = user_logits(state, users)
        for n, r in enumerate(rows):
            if r < 0 or users[n] is None:
                out.append(None)
            else:
                out.append(float(_probability(logits[n, r])))
    return out


def similar_items(catalog: Catalog, item_id: Any, k: int) -> list[dict] | None:
    """Items whose fused vectors are closest (cosine) to ``item_id``'s."""
    k = check_k(k)
    state = serving_state(catalog)
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


def recommend_from_examples(catalog: Catalog, positive: Sequence[Any], negative: Sequence[Any], k: int) -> list[dict]:
    """Rank items for a user described only by liked and disliked examples: the full score
    equation (:func:`score_terms`) of a user with no attributes whose history is the examples."""
    k = check_k(k)
    state = serving_state(catalog)
    pos = [state.row[i] for i in (positive or []) if i in state.row]
    neg = [state.row[i] for i in (negative or []) if i in state.row]
    hist_item = np.array(pos + neg, np.int64)
    hist = (np.array([0, len(hist_item)], np.int64), hist_item,
            np.array([1] * len(pos) + [-1] * len(neg), np.int8), np.zeros(len(hist_item), np.int64))
    X, B = score_terms(state, [_NOBODY], hist)
    S = score_logits(X, state.Wf, B).astype(np.float32, copy=False)
    S[0, hist_item] = -np.inf
    val, idx = _topk(S, k)
    prob = _probability(val[0])
    return [{"item_id": state.ids[c], "score": float(p)} for c, p, v in zip(idx[0], prob, val[0]) if np.isfinite(v)]


class _Nobody:
    """A user id no store holds: no attributes, no segment, no stored history."""


_NOBODY = _Nobody()