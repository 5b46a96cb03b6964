"""User SQL checked against DuckDB before it is stored: labelling rules and conditions."""
from __future__ import annotations

import duckdb

from dynstore.storage.config import StoreConfig
from dynstore.errors import ConfigError, first_line

__all__ = ["expression_error", "condition_error", "validate_rules", "label_sql"]


def label_sql(cfg: StoreConfig) -> str:
    """The SQL that labels an interaction: 1 positive, -1 negative, 0 neither.

    The one place the labelling rules become SQL (the ``interactions`` view,
    serving's labeller and ``delete`` all use it).

    >>> label_sql(StoreConfig(positive="value > 0", negative="value <= 0"))
    'CAST(CASE WHEN (value > 0) THEN 1 WHEN (value <= 0) THEN -1 ELSE 0 END AS TINYINT)'
    """
    return f"CAST(CASE WHEN ({cfg.positive}) THEN 1 WHEN ({cfg.negative}) THEN -1 ELSE 0 END AS TINYINT)"


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


def condition_error(con: duckdb.DuckDBPyConnection, expr: str, relation: str) -> str | None:
    """Why ``expr`` is not a boolean condition over ``relation`` (see :func:`expression_error`), or None.

    >>> con = duckdb.connect(); _ = con.execute("CREATE TABLE t (x INT)")
    >>> condition_error(con, "x > 1", "t") is None
    True
    >>> condition_error(con, "y > 1", "t")
    'Binder Error: Referenced column "y" not found in FROM clause!'
    """
    why = expression_error(con, expr, relation)
    if why is None:
        try:
            con.execute(f"SELECT CAST(({expr}) AS BOOLEAN) FROM {relation} LIMIT 0")
        except duckdb.Error as exc:
            why = first_line(exc)
    return why


def validate_rules(cfg: StoreConfig) -> None:
    """Check the labelling rules of ``cfg`` against DuckDB; :class:`ConfigError` names the bad one."""
    con = duckdb.connect()
    con.execute("CREATE TABLE interactions (user_id BIGINT, item_id BIGINT, ts TIMESTAMP, "
                "event VARCHAR, value DOUBLE)")
    try:
        for name, expr in (("positive", cfg.positive), ("negative", cfg.negative)):
            why = condition_error(con, expr, "interactions")
            if why is not None:
                raise ConfigError(f"--{name} {expr!r} is not a valid rule over interaction columns "
                                  f"(user_id, item_id, ts, event, value): {why}")
    finally:
        con.close()
