"""Ranking metrics (numpy only): Recall@k, NDCG@k, AUC, and a top-k helper.

Conventions shared by every function:

* items are integer indices ``0 .. n_items-1``; ``ranked`` rows may be padded with ``-1``;
* ``relevant`` is one collection of relevant item indices per user (a ``set``, list or
  array), aligned with the rows of ``ranked`` / ``scores``;
* results are means over users with at least one relevant item (others are ignored, not
  counted as zero), so a metric answers "for users who had something to find".

Definitions (binary relevance):

* ``Recall@k = |top_k ∩ rel| / |rel|``;
* ``NDCG@k = DCG@k / IDCG@k`` with ``DCG = Σ_{r<k} rel_r / log2(r + 2)`` and IDCG the DCG
  of ``min(|rel|, k)`` hits at the top;
* ``AUC`` = probability that a relevant item outscores a non-relevant candidate,
  ties counting one half.

Examples
--------
>>> import numpy as np
>>> ranked = np.array([[3, 1, 2], [0, 1, 2]])
>>> recall_at_k(ranked, [{1, 5}, {2}], k=2)
0.25
>>> round(ndcg_at_k(ranked, [{3}, {0}], k=3), 6)
1.0
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dynstore.errors import DynstoreError

__all__ = ["MAX_K", "check_k", "recall_at_k", "ndcg_at_k", "ndcg_per_user", "clearly_better", "auc", "user_auc", "top_k", "to_csr"]

#: The longest list any ranking call returns.
MAX_K = 10_000


def check_k(k) -> int:
    """``k`` as an int in ``1..MAX_K``, or a one-line :class:`DynstoreError`."""
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise DynstoreError(f"k must be an integer between 1 and {MAX_K}, got {k!r}") from None
    if not 1 <= k <= MAX_K:
        raise DynstoreError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def to_csr(sets: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Pack per-user item collections into ``(ptr [n+1], items)`` with sorted unique rows.

    >>> to_csr([{2, 1}, [], np.array([4, 4])])
    (array([0, 2, 2, 3]), array([1, 2, 4]))
    """
    rows = [np.unique(np.fromiter(s, dtype=np.int64)) if not isinstance(s, np.ndarray)
            else np.unique(s.astype(np.int64)) for s in sets]
    lens = np.array([r.size for r in rows], dtype=np.int64)
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=ptr[1:])
    items = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return ptr, items.astype(np.int64)


def _hits(ranked: np.ndarray, relevant: Sequence, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean hit matrix ``[n_users, k]`` and relevant counts, vectorised via sorted keys."""
    ranked = np.asarray(ranked, dtype=np.int64)[:, :k]
    if len(relevant) != ranked.shape[0]:
        raise ValueError("ranked and relevant must have one row per user")
    ptr, items = to_csr(relevant)
    n_rel = np.diff(ptr)
    n_users = ranked.shape[0]
    span = int(max(ranked.max(initial=-1), items.max(initial=-1))) + 2
    # (user, item) pairs become one sortable int64 key; -1 padding never matches
    user_of = np.repeat(np.arange(n_users, dtype=np.int64), n_rel)
    rel_keys = user_of * span + items  # already sorted: users ascending, items sorted
    q = np.arange(n_users, dtype=np.int64)[:, None] * span + ranked
    if rel_keys.size == 0:
        return np.zeros(ranked.shape, dtype=bool), n_rel
    pos = np.minimum(np.searchsorted(rel_keys, q), rel_keys.size - 1)
    hit = (rel_keys[pos] == q) & (ranked >= 0)
    return hit, n_rel


def recall_at_k(ranked: np.ndarray, relevant: Sequence, k: int) -> float:
    """Mean Recall@k over users with at least one relevant item.

    Parameters
    ----------
    ranked : int array [n_users, >= k]
        Item indices, best first (``-1`` = padding).
    relevant : sequence of sets / arrays, one per user
    k : int

    Returns
    -------
    float (``nan`` when no user has a relevant item)

    >>> recall_at_k(np.array([[1, 2]]), [{2, 7}], k=2)
    0.5
    """
    hit, n_rel = _hits(ranked, relevant, k)
    m = n_rel > 0
    if not m.any():
        return float("nan")
    return float(np.mean(hit[m].sum(1) / n_rel[m]))


def ndcg_at_k(ranked: np.ndarray, relevant: Sequence, k: int) -> float:
    """Mean binary NDCG@k over users with at least one relevant item.

    >>> round(ndcg_at_k(np.array([[5, 2]]), [{2}], k=2), 4)   # 1/log2(3)
    0.6309
    """
    per_user = ndcg_per_user(ranked, relevant, k)
    return float(np.mean(per_user)) if per_user.size else float("nan")


def ndcg_per_user(ranked: np.ndarray, relevant: Sequence, k: int) -> np.ndarray:
    """Binary NDCG@k of every user with at least one relevant item (in row order), for
    paired comparisons of two rankings of the same users.

    >>> ndcg_per_user(np.array([[5, 2], [1, 3]]), [{5}, set()], k=2).tolist()
    [1.0]
    """
    hit, n_rel = _hits(ranked, relevant, k)
    m = n_rel > 0
    disc = 1.0 / np.log2(np.arange(hit.shape[1]) + 2.0)
    dcg = (hit * disc).sum(1)
    idcg = np.concatenate([[0.0], np.cumsum(disc)])[np.minimum(n_rel, hit.shape[1])]
    return dcg[m] / idcg[m]


def clearly_better(new: np.ndarray, base: np.ndarray, z: float) -> bool:
    """Whether per-user scores ``new`` beat ``base`` (same users, same order) by more
    than ``z`` standard errors of the mean paired difference: a small holdout is noisy,
    and a choice made on noise is worse than no choice.

    >>> clearly_better(np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0]), 1.64)
    True
    >>> clearly_better(np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]), 1.64)
    False
    """
    d = np.asarray(new, np.float64) - np.asarray(base, np.float64)
    if d.size < 2:
        return False
    se = d.std(ddof=1) / np.sqrt(d.size)
    return bool(d.mean() > z * se) if se > 0 else bool(d.mean() > 0)


def auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """AUC of one set of positive scores against one set of negative scores.

    Ties count one half. ``nan`` if either side is empty.

    >>> auc(np.array([0.9, 0.4]), np.array([0.5, 0.1]))
    0.75
    >>> auc(np.array([1.0]), np.array([1.0]))
    0.5
    """
    p = np.asarray(scores_pos, dtype=np.float64).ravel()
    n = np.sort(np.asarray(scores_neg, dtype=np.float64).ravel())
    if p.size == 0 or n.size == 0:
        return float("nan")
    below = np.searchsorted(n, p, side="left")
    ties = np.searchsorted(n, p, side="right") - below
    return float((below + 0.5 * ties).sum() / (p.size * n.size))


def user_auc(
    scores: np.ndarray, relevant: Sequence, exclude: Sequence | None = None
) -> float:
    """Mean per-user AUC from a score matrix.

    For each user with a relevant item, the relevant items are the positives and every
    other item not in ``exclude`` (e.g. the user's training items) is a negative.

    Parameters
    ----------
    scores : float array [n_users, n_items]
    relevant : sequence of item collections, one per row
    exclude : sequence of item collections, one per row, optional

    >>> s = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    >>> user_auc(s, [{1}, {1}], exclude=[{0}, set()])
    0.75
    """
    scores = np.asarray(scores)
    out = []
    ex_ptr, ex_items = to_csr(exclude) if exclude is not None else (None, None)
    rel_ptr, rel_items = to_csr(relevant)
    for u in range(scores.shape[0]):
        rel = rel_items[rel_ptr[u] : rel_ptr[u + 1]]
        if rel.size == 0:
            continue
        neg = np.ones(scores.shape[1], dtype=bool)
        neg[rel] = False
        if ex_ptr is not None:
            neg[ex_items[ex_ptr[u] : ex_ptr[u + 1]]] = False
        out.append(auc(scores[u, rel], scores[u, neg]))
    return float(np.nanmean(out)) if out else float("nan")


#: score cells ranked at once by :func:`top_k`: its float64 copy and the argpartition
#: indices are 8 bytes a cell, so a batch of 16M scores would add 256 MB at a time
TOP_K_CELLS = 1 << 21


def top_k(scores: np.ndarray, k: int, exclude: Sequence | None = None) -> np.ndarray:
    """Indices of the ``k`` best items per row, best first, skipping ``exclude``.

    Deterministic; ties inside the top k are ordered by item index. Rows with fewer than ``k``
    eligible items are padded with ``-1``.

    >>> top_k(np.array([[0.1, 0.9, 0.5, 0.7]]), 2, exclude=[{1}])
    array([[3, 2]])
    """
    scores = np.asarray(scores)
    n_users, n_items = scores.shape
    ptr, items = to_csr(exclude) if exclude is not None else (None, None)
    # rows are ranked independently, so a few at a time give the same lists
    step = max(1, TOP_K_CELLS // max(n_items, 1))
    parts = [_top_k_rows(scores, a, min(a + step, n_users), k, ptr, items) for a in range(0, n_users, step)]
    return np.concatenate(parts) if parts else np.zeros((0, k), np.int64)


def _top_k_rows(scores: np.ndarray, a: int, b: int, k: int, ptr, items) -> np.ndarray:
    """:func:`top_k` of rows ``a:b`` (``ptr``/``items``: the CSR exclusions of every row)."""
    # negated once, in float64: the descending order, an excluded item at +inf
    neg = np.negative(scores[a:b], dtype=np.float64)
    n_users, n_items = neg.shape
    if ptr is not None:
        rows = np.repeat(np.arange(n_users), np.diff(ptr[a:b + 1]))
        neg[rows, items[ptr[a]:ptr[b]]] = np.inf
    k_eff = min(k, n_items)
    if k_eff < n_items:
        part = np.argpartition(neg, k_eff - 1, axis=1)[:, :k_eff]
    else:
        part = np.tile(np.arange(n_items), (n_users, 1))
    ps = np.take_along_axis(neg, part, 1)
    order = np.lexsort((part, ps), axis=1)
    idx = np.take_along_axis(part, order, 1)
    vals = np.take_along_axis(ps, order, 1)
    idx[~np.isfinite(vals) & (vals > 0)] = -1
    if k_eff < k:
        idx = np.concatenate([idx, -np.ones((n_users, k - k_eff), np.int64)], 1)
    return idx
