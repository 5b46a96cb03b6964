"""A long-lived reader beside writers: never blocked, never a mixed answer.

One reader process holds one connection (a :class:`~dynstore.sql.session.SqlSession`,
what ``dynstore sql``'s prompt runs on, which follows the store between
statements) and loops ``recommend``, a join, and two consistency checks while
another process runs ``ingest`` (interactions, then new items), ``encode``, a
``refresh``, a ``rollback`` and another ``refresh``:

* one snapshot per statement: ``recommend(u, 5)`` (the current version) and
  ``recommend(u, 5, v)`` with ``v`` read from the ``versions`` view in the same
  statement agree, and so do the scores a list carries and ``score(u, i)`` of
  its items;
* no errors, and no statement slower than 1 s. The bound is generous on
  purpose: the statements take milliseconds on this store and a serving-state
  rebuild after a new version a few hundred; a reader that waited for a
  writer (a lock, an encode in the reader) would take as long as the writer's
  seconds-long step. It is a correctness bound of the contract ("never
  blocked for more than a moment"), not a speed figure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from store_checks import check_store

pytestmark = pytest.mark.slow

READER = textwrap.dedent('''
    import json, os, random, sys, time
    import dynstore
    from dynstore.sql.session import SqlSession

    path, stop = sys.argv[1], sys.argv[2]
    rng = random.Random(0)
    stats = {"iterations": 0, "errors": [], "mixed": [], "slowest": 0.0, "versions": set(), "items": set()}
    with dynstore.connect(path) as store, SqlSession(store) as session:
        def timed(sql):
            t0 = time.perf_counter()
            rows = session.run(sql).rows
            took = time.perf_counter() - t0
            if took > stats["slowest"]:
                stats["slowest"], stats["slowest_sql"] = took, sql
            return rows
        open(stop + ".ready", "w").close()
        while not os.path.exists(stop) or stats["iterations"] < 5:
            u = rng.randint(1, 60)
            try:
                timed(f"SELECT recommend({u}, 10)")
                timed(f"SELECT r.rank, i.title FROM recommendations({u}, 5) r JOIN items i USING (item_id)")
                v, a, b, n = timed(
                    "WITH cur AS (SELECT max(version) AS v FROM versions WHERE status = 'current') "
                    f"SELECT cur.v, recommend({u}, 5), recommend({u}, 5, cur.v), (SELECT count(*) FROM items) FROM cur")[0]
                stats["versions"].add(v)
                stats["items"].add(n)
                if [x["item_id"] for x in a] != [x["item_id"] for x in b]:
                    stats["mixed"].append(("version", v, a, b))
                for item, listed, scored in timed(
                        f"SELECT r.item_id, r.score, score({u}, r.item_id) FROM recommendations({u}, 5) r"):
                    # float32 logits from matrix products of other shapes: equal to ~1e-7; a
                    # mixed snapshot differs by orders more (0.36 was seen)
                    if scored is None or abs(listed - scored) > 1e-6:
                        stats["mixed"].append(("score", item, listed, scored))
            except Exception as exc:
                stats["errors"].append(f"{type(exc).__name__}: {exc}")
            stats["iterations"] += 1
    stats["versions"], stats["items"] = sorted(stats["versions"]), sorted(stats["items"])
    print(json.dumps(stats))
''')


def test_reader_beside_ingest_encode_refresh(encoded, tmp_path, shop_files):
    import polars as pl

    env = dict(os.environ, LANCE_LOG="error")
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(encoded.path), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    events = pl.read_parquet(shop_files / "interactions.parquet").sort("ts").tail(400).with_columns(
        pl.col("ts").dt.offset_by("1d"))
    events.write_parquet(tmp_path / "more.parquet")
    pl.DataFrame({"item_id": [901, 902, 903], "title": ["new lamp", "new kettle", "new chair"],
                  "category": ["home"] * 3}).write_csv(tmp_path / "new_items.csv")
    steps = [["ingest", encoded.path, "interactions", tmp_path / "more.parquet"],
             ["ingest", encoded.path, "items", tmp_path / "new_items.csv"],
             ["encode", encoded.path],
             ["refresh", encoded.path, "--since", "all", "--epochs", "1", "--force"],
             ["rollback", encoded.path, "1"],
             ["refresh", encoded.path, "--since", "all", "--epochs", "1", "--force"]]
    try:
        while not (tmp_path / "stop.ready").exists():
            assert reader.poll() is None, reader.stderr.read()
        for step in steps:
            proc = subprocess.run([sys.executable, "-m", "dynstore", *map(str, step)], capture_output=True,
                                  text=True, env=env, timeout=300)
            assert proc.returncode == 0, (step, proc.stderr)
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err
    stats = json.loads(out)
    print(f"reader: {stats['iterations']} iterations, versions seen {stats['versions']}, slowest statement "
          f"{stats['slowest']:.3f} s ({stats.get('slowest_sql')})")
    assert stats["errors"] == [], stats["errors"][:3]
    assert stats["mixed"] == [], stats["mixed"][:3]
    assert stats["slowest"] < 1.0, f"a statement took {stats['slowest']:.2f} s: {stats['slowest_sql']}"
    # the reader followed the writers: it saw the new items and more than one version
    assert stats["items"][-1] == 83 and len(stats["versions"]) >= 2, stats
    assert stats["iterations"] >= 10
    check_store(encoded.path)


# ------------------------------------------------ a command commits whole or not at all (issue 24)

HOLDER = textwrap.dedent('''
    import sys, time
    from dynstore.storage.backend import open_storage
    with open_storage(sys.argv[1]).lock(sys.argv[2], wait=30):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
''')


class Holder:
    """Another process holding the ``kind`` writer lock of a store for ``seconds``."""

    def __init__(self, path, kind: str, seconds: float = 60.0):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind, str(seconds)],
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ, LANCE_LOG="error"))
        assert self.proc.stdout.readline().strip() == "held"

    def close(self):
        self.proc.kill()
        self.proc.wait()


def _events(users, items, day=1):
    import polars as pl

    n = len(users)
    return pl.DataFrame({"user_id": users, "item_id": items, "event": ["click"] * n, "value": [1.0] * n,
                         "ts": [f"2025-05-{day:02d} 10:00:{s % 60:02d}" for s in range(n)]})


def test_a_busy_config_never_fails_a_committed_ingest(tmp_path, runner):
    """The config lock held by another process (`config --model` running): first ingests
    with string ids, a later ingest, `ingest` on the CLI and impressions all commit once
    and succeed; the ids' types follow the stored data."""
    import dynstore
    from dynstore.cli import main

    path = tmp_path / "s"
    store = dynstore.init(path, model="fake")
    holder = Holder(path, "config")
    try:
        store.ingest("items", _items_frame(["sku-1", "sku-2", "sku-3"]))
        store.ingest("interactions", _events(["u1", "u2"], ["sku-1", "sku-2"]))
        _events(["u3"], ["sku-3"], day=2).write_csv(tmp_path / "more.csv")
        r = runner.invoke(main, ["ingest", str(path), "interactions", str(tmp_path / "more.csv")])
        assert r.exit_code == 0, r.output
        assert store.log_impressions("u1", ["sku-2", "sku-3"]) == 2
    finally:
        holder.close()
    with dynstore.connect(path, read_only=True) as s:
        assert s.catalog.id_types() == {"item": "string", "user": "string"}
        assert s.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == 5  # each row once
        assert s.sql("SELECT count(*) FROM items").fetchall()[0][0] == 3
    check_store(path)


def _items_frame(ids):
    import polars as pl

    return pl.DataFrame({"item_id": ids, "title": [f"item {i}" for i in ids]})


def test_first_ingests_of_two_tables_agree_on_the_id_type(tmp_path):
    """Items with string ids and interactions with integer item ids, the first of each
    at once: one of them fixes the item ids' type, the other is refused whole."""
    import dynstore

    path = tmp_path / "s"
    dynstore.init(path, model="fake").close()
    _items_frame(["a", "b"]).write_parquet(tmp_path / "items.parquet")
    _events([1, 2], [1, 2]).write_parquet(tmp_path / "events.parquet")
    code = ("import sys, dynstore\n"
            "from dynstore.errors import IngestError, StoreBusy\n"
            "try:\n"
            "    dynstore.connect(sys.argv[1]).ingest(sys.argv[2], sys.argv[3]); print('ok')\n"
            "except (IngestError, StoreBusy) as exc:\n"
            "    print('refused')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), kind, str(tmp_path / f)], text=True,
                              stdout=subprocess.PIPE, env=dict(os.environ, LANCE_LOG="error"))
             for kind, f in (("items", "items.parquet"), ("interactions", "events.parquet"))]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert "ok" in outs and set(outs) <= {"ok", "refused"}, outs
    with dynstore.connect(path, read_only=True) as s:
        items = s.catalog.dataset("items")
        events = s.catalog.dataset("interactions")
        kinds = {str(ds.schema.field("item_id").type) for ds in (items, events) if ds is not None}
        assert len(kinds) == 1, kinds  # never strings in one table and integers in the other


def test_impressions_wait_their_turn(tmp_path):
    """An ingest holding the interactions lock for 3 s (longer than the usual 2 s wait):
    log_impressions waits and logs, never StoreBusy; and 4 processes logging at once
    all succeed, every row once."""
    import dynstore

    path = tmp_path / "s"
    store = dynstore.init(path, model="fake")
    store.ingest("interactions", _events([1], [1]))
    holder = Holder(path, "ingest-interactions", seconds=3)
    try:
        assert store.log_impressions(1, [2, 3]) == 2
    finally:
        holder.close()
    code = ("import sys, dynstore\n"
            "s = dynstore.connect(sys.argv[1])\n"
            "for n in range(3):\n"
            "    s.log_impressions(int(sys.argv[2]), [10 + n, 20 + n])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(u)], stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, LANCE_LOG="error")) for u in range(4)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errs
    with dynstore.connect(path, read_only=True) as s:
        got = s.sql("SELECT count(*) FROM interactions WHERE event = 'impression'").fetchall()[0][0]
    assert got == 2 + 4 * 3 * 2


def test_init_is_exclusive_and_finishes_an_unfinished_one(tmp_path, runner):
    """Three `init`s on one path at once: one creates the store, the others exit 1 and its
    rules are the winner's. A directory an interrupted init left is recognised, and init
    finishes it."""
    import dynstore
    from dynstore.cli import main
    from dynstore.errors import StoreNotFound

    path = tmp_path / "s"
    procs = [subprocess.Popen([sys.executable, "-m", "dynstore", "init", str(path), "--model", "fake",
                               "--positive", f"value > {n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, LANCE_LOG="error")) for n in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1, 1], (codes, outs)
    for code, (_, err) in zip(codes, outs):
        if code:
            assert len(err.strip().splitlines()) == 1, err
            assert "already exists" in err or "another `dynstore init` created a store here" in err, err
    winner = codes.index(0)
    with dynstore.connect(path) as s:
        assert s.config.positive == f"value > {winner}"

    half = tmp_path / "half"
    for sub in ("tables", "cache", "models", "locks"):
        (half / sub).mkdir(parents=True)
    (half / "dynstore.toml.tmp").write_text("format_version = 1\n")
    with pytest.raises(StoreNotFound, match="unfinished"):
        dynstore.connect(half)
    r = runner.invoke(main, ["init", str(half), "--model", "fake"])
    assert r.exit_code == 0, r.output
    assert not (half / "dynstore.toml.tmp").exists()
    with dynstore.connect(half) as s:
        assert s.config.encoder_id and s.config.encoder_dim > 0  # written with the config, at once
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = runner.invoke(main, ["init", str(tmp_path / "other"), "--model", "fake"])
    assert r.exit_code == 1 and "not empty" in r.output
