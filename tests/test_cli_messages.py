"""Honest answers and the small things a new user meets (issue 23): each a CliRunner test."""
from __future__ import annotations

import polars as pl
import pytest

import dynstore
from dynstore.cli import main
from dynstore.errors import SqlError


def run(runner, *args, **kw):
    return runner.invoke(main, [str(a) for a in args], **kw)


@pytest.fixture
def string_store(tmp_path):
    s = dynstore.init(tmp_path / "s", model="fake:32")
    s.ingest("items", pl.DataFrame({"item_id": ["a", "b", "c"], "title": ["red shoe", "blue shoe", "green hat"]}))
    s.ingest("interactions", pl.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "b"],
                                           "ts": ["2025-01-01", "2025-01-02"]}))
    s.encode()
    yield s
    s.close()


# -------------------------------------------------------------------------- honest answers


def test_unknown_user_gets_a_note_and_strict_makes_it_an_error(runner, string_store):
    p = string_store.path
    r = run(runner, "recommend", p, "nobody", "-k", "2", "--format", "csv")
    assert r.exit_code == 0
    assert "note: user 'nobody' is in neither users nor interactions" in r.stderr
    assert r.stdout.splitlines()[0] == "rank,item_id,score,title" and len(r.stdout.splitlines()) == 3
    r = run(runner, "recommend", p, "nobody", "--strict")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("Error: user 'nobody' is in neither users nor interactions")
    r = run(runner, "recommend", p, "u1", "--strict", "-k", "2")
    assert r.exit_code == 0 and "note" not in r.stderr
    assert "note" not in run(runner, "recommend", p, "nobody", "-q").stderr


def test_a_forgotten_argument_is_named(runner, string_store, monkeypatch):
    monkeypatch.delenv("DYNSTORE_STORE", raising=False)
    r = run(runner, "recommend", string_store.path)
    assert r.exit_code == 2 and "Missing argument 'USER_ID'" in r.output and "'STORE'" not in r.output
    r = run(runner, "rollback", string_store.path)
    assert r.exit_code == 2 and "Missing argument 'VERSION'" in r.output
    # with a default store, a store named on the command line is still the store
    monkeypatch.setenv("DYNSTORE_STORE", str(string_store.path))
    r = run(runner, "recommend", string_store.path)
    assert r.exit_code == 2 and "Missing argument 'USER_ID'" in r.output


@pytest.mark.parametrize("query, expected", [
    ("SELECT recommend(42, 10)", "recommend(): this store's user ids are text (VARCHAR); write recommend('42', 10)"),
    ("SELECT * FROM recommendations(42, 3)",
     "recommendations(): this store's user ids are text (VARCHAR); write recommendations('42', 3)"),
    ("SELECT score('u1', 7)", "score(): this store's item ids are text (VARCHAR); write score('u1', '7')"),
    ("SELECT item_vector(7)", "item_vector(): this store's item ids are text (VARCHAR); write item_vector('7')"),
    ("SELECT recommend(u, 3) FROM (SELECT 42 AS u)",
     "recommend(): this store's user ids are text (VARCHAR); write recommend(CAST(u AS VARCHAR), 3)"),
])
def test_an_id_of_the_wrong_type_gets_one_line_naming_the_id_type(runner, string_store, query, expected):
    r = run(runner, "sql", string_store.path, query)
    assert r.exit_code == 1 and r.output == f"Error: {expected}\n"
    assert "_dynstore" not in r.output
    fixed = expected.split("write ", 1)[1]
    assert run(runner, "sql", string_store.path, query.replace(query[query.index(fixed.split("(")[0]):], fixed)
               if "FROM (" not in query else f"SELECT {fixed} FROM (SELECT 42 AS u)").exit_code == 0
    with pytest.raises(SqlError, match="ids are text"):
        string_store.sql(query)


def test_a_text_id_on_an_integer_store_names_the_id_type(runner, encoded):
    r = run(runner, "sql", encoded.path, "SELECT recommend('u-42', 10)")
    assert r.exit_code == 1 and "_dynstore" not in r.output
    assert r.output.startswith("Error: recommend(): this store's user ids are integers (BIGINT) and 'u-42' is not one")
    assert "recommend(42, 10)" in r.output


# -------------------------------------------------------------------------- small things


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_takes_quiet(name):
    assert any("-q" in p.opts and "--quiet" in p.opts for p in main.commands[name].params), name


def test_versions_and_inspect_accept_quiet(runner, encoded):
    assert run(runner, "versions", encoded.path, "-q").exit_code == 0
    r = run(runner, "inspect", encoded.path, "-q", "--format", "csv")
    assert r.exit_code == 0 and r.stdout.startswith("key,value")


def test_config_change_prints_one_line(runner, store):
    r = run(runner, "config", store.path, "--item-text", "title || ': ' || description")
    assert r.exit_code == 0 and r.stdout == "set item_text = \"title || ': ' || description\"\n"
    r = run(runner, "config", store.path, "--retain-seconds", "60", "--compact-fragments", "8")
    assert r.stdout == "set retain_seconds = 60; compact_fragments = 8\n"
    assert run(runner, "config", store.path, "--retain-seconds", "61", "-q").stdout == ""
    assert '"retain_seconds": 61' in run(runner, "config", store.path, "--retain-seconds", "61", "--json").stdout


def test_leaving_the_prompt_with_ctrl_d_names_the_session_tables(runner, loaded, monkeypatch):
    from dynstore.cli import repl

    lines = iter(["CREATE TABLE picks AS SELECT 1 AS x;"])

    def fake_reader(self):
        def read():
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None  # Ctrl-D
        return read

    monkeypatch.setattr(repl, "stdin_is_terminal", lambda: True)
    monkeypatch.setattr(repl.Repl, "_tty_reader", fake_reader)
    r = runner.invoke(main, ["sql", str(loaded.path)], input="")
    assert r.exit_code == 0, r.output
    assert "dynstore SQL on" in r.stderr  # a terminal gets the banner
    assert "note: picks existed only while this prompt was open" in r.stderr


def test_delete_says_row_and_rows(runner, loaded):
    r = run(runner, "delete", loaded.path, "items", "--where", "item_id = 1")
    assert r.exit_code == 0 and r.stdout.startswith("deleted 1 row from items (79 left")
    r = run(runner, "delete", loaded.path, "items", "--where", "item_id IN (2, 3)")
    assert r.stdout.startswith("deleted 2 rows from items")


@pytest.mark.parametrize("value, unit", [("1735689600000", "milliseconds"), ("1735689600000000", "microseconds")])
def test_epoch_milliseconds_are_refused_naming_the_unit(runner, store, tmp_path, value, unit):
    f = tmp_path / "events.csv"
    f.write_text(f"user_id,item_id,ts\n1,2,{value}\n")
    r = run(runner, "ingest", store.path, "interactions", f)
    assert r.exit_code == 1 and f"row 1, column ts: {value} is not a timestamp" in r.output
    assert f"looks like epoch {unit}" in r.output and "epoch seconds" in r.output


def test_missing_column_error_shows_the_map_syntax(runner, store, tmp_path):
    f = tmp_path / "events.csv"
    f.write_text("user_id,item_id,when\n1,2,2025-01-01\n")
    r = run(runner, "ingest", store.path, "interactions", f)
    assert r.exit_code == 1 and "missing required column ts" in r.output and "--map ts=" in r.output
    assert run(runner, "ingest", store.path, "interactions", f, "--map", "ts=when").exit_code == 0
