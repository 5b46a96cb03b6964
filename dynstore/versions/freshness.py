"""Does the store need a ``refresh``? The no-op decision, and why.

A refresh retrains when something its last version was built from changed:
new or deleted interactions, changed items, another ``--since`` window, the
labelling rules, the item document, or the encoder. Each version records
these in its registry ``snapshot`` (the ``rules`` part since dynstore 0.1
kept them; older versions compare on data alone). ``refresh --force``
retrains regardless. ``dynstore inspect`` shows the same decision.
"""
from __future__ import annotations

from dynstore.storage.catalog import Catalog
from dynstore.storage.registry import list_versions
from dynstore.encoders.cache import encoder_info, snapshot as store_snapshot

__all__ = ["current_rules", "refresh_plan"]

_RULE_NAMES = {"positive": "positive rule", "negative": "negative rule", "item_text": "item document",
               "behaviour_summary": "behaviour summary", "encoder": "encoder"}


def current_rules(catalog: Catalog) -> dict:
    """What a version's labels and vectors depend on besides the data.

    >>> import tempfile, dynstore
    >>> sorted(current_rules(dynstore.init(tempfile.mkdtemp() + "/s", model="fake").catalog))
    ['behaviour_summary', 'encoder', 'item_text', 'negative', 'positive']
    """
    cfg = catalog.config
    return {"positive": cfg.positive, "negative": cfg.negative, "item_text": cfg.item_text,
            "behaviour_summary": cfg.behaviour_summary, "encoder": encoder_info(catalog)[0]}


def refresh_plan(catalog: Catalog, *, since: str | None, force: bool = False, snapshot: dict | None = None) -> dict:
    """Whether ``refresh(since=...)`` would retrain now, and the reasons.

    Returns ``{"needed": bool, "reasons": [str, ...], "reason": str,
    "version": latest version or None, "rules": current_rules(store)}``;
    ``reason`` is one line for the no-op message or the retrain notice.

    Examples
    --------
    >>> import tempfile, dynstore
    >>> refresh_plan(dynstore.init(tempfile.mkdtemp() + "/s", model="fake").catalog, since="30d")["reason"]
    'no interactions ingested yet'
    """
    snap = snapshot or store_snapshot(catalog)
    rules = current_rules(catalog)
    if snap["interactions"] == 0:
        return {"needed": False, "reasons": [], "reason": "no interactions ingested yet", "version": None,
                "rules": rules}
    rows = list_versions(catalog)
    latest = rows[0] if rows else None
    reasons = ["--force"] if force else []
    if latest is None:
        reasons.append("no version yet")
    else:
        v, last = latest["version"], latest["snapshot"]
        if last.get("interactions") != snap["interactions"]:
            reasons.append(f"interactions changed since version {v}" if last.get("interactions") is not None
                           else f"version {v} has not been trained on these interactions")
        if last.get("items") is not None and last.get("items") != snap["items"]:
            reasons.append(f"items changed since version {v}")
        if last.get("since", since) != since:
            reasons.append(f"--since {since} (version {v} used {last.get('since')})")
        for key, old in (last.get("rules") or {}).items():
            if key in rules and rules[key] != old:
                reasons.append(f"{_RULE_NAMES.get(key, key)} changed: {old!r} -> {rules[key]!r}")
    if reasons:
        reason = "; ".join(reasons)
    else:
        reason = (f"no new data since version {latest['version']} (interactions, items, window, rules "
                  "and encoder unchanged); use --force to retrain anyway")
    return {"needed": bool(reasons), "reasons": reasons, "reason": reason,
            "version": latest["version"] if latest else None, "rules": rules}
