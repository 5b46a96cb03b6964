"""Closing the feedback loop: logging what users were shown.

Impressions are ordinary interactions with ``event = 'impression'`` and a
NULL ``value``; ``refresh`` treats an impression with no positive from the
same user on the same item afterwards as a shown-but-ignored hard negative.

Many processes may log at once (every ``recommend --log-impressions``): each
call is one small append under the interactions writer lock, and a call waits
its turn for up to :data:`IMPRESSIONS_WAIT` seconds instead of failing with
``StoreBusy`` after the usual two; nothing else is locked, so a logged call
has stored its rows and a refused one stored none.
"""
from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa

if TYPE_CHECKING:  # pragma: no cover
    from dynstore.storage.catalog import Catalog

__all__ = ["impressions_table", "log_impressions", "IMPRESSIONS_WAIT"]

#: Seconds a ``log_impressions`` call waits for other writers of interactions
#: (other processes logging, an ingest) before it gives up with ``StoreBusy``.
IMPRESSIONS_WAIT = 30.0


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


def log_impressions(catalog: "Catalog", user_id: Any, items: Iterable[Any]) -> int:
    """Record that ``items`` were shown to ``user_id``: one append to interactions,
    waiting up to :data:`IMPRESSIONS_WAIT` seconds for other writers. Returns the
    rows written (``None`` items are skipped). Used by
    :meth:`Store.log_impressions <dynstore.Store.log_impressions>` and by the SQL
    function ``log_impressions``."""
    from dynstore.data.ingest import ingest_locked  # the write path: imported when a write happens

    catalog.require_writable("log impressions")
    table = impressions_table(user_id, list(items))
    if table.num_rows:
        ingest_locked(catalog, "interactions", [table], wait=IMPRESSIONS_WAIT)
    return table.num_rows

