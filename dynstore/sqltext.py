"""dynstore's own SQL files (``sql/*.sql``): read, render and split into statements."""
from __future__ import annotations

from importlib import resources

__all__ = ["sql_text", "statements"]


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
