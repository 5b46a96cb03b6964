"""One snapshot per statement: views and functions of a connection read the same commits.

Commits come from other processes (``dynstore rollback``, ``dynstore ingest``),
as they would from a cron job beside a notebook.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import polars as pl

import dynstore
from dynstore.sql.session import SqlSession


def _dynstore(*args):
    proc = subprocess.run([sys.executable, "-m", "dynstore", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, LANCE_LOG="error"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _ids(lst):
    return [r["item_id"] for r in lst]


def test_rollback_in_another_process_never_mixes_a_statement(encoded):
    encoded.refresh(since="all", epochs=1, force=True)
    con = encoded.connection()  # a long-lived connection: pinned at version 2
    q = ("WITH cur AS (SELECT max(version) AS v FROM versions WHERE status = 'current') "
         "SELECT cur.v, recommend(7, 10), recommend(7, 10, cur.v) FROM cur")
    v, a, b = con.sql(q).fetchall()[0]
    assert v == 2 and _ids(a) == _ids(b)
    _dynstore("rollback", encoded.path, 1)
    # the connection still answers version 2 for every view and function...
    v, a2, b2 = con.sql(q).fetchall()[0]
    assert v == 2 and _ids(a2) == _ids(a) == _ids(b2)
    # ...until it follows the store, between statements
    encoded.follow(con)
    v, a3, b3 = con.sql(q).fetchall()[0]
    assert v == 1 and _ids(a3) == _ids(b3) == _ids(encoded.recommend(7, 10, version=1))
    con.close()


def test_score_equals_the_list_at_an_ingest_commit(encoded):
    """An ingest between opening a connection and running a statement: the statement's
    scores, lists and counts all come from the connection's snapshot."""
    con = encoded.connection()
    before = con.sql("SELECT recommend(5, 10)").fetchall()[0][0]
    top = before[0]["item_id"]
    # user 5 now clicks their top item many times, in another process
    pl.DataFrame({"user_id": [5] * 30, "item_id": [top] * 30, "ts": ["2025-06-01"] * 30,
                  "event": ["purchase"] * 30}).write_parquet(encoded.path.parent / "buy.parquet")
    _dynstore("ingest", encoded.path, "interactions", encoded.path.parent / "buy.parquet")
    rows = con.sql(f"SELECT (SELECT count(*) FROM interactions WHERE user_id = 5 AND item_id = {top}) AS n, "
                   f"recommend(5, 10) AS r, score(5, {top}) AS s").fetchall()[0]
    n, r, s = rows
    assert _ids(r) == _ids(before)  # the purchase is not seen: the item is still listed
    assert abs(s - before[0]["score"]) < 1e-6
    assert n == encoded.pinned().catalog.dataset("interactions").count_rows(filter=f"user_id = 5 AND item_id = {top}") - 30
    # Store.sql follows the store between statements: the next one sees the purchases
    after = encoded.sql("SELECT recommend(5, 10)").fetchall()[0][0]
    assert top not in _ids(after)
    con.close()


def test_session_follows_between_statements_only(encoded):
    with SqlSession(dynstore.connect(encoded.path)) as session:
        n0 = session.run("SELECT count(*) FROM interactions").rows[0][0]
        encoded.log_impressions(3, [1, 2, 3])
        assert session.run("SELECT count(*) FROM interactions").rows[0][0] == n0 + 3


def test_pinned_view_serves_its_snapshot(encoded):
    view = encoded.pinned()
    state = view.recommend(9, 5)
    pl_events = pl.DataFrame({"user_id": [9], "item_id": [state[0]["item_id"]], "ts": ["2025-06-02"],
                              "event": ["purchase"]})
    encoded.ingest("interactions", pl_events)
    assert view.recommend(9, 5) == state
    assert state[0]["item_id"] not in _ids(encoded.recommend(9, 5))
    np.testing.assert_equal(view.sql("SELECT count(*) FROM interactions").fetchall()[0][0] + 1,
                            encoded.sql("SELECT count(*) FROM interactions").fetchall()[0][0])
