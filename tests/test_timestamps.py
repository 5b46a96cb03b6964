"""Far-future timestamps: refused by default; kept on request, they cannot empty a relative window."""
from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from dynstore.errors import IngestError

STRAY = pl.DataFrame({"user_id": [1], "item_id": [2], "ts": ["2999-01-01"], "event": ["click"]})


def test_far_future_refused_then_kept_on_request(encoded):
    n = encoded.sql("SELECT count(*) FROM interactions").fetchall()[0][0]
    with pytest.raises(IngestError, match=r"row 1, column ts: 2999-01-01 is more than a day after the ingest"):
        encoded.ingest("interactions", STRAY)
    assert encoded.ingest("interactions", STRAY, allow_future=True).rows == 1
    assert encoded.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == n + 1


def test_a_stray_timestamp_does_not_end_the_default_window(encoded):
    """One row from year 2999 used to make every `refresh` (30d) fail for ever."""
    encoded.ingest("interactions", STRAY, allow_future=True)
    out = encoded.refresh(epochs=1)  # the default window: 30 days back from the newest non-future event
    assert out.status in ("current", "rejected", "candidate")
    start = dt.datetime.strptime(out.window.split(" .. ")[0], "%Y-%m-%d %H:%M")
    assert start.year == 2025
    # and the row can be corrected
    assert encoded.delete("interactions", "ts > now()").deleted == 1


def test_window_anchor_ignores_only_the_future(encoded):
    from dynstore.versions.window import newest_event

    con = encoded.connection()
    newest = con.sql("SELECT max(ts) FROM interactions").fetchall()[0][0]
    assert newest_event(con) == newest
    con.close()
    encoded.ingest("interactions", STRAY, allow_future=True)
    con = encoded.connection()
    assert newest_event(con) == newest
    con.close()
