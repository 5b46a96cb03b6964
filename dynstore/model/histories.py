"""User histories as CSR arrays, and the small array helpers the model and trainer share.

A history is every labelled event of a user (``labelled_events``: 1 positive, -1
explicit negative, 0 shown-but-ignored impression) in the order the log gives them,
packed as ``(ptr [m+1], item, label, ts)`` so that user ``u``'s events are
``item[ptr[u]:ptr[u+1]]``.
"""

from __future__ import annotations

import math

import numpy as np

from dynstore.model.spec import ModelConfig

__all__ = ["build_histories", "decay_weights", "ranges", "normalise", "add_into", "weighted_bag_sum", "entry_rows",
           "most_recent_first", "recency_sum", "history_groups", "HISTORY_GROUPS"]


def normalise(V: np.ndarray) -> np.ndarray:
    """Rows of ``V`` scaled to unit length (zero rows stay zero), float32.

    >>> normalise(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    V = np.asarray(V, dtype=np.float32)
    norm = np.linalg.norm(V, axis=1, keepdims=True)
    return np.divide(V, norm, out=np.zeros_like(V), where=norm > 0)


def add_into(a: np.ndarray, b) -> np.ndarray:
    """``a + b``, summed into ``a`` when the sum has ``a``'s shape and dtype (then
    ``a`` is overwritten and returned: the same numbers, one large array fewer).

    >>> a = np.ones(2, np.float32)
    >>> add_into(a, 0.5) is a, add_into(a, np.ones(2)).dtype.name
    (True, 'float64')
    """
    if (isinstance(a, np.ndarray) and a.flags.writeable and np.result_type(a, b) == a.dtype
            and np.broadcast_shapes(a.shape, np.shape(b)) == a.shape):
        return np.add(a, b, out=a)
    return a + b


def decay_weights(rank: np.ndarray, length: np.ndarray, half_life: float) -> np.ndarray:
    """``exp(-rank/h)`` normalised over a bag of ``length`` events (closed-form sum).

    >>> [round(float(x), 3) for x in decay_weights(np.array([0, 1]), np.array([2, 2]), 1.0)]
    [0.731, 0.269]
    """
    q = math.exp(-1.0 / half_life)
    total = (1.0 - q ** length.astype(np.float64)) / (1.0 - q)
    return (q ** rank.astype(np.float64) / total).astype(np.float32)


def weighted_bag_sum(W: np.ndarray, items: np.ndarray, weights: np.ndarray, bag: np.ndarray,
                     n_bags: int, chunk: int = 1 << 15) -> np.ndarray:
    """``out[b] = sum of weights[e] * W[items[e]]`` over entries ``e`` of bag ``b``
    (``bag`` sorted ascending), float32 ``[n_bags, W.shape[1]]``: numpy's segment sum,
    so serving never needs torch. Works in chunks of entries to bound memory.

    >>> W = np.eye(3, dtype=np.float32)
    >>> weighted_bag_sum(W, np.array([0, 2, 1]), np.array([1.0, 2.0, 3.0]), np.array([0, 0, 2]), 3).tolist()
    [[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]]
    """
    out = np.zeros((n_bags, W.shape[1]), np.float32)
    for a in range(0, items.size, chunk):
        it, b = items[a:a + chunk], bag[a:a + chunk]
        w = np.asarray(weights[a:a + chunk], np.float32)
        first = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        out[b[first]] += _segment_sums(W, it, w, first)
    return out


def _segment_sums(W: np.ndarray, it: np.ndarray, w: np.ndarray, first: np.ndarray) -> np.ndarray:
    """``[len(first), d]``: for each run ``first[s]:first[s + 1]`` of entries, the sum of
    ``w[e] * W[it[e]]`` added left to right (serving and evaluation both sum through here,
    so they agree bit for bit). ``np.add.reduceat`` along the rows of a 2-D array ran 3x
    slower on the serving path's 2,048-user batches, so the runs are sorted longest first
    and the ``j``-th entry of every run that has one is added in one step: histories are
    short and alike, so that is few steps over contiguous prefixes. A few runs (a single
    user) are summed one by one with ``cumsum``, which adds left to right as well."""
    if first.size <= 4:  # one user's history, as a single-user call has: no sort, few calls
        ends = np.r_[first[1:], it.size]
        return np.stack([np.cumsum(W[it[a:b]] * w[a:b, None], axis=0)[-1] for a, b in zip(first, ends)])
    lens = np.diff(np.r_[first, it.size])
    order = np.argsort(-lens, kind="stable")
    start, lens = first[order], lens[order]
    acc = W[it[start]] * w[start][:, None]
    for j in range(1, int(lens[0]) if lens.size else 0):
        n = int(np.searchsorted(-lens, -j, side="left"))  # runs longer than j
        e = start[:n] + j
        acc[:n] += W[it[e]] * w[e][:, None]
    out = np.empty_like(acc)
    out[order] = acc
    return out


def ranges(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``arange(start[b], end[b])`` for all b -> (indices, offsets [n_bags]).

    >>> ranges(np.array([2, 7]), np.array([4, 8]))
    (array([2, 3, 7]), array([0, 2]))
    """
    lens = np.maximum(end - start, 0)
    offsets = np.zeros(lens.size, dtype=np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    total = int(lens.sum())
    idx = np.arange(total, dtype=np.int64) - np.repeat(offsets - start, lens)
    return idx, offsets


def entry_rows(ptr: np.ndarray) -> np.ndarray:
    """The row of every entry of a CSR ``ptr`` (int64).

    >>> entry_rows(np.array([0, 2, 2, 3])).tolist()
    [0, 0, 2]
    """
    ptr = np.asarray(ptr, dtype=np.int64)
    return np.repeat(np.arange(ptr.size - 1, dtype=np.int64), np.diff(ptr))


def most_recent_first(
    hist_ptr: np.ndarray, hist_item: np.ndarray, hist_label: np.ndarray, hist_ts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user_of, item, label)`` of CSR histories, sorted by user and, inside a user,
    most recent first (a later position in the history wins ties in time).

    >>> most_recent_first(np.array([0, 3]), np.array([5, 6, 7]), np.array([1, 1, 1]),
    ...                   np.array([2, 9, 2]))[1].tolist()
    [6, 7, 5]
    """
    user_of = entry_rows(hist_ptr)
    items = np.asarray(hist_item, dtype=np.int64)
    labels = np.asarray(hist_label, dtype=np.int8)
    ts = np.asarray(hist_ts, dtype=np.int64)
    pos = np.arange(items.size, dtype=np.int64)
    order = np.lexsort((-pos, -ts, user_of))
    return user_of[order], items[order], labels[order]


def recency_sum(W: np.ndarray, user_of: np.ndarray, items: np.ndarray, m: int,
                max_history: int, half_life: float) -> np.ndarray:
    """``float32 [m, W.shape[1]]``: per user, the recency-weighted mean of ``W``'s rows of
    the user's ``max_history`` first entries (``user_of`` sorted, most recent first):
    weights ``exp(-rank / half_life)`` normalised over the entries kept.

    >>> recency_sum(np.eye(2, dtype=np.float32), np.array([0, 0]), np.array([1, 0]), 2,
    ...             1, 1.0).tolist()
    [[0.0, 1.0], [0.0, 0.0]]
    """
    counts = np.bincount(user_of, minlength=m)
    starts = np.zeros(m, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    rank = np.arange(user_of.size, dtype=np.int64) - starts[user_of]
    cut = rank < max_history
    eff = np.minimum(counts, max_history)
    w = decay_weights(rank[cut], eff[user_of[cut]], half_life)
    return weighted_bag_sum(W, items[cut], w, user_of[cut], m)


def build_histories(
    users: np.ndarray,
    ev_user: np.ndarray,
    ev_item: np.ndarray,
    ev_label: np.ndarray,
    ev_ts: np.ndarray,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR histories of ``users`` from an event log, for :meth:`FusionModel.user_vectors`.

    Returns ``(hist_ptr [m+1], hist_item, hist_label, hist_ts)``; within a user, events keep
    their order in the log (which breaks ties in time). Users without events get an empty row.
    ``order`` is ``np.argsort(ev_user, kind="stable")`` when the caller already has it: one
    sort of the log serves every batch of users built from it (else each batch re-sorts
    the whole log, and batches of users times log length grows as the square of the data).

    >>> build_histories(np.array([7, 3]), np.array([3, 7, 3]), np.array([0, 1, 2]),
    ...                 np.array([1, 1, -1]), np.array([5, 6, 7]))[0]
    array([0, 1, 3])
    """
    users = np.asarray(users, dtype=np.int64)
    ev_user = np.asarray(ev_user, dtype=np.int64)
    if order is None:
        order = np.argsort(ev_user, kind="stable")
    su = ev_user[order]
    lo = np.searchsorted(su, users, side="left")
    hi = np.searchsorted(su, users, side="right")
    idx, _ = ranges(lo, hi)
    sel = order[idx]
    ptr = np.zeros(users.size + 1, dtype=np.int64)
    np.cumsum(hi - lo, out=ptr[1:])
    return (
        ptr,
        np.asarray(ev_item, dtype=np.int64)[sel],
        np.asarray(ev_label, dtype=np.int8)[sel],
        np.asarray(ev_ts, dtype=np.int64)[sel],
    )


#: The aggregates of a user's history that make the user vector, one learned scale
#: ``g_<name>`` each: (name, label of the events, which length/half-life settings).
#: "short" is the same positives as "pos" with a short memory: what the user is after
#: right now (a new like moves it at once); "neg" explicit dislikes; "imp" items shown
#: and ignored.
HISTORY_GROUPS = (("pos", 1, "long"), ("short", 1, "short"), ("neg", -1, "long"), ("imp", 0, "long"))


def history_groups(config: ModelConfig) -> list[tuple[str, int, int, float]]:
    """``(name, label, max_history, half_life)`` of each aggregate ``config`` uses.

    >>> from dynstore.model.spec import ModelConfig
    >>> [g[0] for g in history_groups(ModelConfig(use_negatives=False))]
    ['pos', 'short']
    """
    out = []
    for name, label, memory in HISTORY_GROUPS:
        if label != 1 and not config.use_negatives:
            continue
        if memory == "short":
            out.append((name, label, int(config.short_history), float(config.short_half_life)))
        else:
            out.append((name, label, int(config.max_history), float(config.half_life)))
    return out
