"""SQL: the surface analysts use, on top of every other wing.

The ``.sql`` files here (schema, views, macros, examples) are package data;
beside them, :mod:`dynstore.sql.session` builds DuckDB connections and
``dynstore sql`` sessions, :mod:`dynstore.sql.functions` is the one registry
of SQL functions (dynstore's own and users'), and :mod:`dynstore.sql.builtins`
holds dynstore's own functions, registered explicitly when a session opens.
SQL functions see the store through :class:`~dynstore.sql.functions.SqlHost`.
May import: every wing below (``storage`` ... ``serving``) and the top-level
helpers; never :mod:`dynstore.store` (the façade above it).
"""
