"""Dynamic item features: recent behaviour around each item, as of any moment.

Recent popularity is the rule to beat on temporal data, and it is *data*, not a
parameter: what was liked in the last days changes every hour. So the model does
not learn per-item popularity once per refresh; it reads the item's recent
behaviour at scoring time and learns only how to weigh it (``theta`` in
:mod:`dynstore.model.fusion`). A trained version therefore contains the popularity rule
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
and nothing overflows whatever the time span. A few checkpoints in time cut each
item's events into slices, so the search halves one slice, not the whole block.

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
_MARKS = 16  # checkpoints per kind, at most; and no more than events per item (memory)


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


def _block_search(keys: np.ndarray, lo: np.ndarray, hi: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``np.searchsorted(keys, queries, side="left")`` for queries whose answer lies in
    ``[lo, hi]`` (their item's block ``keys[start[i]:start[i+1]]``, or a part of it);
    ``lo`` and ``hi`` are overwritten.

    A binary search over the block, all queries at once: a few halvings of an item's
    own events instead of ``log2`` of the whole log in probes scattered over it (which
    miss the caches more as the log grows), and no sort of the queries.

    >>> start, items = np.array([0, 2, 4]), np.array([0, 1, 1])
    >>> _block_search(np.array([3, 5, 12, 14]), start[items], start[items + 1],
    ...               np.array([4, 10, 13])).tolist()
    [1, 2, 3]
    """
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
    # half-life -> running log-sum-exp less its item's offset, and tau (seconds): the
    # offset is the same for every query of an item, so it is taken off once here
    local: dict = field(default_factory=dict)
    tau: dict = field(default_factory=dict)
    # checkpoints (relative times, sorted) and bounds[j, i]: the first position of item
    # i's events at or after marks[j - 1] (row 0: its block's start, last row: its end),
    # so a query between two marks halves only the item's events between them
    marks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    bounds: np.ndarray | None = None
    # log1p(n) as float32 for every count an item can have: exactly the values the
    # float64 log1p and its cast give, looked up
    log_count: np.ndarray | None = None

    def mark(self, item: np.ndarray, t: np.ndarray, n_marks: int) -> None:
        """Checkpoints at ``n_marks`` quantiles of the events' relative times ``t`` (in
        key order; ``item``: their items), and the bounds they cut each block into."""
        n = self.start.size - 1
        self.marks = np.zeros(0, np.int64)
        if t.size and n_marks > 0:
            cut = np.arange(1, n_marks + 1) * t.size // (n_marks + 1)
            self.marks = np.unique(np.partition(t, cut)[cut])
        S = self.marks.size
        # events of each item before each mark: counted per (item, marks at or before
        # the event), then summed along the marks
        below = np.searchsorted(self.marks, t, side="right")
        cnt = np.bincount(item * (S + 1) + below, minlength=n * (S + 1)).reshape(n, S + 1)
        self.bounds = np.empty((S + 2, n), np.int64)
        self.bounds[0] = self.start[:-1]
        np.cumsum(cnt.T, axis=0, out=self.bounds[1:])
        self.bounds[1:] += self.start[:-1]

    def before(self, items: np.ndarray, where: np.ndarray | int, span: int) -> tuple[np.ndarray, np.ndarray]:
        """Position of each item's last event strictly before ``where`` (relative time),
        and how many of its events came before."""
        j = np.searchsorted(self.marks, where, side="right")  # marks[j - 1] <= where < marks[j]
        if np.ndim(j):
            lo, hi = self.bounds[j, items], self.bounds[j + 1, items]
        else:
            lo, hi = self.bounds[j][items], self.bounds[j + 1][items]
        k = _block_search(self.key, lo, hi, items * span + where) - 1
        return k, k + 1 - self.start[items]


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
            idx.mark(it, t, min(_MARKS, it.size // max(self.n_items, 1)))
            most = int(np.diff(start).max(initial=0))
            idx.log_count = np.log1p(np.arange(most + 1, dtype=np.float64)).astype(np.float32)
            for h in spec.half_lives:
                if h is None:
                    continue
                tau = h * DAY / math.log(2.0)
                big = self.span / tau + _MARGIN + math.log(max(it.size, 1))
                lse = np.logaddexp.accumulate(t / tau + it * big) if it.size else np.zeros(0)
                idx.local[h], idx.tau[h] = lse - it * big, tau
            self._kinds[kind] = idx

    def counts(self, items, t) -> np.ndarray:
        """Decayed counts ``float64 [len(items), width]`` of events strictly before ``t``.

        ``t`` is one time (epoch seconds) or one per item.
        """
        items = np.asarray(items, np.int64)
        rel = np.broadcast_to(np.asarray(t, np.int64) - self.t0, items.shape)
        where = np.clip(rel, 0, self.span - 1)  # the search stays inside an item's keys
        out = np.zeros((items.size, self.spec.width), np.float64)
        for col, h, idx, n_before, has, kk in self._columns(items, where):
            if h is None:
                out[:, col] = np.maximum(n_before, 0)
            elif has.size:
                out[has, col] = np.exp(idx.local[h][kk] - rel[has] / idx.tau[h])
        return out

    def features(self, items, t) -> np.ndarray:
        """``log1p`` of :meth:`counts`, float32: the model's input.

        With one ``t`` for all items (training's batches, serving's "now") the decayed
        sums are computed only for the items with earlier events (``log1p(0)`` is 0) and
        the plain counts are looked up: a float64 value cast into a float32 array rounds
        as ``astype`` does, so the result has the bits of ``log1p(counts)`` all the same.
        """
        if np.ndim(t) != 0:
            return np.log1p(self.counts(items, t)).astype(np.float32)
        items = np.asarray(items, np.int64)
        rel = int(t) - self.t0
        where = min(max(rel, 0), self.span - 1)
        out = np.zeros((items.size, self.spec.width), np.float32)
        for col, h, idx, n_before, has, kk in self._columns(items, where):
            if h is None:
                out[:, col] = idx.log_count[np.maximum(n_before, 0)]  # as counts(): none for row -1
            elif has.size:
                out[has, col] = np.log1p(np.exp(idx.local[h][kk] - rel / idx.tau[h]))
        return out

    def _columns(self, items: np.ndarray, where):
        """Per feature column: ``(column, half-life, kind index, events before, rows with
        one, their last event's position)``; each kind is searched once for its columns."""
        col = 0
        for kind in self.spec.kinds:
            idx = self._kinds[kind]
            k, n_before = idx.before(items, where, self.span)
            has = np.flatnonzero(n_before > 0)
            kk = k[has]
            for h in self.spec.half_lives:
                yield col, h, idx, n_before, has, kk
                col += 1

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
    :meth:`dynstore.model.features.FeatureSpec.segments`).

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
        if items.size > 1 and not (items[1:] > items[:-1]).all():
            # each distinct item once, in order: with sorted keys the queries then walk
            # the index forward (a sampled pool repeats items, and is in no order)
            uniq, inv = np.unique(items, return_inverse=True)
            return self.key_features(uniq, t, keys)[:, inv]
        ok = np.flatnonzero(keys >= 0)
        shape = (ok.size, items.size, self.spec.width)
        F = self._inner.features((keys[ok, None] * self.n_items + items).reshape(-1), t).reshape(shape)
        if ok.size == keys.size:
            return F
        out = np.zeros((keys.size, *shape[1:]), np.float32)
        out[ok] = F
        return out

    def pair_features(self, keys, items, t) -> np.ndarray:
        """``float32 [len(items), width]``: features of each (segment key, item) pair."""
        keys, items = np.asarray(keys, np.int64), np.asarray(items, np.int64)
        out = np.zeros((items.size, self.spec.width), np.float32)
        ok = np.flatnonzero(keys >= 0)
        if ok.size:
            ids = keys[ok] * self.n_items + items[ok]
            if np.ndim(t) == 0:
                # each pair once, in the index's order (as in key_features)
                uniq, inv = np.unique(ids, return_inverse=True)
                out[ok] = self._inner.features(uniq, t)[inv]
            else:
                out[ok] = self._inner.features(ids, t)
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
