"""SQL text: quoting identifiers and literals, and dynstore's own SQL files (``sql/*.sql``).

Imports nothing of dynstore: the read path (views, documents) and the write
path (ingest) both quote with it.
"""
from __future__ import annotations

from importlib import resources

__all__ = ["q", "lit", "sql_text", "statements"]


def q(name: str) -> str:
    """Quote an SQL identifier.

    >>> q('a"b')
    '"a""b"'
    """
    return '"' + name.replace('"', '""') + '"'


def lit(value: str) -> str:
    """Quote an SQL string literal.

    >>> lit("it's")
    "'it''s'"
    """
    return "'" + value.replace("'", "''") + "'"


def sql_text(name: str) -> str:
    """The text of ``sql/<name>`` as shipped in the package.

    >>> "CREATE OR REPLACE VIEW items" in sql_text("views.sql")
    True
    """
    return resources.files("dynstore.sql").joinpath(name).read_text(encoding="utf-8")


def statements(text: str) -> list[str]:
    """Split one of dynstore's own .sql files into statements (';' ends a line).

    >>> statements("-- a comment\\nSELECT 1;\\nSELECT\\n  2;")
    ['SELECT 1;', 'SELECT\\n  2;']
    """
    out, buf = [], []
    for line in text.splitlines():
        if line.lstrip().startswith("--") and not buf:
            continue
        buf.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(buf))
            buf = []
    if "".join(buf).strip():
        out.append("\n".join(buf))
    return out
