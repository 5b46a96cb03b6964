"""Switching the store's encoder as part of a registry commit.

Promoting a version built with a fine-tuned encoder (``refresh
--finetune-encoder``) and rolling back to a version of another encoder change
two things: the registry (which version is current) and ``dynstore.toml``
(which encoder new items are encoded with). They cannot be one file write, so
the config is written first with the switch *pending* -- the new model, the
version that makes it real (``switch_version``) and the model it replaces
(``switch_from``) -- and the registry commit decides:

* every reader resolves a pending switch in memory (:func:`effective`): the new
  model if the registry's current version is ``switch_version``, else the old
  one; it never writes;
* the writer clears the pending switch right after its registry commit, and
  every registry writer settles a leftover one (a crash in between) before it
  commits anything (:func:`dynstore.versions.embeddings.settle_switch`, beside the
  version writes that need it: this module stays below the catalog).

So a ``kill -9`` at any point leaves registry and config agreeing.

Examples
--------
>>> from dynstore.storage.config import StoreConfig
>>> cfg = StoreConfig(model="encoders/ft-3", switch_version=3, switch_from="minilm")
>>> resolve(cfg, current=2).model, resolve(cfg, current=3).model
('minilm', 'encoders/ft-3')
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dynstore.storage.backend import Storage

__all__ = ["resolve", "effective"]


def resolve(cfg, current: int | None):
    """``cfg`` with a pending switch decided by the registry's ``current`` version."""
    if not cfg.switch_version:
        return cfg
    model = cfg.model if current == cfg.switch_version else cfg.switch_from
    return replace(cfg, model=model, switch_version=0, switch_from="", id_types=dict(cfg.id_types))


def _current(storage: "Storage") -> int | None:
    import lance
    import pyarrow.compute as pc

    uri = storage.uri("versions.lance")
    try:
        t = lance.dataset(uri, storage_options=storage.storage_options).to_table(columns=["version", "status"])
    except (FileNotFoundError, ValueError, OSError):
        return None
    hit = t.filter(pc.equal(t.column("status"), "current")).column("version").to_pylist()
    return hit[0] if hit else None


def effective(storage: "Storage", cfg):
    """The config a store in ``storage`` runs with: a pending switch resolved (readers: in memory)."""
    return resolve(cfg, _current(storage)) if cfg.switch_version else cfg
