"""Consistency checks of a store on disk, shared by the process-level reliability tests.

:func:`check_store` opens a store the way a new process would and checks what
the reliability contract promises after any crash: it opens, every table
reads, the registry has one current version whose files load, every version
in the registry has its complete embeddings and nothing else is visible, the
config and the registry agree on the encoder, and serving answers.
"""
from __future__ import annotations

import json
from pathlib import Path

import dynstore


def shop_store(path, files, *, model: str = "fake", encode: bool = True, interactions=None):
    """A store at ``path`` with the sample shop's files (``shop_files``) ingested, the
    shop's labelling rules, and (``encode``) version 1; ``interactions`` replaces the
    interactions file (a DataFrame). Returns it open."""
    from dynstore.demo import DEMO_RULES

    s = dynstore.init(path, model=model, **DEMO_RULES)
    s.ingest("users", files / "users.parquet")
    s.ingest("items", files / "items.csv")
    s.ingest("interactions", files / "interactions.parquet" if interactions is None else interactions)
    if encode:
        s.encode()
    return s


def table_rows(store, name: str) -> list[tuple]:
    """Every row of a view, in a stable order (to compare contents before and after)."""
    return store.sql(f"SELECT * FROM {name} ORDER BY ALL").fetchall()


def contents(path) -> dict:
    """Full contents of the three tables and the registry (minus timestamps it sets itself)."""
    with dynstore.connect(path, read_only=True) as s:
        out = {t: table_rows(s, t) for t in ("interactions", "items", "users")}
        out["versions"] = s.sql("SELECT version, status, verdict FROM versions ORDER BY version").fetchall()
    return out


def check_store(path, *, users=(1, 2, 3), new_encoder: bool = False) -> dict:
    """Assert the store at ``path`` is whole; return a summary (counts, current version).
    ``new_encoder``: `config --model` changed the encoder; the current version may be
    one of the old encoder (it is served until a version of the new one exists)."""
    from dynstore.encoders.cache import encoder_info
    from dynstore.storage.registry import list_versions
    from dynstore.versions.embeddings import load_version

    with dynstore.connect(path) as s:
        assert not getattr(s.config, "switch_version", 0), "an encoder switch is left pending after resolution"
        summary = {t: s.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("interactions", "items", "users")}
        summary["stale"] = s.sql("SELECT count(*) FROM stale_items").fetchall()[0][0]
        rows = list_versions(s.catalog)
        summary["versions"] = [r["version"] for r in rows]
        current = [r for r in rows if r["status"] == "current"]
        if not rows:
            summary["current"] = None
            assert s.sql("SELECT count(*) FROM item_embeddings_all").fetchall()[0][0] == 0
            return summary
        assert len(current) == 1, f"{len(current)} current versions"
        cur = current[0]
        summary["current"] = cur["version"]
        # every registered version is whole: its files, one embedding row per item, no other rows
        per_version = dict(s.sql("SELECT version, count(*) FROM item_embeddings_all GROUP BY 1").fetchall())
        dups = s.sql("SELECT count(*) FROM (SELECT version, item_id FROM item_embeddings_all "
                     "GROUP BY ALL HAVING count(*) > 1)").fetchall()[0][0]
        assert dups == 0, "an item appears twice in one version"
        assert set(per_version) == {r["version"] for r in rows}, (per_version, summary["versions"])
        for r in rows:
            for suffix in (".json", ".safetensors"):
                assert (Path(path) / "models" / f"v{r['version']}{suffix}").is_file()
            meta = json.loads((Path(path) / "models" / f"v{r['version']}.json").read_text())
            assert meta["version"] == r["version"]
            want = r["counts"].get("items")
            if want is not None:
                assert per_version[r["version"]] == want, (r["version"], per_version[r["version"]], want)
        lv = load_version(s.catalog)
        assert lv.version == cur["version"]
        # the config and the registry agree on the encoder
        if not new_encoder or encoder_info(s.catalog)[0] in {r["encoder"] for r in rows}:
            assert encoder_info(s.catalog)[0] == cur["encoder"], (encoder_info(s.catalog)[0], cur["encoder"],
                                                                  s.config.model)
        for u in users:
            recs = s.recommend(u, 5)
            assert len(recs) == 5 and all(0.0 <= r["score"] <= 1.0 for r in recs)
        got = s.sql(f"SELECT recommend({users[0]}, 5)").fetchall()[0][0]
        assert [r["item_id"] for r in got] == [r["item_id"] for r in s.recommend(users[0], 5)]
    return summary
