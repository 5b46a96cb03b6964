"""User SQL checked against DuckDB before it is stored: labelling rules and conditions."""
from __future__ import annotations

import duckdb

from .config import StoreConfig
from .errors import ConfigError, first_line

__all__ = ["expression_error", "validate_rules"]


def expression_error(con: duckdb.DuckDBPyConnection, expr: str, relation: str) -> str | None:
    """Why ``expr`` is not one SQL expression over ``relation``'s columns, or None.

    The expression is parsed on its own first, so a syntax error quotes only
    text the user wrote (not the query dynstore wraps it in), and text that
    would close the wrapper's parentheses (``a) OR (b``) is refused.

    >>> con = duckdb.connect(); _ = con.execute("CREATE TABLE t (x INT)")
    >>> expression_error(con, "x > 1", "t") is None, expression_error(con, "x) OR (1", "t") is not None
    (True, True)
    """
    if not expr or not expr.strip():
        return "empty expression"
    try:
        parsed = con.extract_statements(f"SELECT {expr}")
    except duckdb.Error as exc:
        return first_line(exc)
    if len(parsed) != 1:
        return "expected one expression, found several statements (remove the ';')"
    try:
        con.execute(f"SELECT ({expr}) FROM {relation} LIMIT 0")
    except duckdb.Error as exc:
        return first_line(exc)
    return None


def validate_rules(cfg: StoreConfig) -> None:
    """Check the labelling rules of ``cfg`` against DuckDB; :class:`ConfigError` names the bad one."""
    con = duckdb.connect()
    con.execute("CREATE TABLE interactions (user_id BIGINT, item_id BIGINT, ts TIMESTAMP, "
                "event VARCHAR, value DOUBLE)")
    try:
        for name, expr in (("positive", cfg.positive), ("negative", cfg.negative)):
            why = expression_error(con, expr, "interactions")
            if why is None:
                try:
                    con.execute(f"SELECT CAST(({expr}) AS BOOLEAN) FROM interactions")
                except duckdb.Error as exc:
                    why = first_line(exc)
            if why is not None:
                raise ConfigError(f"--{name} {expr!r} is not a valid rule over interaction columns "
                                  f"(user_id, item_id, ts, event, value): {why}")
    finally:
        con.close()
