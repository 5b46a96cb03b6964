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
refresh's pooled cuts -- 0 where co-occurrence does not help (new users have none); a
user's positives may be weighted by recency (``scores(weight=...)``, see
:meth:`dynstore.model.fusion.FusionModel.item_item_bias`).

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

from dynstore.model.histories import entry_rows, ranges

__all__ = ["ItemItem", "cooccurrence"]

#: (user, column) pairs expanded per chunk of users by :func:`cooccurrence`
PAIRS_PER_CHUNK = 1 << 22


def cooccurrence(user: np.ndarray, col: np.ndarray, n_cols: int,
                 weight: np.ndarray | None = None) -> np.ndarray:
    """``X^T X`` (float32 ``[n_cols, n_cols]``) of the user x column matrix ``X`` with
    ones at the distinct pairs ``(user, col)`` -- or, with ``weight`` (one per pair
    given), the largest weight of each distinct pair (a time decay: its latest event).

    Counted from each user's pairs of columns: the dense product costs users x
    ``n_cols^2`` (and users x ``n_cols`` of memory), so it grew with the users times the
    catalogue; this costs the sum of squared positives per user. The counts are exact
    integers, as the float32 product's are (far below 2^24).

    >>> cooccurrence(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2).tolist()
    [[1.0, 1.0], [1.0, 2.0]]
    >>> cooccurrence(np.array([0, 0]), np.array([0, 1]), 2, np.array([0.5, 1.0])).tolist()
    [[0.25, 0.5], [0.5, 1.0]]
    """
    # distinct pairs, sorted by user (a repeated pair is still a single one in X)
    key = np.asarray(user, np.int64) * n_cols + np.asarray(col, np.int64)
    pairs, inv = np.unique(key, return_inverse=True)
    w = None
    if weight is not None:
        w = np.zeros(pairs.size, np.float64)
        np.maximum.at(w, inv.reshape(-1), np.asarray(weight, np.float64))
    user, col = pairs // n_cols, pairs % n_cols
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if user.size else np.zeros(0, np.int64)
    ptr = np.r_[first, user.size]
    lens = np.diff(ptr)
    counts = np.zeros(n_cols * n_cols, np.int64 if w is None else np.float64)
    a = 0
    while a < lens.size:
        # users a..b-1: their pairs stay within PAIRS_PER_CHUNK (one user at least)
        b = a + max(1, int(np.searchsorted(np.cumsum(lens[a:] ** 2), PAIRS_PER_CHUNK, side="right")))
        n = lens[a:b]
        rows = np.arange(ptr[a], ptr[b])           # every entry of these users
        reps = np.repeat(n, n)                     # each pairs with all of its user's entries
        j, _ = ranges(np.repeat(ptr[a:b], n), np.repeat(ptr[a + 1:b + 1], n))
        cell = np.repeat(col[rows], reps) * n_cols + col[j]
        if w is None:
            counts += np.bincount(cell, minlength=n_cols * n_cols)
        else:
            counts += np.bincount(cell, weights=np.repeat(w[rows], reps) * w[j], minlength=n_cols * n_cols)
        a = b
    return counts.reshape(n_cols, n_cols).astype(np.float32)


def text_neighbours(V: np.ndarray, top_n: int) -> np.ndarray:
    """``S [n, n]`` (float32): each row's ``top_n`` most similar other rows of ``V`` by
    cosine (negative similarities dropped), scaled so that each row sums to 1; zero
    diagonal. The target an item-item model is pulled toward (see :meth:`ItemItem.fit`).

    >>> S = text_neighbours(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), 1)
    >>> S.round(2).tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    """
    V = np.asarray(V, np.float32)
    V = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
    sim = V @ V.T
    n = sim.shape[0]
    np.fill_diagonal(sim, -np.inf)
    k = min(int(top_n), n - 1)
    S = np.zeros_like(sim)
    if k < 1:
        return S
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    vals = np.maximum(np.take_along_axis(sim, top, 1), 0.0)
    np.put_along_axis(S, top, vals, 1)
    sums = S.sum(1, keepdims=True)
    return np.divide(S, sums, out=np.zeros_like(S), where=sums > 0)


@dataclass
class ItemItem:
    """Sparse item-item weights as CSR over item rows: row ``j``'s neighbours are
    ``col[ptr[j]:ptr[j+1]]`` with weights ``val[...]``."""

    ptr: np.ndarray  # int64 [n_items + 1]
    col: np.ndarray  # int64 [nnz]
    val: np.ndarray  # float32 [nnz]

    @classmethod
    def fit(cls, user: np.ndarray, item: np.ndarray, n_items: int, *, lam: float = 250.0,
            max_items: int = 3000, top_k: int = 64, min_positives: int = 2,
            weight: np.ndarray | None = None, V: np.ndarray | None = None, mu: float = 0.0,
            text_top_n: int = 20) -> "ItemItem":
        """EASE on the (user, item) positives, kept sparse (see the module docstring).

        ``weight`` (one per positive): a time decay; ``X`` holds each pair's largest.
        ``V`` and ``mu > 0``: pulled toward the text similarity of the items' vectors
        (:meth:`solve`), so an item with few co-occurrences borrows its text neighbours.
        """
        user = np.asarray(user, np.int64)
        item = np.asarray(item, np.int64)
        count = np.bincount(np.unique(user * n_items + item) % n_items, minlength=n_items)
        keep = np.flatnonzero(count >= min_positives)
        keep = keep[np.argsort(-count[keep], kind="stable")[:max_items]]
        if keep.size < 2:
            return cls(np.zeros(n_items + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        col_of = np.full(n_items, -1, np.int64)
        col_of[keep] = np.arange(keep.size)
        sel = col_of[item] >= 0
        G = cooccurrence(user[sel], col_of[item[sel]], keep.size,
                         None if weight is None else np.asarray(weight)[sel])
        S = text_neighbours(V[keep], text_top_n) if (V is not None and mu > 0) else None
        return cls.sparse(cls.solve(G, lam, mu, S), keep, n_items, top_k)

    @staticmethod
    def solve(G: np.ndarray, lam: float, mu: float = 0.0, S: np.ndarray | None = None) -> np.ndarray:
        """The dense weights ``B`` minimising ``|X - XB|^2 + lam |B|^2 + mu |B - S|^2`` with
        ``diag(B) = 0`` (``G = X^T X``; L3AE's language-model regulariser when ``S`` is the
        text similarity). With ``P = (G + (lam + mu) I)^-1`` and ``C = P (G + mu S)``::

            B_ij = C_ij - P_ij C_jj / P_jj

        which is EASE's ``-P_ij / P_jj`` when ``mu = 0``.

        >>> G = np.array([[2.0, 1.0], [1.0, 2.0]])
        >>> np.allclose(ItemItem.solve(G, 1.0), [[0, 1 / 3], [1 / 3, 0]])
        True
        """
        G = np.asarray(G, np.float32)  # lam keeps it well conditioned
        A = G.copy()
        A[np.diag_indices_from(A)] += lam + mu
        P = np.linalg.inv(A)
        C = P @ (G + np.float32(mu) * S) if (mu and S is not None) else np.eye(G.shape[0], dtype=P.dtype) - lam * P
        B = C - P * (np.diag(C) / np.diag(P))[None, :]
        B[np.diag_indices_from(B)] = 0.0
        return B

    @classmethod
    def sparse(cls, B: np.ndarray, keep: np.ndarray, n_items: int, top_k: int) -> "ItemItem":
        """The ``top_k`` largest positive weights of each row of ``B`` (rows and columns:
        the items ``keep``), as CSR over all ``n_items`` rows."""
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
        col = np.concatenate([keep[top[r][ok[r]]] for r in order])
        val = np.concatenate([w[r][ok[r]] for r in order])
        return cls(ptr, col.astype(np.int64), val.astype(np.float32))

    def scores(self, hist_ptr: np.ndarray, hist_item: np.ndarray, n_items: int,
               weight: np.ndarray | None = None) -> np.ndarray:
        """``float32 [m, n_items]``: each user's summed weights from their positives
        (``hist_*`` CSR of item rows; ``weight``: one per entry, else 1), standardised per
        user (0 for users without any)."""
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
        val = self.val[idx] if weight is None else self.val[idx] * np.repeat(np.asarray(weight, np.float32)[known], lens)
        np.add.at(out, (np.repeat(user_of, lens), self.col[idx]), val)
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
