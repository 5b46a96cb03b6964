"""dynstore: an embedded store for recommender systems.

Interactions, user and item attributes, and versioned fused item embeddings
(``w_i = v_i + alpha * W a_i``, a BERT text vector fused with attribute
features), queried from SQL in-process.

Examples
--------
>>> import tempfile, dynstore
>>> store = dynstore.init(tempfile.mkdtemp() + "/shop")
>>> with dynstore.connect(store.path) as s:
...     s.sql("SELECT count(*) FROM interactions").fetchall()[0]
(0,)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dynstore.errors import DynstoreError, StoreBusy, VersionNotFound

if TYPE_CHECKING:  # pragma: no cover
    from dynstore.sql.functions import register_sql_function, sql_function
    from dynstore.store import Store, connect, init

__version__ = "0.1.0"

# Imported on first use, so that `import dynstore` (and `dynstore --help`)
# stays cheap: duckdb, Lance and Arrow load with the first store opened,
# torch and transformers only when a statement needs a vector.
_LAZY = {"connect": "dynstore.store", "init": "dynstore.store", "Store": "dynstore.store",
         "sql_function": "dynstore.sql.functions", "register_sql_function": "dynstore.sql.functions"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dynstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value

__all__ = [
    "connect",
    "init",
    "Store",
    "DynstoreError",
    "StoreBusy",
    "VersionNotFound",
    "sql_function",
    "register_sql_function",
]
