"""Handing freed memory back between the stages of a build (dynstore.memory)."""
from __future__ import annotations

from dynstore import memory


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


def test_cap_malloc_arenas_one_per_core_at_most_eight(monkeypatch):
    """The cap is the process's cores, between 1 and 8, passed to ``mallopt(M_ARENA_MAX)``;
    an environment that sets ``MALLOC_ARENA_MAX`` decides alone, and a C library without
    ``mallopt`` (or one that refuses it) is left as it is."""
    calls = []
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(memory, "_libc_function", lambda name: lambda p, v: calls.append((p, v)) or 1)
    for cores, cap in ((1, 1), (2, 2), (8, 8), (64, 8)):
        monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert memory.cap_malloc_arenas() == cap
        assert calls.pop() == (memory.M_ARENA_MAX, cap)
    monkeypatch.setattr(memory, "_libc_function", lambda name: lambda p, v: 0)  # refused
    assert memory.cap_malloc_arenas() is None
    monkeypatch.setattr(memory, "_libc_function", lambda name: None)
    assert memory.cap_malloc_arenas() is None
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setattr(memory, "_libc_function", lambda name: lambda p, v: calls.append((p, v)) or 1)
    assert memory.cap_malloc_arenas() is None and calls == []


def test_cap_malloc_arenas_on_this_glibc(monkeypatch):
    """On glibc the real ``mallopt`` accepts the cap (the value glibc's own environment
    variable would set); elsewhere nothing is found and nothing changes."""
    import platform

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    got = memory.cap_malloc_arenas()
    if platform.libc_ver()[0] == "glibc":
        assert isinstance(got, int) and 1 <= got <= memory.MAX_ARENAS
    else:
        assert got is None


def test_every_command_caps_arenas_first(monkeypatch, tmp_path):
    """The command line, dynstore's own process, caps the arenas before a command runs;
    ``--help`` stays without imports."""
    from click.testing import CliRunner

    from dynstore.cli import main

    calls = []
    monkeypatch.setattr(memory, "cap_malloc_arenas", lambda: calls.append(1))
    res = CliRunner().invoke(main, ["init", str(tmp_path / "s"), "--model", "fake", "-q"])
    assert res.exit_code == 0, res.output
    assert calls == [1]
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and calls == [1]
