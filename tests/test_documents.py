"""Item documents, stale detection, the semantic cache and encoder SQL functions."""
from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import dynstore
from dynstore.errors import ConfigError


def stale(store):
    return store.sql("SELECT count(*) FROM stale_items").fetchall()[0][0]


def test_default_document_joins_text_columns(store):
    store.ingest("items", pl.DataFrame({"item_id": [1], "title": ["Trail Runner"], "category": ["shoes"],
                                        "price": [9.5], "note": [None]}, schema_overrides={"note": pl.Utf8}))
    doc = store.sql("SELECT document FROM item_documents").fetchall()[0][0]
    assert doc == "title: Trail Runner\ncategory: shoes"


def test_custom_item_text_and_validation(store_path):
    s = dynstore.init(store_path, model="fake", item_text="upper(title)")
    s.ingest("items", pl.DataFrame({"item_id": [1], "title": ["abc"]}))
    assert s.sql("SELECT document FROM item_documents").fetchall()[0][0] == "ABC"
    with pytest.raises(ConfigError, match="not a valid expression"):
        s.configure(item_text="no_such_column || 'x'")
    assert s.config.item_text == "upper(title)"


def test_only_stale_items_are_encoded(loaded):
    assert stale(loaded) == 80
    first = loaded.encode()
    assert first.stale == 80 and first.encoded <= 80 and stale(loaded) == 0
    again = loaded.encode()
    assert (again.stale, again.encoded, again.reused) == (0, 0, 80)
    loaded.ingest("items", pl.DataFrame({"item_id": [3, 4], "title": ["changed text", "another change"]}))
    assert stale(loaded) == 2
    third = loaded.encode()
    assert (third.stale, third.encoded) == (2, 2)
    forced = loaded.encode(all=True)
    assert forced.encoded >= 78


def test_identical_documents_encoded_once(store):
    store.ingest("items", pl.DataFrame({"item_id": [1, 2, 3], "title": ["same", "same", "other"]}))
    out = store.encode()
    assert (out.stale, out.encoded) == (3, 2)


def test_changing_encoder_makes_everything_stale_and_keeps_old_cache(encoded):
    old = encoded.sql("SELECT semantic_vector(1)").fetchall()[0][0]
    encoded.configure(model="fake:16")
    assert stale(encoded) == 80
    assert encoded.sql("SELECT len(semantic_vector(1))").fetchall()[0][0] == 16
    encoded.configure(model="fake")
    assert stale(encoded) == 0
    assert encoded.sql("SELECT semantic_vector(1)").fetchall()[0][0] == old


def test_semantic_vector_encodes_stale_on_demand(loaded):
    assert stale(loaded) == 80
    v = loaded.sql("SELECT semantic_vector(1)").fetchall()[0][0]
    assert len(v) == 32 and abs(np.linalg.norm(v) - 1) < 1e-5
    assert stale(loaded) == 80  # encoded in memory only: a read never writes (encode fills the cache)


def test_semantic_vector_read_only_does_not_write(loaded):
    ro = dynstore.connect(loaded.path, read_only=True)
    assert ro.sql("SELECT semantic_vector(1) IS NOT NULL").fetchall()[0][0]
    assert stale(loaded) == 80
    ro.close()


def test_embed_is_vectorised_and_null_safe(encoded):
    calls = []
    from dynstore.encoders.cache import store_encoder

    enc = store_encoder(encoded.catalog)
    original = enc.encode

    def spy(texts, *a, **k):
        calls.append(len(texts))
        return original(texts, *a, **k)

    enc.encode = spy
    try:
        rows = encoded.sql("SELECT embed(title) FROM items").fetchall()
    finally:
        enc.encode = original
    assert len(rows) == 80 and max(calls) == 80  # one batch, not 80 calls
    assert encoded.sql("SELECT embed(NULL)").fetchall()[0][0] is None
    assert list(encoded.sql("SELECT embed('')").fetchall()[0][0]) == [0.0] * 32


def test_semantic_search_reads_naturally(encoded):
    target = encoded.sql("SELECT item_id, title FROM items LIMIT 1").fetchall()[0]
    best = encoded.sql(
        "SELECT item_id FROM items ORDER BY array_cosine_similarity(semantic_vector(item_id), embed(?)) DESC LIMIT 1",
        [encoded.sql(f"SELECT document FROM item_documents WHERE item_id = {target[0]}").fetchall()[0][0]],
    ).fetchall()[0][0]
    assert best == target[0]


def test_behaviour_summary_changes_documents(loaded):
    loaded.encode()
    loaded.configure(behaviour_summary=True)
    docs = dict(loaded.sql("SELECT item_id, document FROM item_documents").fetchall())
    assert any("picked with:" in (d or "") for d in docs.values())
    assert any("audience:" in (d or "") for d in docs.values())
    n = stale(loaded)
    assert n > 0
    loaded.encode()
    # new behaviour around an item changes its document again
    item = next(i for i, d in docs.items() if d and "picked with:" in d)
    others = loaded.sql(f"SELECT list(item_id) FROM (SELECT item_id FROM items WHERE item_id <> {item} LIMIT 5)").fetchall()[0][0]
    last = loaded.sql("SELECT max(ts) FROM interactions").fetchall()[0][0]
    rows = [(900_000 + n, i, last) for n in range(6) for i in [item] + others[:2]]
    loaded.ingest("interactions", pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                                            "ts": pa.array([r[2] for r in rows], pa.timestamp("us")),
                                            "event": ["purchase"] * len(rows)}))
    new_doc = loaded.sql(f"SELECT document FROM item_documents WHERE item_id = {item}").fetchall()[0][0]
    assert new_doc != docs[item]
    assert loaded.sql(f"SELECT count(*) FROM stale_items WHERE item_id = {item}").fetchall()[0][0] == 1


def test_null_and_huge_documents(store):
    store.ingest("items", pl.DataFrame({"item_id": [1, 2, 3], "title": [None, "x" * 1_000_000, "ok"]},
                                       schema_overrides={"title": pl.Utf8}))
    out = store.encode()
    assert out.stale == 3
    v = dict(store.sql("SELECT item_id, semantic_vector(item_id) FROM items").fetchall())
    assert list(v[1]) == [0.0] * 32  # documented: an empty document has the zero vector
    assert abs(np.linalg.norm(v[2]) - 1) < 1e-5


def test_interrupted_encode_of_a_few_items_resumes(tmp_path, shop_files, runner):
    """Well under one full chunk (80 items): Ctrl-C keeps what was committed, exit 130, a rerun resumes."""
    import dynstore
    from dynstore.cli import main
    from dynstore.encoders import FakeEncoder, register_encoder

    calls = []

    class Interrupted(FakeEncoder):
        def __init__(self, **kw):
            super().__init__(32)
            self.id = "interrupted:32"

        def encode(self, texts, batch_size=64, progress=None):
            calls.append(len(texts))
            if len(calls) == 2:
                raise KeyboardInterrupt  # Ctrl-C during the second chunk
            return super().encode(texts, batch_size=batch_size, progress=progress)

    register_encoder("interrupted-fake", Interrupted)
    s = dynstore.init(tmp_path / "s", model="interrupted-fake")
    s.ingest("items", shop_files / "items.csv")
    r = runner.invoke(main, ["encode", str(s.path)])
    assert r.exit_code == 130 and "Interrupted" in r.output
    stale = s.sql("SELECT count(*) FROM stale_items").fetchall()[0][0]
    assert stale == 80 - calls[0] and 0 < stale < 80
    out = s.encode()
    assert out.encoded == stale and s.sql("SELECT count(*) FROM stale_items").fetchall()[0][0] == 0


def test_catalogue_vectors_read_from_the_cache_equal_the_lookups(encoded):
    """``CatalogueVectors`` (a version's rows and a training window read the cache's
    dataset instead of holding its copy in memory) gives ``semantic_vectors``' numbers,
    for cached items, an item changed since the encode (encoded in memory), an unknown
    item, ids in any order, and a cache rewritten by upserts (deleted rows skipped)."""
    from dynstore.data.semantic import CatalogueVectors, semantic_vectors

    encoded.ingest("items", pl.DataFrame({"item_id": [3, 5], "title": ["changed text", "another change"]}))
    encoded.encode()  # upserts the cache: its dataset now has deleted rows
    encoded.ingest("items", pl.DataFrame({"item_id": [4], "title": ["stale since the encode"]}))
    cat = encoded.catalog.latest
    ids = [7, 4, 999, 1, 3] + list(range(80, 0, -1))
    want, found = semantic_vectors(cat, ids)
    assert not found[2] and found[1]
    got = CatalogueVectors(cat, ids)
    V, ok = got.matrix()
    assert np.array_equal(V, want) and np.array_equal(ok, found)
    blocks = [got.block(a, min(a + 7, len(ids))) for a in range(0, len(ids), 7)]
    assert np.array_equal(np.vstack([b[0] for b in blocks]), want)
    assert np.array_equal(np.concatenate([b[1] for b in blocks]), found)
    from dynstore.data.semantic import item_docs

    docs = item_docs(cat)
    assert got.hashes.to_pylist() == [docs[i][0] if i in docs else None for i in ids]
    assert np.any(want[1] != 0) and not np.any(want[2])
