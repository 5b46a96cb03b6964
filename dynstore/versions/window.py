"""A training window: the events of ``--since`` mapped to matrix rows.

``since`` is parsed once into a :class:`TrainingWindow` (relative windows count
back from the newest event); :class:`WindowData` holds the items, users and
labelled events of one snapshot as the rows a model trains and is judged on.
"""
from __future__ import annotations

import copy
import datetime as _dt
import re
from dataclasses import dataclass

import numpy as np

from dynstore.storage.catalog import Catalog
from dynstore.model.dynamics import DynamicSpec, rule_half_life
from dynstore.errors import ConfigError, DynstoreError
from dynstore.model.fusion import FusionModel, ModelConfig, TrainingData
from dynstore.model.itemitem import ItemItem
from dynstore.data.semantic import CatalogueVectors
from dynstore.versions import DEFAULT_SINCE
from dynstore.versions.embeddings import items_table, users_table

__all__ = ["TrainingWindow", "WindowData", "parse_since", "newest_event", "time_decay_days", "labelled_events",
           "HOLDOUT", "DEFAULT_SINCE"]

HOLDOUT = 0.10  # the newest share of a window's events that judges a model


@dataclass(frozen=True)
class TrainingWindow:
    """A ``--since`` value, parsed once: ``all``, a span back from the newest event
    (``30d``, ``12w``, ``48h``) or a fixed start (``2025-01-31``).

    Examples
    --------
    >>> import datetime as dt
    >>> w = TrainingWindow.parse("7d")
    >>> w.start(dt.datetime(2025, 1, 8))
    datetime.datetime(2025, 1, 1, 0, 0)
    >>> TrainingWindow.parse("all").start(dt.datetime(2025, 1, 8)) is None
    True
    >>> TrainingWindow.parse("last week")
    Traceback (most recent call last):
    ...
    dynstore.errors.ConfigError: --since 'last week': use e.g. 30d, 12w, 48h, a date like 2025-01-31, or 'all'
    """

    since: str | None
    back: _dt.timedelta | None = None   # relative: how far back from the newest event
    fixed: _dt.datetime | None = None   # absolute: the first instant of the window

    @classmethod
    def parse(cls, since: str | None) -> "TrainingWindow":
        if since is None or str(since).lower() == "all":
            return cls(since)
        m = re.fullmatch(r"\s*(\d+)\s*([hdw])\s*", str(since))
        if m:
            n, unit = int(m.group(1)), m.group(2)
            hours = {"h": 1, "d": 24, "w": 24 * 7}[unit] * n
            return cls(since, back=_dt.timedelta(hours=hours))
        try:
            return cls(since, fixed=_dt.datetime.fromisoformat(str(since)))
        except ValueError:
            raise ConfigError(f"--since {since!r}: use e.g. 30d, 12w, 48h, a date like 2025-01-31, "
                              "or 'all'") from None

    def start(self, newest: _dt.datetime | None) -> _dt.datetime | None:
        """First instant of the window (None: every event); relative windows count back from ``newest``."""
        if self.back is not None:
            return None if newest is None else newest - self.back
        return self.fixed

    def describe(self, newest: _dt.datetime | None) -> str:
        """The window as a version's ``train_window`` shows it."""
        start = self.start(newest)
        return "all" if start is None else f"{start:%Y-%m-%d %H:%M} .. {newest:%Y-%m-%d %H:%M}"


def parse_since(since: str | None, newest: _dt.datetime) -> _dt.datetime | None:
    """Start of the training window of ``since``, counting back from ``newest``
    (:meth:`TrainingWindow.start` of :meth:`TrainingWindow.parse`).

    >>> import datetime as dt
    >>> parse_since("2w", dt.datetime(2025, 1, 15))
    datetime.datetime(2025, 1, 1, 0, 0)
    """
    return TrainingWindow.parse(since).start(newest)


def newest_event(con) -> _dt.datetime | None:
    """What relative windows (``--since 30d``) count back from: the newest interaction
    that is not in the future (a day of clock skew allowed), so one stray timestamp
    from year 2999 (``ingest --allow-future``) cannot empty every window; the newest
    of all when every event is in the future.
    """
    from dynstore.data.ingest import FUTURE_TOLERANCE_S  # one constant of the write path: readers need not import it

    limit = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None) + _dt.timedelta(seconds=FUTURE_TOLERANCE_S)
    return con.execute("SELECT coalesce(max(ts) FILTER (WHERE ts <= ?), max(ts)) FROM interactions",
                       [limit]).fetchall()[0][0]


def time_decay_days(span_days: float) -> float:
    """Half-life of event weights for a window of ``span_days``.

    Recent behaviour matters most: events a quarter of the window old count
    half (a year at most, a week at least).

    >>> time_decay_days(120.0), time_decay_days(10_000.0)
    (30.0, 365.0)
    """
    return float(np.clip(span_days / 4, 7, 365))


def labelled_events(con, cutoff: _dt.datetime | None):
    """Training events as Arrow: user_id, item_id, ts (epoch s), label (1/-1/0), as the
    ``labelled_events`` view decides them -- the same events serving reads.

    Only the window is read: ``labelled_events_since`` (``sql/views.sql``) puts
    the cutoff on both of its scans, so DuckDB hands it to the Lance scan as a
    filter, with the four columns the rules need; memory follows the window's
    events, not the history's.
    """
    return con.sql("""
        SELECT user_id, item_id, epoch(ts)::BIGINT AS ts, label FROM labelled_events_since(?::TIMESTAMP)
        ORDER BY ts, user_id, item_id, label
    """, params=[cutoff]).to_arrow_table()


class WindowData:
    """Items, users and events of one snapshot mapped to matrix rows."""

    def __init__(self, catalog: Catalog, lv, con, cutoff: _dt.datetime | None,
                 encoder: tuple[str, int] | None = None):
        items = items_table(catalog)
        self.items = items
        self.ids = items.column("item_id").to_pylist()
        self.item_row = {i: n for n, i in enumerate(self.ids)}
        # read from the cache's dataset, not looked up in its in-memory copy: the window's
        # matrix is then the only catalogue-sized copy of the vectors
        # (``encoder``: the vectors of another encoder's cache, a version's before a change)
        self.V, _ = CatalogueVectors(catalog, items.column("item_id"), encoder).matrix()
        self.A = np.asarray(lv.item_spec.transform(items), np.float32)
        users = users_table(catalog)
        self.user_ids = users.column("user_id").to_pylist()
        self.user_row = {u: n for n, u in enumerate(self.user_ids)}
        ev = labelled_events(con, cutoff)
        u = ev.column("user_id").to_pylist()
        for x in u:
            if x not in self.user_row:
                self.user_row[x] = len(self.user_ids)
                self.user_ids.append(x)
        UA = np.asarray(lv.user_spec.transform(users), np.float32) if lv.user_spec.width else np.zeros((len(users), 0), np.float32)
        extra = len(self.user_ids) - len(UA)  # users with events but no attributes
        self.UA = np.vstack([UA, np.zeros((extra, UA.shape[1]), np.float32)])
        UK = lv.user_spec.segments(users)
        self.UK = np.vstack([UK, np.full((extra, UK.shape[1]), -1, np.int64)])
        it = np.fromiter((self.item_row.get(i, -1) for i in ev.column("item_id").to_pylist()), np.int64)
        us = np.fromiter((self.user_row[x] for x in u), np.int64, len(u))
        keep = it >= 0
        self.user, self.item = us[keep], it[keep]
        self.ts = ev.column("ts").to_numpy(zero_copy_only=False)[keep].astype(np.int64)
        self.label = ev.column("label").to_numpy(zero_copy_only=False)[keep].astype(np.int8)

    def split(self, holdout: float = HOLDOUT):
        """Train on all but the most recent ``holdout`` share of events."""
        if len(self.ts) == 0:
            cut = 0
        else:
            cut = np.quantile(self.ts, 1.0 - holdout, method="lower")
        tr = self.ts < cut if len(self.ts) else np.zeros(0, bool)
        if tr.sum() == 0 or (~tr).sum() == 0:
            raise DynstoreError("not enough interactions in the window to train and evaluate; widen --since")
        train = TrainingData(V=self.V, A=self.A, UA=self.UA, user=self.user[tr], item=self.item[tr],
                             ts=self.ts[tr], label=self.label[tr], UK=self.UK)
        self.hold_ts = self.ts[~tr]
        return train, (self.user[~tr], self.item[~tr], self.label[~tr])

    def rule(self, data, lv):
        """The popularity rule (an untrained model: decayed positives with the half-life
        fitted to the span of ``data``), scored as of the end of ``data``."""
        spec = lv.model.dynamic or DynamicSpec()
        span = (float(data.ts.max()) - float(data.ts.min())) / 86400.0 if len(data.ts) else 0.0
        return FusionModel.untrained(data.V, self.A, self.UA.shape[1], None, ModelConfig(),
                                     rule=rule_half_life(spec, span), dynamic=spec,
                                     segments=tuple(n for _, n in lv.user_spec.segment_columns()))

    def all_events(self):
        """Every event of the window (train and holdout) as training data."""
        return TrainingData(V=self.V, A=self.A, UA=self.UA, user=self.user, item=self.item,
                            ts=self.ts, label=self.label, UK=self.UK)

    def rows_in(self, lv) -> np.ndarray:
        """Each window item's row in version ``lv`` (-1: not in it), computed once per version."""
        cache = self.__dict__.setdefault("_rows_in", {})
        if lv.version not in cache:
            cache[lv.version] = version_rows(self.ids, lv)
        return cache[lv.version]

    def model_of(self, lv) -> FusionModel:
        """The version's model with its per-item terms (the item-item weights, the content
        prior's rows) over this window's item rows, matched by id. The window lists the
        items in the table's order, which an ingest may change; the version's terms follow
        its own rows. Items added since get no item-item weights and no prior row (the
        whole prior), as serving gives them; ``lv.model`` itself is left as it is."""
        model = lv.model
        rows = version_rows(self.ids, lv)
        m = len(lv.ids)
        if (model.item_item is None and model.prior_item is None) or (
                rows.size >= m and np.array_equal(rows[:m], np.arange(m)) and (rows[m:] < 0).all()):
            return model  # the version's rows first, in order: positions already match
        out = copy.copy(model)
        if model.prior_item is not None:
            ok = (rows >= 0) & (rows < model.prior_item.size)
            out.prior_item = np.zeros(rows.size, np.float32)
            out.prior_item[ok] = model.prior_item[rows[ok]]
        if model.item_item is not None:
            out.item_item = _reindexed(model.item_item, rows)
        return out

    def residuals_of(self, lv) -> tuple[np.ndarray, np.ndarray]:
        """The current version's per-item residuals, recovered from its rows."""
        base_w, base_b = lv.model.item_side(self.V, self.A, None)
        R = np.zeros_like(base_w)
        rb = np.zeros(len(self.ids), np.float32)
        rows = self.rows_in(lv)
        ok = np.flatnonzero(rows >= 0)
        R[ok] = lv.Wf[rows[ok]] - base_w[ok]
        rb[ok] = lv.bias[rows[ok]] - base_b[ok]
        return R, rb


def version_rows(ids: list, lv) -> np.ndarray:
    """The row of each of ``ids`` in version ``lv`` (-1: not in it)."""
    return np.array([lv.row.get(i, -1) for i in ids], np.int64)


def _reindexed(ii: ItemItem, rows: np.ndarray) -> ItemItem:
    """``ii``'s weights over new item rows: new row ``n`` is old row ``rows[n]`` (-1: none)."""
    n_old = ii.ptr.size - 1
    new_of_old = np.full(n_old, -1, np.int64)
    ok = (rows >= 0) & (rows < n_old)
    new_of_old[rows[ok]] = np.flatnonzero(ok)
    r = new_of_old[np.repeat(np.arange(n_old), np.diff(ii.ptr))]
    c = new_of_old[ii.col]
    keep = (r >= 0) & (c >= 0)
    order = np.argsort(r[keep], kind="stable")
    ptr = np.zeros(rows.size + 1, np.int64)
    np.cumsum(np.bincount(r[keep], minlength=rows.size), out=ptr[1:])
    return ItemItem(ptr, c[keep][order], ii.val[keep][order])
