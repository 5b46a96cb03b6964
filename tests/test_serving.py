"""The serving state follows appended interactions incrementally, and scores exactly as a rebuild."""
from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

import dynstore
from dynstore.serving import state as serving
from dynstore.serving.recommend import recommend_many, user_logits
from dynstore.serving.state import serving_state
from dynstore.versions.embeddings import load_version


def _perturb(store, seed=0):
    """Give the served model non-zero weights on every term (dynamic, segment, item-item),
    so a mismatch in any of them shows."""
    from dynstore.model.itemitem import ItemItem

    lv = load_version(store.catalog)
    m = lv.model
    rng = np.random.default_rng(seed)
    m.params["theta"] = rng.normal(size=m.params["theta"].shape).astype(np.float32)
    if "theta_seg" in m.params:
        m.params["theta_seg"] = rng.normal(size=m.params["theta_seg"].shape).astype(np.float32)
    n = len(lv.ids)
    m.item_item = ItemItem.fit(rng.integers(0, 30, 400), rng.integers(0, n, 400), n, lam=5.0, min_positives=1)
    m.params["gamma"] = np.ones(1, np.float32)
    m.params["g_imp"] = np.array([-0.3], np.float32)
    return m


def _rebuilt(store):
    store.catalog.memo.invalidate("serving_states")
    return serving_state(store.catalog)


def labelled_events(rows):
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Datetime("us"),
                                      "event": pl.Utf8, "value": pl.Float64}, orient="row")


def _assert_same(a, b, users):
    rows_a, _ = a.user_rows(users)
    rows_b, _ = b.user_rows(users)
    ha, hb = a.histories(rows_a), b.histories(rows_b)
    for x, y in zip(ha, hb):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.positives(rows_a), b.positives(rows_b)):
        np.testing.assert_array_equal(x, y)
    assert a.counts.now == b.counts.now
    np.testing.assert_allclose(a.counts.items, b.counts.items, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.bias, b.bias, rtol=1e-6, atol=1e-6)
    if b.counts.seg_base is not None:
        keys = np.arange(b.counts.n_keys)
        np.testing.assert_allclose(a.segment_rows(keys), b.segment_rows(keys), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(user_logits(a, users), user_logits(b, users), rtol=1e-5, atol=1e-5)


def test_advanced_state_equals_rebuilt_state_after_several_commits(encoded, monkeypatch):
    store = encoded
    _perturb(store)
    first = serving_state(store.catalog)
    assert first.counts is not None and first.counts.seg_base is not None  # the shop has user segments
    builds = []
    monkeypatch.setattr(serving, "_build", lambda *a, _f=serving._build: builds.append(1) or _f(*a))
    t = dt.datetime(2025, 6, 1)
    s = dt.timedelta(seconds=1)
    # an impression of the base that a new click supersedes
    at = int(np.flatnonzero(first.hist_label == 0)[0])
    base_user = next(u for u, r in first.user_row.items() if first.ptr[r] <= at < first.ptr[r + 1])
    base_item = first.ids[first.hist_item[at]]
    # user 3 was shown items 5 and 6, then clicks 5 (its impression goes); a late click of
    # user 4 lands before the newest event; a new user 999 (no attributes) and a new user
    # with the same timestamp for two items (ties ordered as a rebuild orders them)
    commits = [
        [(3, 5, t, "impression", 0.0), (3, 6, t, "impression", 0.0), (999, 7, t + s, "click", 1.0)],
        [(3, 5, t + 2 * s, "click", 1.0), (4, 9, dt.datetime(2025, 1, 3), "purchase", 1.0)],
        [(1000, 11, t + 3 * s, "click", 1.0), (1000, 10, t + 3 * s, "click", 1.0),
         (1000, 12, t + 3 * s, "impression", 0.0), (3, 6, t + 3 * s, "skip", 0.0)],
        [(5, 77777, t + 4 * s, "click", 1.0), (3, 6, t + 5 * s, "impression", 0.0),  # unknown item
         (base_user, base_item, t + 4 * s, "purchase", 1.0)],
        [(3, 6, t + 5 * s, "purchase", 1.0)],  # as new as the impression: supersedes it
    ]
    for rows in commits:
        store.ingest("interactions", labelled_events(rows))
        state = serving_state(store.catalog)
    assert not builds, "an append must advance the state, not rebuild it"
    assert state.overlay and state.dead is not None and state.dead.any()
    users = sorted({u for u, _ in state.user_row.items()} | {424242})
    full = _rebuilt(store)
    assert builds
    _assert_same(state, full, users)
    ranked = [[r["item_id"] for r in lst] for lst in recommend_many(store.catalog, users, 10)]
    store.catalog.memo.invalidate("serving_states")
    _rebuilt(store)
    assert ranked == [[r["item_id"] for r in lst] for lst in recommend_many(store.catalog, users, 10)]


def test_segment_rows_are_the_models_segment_table(encoded):
    """The lazily computed segment rows equal FusionModel.segment_table on a full activity."""
    store = encoded
    _perturb(store, seed=1)
    state = _rebuilt(store)
    m = state.model
    ev_user = np.repeat(np.arange(state.n_base_users), np.diff(state.ptr))
    keys = serving._event_keys(dict(state.user_row.items()), state.ua_row, state.UK, state.ptr)
    assert ev_user.size == keys.shape[0]
    act = m.activity(state.hist_item, state.hist_ts, state.hist_label, len(state.ids), keys)
    table = m.segment_table(act, np.arange(len(state.ids)), act.now())
    np.testing.assert_allclose(state.segment_rows(np.arange(table.shape[0])), table, rtol=1e-5, atol=1e-6)
    features = act.items.features(np.arange(len(state.ids)), act.now())
    np.testing.assert_allclose(state.bias, state.static_bias + m.dynamic_bias(features), rtol=1e-6)


def test_impressions_the_rules_call_positive(tmp_path):
    """With rules that make an impression positive, labelled_events drops it and it
    supersedes earlier impressions: the advanced state agrees."""
    s = dynstore.init(tmp_path / "s", model="fake")  # default rules: value > 0 positive
    s.ingest("items", pl.DataFrame({"item_id": list(range(1, 9)), "title": [f"thing {i}" for i in range(1, 9)]}))
    t = dt.datetime(2025, 3, 1)
    h = dt.timedelta(hours=1)
    s.ingest("interactions", labelled_events([(1, i, t + i * h, "click", 1.0) for i in range(1, 6)]
                                     + [(2, 3, t, "impression", 0.0), (2, 4, t, "impression", 0.0)]))
    s.encode()
    _perturb(s)
    serving_state(s.catalog)
    s.ingest("interactions", labelled_events([(2, 3, t + h, "impression", 1.0), (2, 5, t + 9 * h, "impression", 0.0)]))
    state = serving_state(s.catalog)
    assert state.overlay
    _assert_same(state, _rebuilt(s), [1, 2, 3])
    s.close()


def test_rebuild_after_delete_and_items(encoded, monkeypatch):
    """A delete or new items rebuild the state (and still agree with a fresh build)."""
    store = encoded
    serving_state(store.catalog)
    builds = []
    monkeypatch.setattr(serving, "_build", lambda *a, _f=serving._build: builds.append(1) or _f(*a))
    store.delete("interactions", "user_id = 3")
    serving_state(store.catalog)
    assert len(builds) == 1
    store.ingest("items", pl.DataFrame({"item_id": [501], "title": ["brand new item"]}))
    state = serving_state(store.catalog)
    assert len(builds) == 2 and 501 not in state.row  # not encoded yet: left out, costs the reader nothing
    store.encode()
    assert 501 in serving_state(store.catalog).row


@pytest.mark.parametrize("k", [1, 5])
def test_recommend_among_nothing_known(encoded, k):
    assert encoded.recommend(1, k, candidates=[]) == []
    assert encoded.recommend(1, k, candidates=[123456]) == []
    assert encoded.sql(f"SELECT recommend_among(1, {k}, []::BIGINT[])").fetchall()[0][0] == []
    assert encoded.sql(f"SELECT recommend_among(1, {k}, [123456])").fetchall()[0][0] == []
