"""Storage: where a store's bytes live and how they are opened.

Owns the store config (``dynstore.toml``), the storage backends (a local
directory or an object-store prefix), writer locks and leases, Lance scan
settings, the version registry dataset and the :class:`~dynstore.storage.catalog.Catalog`
that every layer above receives. May import: the top-level helpers
(``errors``, ``lazy``, ``memory``, ``results``, ``formatting``, ``sqltext``) only.
"""
