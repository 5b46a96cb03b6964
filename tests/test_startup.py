"""Start-up: nothing loads torch, transformers or the encoder unless a statement needs a vector."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dynstore

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a fresh interpreter, then reports which heavy modules it imported.
_PROBE = """
import json, sys
from dynstore.cli import main
try:
    main({args!r}, standalone_mode=False)
finally:
    heavy = ("torch", "transformers", "duckdb", "numpy", "lance", "pandas")
    print("\\nMODULES " + json.dumps(sorted(m for m in heavy if m in sys.modules)), flush=True)
"""


def _cli_modules(*args) -> tuple[str, list[str]]:
    res = subprocess.run([sys.executable, "-c", _PROBE.format(args=[str(a) for a in args])],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    out, _, mods = res.stdout.rpartition("MODULES ")
    return out, json.loads(mods)


def test_import_dynstore_is_light():
    code = ("import sys, dynstore\n"
            "print(sorted(m for m in ('torch', 'transformers', 'duckdb', 'numpy', 'lance') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip() == "[]"


def test_help_imports_no_engine():
    out, mods = _cli_modules("--help")
    assert "Usage:" in out and mods == []


@pytest.fixture
def minilm_store(tmp_path, shop_frames):
    """A store configured with the real MiniLM encoder, nothing encoded."""
    s = dynstore.init(tmp_path / "s")
    s.ingest("items", shop_frames["items"])
    s.ingest("interactions", shop_frames["interactions"])
    return s


def test_sql_without_vectors_imports_neither_torch_nor_transformers(minilm_store):
    out, mods = _cli_modules("sql", minilm_store.path, "SELECT 1 AS one; SELECT count(*) AS n FROM items")
    assert "one" in out and "80" in out
    assert "torch" not in mods and "transformers" not in mods and "pandas" not in mods
    # the views that depend on the encoder's id and dimension work too, still without the model
    out, mods = _cli_modules("sql", minilm_store.path, "SELECT count(*) AS stale FROM stale_items")
    assert "80" in out and "torch" not in mods and "transformers" not in mods
    out, mods = _cli_modules("inspect", minilm_store.path, "--json")
    assert json.loads(out)["encoder"]["dim"] == 384 and "torch" not in mods


def test_init_records_the_encoder_identity(minilm_store):
    cfg = minilm_store.config
    assert cfg.encoder_id.startswith("hf:all-MiniLM-L6-v2:") and cfg.encoder_dim == 384 and cfg.encoder_fingerprint
    # a reader takes it from the config: no hashing, no loading
    from dynstore.encoders import cache as semantic

    semantic._INFO.clear()
    with dynstore.connect(minilm_store.path, read_only=True) as reader:
        assert semantic.encoder_info(reader.catalog) == (cfg.encoder_id, 384)


def test_stale_fingerprint_is_not_trusted(store):
    """A recorded id whose fingerprint no longer matches (another model, edited config) is recomputed."""
    from dynstore.encoders import cache as semantic
    from dynstore.storage.config import CONFIG_NAME

    cfg_file = store.path / CONFIG_NAME
    cfg_file.write_text(cfg_file.read_text().replace('model = "fake"', 'model = "fake:8"'))
    semantic._INFO.clear()
    with dynstore.connect(store.path, read_only=True) as reader:
        assert semantic.encoder_info(reader.catalog) == ("fake:8:v1", 8)


def test_vector_statement_loads_the_encoder_when_needed(encoded):
    # the fake encoder needs no torch either; what matters is that embed() gets a real encoder
    rows = encoded.sql("SELECT len(embed('red shoes'))").fetchall()
    assert rows == [(32,)]


# ----------------------------------------------------------------- issue 23 item 1, issue 25 item 4

#: modules of the write path: a reader (recommend, SELECT ...) must import none of them
WRITE_PATH = ("dynstore.data.ingest", "dynstore.model.training", "dynstore.data.compaction", "dynstore.model.finetune",
              "dynstore.engines.ray", "dynstore.versions.refresh", "torch", "transformers")

# Runs the CLI in a fresh interpreter; reports which of ``watch`` it imported.
_WATCH_PROBE = """
import json, sys
from dynstore.cli import main
try:
    main({args!r}, standalone_mode=False)
finally:
    print("\\nMODULES " + json.dumps(sorted(m for m in {watch!r} if m in sys.modules)), flush=True)
"""


def _run_watching(watch, *args) -> tuple[str, str, list[str]]:
    """(stdout, stderr, the modules of ``watch`` imported) of one CLI command in a fresh process."""
    code = _WATCH_PROBE.format(args=[str(a) for a in args], watch=tuple(watch))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    out, _, mods = res.stdout.rpartition("MODULES ")
    return out, res.stderr, json.loads(mods)


def _fill_cache_without_the_model(store) -> None:
    """Give every item of a MiniLM store a cached vector (random, unit) without loading MiniLM:
    the state of a store right after `encode`, at no cost."""
    import numpy as np

    from dynstore.data.semantic import item_docs
    from dynstore.encoders.cache import encoder_info, write_cache

    enc_id, dim = encoder_info(store.catalog)
    hashes = sorted({h for h, _ in item_docs(store.catalog).values()})
    vecs = np.random.default_rng(0).normal(size=(len(hashes), dim)).astype(np.float32)
    write_cache(store.catalog, enc_id, hashes, vecs / np.linalg.norm(vecs, axis=1, keepdims=True))


def test_encode_with_nothing_stale_loads_no_encoder(minilm_store):
    """MiniLM configured, every document cached: `encode` says 0 stale and imports neither
    torch nor transformers, nor announces a model load."""
    _fill_cache_without_the_model(minilm_store)
    out, err, mods = _run_watching(("torch", "transformers"), "encode", minilm_store.path)
    assert "80 items: 0 stale, 0 documents encoded, 80 reused" in out
    assert mods == [] and "loading encoder" not in err
    out, err, mods = _run_watching(("torch", "transformers"), "encode", minilm_store.path, "--json")
    assert json.loads(out)["device"] == "none" and mods == []


def test_encode_with_stale_items_says_the_encoder_loads(minilm_store):
    """When a document must be encoded, the load is announced on stderr before it starts
    (checked without paying for it: the notice fires, then the load fails fast)."""
    from dynstore.encoders import register_encoder, set_load_notice
    from dynstore.encoders.registry import get_encoder

    seen: list[str] = []

    def broken(**_):
        raise RuntimeError("not loaded in this test")

    register_encoder("slow-model", broken)
    set_load_notice(seen.append)
    try:
        with pytest.raises(RuntimeError):
            get_encoder("slow-model")
        get_encoder("fake:4")  # the fake encoder costs nothing: no notice
    finally:
        set_load_notice(None)
    assert seen == ["loading encoder slow-model ..."]


def test_refresh_with_nothing_to_encode_loads_no_encoder(minilm_store):
    """A MiniLM store whose documents are all cached: `refresh` trains (torch, for the
    training) but never loads the encoder (no transformers, no notice); a second refresh
    has nothing to do and imports neither."""
    _fill_cache_without_the_model(minilm_store)
    out, err, mods = _run_watching(("torch", "transformers"), "refresh", minilm_store.path, "--json", "--epochs", 1)
    assert json.loads(out)["status"] in ("current", "candidate", "rejected", "unchanged")
    assert "transformers" not in mods and "loading encoder" not in err
    out, err, mods = _run_watching(("torch", "transformers"), "refresh", minilm_store.path)
    assert "nothing to do" in out and mods == []


def test_read_path_imports_no_write_path(encoded):
    """recommend and SELECT (recommend, count) import no module of the write path."""
    trained = encoded
    user = trained.sql("SELECT min(user_id) FROM interactions").fetchall()[0][0]
    for args in (("recommend", trained.path, user),
                 ("sql", trained.path, f"SELECT recommend({user}, 5)"),
                 ("sql", trained.path, "SELECT count(*) FROM items")):
        out, _, mods = _run_watching(WRITE_PATH, *args)
        assert out.strip() and mods == [], (args, mods)


#: what serving needs and a plain SELECT does not: a statement that calls none of dynstore's
#: functions imports none of them (the built-in functions import them when they first run)
SERVING = ("dynstore.serving.recommend", "dynstore.serving.state", "dynstore.model.fusion",
           "dynstore.versions.embeddings", "dynstore.versions.window", "dynstore.inspection")


def test_plain_select_imports_no_serving_module(encoded):
    out, _, mods = _run_watching(SERVING, "sql", encoded.path, "SELECT count(*) AS n FROM items")
    assert "80" in out and mods == []
    out, _, mods = _run_watching(SERVING, "sql", encoded.path, "SELECT len(recommend(1, 3)) AS n")
    assert "3" in out and "dynstore.serving.recommend" in mods  # imported when the function runs
