"""Serving state: what ``recommend`` scores with, built once, then kept current.

A :class:`ServingState` holds one version's item matrix (plus items encoded
since, fused with the version's parameters), every user's labelled history
(the ``labelled_events`` view, as CSR arrays), the users' attributes, and the
behaviour counts behind the dynamic bias and the segment term, as of the
newest event.

Building it reads the whole interaction log (hundreds of milliseconds at a
million rows). Most commits only *append* interactions (an ingest, logged
impressions), so a state advances instead: the appended Lance fragments are
read, labelled by the store's rules, and folded in -- new events go to a small
per-user overlay on the base histories, an impression that a new positive
supersedes is dropped (as ``labelled_events`` drops it), and the decayed
counts are decayed to the new "now" and updated with the events that came and
went. The cost follows the new rows, not the table. Anything else -- a new
version, items, users, the semantic cache, the rules, a delete or a
compaction of the interactions -- rebuilds the state, and so does an overlay
grown past :data:`MAX_OVERLAY`. ``tests/test_serving.py`` checks that an
advanced state scores exactly as a rebuilt one.

Items without a cached semantic vector (added but not yet encoded) are left
out until ``encode`` runs; they are listed in ``stale_items``. A reader never
encodes, writes or locks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from dynstore.storage.catalog import Catalog
from dynstore.model.dynamics import KIND_LABELS, SEGMENT_SPEC, ItemActivity
from dynstore.model.userknn import Pool
from dynstore.data.rules import label_sql
from dynstore.data.semantic import cached_vectors
from dynstore.encoders.cache import cache_dataset, encoder_info
from dynstore.sqltext import sql_text, statements
from dynstore.errors import DynstoreError
from dynstore.storage.registry import current_version
from dynstore.serving.snapshot import read_snapshot, snapshot_meta, write_snapshot
from dynstore.versions.embeddings import load_parameters, load_version, resolve_version, version_loaded
from dynstore.data.views import views_connection
from dynstore.versions.index import recorded_index_settings

__all__ = ["ServingState", "serving_state", "keep_serving_snapshot", "MAX_OVERLAY"]

#: events in the overlay beyond which a state is rebuilt instead of advanced
MAX_OVERLAY = 200_000
HOT_ITEMS = 200  # items with the largest dynamic lift, re-ranked beside the index's candidates
DAY = 86400.0


class _Rows:
    """``user_id -> row`` of the base histories, plus users first seen since."""

    __slots__ = ("base", "extra")

    def __init__(self, base: dict, extra: dict | None = None):
        self.base, self.extra = base, extra or {}

    def get(self, key, default=-1):
        r = self.base.get(key)
        if r is None:
            return self.extra.get(key, default)
        return r

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def items(self):
        yield from self.base.items()
        yield from self.extra.items()


@dataclass
class _Counts:
    """Decayed behaviour counts as of ``now``: per item, and per (segment key, item) on demand."""

    spec: Any                     # DynamicSpec of the item features
    now: int
    items: np.ndarray             # float64 [n_items, spec.width]
    seg_spec: Any = None          # SEGMENT_SPEC, when the model has a segment term
    seg_base: Any = None          # ItemActivity over (key * n_items + item) of the base events
    n_keys: int = 0
    # events since the base: item, keys [m, columns], ts, label, sign (+1 came, -1 went)
    delta: tuple = ()
    seg_cache: dict = field(default_factory=dict)  # key -> (now, len(delta) then, counts)


def _contributions(spec, label: np.ndarray, ts: np.ndarray, now: int) -> np.ndarray:
    """``float64 [m, spec.width]``: what each event adds to its item's counts at ``now``."""
    out = np.zeros((label.size, spec.width), np.float64)
    col = 0
    age = (now - ts.astype(np.float64)) / DAY
    for kind in spec.kinds:
        sel = label == KIND_LABELS[kind]
        for h in spec.half_lives:
            out[sel, col] = 1.0 if h is None else np.exp2(-age[sel] / h)
            col += 1
    return out


def _decay(spec, dt: float) -> np.ndarray:
    """Per column: the factor that moves counts ``dt`` seconds later."""
    return np.array([1.0 if h is None else 2.0 ** (-dt / (h * DAY)) for _ in spec.kinds for h in spec.half_lives])


@dataclass
class ServingState:
    version: int
    model: Any
    ids: list
    row: dict
    Wf: np.ndarray
    bias: np.ndarray        # static + dynamic, as of the newest event
    user_row: Any           # user_id -> row of the histories (see _Rows)
    ptr: np.ndarray         # CSR over the base users' histories, ordered by (ts, item, label)
    hist_item: np.ndarray
    hist_label: np.ndarray
    hist_ts: np.ndarray
    UA: np.ndarray          # [n_known_users, fu]
    ua_row: dict            # user_id -> row of UA (and of UK)
    UK: np.ndarray          # [n_known_users, segment columns] segment keys (-1: none)
    pos_ptr: np.ndarray     # CSR of the base positives, for exclusion
    pos_item: np.ndarray
    index: Any = None       # Lance dataset with an IVF index over the version's rows, if built
    n_indexed: int = 0      # rows [0, n_indexed) are in the index; later rows are new items
    index_params: dict = field(default_factory=dict)  # the index's recorded settings (versions.build_index)
    static_bias: np.ndarray | None = None  # the version's bias (new items fused, deleted -inf)
    # new users' bias (static + theta_new . f_i, as of the newest event); None: the model has
    # no theta_new, or there are no counts (then it equals ``bias``)
    bias_new: np.ndarray | None = None
    counts: _Counts | None = None
    hist_us: np.ndarray | None = None      # event times in microseconds (supersession needs them)
    dead: np.ndarray | None = None         # base events dropped since (superseded impressions)
    overlay: dict = field(default_factory=dict)  # user row -> (item, label, ts, us) since the base
    # (user, item) -> newest impression the rules call positive: the build's, and those since
    imp_pos: dict = field(default_factory=dict)
    imp_pos_new: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)   # what the state was built from (see _source)
    _seg_rows: dict = field(default_factory=dict)
    _hot: Any = None
    _knn: Any = None        # the user-kNN pool over the base positives (built on first use; see knn_pool)
    # single-user int8 / float16 prefilter over Wf (see recommend._scan_matrix); shared by the states
    # advanced from this one, which keep Wf
    prefilter: dict = field(default_factory=dict)

    # -- users --------------------------------------------------------------------------
    @property
    def n_base_users(self) -> int:
        return self.ptr.size - 1

    def user_rows(self, user_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Rows into the histories and into the attribute tables (-1: unknown)."""
        hist = np.array([self.user_row.get(u, -1) for u in user_ids], np.int64)
        attr = np.array([self.ua_row.get(u, -1) for u in user_ids], np.int64)
        return hist, attr

    def histories(self, rows: np.ndarray):
        """CSR ``(ptr, item, label, ts)`` of history rows (-1: none), base and overlay merged
        in the order a rebuild gives them."""
        base = np.where(rows < self.n_base_users, rows, -1)
        hp, hi, hl, ht, idx = _gather(self.ptr, base, self.hist_item, self.hist_label, self.hist_ts,
                                      with_index=True)
        extra = [n for n, r in enumerate(rows) if r in self.overlay] if self.overlay else []
        if not extra and (self.dead is None or not self.dead[idx].any()):
            return hp, hi, hl, ht
        user = np.repeat(np.arange(rows.size), np.diff(hp))
        if self.dead is not None:
            keep = ~self.dead[idx]
            user, hi, hl, ht = user[keep], hi[keep], hl[keep], ht[keep]
        parts = [(user, hi, hl, ht)]
        for n in extra:
            it, lab, ts, _ = self.overlay[int(rows[n])]
            parts.append((np.full(it.size, n, np.int64), it, lab, ts))
        user, hi, hl, ht = (np.concatenate(p) for p in zip(*parts))
        order = np.lexsort((hl, hi, ht, user))
        user, hi, hl, ht = user[order], hi[order], hl[order], ht[order]
        ptr = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=rows.size))])
        return ptr, hi, hl, ht

    def positives(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(ptr, item)`` of the rows' positives (items a list leaves out)."""
        base = np.where(rows < self.n_base_users, rows, -1)
        pptr, pitem = _gather(self.pos_ptr, base, self.pos_item)
        if not self.overlay or not any(int(r) in self.overlay for r in rows):
            return pptr, pitem
        hp, hi, hl, _ = self.histories(rows)  # merged in order: the positives as a rebuild lists them
        pos = hl == 1
        user = np.repeat(np.arange(rows.size), np.diff(hp))[pos]
        return np.concatenate([[0], np.cumsum(np.bincount(user, minlength=rows.size))]), hi[pos]

    # -- the segment term ---------------------------------------------------------------
    def segment_bias(self, user_ids: Sequence[Any]) -> np.ndarray | float:
        """``[len(user_ids), n_items]``: what the users' segments add (0.0 without)."""
        c = self.counts
        if c is None or c.seg_base is None:
            return 0.0
        _, attr = self.user_rows(user_ids)
        keys = np.where(attr[:, None] >= 0, self.UK[np.maximum(attr, 0)], -1)
        uniq = np.unique(keys[keys >= 0])
        table = self.segment_rows(uniq)
        local = np.where(keys >= 0, np.searchsorted(uniq, keys), -1)
        return self.model.segment_bias(table, local)

    def segment_rows(self, keys: np.ndarray) -> np.ndarray:
        """``float32 [len(keys), n_items]``: the segment term of each key as of now (the
        rows of ``model.segment_table``), computed on first use."""
        out = np.zeros((len(keys), len(self.ids)), np.float32)
        theta = self.model.params["theta_seg"][self.model.key_columns()]
        for n, k in enumerate(int(k) for k in keys):
            row = self._seg_rows.get(k)
            if row is None:
                F = np.log1p(np.maximum(self._seg_counts(k), 0.0)).astype(np.float32)
                row = self._seg_rows[k] = _segment_row(F, theta[k])
            out[n] = row
        return out

    def _seg_counts(self, k: int) -> np.ndarray:
        c = self.counts
        n = len(self.ids)
        hit = c.seg_cache.get(k)
        if hit is not None:
            then, start, counts = hit
            counts = counts * _decay(c.seg_spec, c.now - then)
        else:
            start = 0
            counts = c.seg_base.counts(k * n + np.arange(n), c.now)
        if c.delta:
            item, keys, ts, label, sign = c.delta
            sel = (keys[start:] == k).any(axis=1)
            if sel.any():
                contrib = _contributions(c.seg_spec, label[start:][sel], ts[start:][sel], c.now)
                np.add.at(counts, item[start:][sel], sign[start:][sel, None] * contrib)
        c.seg_cache[k] = (c.now, len(c.delta[0]) if c.delta else 0, counts)
        return counts

    def knn_pool(self) -> Pool:
        """The user-kNN term's neighbours: the base users' positives (rows of the histories),
        indexed once per base and shared by the states advanced from it."""
        if self._knn is None:
            self._knn = Pool.build(self.pos_ptr, self.pos_item, self.Wf.shape[0])
        return self._knn

    @property
    def hot(self) -> np.ndarray | None:
        """Rows with the highest dynamic lift, re-ranked beside the index's candidates (index only)."""
        if self.index is None:
            return None
        if self._hot is None:
            # the index ranks by the version's static bias: the items that behaviour
            # (or a segment) lifts most are always re-ranked exactly as well
            base = self.static_bias.copy()
            base[self.n_indexed:] = 0.0  # items added since: their whole bias is lift
            with np.errstate(invalid="ignore"):
                lift = self.bias - base
                if self.bias_new is not None:  # new users' bias: its lifted items too
                    lift = np.maximum(lift, self.bias_new - base)
            lift = np.where(np.isfinite(lift), lift, -np.inf)
            if self.counts is not None and self.counts.seg_base is not None:
                lift = lift + self.segment_rows(np.arange(self.counts.n_keys)).max(axis=0)
            k = min(HOT_ITEMS, lift.size)
            self._hot = np.argpartition(-lift, k - 1)[:k] if k else np.zeros(0, np.int64)
        return self._hot


def _segment_row(F: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """One key's row of ``FusionModel.segment_table``: its features ``[n, width]`` weighed
    by its column's ``theta_seg`` (the same einsum, for one key)."""
    return np.einsum("knf,kf->kn", F[None], theta[None]).astype(np.float32)[0]


def _gather(ptr: np.ndarray, rows: np.ndarray, *arrays: np.ndarray, with_index: bool = False):
    """CSR slices of ``rows`` (-1 = empty) concatenated: (new_ptr, *values[, positions])."""
    safe = np.clip(rows, 0, max(ptr.size - 2, 0))  # a store without interactions has ptr == [0]
    starts = np.where(rows >= 0, ptr[safe], 0)
    ends = np.where(rows >= 0, ptr[np.minimum(safe + 1, ptr.size - 1)], 0)
    lens = ends - starts
    new_ptr = np.concatenate([[0], np.cumsum(lens)])
    idx = np.repeat(starts - new_ptr[:-1], lens) + np.arange(new_ptr[-1])
    out = (new_ptr, *(a[idx] for a in arrays))
    return (*out, idx) if with_index else out


# ----------------------------------------------------------------------------- building


def _fragments(ds) -> dict:
    """Fragment id -> what identifies its content (files, rows, deletions)."""
    if ds is None:
        return {}
    out = {}
    for f in ds.get_fragments():
        m = f.metadata
        # (_path: the public property costs ~1 ms a file in this Lance version)
        out[f.fragment_id] = (tuple(getattr(d, "_path", None) or d.path for d in m.files), m.physical_rows,
                              _deletions(m.deletion_file))
    return out


def _deletions(d) -> str:
    """A fragment's deletion file, by its own id (its text names only the count deleted)."""
    if d is None:
        return "None"
    return f"{getattr(d, 'id', '')}@{getattr(d, 'read_version', '')}:{d}"


def _source(catalog: Catalog, version: int, items, users) -> tuple:
    """Everything but the interactions a state depends on: a change means a rebuild."""
    cache = cache_dataset(catalog)
    emb = catalog.dataset("embeddings")
    cfg = catalog.config
    return (version, emb.version if emb is not None else 0, items.version if items is not None else 0,
            users.version if users is not None else 0, cache.version if cache is not None else 0,
            encoder_info(catalog)[0], cfg.positive, cfg.negative)


def serving_state(catalog: Catalog, version: int | None = None) -> ServingState:
    """The serving state of ``version`` (default: current) as of the store's data.

    Cached per process: the same snapshot returns the same object; a snapshot
    that only appended interactions advances the last state (see the module
    docstring); anything else rebuilds. A state of a version whose rows the
    process has not loaded comes from the version's serving snapshot when that
    still fits (see :func:`keep_serving_snapshot`).
    """
    version = resolve_version(catalog, version)
    items = catalog.dataset("items")
    inter = catalog.dataset("interactions")
    users = catalog.dataset("users")
    src = _source(catalog, version, items, users)
    key = (src, inter.version if inter is not None else 0)
    states = catalog.memo.setdefault("serving_states", list)
    for k, st in states:
        if k == key:
            return st
    state = None
    prior = next((st for k, st in reversed(states) if k[0] == src), None)
    if prior is not None and inter is not None:
        state = _advance(catalog, prior, inter)
    if state is None and not version_loaded(catalog, version):  # (loaded: its rows are at hand)
        state = _from_snapshot(catalog, version, items, inter, users)
    if state is None:
        state = _build(catalog, load_version(catalog, version), items, inter, users)
    state.source.update(key=key, fragments=_fragments(inter))
    states.append((key, state))
    del states[:-3]  # the current state, a pinned older snapshot's, another version's
    return state


def _build(catalog: Catalog, lv, items, inter, users) -> ServingState:
    """A state from scratch: every labelled event of the snapshot."""
    ids, row, Wf, static = _item_rows(catalog, lv, items)
    h = _read_histories(catalog, inter, ids, row)
    pos = h.label == 1
    user_of = np.repeat(np.arange(h.ptr.size - 1), np.diff(h.ptr))
    pos_ptr = np.concatenate([[0], np.cumsum(np.bincount(user_of[pos], minlength=h.ptr.size - 1))])
    UA, UK, ua_row = _user_attributes(lv, users)
    counts, final, final_new = _behaviour(lv, h, UK, ua_row, static, len(ids))
    index, index_params = _vector_index(catalog, lv.version)
    return ServingState(lv.version, lv.model, ids, row, np.ascontiguousarray(Wf, np.float32), final,
                        _Rows(h.user_row), h.ptr, h.item, h.label, h.ts, UA, ua_row, UK, pos_ptr, h.item[pos],
                        index, len(lv.ids), index_params,
                        static_bias=static, counts=counts, hist_us=h.us, imp_pos=h.imp_pos, bias_new=final_new)


def _item_rows(catalog: Catalog, lv, items) -> tuple[list, dict, np.ndarray, np.ndarray]:
    """The version's items plus those encoded since (fused with its parameters), minus
    deleted ones: ``(ids, row of id, W, static bias)``."""
    ids, row, Wf, bias = list(lv.ids), dict(lv.row), lv.Wf, lv.bias
    if items is None:
        return ids, row, Wf, np.asarray(bias, np.float32)
    # the ids only: item texts (a description may be megabytes) are not read to serve
    all_ids = items.to_table(columns=["item_id"]).column("item_id").to_pylist()
    new_pos = [n for n, i in enumerate(all_ids) if i not in row]
    if new_pos:
        new_ids = [all_ids[n] for n in new_pos]
        # the vectors of the encoder the version was built with: after an encoder
        # change, items encoded only by the new one wait for a version of it
        V, ok = cached_vectors(catalog, new_ids, (lv.encoder, lv.model.d) if lv.encoder else None)
        # items not encoded yet wait for `encode` (they are in stale_items): a
        # reader never runs the encoder
        keep = np.flatnonzero(ok)
        if keep.size:
            new_pos = [new_pos[n] for n in keep]
            new_ids = [new_ids[n] for n in keep]
            A = lv.item_spec.transform(_feature_rows(items, lv.item_spec, new_pos))
            Wn, bn = lv.model.item_side(V[keep], A, None)
            Wf = np.vstack([Wf, Wn.astype(np.float32)])
            bias = np.concatenate([bias, bn.astype(np.float32)])
            for i in new_ids:
                row[i] = len(ids)
                ids.append(i)
    # Items deleted since the version was built are never served: unknown
    # by id, and a bias of -inf keeps them out of every top-k.
    present = set(all_ids)
    gone = [n for n, i in enumerate(ids) if i not in present]
    if gone:
        bias = np.array(bias, np.float32)
        bias[gone] = -np.inf
        for n in gone:
            row.pop(ids[n], None)
    return ids, row, Wf, np.asarray(bias, np.float32)


def _feature_rows(items, spec, positions: list[int]) -> Any:
    """The rows at ``positions`` of ``items``, with the columns ``spec`` reads only."""
    wanted = {rule["name"] for rule in spec.columns}
    columns = [c for c in items.schema.names if c in wanted] or ["item_id"]
    return items.take(positions, columns=columns)


@dataclass
class _Histories:
    """Every user's labelled events as CSR arrays (rows in :attr:`user_row` order)."""

    user_row: dict = field(default_factory=dict)
    ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    item: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    us: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    imp_pos: dict = field(default_factory=dict)  # (user, item) -> newest positive impression (us)


def _read_histories(catalog: Catalog, inter, ids: list, row: dict) -> _Histories:
    """The labelled events of the snapshot, in one order for every build and advance."""
    h = _Histories()
    if inter is None:
        return h
    con = views_connection(catalog)
    try:
        t = con.sql("SELECT user_id, item_id, epoch(ts)::BIGINT AS ts, epoch_us(ts) AS us, label "
                    "FROM labelled_events").to_arrow_table()
        # impressions the rules call positive: labelled_events drops them, but they
        # still supersede earlier impressions of the same item (see _advance)
        for u, i, us in con.sql("SELECT user_id, item_id, max(epoch_us(ts)) FROM interactions "
                                "WHERE label = 1 AND event = 'impression' GROUP BY ALL").fetchall():
            h.imp_pos[(u, i)] = us
    finally:
        con.close()
    item_idx, u_idx, uniq = _map_ids(t, ids, row)
    ts = t.column("ts").to_numpy(zero_copy_only=False).astype(np.int64)
    us = t.column("us").to_numpy(zero_copy_only=False).astype(np.int64)
    lab = t.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
    keep = item_idx >= 0
    u_idx, item_idx, ts, us, lab = u_idx[keep], item_idx[keep], ts[keep], us[keep], lab[keep]
    # ties in time by item row, then label
    order = np.lexsort((lab, item_idx, ts, u_idx))
    h.item, h.label, h.ts, h.us = item_idx[order], lab[order], ts[order], us[order]
    h.ptr = np.concatenate([[0], np.cumsum(np.bincount(u_idx[order], minlength=len(uniq)))])
    h.user_row = uniq
    return h


def _user_attributes(lv, users) -> tuple[np.ndarray, np.ndarray, dict]:
    """Users' attribute features, segment keys and row of each user id."""
    fu = lv.user_spec.width
    if users is None or not (fu or lv.model.segments):
        return np.zeros((0, fu), np.float32), np.zeros((0, len(lv.model.segments)), np.int64), {}
    ut = users.to_table()
    return (np.asarray(lv.user_spec.transform(ut), np.float32), lv.user_spec.segments(ut),
            {u: n for n, u in enumerate(ut.column("user_id").to_pylist())})


def _behaviour(lv, h: _Histories, UK: np.ndarray, ua_row: dict, static: np.ndarray,
               n_items: int) -> tuple[_Counts | None, np.ndarray, np.ndarray | None]:
    """The behaviour counts as of the newest event, and the bias they give each item (for
    every user, and for new users when the model has ``theta_new``)."""
    if not h.item.size or lv.model.dynamic is None:
        return None, static, None
    act = lv.model.activity(h.item, h.ts, h.label, n_items)
    now = act.now()
    C = act.items.counts(np.arange(n_items), now)
    counts = _Counts(lv.model.dynamic, now, C)
    _segment_counts(lv.model, counts, h, UK, ua_row, n_items)
    return counts, _with_dynamic(lv.model, static, C), _new_user_bias(lv.model, static, C)


def _segment_counts(model, counts: _Counts, h: _Histories, UK: np.ndarray, ua_row: dict, n_items: int) -> None:
    """Index the events per segment key of their user, into ``counts`` (models with a segment term)."""
    if model.segments and UK.shape[0] and "theta_seg" in model.params:
        keys = _event_keys(h.user_row, ua_row, UK, h.ptr)
        n_keys = int(sum(model.segments))
        r, c = np.nonzero(keys >= 0)
        # as SegmentActivity indexes them: each event counts in every segment of its user
        counts.seg_spec, counts.n_keys = SEGMENT_SPEC, n_keys
        counts.seg_base = ItemActivity(SEGMENT_SPEC, keys[r, c] * n_items + h.item[r], h.ts[r],
                                       h.label[r], max(n_keys, 1) * n_items)


def _vector_index(catalog: Catalog, version: int) -> tuple[Any, dict]:
    """The version's vector index and its search settings, when it has one."""
    uri = catalog.index_uri(version)
    index = catalog.open(uri)
    if index is None:
        return None, {}
    # search as recorded when the index was built (nprobes, candidates): not recomputed
    params = recorded_index_settings(index)
    params["width"] = index.schema.field("vector").type.list_size
    params["row_starts"] = row_starts(index)
    return index, params


def row_starts(index) -> np.ndarray:
    """First ``row`` of each fragment of an index dataset, by fragment id: a row id
    ``(fragment << 32) | offset`` is row ``starts[fragment] + offset`` (the dataset is
    written once, in row order, and never deleted from)."""
    frags = sorted(index.get_fragments(), key=lambda f: f.fragment_id)
    starts = np.zeros(max((f.fragment_id for f in frags), default=0) + 1, np.int64)
    n = 0
    for f in frags:
        starts[f.fragment_id] = n
        n += f.count_rows()
    return starts


def _map_ids(t, ids: list, row: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Item rows (-1: not served) and user rows (in order of first appearance) of the
    events in ``t``, and ``user_id -> row``: hashed by Arrow, not a Python loop per event."""
    import pyarrow as pa
    import pyarrow.compute as pc

    items = t.column("item_id")
    item_idx = pc.index_in(items, value_set=pa.array(ids, type=items.type)).to_numpy(zero_copy_only=False)
    item_idx = np.where(np.isnan(item_idx), -1, item_idx).astype(np.int64) if item_idx.dtype.kind == "f" \
        else item_idx.astype(np.int64)
    if len(row) != len(ids):  # items deleted since the version: not served
        served = np.zeros(len(ids) + 1, bool)
        served[np.fromiter(row.values(), np.int64, len(row))] = True
        item_idx = np.where(served[item_idx], item_idx, -1)
    if t.column("user_id").null_count:  # not from labelled_events: the plain way
        uniq: dict = {}
        u_ids = t.column("user_id").to_pylist()
        return item_idx, np.fromiter((uniq.setdefault(u, len(uniq)) for u in u_ids), np.int64, len(u_ids)), uniq
    users = t.column("user_id").combine_chunks().dictionary_encode()
    u_idx = users.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    uniq = {u: n for n, u in enumerate(users.dictionary.to_pylist())}
    return item_idx, u_idx, uniq


def _event_keys(user_row, ua_row, UK, ptr) -> np.ndarray:
    """Segment keys ``[n_events, columns]`` of each base event's user (-1: none)."""
    inv = [None] * len(user_row)
    for u, r in user_row.items():
        inv[r] = u
    krow = np.array([ua_row.get(u, -1) for u in inv], np.int64)
    ev_user = np.repeat(np.arange(len(inv)), np.diff(ptr))
    return np.where(krow[ev_user][:, None] >= 0, UK[np.maximum(krow[ev_user], 0)], -1)


def _new_user_bias(model, static: np.ndarray, C: np.ndarray | None) -> np.ndarray | None:
    """static + ``theta_new . log1p(counts)``: new users' bias (None without ``theta_new``)."""
    if C is None or getattr(model, "theta_new", None) is None:
        return None
    return _with_dynamic(model, static, C, new_users=True)


def _with_dynamic(model, static: np.ndarray, C: np.ndarray, new_users: bool = False) -> np.ndarray:
    """static + ``theta . log1p(counts)``, as ``ItemActivity.features`` feeds it
    (``theta_new`` for ``new_users``).

    Only the columns with a weight are computed: a zero column adds +0.0 either way,
    so the sum is the same to the bit.
    """
    theta = model.theta_new if new_users else model.params.get("theta")
    F = np.zeros(C.shape, np.float32)
    cols = np.flatnonzero(theta) if theta is not None else np.arange(C.shape[1])
    if model.prior_weight() and model.prior_column() is not None:  # the count that shrinks the prior
        cols = np.union1d(cols, [model.prior_column()])
    F[:, cols] = np.log1p(np.maximum(C[:, cols], 0.0))
    return static + model.dynamic_bias(F, new_users=new_users)


# ----------------------------------------------------------------------------- advancing


def _labeller(catalog: Catalog):
    """A small DuckDB connection that labels rows by the store's rules, as the
    ``interactions`` view of ``sql/views.sql`` does (its own statement, reused)."""
    import duckdb

    cfg = catalog.config
    ds = catalog.dataset("interactions")
    key = (cfg.positive, cfg.negative, tuple(ds.schema.names) if ds is not None else ())
    hit = catalog.memo.get("labeller")
    if hit is not None and hit[0] == key:
        return hit[1]
    stmt = next(s for s in statements(sql_text("views.sql")) if "VIEW interactions AS" in s)
    stmt = stmt.replace("{{label}}", label_sql(cfg))
    con = duckdb.connect(config={"threads": 1})
    con.execute("SET TimeZone = 'UTC'")
    con.register("_dynstore_interactions", _empty_interactions(catalog))
    con.execute(stmt)
    catalog.memo.put("labeller", (key, con))
    return con


def _empty_interactions(catalog: Catalog):
    import pyarrow as pa

    ds = catalog.dataset("interactions")
    return ds.schema.empty_table() if ds is not None else pa.table({"ts": pa.array([], pa.timestamp("us"))})


def _advance(catalog: Catalog, prior: ServingState, inter) -> ServingState | None:
    """``prior`` plus the interactions appended since, or None when a rebuild is needed."""
    old = prior.source.get("fragments", {})
    now_frags = _fragments(inter)
    if not old or any(now_frags.get(fid) != sig for fid, sig in old.items()):
        return None  # a delete, a compaction or a rewrite: not an append
    new = [fid for fid in now_frags if fid not in old]
    if not new:
        return replace(prior, source=dict(prior.source))
    if prior.counts is None and prior.model.dynamic is not None:
        return None  # no events before: a build is as cheap
    scanner = inter.scanner(fragments=[inter.get_fragment(f) for f in new])
    table = scanner.to_table()
    if sum(len(o[0]) for o in prior.overlay.values()) + table.num_rows > MAX_OVERLAY:
        return None
    con = _labeller(catalog)
    con.register("_dynstore_interactions", table)
    t = con.sql("SELECT user_id, item_id, epoch(ts)::BIGINT AS ts, epoch_us(ts) AS us, label, "
                "coalesce(event = 'impression', false) AS imp FROM interactions").to_arrow_table()
    return _fold(prior, t)


def _fold(prior: ServingState, t) -> ServingState:
    """Fold labelled new rows (``user_id, item_id, ts, us, label, imp``) into a copy of ``prior``,
    as ``labelled_events`` would see the old and new rows together."""
    fold = _Fold(prior, t)
    fold.supersede_impressions()
    fold.add_new_rows()
    fold.merge_overlay()
    return fold.state()


class _Fold:
    """The work of :func:`_fold`: what changes, collected as events that come and go.

    ``came`` and ``went`` hold ``(item row, user row, ts, us, label, user id)``;
    base histories are never changed in place: a row that goes is marked in a
    copy of ``dead``, rows that come live in the per-user ``overlay``.
    """

    def __init__(self, prior: ServingState, t):
        self.prior = prior
        self.users = t.column("user_id").to_pylist()
        self.items = t.column("item_id").to_pylist()
        self.ts = t.column("ts").to_numpy(zero_copy_only=False).astype(np.int64)
        self.us = t.column("us").to_numpy(zero_copy_only=False).astype(np.int64)
        self.label = t.column("label").to_numpy(zero_copy_only=False).astype(np.int8)
        self.imp = t.column("imp").to_numpy(zero_copy_only=False).astype(bool)
        self.imp_pos = dict(prior.imp_pos_new)  # small: the build's own stay shared
        self.newest_pos: dict = {}  # (user, item) -> newest positive among the new rows
        for n in np.flatnonzero(self.label == 1):
            pair, at = (self.users[n], self.items[n]), self.us[n]
            self.newest_pos[pair] = max(self.newest_pos.get(pair, at), at)
            if self.imp[n]:
                self.imp_pos[pair] = max(self.imp_pos.get(pair, prior.imp_pos.get(pair, at)), at)
        self.extra_rows = dict(prior.user_row.extra)
        self.overlay = dict(prior.overlay)
        self.dead = prior.dead
        self.came: list[tuple] = []
        self.went: list[tuple] = []

    def user_row(self, u) -> int:
        """The row of user ``u``, a new one past the base rows for a user never seen."""
        r = self.prior.user_row.base.get(u)
        if r is None:
            r = self.extra_rows.get(u)
            if r is None:
                r = self.extra_rows[u] = self.prior.n_base_users + len(self.extra_rows)
        return r

    def base_history(self, r: int) -> tuple:
        """(item, label, us, ts, positions in the base) of a user's live base events."""
        prior, dead = self.prior, self.dead
        if r >= prior.n_base_users:
            empty = np.zeros(0, np.int64)
            return empty, np.zeros(0, np.int8), empty, empty, empty
        a, b = prior.ptr[r], prior.ptr[r + 1]
        alive = ~dead[a:b] if dead is not None else np.ones(b - a, bool)
        return (prior.hist_item[a:b][alive], prior.hist_label[a:b][alive], prior.hist_us[a:b][alive],
                prior.hist_ts[a:b][alive], np.arange(a, b)[alive])

    def supersede_impressions(self) -> None:
        """An old impression goes when a new positive of the same user and item is as new or newer."""
        prior = self.prior
        for (u, i), p_us in self.newest_pos.items():
            r, ir = prior.user_row.get(u, -1), prior.row.get(i, -1)
            if r < 0 or ir < 0:
                continue
            it, lab, hus, hts, pos = self.base_history(r)
            gone = (it == ir) & (lab == 0) & (hus <= p_us)
            if gone.any():
                if self.dead is None or self.dead is prior.dead:
                    self.dead = np.zeros(prior.hist_item.size, bool) if self.dead is None else self.dead.copy()
                self.dead[pos[gone]] = True
                self.went += [(ir, r, int(hts[x]), int(hus[x]), 0, u) for x in np.flatnonzero(gone)]
            ov = self.overlay.get(r)
            if ov is not None:
                o_it, o_lab, o_ts, o_us = ov
                gone = (o_it == ir) & (o_lab == 0) & (o_us <= p_us)
                if gone.any():
                    self.went += [(ir, r, int(o_ts[x]), int(o_us[x]), 0, u) for x in np.flatnonzero(gone)]
                    self.overlay[r] = tuple(a[~gone] for a in ov)

    def add_new_rows(self) -> None:
        """The new rows, as labelled_events keeps them."""
        prior = self.prior
        for n, (u, i) in enumerate(zip(self.users, self.items)):
            ir = prior.row.get(i, -1)
            if ir < 0:
                continue  # unknown, deleted or not encoded: not served (as a rebuild drops it)
            if self.imp[n]:
                pair = (u, i)
                newest = max(self.newest_pos.get(pair, -2 ** 62),
                             self.imp_pos.get(pair, prior.imp_pos.get(pair, -2 ** 62)),
                             _newest_positive(prior, self.overlay, prior.user_row.get(u, -1), ir, self.dead))
                if newest >= self.us[n]:
                    continue  # a positive at or after it says it all
                lab = 0
            elif self.label[n] == 0:
                continue
            else:
                lab = int(self.label[n])
            self.came.append((ir, self.user_row(u), int(self.ts[n]), int(self.us[n]), lab, u))

    def merge_overlay(self) -> None:
        """Append what came to each user's overlay, kept in history order."""
        for ir, r, t_, u_, lab, _ in self.came:
            o = self.overlay.get(r)
            add = (np.array([ir], np.int64), np.array([lab], np.int8), np.array([t_], np.int64),
                   np.array([u_], np.int64))
            self.overlay[r] = add if o is None else tuple(np.concatenate([a, b]) for a, b in zip(o, add))
        for r in {c[1] for c in self.came}:
            it, lab, t_, u_ = self.overlay[r]
            order = np.lexsort((lab, it, t_))
            self.overlay[r] = (it[order], lab[order], t_[order], u_[order])

    def state(self) -> ServingState:
        prior = self.prior
        state = replace(prior, user_row=_Rows(prior.user_row.base, self.extra_rows), overlay=self.overlay,
                        dead=self.dead, imp_pos_new=self.imp_pos, source=dict(prior.source), _seg_rows={},
                        _hot=None)
        if prior.counts is not None and (self.came or self.went):
            state.counts, state.bias = _update_counts(prior, state, self.came, self.went)
            state.bias_new = _new_user_bias(prior.model, prior.static_bias, state.counts.items)
        return state


def _newest_positive(prior: ServingState, overlay: dict, r: int, ir: int, dead) -> int:
    """Newest positive (microseconds) of user row ``r`` on item row ``ir`` in the state."""
    best = -2 ** 62
    if r < 0:
        return best
    if r < prior.n_base_users:
        a, b = prior.ptr[r], prior.ptr[r + 1]
        hit = (prior.hist_item[a:b] == ir) & (prior.hist_label[a:b] == 1)
        if hit.any():
            best = int(prior.hist_us[a:b][hit].max())
    ov = overlay.get(r)
    if ov is not None:
        hit = (ov[0] == ir) & (ov[1] == 1)
        if hit.any():
            best = max(best, int(ov[3][hit].max()))
    return best


def _update_counts(prior: ServingState, state: ServingState, came: list, went: list):
    """Decay the counts to the new "now" and add what came, take away what went."""
    c = prior.counts
    ev = came + went
    item = np.array([e[0] for e in ev], np.int64)
    ts = np.array([e[2] for e in ev], np.int64)
    label = np.array([e[4] for e in ev], np.int8)
    sign = np.concatenate([np.ones(len(came)), -np.ones(len(went))])
    now = c.now
    if came:
        now = max(now, int(ts[: len(came)].max()) + 1)
    if went and int(ts[len(came):].max()) + 1 >= c.now:
        now = _newest(state) + 1  # the newest event went: "now" moves back to the one before
    C = c.items * _decay(c.spec, now - c.now)
    np.add.at(C, item, sign[:, None] * _contributions(c.spec, label, ts, now))
    counts = _Counts(c.spec, now, C, c.seg_spec, c.seg_base, c.n_keys, c.delta, dict(c.seg_cache))
    if c.seg_base is not None:
        keys = _user_keys(state, [e[5] for e in ev])
        if c.delta:
            d_item, d_keys, d_ts, d_label, d_sign = c.delta
            counts.delta = (np.concatenate([d_item, item]), np.vstack([d_keys, keys]), np.concatenate([d_ts, ts]),
                            np.concatenate([d_label, label]), np.concatenate([d_sign, sign]))
        else:
            counts.delta = (item, keys, ts, label, sign)
    bias = _with_dynamic(prior.model, prior.static_bias, C)
    return counts, bias


def _user_keys(state: ServingState, user_ids: list) -> np.ndarray:
    """Segment keys ``[len(user_ids), columns]`` of users (-1: none)."""
    out = np.full((len(user_ids), state.UK.shape[1]), -1, np.int64)
    for n, u in enumerate(user_ids):
        a = state.ua_row.get(u, -1)
        if a >= 0:
            out[n] = state.UK[a]
    return out


def _newest(state: ServingState) -> int:
    """The newest event time (seconds) of the state's histories."""
    best = -2 ** 62
    if state.hist_ts.size:
        alive = state.hist_ts if state.dead is None else state.hist_ts[~state.dead]
        if alive.size:
            best = int(alive.max())
    for ov in state.overlay.values():
        if ov[2].size:
            best = max(best, int(ov[2].max()))
    return best


# ----------------------------------------------------------------------------- snapshots


def _signature(ds) -> list:
    """What identifies a dataset's rows, JSON-able: its fragments' files, rows and deletions."""
    return [[fid, list(paths), rows, dele] for fid, (paths, rows, dele) in sorted(_fragments(ds).items())]


def _snapshot_key(catalog: Catalog, version: int, items, users) -> dict:
    """Everything but the interactions a snapshot of ``version`` was built from, JSON-able
    (:func:`_source`, with the datasets' contents for their version numbers: the version's
    rows too, so a damaged or removed ``embeddings.lance`` is found as a build finds it)."""
    cfg = catalog.config
    return {"version": version, "encoder": encoder_info(catalog)[0], "positive": cfg.positive,
            "negative": cfg.negative, "items": _signature(items), "users": _signature(users),
            "cache": _signature(cache_dataset(catalog)), "embeddings": _signature(catalog.dataset("embeddings"))}


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def keep_serving_snapshot(catalog: Catalog) -> bool:
    """Write the current version's serving snapshot (``models/v<N>.serving.arrow``, see
    :mod:`dynstore.serving.snapshot`) as of the latest commits, unless the one there
    still fits them. Writers call it after they commit (refresh, encode, rollback);
    False when nothing was written (no version, a read-only or remote store, up to date).

    The state is built as a reader builds it; a reader uses the file only while the
    version, items, users, semantic cache, encoder and rules are those it was built
    from, and folds in interactions appended since (anything else: it builds).
    """
    if catalog.read_only or catalog.storage.local_dir("models") is None:
        return False
    view = catalog.latest.pinned()
    version = current_version(view)
    if version is None:
        return False
    items, inter, users = view.dataset("items"), view.dataset("interactions"), view.dataset("users")
    key, frags = _snapshot_key(view, version, items, users), _signature(inter)
    meta = snapshot_meta(view, version)
    if meta is not None and _same(meta.get("key"), key) and _same(meta.get("interactions"), frags):
        return False
    state = _build(view, load_version(view, version), items, inter, users)
    return write_snapshot(view, version, {"key": key, "interactions": frags, **_scalars(state)}, _arrays(state))


def _scalars(state: ServingState) -> dict:
    c = state.counts
    return {"n_indexed": state.n_indexed, "now": None if c is None else int(c.now)}


def _arrays(state: ServingState) -> dict[str, Any]:
    """A built (never advanced) state's arrays, by name."""
    served = np.zeros(len(state.ids), bool)
    served[np.fromiter(state.row.values(), np.int64, len(state.row))] = True
    pairs = list(state.imp_pos.items())
    out = {"ids": state.ids, "served": served, "Wf": state.Wf, "bias": state.bias, "static_bias": state.static_bias,
           "users": [u for u, _ in sorted(state.user_row.base.items(), key=lambda kv: kv[1])],
           "ptr": state.ptr, "hist_item": state.hist_item, "hist_label": state.hist_label, "hist_ts": state.hist_ts,
           "hist_us": state.hist_us, "UA": state.UA, "UK": state.UK,
           "ua_users": [u for u, _ in sorted(state.ua_row.items(), key=lambda kv: kv[1])],
           "pos_ptr": state.pos_ptr, "pos_item": state.pos_item,
           "imp_users": [p[0][0] for p in pairs], "imp_items": [p[0][1] for p in pairs],
           "imp_us": np.array([p[1] for p in pairs], np.int64)}
    if state.counts is not None:
        out["counts"] = state.counts.items
    if state.bias_new is not None:
        out["bias_new"] = state.bias_new
    return out


def _from_snapshot(catalog: Catalog, version: int, items, inter, users) -> ServingState | None:
    """The state of ``version`` from its snapshot, when it fits this view (interactions
    appended since folded in); None: no snapshot, or one that does not fit."""
    got = read_snapshot(catalog, version)
    if got is None:
        return None
    meta, arrays = got
    if not _same(meta.get("key"), _snapshot_key(catalog, version, items, users)):
        return None
    try:
        state = _state_of(catalog, version, meta, arrays)
    except (DynstoreError, ValueError, KeyError, IndexError, TypeError):
        return None  # parameters that do not fit: the build says why
    if _same(meta.get("interactions"), _signature(inter)):
        return state
    if inter is None:
        return None
    state.source["fragments"] = {fid: (tuple(paths), rows, dele) for fid, paths, rows, dele in meta["interactions"]}
    return _advance(catalog, state, inter)


def _state_of(catalog: Catalog, version: int, meta: dict, a: dict) -> ServingState:
    """A :class:`ServingState` of a snapshot's arrays (what :func:`_build` gave the writer)."""
    model = load_parameters(catalog, version).model
    ids, served = a["ids"], a["served"]
    if len(ids) != served.size or a["Wf"].shape != (len(ids), model.d):
        raise ValueError("the snapshot does not fit the version's parameters")
    row = dict(zip(ids, range(len(ids)))) if served.all() else {ids[n]: n for n in np.flatnonzero(served).tolist()}
    ua_row = {u: n for n, u in enumerate(a["ua_users"])}
    index, index_params = _vector_index(catalog, version)
    counts = None
    if "counts" in a:
        counts = _Counts(model.dynamic, int(meta["now"]), a["counts"])
        h = _Histories({u: n for n, u in enumerate(a["users"])}, a["ptr"], a["hist_item"], a["hist_label"],
                       a["hist_ts"], a["hist_us"])
        _segment_counts(model, counts, h, a["UK"], ua_row, len(ids))
    imp_pos = dict(zip(zip(a["imp_users"], a["imp_items"]), a["imp_us"].tolist()))
    bias_new = None
    if counts is not None and model.theta_new is not None:  # a snapshot written before the term: computed
        bias_new = a["bias_new"].copy() if "bias_new" in a else _new_user_bias(model, a["static_bias"], counts.items)
    # the biases are small: copies, writable as a build's are (torch warns on a read-only array)
    return ServingState(version, model, ids, row, a["Wf"], a["bias"].copy(),
                        _Rows({u: n for n, u in enumerate(a["users"])}), a["ptr"], a["hist_item"], a["hist_label"],
                        a["hist_ts"], a["UA"], ua_row, a["UK"], a["pos_ptr"], a["pos_item"], index,
                        int(meta["n_indexed"]), index_params, static_bias=a["static_bias"].copy(), counts=counts,
                        hist_us=a["hist_us"], imp_pos=imp_pos, bias_new=bias_new)
