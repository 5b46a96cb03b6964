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

from .errors import DynstoreError, StoreBusy, VersionNotFound
from .functions import register_sql_function, sql_function
from .store import Store, connect, init

__version__ = "0.1.0"

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
