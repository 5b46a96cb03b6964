"""The cold items' text-neighbour term: how close a cold item is to what the user liked.

For a user with positives ``j`` and an item ``i`` without events, the raw score is the
largest cosine ``cos(w_i, w_j)`` of the fused item vectors (``FusionModel.item_side``);
per user it is standardised over the cold items and shifted so that the user's best cold
item gets 0 (``(s - max s) / std s``): a cold item can only move down, never above a
warm one it was not above before, while the order among cold items is the similarity's.
Users without a positive (or with one cold item) get 0. The weight ``eta`` is chosen by
refresh on the pooled cuts, judged on cold items with an all-items guard
(:mod:`dynstore.model.selection`); docs/model.md has what it measured.
"""
from __future__ import annotations

import numpy as np

__all__ = ["neighbour_scores", "cold_columns"]

#: positives compared with the cold items at a time (bounds a ``[block, cold]`` matrix)
BLOCK = 256


def _unit(M: np.ndarray) -> np.ndarray:
    M = np.asarray(M, np.float32)
    return M / np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-9)


def cold_columns(cold: np.ndarray, n: int) -> np.ndarray:
    """Rows ``< n`` that are cold: ``cold[i]``, or past the mask (items added after it).

    >>> cold_columns(np.array([True, False]), 4).tolist()
    [0, 2, 3]
    """
    mask = np.ones(n, bool)
    k = min(n, np.asarray(cold).size)
    mask[:k] = np.asarray(cold, bool)[:k]
    return np.flatnonzero(mask)


def neighbour_scores(Wf: np.ndarray, cold: np.ndarray, hist_ptr: np.ndarray, hist_item: np.ndarray,
                     hist_label: np.ndarray) -> np.ndarray:
    """``[m, n]`` (float32): the term at weight 1 for ``m`` users (CSR histories
    ``hist_ptr``, ``hist_item``, ``hist_label``: rows of ``Wf``), 0 on warm items.

    >>> Wf = np.array([[1, 0], [0, 1], [1, 0.1], [0.1, 1]], np.float32)
    >>> S = neighbour_scores(Wf, np.array([False, False, True, True]), np.array([0, 1]), np.array([0]), np.array([1]))
    >>> S[0].tolist()[:3], bool(S[0, 3] < 0)
    ([0.0, 0.0, 0.0], True)
    """
    n = Wf.shape[0]
    ptr = np.asarray(hist_ptr, np.int64)
    items, labels = np.asarray(hist_item, np.int64), np.asarray(hist_label)
    out = np.zeros((ptr.size - 1, n), np.float32)
    cols = cold_columns(cold, n)
    if cols.size < 2:
        return out
    C = _unit(Wf[cols])
    for r in range(ptr.size - 1):
        seg = slice(ptr[r], ptr[r + 1])
        pos = np.unique(items[seg][labels[seg] == 1])
        pos = pos[(pos >= 0) & (pos < n)]
        if not pos.size:
            continue
        top = np.full(cols.size, -np.inf, np.float32)
        for a in range(0, pos.size, BLOCK):
            np.maximum(top, (_unit(Wf[pos[a:a + BLOCK]]) @ C.T).max(0), out=top)
        sd = float(top.std())
        if sd > 0:
            out[r, cols] = (top - top.max()) / sd
    return out
