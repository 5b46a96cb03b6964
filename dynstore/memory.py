"""Handing freed memory back to the system between the stages of a large build.

A stage that streams a catalogue (a version's rows, its index, the holdout's
window) frees what it used, but the allocators keep much of it: glibc keeps
freed pages in the arenas of the threads that used them (Lance reads and writes
on a pool of threads) and Arrow's pool keeps its own. The next stage then starts
from a high-water mark that counts towards the build's peak. Measured on the
first version of a 200,000-item store: 840 MB resident before the index build,
510 MB after :func:`release_freed`.

glibc also gives threads arenas of their own, up to eight per core, and what a
thread's arena keeps freed is out of the others' reach. The command line caps
them at one per core (:func:`cap_malloc_arenas`): the first version of a
200,000-item store then peaked at 911 MB instead of 1,368 MB (measured before the
rows and the window's vectors were read in smaller batches). A library leaves
its host's allocator alone, so the Python API does not; an application sets
``MALLOC_ARENA_MAX`` in its environment for the same effect.
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["release_freed", "cap_malloc_arenas"]

M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h
MAX_ARENAS = 8


def release_freed() -> None:
    """Return the memory the allocators hold freed to the system (where they can):
    Arrow's default pool and, on glibc, ``malloc_trim``. Changes no data.

    >>> release_freed()
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def cap_malloc_arenas() -> int | None:
    """Cap glibc's malloc arenas at one per core of this process (at most
    :data:`MAX_ARENAS`), for a process that is dynstore's own: the command line calls
    it before any thread starts. Returns the cap, or None where it changed nothing:
    ``MALLOC_ARENA_MAX`` already set (the environment decides), or no glibc.

    Lance reads and writes on a pool of threads, and glibc's default (eight arenas per
    core) lets each keep its own freed memory: the resident memory of a large build
    then counts the same bytes several times over.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return None
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = max(1, min(cores, MAX_ARENAS))
    return cap if mallopt(M_ARENA_MAX, cap) == 1 else None


def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or none found)."""
    global _TRIM
    if _TRIM is False:
        _TRIM = _libc_function("malloc_trim")
    return _TRIM


def _libc_function(name: str):
    """A function of the C library this process runs on, by ``name``, or None. The
    process's own symbols are searched (``dlopen(NULL)``): no ``ldconfig`` run on the
    command line's start."""
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):
        return None


_TRIM = False  # looked up on first use
