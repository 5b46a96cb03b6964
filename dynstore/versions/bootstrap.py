"""Version 1: the popularity rule a store serves before its first ``refresh``.

``encode`` fills the semantic cache; once items are encoded, the store builds
version 1 from the untrained fusion (:meth:`FusionModel.untrained`) and
records how it does on the newest events, so ``dynstore versions`` shows it.
"""
from __future__ import annotations

import json

from dynstore.storage.catalog import Catalog
from dynstore.model.dynamics import DynamicSpec, rule_half_life
from dynstore.errors import DynstoreError, StoreBusy
from dynstore.model.features import FeatureSpec
from dynstore.versions.holdout import evaluate_version
from dynstore.memory import release_freed
from dynstore.model.fusion import FusionModel
from dynstore.storage.registry import registry_table, rule_window, write_registry
from dynstore.encoders.cache import encoder_info
from dynstore.versions.embeddings import build_version, items_table, settle_switch_keeping, users_table
from dynstore.data.views import views_connection
from dynstore.versions.window import DEFAULT_SINCE, newest_event

__all__ = ["ensure_first_version"]


def ensure_first_version(catalog: Catalog) -> int | None:
    """Create version 1 with the untrained fusion once items are encoded.

    The untrained fusion (documented in :meth:`FusionModel.untrained`) is the
    popularity rule -- positives decayed with a half-life fitted to the span of
    the interactions, read as of every query -- plus a fixed seeded projection
    of the attributes and user vectors from liked/disliked items, so a store
    recommends sensibly before its first ``refresh``.
    """
    if catalog.dataset("versions") is not None or catalog.dataset("items") is None:
        return None
    items = items_table(catalog)
    if items.num_rows == 0:
        return None
    item_spec = FeatureSpec.fit(items, "item_id")
    user_spec = FeatureSpec.fit(users_table(catalog), "user_id")
    spec = DynamicSpec()
    lo, hi = _time_span(catalog)
    # The rule's popularity is dynamic, so its residuals are zero: the version is
    # fused batch by batch from content, never holding the catalogue's vectors.
    model = FusionModel.popularity_rule(encoder_info(catalog)[1], item_spec.width, user_spec.width,
                                        rule=rule_half_life(spec, (hi - lo) / 86400.0), dynamic=spec,
                                        segments=tuple(n for _, n in user_spec.segment_columns()))
    number = build_version(catalog, model, item_spec, user_spec, parent=None, status="current",
                           train_window=rule_window(lo, hi) if hi > lo else "", counts={"items": items.num_rows},
                           items=items, residuals=None, verdict="initial")
    _record_rule_metrics(catalog, number)
    return number


def _time_span(catalog: Catalog) -> tuple[float, float]:
    """Epoch seconds of the first and the newest interaction ((0, 0) without any)."""
    if catalog.dataset("interactions") is None:
        return 0.0, 0.0
    con = views_connection(catalog)
    try:
        newest = newest_event(con)
        lo, hi = con.execute("SELECT epoch(min(ts)), epoch(?::TIMESTAMP) FROM interactions", [newest]).fetchall()[0]
    finally:
        con.close()
    return (0.0, 0.0) if hi is None else (float(lo), float(hi))


def _record_rule_metrics(catalog: Catalog, number: int) -> None:
    """Holdout figures of version 1, as ``eval --since 30d`` computes them (the rule scored
    before the newest 10% of the window a default refresh judges on), so the registry
    shows how it does; the window bounds what the first encode reads of a long history."""
    release_freed()  # what the version's build freed would count under the holdout's window
    try:
        m = evaluate_version(catalog, version=number, since=DEFAULT_SINCE, as_built=True)
        metrics = {"holdout": {k: v for k, v in m.items() if isinstance(v, float)}, "slice": m["slice"]}
    except Exception as exc:  # figures are an annotation: never fail the encode that made the version
        metrics = {"holdout": {}, "note": str(exc) if isinstance(exc, DynstoreError) else
                   f"not evaluated: {type(exc).__name__}: {exc}"}
    try:
        with catalog.lock("versions", wait=30):
            settle_switch_keeping(catalog)
            rows = registry_table(catalog).to_pylist()
            for r in rows:
                if r["version"] == number:
                    r["metrics"] = json.dumps(metrics)
            write_registry(catalog, rows)
    except StoreBusy:
        pass  # the version is committed: its figures are an annotation, never a failure
