"""Data: the tables and what is derived from them by SQL.

Owns ingest, delete and compaction (the writes), labelling rules, item
documents, the DuckDB views over the Lance datasets, impressions, and semantic
vectors (stale detection, incremental encoding, the catalogue's vectors).
May import: the top-level helpers, ``storage``, ``engines``, ``encoders``.
"""
