"""The ``dynstore sql`` prompt, scripts, and Ctrl-C handling for SQL.

Statements end with ``;`` and may span lines (the continuation prompt is
``   ...>``); a whole statement is one history entry. Dot commands, as in
DuckDB's shell: ``.tables``, ``.schema [TABLE]``, ``.functions``,
``.mode FORMAT``, ``.headers on|off``, ``.maxrows N``, ``.maxwidth N``,
``.output [FILE]``, ``.read FILE``, ``.timer on|off``, ``.help``, ``.quit``.
Ctrl-C while a query runs cancels it (DuckDB's ``interrupt()``) and returns
to the prompt; Ctrl-C at the prompt clears the line; Ctrl-D or ``.quit`` leaves.

A **script** (a QUERY argument, ``-f FILE``, piped stdin, ``.read FILE``) runs
like the DuckDB CLI's: statements and dot commands in order, no banner, and
the first failing one stops it (exit 1; ``--keep-going`` runs the rest and
still exits 1). Errors carry DuckDB's ``LINE n:`` position, numbered from the
start of the script.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterable, Iterator

import click

from dynstore.cli.output import FORMATS, render, terminal_width

__all__ = ["run_interruptibly", "Interrupted", "Repl", "script_chunks", "stdin_is_terminal"]

PROMPT = "dynstore> "
CONTINUATION = "   ...> "

DOT_HELP = [
    (".tables", "the store's tables and this session's own"),
    (".schema [TABLE]", "columns of TABLE (of every table without one)"),
    (".functions", "dynstore's SQL functions and macros"),
    (".mode FORMAT", f"output format: {', '.join(FORMATS)}"),
    (".headers on|off", "print the header line (table, csv, tsv, markdown)"),
    (".maxrows N", "show at most N rows of a table (0: all)"),
    (".maxwidth N", "fit tables to N characters, saying what was cut (0: never cut)"),
    (".output [FILE]", "write results to FILE (none: back to the screen)"),
    (".read FILE", "run the statements and dot commands of FILE"),
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


def stdin_is_terminal() -> bool:
    """Whether a person types at stdin (the prompt) rather than a pipe or file feeding it (a script)."""
    return sys.stdin.isatty()


def script_chunks(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """``(first line number, text)`` of each dot command and each run of lines ending in ``;``.

    >>> list(script_chunks(["SELECT 1;\\n", "\\n", ".tables\\n", "SELECT\\n", "  2;\\n", "SELECT 3"]))
    [(1, 'SELECT 1;\\n'), (3, '.tables\\n'), (4, 'SELECT\\n  2;\\n'), (6, 'SELECT 3')]
    """
    buf: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        if not buf:
            if not line.strip():
                continue
            start = number
            if line.strip().startswith("."):
                yield start, line
                continue
        buf.append(line)
        if line.rstrip().endswith(";"):
            yield start, "".join(buf)
            buf = []
    if "".join(buf).strip():
        yield start, "".join(buf)


class Repl:
    """The prompt, and scripts, over a :class:`~dynstore.sql.session.SqlSession`.

    ``max_width`` (None: the terminal's width when stdout is one) fits tables;
    ``keep_going`` lets a script run past a failing statement.
    """

    def __init__(self, session, fmt: str = "table", *, quiet: bool = False, headers: bool = True,
                 max_width: int | None = None, keep_going: bool = False):
        self.session = session
        self.fmt = fmt
        self.timer = False
        self.quiet = quiet
        self.headers = headers
        self.max_width = max_width
        self.max_rows = 0
        self.keep_going = keep_going
        self.failed = False
        self.created: list[str] = []
        self.interactive = False
        self._out: IO[str] | None = None
        self._shown = 0

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

    def loop(self) -> None:
        """The prompt when stdin is a terminal; else stdin is a script (see the module's doc)."""
        self.interactive = stdin_is_terminal()
        try:
            if not self.interactive:
                self.run_script(iter(sys.stdin.readline, ""))
                return
            if not self.quiet:
                click.echo(f"dynstore SQL on {self.session.store.path}"
                           f"{' (read-only)' if self.session.store.read_only else ''}; end statements with ';', "
                           ".help for commands, .quit or Ctrl-D to leave", err=True)
            read = self._tty_reader()
            while True:
                try:
                    text = read()
                except (EOFError, KeyboardInterrupt):
                    break
                stripped = text.strip()
                if stripped.startswith("."):
                    if self.dot(stripped) == "quit":
                        break
                elif stripped:
                    self.execute(text)
        finally:
            self.finish()

    def run_script(self, lines: Iterable[str]) -> bool:
        """Run a script's statements and dot commands in order; False when one failed.

        Outside the prompt the first failure stops the script (``keep_going``: the rest still runs).
        """
        ok = True
        for start, text in script_chunks(lines):
            outcome = self.dot(text.strip()) if text.lstrip().startswith(".") else self.execute(text, start)
            if outcome == "quit":
                return ok
            if outcome is False or outcome == "error":
                ok = False
                self.failed = True
                if not self.keep_going:
                    return False
        return ok

    def finish(self) -> None:
        """Leaving: close an ``.output`` file; say which session tables are gone."""
        self._redirect(None)
        if self.created and not self.quiet:
            names = ", ".join(dict.fromkeys(self.created))
            where = "this prompt was open" if self.interactive else "this command ran"
            click.echo(f"note: {names} existed only while {where}; tables you CREATE are session-scoped "
                       "(COPY ... TO a file keeps a result)", err=True)

    # -- running ----------------------------------------------------------------------
    def echo(self, text: str) -> None:
        """A result, on stdout or in the ``.output`` file; results are separated by a blank line."""
        if self._shown and not self.interactive:
            click.echo(file=self._out)
        click.echo(text, file=self._out)
        self._shown += 1

    def show(self, columns, rows) -> None:
        width = self.max_width
        if width is None:
            width = 0 if self._out is not None else terminal_width()
        self.echo(render(columns, rows, self.fmt, headers=self.headers, max_width=width, max_rows=self.max_rows,
                         widen=".maxwidth 0" if self.interactive else "--max-width 0"))

    def execute(self, text: str, line: int = 1) -> bool:
        """Run the statements of ``text`` (which starts on ``line`` of its script); False on an error."""
        from dynstore.errors import DynstoreError, StoreBusy

        try:
            statements = self.session.statements("\n" * (line - 1) + text)
        except DynstoreError as exc:
            click.echo(f"Error: {exc}", err=True)
            return False
        for statement in statements:
            t0 = time.perf_counter()
            try:
                result = run_interruptibly(self.session, statement)
            except Interrupted:
                if not self.interactive:
                    raise
                click.echo("Interrupted: the statement was cancelled", err=True)
                return False
            except DynstoreError as exc:
                if isinstance(exc, StoreBusy) and not self.interactive:
                    raise  # a script ends with the busy store's own exit code (3)
                click.echo(f"Error: {_damaged(self.session.store.path, exc) or exc}", err=True)
                return False
            if result.creates:
                self.created.append(result.creates)
            if result.columns:
                self.show(result.columns, result.rows)
            if self.timer:
                click.echo(f"Run Time: {time.perf_counter() - t0:.3f} s", err=True)
        return True
    def _redirect(self, path: str | None) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        if path:
            try:
                self._out = open(path, "w", encoding="utf-8")
            except OSError as exc:
                from dynstore.errors import DynstoreError

                raise DynstoreError(f".output {path}: {exc.strerror or exc}") from None

    def _read(self, path: str) -> str:
        from dynstore.errors import DynstoreError

        if not path:
            raise DynstoreError(".read FILE: name the file to run")
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DynstoreError(f".read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if self.run_script(lines):
            return "ok"
        return "error"

    def _setting(self, cmd: str, arg: str) -> bool:
        """``.maxrows N``, ``.maxwidth N``, ``.headers on|off``; False when the argument is wrong."""
        if cmd == ".headers":
            if arg not in ("on", "off"):
                return False
            self.headers = arg == "on"
            return True
        if not arg.isdigit():
            return False
        if cmd == ".maxrows":
            self.max_rows = int(arg)
        else:
            self.max_width = int(arg)
        return True

    def dot(self, line: str) -> str:
        """Run a dot command: "ok", "error", or "quit" (leave the prompt or the script)."""
        from dynstore.errors import DynstoreError

        cmd, _, arg = line.partition(" ")
        arg = arg.strip().rstrip(";").strip()
        try:
            if cmd in (".quit", ".exit", ".q"):
                return "quit"
            if cmd == ".read":
                return self._read(arg)
            if cmd == ".output":
                self._redirect(arg or None)
            elif cmd in (".maxrows", ".maxwidth", ".headers"):
                if not self._setting(cmd, arg):
                    usage = "on|off" if cmd == ".headers" else "N (0: no limit)"
                    click.echo(f"Error: {cmd} {usage}", err=True)
                    return "error"
            elif cmd == ".help":
                width = max(len(c) for c, _ in DOT_HELP)
                click.echo("\n".join(f"{c.ljust(width)}  {h}" for c, h in DOT_HELP))
                click.echo("SQL: end each statement with ';'; tables you CREATE live in this session only.")
            elif cmd == ".tables":
                self.show(["name", "kind"], self.session.tables())
            elif cmd == ".schema":
                names = [arg] if arg else [n for n, _ in self.session.tables()]
                self.show(["table", "column", "type"], [(n, c, t) for n in names for c, t in self.session.describe(n)])
            elif cmd == ".functions":
                self.show(["name", "kind", "signature"], self.session.functions())
            elif cmd == ".mode" and arg in FORMATS:
                self.fmt = arg
            elif cmd == ".timer" and arg in ("on", "off"):
                self.timer = arg == "on"
            else:
                click.echo(f"Error: {_dot_usage(cmd, arg)}", err=True)
                return "error"
        except DynstoreError as exc:
            click.echo(f"Error: {exc}", err=True)
            return "error"
        return "ok"


def _dot_usage(cmd: str, arg: str) -> str:
    if cmd == ".mode":
        return f".mode {arg or '?'}: use one of {', '.join(FORMATS)}"
    if cmd == ".timer":
        return ".timer on|off"
    return f"unknown command {cmd}; .help lists them"


def _damaged(path, exc: BaseException):
    """The store's damaged file behind a failed statement (a StoreCorrupt naming it and
    the way out), or None when Lance reported no damage."""
    from dynstore.storage.catalog import find_damage
    from dynstore.errors import StoreCorrupt

    return None if isinstance(exc, StoreCorrupt) else find_damage(path, exc)
