"""Keeping the command line's start-up short.

``pyarrow.dataset`` (imported by Lance) builds an Arrow scalar while its
module initialises, and pyarrow checks every new scalar's input for a pandas
object, importing pandas to do so when it is installed: about 0.4 s of a
0.6 s start-up, for a library the command line never uses. The CLI imports
``pyarrow.dataset`` with pandas hidden; pyarrow then treats pandas as absent
until something asks for it explicitly (``to_pandas()``, ``from_pandas()``
import it again on demand), which nothing in the CLI process does.
"""
from __future__ import annotations

import importlib.abc
import sys

__all__ = ["import_arrow_quickly"]


class _HidePandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while pyarrow.dataset loads)", name=name)
        return None


def import_arrow_quickly() -> None:
    """Import ``pyarrow.dataset`` without importing pandas (no-op if either is loaded)."""
    if "pyarrow.dataset" in sys.modules or "pandas" in sys.modules:
        return
    finder = _HidePandas()
    sys.meta_path.insert(0, finder)
    try:
        import pyarrow.dataset  # noqa: F401
    finally:
        sys.meta_path.remove(finder)
