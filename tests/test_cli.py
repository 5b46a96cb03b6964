"""Every CLI command through click's CliRunner: exit codes and messages.

The commands are read from the click group itself (``main.commands``): a new
command fails :func:`test_every_command_is_exercised` until a test here runs
it (marked with :func:`exercises`, which checks that the test really does).
"""
from __future__ import annotations

import functools
import json
import re

import pytest

import dynstore
from dynstore.cli import main
from dynstore.storage.config import CONFIG_NAME

from dynstore.demo import DEMO_RULES as SHOP_RULES


COMMANDS = sorted(main.commands)
#: command -> the test that exercises it (filled by @exercises at import)
EXERCISED: dict[str, str] = {}
#: the commands run() invoked in the running test
RAN: list[str] = []


def run(runner, *args):
    RAN.extend(str(a) for a in args[:1])
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def exercises(*names):
    """Mark a test as exercising these commands; it fails unless it runs each of them."""
    def mark(fn):
        for name in names:
            EXERCISED.setdefault(name, fn.__name__)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            RAN.clear()
            fn(*args, **kwargs)
            assert set(names) <= set(RAN), f"{fn.__name__} never runs {sorted(set(names) - set(RAN))}"

        return checked

    return mark


def sql_error(result):
    """A SQL error: one line, then at most DuckDB's position (``LINE n: ...`` and the caret under it)."""
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert len(lines) == 1 or (len(lines) == 3 and lines[1].startswith("LINE ") and lines[2].strip("^ ") == ""), \
        result.output
    return lines[0]


def one_line_error(result, code=1):
    assert result.exit_code == code, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_examples(runner, name):
    r = run(runner, name, "--help")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Usage: ") and f" {name} " in r.output.splitlines()[0]
    assert "Examples:" in r.output and f"dynstore {name}" in r.output.split("Examples:")[1]


def test_every_command_is_exercised():
    assert sorted(EXERCISED) == COMMANDS, f"commands no test runs: {sorted(set(COMMANDS) - set(EXERCISED))}"


@exercises("init", "versions")
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


@exercises("ingest")
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


@exercises("sql")
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
    r = run(runner, "sql", p, "SELEC nonsense")
    assert "Error:" in sql_error(r) and "LINE 1: SELEC nonsense\n        ^" in r.output


def test_sql_read_only_cannot_touch_files(runner, loaded, tmp_path):
    target = tmp_path / "leak.csv"
    msg = one_line_error(run(runner, "sql", loaded.path, "--read-only", f"COPY (SELECT 1) TO '{target}'"))
    assert "disabled" in msg.lower() or "permission" in msg.lower()
    assert not target.exists()
    msg = sql_error(run(runner, "sql", loaded.path, "--read-only", "SELECT * FROM read_csv('/etc/passwd')"))
    assert "permission" in msg.lower() or "disabled" in msg.lower()
    msg = one_line_error(run(runner, "sql", loaded.path, "--read-only", "SET enable_external_access = true"))
    before = loaded.sql("SELECT count(*) FROM interactions").fetchall()[0][0]
    one_line_error(run(runner, "sql", loaded.path, "--read-only", "SELECT log_impressions(1, [1, 2])"))
    assert loaded.sql("SELECT count(*) FROM interactions").fetchall()[0][0] == before


def test_sql_prompt_reads_stdin(runner, loaded):
    r = runner.invoke(main, ["sql", str(loaded.path)], input="SELECT count(*) AS n\nFROM items;\n.quit\n")
    assert r.exit_code == 0 and "80" in r.output


@exercises("encode", "recommend", "versions", "rollback")
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


@exercises("refresh", "eval", "rollback")
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


@exercises("config")
def test_config_cli(runner, store):
    r = run(runner, "config", store.path, "--behaviour-summary")
    assert r.exit_code == 0 and "set behaviour_summary = true" in r.output
    assert "behaviour_summary  True" in run(runner, "config", store.path).output
    assert "is not a valid rule" in one_line_error(run(runner, "config", store.path, "--positive", "1 +"))


@exercises("delete", "compact", "inspect")
def test_delete_compact_inspect_cli(runner, loaded):
    p = loaded.path
    r = run(runner, "delete", p, "users", "--where", "true", "--dry-run")
    assert r.exit_code == 0 and "would delete" in r.output and "(dry run: nothing deleted)" in r.output
    r = run(runner, "delete", p, "interactions", "--where", "label = -1", "--json")
    out = json.loads(r.output)
    assert r.exit_code == 0 and out["kind"] == "interactions" and out["deleted"] > 0 and "dry_run" not in out
    r = run(runner, "delete", p, "items", "--where", "item_id = 1")
    assert r.exit_code == 0 and "deleted 1 row from items (79 left" in r.output
    assert "interactions naming the deleted items stay" in r.output
    assert "not a condition over users" in one_line_error(run(runner, "delete", p, "users", "--where", "nope = 1"))
    r = run(runner, "compact", p, "--retain-seconds", 0)
    assert r.exit_code == 0 and "interactions: " in r.output and " fragments, " in r.output
    r = run(runner, "compact", p, "--json")
    assert r.exit_code == 0 and list(json.loads(r.output)) == ["datasets", "orphans", "encoders_removed", "skipped",
                                                                "retain_seconds", "kept", "bytes", "reclaimed"]
    r = run(runner, "inspect", p)
    assert r.exit_code == 0 and r.output.split()[:2] == ["key", "value"] and "tables.items.rows" in r.output
    assert run(runner, "compact", p, "-q").output == ""


def test_busy_store_exits_3(runner, loaded, hold_lock):
    with hold_lock(loaded.path, "encode"):
        msg = one_line_error(run(runner, "encode", loaded.path), code=3)
        assert "busy" in msg and "another encode" in msg


@exercises("demo")
def test_demo_cli(runner, tmp_path):
    r = run(runner, "demo", tmp_path / "d", "--size", "tiny", "--model", "fake")
    assert r.exit_code == 0, r.output
    for needle in ("dynstore init", "recommendations for user", "refresh", "versions", "semantic search"):
        assert needle in r.output
    store = tmp_path / "d" / "store"
    assert f"== the demo's store: {store} (kept after the demo)" in r.output
    assert f"the store is {store}." in r.output
    # the semantic search's heading is the query whose columns are printed under it
    heading, header = re.search(r"== semantic search: (SELECT .*)\n(.*)\n", r.output).groups()
    shown = re.match(r"SELECT (.*?) FROM", heading).group(1).split(", ")
    assert header.split() == shown


# -------------------------------------------------------------------------- conventions


def test_every_option_has_help_and_every_enum_is_a_choice(runner):
    import click

    for name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help" and not p.hidden:
                record = p.get_help_record(click.Context(cmd))
                assert record and record[1].strip(), f"{name} {p.opts} has no help text"
            if p.name in ("fmt", "size", "device", "kind", "input_format"):
                assert isinstance(p.type, click.Choice), f"{name} {p.name}"
        assert "Examples:" in (cmd.help or ""), f"{name} has no examples"


def test_formats_have_headers_and_nested_values_as_json(runner, encoded):
    p = encoded.path
    q = "SELECT 'a,1' AS id, [1, 2] AS l, {'x': 1.5} AS s, NULL AS n"
    r = run(runner, "sql", p, q, "--format", "csv")
    assert r.output.splitlines() == ["id,l,s,n", '"a,1","[1, 2]","{""x"": 1.5}",']
    r = run(runner, "sql", p, q, "--format", "tsv")
    assert r.output.splitlines()[0] == "id\tl\ts\tn" and '{""x"": 1.5}' in r.output
    r = run(runner, "sql", p, q, "--format", "jsonl")
    assert json.loads(r.output) == {"id": "a,1", "l": [1, 2], "s": {"x": 1.5}, "n": None}
    r = run(runner, "sql", p, q, "--json")
    assert json.loads(r.output) == [{"id": "a,1", "l": [1, 2], "s": {"x": 1.5}, "n": None}]
    r = run(runner, "sql", p, q, "--format", "markdown")
    assert r.output.splitlines()[:2] == ["| id | l | s | n |", "|---|---|---|---|"]
    r = run(runner, "sql", p, "SELECT recommend(1, 2) AS recs", "--format", "csv")
    recs = json.loads(r.output.splitlines()[1].strip('"').replace('""', '"'))
    assert [set(x) for x in recs] == [{"item_id", "score"}] * 2
    assert run(runner, "sql", p, "SELECT 1", "--format", "yaml").exit_code == 2


def test_recommend_and_versions_print_headers(runner, encoded):
    r = run(runner, "recommend", encoded.path, 1, "-k", 2)
    lines = r.output.splitlines()
    assert r.exit_code == 0 and lines[0].split() == ["rank", "item_id", "score", "title"] and "(2 rows)" in r.output
    r = run(runner, "recommend", encoded.path, 1, "-k", 2, "--format", "csv")
    assert r.output.splitlines()[0] == "rank,item_id,score,title"
    r = run(runner, "versions", encoded.path)
    assert r.output.split()[:3] == ["version", "status", "verdict"]
    r = run(runner, "versions", encoded.path, "--json")
    assert json.loads(r.output)[0]["verdict"] == "initial"


def test_config_formats(runner, store):
    r = run(runner, "config", store.path, "--json")
    cfg = json.loads(r.output)
    assert r.exit_code == 0 and cfg["model"] == "fake" and cfg["encoder_dim"] == 32 and "encoder_fingerprint" not in cfg
    r = run(runner, "config", store.path)
    assert r.output.split()[:2] == ["key", "value"] and "{" not in r.output.splitlines()[2]
    r = run(runner, "config", store.path, "--positive", "value >= 4", "--format", "csv")
    assert 'set positive = "value >= 4"' in r.output and "next `dynstore refresh` retrains" in r.output
    assert "positive,value >= 4" in run(runner, "config", store.path, "--format", "csv").output


def test_default_store_from_env_and_dynstore_toml(runner, encoded, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(runner, "versions")
    assert r.exit_code == 2 and "Missing argument 'STORE'" in r.output and "DYNSTORE_STORE" in r.output
    monkeypatch.setenv("DYNSTORE_STORE", str(encoded.path))
    assert "initial" in run(runner, "versions").output
    assert run(runner, "recommend", 1, "-k", 1, "--json").exit_code == 0
    assert "80" in run(runner, "sql", "SELECT count(*) FROM items").output
    assert json.loads(run(runner, "inspect", "--json").output)["tables"]["items"]["rows"] == 80
    r = run(runner, "ingest", "items", str(tmp_path / "missing.csv"))
    assert "missing.csv: no such file" in r.output
    # an explicit store still wins
    assert run(runner, "sql", encoded.path, "SELECT 1 AS x").exit_code == 0
    monkeypatch.delenv("DYNSTORE_STORE")
    (tmp_path / "dynstore.toml").write_text(f'store = "{encoded.path}"\n')  # a pointer file
    assert "initial" in run(runner, "versions").output
    monkeypatch.chdir(encoded.path)  # inside the store itself
    assert "80" in run(runner, "sql", "SELECT count(*) FROM items").output


def test_quiet_and_no_progress_in_redirected_output(runner, loaded):
    r = run(runner, "encode", loaded.path)  # CliRunner's stderr is not a terminal: no progress bar
    assert r.exit_code == 0 and "encoding" not in r.output and "%|" not in r.output
    r = run(runner, "ingest", loaded.path, "items", "--help")
    assert "-q, --quiet" in r.output
    r = run(runner, "rollback", loaded.path, 1, "-q")
    assert r.exit_code == 0 and r.output == ""


def test_ctrl_c_exits_130(runner, loaded, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dynstore.Store, "encode", interrupted)
    r = runner.invoke(main, ["encode", str(loaded.path)])
    assert r.exit_code == 130 and "Interrupted" in r.output


def test_validation_before_work(runner, loaded, tmp_path):
    r = run(runner, "encode", loaded.path, "--batch-size", 0)
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output
    with pytest.raises(dynstore.DynstoreError, match="batch_size"):
        loaded.encode(batch_size=0)
    assert loaded.sql("SELECT count(*) FROM stale_items").fetchall()[0][0] == 80  # nothing was done
    r = run(runner, "demo", tmp_path / "d", "--size", "huge")
    assert r.exit_code == 2 and "'huge' is not one of" in r.output and "Traceback" not in r.output
    for rule in ("value >", "value > 0) OR (1 = 1"):
        msg = one_line_error(run(runner, "init", tmp_path / "x", "--positive", rule))
        assert "CAST" not in msg and "AS BOOLEAN" not in msg, msg  # only text the user wrote
    msg = one_line_error(run(runner, "init", tmp_path / "x", "--positive", "event = 'a'; DROP TABLE t"))
    assert "syntax error" in msg or "one expression" in msg
    msg = one_line_error(run(runner, "config", loaded.path, "--item-text", "title ||"))
    assert "--item-text" in msg and "AS document" not in msg


def test_sql_errors_are_dynstore_messages(runner, encoded):
    msg = one_line_error(run(runner, "sql", encoded.path, "SELECT recommend(1, 0)"))
    assert msg == "Error: k must be between 1 and 10000, got 0"
    msg = one_line_error(run(runner, "sql", encoded.path, "SELECT item_vector(1, 99)"))
    assert msg.startswith("Error: no version 99") and "UDF" not in msg


def test_demo_refuses_a_directory_it_did_not_create(runner, tmp_path):
    mine = tmp_path / "mine"
    (mine / "store").mkdir(parents=True)
    (mine / "store" / "precious.txt").write_text("keep me")
    msg = one_line_error(run(runner, "demo", mine, "--size", "tiny", "--model", "fake"))
    assert "did not create" in msg
    assert (mine / "store" / "precious.txt").read_text() == "keep me"
    # an earlier demo's directory is rebuilt
    d = tmp_path / "d"
    assert run(runner, "demo", d, "--size", "tiny", "--model", "fake", "-q").exit_code == 0
    assert (d / ".dynstore-demo").is_file() and (d / "store" / "dynstore.toml").is_file()
    r = run(runner, "demo", d, "--size", "tiny", "--model", "fake", "-q")
    assert r.exit_code == 0 and r.output == ""


@exercises("score-all")
def test_score_all_cli(runner, encoded):
    r = run(runner, "score-all", encoded.path, "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["engine"] == "local" and out["k"] == 3 and out["rows"] == 3 * out["users"]
    r = run(runner, "score-all", encoded.path, "--workers", "2")
    assert r.exit_code == 2 and "--workers needs --engine ray" in r.output


def test_cli_constants_mirror_the_library():
    """The CLI spells a few library constants out (importing them costs numpy/pyarrow at
    start-up); they must not drift apart."""
    from dynstore import cli
    from dynstore.encoders import PRECISIONS
    from dynstore.serving.precision import PRECISIONS as SCORE_PRECISIONS
    from dynstore.engines.ray import ENGINES
    from dynstore.samples.shop import SIZES
    from dynstore.versions.window import DEFAULT_SINCE

    assert tuple(cli.PRECISIONS) == tuple(PRECISIONS) and tuple(cli.ENGINES) == tuple(ENGINES)
    assert tuple(cli.SIZES) == tuple(SIZES) and cli.DEFAULT_SINCE == DEFAULT_SINCE
    assert tuple(cli.SCORE_PRECISIONS) == tuple(SCORE_PRECISIONS)
