"""Item documents: the SQL that renders each item's text.

The document expression is SQL over item columns (``init --item-text``); the
default joins every text-like column as ``name: value``. With the behaviour
summary switched on, a short text rendered from recent interactions (items
picked with it, its dominant audience) is appended, so a change in behaviour
changes the document, its hash, and therefore its vector.
"""
from __future__ import annotations

from dynstore.storage.catalog import Catalog
from dynstore.sqltext import lit, q, sql_text

__all__ = ["item_document_sql", "default_item_text"]

#: Days of interactions the behaviour summary looks back over.
BEHAVIOUR_WINDOW_DAYS = 30

_TEXT_TYPES = ("string", "large_string", "string_view")


def _columns(catalog: Catalog, name: str) -> list[tuple[str, str]]:
    ds = catalog.dataset(name)
    if ds is None:
        return []
    return [(f.name, str(f.type)) for f in ds.schema]


def default_item_text(catalog: Catalog) -> str:
    """``concat_ws`` of every text-like item column as ``name: value``.

    Examples
    --------
    Items with ``title`` and ``category`` columns render as::

        title: Trail Runner
        category: shoes
    """
    parts = []
    for name, typ in _columns(catalog, "items"):
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


def item_document_sql(catalog: Catalog) -> str:
    """The SELECT producing ``(item_id, document)`` for every item."""
    cfg = catalog.config
    expr = cfg.item_text.strip() or default_item_text(catalog)
    text = sql_text("documents.sql")
    if cfg.behaviour_summary and catalog.dataset("interactions") is not None:
        cols = dict(_columns(catalog, "items"))
        title = "o.title" if "title" in cols else ("o.name" if "name" in cols else "NULL")
        seg_cols = [n for n, t in _columns(catalog, "users") if n != "user_id" and t in _TEXT_TYPES]
        segment = ("concat_ws(' ', " + ", ".join(f"u.{q(c)}" for c in seg_cols) + ")") if seg_cols else "NULL"
        behaviour = (sql_text("behaviour.sql").replace("{{title}}", title).replace("{{segment}}", segment)
                     .replace("{{window_days}}", str(BEHAVIOUR_WINDOW_DAYS)))
        text = (text.replace("{{behaviour}}", "b.summary")
                .replace("{{behaviour_join}}", f"LEFT JOIN ({behaviour}) b ON b.item_id = i.item_id"))
    else:
        text = text.replace("{{behaviour}}", "NULL").replace("{{behaviour_join}}", "")
    return text.replace("{{item_text}}", expr)
