"""End to end with the real default encoder (all-MiniLM-L6-v2, offline)."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import dynstore
from dynstore.demo import DEMO_RULES


@pytest.mark.slow
def test_real_encoder_end_to_end(tmp_path, shop_frames):
    store = dynstore.init(tmp_path / "s", **DEMO_RULES)  # default encoder: minilm
    assert store.config.model == "minilm"
    store.ingest("users", shop_frames["users"])
    store.ingest("items", shop_frames["items"])
    store.ingest("interactions", shop_frames["interactions"])
    out = store.encode()
    assert out["encoded"] == 80 and out["version"] == 1
    dim = store.sql("SELECT len(semantic_vector(1))").fetchall()[0][0]
    assert dim == 384
    # semantic search finds items of the matching category
    cat = store.sql("SELECT category FROM items GROUP BY 1 ORDER BY count(*) DESC LIMIT 1").fetchall()[0][0]
    hits = store.sql(
        "SELECT category FROM items ORDER BY array_cosine_similarity(semantic_vector(item_id), embed(?)) DESC LIMIT 3",
        [f"{cat} products"]).fetchall()
    assert any(h[0] == cat for h in hits)
    v = np.array(store.sql("SELECT embed('space opera')").fetchall()[0][0])
    assert abs(np.linalg.norm(v) - 1) < 1e-4
    recs = store.recommend(1, 5)
    assert len(recs) == 5
    r = store.refresh(since="all", epochs=2)
    assert r["version"] == 2
    # a changed description re-encodes exactly that item
    store.ingest("items", pl.DataFrame({"item_id": [1], "description": ["a completely new description"]}))
    again = store.encode()
    assert (again["stale"], again["encoded"]) == (1, 1)
    store.close()
