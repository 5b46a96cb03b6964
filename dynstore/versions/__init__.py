"""Versions: writing, reading and choosing embedding versions.

Owns a version's rows and parameters (safetensors), its vector index, version
1 (the popularity rule), training windows, ``eval``'s holdout, the no-op
decision and the ``refresh`` pipeline.
May import: the top-level helpers, ``storage``, ``engines``, ``encoders``,
``data`` and ``model``.
"""

#: refresh's window when none is given (here, not in ``window``: the API reads it without
#: importing the training window's modules)
DEFAULT_SINCE = "30d"
