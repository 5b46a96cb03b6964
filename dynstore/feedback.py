"""Closing the feedback loop: logging what users were shown.

Impressions are ordinary interactions with ``event = 'impression'`` and a
NULL ``value``; ``refresh`` treats an impression with no positive from the
same user on the same item afterwards as a shown-but-ignored hard negative.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Sequence

import pyarrow as pa

__all__ = ["log_impressions"]


def log_impressions(store, user_id: Any, items: Sequence[Any], *, ts: _dt.datetime | None = None) -> int:
    """Append an impression of each of ``items`` for ``user_id``; return the count.

    Examples
    --------
    >>> import tempfile, dynstore
    >>> store = dynstore.init(tempfile.mkdtemp() + "/s")
    >>> log_impressions(store, 1, [10, 11])
    2
    """
    items = [i for i in items if i is not None]
    if not items:
        return 0
    when = ts or _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    table = pa.table({
        "user_id": [user_id] * len(items),
        "item_id": list(items),
        "ts": pa.array([when] * len(items), pa.timestamp("us")),
        "event": ["impression"] * len(items),
        "value": pa.array([None] * len(items), pa.float64()),
    })
    store.ingest("interactions", table)
    return len(items)
