"""Exceptions dynstore raises on purpose.

Every error carries a one-line message meant for a person: the CLI prints
``str(error)`` and exits 1 (3 for :class:`StoreBusy`).
"""
from __future__ import annotations

import re

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


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message (its type name when empty).

    The one rule for turning any exception into one line of a message.

    >>> first_line(ValueError("\\n  bad value\\nmore detail"))
    'bad value'
    >>> first_line(KeyError())
    'KeyError'
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


_UDF = re.compile(r"while executing the UDF: (\w+): (.*)", re.S)


def error_from(exc: BaseException, message: str | None = None) -> DynstoreError:
    """The dynstore error a function raised inside DuckDB, as its own class (a
    :class:`~dynstore.errors.StoreBusy` stays busy: exit 3), else a DynstoreError.

    >>> import duckdb
    >>> type(error_from(duckdb.InvalidInputException(
    ...     "Invalid Input Error: Python exception occurred while executing the UDF: "
    ...     "StoreBusy: store s is busy"))).__name__
    'StoreBusy'
    """
    m = _UDF.search(str(exc))
    cls = globals()[m.group(1)] if m and m.group(1) in __all__ else DynstoreError
    return cls(message if message is not None else error_message(exc))


def error_message(exc: BaseException) -> str:
    """One line for a person: dynstore's own message when a function raised it.

    >>> import duckdb
    >>> error_message(duckdb.InvalidInputException(
    ...     "Invalid Input Error: Python exception occurred while executing the UDF: "
    ...     "DynstoreError: k must be between 1 and 10000, got 0"))
    'k must be between 1 and 10000, got 0'
    """
    text = str(exc).strip()
    m = _UDF.search(text)
    if m and m.group(1) in __all__:
        text = m.group(2).strip()
    elif isinstance(exc, DynstoreError):
        text = str(exc)
    return first_line(text) if text.strip() else type(exc).__name__
