"""What the store's methods return: frozen, typed results.

Read them by attribute (``store.ingest(...).rows``); ``to_dict()`` gives the
JSON-able dict that ``--json`` prints, with the keys in their documented
order. Optional parts (``IngestResult.unknown_items``, ``EncodeResult.version``,
...) are ``None`` when absent and then left out of ``to_dict()``.

The write methods' results are plain records. The reads (``recommend``,
``versions``, ``inspect``, ``evaluate``) return :class:`Recommendation`,
:class:`VersionRow`, :class:`Inspection` and :class:`Evaluation`, which also read
as the dicts they used to be (``row["item_id"]``, ``keys()``, ``dict(row)``,
``==`` a dict): their keys are ``to_dict()``'s.

Examples
--------
>>> r = DeleteResult(kind="users", deleted=1, total=3, version=4)
>>> r.deleted, r.to_dict()
(1, {'kind': 'users', 'deleted': 1, 'total': 3, 'version': 4})
>>> r["deleted"]
Traceback (most recent call last):
...
TypeError: 'DeleteResult' object is not subscriptable
>>> rec = Recommendation(item_id=7, score=0.5)
>>> rec.item_id, rec["score"], dict(rec), rec == {"item_id": 7, "score": 0.5}
(7, 0.5, {'item_id': 7, 'score': 0.5}, True)
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["IngestResult", "EncodeResult", "RefreshResult", "DeleteResult", "CompactResult", "RollbackResult",
           "ScoreAllResult", "Recommendation", "VersionRow", "Inspection", "Evaluation", "Figures", "RefreshMetrics"]


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
    #: holdout figures of the candidate, the current version and the popularity rule
    metrics: RefreshMetrics | None = None
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
        if isinstance(self.metrics, RefreshMetrics):
            out["metrics"] = self.metrics.to_dict()
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


# ------------------------------------------------------------------------ reads


class _Row(_Result, Mapping):
    """A read result that also reads as the dict it replaces: ``row[key]``, ``keys()``,
    ``items()``, ``get()``, ``in``, ``dict(row)`` and ``==`` with a mapping, over the keys
    of ``to_dict()``. Unhashable, as a dict is."""

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(frozen=True, eq=False)
class Recommendation(_Row):
    """One item of :meth:`Store.recommend`'s list: the item and its score ``p_ui`` (best first)."""

    item_id: Any
    score: float

    def __getitem__(self, key: str) -> Any:
        if key in ("item_id", "score"):
            return getattr(self, key)
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """``{"item_id", "score"}``."""
        return {"item_id": self.item_id, "score": self.score}


@dataclass(frozen=True, eq=False)
class VersionRow(_Row):
    """One embedding version of :meth:`Store.versions` (the registry's row, newest first)."""

    version: int
    parent: int | None
    #: where the version stands now: current, retired, candidate, rejected
    status: str
    created: _dt.datetime
    encoder: str
    alpha: float | None
    train_window: str
    #: events (train, holdout, by label), items and users of the window it was trained on
    counts: dict[str, Any]
    #: holdout figures (``candidate``, ``current``, ``rule`` ...) and training statistics (``train``)
    metrics: dict[str, Any]
    #: the data it was built from (``trained_until``, ``since`` ...)
    snapshot: dict[str, Any]
    #: what refresh decided when it was made: initial, promoted, passed, rejected, rule
    verdict: str

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "VersionRow":
        return cls(**row)


@dataclass(frozen=True, eq=False)
class Inspection(_Row):
    """What :meth:`Store.inspect` found: counts, sizes, encoder, versions, what refresh would do."""

    store: str
    format_version: int
    created: str
    id_types: dict[str, str]
    bytes: int
    #: per table: ``{"rows", "bytes", "fragments", "dataset_version", "columns"}``
    tables: dict[str, dict[str, Any]]
    encoder: dict[str, Any]
    semantic_cache: dict[str, Any]
    embeddings: dict[str, Any]
    #: items that need ``encode`` (None when the item document fails: see ``document_error``)
    items_stale: int | None
    #: ``{"count", "current", "latest", "by_status"}``
    versions: dict[str, Any]
    #: the newest trained version (None before any refresh)
    last_refresh: dict[str, Any] | None
    #: ``{"since", "needed", "reason"}``
    refresh: dict[str, Any]
    document_error: str | None = None
    #: what to run when items are stale
    encode: str | None = None

    _optional: ClassVar[tuple[str, ...]] = ("document_error", "encode")

    @classmethod
    def from_dict(cls, info: Mapping[str, Any]) -> "Inspection":
        return cls(**info)


@dataclass(frozen=True, eq=False)
class Evaluation(_Row):
    """:meth:`Store.evaluate`'s figures: Recall@k, NDCG@k and AUC of ``version`` (means over the
    ``n_users`` users with a relevant item) and the ``slice`` judged. ``to_dict()`` names the
    first two ``recall@k`` and ``ndcg@k`` (e.g. ``recall@10``), as ``dynstore eval`` prints them.

    >>> e = Evaluation(version=2, k=5, recall=0.5, ndcg=0.25, auc=0.75, n_users=4, slice={})
    >>> e.ndcg, e["ndcg@5"], list(e)
    (0.25, 0.25, ['version', 'recall@5', 'ndcg@5', 'auc', 'n_users', 'slice'])
    """

    version: int
    k: int
    recall: float
    ndcg: float
    auc: float
    n_users: int
    #: which events were judged: ``{"events", "users", "from", "to", "share", "of", "trained_on_share", "scored"}``
    slice: dict[str, Any]

    @classmethod
    def from_dict(cls, figures: Mapping[str, Any], k: int) -> "Evaluation":
        return cls(version=figures["version"], k=k, recall=figures[f"recall@{k}"], ndcg=figures[f"ndcg@{k}"],
                   auc=figures["auc"], n_users=figures["n_users"], slice=figures["slice"])

    def to_dict(self) -> dict[str, Any]:
        """``{"version", "recall@k", "ndcg@k", "auc", "n_users", "slice"}``."""
        return {"version": self.version, f"recall@{self.k}": self.recall, f"ndcg@{self.k}": self.ndcg,
                "auc": self.auc, "n_users": self.n_users, "slice": self.slice}


@dataclass(frozen=True, eq=False)
class Figures(_Row):
    """One model's holdout figures: Recall@k, NDCG@k and AUC, means over the ``n_users`` users
    with a relevant item; ``to_dict()`` names them ``recall@k``, ``ndcg@k``, ``auc``, ``n_users``.

    >>> f = Figures.from_dict({"recall@10": 0.5, "ndcg@10": 0.25, "auc": 0.75, "n_users": 4})
    >>> f.ndcg, f["ndcg@10"], f.k
    (0.25, 0.25, 10)
    """

    recall: float
    ndcg: float
    auc: float
    n_users: int
    k: int = 10

    @classmethod
    def from_dict(cls, figures: Mapping[str, Any]) -> "Figures":
        k = int(next(key for key in figures if key.startswith("recall@")).split("@", 1)[1])
        return cls(recall=figures[f"recall@{k}"], ndcg=figures[f"ndcg@{k}"], auc=figures["auc"],
                   n_users=figures["n_users"], k=k)

    def to_dict(self) -> dict[str, Any]:
        return {f"recall@{self.k}": self.recall, f"ndcg@{self.k}": self.ndcg, "auc": self.auc,
                "n_users": self.n_users}


@dataclass(frozen=True, eq=False)
class RefreshMetrics(_Row):
    """:attr:`RefreshResult.metrics`: the candidate's, the current version's and the popularity
    rule's :class:`Figures` on the refresh's holdout (``metrics.candidate.ndcg``; also
    ``metrics["candidate"]["ndcg@10"]``, as before)."""

    candidate: Figures
    current: Figures
    rule: Figures

    def __getitem__(self, key: str) -> Any:
        if key in ("candidate", "current", "rule"):
            return getattr(self, key)
        raise KeyError(key)

    @classmethod
    def from_dict(cls, metrics: Mapping[str, Mapping[str, Any]]) -> "RefreshMetrics":
        return cls(**{name: Figures.from_dict(metrics[name]) for name in ("candidate", "current", "rule")})

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in ("candidate", "current", "rule")}
