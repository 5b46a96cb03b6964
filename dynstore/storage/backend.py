"""Where a store's bytes live: a local directory or a prefix on object storage.

The :class:`~dynstore.storage.catalog.Catalog` owns one :class:`Storage`; every module
asks the catalog (and through it the storage) for files, listings, the Lance
``storage_options`` and the writer locks, and never branches on the kind of
store. Names are ``/``-separated and relative to the store's root
(``"models/v3.json"``, ``"tables/items.lance"``).

* :class:`LocalStorage`: a directory; files are replaced atomically through a
  temporary file and ``os.replace``; writer locks are ``flock`` locks
  (:mod:`dynstore.storage.locks`).
* :class:`~dynstore.storage.objectstore.ObjectStorage`: ``s3://bucket/prefix``; small
  files are single objects (a put is atomic), datasets go through Lance's own
  object-store support, writer locks are leases (see :mod:`dynstore.storage.objectstore`).
  It needs ``boto3`` (``pip install 'dynstore[s3]'``), imported only for such stores.

Settings of an object store (:func:`dynstore.storage.objectstore.storage_settings`) come, highest first,
from the ``storage_options`` argument of :func:`dynstore.connect` /
:func:`dynstore.init`, the environment (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT``,
``AWS_REGION``, ``AWS_ALLOW_HTTP``; credentials from ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` or the usual AWS chain) and the ``[storage]``
table of the store's config. Secrets are never written into the store: the
config refuses them (:data:`dynstore.storage.config.SECRET_WORDS`).
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from dynstore.storage.locks import writer_lock

__all__ = ["Storage", "LocalStorage", "open_storage", "is_remote"]

def is_remote(location: str | os.PathLike) -> bool:
    """True for an object-store URI (``s3://...``), False for a local path.

    >>> is_remote("s3://bucket/shop"), is_remote("/tmp/shop"), is_remote("file:///tmp/x")
    (True, False, False)
    """
    text = str(location)
    return "://" in text and not text.startswith("file://")


class Storage(Protocol):
    """What the catalog needs from the place a store lives."""

    #: the store's root: a ``Path`` locally, the URI on object storage
    root: Any
    #: Lance's ``storage_options`` (None for a local store)
    storage_options: dict[str, str] | None

    def uri(self, name: str) -> str: ...
    def read_bytes(self, name: str) -> bytes: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def create(self, name: str, data: bytes) -> None: ...
    def exists(self, name: str) -> bool: ...
    def names(self, prefix: str) -> list[str]: ...
    def remove(self, name: str) -> None: ...
    def size(self, name: str) -> int: ...
    def stamp(self, name: str) -> Any: ...
    def dataset_stamp(self, uri: str) -> Any: ...
    def is_empty(self) -> bool: ...
    def prepare(self) -> None: ...
    def configure(self, table: dict) -> None: ...
    def lock(self, kind: str, wait: float = 2.0) -> AbstractContextManager: ...
    def confirm_lock(self, kind: str) -> None: ...
    def claim(self, name: str) -> bool: ...
    def local_dir(self, name: str) -> Path | None: ...


class LocalStorage:
    """A store in a local directory.

    >>> import tempfile
    >>> s = LocalStorage(tempfile.mkdtemp())
    >>> s.write_bytes("models/v1.json", b"{}"); s.read_bytes("models/v1.json"), s.names("models")
    (b'{}', ['v1.json'])
    """

    storage_options = None

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def uri(self, name: str) -> str:
        return str(self.root / name) if name else str(self.root)

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Replace ``name`` atomically (a crash leaves the old file or the new one)."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def create(self, name: str, data: bytes) -> None:
        """Write ``name`` whole unless it exists (:class:`FileExistsError`), atomically:
        of two processes creating it at once, exactly one succeeds."""
        import uuid

        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails when ``path`` exists: the exclusive step
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: exclusive, written in place
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def names(self, prefix: str) -> list[str]:
        """Entries directly under ``prefix``, sorted ([] when there is none)."""
        try:
            return sorted(os.listdir(self.root / prefix))
        except OSError:
            return []

    def remove(self, name: str) -> None:
        """Delete a file or a directory tree (nothing when absent)."""
        import shutil

        path = self.root / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def size(self, name: str) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.root / name):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except OSError:
                    pass  # removed while we walked (a concurrent cleanup)
        return total

    def stamp(self, name: str) -> int:
        """Modification time of a file: changes when anyone rewrites it."""
        return os.stat(self.root / name).st_mtime_ns

    def dataset_stamp(self, uri: str) -> int | None:
        """Changes with every commit to the Lance dataset at ``uri``; None when absent.
        A commit adds a manifest to ``_versions/``, which changes the directory's mtime."""
        try:
            return os.stat(os.path.join(uri, "_versions")).st_mtime_ns
        except FileNotFoundError:
            return None

    def is_empty(self) -> bool:
        """True when nothing is at the root yet (a new store may go there)."""
        return not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))

    def prepare(self) -> None:
        """Create the store's directories (``init``)."""
        if self.root.exists() and not self.root.is_dir():
            raise FileExistsError(f"{self.root} is a file")
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("tables", "cache", "models", "locks"):
            (self.root / sub).mkdir(exist_ok=True)

    def configure(self, table: dict) -> None:
        """Settings of the config's ``[storage]`` table (none apply to a local store)."""

    def lock(self, kind: str, wait: float = 2.0) -> AbstractContextManager:
        return writer_lock(self.root, kind, wait=wait)

    def confirm_lock(self, kind: str) -> None:
        """Nothing to check: a ``flock`` is held until the process ends, never taken over."""

    def claim(self, name: str) -> bool:
        """True: under a ``flock`` (never taken over) the lock alone makes a claim unique."""
        return True

    def local_dir(self, name: str) -> Path | None:
        """The local directory of ``name`` (for libraries that need one: model directories)."""
        return self.root / name


def open_storage(location: str | os.PathLike, options: dict | None = None) -> Storage:
    """The storage of a store at ``location`` (a path, or ``s3://bucket/prefix``)."""
    if not is_remote(location):
        if options:
            raise ValueError(f"{location}: storage_options apply to object-store URIs only")
        text = str(location)
        return LocalStorage(text[len("file://"):] if text.startswith("file://") else text)
    from dynstore.storage.objectstore import ObjectStorage

    return ObjectStorage(str(location), options)
