"""Every CLI command through click's CliRunner: exit codes and messages."""
from __future__ import annotations

import json


import dynstore
from dynstore.cli import main
from dynstore.config import CONFIG_NAME

from dynstore.demo import DEMO_RULES as SHOP_RULES


def run(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_help_has_examples(runner):
    for cmd in ("init", "ingest", "encode", "refresh", "recommend", "sql", "versions", "rollback", "eval", "demo",
                "config"):
        r = run(runner, cmd, "--help")
        assert r.exit_code == 0, cmd
        assert "Usage:" in r.output
    assert "Examples" in run(runner, "ingest", "--help").output


def test_init_and_rejections(runner, tmp_path):
    path = tmp_path / "s"
    r = run(runner, "init", path, "--model", "fake", "--positive", "value >= 4")
    assert r.exit_code == 0 and "created store" in r.output
    assert "value >= 4" in (path / CONFIG_NAME).read_text()
    assert "already exists and is not empty" in one_line_error(run(runner, "init", path))
    assert "is not a valid rule" in one_line_error(run(runner, "init", tmp_path / "t", "--positive", "nonsense >"))
    assert "is not a valid rule" in one_line_error(run(runner, "init", tmp_path / "u", "--negative", "no_such_col = 1"))
    assert "is not a dynstore store" in one_line_error(run(runner, "versions", tmp_path))
    assert "does not exist" in one_line_error(run(runner, "versions", tmp_path / "missing"))


def test_newer_format_rejected(runner, tmp_path):
    path = tmp_path / "s"
    dynstore.init(path, model="fake")
    cfg = path / CONFIG_NAME
    cfg.write_text(cfg.read_text().replace("format_version = 1", "format_version = 99"))
    assert "newer than this dynstore" in one_line_error(run(runner, "sql", path, "SELECT 1"))


def test_ingest_cli(runner, tmp_path, shop_files):
    path = tmp_path / "s"
    dynstore.init(path, model="fake", **SHOP_RULES)
    r = run(runner, "ingest", path, "items", shop_files / "items.csv")
    assert r.exit_code == 0 and "ingested 80 rows into items" in r.output
    r = run(runner, "ingest", path, "interactions", shop_files / "interactions.parquet", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["kind"] == "interactions"
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,ts\n1,2,2025-01-01\n1,,2025-01-01\n")
    msg = one_line_error(run(runner, "ingest", path, "interactions", bad))
    assert "bad.csv: row 2, column item_id" in msg
    assert "NEW=OLD" in run(runner, "ingest", path, "items", bad, "--map", "oops").output
    assert run(runner, "ingest", path, "items", bad, "--map", "oops").exit_code == 2
    assert run(runner, "ingest", path, "widgets", bad).exit_code == 2


def test_sql_formats_and_errors(runner, loaded):
    p = loaded.path
    r = run(runner, "sql", p, "SELECT event, count(*) AS n FROM interactions GROUP BY 1 ORDER BY 1", "--format", "json")
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert {x["event"] for x in rows} >= {"impression", "click"}
    r = run(runner, "sql", p, "SELECT 1 AS a, 'x' AS b", "--format", "csv")
    assert r.output.splitlines() == ["a,b", "1,x"]
    r = run(runner, "sql", p, "SELECT 42 AS answer")
    assert "answer" in r.output and "42" in r.output and "(1 row)" in r.output
    assert "Error:" in one_line_error(run(runner, "sql", p, "SELEC nonsense"))


def test_sql_read_only_cannot_touch_files(runner, loaded, tmp_path):
    target = tmp_path / "leak.csv"
    msg = one_line_error(run(runner, "sql", loaded.path, "--read-only", f"COPY (SELECT 1) TO '{target}'"))
    assert "disabled" in msg.lower() or "permission" in msg.lower()
    assert not target.exists()
    msg = one_line_error(run(runner, "sql", loaded.path, "--read-only", "SELECT * FROM read_csv('/etc/passwd')"))
    assert "permission" in msg.lower() or "disabled" in msg.lower()
    msg = one_line_error(run(runner, "sql", loaded.path, "--read-only", "SET enable_external_access = true"))
    before = loaded.sql("SELECT count(*) FROM interactions").fetchall()[0][0]
    one_line_error(run(runner, "sql", loaded.path, "--read-only", "SELECT log_impressions(1, [1, 2])"))
    assert loaded.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == before


def test_sql_prompt_reads_stdin(runner, loaded):
    r = runner.invoke(main, ["sql", str(loaded.path)], input="SELECT count(*) AS n\nFROM items;\n.quit\n")
    assert r.exit_code == 0 and "80" in r.output


def test_encode_recommend_versions_rollback_cli(runner, loaded):
    p = loaded.path
    r = run(runner, "encode", p, "--json")
    out = json.loads(r.output)
    assert r.exit_code == 0 and out["stale"] == 80 and out["version"] == 1
    r = run(runner, "encode", p)
    assert "0 stale" in r.output
    r = run(runner, "recommend", p, 1, "-k", 3, "--json")
    recs = json.loads(r.output)
    assert r.exit_code == 0 and [x["rank"] for x in recs] == [1, 2, 3] and recs[0]["title"]
    r = run(runner, "recommend", p, 1, "-k", 0)
    assert r.exit_code == 2 and "0 is not in the range 1<=x<=10000" in r.output
    r = run(runner, "recommend", p, "abc")
    assert r.exit_code == 2 and "integers" in r.output
    r = run(runner, "versions", p)
    assert r.exit_code == 0 and "current" in r.output
    r = run(runner, "rollback", p, 7)
    assert "no version 7" in one_line_error(r)


def test_refresh_eval_cli(runner, encoded):
    p = encoded.path
    r = run(runner, "refresh", p, "--since", "all", "--epochs", 2, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["version"] == 2 and set(out["metrics"]) == {"candidate", "current", "rule"}
    assert ("published" in out) == (out["status"] == "rejected")
    r = run(runner, "refresh", p, "--since", "all", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["status"] == "noop"
    r = run(runner, "eval", p, "--version", 1, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["version"] == 1
    r = run(runner, "rollback", p, 1)
    assert r.exit_code == 0 and "version 1 is current" in r.output
    assert "--since" in one_line_error(run(runner, "refresh", p, "--since", "fortnight"))


def test_config_cli(runner, store):
    r = run(runner, "config", store.path, "--behaviour-summary")
    assert r.exit_code == 0 and "behaviour_summary  True" in r.output
    assert "is not a valid rule" in one_line_error(run(runner, "config", store.path, "--positive", "1 +"))


def test_busy_store_exits_3(runner, loaded, hold_lock):
    with hold_lock(loaded.path, "encode"):
        msg = one_line_error(run(runner, "encode", loaded.path), code=3)
        assert "busy" in msg and "another encode" in msg


def test_demo_cli(runner, tmp_path):
    r = run(runner, "demo", tmp_path / "d", "--size", "tiny", "--model", "fake")
    assert r.exit_code == 0, r.output
    for needle in ("dynstore init", "recommendations for user", "refresh", "versions", "semantic search"):
        assert needle in r.output
