"""Dynamic item features, the popularity rule inside the model, the item-item term,
and the one event labelling shared by training and serving."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynstore.model.dynamics import DynamicSpec, ItemActivity, SegmentActivity, rule_half_life
from dynstore.model.itemitem import ItemItem
from dynstore.model.fusion import FusionModel, ModelConfig, TrainingData

DAY = 86400


def brute_counts(spec, item, ts, label, q_item, q_t):
    out = np.zeros((len(q_item), spec.width))
    for n, (i, t) in enumerate(zip(q_item, q_t)):
        for kind, lab in (("pos", 1), ("neg", -1), ("imp", 0)):
            if kind not in spec.kinds:
                continue
            m = (item == i) & (ts < t) & (label == lab)
            for h in spec.half_lives:
                ref = m.sum() if h is None else (0.5 ** ((t - ts[m]) / (h * DAY))).sum()
                out[n, spec.index(kind, h)] = ref
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3000 * DAY), st.sampled_from([1, -1, 0])),
                min_size=0, max_size=60),
       st.lists(st.tuples(st.integers(0, 4), st.integers(-DAY, 3100 * DAY)), min_size=1, max_size=20))
def test_decayed_counts_equal_brute_force(events, queries):
    """Point-in-time counts, strictly before the query time, over any span (no overflow)."""
    spec = DynamicSpec()
    item = np.array([e[0] for e in events], np.int64)
    ts = np.array([e[1] for e in events], np.int64) + 1_500_000_000
    label = np.array([e[2] for e in events], np.int8)
    qi = np.array([q[0] for q in queries], np.int64)
    qt = np.array([q[1] for q in queries], np.int64) + 1_500_000_000
    got = ItemActivity(spec, item, ts, label, 5).counts(qi, qt)
    np.testing.assert_allclose(got, brute_counts(spec, item, ts, label, qi, qt), rtol=1e-6, atol=1e-9)


def test_many_queries_equal_brute_force():
    """Thousands of queries, one item with a long block: the search inside items'
    blocks takes many halvings, with one time per query and one time for all."""
    rng = np.random.default_rng(3)
    spec = DynamicSpec()
    n = 4000
    item = rng.choice(12, n, p=np.r_[0.5, np.full(11, 0.5 / 11)])  # one item with a long block
    ts = rng.integers(0, 200 * DAY, n) + 1_500_000_000
    label = rng.choice(np.array([1, -1, 0], np.int8), n)
    qi = rng.integers(0, 12, 3000)
    qt = rng.integers(-DAY, 201 * DAY, 3000) + 1_500_000_000
    got = ItemActivity(spec, item, ts, label, 12).counts(qi, qt)
    np.testing.assert_allclose(got, brute_counts(spec, item, ts, label, qi, qt), rtol=1e-6, atol=1e-9)
    one_time = ItemActivity(spec, item, ts, label, 12).counts(qi, qt[0])
    np.testing.assert_allclose(one_time, brute_counts(spec, item, ts, label, qi, np.full(qi.size, qt[0])),
                               rtol=1e-6, atol=1e-9)


def _bits(a):
    """A float32 array's bits: equal bits, the same number (the sign of zero included)."""
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


_events = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 400 * DAY), st.sampled_from([1, -1, 0])),
                   min_size=0, max_size=80)


def _log(events):
    item = np.array([e[0] for e in events], np.int64)
    ts = np.array([e[1] for e in events], np.int64) + 1_500_000_000
    label = np.array([e[2] for e in events], np.int8)
    return item, ts, label


@settings(max_examples=60, deadline=None)
@given(_events, st.lists(st.integers(0, 5), min_size=0, max_size=30), st.integers(-DAY, 401 * DAY))
def test_features_at_one_time_equal_the_counts_bit_for_bit(events, q_items, q_t):
    """One time for all items (training's batches): the fast path gives the bits of
    ``log1p(counts)`` cast to float32, zeros for items with no earlier event."""
    item, ts, label = _log(events)
    act = ItemActivity(DynamicSpec(), item, ts, label, 6)
    qi, t = np.array(q_items, np.int64), q_t + 1_500_000_000
    fast = act.features(qi, t)
    ref = np.log1p(act.counts(qi, np.full(qi.size, t))).astype(np.float32)
    assert fast.shape == ref.shape and fast.dtype == np.float32 and fast.flags.c_contiguous
    np.testing.assert_array_equal(_bits(fast), _bits(ref))


@settings(max_examples=60, deadline=None)
@given(_events, st.integers(0, 40), st.lists(st.tuples(st.integers(0, 5), st.integers(-DAY, 401 * DAY)),
                                             min_size=1, max_size=30))
def test_checkpoints_keep_the_positions_of_a_plain_search(events, n_marks, queries):
    """Whatever the checkpoints, each query's last earlier event is ``searchsorted``'s."""
    item, ts, label = _log(events)
    act = ItemActivity(DynamicSpec(half_lives=(None,)), item, ts, label, 6)
    qi = np.array([q[0] for q in queries], np.int64)
    where = np.clip(np.array([q[1] for q in queries], np.int64) + 1_500_000_000 - act.t0, 0, act.span - 1)
    for idx in act._kinds.values():
        idx.mark(idx.key // act.span, idx.key % act.span, n_marks)
        assert idx.marks.size <= n_marks and np.all(np.diff(idx.marks) > 0)
        want = np.searchsorted(idx.key, qi * act.span + where) - 1
        for w, k_want in ((where, want), (where[0], np.searchsorted(idx.key, qi * act.span + where[0]) - 1)):
            k, n_before = idx.before(qi, w, act.span)
            np.testing.assert_array_equal(k, k_want)
            np.testing.assert_array_equal(n_before, k_want + 1 - idx.start[qi])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 100 * DAY), st.sampled_from([1, 0]),
                          st.integers(-1, 2), st.integers(-1, 2)), min_size=1, max_size=60),
       st.lists(st.integers(0, 3), min_size=1, max_size=12), st.lists(st.integers(-1, 2), min_size=1, max_size=5),
       st.integers(0, 101 * DAY))
def test_segment_features_equal_one_pair_at_a_time(events, q_items, q_keys, q_t):
    """The pool's items (in any order, repeated) in each of the batch's keys (-1: none),
    and (key, item) pairs, give the bits of one query per pair."""
    item = np.array([e[0] for e in events], np.int64)
    ts = np.array([e[1] for e in events], np.int64)
    label = np.array([e[2] for e in events], np.int8)
    keys = np.array([e[3:] for e in events], np.int64).reshape(-1, 2)
    act = SegmentActivity(DynamicSpec(half_lives=(7.0, None), kinds=("pos", "imp")), item, ts, label, keys,
                          n_items=4, n_keys=3)
    qi, qk = np.array(q_items, np.int64), np.array(q_keys, np.int64)

    def one(k, i):
        if k < 0:
            return np.zeros(act.spec.width, np.float32)
        return np.log1p(act._inner.counts([k * 4 + i], [q_t])).astype(np.float32)[0]

    ref = np.array([[one(k, i) for i in qi] for k in qk], np.float32).reshape(qk.size, qi.size, -1)
    np.testing.assert_array_equal(_bits(act.key_features(qi, q_t, qk)), _bits(ref))
    pk, pi = np.repeat(qk, qi.size), np.tile(qi, qk.size)
    np.testing.assert_array_equal(_bits(act.pair_features(pk, pi, q_t)), _bits(ref.reshape(-1, act.spec.width)))


def test_an_event_counts_only_after_it_happened():
    act = ItemActivity(DynamicSpec(half_lives=(None,), kinds=("pos",)), [0], [100], [1], 1)
    assert act.counts([0], 100)[0, 0] == 0 and act.counts([0], 101)[0, 0] == 1


def test_segment_counts_per_user_segment():
    spec = DynamicSpec(half_lives=(None,), kinds=("pos", "imp"))
    # users: 0 in segments (0, 2), 1 in (1, 2); keys of each event's user
    keys = np.array([[0, 2], [1, 2], [1, 2], [0, -1]])
    act = SegmentActivity(spec, item=[0, 0, 1, 1], ts=[1, 2, 3, 4], label=[1, 1, 0, 1], keys=keys,
                          n_items=2, n_keys=3)
    F = np.expm1(act.key_features(np.array([0, 1]), 10))  # [key, item, (pos, imp)]
    assert F[0, 0, 0] == 1 and F[1, 0, 0] == 1 and F[2, 0, 0] == 2   # item 0 positives
    assert F[1, 1, 1] == 1 and F[0, 1, 0] == 1 and F[2, 1, 0] == 0   # item 1: key -1 counts nowhere
    np.testing.assert_allclose(act.pair_features([2, -1], [0, 0], 10)[:, 0], np.log1p([2, 0]), rtol=1e-6)


def test_rule_half_life_follows_the_span():
    spec = DynamicSpec()
    assert rule_half_life(spec, 120) == 30.0
    assert rule_half_life(spec, 20 * 365) == 365.0


def synthetic_events(seed=0, n_items=30, n_users=40, n=600):
    rng = np.random.default_rng(seed)
    V = rng.normal(size=(n_items, 8)).astype(np.float32)
    pop = rng.zipf(1.6, n_items).astype(float)
    item = rng.choice(n_items, n, p=pop / pop.sum())
    ts = np.sort(rng.integers(0, 90 * DAY, n)) + 1_700_000_000
    label = rng.choice(np.array([1, 1, 0, -1], np.int8), n)
    return TrainingData(V, np.zeros((n_items, 0)), np.zeros((n_users, 0)), rng.integers(0, n_users, n),
                        item, ts, label)


def test_trained_version_equals_the_rule_when_only_the_popularity_weight_is_left():
    """A trained model with every learned weight zero but the popularity feature's
    ranks new users exactly by decayed recent positives: the rule is inside the model."""
    data = synthetic_events()
    m = FusionModel.untrained(data.V, data.A, 0, config=ModelConfig(epochs=2, batch_size=128,
                                                                     sample_pool=64, item_item=False),
                              rule=30.0)
    m.fit(data, init_residuals=m.residuals)
    rule = m.dynamic.index("pos", 30.0)
    assert np.abs(np.delete(m.params["theta"], rule)).sum() > 0  # training moved the other weights
    for k, v in m.params.items():
        if k not in ("theta", "alpha"):
            m.params[k] = np.zeros_like(v)
    m.params["theta"] = np.zeros_like(m.params["theta"])
    m.params["theta"][rule] = 0.7
    m.residuals = (np.zeros_like(m.residuals[0]), np.zeros_like(m.residuals[1]))
    scores = m.score(data, np.array([0]))[0]
    now = data.ts.max() + 1
    pos = data.label == 1
    decayed = np.bincount(data.item[pos], weights=0.5 ** ((now - data.ts[pos]) / (30 * DAY)),
                          minlength=data.V.shape[0])
    np.testing.assert_allclose(scores, 0.7 * np.log1p(decayed), rtol=1e-5, atol=1e-6)


def test_item_item_finds_co_liked_items_and_round_trips():
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(200):  # two tastes: items 0-9 liked together, 10-19 together
        base = 0 if u % 2 else 10
        for i in rng.choice(10, 4, replace=False):
            users.append(u)
            items.append(base + i)
    ii = ItemItem.fit(np.array(users), np.array(items), 25, lam=10.0, min_positives=1)
    s = ii.scores(np.array([0, 2]), np.array([3, 4]), 25)[0]
    assert set(np.argsort(-s)[:6]) <= set(range(10))
    assert s[20:].max() == 0  # never liked: no weight
    again = ItemItem.from_tensors(ii.tensors())
    np.testing.assert_array_equal(again.scores(np.array([0, 1]), np.array([12]), 25),
                                  ii.scores(np.array([0, 1]), np.array([12]), 25))


# ------------------------------------------------------------------ the store
def _ingest_likes(store, user, items, when):
    store.ingest("interactions", pa.table({"user_id": [user] * len(items), "item_id": items,
                                           "ts": pa.array([when] * len(items), pa.timestamp("us")),
                                           "event": ["click"] * len(items)}))


def test_a_new_positive_moves_the_dynamic_feature_without_retraining(encoded):
    from dynstore.serving.recommend import serving_state

    state = serving_state(encoded.catalog)
    item = state.ids[int(np.argmin(state.bias))]  # the least popular item right now
    before = float(state.bias[state.row[item]])
    newest = encoded.sql("SELECT max(ts) FROM interactions").fetchall()[0][0]
    _ingest_likes(encoded, 99_999, [item], newest + dt.timedelta(minutes=1))
    after = serving_state(encoded.catalog)
    assert float(after.bias[after.row[item]]) > before
    assert len(encoded.versions()) == 1  # no refresh happened


def test_training_and_serving_read_the_same_labelled_events(loaded):
    """One rule decides what counts: the labelled_events view, used by refresh and by
    serving (an impression followed by a click is not a negative; neutral events drop)."""
    from dynstore.serving.recommend import serving_state
    from dynstore.versions.window import labelled_events

    loaded.encode()
    con = loaded.connection()
    try:
        train = labelled_events(con, None).to_pylist()
        view = con.execute("SELECT count(*), sum(CASE WHEN label = 0 THEN 1 ELSE 0 END) FROM labelled_events"
                           ).fetchall()[0]
    finally:
        con.close()
    state = serving_state(loaded.catalog)
    assert len(train) == view[0] == state.hist_item.size
    assert sum(r["label"] == 0 for r in train) == view[1] == int((state.hist_label == 0).sum())


def test_segment_term_is_served(tmp_path):
    """Users of a segment that likes an item lately get it higher than other users."""
    import dynstore

    s = dynstore.init(tmp_path / "s", model="fake")
    s.ingest("items", pa.table({"item_id": list(range(12)), "title": [f"thing {i}" for i in range(12)]}))
    s.ingest("users", pa.table({"user_id": list(range(60)), "region": ["north", "south"] * 30}))
    rows = [(u, 3 if u % 2 == 0 else 7) for u in range(60)] + [(u, u % 12) for u in range(60)]
    t0 = dt.datetime(2025, 1, 1)
    s.ingest("interactions", pa.table({
        "user_id": [u for u, _ in rows], "item_id": [i for _, i in rows],
        "ts": pa.array([t0 + dt.timedelta(hours=n) for n in range(len(rows))], pa.timestamp("us")),
        "value": [1.0] * len(rows)}))
    s.encode()
    from dynstore.serving.recommend import serving_state
    from dynstore.versions.embeddings import load_version

    lv = load_version(s.catalog)
    assert lv.model.segments == (2,)
    lv.model.params["theta_seg"][0, :] = 1.0  # what a refresh would learn here
    state = serving_state(s.catalog)
    seg = state.segment_bias([100, 101])  # unknown users: no segment
    assert np.all(seg == 0)
    north, south = state.segment_bias([0, 1])
    assert north[state.row[3]] > north[state.row[7]] and south[state.row[7]] > south[state.row[3]]
