"""Versions, fused embeddings and the recommend family of SQL functions."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import dynstore
from dynstore.errors import DynstoreError, VersionNotFound


def ids_of(recs):
    return [r["item_id"] for r in recs]


def test_first_version_after_encode(encoded):
    rows = encoded.sql("SELECT version, status, verdict FROM versions").fetchall()
    assert rows == [(1, "current", "initial")]
    # the popularity rule records the window it counted and its holdout figures
    (row,) = encoded.versions()
    assert " .. " in row["train_window"] and set(row["metrics"]["holdout"]) >= {"ndcg@10", "recall@10"}
    n = encoded.sql("SELECT count(*) FROM item_embeddings").fetchall()[0][0]
    assert n == 80
    dim = encoded.sql("SELECT len(vector) FROM item_embeddings LIMIT 1").fetchall()[0][0]
    assert dim == 32
    assert (encoded.path / "models" / "v1.safetensors").exists()
    assert not list((encoded.path / "models").glob("*.pt")) and not list((encoded.path / "models").glob("*.bin"))


def test_recommend_sql_matches_api_and_excludes_positives(encoded):
    user = encoded.sql("SELECT user_id FROM interactions WHERE label = 1 GROUP BY 1 ORDER BY count(*) DESC "
                       "LIMIT 1").fetchall()[0][0]
    api = encoded.recommend(user, 10)
    sql = encoded.sql(f"SELECT recommend({user}, 10)").fetchall()[0][0]
    assert ids_of(api) == [r["item_id"] for r in sql]
    assert [r["score"] for r in api] == sorted([r["score"] for r in api], reverse=True)
    assert all(0 < r["score"] < 1 for r in api)
    liked = {r[0] for r in encoded.sql(f"SELECT item_id FROM interactions WHERE user_id = {user} AND label = 1").fetchall()}
    assert liked and not liked & set(ids_of(api))
    table = encoded.sql(f"SELECT rank, item_id FROM recommendations({user}, 5)").fetchall()
    assert [r[0] for r in table] == [1, 2, 3, 4, 5] and [r[1] for r in table] == ids_of(api)[:5]
    joined = encoded.sql(f"SELECT r.rank, i.title FROM recommendations({user}, 3) r JOIN items i USING (item_id) "
                         "ORDER BY r.rank").fetchall()
    assert len(joined) == 3 and all(t for _, t in joined)


def test_batch_sql_equals_single_user(encoded):
    rows = encoded.sql("SELECT user_id, recommend(user_id, 5) AS r FROM users ORDER BY user_id").fetchall()
    assert len(rows) == 60
    for uid, recs in rows[:5]:
        assert [r["item_id"] for r in recs] == ids_of(encoded.recommend(uid, 5))


def test_k_validated(encoded):
    with pytest.raises(DynstoreError, match="between 1 and 10000"):
        encoded.recommend(1, 0)
    with pytest.raises(Exception, match="between 1 and 10000"):
        encoded.sql("SELECT recommend(1, 10001)").fetchall()


def test_unknown_user_gets_cold_start_and_unknown_item_null(encoded):
    cold = encoded.recommend(999_999, 5)
    assert len(cold) == 5
    pop = encoded.sql("SELECT item_id FROM interactions WHERE label = 1 GROUP BY 1 ORDER BY count(*) DESC LIMIT 20").fetchall()
    assert set(ids_of(cold)) & {p[0] for p in pop}, "untrained cold start follows recent popularity"
    assert encoded.sql("SELECT score(1, 987654), item_vector(987654), semantic_vector(987654)").fetchall()[0] == (None, None, None)
    assert encoded.sql("SELECT similar_items(987654, 3)").fetchall()[0][0] is None


def test_new_interaction_moves_recommendations_at_once(encoded):
    # A user with no history; after liking an item, items like it score higher
    # and the list changes, with no refresh in between.
    user = 777_777
    before = encoded.recommend(user, 10)
    liked = 5
    sims = [r["item_id"] for r in encoded.sql(f"SELECT unnest(similar_items({liked}, 5)) AS s").pl()["s"].to_list()]
    score = lambda: [encoded.sql(f"SELECT score({user}, {i})").fetchall()[0][0] for i in sims]  # noqa: E731
    s_before = score()
    encoded.ingest("interactions", pa.table({"user_id": [user], "item_id": [liked], "ts": ["2025-05-01T00:00:00"],
                                             "event": ["purchase"], "value": [1.0]}))
    after = encoded.recommend(user, 10)
    s_after = score()
    assert liked not in ids_of(after) and liked in ids_of(encoded.recommend(user + 1, 80))
    assert ids_of(after) != ids_of(before) or [r["score"] for r in after] != [r["score"] for r in before]
    assert all(a > b for a, b in zip(s_after, s_before)), (s_before, s_after)


def test_new_item_recommendable_at_once(encoded):
    # A brand-new item (no version row, no encode run) is ranked for users at
    # once, and higher for a user whose taste it fits than for one it does not.
    cats = [r[0] for r in encoded.sql("SELECT category FROM items GROUP BY 1 ORDER BY count(*) DESC LIMIT 2").fetchall()]
    template = encoded.sql(f"SELECT * FROM items WHERE category = '{cats[0]}' LIMIT 1").pl()
    encoded.ingest("items", template.with_columns(pl.lit(10_001).cast(pl.Int64).alias("item_id")))
    fan, other = 555_555, 666_666
    for user, cat in ((fan, cats[0]), (other, cats[1])):
        likes = [r[0] for r in encoded.sql(f"SELECT item_id FROM items WHERE category = '{cat}' AND item_id <> 10001 "
                                           "ORDER BY item_id LIMIT 4").fetchall()]
        encoded.ingest("interactions", pa.table({"user_id": [user] * 4, "item_id": likes,
                                                 "ts": ["2025-05-01"] * 4, "event": ["click"] * 4}))
    assert 10_001 in ids_of(encoded.recommend(fan, 81))
    score = lambda u: encoded.sql(f"SELECT score({u}, 10001)").fetchall()[0][0]  # noqa: E731
    assert score(fan) > score(other)
    # among the items of its category, it ranks higher for the fan than for the other user
    same_cat = encoded.sql(f"SELECT list(item_id) FROM items WHERE category = '{cats[0]}'").fetchall()[0][0]
    rank = lambda u: ids_of(encoded.recommend(u, len(same_cat), candidates=same_cat)).index(10_001)  # noqa: E731
    assert rank(fan) < rank(other)
    assert encoded.sql("SELECT item_vector(10001) IS NOT NULL").fetchall()[0][0]


def test_candidates_return_exactly_k(encoded):
    user = 1
    cands = encoded.sql("SELECT list(item_id) FROM items WHERE category = "
                        "(SELECT category FROM items GROUP BY 1 ORDER BY count(*) DESC LIMIT 1)").fetchall()[0][0]
    seen = {r[0] for r in encoded.sql(f"SELECT item_id FROM interactions WHERE user_id = {user} AND label = 1").fetchall()}
    k = min(5, len(set(cands) - seen))
    recs = encoded.sql(f"SELECT recommend_among({user}, {k}, ?)", [cands]).fetchall()[0][0]
    assert len(recs) == k and all(r["item_id"] in cands for r in recs)
    api = encoded.recommend(user, k, candidates=cands)
    assert ids_of(api) == [r["item_id"] for r in recs]


def test_recommend_from_examples(encoded):
    pos = encoded.sql("SELECT list(item_id) FROM (SELECT item_id FROM items ORDER BY item_id LIMIT 3)").fetchall()[0][0]
    recs = encoded.sql(f"SELECT recommend_from_examples({pos}, [50], 5)").fetchall()[0][0]
    got = [r["item_id"] for r in recs]
    assert len(got) == 5 and not set(got) & set(pos + [50])


def test_vectors_and_similarity(encoded):
    a, b = encoded.sql("SELECT item_vector(1), semantic_vector(1)").fetchall()[0]
    assert len(a) == len(b) == 32
    assert abs(np.linalg.norm(b) - 1) < 1e-5
    u = encoded.sql("SELECT user_vector(1)").fetchall()[0][0]
    assert len(u) == 32
    sim = encoded.sql("SELECT similar_items(1, 4)").fetchall()[0][0]
    assert len(sim) == 4 and 1 not in [s["item_id"] for s in sim]


def test_versions_and_rollback(encoded):
    r = encoded.refresh(since="all", epochs=2)
    assert r.version == 2 and r.parent == 1
    assert {v["version"] for v in encoded.versions()} == {1, 2}
    v1 = ids_of(encoded.recommend(1, 5, version=1))
    sql_v1 = [x["item_id"] for x in encoded.sql("SELECT recommend(1, 5, 1)").fetchall()[0][0]]
    assert v1 == sql_v1
    all_rows = encoded.sql("SELECT version, count(*) FROM item_embeddings_all GROUP BY 1 ORDER BY 1").fetchall()
    assert all_rows == [(1, 80), (2, 80)]
    encoded.rollback(1)
    assert encoded.sql("SELECT version FROM versions WHERE status = 'current'").fetchall() == [(1,)]
    with pytest.raises(VersionNotFound, match="no version 9"):
        encoded.rollback(9)
    with pytest.raises(VersionNotFound):
        encoded.recommend(1, 5, version=9)


def test_log_impressions_feeds_refresh(encoded):
    n = encoded.sql("SELECT log_impressions(1, [2, 3, 4])").fetchall()[0][0]
    assert n == 3
    rows = encoded.sql("SELECT item_id, event, label FROM interactions WHERE user_id = 1 AND event = 'impression' "
                       "AND value IS NULL ORDER BY item_id").fetchall()
    assert rows == [(2, "impression", 0), (3, "impression", 0), (4, "impression", 0)]


def test_string_ids_end_to_end(tmp_path):
    s = dynstore.init(tmp_path / "s", model="fake")
    s.ingest("items", pl.DataFrame({"item_id": ["a", "b", "c"], "title": ["red shoe", "blue shoe", "green hat"]}))
    s.ingest("interactions", pl.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "b"],
                                           "ts": ["2025-01-01", "2025-01-02"]}))
    s.encode()
    recs = s.sql("SELECT recommend('u1', 2)").fetchall()[0][0]
    assert [r["item_id"] for r in recs] and all(isinstance(r["item_id"], str) for r in recs)
    assert "a" not in [r["item_id"] for r in recs]
    s.close()


def test_vector_index_serves_large_catalogues(loaded, monkeypatch):
    from dynstore.serving import recommend as rec

    from dynstore.versions import index as versions

    loaded.configure(index_min_items=50)  # tiny threshold: the 80-item shop gets an index
    # Probing every partition, the inner-product search through the L2 index
    # must find exactly the exact top-k (recall at scale: benchmarks/).
    settings = versions.index_settings
    monkeypatch.setattr(versions, "index_settings", lambda n, w: {**settings(n, w), "nprobes": 10_000})
    loaded.encode()
    assert (loaded.path / "index" / "v1.lance").is_dir()
    calls = []
    monkeypatch.setattr(rec, "_indexed_one", lambda *a, _f=rec._indexed_one: calls.append(1) or _f(*a))
    assert rec.serving_state(loaded.catalog).index is not None
    agree = []
    for user in range(1, 31):
        exact = ids_of(loaded.recommend(user, 10, exact=True))
        approx = ids_of(loaded.recommend(user, 10))
        liked = {r[0] for r in loaded.sql(f"SELECT item_id FROM interactions WHERE user_id = {user} AND label = 1").fetchall()}
        assert not liked & set(approx)
        agree.append(approx == exact)
    assert len(calls) == 30 and all(agree)


def test_vector_index_records_its_settings_and_serves_them(tmp_path, monkeypatch):
    """The PQ index's settings are recorded with it, serving searches with them, and
    the candidates rescored exactly keep recall@10 vs exact at 0.95 or more."""
    import lance

    import dynstore
    from dynstore.serving import recommend as rec
    from dynstore.versions import index as versions

    monkeypatch.setattr(versions, "INDEX_PQ_MIN_ROWS", 1000)  # PQ on a small catalogue
    rng = np.random.default_rng(0)
    n_items, n_users = 3000, 40
    s = dynstore.init(tmp_path / "s", model="fake:32")
    s.configure(index_min_items=1000)
    words = np.array([f"w{i}" for i in range(600)])
    topic = rng.integers(0, 30, n_items)
    titles = [" ".join(words[t * 20 + rng.integers(0, 20, 5)]) for t in topic]
    s.ingest("items", pl.DataFrame({"item_id": np.arange(1, n_items + 1), "title": titles}))
    s.ingest("interactions", pl.DataFrame({
        "user_id": np.repeat(np.arange(1, n_users + 1), 5), "item_id": rng.integers(1, n_items + 1, n_users * 5),
        "ts": np.datetime64("2025-01-01T00:00:00", "us") + np.arange(n_users * 5).astype("timedelta64[m]"),
        "value": np.ones(n_users * 5)}))
    s.encode()
    recorded = json.loads(lance.dataset(str(s.path / "index" / "v1.lance")).config()[versions.INDEX_SETTINGS_KEY])
    assert recorded["index_type"] == "IVF_PQ" and recorded["nprobes"] == versions.INDEX_NPROBES
    assert recorded["candidates"] == versions.INDEX_CANDIDATES and recorded["num_sub_vectors"] >= 1
    state = rec.serving_state(s.catalog)
    assert state.index is not None and {k: state.index_params[k] for k in recorded} == recorded
    # serving searches with the recorded settings, not settings computed now
    monkeypatch.setattr(versions, "INDEX_NPROBES", 1)
    seen = []
    to_table = state.index.to_table
    monkeypatch.setattr(state.index, "to_table", lambda **kw: seen.append(kw["nearest"]) or to_table(**kw))
    recall = []
    for user in range(1, n_users + 1):
        approx = ids_of(s.recommend(user, 10))
        exact = ids_of(s.recommend(user, 10, exact=True))
        recall.append(len(set(approx) & set(exact)) / len(exact))
        scores = [r["score"] for r in s.recommend(user, 10)]
        assert scores == sorted(scores, reverse=True)  # ranked by the true score
    assert seen and all(n["nprobes"] == recorded["nprobes"] and n["k"] >= recorded["candidates"] for n in seen)
    assert np.mean(recall) >= 0.95, np.mean(recall)
    s.close()


def test_index_row_ids_map_to_rows(tmp_path):
    """Row ids from a search over several fragments decode to the ``row`` column."""
    import lance

    from dynstore.serving.state import row_starts

    X = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    t = pa.table({"row": np.arange(1000), "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 8)})
    ds = lance.write_dataset(t, str(tmp_path / "ix.lance"), max_rows_per_file=300)
    assert len(ds.get_fragments()) > 1
    got = ds.to_table(columns=["row"], with_row_id=True)
    rid = got.column("_rowid").to_numpy()
    rows = row_starts(ds)[rid >> 32] + (rid & 0xFFFFFFFF).astype(np.int64)
    assert rows.tolist() == got.column("row").to_pylist()


def test_all_users_sql_equals_single_user_api(encoded):
    """The batched path (one matrix product per batch, fused exclusion, top-k on chunks)
    gives every user the list and the scores the single-user path gives."""
    rows = encoded.sql("SELECT user_id, recommend(user_id, 7) AS r FROM users ORDER BY user_id").fetchall()
    for uid, recs in rows:
        api = encoded.recommend(uid, 7)
        assert [r["item_id"] for r in recs] == ids_of(api)
        np.testing.assert_allclose([r["score"] for r in recs], [r["score"] for r in api], rtol=1e-6)


@pytest.mark.parametrize("scan", ["int8", "fp16"])
def test_low_precision_prefilter_gives_the_exact_lists(encoded, monkeypatch, scan):
    """The int8 (or float16) scan only narrows the candidates: the lists (and scores) are
    the float32 ones, for every user and k, including users whose positives are excluded."""
    from dynstore.serving import recommend as rec
    from dynstore.serving.precision import LowMatrix, QuantMatrix, quant_matrix

    if scan == "int8" and quant_matrix(np.ones((2, 2), np.float32)) is None:
        pytest.skip("torch without fbgemm's int8 kernel")
    users = [r[0] for r in encoded.sql("SELECT user_id FROM users ORDER BY user_id").fetchall()]
    exact = {(u, k): encoded.recommend(u, k) for u in users for k in (1, 10, 79)}
    monkeypatch.setattr(rec, "PREFILTER_MIN_ITEMS", 0)
    monkeypatch.setattr(rec, "PREFILTER_AFTER", 0)
    monkeypatch.setattr(rec, "SCAN", scan)
    used = []
    monkeypatch.setattr(rec, "_prefiltered", lambda *a, _f=rec._prefiltered: used.append(_f(*a)) or used[-1])
    for (u, k), want in exact.items():
        got = encoded.recommend(u, k)
        assert ids_of(got) == ids_of(want), (u, k)
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], rtol=1e-6)
    narrowed = [c for c in used if c is not None]
    matrix = rec.serving_state(encoded.catalog).prefilter.get("matrix")
    assert isinstance(matrix, QuantMatrix if scan == "int8" else LowMatrix)
    assert sum(c.size < 20 for c in narrowed) > len(users)  # it did narrow, and was still exact


def test_examples_score_like_a_user_with_that_history(encoded, monkeypatch):
    """recommend_from_examples runs the full score equation: a new user with no attributes
    whose only events are those examples (at time 0) gets the same list and scores, with
    every per-user term (here a stand-in item-item term that favours every seventh item)."""
    import datetime as dt

    from dynstore.model.fusion import FusionModel

    def item_item(self, ptr, items, labels, n_items, ts=None):
        return np.tile(np.where(np.arange(n_items) % 7 == 0, 3.0, 0.0), (len(ptr) - 1, 1)).astype(np.float32)

    monkeypatch.setattr(FusionModel, "item_item_bias", item_item)

    pos = [1, 2, 3]
    encoded.ingest("interactions", pl.DataFrame({
        "user_id": [990_001] * 3, "item_id": pos, "ts": [dt.datetime(1970, 1, 1)] * 3,
        "event": ["purchase"] * 3, "value": [1.0] * 3}))
    as_user = encoded.recommend(990_001, 8)
    from_examples = encoded.sql(f"SELECT recommend_from_examples({pos}, [], 8)").fetchall()[0][0]
    assert ids_of(as_user) == [r["item_id"] for r in from_examples]
    assert np.allclose([r["score"] for r in as_user], [r["score"] for r in from_examples], rtol=1e-6)
