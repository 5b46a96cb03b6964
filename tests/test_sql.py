"""`dynstore sql`: statements, session-scoped tables, the prompt (piped and in a terminal)."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import polars as pl
import pytest

import dynstore
from dynstore.cli import main
from dynstore.errors import DynstoreError
from dynstore.sql.session import SqlSession

LONG_QUERY = "SELECT count(*) FROM range(1000000000000) t(i) WHERE i % 7 = 3;"


def run(runner, *args, **kw):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def test_every_result_of_a_multi_statement_input_is_shown(runner, loaded):
    r = run(runner, "sql", loaded.path, "SELECT 1 AS first; SELECT 2 AS second", "--format", "csv")
    assert r.exit_code == 0 and r.output.split("\n\n") == ["first\n1", "second\n2\n"]


def test_created_tables_are_session_scoped(runner, loaded):
    r = run(runner, "sql", loaded.path, "CREATE TABLE t AS SELECT 41 AS x; SELECT x + 1 AS y FROM t")
    assert r.exit_code == 0 and "42" in r.output
    assert "note: t existed only while this command ran" in r.output
    r = run(runner, "sql", loaded.path, "SELECT * FROM t")
    assert r.exit_code == 1 and "Table with name t does not exist" in r.output


def test_writes_to_store_tables_are_refused_with_the_commands_that_do_them(runner, loaded):
    for q in ("DELETE FROM items", "UPDATE items SET title = 'x'", "INSERT INTO users VALUES (1)"):
        r = run(runner, "sql", loaded.path, q)
        assert r.exit_code == 1 and "dynstore delete" in r.output, (q, r.output)
    assert loaded.sql("SELECT count(*) FROM items").fetchall()[0][0] == 80


def test_session_follows_new_commits_and_keeps_its_tables(loaded):
    reader = dynstore.connect(loaded.path, read_only=True)
    with SqlSession(reader) as session:
        session.run("CREATE TABLE mine AS SELECT 7 AS x")
        before = session.run("SELECT count(*) FROM items").rows[0][0]
        loaded.ingest("items", pl.DataFrame({"item_id": [10_001], "title": ["new"]}))
        assert session.run("SELECT count(*) FROM items").rows[0][0] == before + 1
        assert session.run("SELECT x FROM mine").rows == [(7,)]
        with pytest.raises(DynstoreError, match="read-only|Permission|disabled"):
            session.run("COPY (SELECT 1) TO '/tmp/should-not-exist-dynstore.csv'")


def test_sql_function_registered_after_connect_reaches_open_stores(loaded):
    loaded.sql("SELECT 1").fetchall()  # a connection exists already
    session = SqlSession(loaded)

    @dynstore.sql_function("late_shout", ["VARCHAR"], "VARCHAR", vectorized=False)
    def late_shout(store, text):
        return text.upper() + "!"

    assert loaded.sql("SELECT late_shout('hi')").fetchall() == [("HI!",)]
    assert session.run("SELECT late_shout('yo')").rows == [("YO!",)]
    session.close()


def test_interrupt_cancels_a_running_statement(loaded):
    import threading

    session = SqlSession(loaded)
    threading.Timer(0.5, session.interrupt).start()
    with pytest.raises(DynstoreError, match="(?i)interrupt"):
        session.run(LONG_QUERY)
    assert session.run("SELECT 42").rows == [(42,)]  # the session still works


def test_piped_prompt_runs_dot_commands_and_multi_line_statements(runner, loaded):
    script = ("SELECT count(*) AS n\nFROM items;\n"
              ".tables\n.schema items\n.mode csv\nSELECT 1 AS a, 'x' AS b;\n.timer on\nSELECT 2 AS c;\n"
              ".functions\n.bogus\nSELECT nonsense;\n.help\n.quit\nSELECT 'never' AS after_quit;\n")
    r = runner.invoke(main, ["sql", str(loaded.path), "--keep-going"], input=script)
    out = r.output
    assert r.exit_code == 1  # .bogus and SELECT nonsense failed; --keep-going ran the rest
    assert "80" in out and re.search(r"interactions +store", out) and re.search(r"items +item_id", out)
    assert "a,b\n1,x" in out and "c\n2" in out and "Run Time:" in out
    assert "recommend,macro,\"recommend(user_id, k)\"" in out
    assert "Error: unknown command .bogus" in out and "Error:" in out.split(".bogus")[1]
    assert ".schema [TABLE]" in out and "after_quit" not in out


# -------------------------------------------------------------------------- scripts, as the DuckDB CLI runs them


def test_a_piped_script_stops_at_the_first_error_with_its_position(runner, loaded):
    r = runner.invoke(main, ["sql", str(loaded.path)], input="SELECT 1 AS first;\nSELEC 2;\nSELECT 3 AS third;\n")
    assert r.exit_code == 1
    assert "first" in r.output and "third" not in r.output
    assert "dynstore SQL on" not in r.output  # no banner: stdin is not a terminal
    assert 'Error: Parser Error: syntax error at or near "SELEC"\nLINE 2: SELEC 2;\n        ^' in r.output
    # a runtime error after lines of earlier statements: LINE counts from the start of the script
    r = runner.invoke(main, ["sql", str(loaded.path)],
                      input="SELECT 1 AS first;\n\nSELECT\n  nope\nFROM items;\nSELECT 3 AS third;\n")
    assert r.exit_code == 1 and "third" not in r.output and "LINE 4:   nope" in r.output
    # --keep-going runs the rest, and still exits 1
    r = runner.invoke(main, ["sql", str(loaded.path), "--keep-going"], input="SELEC 2;\nSELECT 3 AS third;\n")
    assert r.exit_code == 1 and "third" in r.output


def test_a_failing_query_argument_runs_nothing_after_it(runner, loaded):
    r = run(runner, "sql", loaded.path, "CREATE TABLE t AS SELECT 1 AS x;\nSELECT nope FROM t;\nSELECT 'after' AS y;")
    assert r.exit_code == 1 and "after" not in r.output and "LINE 2: SELECT nope FROM t;" in r.output


def test_file_option_and_read_command(runner, loaded, tmp_path):
    inner = tmp_path / "inner.sql"
    inner.write_text("SELECT 'from inner' AS src;\n")
    script = tmp_path / "report.sql"
    script.write_text(f"-- a report\nSELECT count(*) AS n FROM items;\n.read {inner}\nSELECT 'last' AS l;\n")
    r = run(runner, "sql", loaded.path, "-f", script, "--format", "csv")
    assert r.exit_code == 0 and r.output.split("\n\n") == ["n\n80", "src\nfrom inner", "l\nlast\n"]
    # a failure inside .read stops the script that read it
    inner.write_text("SELECT 'ok' AS a;\nSELECT broken FROM nowhere;\n")
    r = run(runner, "sql", loaded.path, "-f", script, "--format", "csv")
    assert r.exit_code == 1 and "ok" in r.output and "last" not in r.output and "nowhere" in r.output
    r = run(runner, "sql", loaded.path, "-f", tmp_path / "missing.sql")
    assert r.exit_code == 1 and "missing.sql" in r.output
    assert run(runner, "sql", loaded.path, "SELECT 1", "-f", script).exit_code == 2


def test_query_parameters(runner, loaded):
    r = run(runner, "sql", loaded.path, "SELECT $n + 1 AS m, $who AS who; SELECT $n AS again",
            "-p", "n", "41", "-p", "who", "ann", "--format", "csv")
    assert r.exit_code == 0 and r.output.split("\n\n") == ["m,who\n42,ann", "again\n41\n"]
    r = run(runner, "sql", loaded.path, "SELECT count(*) AS n FROM interactions WHERE user_id = $user",
            "-p", "user", "3", "--format", "csv", "--no-headers")
    assert r.exit_code == 0 and int(r.output) > 0
    r = run(runner, "sql", loaded.path, "SELECT $missing AS x")
    assert r.exit_code == 1 and "-p missing VALUE" in r.output and "Values were not provided" not in r.output


def test_no_headers_output_and_widths(runner, loaded, tmp_path):
    long = "x" * 200
    r = run(runner, "sql", loaded.path, f"SELECT 1 AS n, '{long}' AS t", "--no-headers", "--format", "csv")
    assert r.output == f"1,{long}\n"
    r = run(runner, "sql", loaded.path, f"SELECT 1 AS n, '{long}' AS t")  # not a terminal: never cut
    assert long in r.output
    r = run(runner, "sql", loaded.path, f"SELECT 1 AS n, '{long}' AS t", "--max-width", "40")
    assert long not in r.output and "x…" in r.output and "1 value cut to fit 40 characters" in r.output
    assert max(len(line) for line in r.output.splitlines()[:3]) <= 40
    r = run(runner, "sql", loaded.path, f"SELECT '{long}' AS t", "--max-width", "40", "--format", "json")
    assert long in r.output  # only tables are fitted
    out = tmp_path / "out.csv"
    script = (f".output {out}\n.mode csv\nSELECT 1 AS a;\n.output\nSELECT 2 AS b;\n.maxrows 3\n.maxwidth 30\n"
              f".mode table\nSELECT i, '{long}' AS t FROM range(10) r(i);\n.headers off\n.mode csv\nSELECT 5 AS c;\n")
    r = runner.invoke(main, ["sql", str(loaded.path)], input=script)
    assert r.exit_code == 0, r.output
    assert out.read_text() == "a\n1\n" and "b\n2" in r.output and "a\n1" not in r.output
    assert "(10 rows, the first 3 shown (.maxrows 0 shows all); 3 values cut to fit 30 characters" in r.output
    assert r.output.rstrip().endswith("\n5") and "c\n5" not in r.output


def test_session_note_and_no_banner_when_piped(runner, loaded):
    r = runner.invoke(main, ["sql", str(loaded.path)], input="CREATE TABLE mine AS SELECT 1 AS x;\nSELECT x FROM mine;\n")
    assert r.exit_code == 0 and "dynstore SQL on" not in r.output
    assert "note: mine existed only while this command ran" in r.output
    r = runner.invoke(main, ["sql", str(loaded.path), "-q"], input="CREATE TABLE mine AS SELECT 1 AS x;\n")
    assert "note" not in r.output


def test_tables_labels_store_views_and_session_views(runner, loaded):
    r = runner.invoke(main, ["sql", str(loaded.path)],
                      input="CREATE VIEW mine AS SELECT 1 AS x;\nCREATE TABLE t AS SELECT 1 AS y;\n.tables\n")
    kinds = dict(re.findall(r"^(\w+) +(store|session table|session view)$", r.output, re.M))
    assert kinds["batch_recommendations"] == kinds["labelled_events"] == kinds["items"] == "store"
    assert kinds["mine"] == "session view" and kinds["t"] == "session table"


def test_insert_into_a_store_table_names_it(runner, loaded):
    r = run(runner, "sql", loaded.path, "INSERT INTO items VALUES (1)")
    assert r.exit_code == 1 and "an table" not in r.output
    assert "items is one of the store's tables, read-only in SQL" in r.output and "dynstore ingest" in r.output


# -------------------------------------------------------------------------- a real terminal


@pytest.fixture
def prompt(loaded, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    history = tmp_path / "history"
    env = dict(os.environ, DYNSTORE_HISTORY=str(history), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1",
               PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["-m", "dynstore", "sql", str(loaded.path)], env=env,
                          encoding="utf-8", timeout=60, dimensions=(40, 200),
                          cwd=str(Path(__file__).resolve().parents[1]))
    child.expect("dynstore>")
    yield child, history
    if child.isalive():
        child.terminate(force=True)


@pytest.mark.filterwarnings("ignore:lance is not fork-safe")  # pexpect forks, then execs at once
def test_terminal_prompt_dot_commands_continuation_ctrl_c_and_history(prompt):
    import pexpect

    child, history = prompt
    child.sendline(".tables")
    child.expect("item_embeddings_all")
    child.expect("dynstore>")
    # a statement over two lines: a distinct continuation prompt, then the result
    child.sendline("SELECT 40")
    child.expect(r"\.\.\.>")
    child.sendline("+ 2 AS answer;")
    child.expect("answer")
    child.expect("42")
    child.expect("dynstore>")
    # Ctrl-C cancels a running query and the prompt stays
    child.sendline(LONG_QUERY)
    time.sleep(1.5)
    child.sendintr()
    child.expect("Interrupted: the statement was cancelled")
    child.expect("dynstore>")
    # Ctrl-C at the prompt clears the line instead of quitting
    child.send("SELECT 'discarded'")
    child.sendintr()
    child.expect("dynstore>")
    # the history holds whole statements: two Up presses bring back both lines of the earlier one
    child.send("\x1b[A")
    time.sleep(0.2)
    child.send("\x1b[A")
    time.sleep(0.2)
    child.send("\r")
    child.expect("answer")
    child.expect("42")
    child.expect("dynstore>")
    child.sendline(".quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    entries = history.read_text().split("\n\n")
    assert any("+SELECT 40\n++ 2 AS answer;" in e for e in entries), history.read_text()
    assert "discarded" not in history.read_text()


def test_ctrl_c_cancels_a_one_shot_query_and_exits_130(loaded):
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "dynstore", "sql", str(loaded.path), LONG_QUERY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[1]))
    time.sleep(4)  # start-up, then the query runs
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "Traceback" not in err
