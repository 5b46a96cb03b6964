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
    from dynstore import semcache as semantic

    semantic._INFO.clear()
    with dynstore.connect(minilm_store.path, read_only=True) as reader:
        assert semantic.encoder_info(reader.catalog) == (cfg.encoder_id, 384)


def test_stale_fingerprint_is_not_trusted(store):
    """A recorded id whose fingerprint no longer matches (another model, edited config) is recomputed."""
    from dynstore import semcache as semantic
    from dynstore.config import CONFIG_NAME

    cfg_file = store.path / CONFIG_NAME
    cfg_file.write_text(cfg_file.read_text().replace('model = "fake"', 'model = "fake:8"'))
    semantic._INFO.clear()
    with dynstore.connect(store.path, read_only=True) as reader:
        assert semantic.encoder_info(reader.catalog) == ("fake:8:v1", 8)


def test_vector_statement_loads_the_encoder_when_needed(encoded):
    # the fake encoder needs no torch either; what matters is that embed() gets a real encoder
    rows = encoded.sql("SELECT len(embed('red shoes'))").fetchall()
    assert rows == [(32,)]
