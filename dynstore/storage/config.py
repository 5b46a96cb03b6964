"""The store's ``dynstore.toml``: format version, id types, rules, encoder.

The file is tiny and rewritten whole through a temporary file and
``os.replace`` so that a crash never leaves half a config behind.
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dynstore.errors import StoreCorrupt, StoreFormatError

#: A ``[storage]`` key holding one of these words is a secret: never written into a store.
SECRET_WORDS = ("secret", "token", "password", "access_key", "credential", "session")

__all__ = ["FORMAT_VERSION", "CONFIG_NAME", "StoreConfig"]

FORMAT_VERSION = 1
CONFIG_NAME = "dynstore.toml"

DEFAULT_POSITIVE = "value > 0"
DEFAULT_NEGATIVE = "value <= 0"
#: what to do about a damaged dynstore.toml
_WAY_OUT = "fix it or restore the file from a backup (the data and versions beside it are untouched)"


@dataclass
class StoreConfig:
    """Everything a store remembers about itself besides its data.

    Examples
    --------
    >>> StoreConfig().positive
    'value > 0'
    """

    format_version: int = FORMAT_VERSION
    created: str = ""
    #: "int" or "string" per id kind, recorded on first ingest.
    id_types: dict[str, str] = field(default_factory=dict)
    positive: str = DEFAULT_POSITIVE
    negative: str = DEFAULT_NEGATIVE
    #: SQL expression over item columns; empty means "every text-like column as name: value".
    item_text: str = ""
    behaviour_summary: bool = False
    model: str = "minilm"
    max_length: int = 256
    #: Encoder compute precision: "auto" (fp16 on a GPU, bf16 on CPUs that
    #: have it, else fp32), "fp32", "bf16", "fp16", or "int8" (CPU, own
    #: encoder id and cache; see dynstore.encoders.HFEncoder).
    precision: str = "auto"
    #: The encoder's id and dimension as a writer last saw them, and the
    #: fingerprint (spec, max_length, file sizes and mtimes) they are valid
    #: for: readers take them from here instead of hashing or loading weights.
    encoder_id: str = ""
    encoder_dim: int = 0
    encoder_fingerprint: str = ""
    #: Versions with at least this many items get a Lance vector index for
    #: single-user queries (exact brute force below it).
    index_min_items: int = 200_000
    #: An encoder switch in flight (a fine-tuned encoder promoted, a rollback):
    #: ``model`` counts once the registry makes version ``switch_version``
    #: current; until then -- a crash in between -- the store's encoder is
    #: ``switch_from``. See :mod:`dynstore.storage.switch`.
    switch_version: int = 0
    switch_from: str = ""
    #: Automatic compaction: a table, the embeddings or the semantic cache with
    #: more fragments than this is compacted by the writer that made the last
    #: one (0: never; ``dynstore compact`` does it on demand).
    compact_fragments: int = 64
    #: Compaction keeps old dataset versions (what a long statement or a pinned
    #: connection may still read) for this many seconds.
    retain_seconds: int = 3600
    #: Settings of a store on object storage (``aws_region``, ``lease_ttl``, Lance
    #: storage options); never a secret (see :mod:`dynstore.storage.backend`).
    storage: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "StoreConfig":
        """The config in the file ``path``."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreFormatError(f"{path}: unreadable store config ({exc})") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, path: str) -> "StoreConfig":
        """The config in ``text``, read from ``path`` (named in errors)."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise StoreCorrupt(f"{path}: damaged store config ({exc}); {_WAY_OUT}") from None
        version = raw.get("format_version")
        if not isinstance(version, int):
            raise StoreCorrupt(f"{path}: damaged store config (no format_version; truncated?); {_WAY_OUT}")
        if version > FORMAT_VERSION:
            raise StoreFormatError(
                f"{path.rsplit('/', 1)[0]}: store format {version} is newer than this dynstore "
                f"understands ({FORMAT_VERSION}); upgrade dynstore"
            )
        known = {f for f in cls.__dataclass_fields__}

        def section(name: str) -> dict:
            value = raw.get(name, {})
            if not isinstance(value, dict):
                raise StoreFormatError(f"{path}: [{name}] must be a table of settings, got {value!r}")
            return value

        def get(table: str, key: str, kind: type, default):
            value = section(table).get(key, default) if table else raw.get(key, default)
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if not ok:
                where = f"{table}.{key}" if table else key
                want = {int: "an integer", str: "a string", bool: "true or false"}[kind]
                raise StoreFormatError(f"{path}: {where} = {value!r} is not {want}; fix it with "
                                       "`dynstore config` or by editing the file")
            return value

        ids = section("ids")
        for key, value in ids.items():
            if value not in ("int", "string"):
                raise StoreFormatError(f"{path}: ids.{key} = {value!r} is not 'int' or 'string'")
        values = {
            "format_version": version,
            "created": get("", "created", str, ""),
            "id_types": dict(ids),
            "positive": get("labels", "positive", str, DEFAULT_POSITIVE),
            "negative": get("labels", "negative", str, DEFAULT_NEGATIVE),
            "item_text": get("documents", "item_text", str, ""),
            "behaviour_summary": get("documents", "behaviour_summary", bool, False),
            "model": get("encoder", "model", str, "minilm"),
            "max_length": get("encoder", "max_length", int, 256),
            "precision": get("encoder", "precision", str, "auto"),
            "encoder_id": get("encoder", "id", str, ""),
            "encoder_dim": get("encoder", "dim", int, 0),
            "encoder_fingerprint": get("encoder", "fingerprint", str, ""),
            "switch_version": get("encoder", "switch_version", int, 0),
            "switch_from": get("encoder", "switch_from", str, ""),
            "index_min_items": get("serving", "index_min_items", int, 200_000),
            "compact_fragments": get("maintenance", "compact_fragments", int, 64),
            "retain_seconds": get("maintenance", "retain_seconds", int, 3600),
            "storage": _storage_table(section("storage"), path),
        }
        if values["max_length"] < 2:
            raise StoreFormatError(f"{path}: encoder.max_length = {values['max_length']} must be at least 2")
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, path: Path) -> None:
        """Write the config to the file ``path`` (atomically: a temporary file, then ``os.replace``)."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_text())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def to_text(self) -> str:
        """The config as TOML."""
        q = json.dumps  # a JSON string literal is a valid TOML basic string
        lines = [
            "# dynstore store configuration; edit with `dynstore config`.",
            f"format_version = {self.format_version}",
            f"created = {q(self.created)}",
            "",
            "[ids]",
            *[f"{k} = {q(v)}" for k, v in sorted(self.id_types.items())],
            "",
            "[labels]",
            f"positive = {q(self.positive)}",
            f"negative = {q(self.negative)}",
            "",
            "[documents]",
            f"item_text = {q(self.item_text)}",
            f"behaviour_summary = {'true' if self.behaviour_summary else 'false'}",
            "",
            "[encoder]",
            f"model = {q(self.model)}",
            f"max_length = {int(self.max_length)}",
            f"precision = {q(self.precision)}",
            f"id = {q(self.encoder_id)}",
            f"dim = {int(self.encoder_dim)}",
            f"fingerprint = {q(self.encoder_fingerprint)}",
            *([f"switch_version = {int(self.switch_version)}", f"switch_from = {q(self.switch_from)}"]
              if self.switch_version else []),
            "",
            "[serving]",
            f"index_min_items = {int(self.index_min_items)}",
            "",
            "[maintenance]",
            f"compact_fragments = {int(self.compact_fragments)}",
            f"retain_seconds = {int(self.retain_seconds)}",
            "",
            *(["[storage]", *[f"{k} = {q(v)}" for k, v in sorted(self.storage.items())], ""] if self.storage else []),
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return asdict(self)

    def copy(self) -> "StoreConfig":
        """An independent copy (its dict fields copied too); cheaper than a round trip
        through :meth:`as_dict`, which every single-user query's snapshot makes."""
        return replace(self, id_types=dict(self.id_types), storage=dict(self.storage))

    def encoder_spec(self, root: Path | None) -> str:
        """``model`` with a store-relative path (a fine-tuned encoder under
        ``encoders/``) made absolute, so the store directory can move
        (``root`` None: the store has no local directory).

        >>> StoreConfig(model="minilm").encoder_spec(Path("/tmp"))
        'minilm'
        """
        if root is not None and self.model.startswith("encoders/") and (Path(root) / self.model).is_dir():
            return str(Path(root) / self.model)
        return self.model


def _storage_table(table: dict, path: str) -> dict[str, str]:
    """The ``[storage]`` table as strings; a secret in it is an error (it would live in the store).

    >>> _storage_table({"allow_http": True}, "x")
    {'allow_http': 'true'}
    """
    out = {}
    for key, value in table.items():
        if any(word in key.lower() for word in SECRET_WORDS):
            raise StoreFormatError(f"{path}: storage.{key} is a secret and must not be stored in the store; "
                                   "set it in the environment (AWS_SECRET_ACCESS_KEY, ...) instead")
        if not isinstance(value, (str, int, float, bool)):
            raise StoreFormatError(f"{path}: storage.{key} = {value!r} is not a string, number or boolean")
        out[str(key)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out
