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
    assert out.encoded == 80 and out.version == 1
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
    assert r.version == 2
    # a changed description re-encodes exactly that item
    store.ingest("items", pl.DataFrame({"item_id": [1], "description": ["a completely new description"]}))
    again = store.encode()
    assert (again.stale, again.encoded) == (1, 1)
    store.close()


@pytest.mark.slow
def test_real_encoder_finetune(tmp_path, shop_frames):
    """`refresh --finetune-encoder` on the real default encoder: a MiniLM copy with
    a new id, saved as safetensors, every item re-encoded with it."""
    from safetensors.numpy import load_file

    from dynstore.encoders.cache import store_encoder

    store = dynstore.init(tmp_path / "s", **DEMO_RULES)
    for kind in ("users", "items", "interactions"):
        store.ingest(kind, shop_frames[kind])
    store.encode()
    base = store_encoder(store.catalog)
    out = store.refresh(since="all", epochs=2, finetune_encoder=True, finetune_steps=3, tolerance=1.0)
    ft = out.finetune
    assert out.status == "current" and ft["steps"] == 3 and ft["encoder"] != base.id
    saved = load_file(ft["path"] + "/model.safetensors")
    original = load_file(str(base.path / "model.safetensors"))
    changed = {k for k in saved if not np.array_equal(saved[k], original[k])}
    assert changed and all(".layer.4." in k or ".layer.5." in k for k in changed)
    assert store.config.model == "encoders/ft-1"
    assert store.sql("SELECT count(*) FROM stale_items").fetchall()[0][0] == 0
    # the fine-tuned encoder embeds text, and close to the original (3 small steps)
    v = np.array(store.sql("SELECT embed('red running shoes')").fetchall()[0][0])
    cos = float(v @ base.encode(["red running shoes"])[0])
    assert 0.9 < cos < 0.99999
    store.close()
