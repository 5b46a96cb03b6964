"""The user-kNN term: what the users most like this one picked (numpy only).

A second personal signal beside the item-item term (:mod:`dynstore.model.itemitem`):
user ``u``'s neighbours are the ``k`` users (and any tied with the ``k``-th) of a *pool* (every user's positives as the
scorer knows them: a training window's events, or the serving state's) whose sets of
positives are most similar to ``u``'s by cosine on the binary user x item matrix
``X``; item ``i`` scores ``sum_v sim(u, v) X_vi`` over those neighbours, standardised
per user (divided by the root-mean-square of the user's scores) as the item-item term
is. Nothing is stored in a version but the weight ``delta`` and ``k``: the pool is the
live data, so a new like moves a user's neighbours at once. Measured on Complete
Journey's rolling cuts (``benchmarks/bench_personal_terms.py``, docs/model.md).

>>> pool = Pool.build(np.array([0, 2, 4, 5]), np.array([0, 1, 0, 2, 3]), n_items=4)
>>> s = user_knn_scores(pool, np.array([0, 1]), np.array([0]), k=1)   # a user who liked item 0
>>> int(np.argmax(s[0][1:])) + 1                                      # a neighbour's other pick
1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynstore.model.histories import entry_rows, ranges

__all__ = ["Pool", "user_knn_scores"]

#: similarity cells (query users x pool users) computed at a time
CELLS_PER_BLOCK = 1 << 24


def _distinct(ptr: np.ndarray, item: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, item, ptr)`` of a CSR's distinct (row, item) pairs, sorted by row then item."""
    rows = entry_rows(ptr)
    key = np.unique(rows * np.int64(n_items) + np.asarray(item, np.int64))
    row, it = key // n_items, key % n_items
    new_ptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=ptr.size - 1))]).astype(np.int64)
    return row, it, new_ptr


@dataclass
class Pool:
    """The neighbour pool: every pool user's distinct positives (CSR by user) and the
    same pairs indexed by item (which users picked each item)."""

    ptr: np.ndarray       # int64 [n_users + 1]: user v's items are item[ptr[v]:ptr[v+1]]
    item: np.ndarray      # int64
    norm: np.ndarray      # float32 [n_users]: sqrt(number of positives)
    by_item_ptr: np.ndarray  # int64 [n_items + 1]
    by_item_user: np.ndarray  # int64
    n_items: int

    @classmethod
    def build(cls, ptr: np.ndarray, item: np.ndarray, n_items: int) -> "Pool":
        """From a CSR of positives over item rows (duplicates counted once)."""
        ptr = np.asarray(ptr, np.int64)
        row, it, new_ptr = _distinct(ptr, np.asarray(item, np.int64), int(n_items))
        order = np.argsort(it, kind="stable")
        by_ptr = np.concatenate([[0], np.cumsum(np.bincount(it, minlength=n_items))]).astype(np.int64)
        return cls(new_ptr, it, np.sqrt(np.diff(new_ptr)).astype(np.float32), by_ptr, row[order], int(n_items))

    @classmethod
    def of_events(cls, user: np.ndarray, item: np.ndarray, label: np.ndarray, n_users: int,
                  n_items: int) -> "Pool":
        """From event rows ``(user, item, label)``: the positives (label 1) of users ``0..n_users-1``."""
        pos = np.asarray(label) == 1
        u, i = np.asarray(user, np.int64)[pos], np.asarray(item, np.int64)[pos]
        order = np.argsort(u, kind="stable")
        ptr = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=n_users))]).astype(np.int64)
        return cls.build(ptr, i[order], n_items)

    @property
    def n_users(self) -> int:
        return self.ptr.size - 1


def _similarities(pool: Pool, qrow: np.ndarray, qitem: np.ndarray, m: int, qw: np.ndarray) -> np.ndarray:
    """Cosine ``[m, pool users]`` of ``m`` query users (distinct pairs ``qrow, qitem``, the
    query side weighted ``qw``)."""
    known = qitem < pool.n_items
    qrow, qitem, qw = qrow[known], qitem[known], qw[known]
    starts, ends = pool.by_item_ptr[qitem], pool.by_item_ptr[qitem + 1]
    idx, _ = ranges(starts, ends)
    cell = np.repeat(qrow, ends - starts) * np.int64(pool.n_users) + pool.by_item_user[idx]
    sim = np.bincount(cell, weights=np.repeat(qw, ends - starts),
                      minlength=m * pool.n_users).astype(np.float32).reshape(m, pool.n_users)
    qn = np.sqrt(np.bincount(qrow, weights=qw.astype(np.float64) ** 2, minlength=m)).astype(np.float32)
    sim /= np.maximum(qn, 1e-12)[:, None] * np.maximum(pool.norm, 1e-12)[None, :]
    return sim


def _block(pool: Pool, qrow: np.ndarray, qitem: np.ndarray, qw: np.ndarray, m: int, k: int,
           self_rows: np.ndarray, out: np.ndarray) -> None:
    sim = _similarities(pool, qrow, qitem, m, qw)
    own = np.flatnonzero((self_rows >= 0) & (self_rows < pool.n_users))
    sim[own, self_rows[own]] = 0.0  # a user is not their own neighbour
    if int(k) < pool.n_users:  # the k most similar, and every user tied with the k-th (order-free)
        kth = -np.partition(-sim, int(k) - 1, axis=1)[:, int(k) - 1:int(k)]
        sim[sim < kth] = 0.0
    r, v = np.nonzero(sim > 0)
    w = sim[r, v]
    starts, ends = pool.ptr[v], pool.ptr[v + 1]
    idx, _ = ranges(starts, ends)
    lens = ends - starts
    cell = np.repeat(r, lens) * np.int64(pool.n_items) + pool.item[idx]
    out += np.bincount(cell, weights=np.repeat(w, lens), minlength=m * pool.n_items).reshape(m, pool.n_items)


def _query_weights(hist_ptr: np.ndarray, hist_item: np.ndarray, n: int,
                   weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(row, item, ptr, w)`` of the distinct (user, item) pairs, each with the largest
    ``weight`` of its entries."""
    key = entry_rows(hist_ptr) * np.int64(n) + np.asarray(hist_item, np.int64)
    order = np.argsort(key, kind="stable")
    key, w = key[order], np.asarray(weight, np.float32)[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.zeros(0, np.int64)
    w = np.maximum.reduceat(w, first) if key.size else w
    key = key[first]
    row, it = key // n, key % n
    ptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=hist_ptr.size - 1))]).astype(np.int64)
    return row, it, ptr, w


def user_knn_scores(pool: Pool, hist_ptr: np.ndarray, hist_item: np.ndarray, k: int,
                    self_rows: np.ndarray | None = None, weight: np.ndarray | None = None) -> np.ndarray:
    """``float32 [m, pool.n_items]``: each user's neighbours' positives weighted by
    similarity, standardised per user (0 for users without positives or neighbours).

    ``hist_*``: the users' positives (CSR over item rows); ``self_rows``: each user's own
    row in the pool (-1: none), left out of their neighbours; ``weight``: each history
    entry's weight on the query side of the cosine (an item counts with its largest;
    None: 1 each)."""
    hist_ptr = np.asarray(hist_ptr, np.int64)
    m = hist_ptr.size - 1
    n = pool.n_items
    out = np.zeros((m, n), np.float32)
    if m == 0 or pool.n_users == 0 or int(k) < 1:
        return out
    self_rows = np.full(m, -1, np.int64) if self_rows is None else np.asarray(self_rows, np.int64)
    width = max(n, int(np.max(hist_item, initial=-1)) + 1)
    if weight is None:
        row, item, ptr = _distinct(hist_ptr, np.asarray(hist_item, np.int64), width)
        qw = np.ones(row.size, np.float32)
    else:
        row, item, ptr, qw = _query_weights(hist_ptr, hist_item, width, weight)
    step = max(1, CELLS_PER_BLOCK // max(pool.n_users, n))
    for a in range(0, m, step):
        b = min(m, a + step)
        sel = slice(ptr[a], ptr[b])
        _block(pool, row[sel] - a, item[sel], qw[sel], b - a, k, self_rows[a:b], out[a:b])
    rms = np.sqrt((out ** 2).mean(axis=1, keepdims=True))
    return np.divide(out, rms, out=np.zeros_like(out), where=rms > 0)
