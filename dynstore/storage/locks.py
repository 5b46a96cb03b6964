"""Per-kind writer locks.

``fcntl.flock`` locks vanish with the process that held them, so a writer
killed with ``kill -9`` never leaves the store locked. Readers take no lock:
Lance's multi-version commits keep them consistent.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

from dynstore.errors import StoreBusy

__all__ = ["writer_lock"]


@contextmanager
def writer_lock(store_path: Path, kind: str, wait: float = 2.0):
    """Hold the ``kind`` writer lock of a store, waiting up to ``wait`` seconds.

    Raises :class:`~dynstore.errors.StoreBusy` when another process keeps it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with writer_lock(d, "ingest"):
    ...     pass
    """
    lock_dir = Path(store_path) / "locks"
    lock_dir.mkdir(exist_ok=True)
    path = lock_dir / f"{kind}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise StoreBusy(
                        f"store {store_path} is busy: another {kind} (pid {holder}) is writing; "
                        "try again when it finishes"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        # Closing the descriptor releases the flock.
        os.close(fd)
