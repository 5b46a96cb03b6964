"""SQL functions: one registry for dynstore's own and for users' functions.

dynstore's built-in functions (``recommend``, ``embed`` ...) are registered
with :func:`sql_function` exactly as a user registers their own, so every
connection from :meth:`Store.connection` and ``dynstore sql`` carries both.

Examples
--------
>>> import dynstore
>>> @dynstore.sql_function("shout", ["VARCHAR"], "VARCHAR", vectorized=False)
... def shout(store, text):
...     return text.upper() + "!"
>>> import tempfile
>>> dynstore.init(tempfile.mkdtemp() + "/s").sql("SELECT shout('hi')").fetchall()[0]
('HI!',)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import duckdb

from dynstore.storage.catalog import Catalog
from dynstore.errors import SqlError

__all__ = ["SqlHost", "sql_function", "register_sql_function", "apply_functions", "registered", "generation", "check_write_calls"]


class SqlHost(Protocol):
    """What a SQL connection is opened on and a SQL function is called with: the
    open store (:class:`dynstore.Store` is one), seen only through this narrow
    protocol, so the SQL layer needs nothing above it."""

    @property
    def catalog(self) -> Catalog: ...

    @property
    def read_only(self) -> bool: ...

    def pinned(self) -> "SqlHost": ...


@dataclass(frozen=True)
class SqlFunction:
    name: str
    fn: Callable[..., Any]
    parameters: tuple[str, ...] | Callable[[Any], Sequence[str]]
    return_type: str | Callable[[Any], str]
    vectorized: bool
    side_effects: bool


_REGISTRY: dict[str, SqlFunction] = {}
_GENERATION = 0  # bumped on every registration: open stores rebuild their connection


def register_sql_function(name: str, fn: Callable[..., Any], parameters, return_type, *,
                          vectorized: bool = True, side_effects: bool = False) -> None:
    """Make ``fn(store, *args)`` callable as ``name(args)`` in every connection.

    Parameters
    ----------
    name : str
        SQL name. Re-registering a name replaces the earlier function.
    fn : callable
        Called with the :class:`~dynstore.Store` first, then the SQL arguments:
        Arrow arrays when ``vectorized`` (return an Arrow array of the same
        length), else Python values for one row.
    parameters, return_type : DuckDB type strings, or callables of the store
        returning them (for types that depend on the store, e.g. its id type
        or the encoder's dimension).
    side_effects : bool
        True for functions that write. DuckDB drops a call whose result a
        query does not use (``SELECT count(*) FROM (SELECT f(x))``), so such
        functions run only in the top-level ``SELECT`` list of a statement
        given to :meth:`Store.sql <dynstore.Store.sql>`, a
        :class:`~dynstore.sql.session.SqlSession` or ``dynstore sql`` (see
        :func:`check_write_calls`), and are refused on raw connections.
    """
    global _GENERATION
    _REGISTRY[name] = SqlFunction(name, fn, tuple(parameters) if not callable(parameters) else parameters,
                                  return_type, vectorized, side_effects)
    _GENERATION += 1


def sql_function(name: str, parameters, return_type, **options) -> Callable:
    """Decorator form of :func:`register_sql_function`."""

    def wrap(fn):
        register_sql_function(name, fn, parameters, return_type, **options)
        return fn

    return wrap


def registered() -> list[str]:
    """Names of every registered SQL function."""
    return sorted(_REGISTRY)


def generation() -> int:
    """Changes whenever a function is (re-)registered; part of a store's connection state.

    A function registered after a store was opened reaches that store's next
    :meth:`~dynstore.Store.sql` call (and the ``dynstore sql`` prompt's next
    statement), not connections handed out before.
    """
    return _GENERATION


def _write_names() -> list[str]:
    return [f.name for f in _REGISTRY.values() if f.side_effects]


def check_write_calls(query: str) -> None:
    """Refuse ``query`` when a write function appears anywhere but in the select list
    of a top-level ``SELECT``, where DuckDB might drop the call and the write with it.

    Examples
    --------
    >>> check_write_calls("SELECT log_impressions(1, [2, 3])")
    >>> check_write_calls("SELECT count(*) FROM (SELECT log_impressions(1, [2]))")
    Traceback (most recent call last):
    ...
    dynstore.errors.SqlError: log_impressions(...) writes, so it must stand in the select list of the outermost SELECT (e.g. SELECT log_impressions(user_id, items) FROM shown): DuckDB leaves out calls whose result the query does not use, and the write with them
    """
    import json

    import duckdb

    from dynstore.errors import SqlError

    low = query.lower()
    names = [n for n in _write_names() if n.lower() in low]
    if not names:
        return
    con = duckdb.connect()  # only the parser is needed: keep the caller's connection free
    try:
        try:
            statements = con.extract_statements(query)
        except duckdb.Error:
            return  # DuckDB reports the syntax error when the statement runs
        for st in statements:
            text = st.query
            called = [n for n in names if n.lower() in text.lower()]
            if not called:
                continue
            why = (f"{called[0]}(...) writes, so it must stand in the select list of the outermost SELECT "
                   f"(e.g. SELECT {called[0]}(user_id, items) FROM shown): DuckDB leaves out calls whose "
                   "result the query does not use, and the write with them")
            if st.type.name != "SELECT":
                raise SqlError(why)
            tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [text]).fetchone()[0])
            if tree.get("error"):
                continue
            node = tree["statements"][0]["node"]
            total = _count_calls(node, called, into_subqueries=True)
            allowed = (_count_calls(node.get("select_list", []), called, into_subqueries=False)
                       if node.get("type") == "SELECT_NODE" else 0)
            if total != allowed:
                raise SqlError(why)
    finally:
        con.close()


def _count_calls(tree, names: list[str], *, into_subqueries: bool) -> int:
    """Calls of ``names`` in a json_serialize_sql tree (subqueries optional)."""
    if isinstance(tree, list):
        return sum(_count_calls(x, names, into_subqueries=into_subqueries) for x in tree)
    if not isinstance(tree, dict):
        return 0
    if not into_subqueries and tree.get("class") == "SUBQUERY":
        return 0
    own = int(tree.get("class") == "FUNCTION" and str(tree.get("function_name", "")).lower()
              in {n.lower() for n in names})
    return own + sum(_count_calls(v, names, into_subqueries=into_subqueries) for v in tree.values()
                     if isinstance(v, (dict, list)))


def _guarded(f: SqlFunction) -> Callable[..., Any]:
    """``f.fn``, refusing to write unless the statement was checked (see :func:`check_write_calls`)."""

    @functools.wraps(f.fn)  # DuckDB reads the parameters from the signature
    def call(store: SqlHost, *args):
        if not store.catalog.writes_checked:
            raise SqlError(f"{f.name}(...) writes to the store; run it through Store.sql, a SqlSession or "
                           "`dynstore sql` (raw connections cannot make sure DuckDB keeps the call)")
        return f.fn(store, *args)

    return call


def apply_functions(store: SqlHost, con: "duckdb.DuckDBPyConnection", *, replace: bool = False) -> None:
    """Register every function on ``con`` (a DuckDB connection), bound to ``store``.

    With ``replace``, functions ``con`` already has are dropped first.
    """
    for f in _REGISTRY.values():
        if replace:
            try:
                con.remove_function(f.name)
            except duckdb.Error:
                pass  # not registered on this connection yet
        params = f.parameters(store) if callable(f.parameters) else f.parameters
        ret = f.return_type(store) if callable(f.return_type) else f.return_type
        con.create_function(
            f.name,
            functools.partial(_guarded(f) if f.side_effects else f.fn, store),
            # con.type, not duckdb.type: the latter opens DuckDB's default
            # connection, ~30 ms of every start-up
            [con.type(p) for p in params],
            con.type(ret),
            type="arrow" if f.vectorized else "native",
            null_handling="special",
            side_effects=f.side_effects,
        )
