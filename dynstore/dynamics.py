"""Dynamic item features: recent behaviour around each item, as of any moment.

Recent popularity is the rule to beat on temporal data, and it is *data*, not a
parameter: what was liked in the last days changes every hour. So the model does
not learn per-item popularity once per refresh; it reads the item's recent
behaviour at scoring time and learns only how to weigh it (``theta`` in
:mod:`dynstore.model`). A trained version therefore contains the popularity rule
(``theta`` on one feature, every other weight zero) and can only add to it, and
new interactions move every list at once, without retraining.

The features of item ``i`` at time ``t`` are, for each kind of event (labelled
positive, explicit negative, shown-but-ignored impression; see the
``labelled_events`` view) and each half-life ``h``::

    log(1 + sum over events e of i with ts_e < t of 0.5 ** ((t - ts_e) / h))

(``h = None``: the plain count of all earlier events). Strictly *before* ``t``:
training scores an event from what was known before it, serving scores "now".
Log counts make trends linear: ``log c_7d - log c_30d`` is a learnable weight
difference, and so is a positive rate ``log c_pos - log c_imp``.

Point-in-time queries cost one binary search per (item, time, kind): per kind,
events are sorted by (item, time) and each half-life keeps a running
log-sum-exp of ``ts / tau`` with a per-item offset large enough that earlier
items vanish (< e^-60) from an item's sums, so no state is replayed per query
and nothing overflows whatever the time span.

Examples
--------
>>> import numpy as np
>>> spec = DynamicSpec(half_lives=(1.0, None), kinds=("pos",))
>>> day = 86400
>>> act = ItemActivity(spec, item=np.array([0, 0, 1]), ts=np.array([0, day, day]),
...                    label=np.array([1, 1, 1]), n_items=2)
>>> np.round(np.expm1(act.features(np.array([0, 1]), 2 * day)), 3)  # pos@1d, pos@all
array([[0.75, 2.  ],
       [0.5 , 1.  ]], dtype=float32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DynamicSpec", "ItemActivity", "SegmentActivity", "KIND_LABELS", "SEGMENT_SPEC",
           "popularity_prior", "rule_half_life", "Activity"]

#: event kind -> label in ``labelled_events`` (1 positive, -1 negative, 0 ignored impression)
KIND_LABELS = {"pos": 1, "neg": -1, "imp": 0}
DAY = 86400.0
_MARGIN = 80.0  # in units of tau: how far an earlier item's running sum is pushed down


@dataclass(frozen=True)
class DynamicSpec:
    """Which behaviour counts become features: kinds x half-lives (days; None = all time).

    >>> DynamicSpec().names()[:3]
    ['pos@1d', 'pos@7d', 'pos@30d']
    """

    half_lives: tuple = (1.0, 7.0, 30.0, 90.0, 365.0, None)
    kinds: tuple = ("pos", "neg", "imp")

    @property
    def width(self) -> int:
        return len(self.half_lives) * len(self.kinds)

    def names(self) -> list[str]:
        return [f"{k}@{'all' if h is None else f'{h:g}d'}" for k in self.kinds for h in self.half_lives]

    def index(self, kind: str, half_life: float | None) -> int:
        """Column of one feature (e.g. the popularity rule's)."""
        return self.kinds.index(kind) * len(self.half_lives) + list(self.half_lives).index(half_life)

    def to_dict(self) -> dict:
        return {"half_lives": list(self.half_lives), "kinds": list(self.kinds)}

    @classmethod
    def from_dict(cls, d: dict) -> "DynamicSpec":
        return cls(half_lives=tuple(d["half_lives"]), kinds=tuple(d["kinds"]))


def _block_search(keys: np.ndarray, start: np.ndarray, items: np.ndarray,
                  queries: np.ndarray) -> np.ndarray:
    """``np.searchsorted(keys, queries, side="left")`` for queries that fall inside their
    item's block ``keys[start[i]:start[i+1]]`` (a key's item is ``key // span``).

    A binary search over the block, all queries at once: a few halvings of an item's
    own events instead of ``log2`` of the whole log in probes scattered over it (which
    miss the caches more as the log grows), and no sort of the queries.

    >>> _block_search(np.array([3, 5, 12, 14]), np.array([0, 2, 4]), np.array([0, 1, 1]),
    ...               np.array([4, 10, 13])).tolist()
    [1, 2, 3]
    """
    lo, hi = start[items], start[items + 1]
    act = np.flatnonzero(lo < hi)
    if act.size:
        # most answers are a block's ends (no event of the item yet, or all of them):
        # settle those first, and halve only the blocks the query falls inside
        first = keys[lo[act]] >= queries[act]
        hi[act[first]] = lo[act[first]]
        act = act[~first]
        last = keys[hi[act] - 1] < queries[act]
        lo[act[last]] = hi[act[last]]
        act = act[~last]
    while act.size:
        low, high = lo[act], hi[act]
        mid = (low + high) >> 1
        less = keys[mid] < queries[act]
        low, high = np.where(less, mid + 1, low), np.where(less, high, mid)
        lo[act], hi[act] = low, high
        act = act[low < high]
    return lo


@dataclass
class _KindIndex:
    key: np.ndarray                  # int64 item * span + (ts - t0), sorted
    start: np.ndarray                # first position of each item (n_items + 1)
    lse: dict = field(default_factory=dict)  # half-life -> running log-sum-exp


class ItemActivity:
    """Events of one snapshot, indexed for point-in-time decayed counts.

    Parameters
    ----------
    spec : DynamicSpec
    item, ts, label : arrays of equal length
        Item row, event time (epoch seconds) and label (1 / -1 / 0) of every event.
    n_items : int
    """

    def __init__(self, spec: DynamicSpec, item, ts, label, n_items: int):
        self.spec = spec
        self.n_items = int(n_items)
        item = np.asarray(item, np.int64)
        ts = np.asarray(ts, np.int64)
        label = np.asarray(label)
        self.t0 = int(ts.min()) if ts.size else 0
        self.t1 = int(ts.max()) if ts.size else 0
        self.span = self.t1 - self.t0 + 2
        self._kinds: dict[str, _KindIndex] = {}
        for kind in spec.kinds:
            sel = label == KIND_LABELS[kind]
            it, t = item[sel], ts[sel] - self.t0
            order = np.lexsort((t, it))
            it, t = it[order], t[order]
            start = np.searchsorted(it, np.arange(self.n_items + 1), side="left")
            idx = _KindIndex(key=it * self.span + t, start=start)
            for h in spec.half_lives:
                if h is None:
                    continue
                tau = h * DAY / math.log(2.0)
                big = self.span / tau + _MARGIN + math.log(max(it.size, 1))
                idx.lse[h] = np.logaddexp.accumulate(t / tau + it * big) if it.size else np.zeros(0)
            self._kinds[kind] = idx

    def counts(self, items, t) -> np.ndarray:
        """Decayed counts ``float64 [len(items), width]`` of events strictly before ``t``.

        ``t`` is one time (epoch seconds) or one per item.
        """
        items = np.asarray(items, np.int64)
        rel = np.broadcast_to(np.asarray(t, np.int64) - self.t0, items.shape)
        where = np.clip(rel, 0, self.span - 1)  # the search stays inside an item's keys
        out = np.zeros((items.size, self.spec.width), np.float64)
        col = 0
        for kind in self.spec.kinds:
            idx = self._kinds[kind]
            # last event of the item strictly before t (its block holds the answer)
            k = _block_search(idx.key, idx.start, items, items * self.span + where) - 1
            n_before = k + 1 - idx.start[items]
            has = np.flatnonzero(n_before > 0)
            kk, items_has, rel_has = k[has], items[has], rel[has]  # the same rows for every half-life
            for h in self.spec.half_lives:
                if h is None:
                    out[:, col] = np.maximum(n_before, 0)
                elif has.size:
                    tau = h * DAY / math.log(2.0)
                    big = self.span / tau + _MARGIN + math.log(max(idx.key.size, 1))
                    out[has, col] = np.exp(idx.lse[h][kk] - items_has * big - rel_has / tau)
                col += 1
        return out

    def features(self, items, t) -> np.ndarray:
        """``log1p`` of :meth:`counts`, float32: the model's input."""
        return np.log1p(self.counts(items, t)).astype(np.float32)

    def now(self) -> int:
        """A time just after the newest event: serving's "as of"."""
        return self.t1 + 1



#: the features per (user segment, item): positives and ignored impressions among the
#: users of one segment (an age band, a region ...) -- what *people like this user*
#: pick lately, and what they are shown
SEGMENT_SPEC = DynamicSpec(half_lives=(7.0, 30.0, None), kinds=("pos", "imp"))


class SegmentActivity:
    """:class:`ItemActivity` per user segment: each event counts for the item in every
    segment of its user (one key per segment column, see
    :meth:`dynstore.features.FeatureSpec.segments`).

    Parameters
    ----------
    spec : DynamicSpec
    item, ts, label : arrays of the events
    keys : int64 [n_events, n_columns]
        Segment keys of each event's user (-1: none).
    n_items, n_keys : int

    Examples
    --------
    >>> import numpy as np
    >>> spec = DynamicSpec(half_lives=(None,), kinds=("pos",))
    >>> act = SegmentActivity(spec, item=np.array([0, 0, 1]), ts=np.array([1, 2, 3]),
    ...                       label=np.array([1, 1, 1]), keys=np.array([[0], [1], [1]]),
    ...                       n_items=2, n_keys=2)
    >>> f = act.features(np.array([[0], [1]]), np.array([0, 1]), 10)  # users in segment 0, 1
    >>> np.expm1(f[:, 0, :, 0]).round(3).tolist()                     # [user, item]
    [[1.0, 0.0], [1.0, 1.0]]
    """

    def __init__(self, spec: DynamicSpec, item, ts, label, keys, n_items: int, n_keys: int):
        self.spec, self.n_items, self.n_keys = spec, int(n_items), int(n_keys)
        item = np.asarray(item, np.int64)
        keys = np.asarray(keys, np.int64).reshape(item.size, -1)
        self.n_columns = keys.shape[1]
        ok = keys >= 0
        rows, cols = np.nonzero(ok)
        ids = keys[rows, cols] * self.n_items + item[rows]
        self._inner = ItemActivity(spec, ids, np.asarray(ts)[rows], np.asarray(label)[rows],
                                   max(self.n_keys, 1) * self.n_items)

    def features(self, keys, items, t) -> np.ndarray:
        """``float32 [n_users, n_columns, len(items), width]``: features of ``items`` in each
        segment of each user (``keys [n_users, n_columns]``), as of ``t``; zeros for -1."""
        keys = np.asarray(keys, np.int64).reshape(-1, self.n_columns)
        uniq, inv = np.unique(keys, return_inverse=True)
        return self.key_features(items, t, uniq)[inv.reshape(keys.shape)]

    def key_features(self, items, t, keys=None) -> np.ndarray:
        """``float32 [len(keys), len(items), width]``: features of ``items`` in each of
        ``keys`` (default: every segment); one vectorised query for all pairs."""
        items = np.asarray(items, np.int64)
        keys = np.arange(self.n_keys) if keys is None else np.asarray(keys, np.int64)
        pk = np.repeat(keys, items.size)
        pi = np.tile(items, keys.size)
        return self.pair_features(pk, pi, t).reshape(keys.size, items.size, self.spec.width)

    def pair_features(self, keys, items, t) -> np.ndarray:
        """``float32 [len(items), width]``: features of each (segment key, item) pair."""
        keys, items = np.asarray(keys, np.int64), np.asarray(items, np.int64)
        out = np.zeros((items.size, self.spec.width), np.float32)
        ok = keys >= 0
        if ok.any():
            out[ok] = self._inner.features(keys[ok] * self.n_items + items[ok], t)
        return out


@dataclass
class Activity:
    """The dynamic-feature indexes of one event log: per item, and per (segment, item)."""

    items: ItemActivity
    segments: SegmentActivity | None = None

    def now(self) -> int:
        return self.items.now()


def popularity_prior(counts: np.ndarray) -> np.ndarray:
    """Standardised ``log(1 + counts)``: a static popularity bias (float32), what the
    model falls back to when it has no dynamic features (the ``dynamic=False`` ablation).

    >>> popularity_prior(np.array([0, 0, 3, 3])).tolist()
    [-1.0, -1.0, 1.0, 1.0]
    """
    lp = np.log1p(np.maximum(np.asarray(counts, dtype=np.float64), 0.0))
    sd = lp.std()
    return ((lp - lp.mean()) / (sd if sd > 0 else 1.0)).astype(np.float32)


POPULARITY_DAYS = 30.0
POPULARITY_SHARE = 0.1


def rule_half_life(spec: DynamicSpec, span_days: float) -> float | None:
    """Half-life of the popularity rule for data spanning ``span_days``: of the spec's
    half-lives, the one closest (in log) to 30 days or a tenth of the span, whichever is
    longer (sparse, long-running data needs a longer memory).

    >>> rule_half_life(DynamicSpec(), 120.0), rule_half_life(DynamicSpec(), 8000.0)
    (30.0, 365.0)
    """
    want = max(POPULARITY_DAYS, POPULARITY_SHARE * float(span_days))
    finite = [h for h in spec.half_lives if h is not None]
    if not finite:
        return None
    return min(finite, key=lambda h: abs(math.log(h / want)))
