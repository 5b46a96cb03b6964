"""The store's datasets and views on a DuckDB connection (``sql/views.sql``).

DuckDB is only the SQL engine: every connection is in-memory and scans the
Lance datasets through Arrow, so a reader never holds a file lock that could
keep a cron ``refresh`` out. :func:`attach_views` is what every connection
gets; :mod:`dynstore.sql.session` adds the functions and macros on top.
"""
from __future__ import annotations

import os

import duckdb
import pyarrow as pa

from dynstore.storage.catalog import TABLES, Catalog
from dynstore.data.documents import item_document_sql
from dynstore.errors import ConfigError, first_line
from dynstore.storage.registry import embedding_schema, registry_table
from dynstore.data.rules import label_sql
from dynstore.encoders.cache import encoder_info, register_cache
from dynstore.sqltext import lit, sql_text, statements

__all__ = ["attach_views", "create_views", "new_connection", "views_connection", "check_item_text",
           "BATCH_TABLE", "batch_schema"]

#: The dataset (and SQL view) ``score-all`` writes: every user's top-k of one version.
BATCH_TABLE = "batch_recommendations"


def new_connection() -> duckdb.DuckDBPyConnection:
    """An empty in-memory DuckDB connection as dynstore runs them (UTC, every core)."""
    con = duckdb.connect(config={"threads": max(1, os.cpu_count() or 1)})
    con.execute("SET TimeZone = 'UTC'")
    return con


def views_connection(catalog: Catalog) -> duckdb.DuckDBPyConnection:
    """A connection with the views only (no functions, no macros), on one snapshot:
    what dynstore's own reads of the data need, at a third of the cost."""
    view = catalog if catalog.is_pinned else catalog.pinned()
    con = new_connection()
    attach_views(view, con)
    return con


def attach_views(catalog: Catalog, con: duckdb.DuckDBPyConnection) -> None:
    """Register the datasets of ``catalog`` on ``con`` and create the views over them."""
    register_datasets(catalog, con)
    create_views(catalog, con, ("views.sql",))


def _empty_tables(catalog: Catalog) -> dict[str, pa.Schema]:
    id_type = {"int": pa.int64(), "string": pa.string()}
    user_t, item_t = id_type[catalog.id_type("user")], id_type[catalog.id_type("item")]
    return {
        "interactions": pa.schema([("user_id", user_t), ("item_id", item_t), ("ts", pa.timestamp("us")),
                                   ("event", pa.string()), ("value", pa.float64())]),
        "items": pa.schema([("item_id", item_t)]),
        "users": pa.schema([("user_id", user_t)]),
    }


def batch_schema(catalog: Catalog) -> pa.Schema:
    """Columns of :data:`BATCH_TABLE`: ``user_id, rank`` (1 = best), ``item_id, score, version``."""
    id_type = {"int": pa.int64(), "string": pa.string()}
    return pa.schema([("user_id", id_type[catalog.id_type("user")]), ("rank", pa.int32()),
                      ("item_id", id_type[catalog.id_type("item")]), ("score", pa.float64()),
                      ("version", pa.int64())])


def register_datasets(catalog: Catalog, con: duckdb.DuckDBPyConnection) -> None:
    """``_dynstore_<table>``, the semantic cache, the registry, the embeddings and the
    batch recommendations on ``con``."""
    empties = _empty_tables(catalog)
    empties[BATCH_TABLE] = batch_schema(catalog)
    for name in TABLES + (BATCH_TABLE,):
        ds = catalog.dataset(name)
        con.register(f"_dynstore_{name}", ds if ds is not None else empties[name].empty_table())
    register_cache(catalog, con)
    register_versions(catalog, con)


def create_views(catalog: Catalog, con: duckdb.DuckDBPyConnection, files: tuple[str, ...]) -> None:
    """Run dynstore's ``.sql`` files on ``con``, rendered with the store's rules."""
    for name in files:
        for stmt in statements(render_sql(catalog, sql_text(name))):
            try:
                con.execute(stmt)
            except duckdb.Error as exc:
                # A document expression or labelling rule that no longer binds
                # (a column was never ingested, a hand-edited config) must not
                # make the whole store unusable: only queries that need
                # documents (labels) fail, with the reason.
                if "VIEW item_documents" in stmt:
                    con.execute(_broken_documents_view(catalog, exc))
                elif "VIEW interactions AS" in stmt:
                    con.execute(_broken_labels_view(catalog, exc))
                else:
                    raise


def render_sql(catalog: Catalog, text: str) -> str:
    """Fill the ``{{label}}`` and ``{{item_document}}`` placeholders."""
    cfg = catalog.config
    repl = {"{{label}}": label_sql(cfg), "{{item_document}}": item_document_sql(catalog)}
    for key, val in repl.items():
        text = text.replace(key, val)
    return text


def _broken_documents_view(catalog: Catalog, exc: Exception) -> str:
    msg = f"item document expression {catalog.config.item_text!r} does not bind: {first_line(exc)}"
    return (f"CREATE OR REPLACE VIEW item_documents AS SELECT CAST(NULL AS {catalog.sql_id_type('item')}) AS item_id, "
            f"CAST(error({lit(msg)}) AS VARCHAR) AS document, CAST(NULL AS VARCHAR) AS doc_hash "
            "WHERE (SELECT count(*) FROM items) > 0")


def _broken_labels_view(catalog: Catalog, exc: Exception) -> str:
    cfg = catalog.config
    msg = (f"labelling rules (positive {cfg.positive!r}, negative {cfg.negative!r}) do not "
           f"bind to the interactions: {first_line(exc)}; fix them with `dynstore config --positive/--negative`")
    return (f"CREATE OR REPLACE VIEW interactions AS SELECT *, CAST(error({lit(msg)}) AS TINYINT) AS label "
            "FROM _dynstore_interactions")


def check_item_text(catalog: Catalog) -> None:
    """Fail with :class:`ConfigError` if the document expression does not bind."""
    expr = catalog.config.item_text
    if not expr.strip():
        return
    parser = duckdb.connect()
    try:
        parser.extract_statements(f"SELECT {expr}")  # syntax, in the user's own words
    except duckdb.Error as exc:
        raise ConfigError(f"--item-text {expr!r} is not a valid expression over item columns: "
                          f"{first_line(exc)}") from None
    finally:
        parser.close()
    con = views_connection(catalog)
    try:
        con.sql("SELECT document FROM item_documents LIMIT 1").fetchall()
    except duckdb.Error as exc:
        first = first_line(exc).split("does not bind: ", 1)[-1]
        raise ConfigError(f"--item-text {expr!r} is not a valid expression over item columns: {first}") from None
    finally:
        con.close()


def register_versions(catalog: Catalog, con) -> None:
    """Expose the registry and embeddings to SQL (empty until the first version)."""
    ds = catalog.dataset("versions")
    if ds is None or "verdict" not in ds.schema.names:
        con.register("_dynstore_versions", registry_table(catalog))  # tiny; fills in verdicts of old registries
    else:
        con.register("_dynstore_versions", ds)
    emb = catalog.dataset("embeddings")
    if emb is None:
        emb = embedding_schema(catalog, encoder_info(catalog)[1]).empty_table()
    con.register("_dynstore_embeddings", emb)
