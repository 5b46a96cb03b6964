"""Exceptions dynstore raises on purpose.

Every error carries a one-line message meant for a person: the CLI prints
``str(error)`` and exits 1 (3 for :class:`StoreBusy`).
"""
from __future__ import annotations

__all__ = [
    "DynstoreError",
    "StoreNotFound",
    "StoreExists",
    "StoreFormatError",
    "StoreBusy",
    "IngestError",
    "IdTypeError",
    "ConfigError",
    "EncoderError",
    "VersionNotFound",
    "ReadOnlyError",
    "SqlError",
    "StorageError",
    "StoreCorrupt",
]


class DynstoreError(Exception):
    """Base class of every error dynstore raises on purpose."""


class StoreNotFound(DynstoreError, FileNotFoundError):
    """The path is not a dynstore store (no dynstore.toml)."""


class StoreExists(DynstoreError, FileExistsError):
    """``init`` was pointed at a directory that already holds files."""


class StoreFormatError(DynstoreError, ValueError):
    """The store was written by a newer dynstore or its config is damaged."""


class StoreBusy(DynstoreError, BlockingIOError):
    """Another writer of the same kind holds the store's lock."""


class IngestError(DynstoreError, ValueError):
    """A source was rejected whole; the message names file, row and column."""


class IdTypeError(IngestError, TypeError):
    """Ids of a conflicting type (integer vs string) for this store."""


class ConfigError(DynstoreError, ValueError):
    """A labelling rule, document expression or option is invalid."""


class EncoderError(DynstoreError, ValueError):
    """The encoder could not be loaded or run (bad path, not an encoder model)."""


class VersionNotFound(DynstoreError, KeyError):
    """No embedding version with that number exists."""

    def __str__(self) -> str:  # KeyError would repr() the message with quotes
        return str(self.args[0]) if self.args else "version not found"


class ReadOnlyError(DynstoreError, PermissionError):
    """A write was attempted through a read-only store or connection."""


class SqlError(DynstoreError, ValueError):
    """A statement dynstore will not run as written; the message says what to write instead."""


class StorageError(DynstoreError, OSError):
    """The disk refused a write (full, read-only, too large); the last commit stands."""


class StoreCorrupt(StoreFormatError):
    """A file of the store is missing or damaged; the message names it and the way out."""
