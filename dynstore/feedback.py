"""Closing the feedback loop: logging what users were shown.

Impressions are ordinary interactions with ``event = 'impression'`` and a
NULL ``value``; ``refresh`` treats an impression with no positive from the
same user on the same item afterwards as a shown-but-ignored hard negative.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Sequence

import pyarrow as pa

__all__ = ["impressions_table"]


def impressions_table(user_id: Any, items: Sequence[Any], *, ts: _dt.datetime | None = None) -> pa.Table:
    """Interaction rows saying ``items`` were shown to ``user_id`` (now, unless ``ts``);
    :meth:`Store.log_impressions <dynstore.Store.log_impressions>` ingests them.

    Examples
    --------
    >>> impressions_table(1, [10, None, 11]).column("event").to_pylist()
    ['impression', 'impression']
    """
    items = [i for i in items if i is not None]
    when = ts or _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    return pa.table({
        "user_id": [user_id] * len(items),
        "item_id": list(items),
        "ts": pa.array([when] * len(items), pa.timestamp("us")),
        "event": ["impression"] * len(items),
        "value": pa.array([None] * len(items), pa.float64()),
    })
