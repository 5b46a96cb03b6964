"""Serving: the read path from a version to ranked lists.

Owns the serving state (one version's matrix, histories and behaviour, kept
current), exact and indexed top-k, low-precision prefilters and ``score-all``.
May import: the top-level helpers, ``storage``, ``engines``, ``encoders``,
``data`` (reads: views, rules, semantic vectors), ``model`` and ``versions``
(loading a version); never the writes (ingest, training, compaction, refresh).
"""
