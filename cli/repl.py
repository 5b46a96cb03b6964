"""The ``dynstore sql`` prompt and Ctrl-C handling for SQL.

Statements end with ``;`` and may span lines (the continuation prompt is
``   ...>``); a whole statement is one history entry. Dot commands, as in
DuckDB's shell: ``.tables``, ``.schema [TABLE]``, ``.functions``,
``.mode FORMAT``, ``.timer on|off``, ``.help``, ``.quit``. Ctrl-C while a
query runs cancels it (DuckDB's ``interrupt()``) and returns to the prompt;
Ctrl-C at the prompt clears the line; Ctrl-D or ``.quit`` leaves.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import click

from .output import FORMATS, render

__all__ = ["run_interruptibly", "Interrupted", "Repl"]

PROMPT = "dynstore> "
CONTINUATION = "   ...> "

DOT_HELP = [
    (".tables", "the store's tables and this session's own"),
    (".schema [TABLE]", "columns of TABLE (of every table without one)"),
    (".functions", "dynstore's SQL functions and macros"),
    (".mode FORMAT", f"output format: {', '.join(FORMATS)}"),
    (".timer on|off", "print each statement's run time"),
    (".help", "this list"),
    (".quit", "leave (also .exit, Ctrl-D)"),
]


class Interrupted(Exception):
    """The user pressed Ctrl-C while a statement ran; it was cancelled."""


def run_interruptibly(session, statement):
    """Run one statement on a worker thread; Ctrl-C cancels it with DuckDB's interrupt.

    A signal handler cannot run while the main thread is inside DuckDB's C
    code, so the main thread only waits and turns Ctrl-C into
    ``session.interrupt()``.
    """
    box: dict = {}
    done = threading.Event()  # not Thread.join: a join cut short by Ctrl-C may return early

    def work():
        try:
            box["result"] = session.run(statement)
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="dynstore-sql", daemon=True).start()
    try:
        while not done.wait(0.05):
            pass
    except KeyboardInterrupt:
        # Repeated until the worker ends: an interrupt that lands before DuckDB
        # starts the statement is lost. Further Ctrl-C only waits for it.
        while True:
            session.interrupt()
            try:
                if done.wait(0.2):
                    break
            except KeyboardInterrupt:
                pass
        raise Interrupted() from None
    if "error" in box:
        raise box["error"]
    return box["result"]


def _complete(text: str) -> bool:
    """Whether the prompt's buffer is ready to run (Enter runs it rather than adding a line)."""
    stripped = text.strip()
    return not stripped or stripped.startswith(".") or stripped.endswith(";")


class Repl:
    """The interactive prompt over a :class:`~dynstore.session.SqlSession`."""

    def __init__(self, session, fmt: str = "table", *, quiet: bool = False):
        self.session = session
        self.fmt = fmt
        self.timer = False
        self.quiet = quiet

    # -- reading ----------------------------------------------------------------------
    def _tty_reader(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.key_binding import KeyBindings

        history = Path(os.environ.get("DYNSTORE_HISTORY", Path.home() / ".dynstore_history"))
        keys = KeyBindings()

        @keys.add("enter")
        def _(event):
            buf = event.current_buffer
            if _complete(buf.document.text):
                buf.validate_and_handle()
            else:
                buf.insert_text("\n")

        prompt = PromptSession(history=FileHistory(str(history)), multiline=True, key_bindings=keys,
                               prompt_continuation=lambda width, line, soft: CONTINUATION.rjust(width))

        def read() -> str:
            while True:
                try:
                    return prompt.prompt(PROMPT)
                except KeyboardInterrupt:
                    continue  # Ctrl-C clears the line, as in DuckDB's shell

        return read

    @staticmethod
    def _pipe_reader():
        buf: list[str] = []

        def read() -> str:
            while True:
                line = sys.stdin.readline()
                if not line:
                    if buf:
                        text = "".join(buf)
                        buf.clear()
                        return text
                    raise EOFError
                if not buf and line.strip().startswith("."):
                    return line
                buf.append(line)
                if line.strip().endswith(";"):
                    text = "".join(buf)
                    buf.clear()
                    return text

        return read

    def loop(self) -> None:
        tty = sys.stdin.isatty()
        read = self._tty_reader() if tty else self._pipe_reader()
        if not self.quiet:
            click.echo(f"dynstore SQL on {self.session.store.path}"
                       f"{' (read-only)' if self.session.store.read_only else ''}; end statements with ';', "
                       ".help for commands, .quit or Ctrl-D to leave", err=True)
        while True:
            try:
                text = read()
            except EOFError:
                break
            except KeyboardInterrupt:
                break  # Ctrl-C while reading a pipe
            stripped = text.strip()
            if not stripped:
                continue
            if stripped.startswith("."):
                if not self.dot(stripped):
                    break
                continue
            self.execute(text)

    # -- running ----------------------------------------------------------------------
    def execute(self, text: str) -> None:
        from dynstore.errors import DynstoreError

        try:
            statements = self.session.statements(text)
        except DynstoreError as exc:
            click.echo(f"Error: {exc}", err=True)
            return
        for statement in statements:
            t0 = time.perf_counter()
            try:
                result = run_interruptibly(self.session, statement)
            except Interrupted:
                click.echo("Interrupted: the statement was cancelled", err=True)
                return
            except DynstoreError as exc:
                click.echo(f"Error: {exc}", err=True)
                return
            if result.columns:
                click.echo(render(result.columns, result.rows, self.fmt))
            if self.timer:
                click.echo(f"Run Time: {time.perf_counter() - t0:.3f} s", err=True)

    def dot(self, line: str) -> bool:
        """Run a dot command; False means leave the prompt."""
        from dynstore.errors import DynstoreError

        cmd, _, arg = line.partition(" ")
        arg = arg.strip().rstrip(";").strip()
        try:
            if cmd in (".quit", ".exit", ".q"):
                return False
            if cmd == ".help":
                width = max(len(c) for c, _ in DOT_HELP)
                click.echo("\n".join(f"{c.ljust(width)}  {h}" for c, h in DOT_HELP))
                click.echo("SQL: end each statement with ';'; tables you CREATE live in this session only.")
            elif cmd == ".tables":
                click.echo(render(["name", "kind"], self.session.tables(), self.fmt))
            elif cmd == ".schema":
                names = [arg] if arg else [n for n, _ in self.session.tables()]
                rows = [(n, c, t) for n in names for c, t in self.session.describe(n)]
                click.echo(render(["table", "column", "type"], rows, self.fmt))
            elif cmd == ".functions":
                click.echo(render(["name", "kind", "signature"], self.session.functions(), self.fmt))
            elif cmd == ".mode":
                if arg not in FORMATS:
                    click.echo(f"Error: .mode {arg or '?'}: use one of {', '.join(FORMATS)}", err=True)
                else:
                    self.fmt = arg
            elif cmd == ".timer":
                if arg not in ("on", "off"):
                    click.echo("Error: .timer on|off", err=True)
                else:
                    self.timer = arg == "on"
            else:
                click.echo(f"Error: unknown command {cmd}; .help lists them", err=True)
        except DynstoreError as exc:
            click.echo(f"Error: {exc}", err=True)
        return True
