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
from dynstore.session import SqlSession

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
    r = runner.invoke(main, ["sql", str(loaded.path)], input=script)
    out = r.output
    assert r.exit_code == 0
    assert "80" in out and re.search(r"interactions +store", out) and re.search(r"items +item_id", out)
    assert "a,b\n1,x" in out and "c\n2" in out and "Run Time:" in out
    assert "recommend,macro,\"recommend(user_id, k)\"" in out
    assert "Error: unknown command .bogus" in out and "Error:" in out.split(".bogus")[1]
    assert ".schema [TABLE]" in out and "never" not in out


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
