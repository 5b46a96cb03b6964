"""The listed failure cases end in a one-line DynstoreError (exit 1, or 3 when busy), never a traceback."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

import dynstore
from dynstore.errors import (DynstoreError, SqlError, StorageError, StoreBusy, StoreCorrupt, StoreFormatError)


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "dynstore", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, LANCE_LOG="error", **(env or {})), timeout=300, **kw)


def _one_line(proc, code=1):
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- damaged version files ----------------------------------------------------------------------

def _damage(path, how):
    models = path / "models"
    if how == "truncated safetensors":
        f = models / "v1.safetensors"
        f.write_bytes(f.read_bytes()[:40])
    elif how == "malformed json":
        (models / "v1.json").write_text('{"model": ')
    elif how == "deleted model file":
        (models / "v1.safetensors").unlink()
    elif how == "wrong tensor shapes":
        from safetensors.numpy import load_file, save_file

        t = load_file(str(models / "v1.safetensors"))
        t["W"] = np.zeros((3, 5), np.float32)
        save_file(t, str(models / "v1.safetensors"))
    elif how == "deleted embeddings":
        import shutil

        shutil.rmtree(path / "embeddings.lance")
    return {"truncated safetensors": "v1.safetensors", "malformed json": "v1.json",
            "deleted model file": "v1.safetensors", "wrong tensor shapes": "v1.safetensors",
            "deleted embeddings": "embeddings.lance"}[how]


@pytest.mark.parametrize("how", ["truncated safetensors", "malformed json", "deleted model file",
                                 "wrong tensor shapes", "deleted embeddings"])
def test_damaged_version_files(encoded, how):
    name = _damage(encoded.path, how)
    with dynstore.connect(encoded.path) as s:
        with pytest.raises(StoreCorrupt, match=rf"{re.escape(name)}: version 1 cannot be loaded .*rollback"):
            s.recommend(1, 5)
    line = _one_line(_cli("recommend", encoded.path, 1))
    assert name in line
    line = _one_line(_cli("sql", encoded.path, "SELECT recommend(1, 5)"))
    assert name in line


def test_config_values_are_checked(store):
    cfg = store.path / "dynstore.toml"
    cfg.write_text(cfg.read_text().replace("max_length = 256", "max_length = 'abc'"))
    with pytest.raises(StoreFormatError, match=r"encoder.max_length = 'abc' is not an integer"):
        dynstore.connect(store.path)
    assert "max_length" in _one_line(_cli("sql", store.path, "SELECT 1"))


def test_a_rule_naming_a_missing_column(loaded):
    cfg = loaded.path / "dynstore.toml"
    cfg.write_text(re.sub(r'positive = ".*"', 'positive = "rating >= 4"', cfg.read_text()))
    with dynstore.connect(loaded.path) as s:
        assert s.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == 2049  # what needs no label works
    line = _one_line(_cli("sql", loaded.path, "SELECT count(*) FROM interactions WHERE label = 1"))
    assert "rating" in line and "dynstore config --positive" in line
    assert _cli("encode", loaded.path).returncode == 0  # documents need no label
    line = _one_line(_cli("recommend", loaded.path, 1))  # serving reads labelled events
    assert "rating" in line and "dynstore config --positive" in line
    assert "rating" in _one_line(_cli("refresh", loaded.path, "--since", "all"))


# -- disk full ---------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent('''
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    from dynstore.cli import main
    main(sys.argv[2:], prog_name="dynstore")
''')


@pytest.mark.parametrize("command", [["encode"], ["refresh", "--since", "all", "--epochs", "1", "--force"]])
def test_disk_full_during_encode_and_refresh(encoded, command):
    """No file may grow past a few KB (RLIMIT_FSIZE: the closest to a full disk a test can get
    without a mount); the command fails in one line and the store keeps its last commit."""
    from store_checks import check_store, contents

    if command == ["encode"]:
        encoded.ingest("items", pl.DataFrame({"item_id": list(range(900, 1100)),
                                              "title": [f"a long new title {i} " * 20 for i in range(200)]}))
    before = contents(encoded.path)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, "4096", command[0], str(encoded.path), *command[1:]],
                          capture_output=True, text=True, env=dict(os.environ, LANCE_LOG="error"), timeout=300)
    line = _one_line(proc)
    assert "could not write" in line and "too large" in line.lower(), line
    assert contents(encoded.path) == before
    check_store(encoded.path)


# -- empty candidates, write functions, busy ----------------------------------------------------

def test_write_function_cannot_be_optimised_away(encoded):
    n = encoded.sql("SELECT count(*) FROM interactions").fetchall()[0][0]
    for q in ["SELECT count(*) FROM (SELECT log_impressions(1, [2, 3]))",
              "WITH x AS (SELECT log_impressions(1, [2]) AS n) SELECT 1 FROM x",
              "SELECT 1 WHERE log_impressions(1, [2]) > 0",
              "CREATE TABLE t AS SELECT log_impressions(1, [2])"]:
        with pytest.raises(SqlError, match="outermost SELECT"):
            encoded.sql(q)
    assert encoded.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == n
    assert encoded.sql("SELECT log_impressions(1, [2, 3])").fetchall() == [(2,)]
    con = encoded.connection()  # a raw connection cannot check where the call stands: refused
    with pytest.raises(Exception, match="log_impressions.*writes to the store"):
        con.sql("SELECT log_impressions(1, [2])").fetchall()
    assert encoded.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == n + 2
    line = _one_line(_cli("sql", encoded.path, "SELECT count(*) FROM (SELECT log_impressions(1, [2]))"))
    assert "outermost SELECT" in line


def test_log_impressions_in_sql_under_a_busy_lock_exits_3(encoded, hold_lock):
    with hold_lock(encoded.path, "ingest-interactions"):
        line = _one_line(_cli("sql", encoded.path, "SELECT log_impressions(1, [2, 3])"), code=3)
    assert "busy" in line


def test_huge_integer_id_names_file_row_and_column(store, tmp_path):
    f = tmp_path / "ev.csv"
    f.write_text("user_id,item_id,ts\n1,2,2025-01-01\n1,99999999999999999999999,2025-01-01\n")
    with pytest.raises(DynstoreError, match=r"ev\.csv: row 2, column item_id: .* outside the 64-bit"):
        store.ingest("interactions", f)


def test_storage_error_is_an_oserror():
    assert issubclass(StorageError, OSError) and issubclass(StoreBusy, BlockingIOError)
    assert issubclass(StoreCorrupt, StoreFormatError)


def test_kill_of_a_reader_is_harmless(encoded):
    """A reader killed mid-statement leaves nothing behind (it never wrote)."""
    proc = subprocess.Popen([sys.executable, "-c", "import dynstore, sys\n"
                             f"s = dynstore.connect({str(encoded.path)!r})\n"
                             "print('go', flush=True)\n"
                             "while True: s.sql('SELECT recommend(user_id, 10) FROM users').fetchall()"],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, LANCE_LOG="error"))
    assert proc.stdout.readline().strip() == "go"
    locks = sorted(p.name for p in (encoded.path / "locks").iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (encoded.path / "locks").iterdir()) == locks
    assert encoded.recommend(1, 3)
    assert json.dumps(encoded.inspect().to_dict(), default=str)
