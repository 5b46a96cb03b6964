"""Engines: batch work on an existing distributed engine (Ray), imported only when asked for.

May import: the top-level helpers and ``storage``.
"""
