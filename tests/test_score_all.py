"""``score-all``, local engine: every user's top-k in ``batch_recommendations`` (issue 13)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from dynstore.serving.score_all import all_users
from dynstore.cli import main
from dynstore.serving.recommend import recommend_many

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def scored(encoded):
    # ten users with no history: cold-start lists, and 70 users in all (the blocked path)
    encoded.ingest("users", pl.DataFrame({"user_id": list(range(10_000, 10_010))}))
    return encoded


def _lists(store) -> dict:
    out: dict = {}
    t = store.catalog.dataset("batch_recommendations").to_table().to_pylist()
    for row in t:
        out.setdefault(row["user_id"], []).append(row)
    return out


def test_table_equals_recommend_many_for_every_user(scored):
    r = scored.score_all(k=7)
    users = all_users(scored.catalog)
    assert r.users == len(users) >= 70 and r.engine == "local" and r.workers is None
    ref = recommend_many(scored.catalog.pinned(), users, 7)
    got = _lists(scored)
    assert set(got) <= set(users)
    for u, lst in zip(users, ref):
        rows = got.get(u, [])
        assert [x["rank"] for x in rows] == list(range(1, len(rows) + 1))
        assert [(x["item_id"], x["score"]) for x in rows] == [(e["item_id"], e["score"]) for e in lst], u
        assert {x["version"] for x in rows} <= {r.version}
    assert r.rows == sum(len(x) for x in ref)


def test_seen_items_are_excluded(scored):
    scored.score_all(k=50)
    seen = scored.sql("SELECT count(*) FROM batch_recommendations b JOIN interactions i "
                      "USING (user_id, item_id) WHERE i.label = 1").fetchall()[0][0]
    assert seen == 0


def test_view_has_the_version_and_rerun_overwrites(scored):
    assert scored.sql("SELECT count(*) FROM batch_recommendations").fetchall()[0][0] == 0  # empty before
    first = scored.score_all(k=5)
    rows = scored.sql("SELECT version, count(*), max(rank) FROM batch_recommendations GROUP BY ALL").fetchall()
    assert rows == [(first.version, first.rows, 5)]
    scored.refresh(since="all", force=True)
    second = scored.score_all(k=3)
    assert second.table_version == first.table_version + 1  # one commit per run
    rows = scored.sql("SELECT version, count(*), max(rank) FROM batch_recommendations GROUP BY ALL").fetchall()
    current = scored.sql("SELECT max(version) FROM versions WHERE status = 'current'").fetchall()[0][0]
    assert rows == [(current, second.rows, 3)] and second.version == current


def test_cli_exit_code_and_json(runner, scored):
    r = runner.invoke(main, ["score-all", str(scored.path), "-k", "4", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert list(out) == ["users", "rows", "k", "version", "engine", "seconds", "users_per_s", "table_version",
                         "precision"]
    assert out["k"] == 4 and out["engine"] == "local"
    r = runner.invoke(main, ["score-all", str(scored.path), "-k", "2"], catch_exceptions=False)
    assert r.exit_code == 0 and "users scored" in r.output


def test_no_version_is_a_user_error(runner, loaded):
    r = runner.invoke(main, ["score-all", str(loaded.path)], catch_exceptions=False)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "dynstore encode" in r.output


def test_ray_missing_is_one_line(runner, encoded, monkeypatch):
    from dynstore.engines import ray as re_

    def no_ray(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(re_, "attempt_import", no_ray)
    for cmd in (["score-all", str(encoded.path), "--engine", "ray"], ["encode", str(encoded.path), "--engine", "ray"]):
        r = runner.invoke(main, cmd, catch_exceptions=False)
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and "pip install 'dynstore[ray]'" in lines[0], r.output


def test_importing_dynstore_never_imports_ray():
    code = ("import sys, dynstore, dynstore.store, dynstore.serving.score_all, dynstore.data.semantic, dynstore.cli; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
