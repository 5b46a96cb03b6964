"""Refresh reads only its window: ``labelled_events_since`` against the view it must equal."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import dynstore
from dynstore.data.views import views_connection
from dynstore.versions.window import labelled_events

T0 = dt.datetime(2025, 3, 1)
EVENTS = ["impression", "click", "skip", "view"]


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    store = dynstore.init(tmp_path_factory.mktemp("w") / "s", model="fake",
                          positive="event = 'click'", negative="event = 'skip'")
    store.ingest("interactions", pa.table({"user_id": [1], "item_id": [1], "ts": pa.array([T0], pa.timestamp("us")),
                                           "event": ["click"]}))
    c = views_connection(store.catalog)
    yield c
    c.close()


def _table(rows) -> pa.Table:
    return pa.table({"user_id": pa.array([r[0] for r in rows], pa.int64()),
                     "item_id": pa.array([r[1] for r in rows], pa.int64()),
                     "ts": pa.array([T0 + dt.timedelta(hours=r[2]) for r in rows], pa.timestamp("us")),
                     "event": pa.array([EVENTS[r[3]] for r in rows], pa.string()),
                     "value": pa.array([1.0] * len(rows), pa.float64())})


# few users, items and hours: the same pair often meets at the window's edge
event = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(0, 6), st.integers(0, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(event, max_size=25), cut=st.one_of(st.none(), st.integers(-1, 7)))
@example(rows=[(1, 1, 3, 0), (1, 1, 3, 1)], cut=3)  # impression and click at the cutoff itself
def test_window_read_equals_the_view_filtered(con, rows, cut):
    """An impression in the window dropped by a positive at or after it, or kept because the
    positive came before it (or before the window): the window's read decides exactly as the
    whole-history view does, then filtered."""
    con.register("_dynstore_interactions", _table(rows))
    cutoff = None if cut is None else T0 + dt.timedelta(hours=cut)
    got = labelled_events(con, cutoff).to_pylist()
    where, params = ("", None) if cutoff is None else ("WHERE ts >= ?", [cutoff])
    want = con.sql(f"SELECT user_id, item_id, epoch(ts)::BIGINT AS ts, label FROM labelled_events {where} "
                   "ORDER BY ts, user_id, item_id, label", params=params).to_arrow_table().to_pylist()
    assert got == want


def test_an_impression_before_the_window_start_keeps_its_own_fate(con):
    """A positive before the window cannot drop an impression in it; one in the window can."""
    con.register("_dynstore_interactions", _table([(1, 1, 0, 1), (1, 1, 5, 0),     # click, then impression: kept
                                                   (1, 2, 5, 0), (1, 2, 6, 1)]))   # impression, then click: dropped
    got = [(r["item_id"], r["label"]) for r in labelled_events(con, T0 + dt.timedelta(hours=3)).to_pylist()]
    assert got == [(1, 0), (2, 1)]


def test_the_window_filter_reaches_both_lance_scans(tmp_path):
    """Both scans of the labelling (the events and the positives that drop impressions) get
    the cutoff as a scan filter: a refresh over 30 days of a long history reads 30 days."""
    store = dynstore.init(tmp_path / "s", model="fake", positive="event = 'click'", negative="event = 'skip'")
    store.ingest("interactions", _table([(1, 1, 0, 1), (2, 2, 9, 0)]))
    c = views_connection(store.catalog)
    try:
        plan = c.sql("EXPLAIN SELECT * FROM labelled_events_since(?::TIMESTAMP)",
                     params=[T0 + dt.timedelta(hours=3)]).fetchall()[0][1]
        whole = c.sql("EXPLAIN SELECT * FROM labelled_events").fetchall()[0][1]
    finally:
        c.close()
    assert plan.count("ARROW_SCAN") == 2
    assert plan.count("\"ts\" >= TIMESTAMP '2025-03-01 03:00:00'") == 2
    assert "TIMESTAMP" not in whole  # the view of every event filters nothing
