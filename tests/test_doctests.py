"""The examples in docstrings run (numpydoc ``Examples`` sections and ``>>>`` lines).

Every module of the library, the command line and the samples that has an
example is imported by its installed name and run through :mod:`doctest`.
"""
from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dynstore": ROOT / "dynstore", "dynstore.cli": ROOT / "cli", "dynstore.samples": ROOT / "samples"}


def _modules_with_examples() -> list[str]:
    out = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            # examples that load the real MiniLM are marked +SKIP (tests/test_e2e_minilm.py runs it)
            if not any(">>>" in line and "+SKIP" not in line for line in text.splitlines()):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append(".".join([package] + parts))
    return out


MODULES = _modules_with_examples()


def test_examples_are_found():
    # the store, the catalog and the refresh window all document themselves by example
    assert {"dynstore.store", "dynstore.storage.catalog", "dynstore.versions.window"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False,
                             report=True)
    assert result.attempted > 0, f"{name} has '>>>' but no example doctest could find"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
