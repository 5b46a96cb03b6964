"""Data maintenance: delete, ingest deduplication, unknown-item warnings, inspect."""
from __future__ import annotations

import json

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynstore
from dynstore.cli import main
from dynstore.errors import ConfigError, IngestError


def run(runner, *args, **kw):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# -------------------------------------------------------------------------- delete


def test_delete_interactions_by_rule_label_and_time(loaded):
    before = loaded.sql("SELECT count(*) FILTER (label = -1), count(*) FROM interactions").fetchall()[0]
    dry = loaded.delete("interactions", "label = -1", dry_run=True)
    assert dry.deleted == before[0] and dry.dry_run
    assert loaded.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == before[1]
    out = loaded.delete("interactions", "label = -1")
    assert out.deleted == before[0] and out.total == before[1] - before[0]
    assert loaded.sql("SELECT count(*) FILTER (label = -1) FROM interactions").fetchall()[0][0] == 0
    # one commit: the dataset moved by exactly one version
    assert out.version == dry.version + 1
    assert loaded.delete("interactions", "label = -1").deleted == 0


def test_delete_rejects_bad_conditions_naming_the_columns(loaded):
    with pytest.raises(ConfigError, match="nosuch.*not found|not found.*nosuch"):
        loaded.delete("users", "nosuch = 1")
    with pytest.raises(ConfigError, match="is not a condition over users"):
        loaded.delete("users", "1) OR (1")  # cannot escape the wrapper
    with pytest.raises(ConfigError, match="empty"):
        loaded.delete("users", "  ")
    with pytest.raises(ConfigError, match="unknown table"):
        loaded.delete("widgets", "true")


def test_deleted_item_is_never_recommended_again_and_leaves_the_next_version(encoded):
    user = encoded.sql("SELECT user_id FROM interactions WHERE label = 1 GROUP BY 1 ORDER BY 1 LIMIT 1").fetchall()[0][0]
    top = encoded.recommend(user, 5)[0]["item_id"]
    encoded.delete("items", f"item_id = {top}")
    # at once: no refresh, the same process, every path
    assert top not in [r["item_id"] for r in encoded.recommend(user, 80)]
    assert top not in [r["item_id"] for r in encoded.recommend("nobody", 80)]
    sql_ids = encoded.sql("SELECT item_id FROM recommendations(?, 80)", [user]).fetchall()
    assert (top,) not in sql_ids
    other = encoded.sql("SELECT item_id FROM items LIMIT 1").fetchall()[0][0]
    assert top not in [r["item_id"] for r in encoded.sql(f"SELECT similar_items({other}, 80)").fetchall()[0][0]]
    assert encoded.sql(f"SELECT score(?, {top}), item_vector({top})", [user]).fetchall() == [(None, None)]
    # and in a fresh process (a new store object)
    with dynstore.connect(encoded.path) as fresh:
        assert top not in [r["item_id"] for r in fresh.recommend(user, 80)]
    # its vector leaves the next version
    encoded.refresh(since="all", epochs=1, force=True)
    newest = encoded.versions()[0]["version"]
    assert encoded.sql("SELECT count(*) FROM item_embeddings_all WHERE version = ? AND item_id = ?",
                       [newest, top]).fetchall()[0][0] == 0


def test_delete_cli(runner, loaded):
    p = loaded.path
    r = run(runner, "delete", p, "users", "--where", "user_id < 10", "--dry-run")
    assert r.exit_code == 0 and r.output.startswith("would delete ") and "nothing deleted" in r.output
    r = run(runner, "delete", p, "users", "--where", "user_id < 10", "--json")
    out = json.loads(r.output)
    assert r.exit_code == 0 and out["kind"] == "users" and out["deleted"] > 0
    r = run(runner, "delete", p, "items", "--where", "item_id = 1")
    assert r.exit_code == 0 and "deleted 1 row from items" in r.output and "interactions naming" in r.output
    assert "not a condition over interactions" in one_line_error(
        run(runner, "delete", p, "interactions", "--where", "colour = 'red'"))
    assert run(runner, "delete", p, "widgets", "--where", "true").exit_code == 2
    assert run(runner, "delete", p, "items").exit_code == 2  # --where is required
    r = run(runner, "delete", p, "users", "--where", "true", "-q")
    assert r.exit_code == 0 and r.output == ""


# -------------------------------------------------------------------------- dedupe


def event_rows(n: int = 4) -> pl.DataFrame:
    return pl.DataFrame({"event_id": [f"e{i}" for i in range(n)], "user_id": [1] * n, "item_id": list(range(n)),
                         "ts": ["2025-01-01"] * n, "event": ["click"] * n})


def test_reingest_without_dedupe_duplicates_and_with_it_does_not(store):
    store.ingest("interactions", event_rows())
    assert store.ingest("interactions", event_rows()).rows == 4  # the documented default: append
    v = store.catalog.dataset("interactions").version
    out = store.ingest("interactions", event_rows(), dedupe=True)
    assert out.rows == 0 and out.duplicates_skipped == 4
    assert store.catalog.dataset("interactions").version == v  # nothing new: no commit, refresh stays a no-op
    more = event_rows(6).with_columns(pl.lit("2025-02-01").alias("ts"))  # same event ids, other times
    out = store.ingest("interactions", more, dedupe="event_id")
    assert out.rows == 2 and out.duplicates_skipped == 4 and out.key == ["event_id"]
    assert store.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == 10


def test_dedupe_within_one_ingest_and_null_values(store):
    logged = pl.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 5, 5], "ts": ["2025-01-01"] * 3,
                           "event": ["impression"] * 3, "value": [None, None, None]},
                          schema_overrides={"value": pl.Float64})
    assert store.ingest("interactions", logged, dedupe=True).rows == 2
    assert store.ingest("interactions", logged, dedupe=True).rows == 0  # NULL matches NULL


def test_dedupe_rejections(store):
    with pytest.raises(IngestError, match="--key nope: no such column"):
        store.ingest("interactions", event_rows(), dedupe="nope")
    with pytest.raises(IngestError, match="apply to interactions"):
        store.ingest("items", pl.DataFrame({"item_id": [1]}), dedupe=True)


def test_dedupe_still_names_the_bad_row(store, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("event_id,user_id,item_id,ts\ne1,1,1,2025-01-01\ne1,1,1,2025-01-01\ne2,1,,2025-01-01\n")
    with pytest.raises(IngestError, match="bad.csv: row 3, column item_id"):
        store.ingest("interactions", bad, dedupe="event_id")
    assert store.catalog.dataset("interactions") is None


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=15), min_size=1, max_size=4))
def test_dedupe_keeps_exactly_the_distinct_keys(tmp_path_factory, batches):
    s = dynstore.init(tmp_path_factory.mktemp("d") / "s", model="fake")
    seen: set[int] = set()
    for keys in batches:
        df = pl.DataFrame({"event_id": keys, "user_id": [1] * len(keys), "item_id": keys,
                           "ts": ["2025-01-01"] * len(keys)})
        out = s.ingest("interactions", df, dedupe="event_id")
        assert out.rows == len(set(keys) - seen)
        seen |= set(keys)
    assert sorted(x for (x,) in s.sql("SELECT event_id FROM interactions").fetchall()) == sorted(seen)


def test_ingest_dedupe_cli_and_unknown_items_warning(runner, store, tmp_path):
    p = store.path
    store.ingest("items", pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]}))
    f = tmp_path / "events.csv"
    f.write_text("event_id,user_id,item_id,ts\ne1,1,1,2025-01-01\ne2,1,99,2025-01-01\ne3,2,98,2025-01-02\n")
    r = run(runner, "ingest", p, "interactions", f)
    assert r.exit_code == 0 and "ingested 3 rows" in r.output
    assert "warning: 2 rows name 2 item ids not in items (e.g. 98, 99)" in r.output
    r = run(runner, "ingest", p, "interactions", f, "--key", "event_id")
    assert r.exit_code == 0 and "ingested 0 rows" in r.output and "skipped 3 duplicates (key: event_id)" in r.output
    r = run(runner, "ingest", p, "interactions", f, "--dedupe", "--json")
    out = json.loads(r.output)
    assert out["rows"] == 0 and out["duplicates_skipped"] == 3
    assert "no such column" in one_line_error(run(runner, "ingest", p, "interactions", f, "--key", "nope"))


def test_zero_byte_file_is_named(runner, store, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    msg = one_line_error(run(runner, "ingest", store.path, "interactions", empty))
    assert "empty.csv: the file is empty (0 bytes)" in msg


# -------------------------------------------------------------------------- inspect


def test_inspect_counts_versions_and_refresh_plan(encoded, runner):
    info = encoded.inspect()
    assert info["tables"]["items"]["rows"] == 80 and info["tables"]["items"]["fragments"] >= 1
    assert info["tables"]["interactions"]["bytes"] > 0 and info["bytes"] >= info["tables"]["interactions"]["bytes"]
    assert info["encoder"] == {"model": "fake", "id": "fake:32:v1", "dim": 32, "max_length": 256}
    assert info["items_stale"] == 0 and info["versions"]["current"] == 1
    assert info["refresh"]["needed"] and "version 1" in info["refresh"]["reason"]
    encoded.ingest("items", pl.DataFrame({"item_id": [10_001], "title": ["a brand new thing"]}))
    r = run(runner, "inspect", encoded.path, "--json")
    out = json.loads(r.output)
    assert r.exit_code == 0 and out["items_stale"] == 1 and "dynstore encode" in out["encode"]
    r = run(runner, "inspect", encoded.path)
    assert r.exit_code == 0 and r.output.startswith("key") and "refresh.reason" in r.output
    r = run(runner, "inspect", encoded.path, "--format", "csv")
    assert r.output.splitlines()[0] == "key,value" and "tables.items.rows,81" in r.output


def test_inspect_after_refresh_says_nothing_to_do(encoded):
    encoded.refresh(since="all", epochs=1)
    info = encoded.inspect()
    assert info["last_refresh"]["version"] == 2 and not info["refresh"]["needed"]
    assert info["refresh"]["since"] == "all" and "no new data since version" in info["refresh"]["reason"]
