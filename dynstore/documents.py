"""Item documents: the SQL that renders each item's text.

The document expression is SQL over item columns (``init --item-text``); the
default joins every text-like column as ``name: value``. With the behaviour
summary switched on, a short text rendered from recent interactions (items
picked with it, its dominant audience) is appended, so a change in behaviour
changes the document, its hash, and therefore its vector.
"""
from __future__ import annotations

from importlib import resources

from .errors import ConfigError
from .ingest import lit, q

__all__ = ["item_document_sql", "default_item_text", "check_item_text"]

#: Days of interactions the behaviour summary looks back over.
BEHAVIOUR_WINDOW_DAYS = 30

_TEXT_TYPES = ("string", "large_string", "string_view")


def _sql(name: str) -> str:
    return resources.files("dynstore.sql").joinpath(name).read_text(encoding="utf-8")


def _columns(store, name: str) -> list[tuple[str, str]]:
    ds = store._dataset(name)
    if ds is None:
        return []
    return [(f.name, str(f.type)) for f in ds.schema]


def default_item_text(store) -> str:
    """``concat_ws`` of every text-like item column as ``name: value``.

    Examples
    --------
    Items with ``title`` and ``category`` columns render as::

        title: Trail Runner
        category: shoes
    """
    parts = []
    for name, typ in _columns(store, "items"):
        if name == "item_id":
            continue
        if typ in _TEXT_TYPES:
            parts.append(f"CASE WHEN nullif(trim(i.{q(name)}), '') IS NOT NULL "
                         f"THEN {lit(name + ': ')} || i.{q(name)} END")
        elif typ.startswith(("list<", "large_list<")) and "string" in typ:
            parts.append(f"CASE WHEN len(i.{q(name)}) > 0 THEN {lit(name + ': ')} || "
                         f"array_to_string(i.{q(name)}, ', ') END")
    if not parts:
        return "CAST(NULL AS VARCHAR)"
    return "concat_ws(E'\\n', " + ", ".join(parts) + ")"


def item_document_sql(store) -> str:
    """The SELECT producing ``(item_id, document)`` for every item."""
    cfg = store.config
    expr = cfg.item_text.strip() or default_item_text(store)
    text = _sql("documents.sql")
    if cfg.behaviour_summary and store._dataset("interactions") is not None:
        cols = dict(_columns(store, "items"))
        title = "o.title" if "title" in cols else ("o.name" if "name" in cols else "NULL")
        seg_cols = [n for n, t in _columns(store, "users") if n != "user_id" and t in _TEXT_TYPES]
        segment = ("concat_ws(' ', " + ", ".join(f"u.{q(c)}" for c in seg_cols) + ")") if seg_cols else "NULL"
        behaviour = (_sql("behaviour.sql").replace("{{title}}", title).replace("{{segment}}", segment)
                     .replace("{{window_days}}", str(BEHAVIOUR_WINDOW_DAYS)))
        text = (text.replace("{{behaviour}}", "b.summary")
                .replace("{{behaviour_join}}", f"LEFT JOIN ({behaviour}) b ON b.item_id = i.item_id"))
    else:
        text = text.replace("{{behaviour}}", "NULL").replace("{{behaviour_join}}", "")
    return text.replace("{{item_text}}", expr)


def check_item_text(store) -> None:
    """Fail with :class:`ConfigError` if the document expression does not bind."""
    if not store.config.item_text.strip():
        return
    import duckdb

    parser = duckdb.connect()
    try:
        parser.extract_statements(f"SELECT {store.config.item_text}")  # syntax, in the user's own words
    except duckdb.Error as exc:
        raise ConfigError(f"--item-text {store.config.item_text!r} is not a valid expression over item columns: "
                          f"{str(exc).strip().splitlines()[0]}") from None
    finally:
        parser.close()
    con = store.connection()
    try:
        con.sql("SELECT document FROM item_documents LIMIT 1").fetchall()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        first = first.split("does not bind: ", 1)[-1]
        raise ConfigError(f"--item-text {store.config.item_text!r} is not a valid expression over item "
                          f"columns: {first}") from None
    finally:
        con.close()
