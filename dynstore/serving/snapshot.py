"""Serving snapshots: one file of named arrays beside a version, mapped by readers.

``models/v<N>.serving.arrow`` holds the arrays of version N's serving state
(:func:`dynstore.serving.state.keep_serving_snapshot` writes it, after a commit)
and, as JSON in the schema's metadata, what they were built from. Arrow IPC,
uncompressed, one row: one list column per array (numbers, or ids as ints or
text), shapes in the metadata; no pickle. A reader maps the file: the arrays are
read-only views of the mapping, paged in when a query touches them.

This module owns the file only; what goes in it, and when a reader may trust it
(its recorded sources match what the reader sees), is the state module's. A
local store only: an object store gives no mapping (its readers build the state
as before). A file is written under a name of its own, synced, then renamed over
the old one, so a kill leaves the old file or the new one, never a part; a file
that does not read back whole is ignored.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import numpy as np

from dynstore.storage.catalog import Catalog

__all__ = ["SNAPSHOT_FORMAT", "snapshot_name", "write_snapshot", "read_snapshot", "snapshot_meta"]

#: bumped whenever what a snapshot holds changes: a file of another format is ignored
SNAPSHOT_FORMAT = 1
_SUFFIX = ".serving.arrow"
_META = b"dynstore.serving"
_STALE_TMP = 3600.0  # a temporary file older than this is a killed writer's


def snapshot_name(version: int) -> str:
    """The snapshot of ``version``, relative to the store."""
    return f"models/v{int(version)}{_SUFFIX}"


def _path(catalog: Catalog, version: int) -> str | None:
    folder = catalog.storage.local_dir("models")
    return None if folder is None else os.path.join(folder, f"v{int(version)}{_SUFFIX}")


def write_snapshot(catalog: Catalog, version: int, meta: dict, arrays: dict[str, Any]) -> bool:
    """Write ``arrays`` (numpy arrays, or lists of ids) and ``meta`` (JSON-able) as the
    snapshot of ``version``, replacing any other; False on an object store."""
    import pyarrow as pa

    path = _path(catalog, version)
    if path is None:
        return False
    columns, shapes = {}, {}
    for name, a in arrays.items():
        if isinstance(a, np.ndarray):
            shapes[name] = [list(a.shape), a.dtype.str]
            values = pa.array(np.ascontiguousarray(a).reshape(-1))
        else:
            shapes[name] = None
            values = pa.array(list(a))
        columns[name] = pa.LargeListArray.from_arrays(pa.array([0, len(values)], pa.int64()), values)
    info = {"format": SNAPSHOT_FORMAT, "shapes": shapes, **meta}
    table = pa.table(columns).replace_schema_metadata({_META: json.dumps(info)})
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _remove_others(os.path.dirname(path), os.path.basename(path))
    return True


def _remove_others(folder: str, keep: str) -> None:
    """Snapshots of other versions, and temporary files of killed writers."""
    now = time.time()
    for name in os.listdir(folder):
        if _SUFFIX not in name or name == keep:
            continue
        full = os.path.join(folder, name)
        try:
            if not name.endswith(".tmp") or now - os.stat(full).st_mtime > _STALE_TMP:
                os.unlink(full)
        except OSError:
            pass  # another writer removed or replaced it


def _open(catalog: Catalog, version: int):
    import pyarrow as pa

    path = _path(catalog, version)
    if path is None or not os.path.exists(path):
        return None
    reader = pa.ipc.open_file(pa.memory_map(path))
    info = json.loads(reader.schema.metadata[_META])
    return (reader, info) if info.get("format") == SNAPSHOT_FORMAT else None


def snapshot_meta(catalog: Catalog, version: int) -> dict | None:
    """The metadata of ``version``'s snapshot (None: none, or unreadable), arrays unread."""
    import pyarrow as pa

    try:
        got = _open(catalog, version)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    return None if got is None else got[1]


def read_snapshot(catalog: Catalog, version: int) -> tuple[dict, dict[str, Any]] | None:
    """``(meta, arrays)`` of ``version``'s snapshot, or None (none, unreadable, another
    format). Numeric arrays are read-only views of the mapped file."""
    import pyarrow as pa

    try:
        got = _open(catalog, version)
        if got is None:
            return None
        reader, info = got
        table = reader.read_all()
        arrays: dict[str, Any] = {}
        for name, shape in info["shapes"].items():
            values = table.column(name).chunk(0).values
            if shape is None:
                arrays[name] = values.to_pylist()
            else:
                dims, dtype = shape
                arr = values.to_numpy(zero_copy_only=dtype[1] != "b")
                arrays[name] = arr.astype(np.dtype(dtype), copy=False).reshape(dims)
    except (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException):
        return None
    return info, arrays
