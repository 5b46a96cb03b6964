"""The reliability contract: readers vs writers, kill -9, busy writers."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import polars as pl
import pytest

import dynstore


def _dynstore(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "dynstore", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    n = 3_000_000
    path = tmp_path_factory.mktemp("big") / "events.parquet"
    pl.DataFrame({"user_id": pl.int_range(0, n, eager=True) % 5000, "item_id": pl.int_range(0, n, eager=True) % 700,
                  "ts": pl.datetime_range(pl.datetime(2025, 1, 1), pl.datetime(2025, 1, 1), "1us", eager=True)
                  .extend_constant(None, 0).head(1).extend_constant(pl.datetime(2025, 1, 2), n - 1),
                  "event": ["click"] * n}).write_parquet(path)
    return path, n


def test_long_lived_reader_never_blocks_writer(loaded, tmp_path):
    reader = loaded.connection()  # a notebook holding a connection open
    before = reader.sql("SELECT count(*) FROM interactions").fetchall()[0][0]
    extra = tmp_path / "more.csv"
    extra.write_text("user_id,item_id,ts,event\n1,1,2025-06-01,click\n")
    proc = _dynstore("ingest", loaded.path, "interactions", extra)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # the open connection keeps its snapshot; a new query sees the commit
    assert reader.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == before
    assert loaded.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == before + 1
    reader.close()


@pytest.mark.slow
def test_kill_9_during_ingest_leaves_last_commit(store, big_file):
    path, n = big_file
    store.ingest("interactions", pl.DataFrame({"user_id": [1], "item_id": [1], "ts": ["2025-01-01"]}))
    for delay in (0.5, 1.5, 3.0):
        proc = _dynstore("ingest", store.path, "interactions", path)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with dynstore.connect(store.path) as fresh:
            count = fresh.sql("SELECT count(*) FROM interactions").fetchall()[0][0]
        assert count % n == 1, f"saw a partial ingest: {count} rows"
    # and the store still accepts writes: the dead writer's lock died with it
    out = store.ingest("interactions", pl.DataFrame({"user_id": [2], "item_id": [2], "ts": ["2025-01-01"]}))
    assert out.rows == 1


def test_kill_9_during_encode_resumes(loaded, monkeypatch):
    # Encode in a child that dies after the first committed chunk.
    code = (
        "import os, sys, dynstore, dynstore.data.semantic as sem\n"
        "sem.CHUNK = 16\n"
        "orig = sem.write_cache\n"
        "def boom(*a, **k):\n"
        "    orig(*a, **k)\n"
        "    os.kill(os.getpid(), 9)\n"
        "sem.write_cache = boom\n"
        f"dynstore.connect({str(loaded.path)!r}).encode()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9
    stale = loaded.sql("SELECT count(*) FROM stale_items").fetchall()[0][0]
    assert 0 < stale < 80  # one chunk landed
    out = loaded.encode()
    assert out.stale == stale and loaded.sql("SELECT count(*) FROM stale_items").fetchall()[0][0] == 0


def test_second_writer_waits_then_exits_3(loaded, hold_lock):
    with hold_lock(loaded.path, "ingest-items"):
        items = loaded.path.parent / "items.csv"
        items.write_text("item_id,title\n1,x\n")
        proc = _dynstore("ingest", loaded.path, "items", items)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 3
        assert "busy" in err and "Traceback" not in err
        # a writer of another kind is not blocked
        ev = loaded.path.parent / "ev.csv"
        ev.write_text("user_id,item_id,ts\n1,1,2025-01-01\n")
        proc = _dynstore("ingest", loaded.path, "interactions", ev)
        assert proc.wait(timeout=120) == 0


def test_readers_see_whole_versions(encoded):
    """While a refresh publishes, a reader sees version 1's rows or version 2's, never a mix."""
    con = encoded.connection()
    snap = con.sql("SELECT version, count(*) FROM item_embeddings_all GROUP BY 1").fetchall()
    encoded.refresh(since="all", epochs=1)
    assert con.sql("SELECT version, count(*) FROM item_embeddings_all GROUP BY 1").fetchall() == snap
    assert con.sql("SELECT count(*) FROM versions").fetchall()[0][0] == 1
    fresh = encoded.connection()
    assert sorted(fresh.sql("SELECT version, count(*) FROM item_embeddings_all GROUP BY 1").fetchall()) == [(1, 80), (2, 80)]
    con.close()
    fresh.close()
