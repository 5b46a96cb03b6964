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
from typing import Any, Callable, Sequence

__all__ = ["sql_function", "register_sql_function", "apply", "registered", "generation"]


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
        True for functions that write (DuckDB must not cache or fold them).
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
    _load_builtins()
    return sorted(_REGISTRY)


def generation() -> int:
    """Changes whenever a function is (re-)registered; part of a store's connection state.

    A function registered after a store was opened reaches that store's next
    :meth:`~dynstore.Store.sql` call (and the ``dynstore sql`` prompt's next
    statement), not connections handed out before.
    """
    _load_builtins()
    return _GENERATION


def _load_builtins() -> None:
    from . import builtins  # noqa: F401  (registers on import)


def apply(store, con, *, replace: bool = False) -> None:
    """Register every function on ``con`` (a DuckDB connection), bound to ``store``.

    With ``replace``, functions ``con`` already has are dropped first.
    """
    import duckdb

    _load_builtins()
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
            functools.partial(f.fn, store),
            # con.type, not duckdb.type: the latter opens DuckDB's default
            # connection, ~30 ms of every start-up
            [con.type(p) for p in params],
            con.type(ret),
            type="arrow" if f.vectorized else "native",
            null_handling="special",
            side_effects=f.side_effects,
        )
