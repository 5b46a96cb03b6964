"""Handing freed memory back between the stages of a build (dynstore.memory)."""
from __future__ import annotations

import dynstore.memory as memory


def test_release_freed_trims_malloc_and_arrow(monkeypatch):
    """Both allocators are asked: glibc's arenas (where Lance's threads freed) and
    Arrow's pool; without a ``malloc_trim`` (another C library) only Arrow's."""
    import pyarrow as pa

    calls = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(("trim", pad)))
    pool = pa.default_memory_pool()
    monkeypatch.setattr(pa, "default_memory_pool", lambda: type("P", (), {
        "release_unused": lambda self: calls.append(("arrow",)), "backend_name": pool.backend_name})())
    memory.release_freed()
    assert calls == [("arrow",), ("trim", 0)]
    calls.clear()
    monkeypatch.setattr(memory, "_TRIM", None)
    memory.release_freed()
    assert calls == [("arrow",)]
