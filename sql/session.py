"""SQL sessions: one DuckDB connection for a sequence of statements.

``dynstore sql`` (a query given on the command line or the interactive
prompt) runs every statement through a :class:`SqlSession`:

* before each statement the session follows the store: new commits, a
  changed config or a function registered since the last statement are
  attached to the same connection (datasets re-registered, views and macros
  re-created, functions replaced), so a prompt left open sees what a cron
  ``refresh`` or ``ingest`` wrote;
* tables, views and macros a user creates (``CREATE TABLE t AS ...``) are
  **session-scoped**: they live in this connection's memory, never in the
  store, and are gone when the session ends;
* the store's own views (``items``, ``interactions`` ...) are read-only in
  SQL: ``INSERT``/``UPDATE``/``DELETE`` on them is refused with a message
  that names the command which changes the data;
* errors raised by dynstore's functions read as their own message, without
  DuckDB's "Python exception occurred while executing the UDF" wrapping.

Examples
--------
>>> import tempfile, dynstore
>>> store = dynstore.init(tempfile.mkdtemp() + "/s", model="fake")
>>> session = SqlSession(store)
>>> [r.rows for r in session.run_all("CREATE TABLE t AS SELECT 41 AS x; SELECT x + 1 AS y FROM t")]
[[], [(42,)]]
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import duckdb

from dynstore.sql.builtins import id_type_hint, register_builtins
from dynstore.errors import DynstoreError, SqlError, error_from, error_message
from dynstore.sql.functions import SqlHost, apply_functions, check_write_calls, generation, registered
from dynstore.encoders.cache import snapshot
from dynstore.sqltext import sql_text
from dynstore.data.views import attach_views, create_views, new_connection


__all__ = ["SqlSession", "Result", "error_message", "error_from", "STORE_VIEWS", "open_connection", "follow",
           "connection_state", "with_position", "id_type_hint"]

#: Views every connection gets from the store (every view ``sql/views.sql`` creates).
STORE_VIEWS = tuple(re.findall(r"^CREATE OR REPLACE VIEW (\w+)", sql_text("views.sql"), re.M))

_POSITION = re.compile(r"^LINE \d+:.*\n[ \t]*\^+", re.M)

_WRITES = ("INSERT", "UPDATE", "DELETE", "MERGE_INTO")


@dataclass
class Result:
    """What one statement returned: column names and rows (none for DDL)."""

    query: str
    kind: str                       # DuckDB statement type: SELECT, CREATE, INSERT, ...
    columns: list[str] = field(default_factory=list)
    rows: list[tuple] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def creates(self) -> str | None:
        """Name of the session object a CREATE made (for the "session only" note)."""
        if self.kind != "CREATE":
            return None
        m = re.search(r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:TEMP(?:ORARY)?\s+)?(?:TABLE|VIEW|MACRO|SEQUENCE|TYPE)\s+"
                      r"(?:IF\s+NOT\s+EXISTS\s+)?([\w.\"]+)", self.query, re.I)
        return m.group(1) if m else "the object"


def open_connection(store: SqlHost, *, checked: bool = False) -> duckdb.DuckDBPyConnection:
    """A new DuckDB connection with every view, function and macro, pinned to the
    store's commits as of this call (see :meth:`Store.connection <dynstore.Store.connection>`).

    ``checked``: the caller checks every statement (:func:`check_write_calls`),
    so write functions may run on this connection.
    """
    register_builtins()
    view = store if store.catalog.is_pinned else store.pinned()
    view.catalog.writes_checked = checked
    con = new_connection()
    attach(view, con)
    if store.read_only:
        # Set last: the views above needed no file access, and once
        # locked, SQL cannot turn external access back on.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def attach(view: SqlHost, con: duckdb.DuckDBPyConnection, *, again: bool = False) -> None:
    """Register datasets, views, functions and macros of a pinned ``view`` on ``con``.

    ``again`` re-attaches an existing connection to the latest commits:
    functions are replaced, views and macros are ``CREATE OR REPLACE``; the
    session's own tables stay.
    """
    attach_views(view.catalog, con)
    apply_functions(view, con, replace=again)
    create_views(view.catalog, con, ("macros.sql",))


def follow(store: SqlHost, con: duckdb.DuckDBPyConnection, *, checked: bool) -> None:
    """Move ``con`` to the latest commits (views, macros and functions re-created)."""
    base = store.catalog.latest
    base.reload_config()
    view = store.pinned()
    view.catalog.writes_checked = checked
    attach(view, con, again=True)


def connection_state(store: SqlHost) -> tuple:
    """What a connection was built from: config, dataset versions, registered functions."""
    register_builtins()
    cat = store.catalog.latest
    return (cat.config_stamp(), tuple(sorted(snapshot(cat).items())), generation())


def with_position(exc: BaseException, message: str) -> str:
    """``message`` followed by DuckDB's ``LINE n: ...`` line and its caret, when ``exc`` has them.

    >>> import duckdb
    >>> print(with_position(duckdb.ParserException('Parser Error: syntax error at or near "SELEC"\\n\\n'
    ...                                            'LINE 2: SELEC 2;\\n        ^'), "syntax error"))
    syntax error
    LINE 2: SELEC 2;
            ^
    """
    m = _POSITION.search(str(exc))
    return f"{message}\n{m.group(0)}" if m and m.group(0) not in message else message


class SqlSession:
    """A DuckDB connection that follows the store between statements.

    Parameters
    ----------
    store : dynstore.Store
        The open store; ``store.read_only`` makes the session read-only too
        (no writes, no file access outside the store).
    params : dict, optional
        Values of named parameters: a statement that says ``$name`` gets
        ``params["name"]`` (each statement only the ones it names).

    An error keeps DuckDB's position (its ``LINE n:`` line and the caret under
    it) after the one-line message; statements given with leading newlines
    (a script's line offset) are numbered from the start of the script.
    """

    def __init__(self, store: SqlHost, params: dict[str, Any] | None = None):
        self.store = store
        self.params = dict(params or {})
        self._state = connection_state(store)
        self.con = open_connection(store, checked=True)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "SqlSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _follow(self) -> None:
        """Attach commits, config changes and new functions made since the last statement."""
        state = connection_state(self.store)
        if state == self._state:
            return
        follow(self.store, self.con, checked=True)
        self._state = state

    def statements(self, text: str) -> list[Any]:
        """Split ``text`` into DuckDB statements (each has ``.query`` and ``.type``)."""
        try:
            return list(self.con.extract_statements(text))
        except duckdb.Error as exc:
            raise DynstoreError(with_position(exc, error_message(exc))) from None

    def run(self, statement: Any) -> Result:
        """Run one statement (a string or an item of :meth:`statements`)."""
        if isinstance(statement, str):
            parsed = self.statements(statement)
            if len(parsed) != 1:
                raise DynstoreError(f"expected one statement, got {len(parsed)}")
            statement = parsed[0]
        query = statement.query.strip()
        kind = statement.type.name
        self._follow()
        check_write_calls(query)
        params = self._params(statement)
        t0 = time.perf_counter()
        try:
            # leading newlines kept: DuckDB numbers the LINE of an error from the script's start
            cur = self.con.execute(statement.query.rstrip(), params)
            # CREATE ... AS reports a row count nobody asked for; INSERT's count is kept
            columns = [d[0] for d in cur.description] if cur.description and kind != "CREATE" else []
            rows = cur.fetchall() if columns else []
        except duckdb.Error as exc:
            raise error_from(exc, self._explain(exc, kind, query)) from None
        return Result(query, kind, columns, rows, time.perf_counter() - t0)

    def _params(self, statement: Any) -> dict[str, Any] | None:
        """The values of the named parameters ``statement`` uses (None when it uses none)."""
        names = getattr(statement, "named_parameters", None) or set()
        if not names:
            return None
        missing = sorted(n for n in names if n not in self.params)
        if missing:
            given = f" (given: {', '.join(sorted(self.params))})" if self.params else ""
            raise SqlError(f"the statement uses ${missing[0]} but no value was given for it{given}: "
                           f"add -p {missing[0]} VALUE (`dynstore sql`), or params={{{missing[0]!r}: ...}}")
        return {n: self.params[n] for n in names}

    def run_all(self, text: str) -> Iterator[Result]:
        """Run every statement of ``text`` in order, yielding each result."""
        for statement in self.statements(text):
            yield self.run(statement)

    def interrupt(self) -> None:
        """Cancel the statement running on this session (from another thread)."""
        self.con.interrupt()

    def _explain(self, exc: BaseException, kind: str, query: str) -> str:
        msg = error_message(exc)
        hint = id_type_hint(self.store, str(exc), query)
        if hint:
            return hint
        if kind in _WRITES and ("base table" in msg or "is not an table" in msg or "is not a table" in msg):
            name = re.search(r"^\s*(?:UPDATE|DELETE\s+FROM|INSERT\s+(?:OR\s+\w+\s+)?INTO|MERGE\s+INTO)\s+\"?(\w+)",
                             query, re.I)
            what = (f"{name.group(1)} is one of the store's tables, read-only" if name else
                    "the store's tables are read-only")
            return (f"{what} in SQL (tables you CREATE are not): change data with `dynstore ingest` or "
                    "`dynstore delete`")
        return with_position(exc, msg)

    # -- what the prompt's dot commands show ------------------------------------------
    def tables(self) -> list[tuple[str, str]]:
        """``(name, kind)`` of the store's views and the session's own tables and views."""
        self._follow()
        rows = self.con.execute(
            "SELECT table_name, table_type FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_name NOT LIKE '\\_dynstore%' ESCAPE '\\' "
            "ORDER BY table_name").fetchall()
        out = []
        for name, typ in rows:
            if name in STORE_VIEWS:
                out.append((name, "store"))
            else:
                out.append((name, "session " + ("table" if typ == "BASE TABLE" else "view")))
        return out

    def describe(self, name: str) -> list[tuple[str, str]]:
        """``(column, type)`` of a table or view."""
        self._follow()
        try:
            rows = self.con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position", [name]).fetchall()
        except duckdb.Error as exc:
            raise DynstoreError(error_message(exc)) from None
        if not rows:
            raise DynstoreError(f"no table or view named {name!r}; .tables lists them")
        return rows

    def functions(self) -> list[tuple[str, str, str]]:
        """``(name, kind, signature)`` of dynstore's SQL functions and macros."""
        self._follow()
        names = [n for n in registered() if not n.startswith("_")] + ["recommend", "recommendations",
                                                                        "item_vector"]
        rows = self.con.execute(
            "SELECT function_name, function_type, parameters, parameter_types, return_type "
            "FROM duckdb_functions() WHERE function_name IN (SELECT unnest(?)) "
            "ORDER BY function_name, len(parameters)", [sorted(set(names))]).fetchall()
        out = []
        for name, typ, params, types, ret in rows:
            # Python functions have no parameter names (DuckDB calls them col0, col1 ...): types only
            args = ", ".join(t if t and re.fullmatch(r"col\d+", p) else (f"{p} {t}" if t else p)
                             for p, t in zip(params or [], types or [None] * len(params or [])))
            out.append((name, "macro" if "macro" in typ else "function", f"{name}({args})" + (f" -> {ret}" if ret else "")))
        return out
