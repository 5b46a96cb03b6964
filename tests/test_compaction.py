"""Compaction keeps fragments and versions bounded; orphans of killed refreshes are hidden and removed."""
from __future__ import annotations

import json
import os

import lance
import numpy as np
import pyarrow as pa
import pytest

from dynstore.data.compaction import dataset_stats


def _table(store, name):
    return store.sql(f"SELECT * FROM {name} ORDER BY ALL").fetchall()


def test_logged_impressions_stay_bounded(encoded):
    encoded.configure(compact_fragments=8, retain_seconds=0)
    before = _table(encoded, "interactions")
    uri = encoded.catalog.uri("interactions")
    peak = 0
    for n in range(100):
        assert encoded.sql(f"SELECT log_impressions({1 + n % 7}, [1, 2])").fetchall() == [(2,)]
        stats = dataset_stats(lance.dataset(uri), uri)
        peak = max(peak, stats["fragments"])
    # past 8 fragments the writer compacts: never more than 9 (was: one per call, 101)
    assert peak <= 9
    assert dataset_stats(lance.dataset(uri), uri)["versions"] <= 10
    after = _table(encoded, "interactions")
    assert len(after) == len(before) + 200
    assert encoded.recommend(1, 5)


def test_compact_command_keeps_contents_and_shrinks(encoded, runner):
    from dynstore.cli import main

    for n in range(10):
        encoded.log_impressions(1, [n + 1])
    encoded.refresh(since="all", epochs=1)
    before = {name: _table(encoded, name) for name in ("interactions", "items", "users", "item_embeddings_all")}
    recs = encoded.recommend(3, 10)
    result = runner.invoke(main, ["compact", str(encoded.path), "--retain-seconds", "0", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["datasets"]["interactions"]["fragments"] == [11, 1]
    for name, rows in before.items():
        assert _table(encoded, name) == rows
    assert encoded.recommend(3, 10) == recs
    versions = out["datasets"]["versions"]["versions"]
    assert versions[1] < versions[0]


def test_orphans_of_a_killed_refresh_are_hidden_then_removed(encoded):
    """A refresh killed after writing its embeddings and model files but before the
    registry commit leaves rows nobody may see: the view hides them, compact removes them."""
    emb = encoded.catalog.dataset("embeddings")
    rows = emb.to_table(filter="version = 1")
    orphan = rows.set_column(0, "version", pa.array(np.full(rows.num_rows, 7), pa.int64()))
    lance.write_dataset(orphan, encoded.catalog.uri("embeddings"), mode="append")
    (encoded.path / "models" / "v7.json").write_text("{}")
    (encoded.path / "models" / "v7.safetensors").write_bytes(b"")
    assert encoded.sql("SELECT DISTINCT version FROM item_embeddings_all").fetchall() == [(1,)]
    out = encoded.compact(retain_seconds=0)
    assert out.orphans["embedding_rows"] == rows.num_rows
    assert sorted(out.orphans["files"]) == ["models/v7.json", "models/v7.safetensors"]
    assert encoded.catalog.dataset("embeddings").count_rows() == rows.num_rows
    # numbering goes on from the registry (the orphan's number is free again)
    assert encoded.refresh(since="all", epochs=1).version == 2


def test_compaction_skips_a_busy_dataset(encoded, hold_lock):
    with hold_lock(encoded.path, "ingest-interactions"):
        out = encoded.compact(retain_seconds=0)
    assert "interactions" in out.skipped and "items" in out.datasets


@pytest.mark.parametrize("limit", [0])
def test_compaction_off(encoded, limit):
    encoded.configure(compact_fragments=limit)
    for n in range(5):
        encoded.log_impressions(1, [n + 1])
    uri = encoded.catalog.uri("interactions")
    assert dataset_stats(lance.dataset(uri), uri)["fragments"] == 6
    assert os.path.isdir(uri)


def test_default_compact_never_grows_the_store(encoded, runner):
    """With the default retention a merge would keep both copies of every rewritten
    fragment for readers (the store grew 2x, issue 23): compact keeps the fragments,
    drops only what no reader may need, and says what it kept and reclaimed."""
    from dynstore.cli import main

    for n in range(6):
        encoded.log_impressions(1, [n + 1])
    encoded.ingest("items", encoded.sql("SELECT * EXCLUDE (title), title || '!' AS title FROM items LIMIT 5").to_arrow_table())
    encoded.encode()
    storage = encoded.catalog.storage

    def size():  # the store's bytes without its lock files (a writer's pid each)
        return storage.size("") - storage.size("locks")

    before, rows = size(), _table(encoded, "interactions")
    result = runner.invoke(main, ["compact", str(encoded.path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert size() <= before and out["bytes"] == [before, size()] and out["reclaimed"] >= 0
    assert out["kept"]["interactions"] == {"versions": 7, "fragments": 7}  # readers' files stay
    assert out["datasets"]["interactions"]["fragments"] == [7, 7] and _table(encoded, "interactions") == rows
    text = runner.invoke(main, ["compact", str(encoded.path)]).output
    assert "reclaimed" in text and "fragments not merged in interactions" in text and "--retain-seconds 0" in text
    # without a retention the same store merges and shrinks
    out = encoded.compact(retain_seconds=0)
    assert out.datasets["interactions"]["fragments"] == [7, 1] and out.reclaimed > 0 and out.kept == {}
