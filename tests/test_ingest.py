"""Ingest: formats, id types, upserts, atomic rejection, round-trips."""
from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynstore
from dynstore.errors import IdTypeError, IngestError


def counts(store):
    return {t: store.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("interactions", "items", "users")}


def test_ingest_all_formats(store, tmp_path):
    rows = [{"user_id": 1, "item_id": 10, "ts": "2025-01-01T10:00:00", "event": "click", "value": 1},
            {"user_id": 2, "item_id": 11, "ts": "2025-01-02", "event": "skip", "value": -1}]
    df = pl.DataFrame(rows)
    df.write_csv(tmp_path / "a.csv")
    df.write_csv(tmp_path / "b.tsv", separator="\t")
    df.write_parquet(tmp_path / "c.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "e.ndjson").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.csv", "b.tsv", "c.parquet", "d.json", "e.ndjson"):
        store.ingest("interactions", tmp_path / name)
    assert counts(store)["interactions"] == 10
    labels = store.sql("SELECT event, min(label), max(label) FROM interactions GROUP BY 1 ORDER BY 1").fetchall()
    assert labels == [("click", 1, 1), ("skip", -1, -1)]
    days = store.sql("SELECT DISTINCT ts FROM interactions ORDER BY ts").fetchall()
    assert days == [(dt.datetime(2025, 1, 1, 10),), (dt.datetime(2025, 1, 2),)]


def test_epoch_and_offset_timestamps(store):
    store.ingest("interactions", pa.table({"user_id": [1], "item_id": [2], "ts": [1_700_000_000]}))
    store.ingest("interactions", pa.table({"user_id": [1], "item_id": [3], "ts": ["2024-01-01T10:00:00+02:00"]}))
    got = [r[0] for r in store.sql("SELECT ts FROM interactions ORDER BY item_id").fetchall()]
    assert got == [dt.datetime(2023, 11, 14, 22, 13, 20), dt.datetime(2024, 1, 1, 8, 0)]
    # value defaults to 1 when the column is absent
    assert store.sql("SELECT DISTINCT value FROM interactions").fetchall() == [(1.0,)]


def test_map_renames_columns(store, tmp_path):
    pl.DataFrame({"userId": [1], "movieId": [5], "timestamp": [1_700_000_000], "rating": [4.5]}).write_csv(
        tmp_path / "r.csv")
    store.ingest("interactions", tmp_path / "r.csv",
                 mapping={"user_id": "userId", "item_id": "movieId", "ts": "timestamp", "value": "rating"})
    assert store.sql("SELECT user_id, item_id, value FROM interactions").fetchall() == [(1, 5, 4.5)]


def test_extra_columns_kept_and_schema_evolves(store):
    store.ingest("interactions", pl.DataFrame({"user_id": [1], "item_id": [1], "ts": ["2025-01-01"]}))
    store.ingest("interactions", pl.DataFrame({"user_id": [2], "item_id": [1], "ts": ["2025-01-02"],
                                               "device": ["ios"]}))
    got = store.sql("SELECT user_id, device FROM interactions ORDER BY user_id").fetchall()
    assert got == [(1, None), (2, "ios")]


def test_items_upsert_merges(store):
    store.ingest("items", pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"], "price": [1.0, 2.0]}))
    store.ingest("items", pl.DataFrame({"item_id": [2, 3], "title": ["B", "c"], "brand": ["x", "y"]}))
    got = store.sql("SELECT item_id, title, price, brand FROM items ORDER BY item_id").fetchall()
    # columns the update lacks (price) keep their stored value; new columns appear
    assert got == [(1, "a", 1.0, None), (2, "B", 2.0, "x"), (3, "c", None, "y")]


def test_string_ids_keep_their_type(store, tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title\n007,bond\nA1,x\n")
    store.ingest("items", tmp_path / "items.csv")
    assert store.catalog.id_type("item") == "string"
    (tmp_path / "more.csv").write_text("item_id,title\n008,y\n")
    store.ingest("items", tmp_path / "more.csv")  # all digits, but read as text: the store's type
    ids = [r[0] for r in store.sql("SELECT item_id FROM items ORDER BY item_id").fetchall()]
    assert ids == ["007", "008", "A1"]
    with pytest.raises(IdTypeError, match="integer ids but this store's item_id values are strings"):
        store.ingest("items", pa.table({"item_id": [5], "title": ["z"]}))


def test_conflicting_int_store_rejects_text_id_with_row(store, tmp_path):
    store.ingest("users", pa.table({"user_id": [1, 2]}))
    (tmp_path / "u.csv").write_text("user_id,age\n3,20\nbob,30\n")
    with pytest.raises(IngestError, match=r"u\.csv: row 2, column user_id: bob is not an integer id"):
        store.ingest("users", tmp_path / "u.csv")


@pytest.mark.parametrize("content, message", [
    ("user_id,item_id\n1,2\n", r"missing required column ts"),
    ("user_id,item_id,ts\n1,2,2025-01-01\n,3,2025-01-01\n", r"row 2, column user_id: missing \(NULL\) id"),
    ("user_id,item_id,ts\n1,2,2025-01-01\n1,3,yesterday\n", r"row 2, column ts: yesterday is not a timestamp"),
    ("user_id,item_id,ts,value\n1,2,2025-01-01,1\n1,3,2025-01-01,lots\n", r"row 2, column value: lots is not a number"),
])
def test_bad_rows_rejected_whole(store, tmp_path, content, message):
    store.ingest("interactions", pa.table({"user_id": [9], "item_id": [9], "ts": ["2025-01-01"]}))
    before = counts(store)
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(IngestError, match=message) as info:
        store.ingest("interactions", f)
    assert "bad.csv" in str(info.value) and "\n" not in str(info.value)
    assert counts(store) == before


def test_bad_row_late_in_large_file_writes_nothing(store, tmp_path):
    n = 200_000  # several batches: the bad row is in the last one
    df = pl.DataFrame({"user_id": list(range(n)), "item_id": [1] * n, "ts": ["2025-01-01"] * n})
    df = df.with_columns(pl.when(pl.col("user_id") == n - 5).then(pl.lit("nope")).otherwise(pl.col("ts")).alias("ts"))
    df.write_parquet(tmp_path / "big.parquet")
    with pytest.raises(IngestError, match=f"row {n - 4}, column ts"):
        store.ingest("interactions", tmp_path / "big.parquet")
    assert counts(store)["interactions"] == 0
    assert store.catalog.dataset("interactions") is None


def test_duplicate_ids_in_one_items_file(store, tmp_path):
    (tmp_path / "items.csv").write_text("item_id,title\n1,a\n2,b\n1,c\n")
    with pytest.raises(IngestError, match=r"rows 1 and 3, column item_id: duplicate id 1"):
        store.ingest("items", tmp_path / "items.csv")
    assert counts(store)["items"] == 0


def test_unknown_source_type_and_missing_file(store, tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        store.ingest("items", tmp_path / "nope.csv")
    with pytest.raises(IngestError, match="cannot ingest a dict"):
        store.ingest("items", {"item_id": [1]})
    with pytest.raises(IngestError, match="unknown table"):
        store.ingest("orders", pa.table({"x": [1]}))


def test_pandas_source(store):
    pd = pytest.importorskip("pandas")
    store.ingest("users", pd.DataFrame({"user_id": [1, 2], "region": ["n", "s"]}))
    assert store.sql("SELECT region FROM users ORDER BY user_id").fetchall() == [("n",), ("s",)]


ids = st.one_of(st.integers(-2**62, 2**62), st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                                                     max_size=12).filter(lambda s: s.strip()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_roundtrip_hypothesis(tmp_path_factory, data):
    """Whatever rows go in come back from SQL with the same ids and timestamps."""
    use_str = data.draw(st.booleans())
    id_st = ids.filter(lambda v: isinstance(v, str)) if use_str else st.integers(-2**62, 2**62)
    n = data.draw(st.integers(1, 30))
    users = data.draw(st.lists(id_st, min_size=n, max_size=n))
    items = data.draw(st.lists(id_st, min_size=n, max_size=n))
    stamps = data.draw(st.lists(st.datetimes(dt.datetime(1971, 1, 1), dt.datetime(2200, 1, 1)), min_size=n, max_size=n))
    stamps = [s.replace(microsecond=0) for s in stamps]
    values = data.draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=n, max_size=n))
    path = tmp_path_factory.mktemp("rt") / "s"
    s = dynstore.init(path, model="fake")
    s.ingest("interactions", pa.table({"user_id": users, "item_id": items,
                                       "ts": pa.array(stamps, pa.timestamp("us")), "value": values}),
             allow_future=True)  # up to 2200: a round trip of every representable time
    back = s.sql("SELECT user_id, item_id, ts, value FROM interactions").fetchall()
    assert sorted(back, key=repr) == sorted(zip(users, items, stamps, values), key=repr)
    s.close()


def test_invalid_utf8_and_format_override(store, tmp_path):
    bad = tmp_path / "items.csv"
    bad.write_bytes(b"item_id,title\n1,ok\n2,bad\xff\xfeend\n")
    with pytest.raises(IngestError, match=r"items\.csv: .*row 2 \(line 3\), column title: text is not UTF-8") as info:
        store.ingest("items", bad)
    assert "\n" not in str(info.value)
    assert counts(store)["items"] == 0
    odd = tmp_path / "items.data"
    odd.write_text("item_id\ttitle\n1\tok\n")
    with pytest.raises(IngestError, match="pass --format"):
        store.ingest("items", odd)
    store.ingest("items", odd, format="tsv")
    assert store.sql("SELECT title FROM items").fetchall() == [("ok",)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), data=st.data(),
       junk=st.text(st.characters(whitelist_categories=("L",)), min_size=1, max_size=10)
       .filter(lambda s: s.lower() not in {"epoch", "now", "today", "tomorrow", "yesterday", "allballs"}))
def test_bad_row_hypothesis_names_the_row_and_writes_nothing(tmp_path_factory, n, data, junk):
    """A bad timestamp at any position rejects the file, naming exactly that row."""
    bad_at = data.draw(st.integers(0, n - 1))
    path = tmp_path_factory.mktemp("bad") / "s"
    s = dynstore.init(path, model="fake")
    s.ingest("interactions", pa.table({"user_id": [0], "item_id": [0], "ts": ["2025-01-01"]}))
    stamps = ["2025-01-02T03:04:05"] * n
    stamps[bad_at] = junk
    f = path.parent / "in.csv"
    pl.DataFrame({"user_id": list(range(n)), "item_id": [1] * n, "ts": stamps}).write_csv(f)
    with pytest.raises(IngestError, match=rf"in\.csv: row {bad_at + 1}, column ts: "):
        s.ingest("interactions", f)
    assert s.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == 1
    s.close()
