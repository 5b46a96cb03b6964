"""Read paths never write, never lock, never encode for serving: a read-only store serves every query.

The store is copied and the copy made read-only (``chmod -R a-w``). That stops
an ordinary user, not root, whose CAP_DAC_OVERRIDE bypasses file modes: run as
root, the reader goes through ``setpriv --bounding-set
-dac_override,-dac_read_search,-fowner``, a root process without that bypass
(a reader under another uid would need an interpreter that uid can reach;
this machine's lives in ``/root``). Either way the kernel refuses every write,
and the reader checks that first, so the test cannot pass vacuously.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.slow

AS_ROOT = os.geteuid() == 0
#: run as root: the reader runs without root's bypass of file modes
PREFIX = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if AS_ROOT else []
if AS_ROOT and not shutil.which("setpriv"):
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason="running as root without setpriv: cannot drop "
                                                              "CAP_DAC_OVERRIDE, so nothing is read-only")]

READER = textwrap.dedent('''
    import os, sys, json
    path = sys.argv[1]
    try:
        open(os.path.join(path, "probe"), "w")
        sys.exit("the store is writable for the reader: the test would prove nothing")
    except PermissionError:
        pass
    import dynstore
    from dynstore.sql.session import SqlSession
    out = {}
    with dynstore.connect(path) as s:          # not even read_only=True: a plain reader
        out["api"] = [r["item_id"] for r in s.recommend(3, 5)]
        out["stale"] = s.sql("SELECT count(*) FROM stale_items").fetchall()[0][0]
        with SqlSession(s) as session:
            for q in ["SELECT recommend(3, 5)",
                      "SELECT r.rank, i.title FROM recommendations(3, 5) r JOIN items i USING (item_id)",
                      "SELECT score(3, 1), similar_items(1, 3), recommend_among(3, 2, [1, 2, 3, 901])",
                      "SELECT user_vector(3) IS NOT NULL, item_vector(1) IS NOT NULL",
                      "SELECT semantic_vector(901) IS NOT NULL",      # a stale item: encoded in memory
                      "SELECT count(*) FROM item_embeddings_all",
                      "SELECT version, status FROM versions",
                      "SELECT recommend_from_examples([1, 2], [3], 4)"]:
                out[q] = session.run(q).rows
    print(json.dumps(out, default=str))
''')


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def readonly_store(encoded, tmp_path):
    """A copy of the shop store with 3 items not yet encoded, without a write bit anywhere."""
    encoded.ingest("items", pl.DataFrame({"item_id": [901, 902, 903], "title": ["lamp", "kettle", "chair"]}))
    copy = tmp_path / "ro" / "store"
    shutil.copytree(encoded.path, copy)
    no_write = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    for p in [copy, *copy.rglob("*"), copy.parent]:
        os.chmod(p, p.stat().st_mode & no_write)
    yield copy
    for p in [copy.parent, copy, *copy.rglob("*")]:
        os.chmod(p, p.stat().st_mode | stat.S_IWUSR)


def _run(args, env):
    return subprocess.run(PREFIX + [sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_read_only_copy_serves_every_query(readonly_store):
    copy = readonly_store
    before = _listing(copy)
    env = dict(os.environ, LANCE_LOG="error", PYTHONDONTWRITEBYTECODE="1")
    proc = _run(["-c", READER, copy], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert len(out["api"]) == 5 and out["stale"] == 3
    assert 901 not in out["api"]  # not encoded yet: left out until `encode`, at no cost to the reader
    for cmd in (["recommend", copy, "3", "-k", "3"], ["sql", copy, "SELECT recommend(3, 3)"],
                ["sql", copy, "--read-only", "SELECT count(*) FROM stale_items"], ["versions", copy],
                ["inspect", copy]):
        p = _run(["-m", "dynstore", *cmd], env)
        assert p.returncode == 0 and "Traceback" not in p.stderr, (cmd, p.stderr[-2000:])
    assert _listing(copy) == before, "a read path wrote to the store"


def test_writes_to_a_read_only_copy_fail_in_one_line(readonly_store, tmp_path):
    copy = readonly_store
    (tmp_path / "more.csv").write_text("user_id,item_id,ts\n1,2,2025-06-01\n")
    env = dict(os.environ, LANCE_LOG="error")
    for cmd in (["ingest", copy, "interactions", tmp_path / "more.csv"], ["encode", copy], ["compact", copy],
                ["refresh", copy, "--force"]):
        p = _run(["-m", "dynstore", *cmd], env)
        assert p.returncode in (1, 3), (cmd, p.returncode, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("Error: ") and "Traceback" not in p.stderr, (cmd, p.stderr[-2000:])


def test_readers_take_no_lock(encoded, hold_lock):
    """With every writer lock held by another process and stale items present, reads answer."""
    import contextlib

    import dynstore

    encoded.ingest("items", pl.DataFrame({"item_id": [901], "title": ["lamp"]}))
    kinds = ["encode", "versions", "config", "refresh", "ingest-interactions", "ingest-items", "ingest-users"]
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            stack.enter_context(hold_lock(encoded.path, kind))
        with dynstore.connect(encoded.path) as s:
            assert len(s.recommend(3, 5)) == 5
            assert s.sql("SELECT count(*) FROM stale_items").fetchall()[0][0] == 1
            assert s.sql("SELECT semantic_vector(901) IS NOT NULL").fetchall()[0][0]
            assert s.sql("SELECT count(*) FROM stale_items").fetchall()[0][0] == 1  # nothing cached by the read
