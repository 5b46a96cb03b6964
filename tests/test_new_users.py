"""New users' own popularity column (``theta_new``), chosen by refresh on the pooled cuts.

A store where recent popularity misleads new users: regulars click a few *trending* items
that change every month, while one-time visitors pick from a few *staple* items all year.
The rule (positives decayed over 30 days) shows new users the trend; a long memory shows
them the staples. Refresh must choose the long column for new users only, serving must
follow it for an unknown user, and a user with a positive must score bit for bit as without it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest

import dynstore
from dynstore.model.fusion import FusionModel
from dynstore.model.score import new_users, score_terms as model_terms
from dynstore.model.selection import KEEP
from dynstore.serving.recommend import user_logits
from dynstore.serving.state import serving_state
from dynstore.storage.registry import choices
from dynstore.versions.embeddings import load_version

DAY = 86400
MONTHS, STAPLES, TRENDING = 8, [0, 1, 2, 3, 4], 8  # trending items per month: 100 + 10 * month + j


def _frames(seed: int = 0):
    rng = np.random.default_rng(seed)
    items = pl.DataFrame({"item_id": list(range(5)) + [100 + 10 * m + j for m in range(MONTHS) for j in range(TRENDING)],
                          "title": [f"staple {i}" for i in range(5)] + [f"trend {m}-{j}" for m in range(MONTHS)
                                                                       for j in range(TRENDING)]})
    rows, visitor = [], 10_000
    t0 = 1_700_000_000
    for m in range(MONTHS):
        for _ in range(240):  # regulars 0..39 on this month's trend
            rows.append((int(rng.integers(40)), 100 + 10 * m + int(rng.integers(TRENDING)),
                         t0 + m * 30 * DAY + int(rng.integers(30 * DAY))))
        for _ in range(90):  # one-time visitors on the staples
            rows.append((visitor, int(rng.choice(STAPLES, p=[0.3, 0.25, 0.2, 0.15, 0.1])),
                         t0 + m * 30 * DAY + int(rng.integers(30 * DAY))))
            visitor += 1
    u, i, t = zip(*rows)
    inter = pl.DataFrame({"user_id": u, "item_id": i, "ts": [x * 1_000_000 for x in t], "event": ["click"] * len(u)})
    return items, inter.with_columns(pl.from_epoch("ts", time_unit="us"))


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    """``(store, refresh result)``: the store above after one refresh."""
    items, inter = _frames()
    store = dynstore.init(tmp_path_factory.mktemp("nu") / "s", model="fake",
                          positive="event = 'click'", negative="event = 'skip'")
    store.ingest("items", items)
    store.ingest("interactions", inter)
    store.encode()
    out = store.refresh(since="all", epochs=1)
    yield store, out
    store.close()


def test_new_users_rule():
    # positives decide; impressions (0) and dislikes (-1) alone leave a user new
    assert new_users(np.array([0, 0, 1, 3, 5]), np.array([1, 0, -1, 0, 1])).tolist() == [True, False, True, False]


def test_refresh_chooses_a_long_column_for_new_users(chosen):
    store, out = chosen
    sel = out.training["selection"]["new_users"]
    assert sel["chosen"] in ("pos@90d", "pos@365d", "pos@all"), sel
    assert sel["gain"] > sel["z"] * sel["se"] and sel["users"] > 50 and sel["cuts"] >= 2
    assert set(sel["grid"]) == {"pos@90d", "pos@365d", "pos@all"}  # the rule's is 30 days
    served = load_version(store.catalog, out.version).model
    assert served.theta_new is not None
    assert served.dynamic.names()[int(np.argmax(served.theta_new))] == sel["chosen"]
    row = [r for r in store.versions() if r["version"] == out.version][0]
    assert f"new_users {sel['chosen']} (+" in choices(row)


def test_an_unknown_user_gets_the_staples_and_a_returning_user_is_untouched(chosen):
    store, out = chosen
    top = [r["item_id"] for r in store.recommend(999_999, 5)]
    assert sorted(top) == STAPLES  # the rule's 30-day column would show this month's trend
    assert top[0] == 0
    state = serving_state(store.catalog, out.version)
    assert state.bias_new is not None
    without = replace(state, bias_new=None)  # the same version without the column
    regulars, newcomer = [3, 17, 25], [999_999]
    assert np.array_equal(user_logits(state, regulars), user_logits(without, regulars))  # bit for bit
    assert not np.allclose(user_logits(state, newcomer), user_logits(without, newcomer))
    # the one equation: a mixed batch gives each user the rows it gives them alone
    mixed = user_logits(state, regulars + newcomer)
    assert np.array_equal(mixed[:3], user_logits(state, regulars))
    np.testing.assert_array_equal(mixed[3], user_logits(state, newcomer)[0])
    # SQL recommend serves the same list
    with store.connection() as con:
        got = con.execute("SELECT recommend(999999, 5)").fetchone()[0]
    assert [r["item_id"] for r in got] == top


def test_versions_without_the_column_load_and_bad_ones_are_refused(chosen):
    store, out = chosen
    tensors, meta = load_version(store.catalog, out.version).model.state()
    assert "theta_new" in tensors
    old = {k: v for k, v in tensors.items() if k != "theta_new"}
    m = FusionModel.from_state(old, meta)  # a version written before the term
    assert m.theta_new is None
    assert "theta_new" not in m.state()[0]
    with pytest.raises(ValueError, match="theta_new"):
        FusionModel.from_state(dict(old, theta_new=np.zeros(3, np.float32)), meta)
    # score_terms without bias_new is the equation as before
    X = np.zeros((2, 1), np.float32)

    class Flat:
        def user_vectors(self, *a):
            return X

        def item_item_bias(self, *a):
            return 0.0

        def cold_neighbour_bias(self, *a):
            return 0.0

    hist = (np.array([0, 1, 1]), np.array([0]), np.array([1]), np.array([0]))
    bias, bias_new = np.array([1.0, 2.0], np.float32), np.array([5.0, 0.0], np.float32)
    assert model_terms(Flat(), np.eye(1, 2, dtype=np.float32).T, bias, None, hist, 0.0)[1] is bias
    B = model_terms(Flat(), np.eye(1, 2, dtype=np.float32).T, bias, None, hist, 0.0, bias_new)[1]
    assert B.tolist() == [[1.0, 2.0], [5.0, 0.0]]


def test_a_refresh_where_new_users_follow_the_trend_keeps_theta(tmp_path):
    """Nothing to gain (visitors pick this month's trend, as regulars do): refresh keeps ``theta``."""
    items, inter = _frames()
    month = ((inter["ts"].dt.epoch("s") - inter["ts"].dt.epoch("s").min()) // (30 * DAY)).cast(pl.Int64)
    trend = 100 + 10 * month + pl.Series(np.random.default_rng(2).integers(TRENDING, size=inter.height))
    inter = inter.with_columns(item_id=trend)  # everyone on the trend
    with dynstore.init(tmp_path / "s", model="fake", positive="event = 'click'") as store:
        store.ingest("items", items)
        store.ingest("interactions", inter)
        store.encode()
        out = store.refresh(since="all", epochs=1)
        sel = out.training["selection"]["new_users"]
        assert sel["chosen"] == KEEP and sel["gain"] == 0.0 and sel["users"] > 50, sel
        assert sel["best_tried"]["gain"] < 0  # a long memory shows new users last month's trend
        assert load_version(store.catalog, out.version).model.theta_new is None
        assert serving_state(store.catalog, out.version).bias_new is None
        assert "new_users keep (best tried" in choices([r for r in store.versions()
                                                         if r["version"] == out.version][0])


def test_the_snapshot_carries_it_and_new_events_move_it(chosen, monkeypatch):
    """Readers serve new users from the writer's snapshot as from a build, and fold later
    events into the new users' bias as into everyone's (runs last: it adds events)."""
    from dynstore.serving import state as serving

    store, out = chosen
    path = store.path

    def lists(build: bool) -> tuple[list, np.ndarray]:
        builds: list = []
        monkeypatch.setattr(serving, "_build", lambda *a, _f=serving._build: builds.append(1) or _f(*a))
        if build:
            monkeypatch.setattr(serving, "read_snapshot", lambda *a: None)
        with dynstore.connect(path, read_only=True) as reader:
            got = [(r["item_id"], r["score"]) for r in reader.recommend(999_999, 10)]
            bias_new = serving.serving_state(reader.catalog, out.version).bias_new.copy()
        monkeypatch.undo()
        assert builds == ([1] if build else [])
        return got, bias_new

    snap, built = lists(False), lists(True)
    assert snap[0] == built[0] and np.array_equal(snap[1], built[1])
    t = pl.datetime(2024, 8, 1)  # after every event: a burst of visitors on staple 4
    store.ingest("interactions", pl.DataFrame({"user_id": list(range(50_000, 50_300)), "item_id": [4] * 300,
                                               "event": ["click"] * 300}).with_columns(ts=t))
    folded, rebuilt = lists(False), lists(True)
    assert folded[0] == rebuilt[0] and np.allclose(folded[1], rebuilt[1], rtol=0, atol=1e-5)
    assert folded[0][0][0] == 4 and snap[0][0][0] == 0  # the burst moved the new users' list
