"""The closed-form collaborative component: item-item weights from co-occurrence (EASE).

A returning user's list must move with what they like, item by item, and text
similarity under a linear map recovers only part of what co-occurrence knows. EASE
(Steck 2019) learns item-item weights in closed form from the binary user x item matrix
of positives ``X``::

    P = (X^T X + lambda I)^-1,     B = -P / diag(P),   diag(B) = 0

and scores user ``u`` as ``x_u B``. dynstore keeps it *sparse* (the ``top_k``
largest weights of each row) over at most ``max_items`` items with the most positives,
so it costs ``O(max_items^3)`` once per refresh and ``max_items * top_k`` numbers per
version. In the fused score it enters standardised per user (divided by the
root-mean-square of the user's co-occurrence scores) with one weight ``gamma``, chosen on
refresh's holdout -- 0 where co-occurrence does not help (new users have none).

Examples
--------
>>> import numpy as np
>>> users = np.array([0, 0, 1, 1, 2, 2, 3])
>>> items = np.array([0, 1, 0, 1, 2, 3, 0])
>>> ii = ItemItem.fit(users, items, n_items=4, lam=1.0, min_positives=1)
>>> s = ii.scores(np.array([0, 1]), np.array([0]), n_items=4)   # a user who liked item 0
>>> int(np.argmax(s[0]))                                        # liked with item 0: item 1
1
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .histories import entry_rows, ranges

__all__ = ["ItemItem", "cooccurrence"]

#: (user, column) pairs expanded per chunk of users by :func:`cooccurrence`
PAIRS_PER_CHUNK = 1 << 22


def cooccurrence(user: np.ndarray, col: np.ndarray, n_cols: int) -> np.ndarray:
    """``X^T X`` (float32 ``[n_cols, n_cols]``) of the binary user x column matrix ``X``
    with ones at the distinct pairs ``(user, col)``.

    Counted from each user's pairs of columns: the dense product costs users x
    ``n_cols^2`` (and users x ``n_cols`` of memory), so it grew with the users times the
    catalogue; this costs the sum of squared positives per user. The counts are exact
    integers, as the float32 product's are (far below 2^24).

    >>> cooccurrence(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2).tolist()
    [[1.0, 1.0], [1.0, 2.0]]
    """
    # distinct pairs, sorted by user (a repeated pair is still a single one in X)
    pairs = np.unique(np.asarray(user, np.int64) * n_cols + np.asarray(col, np.int64))
    user, col = pairs // n_cols, pairs % n_cols
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if user.size else np.zeros(0, np.int64)
    ptr = np.r_[first, user.size]
    lens = np.diff(ptr)
    counts = np.zeros(n_cols * n_cols, np.int64)
    a = 0
    while a < lens.size:
        # users a..b-1: their pairs stay within PAIRS_PER_CHUNK (one user at least)
        b = a + max(1, int(np.searchsorted(np.cumsum(lens[a:] ** 2), PAIRS_PER_CHUNK, side="right")))
        n = lens[a:b]
        rows = np.arange(ptr[a], ptr[b])           # every entry of these users
        reps = np.repeat(n, n)                     # each pairs with all of its user's entries
        j, _ = ranges(np.repeat(ptr[a:b], n), np.repeat(ptr[a + 1:b + 1], n))
        counts += np.bincount(np.repeat(col[rows], reps) * n_cols + col[j], minlength=n_cols * n_cols)
        a = b
    return counts.reshape(n_cols, n_cols).astype(np.float32)


@dataclass
class ItemItem:
    """Sparse item-item weights as CSR over item rows: row ``j``'s neighbours are
    ``col[ptr[j]:ptr[j+1]]`` with weights ``val[...]``."""

    ptr: np.ndarray  # int64 [n_items + 1]
    col: np.ndarray  # int64 [nnz]
    val: np.ndarray  # float32 [nnz]

    @classmethod
    def fit(cls, user: np.ndarray, item: np.ndarray, n_items: int, *, lam: float = 250.0,
            max_items: int = 3000, top_k: int = 64, min_positives: int = 2) -> "ItemItem":
        """EASE on the (user, item) positives, kept sparse (see the module docstring)."""
        user = np.asarray(user, np.int64)
        item = np.asarray(item, np.int64)
        pairs = np.unique(user * n_items + item)  # binary: one per (user, item)
        u, it = pairs // n_items, pairs % n_items
        count = np.bincount(it, minlength=n_items)
        keep = np.flatnonzero(count >= min_positives)
        keep = keep[np.argsort(-count[keep], kind="stable")[:max_items]]
        empty = cls(np.zeros(n_items + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        if keep.size < 2:
            return empty
        col_of = np.full(n_items, -1, np.int64)
        col_of[keep] = np.arange(keep.size)
        sel = col_of[it] >= 0
        u, c = u[sel], col_of[it[sel]]
        G = cooccurrence(u, c, keep.size)  # float32: lambda keeps it well conditioned
        G[np.diag_indices_from(G)] += lam
        P = np.linalg.inv(G)
        B = P / (-np.diag(P))
        B[np.diag_indices_from(B)] = 0.0
        k = min(top_k, keep.size - 1)
        top = np.argpartition(-B, k - 1, axis=1)[:, :k]  # the largest weights of each row
        w = np.take_along_axis(B, top, 1).astype(np.float32)
        ok = w > 0
        lens = ok.sum(1)
        ptr = np.zeros(n_items + 1, np.int64)
        ptr[keep + 1] = lens
        ptr = np.cumsum(ptr)
        # rows in item order: place each kept row's entries at its item's slot
        order = np.argsort(keep, kind="stable")
        col = np.concatenate([keep[top[r][ok[r]]] for r in order]) if keep.size else np.zeros(0, np.int64)
        val = np.concatenate([w[r][ok[r]] for r in order]) if keep.size else np.zeros(0, np.float32)
        return cls(ptr, col.astype(np.int64), val.astype(np.float32))

    def scores(self, hist_ptr: np.ndarray, hist_item: np.ndarray, n_items: int) -> np.ndarray:
        """``float32 [m, n_items]``: each user's summed weights from their positives
        (``hist_*`` CSR of item rows), standardised per user (0 for users without any)."""
        hist_ptr = np.asarray(hist_ptr, np.int64)
        hist_item = np.asarray(hist_item, np.int64)
        m = hist_ptr.size - 1
        out = np.zeros((m, n_items), np.float32)
        if not self.val.size or not hist_item.size:
            return out
        user_of = entry_rows(hist_ptr)
        known = hist_item < self.ptr.size - 1
        user_of, hist_item = user_of[known], hist_item[known]
        starts, ends = self.ptr[hist_item], self.ptr[hist_item + 1]
        lens = ends - starts
        idx, _ = ranges(starts, ends)
        np.add.at(out, (np.repeat(user_of, lens), self.col[idx]), self.val[idx])
        rms = np.sqrt((out ** 2).mean(axis=1, keepdims=True))
        return np.divide(out, rms, out=np.zeros_like(out), where=rms > 0)

    def tensors(self, prefix: str = "ii_") -> dict[str, np.ndarray]:
        return {f"{prefix}ptr": self.ptr.astype(np.int64), f"{prefix}col": self.col.astype(np.int64),
                f"{prefix}val": self.val.astype(np.float32)}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str = "ii_") -> "ItemItem | None":
        if f"{prefix}ptr" not in tensors:
            return None
        return cls(np.asarray(tensors[f"{prefix}ptr"], np.int64), np.asarray(tensors[f"{prefix}col"], np.int64),
                   np.asarray(tensors[f"{prefix}val"], np.float32))
