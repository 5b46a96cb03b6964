"""Synthetic sample data for dynstore: a deterministic, seeded shop.

``generate(size, seed)`` returns polars frames ``users``, ``items`` and
``interactions`` drawn from a planted preference model with a drift at
``shop.DRIFT_START``; ``write(out_dir, ...)`` saves them as parquet or csv.

Examples
--------
>>> from dynstore.samples import generate
>>> frames = generate("tiny", seed=0)
>>> frames["users"].height
60
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["generate", "write"]

if TYPE_CHECKING:
    from dynstore.samples.shop import generate, write


def __getattr__(name: str):
    # lazy re-export: importing .shop eagerly here would make
    # ``python -m dynstore.samples.shop`` warn about a double import
    if name in __all__:
        from dynstore.samples import shop

        return getattr(shop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
