"""What the store's write methods return: frozen, typed results.

Read them by attribute (``store.ingest(...).rows``); ``to_dict()`` gives the
JSON-able dict that ``--json`` prints, with the keys in their documented
order. Optional parts (``IngestResult.unknown_items``, ``EncodeResult.version``,
...) are ``None`` when absent and then left out of ``to_dict()``.

Examples
--------
>>> r = DeleteResult(kind="users", deleted=1, total=3, version=4)
>>> r.deleted, r.to_dict()
(1, {'kind': 'users', 'deleted': 1, 'total': 3, 'version': 4})
>>> r["deleted"]
Traceback (most recent call last):
...
TypeError: 'DeleteResult' object is not subscriptable
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["IngestResult", "EncodeResult", "RefreshResult", "DeleteResult", "CompactResult", "RollbackResult",
           "ScoreAllResult"]


class _Result:
    """Shared ``to_dict()``: every field in order, optional ones only when set."""

    #: fields left out of ``to_dict()`` while they hold their "absent" value
    _optional: ClassVar[tuple[str, ...]] = ()

    def _absent(self, name: str) -> bool:
        value = getattr(self, name)
        return name in self._optional and (value is None or value is False)

    def to_dict(self) -> dict[str, Any]:
        """The result as the plain dict the command line prints for ``--json``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not self._absent(f.name)}


@dataclass(frozen=True)
class IngestResult(_Result):
    """What :meth:`Store.ingest` did: rows added (or upserted), the table's total and dataset version."""

    kind: str
    rows: int
    total: int
    version: int
    #: rows skipped as duplicates (only when deduplicating), with the columns compared
    duplicates_skipped: int | None = None
    key: list[str] | None = None
    #: interactions naming items not (yet) in items: ``{"rows", "ids", "examples"}``
    unknown_items: dict[str, Any] | None = None

    def _absent(self, name: str) -> bool:
        if name == "key":  # a pair: present whenever duplicates were looked for
            return self.duplicates_skipped is None
        return name in ("duplicates_skipped", "unknown_items") and getattr(self, name) is None


@dataclass(frozen=True)
class EncodeResult(_Result):
    """What :meth:`Store.encode` did: items, stale ones, documents encoded and reused, speed."""

    items: int
    stale: int
    encoded: int
    reused: int
    encoder: str
    #: where the encoder ran; ``"none"`` when nothing was encoded (no encoder was loaded)
    device: str
    seconds: float
    items_per_s: float | None
    #: the first version, when this encode created it (the popularity rule)
    version: int | None = None
    #: ``"ray"`` and the actors used, when encoded on the Ray engine (absent for the local one)
    engine: str | None = None
    workers: int | None = None

    _optional: ClassVar[tuple[str, ...]] = ("version", "engine", "workers")


@dataclass(frozen=True)
class RefreshResult(_Result):
    """What :meth:`Store.refresh` did: a new version and its verdict, or ``status == "noop"`` and why."""

    status: str
    #: the new version; for a no-op the newest existing one (or None)
    version: int | None = None
    #: why a refresh did nothing: no-op (nothing to retrain), or ``status == "unchanged"``
    #: (retrained, but the result equals the current version: nothing published)
    reason: str | None = None
    parent: int | None = None
    promoted: bool = False
    metrics: dict[str, Any] | None = None
    counts: dict[str, int] | None = None
    durations: dict[str, float] | None = None
    window: str | None = None
    holdout: dict[str, Any] | None = None
    reasons: list[str] | None = None
    kept_start: bool = False
    training: dict[str, Any] | None = None
    #: the popularity rule published instead of a rejected version: ``{"version", "status", "kind"}``
    published: dict[str, Any] | None = None
    #: the encoder fine-tuning run, when asked for
    finetune: dict[str, Any] | None = None

    _TRAINED: ClassVar[tuple[str, ...]] = ("version", "parent", "status", "promoted", "metrics", "counts",
                                           "durations", "window", "holdout", "reasons", "kept_start", "training")

    @property
    def noop(self) -> bool:
        """True when the refresh found nothing to do."""
        return self.status == "noop"

    def to_dict(self) -> dict[str, Any]:
        """The result as the plain dict the command line prints for ``--json``."""
        if self.noop:
            out: dict[str, Any] = {"status": self.status, "reason": self.reason}
            if self.version is not None:
                out["version"] = self.version
            return out
        out = {name: getattr(self, name) for name in self._TRAINED}
        if self.reason is not None:  # "unchanged": why nothing was published
            out["reason"] = self.reason
        for name in ("published", "finetune"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class DeleteResult(_Result):
    """What :meth:`Store.delete` did (or would do, on a dry run): rows matched, rows left, dataset version."""

    kind: str
    deleted: int
    total: int
    version: int
    dry_run: bool = False

    _optional: ClassVar[tuple[str, ...]] = ("dry_run",)


@dataclass(frozen=True)
class CompactResult(_Result):
    """What :meth:`Store.compact` did: per dataset ``{"fragments", "versions", "bytes"}`` as [before, after]."""

    datasets: dict[str, dict[str, list[int]]]
    #: leftovers of killed refreshes removed: ``{"embedding_rows", "files"}`` (empty when skipped)
    orphans: dict[str, Any]
    encoders_removed: list[str]
    #: what was not compacted, and why
    skipped: dict[str, str]
    retain_seconds: float
    #: kept for readers that may still read it, per dataset: ``{"versions": older versions
    #: superseded less than retain_seconds ago, "fragments": fragments not merged}``
    kept: dict[str, dict[str, int]] = field(default_factory=dict)
    #: the whole store's bytes, [before, after]: never more after
    bytes: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def reclaimed(self) -> int:
        """Bytes freed (before minus after)."""
        return self.bytes[0] - self.bytes[1]

    def to_dict(self) -> dict[str, Any]:
        """The result as the plain dict the command line prints for ``--json`` (with ``reclaimed``)."""
        return {**super().to_dict(), "reclaimed": self.reclaimed}


@dataclass(frozen=True)
class RollbackResult(_Result):
    """What :meth:`Store.rollback` did: the version now current and the one it replaced."""

    version: int
    previous: int | None
    status: str
    verdict: str
    #: set when the version was rejected by refresh
    warning: str | None = None

    _optional: ClassVar[tuple[str, ...]] = ("warning",)


@dataclass(frozen=True)
class ScoreAllResult(_Result):
    """What :meth:`Store.score_all` did: every user's top-``k`` of ``version`` written to
    ``batch_recommendations`` (its dataset version ``table_version``), on which engine, how fast."""

    users: int
    rows: int
    k: int
    version: int
    engine: str
    seconds: float
    users_per_s: float | None
    table_version: int
    #: actors used by the Ray engine (absent for the local one)
    workers: int | None = None
    #: the user-item product's precision: ``fp32``, or ``fp16`` / ``bf16`` (a prefilter
    #: rescored in float32: the same lists)
    precision: str = "fp32"

    _optional: ClassVar[tuple[str, ...]] = ("workers",)
