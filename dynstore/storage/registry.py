"""The version registry: which embedding versions exist and which one is served.

``versions.lance`` is tiny and rewritten whole on every change, which makes a
promotion (old current -> retired, new -> current) a single atomic commit.
"""
from __future__ import annotations

import datetime as _dt
import json

import pyarrow as pa

from dynstore.storage.catalog import Catalog

__all__ = ["list_versions", "current_version", "is_rule", "rule_window",
           "headline_metrics", "registry_table", "VERDICT_OF_STATUS", "write_registry", "next_version", "VERDICTS"]

#: Serving status: ``current`` (served), ``retired`` (served before),
#: ``candidate`` / ``rejected`` (never served yet). It changes with promotions
#: and rollbacks; the verdict below never does.
#: What produced a version and what refresh decided about it: ``initial``
#: (version 1, the popularity rule), ``promoted``, ``passed`` (not worse, but
#: kept as a candidate by ``--no-promote``), ``rejected``, ``rule`` (the
#: popularity rule published after a rejection).
VERDICTS = ("initial", "promoted", "passed", "rejected", "rule")
VERDICT_OF_STATUS = {"current": "promoted", "candidate": "passed", "rejected": "rejected"}

REGISTRY_SCHEMA = pa.schema([
    ("version", pa.int64()), ("parent", pa.int64()), ("status", pa.string()),
    ("created", pa.timestamp("us")), ("encoder", pa.string()), ("alpha", pa.float64()),
    ("train_window", pa.string()), ("counts", pa.string()), ("metrics", pa.string()),
    ("snapshot", pa.string()), ("verdict", pa.string()),
])


def _legacy_verdict(row: dict) -> str:
    """Registries written before verdicts were kept: the best reading of a row."""
    if row.get("train_window") == "untrained":
        return "initial" if row.get("parent") is None else "rule"
    return {"rejected": "rejected", "candidate": "passed"}.get(row.get("status"), "promoted")


def registry_table(catalog: Catalog, pinned: int | None = None) -> pa.Table:
    """The registry as Arrow (verdicts filled in for registries older than them)."""
    ds = catalog.dataset("versions", version=pinned)
    if ds is None:
        return REGISTRY_SCHEMA.empty_table()
    table = ds.to_table()
    if "verdict" not in table.schema.names:
        verdicts = [_legacy_verdict(r) for r in table.to_pylist()]
        table = table.append_column("verdict", pa.array(verdicts, pa.string()))
    return table


def is_rule(row: dict) -> bool:
    """True for a popularity-rule version (version 1, or one published after a rejection)."""
    return row.get("verdict") in ("initial", "rule") or row.get("train_window") == "untrained"


def rule_window(first_ts: float, last_ts: float) -> str:
    """The span a popularity rule was set up on, as ``train_window`` shows it (epoch
    seconds in). The rule itself reads behaviour as of every query.

    >>> rule_window(0.0, 86400.0 * 100)
    '1970-01-01 00:00 .. 1970-04-11 00:00'
    """
    start = _dt.datetime.fromtimestamp(first_ts, _dt.timezone.utc)
    end = _dt.datetime.fromtimestamp(last_ts, _dt.timezone.utc)
    return f"{start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M}"


def headline_metrics(row: dict) -> dict:
    """The holdout figures that describe a version best (its own, not its rival's)."""
    m = row.get("metrics") or {}
    for key in ("candidate", "rule", "holdout"):
        if isinstance(m.get(key), dict) and any(isinstance(v, float) for v in m[key].values()):
            return m[key]
    return {k: v for k, v in m.items() if isinstance(v, float)}


def choices(row: dict) -> str:
    """Refresh's choices for a version, one line: each weight chosen on the pooled cuts
    (:mod:`dynstore.model.selection`) and leaving the start, with the gain in NDCG@10 over not
    making the change, its standard error and the users (user-periods) that judged it.

    >>> choices({"metrics": {"train": {"selection": {"gamma": {"chosen": 0.05, "gain": 0.008,
    ...     "se": 0.004, "users": 114}, "prior": {"chosen": 0.0, "gain": 0.0, "se": 0.0, "users": 90,
    ...     "best_tried": {"value": 0.25, "gain": 0.001, "se": 0.005}}}}}})
    'gamma 0.05 (+0.0080 ± 0.0040, n 114); prior 0.0 (best tried 0.25: +0.0010 ± 0.0050, n 90)'
    """
    sel = ((row.get("metrics") or {}).get("train") or {}).get("selection") or {}
    parts = []
    for name, c in sel.items():
        if not isinstance(c, dict):
            continue
        shown, what = c, ""
        if c.get("chosen") in (None, 0, 0.0, "", "keep") and isinstance(c.get("best_tried"), dict):
            # nothing chosen: how close it came
            shown, what = c["best_tried"], f"best tried {c['best_tried'].get('value')}: "
        gain, se = shown.get("gain"), shown.get("se")
        figures = f"{gain:+.4f}" if isinstance(gain, (int, float)) else "?"
        if isinstance(se, (int, float)):
            figures += f" ± {se:.4f}"
        parts.append(f"{name} {c.get('chosen')} ({what}{figures}, n {c.get('users', 0)})")
    return "; ".join(parts)


def list_versions(catalog: Catalog) -> list[dict]:
    """Every version, newest first, with ``counts`` and ``metrics`` parsed.

    Examples
    --------
    >>> import tempfile, dynstore
    >>> dynstore.init(tempfile.mkdtemp() + "/s").versions()
    []
    """
    ds = catalog.dataset("versions")
    key = ds.version if ds is not None else 0
    hit = catalog.memo.get("registry")
    if hit is None or hit[0] != key:
        rows = registry_table(catalog).to_pylist()
        for r in rows:
            for field in ("counts", "metrics", "snapshot"):
                r[field] = json.loads(r[field]) if r[field] else {}
        hit = catalog.memo.put("registry", (key, sorted(rows, key=lambda r: -r["version"])))
    return [dict(r) for r in hit[1]]


def current_version(catalog: Catalog) -> int | None:
    for r in list_versions(catalog):
        if r["status"] == "current":
            return r["version"]
    return None


def write_registry(catalog: Catalog, rows: list[dict]) -> None:
    """Replace the registry with ``rows`` (one commit); the caller holds the ``versions``
    lock, confirmed first on object storage (a writer whose lease was taken over commits nothing)."""
    import lance

    catalog.storage.confirm_lock("versions")
    table = pa.Table.from_pylist(rows, schema=REGISTRY_SCHEMA)
    lance.write_dataset(table, catalog.uri("versions"), storage_options=catalog.storage_options,
                        mode="overwrite" if catalog.dataset("versions") is not None else "create")


def embedding_schema(catalog: Catalog, dim: int) -> pa.Schema:
    item_t = pa.string() if catalog.id_type("item") == "string" else pa.int64()
    return pa.schema([("version", pa.int64()), ("item_id", item_t), ("doc_hash", pa.string()),
                      ("vector", pa.list_(pa.float32(), dim)), ("bias", pa.float32())])


def next_version(catalog: Catalog) -> int:
    """The next version number. Rows of versions whose registry commit never
    happened (a crash) are removed first: the caller holds the ``versions`` lock,
    so no other version is being written and those rows can never become whole."""
    reg = registry_table(catalog)
    top = max(reg.column("version").to_pylist(), default=0)
    emb = catalog.dataset("embeddings")
    if emb is not None and emb.count_rows(filter=f"version > {top}"):
        import lance

        lance.dataset(catalog.uri("embeddings"), storage_options=catalog.storage_options).delete(f"version > {top}")
    number = top + 1
    # on object storage a lease can be taken over from a paused writer: the number is
    # claimed (a conditional put) so two writers never write rows under one number
    while not catalog.storage.claim(f"locks/versions/v{number}.claim"):
        number += 1
    return number





