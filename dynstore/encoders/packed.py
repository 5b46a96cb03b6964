"""BERT's forward pass over packed sequences, for the CPU (fp32 or int8).

On the CPU ~85% of an encoder's time goes to its linear layers; packing the
batch's sequences into one ``[tokens, hidden]`` matrix makes them work on
real tokens only, where a padded batch would also multiply the padding.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from dynstore.lazy import attempt_import

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of import time
    import torch

__all__ = ["PackedBert", "packed_support", "token_groups", "CALIBRATION_TEXTS"]

# Model types whose modules the packed runner knows (BERT layout; RoBERTa
# only shifts the position ids past the padding index).
_PACKED_TYPES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}
_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "relu": None}
# Input channels per linear layer that the int8 path keeps in fp32.  BERT
# activations have a few channels 10-15x larger than the rest; with one
# activation scale per batch they would squeeze every other channel into a
# handful of int8 levels (cosine to fp32 0.976 on MiniLM; 0.997 with 8 kept).
_INT8_OUTLIERS = 8
# int8 weights use 7 bits (+-63) so that, with full 8-bit activations, the
# pairwise int16 sums of AVX2's vpmaddubsw cannot saturate: 2 * 255 * 63 < 2**15.
# (The stock dynamic quantization takes the bit from the activations instead,
# which costs more accuracy: cosine 0.986 against 0.992 without outliers kept.)
_INT8_WEIGHT_LEVELS = 63
CALIBRATION_TEXTS = (
    "title: Wireless noise-cancelling headphones\ncategory: electronics\nbrand: Acme",
    "A rocket launches into space carrying three astronauts to the station.",
    "Slow-cooked beef stew with carrots, potatoes and a glass of red wine.",
    "The quarterly report shows revenue growth of 12% over last year.",
    "description: Durable stainless steel kitchen knife set, dishwasher safe.",
    "She walked along the beach at sunset, listening to the waves.",
    "How do I reset my password if I no longer have access to my email?",
    "tags: vintage, handmade, leather, gift",
    "The film is a space opera about a rebellion against a galactic empire.",
    "Install the package with pip and import it in your Python script.",
    "Running shoes with breathable mesh, size 42, colour blue.",
    "Children's book: a small dragon learns to share its treasure.",
    "price 19.99 EUR, free shipping, 30-day returns",
    "Organic green tea, 100 bags, from the mountains of Japan.",
    "The patient reported mild headaches and was prescribed rest.",
    "Top 10 hiking trails in the Alps for beginners and families.",
)
"""Sentences the int8 path runs once in fp32 to find each layer's outlier
channels.  Fixed here, so an int8 encoder is the same in every process."""

Groups = Sequence[tuple[int, int, int, int]]


class _Linear:
    """fp32 ``x @ W.T + b``; ``scratch`` says the caller will not reuse ``x``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self._linear = attempt_import("torch.nn.functional").linear

    def __call__(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        return self._linear(x, self.weight, self.bias)


class _Int8Linear:
    """Dynamic int8 linear layer (fbgemm) with outlier input channels in fp32.

    Weights: int8 per output channel, symmetric, 7 bits.  Activations:
    quantized per call to uint8 over the whole batch by
    ``quantized::linear_dynamic``.  The ``outliers`` input channels are
    zeroed for the int8 product and added back by a small fp32 product.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, outliers: torch.Tensor) -> None:
        torch = attempt_import("torch")
        w = weight.detach().float().clone()
        self.idx = outliers
        self.w_out_t = w[:, outliers].t().contiguous()  # [k, out]
        w[:, outliers] = 0.0
        scale = (w.abs().amax(dim=1) / _INT8_WEIGHT_LEVELS).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # quantized tensors are "deprecated" but are what fbgemm packs
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())
        self._op = torch.ops.quantized.linear_dynamic

    def __call__(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        x = x.contiguous()
        xo = x.index_select(1, self.idx)
        x.index_fill_(1, self.idx, 0.0)
        y = self._op(x, self.packed, False)  # reduce_range=False: 8-bit activations (see _INT8_WEIGHT_LEVELS)
        if not scratch:
            x.index_copy_(1, self.idx, xo)  # x is the residual stream: give it back intact
        return y.addmm_(xo, self.w_out_t)


class _Recorder:
    """fp32 linear that keeps the largest |input| per channel (int8 calibration)."""

    def __init__(self, inner: _Linear) -> None:
        self.inner, self.absmax = inner, None

    def __call__(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        cur = x.abs().amax(dim=0)
        self.absmax = cur if self.absmax is None else attempt_import("torch").maximum(self.absmax, cur)
        return self.inner(x, scratch)


def packed_support(model: Any) -> str | None:
    """None when :class:`PackedBert` can run ``model``, else why not."""
    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    if mt not in _PACKED_TYPES:
        return f"model type {mt!r} (supported: {', '.join(sorted(_PACKED_TYPES))})"
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position embeddings {cfg.position_embedding_type!r}"
    if getattr(cfg, "hidden_act", None) not in _ACTIVATIONS:
        return f"activation {getattr(cfg, 'hidden_act', None)!r}"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "a decoder"
    try:
        emb, layer = model.embeddings, model.encoder.layer[0]
        _ = (emb.word_embeddings, emb.position_embeddings, emb.LayerNorm, layer.attention.self.query,
             layer.attention.output.dense, layer.intermediate.dense, layer.output.dense, layer.output.LayerNorm)
    except (AttributeError, IndexError, TypeError):
        return "an unfamiliar module layout"
    return None


def _norm(ln: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return ln.weight.detach(), ln.bias.detach()


def _linear(dense: Any) -> _Linear:
    return _Linear(dense.weight.detach(), dense.bias.detach())


def _layer_weights(layer: Any) -> dict[str, Any]:
    """One transformer block's weights, Q, K and V fused into one product."""
    torch = attempt_import("torch")
    att = layer.attention
    q, k, v = att.self.query, att.self.key, att.self.value
    return {
        "qkv": _Linear(torch.cat([q.weight, k.weight, v.weight]).detach().contiguous(),
                       torch.cat([q.bias, k.bias, v.bias]).detach()),
        "out": _linear(att.output.dense),
        "ln1": _norm(att.output.LayerNorm),
        "ffn_in": _linear(layer.intermediate.dense),
        "ffn_out": _linear(layer.output.dense),
        "ln2": _norm(layer.output.LayerNorm),
    }


class PackedBert:
    """BERT forward pass over packed sequences: no padding, no attention mask.

    The sequences of a batch are concatenated into one ``[tokens, hidden]``
    matrix, so every linear layer (where ~85% of the CPU time goes) works
    on real tokens only; attention runs per group of equal-length
    sequences, which needs no mask.  Q, K and V are one fused product.
    Mirrors ``BertModel`` without its pooler (sentence vectors never use it).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model :func:`packed_support` accepts; its weights are shared, not copied.
    pooling : {"mean", "cls", "max", "mean_sqrt_len"}
        How token states become a sentence vector.

    Examples
    --------
    >>> runner = PackedBert(hf_model, "mean")  # doctest: +SKIP
    >>> runner(ids, [(0, 12, 2, 6)]).shape     # two sequences of 6 tokens  # doctest: +SKIP
    torch.Size([2, 384])
    """

    _LINEARS = ("qkv", "out", "ffn_in", "ffn_out")

    def __init__(self, model: Any, pooling: str) -> None:
        cfg = model.config
        self.pooling = pooling
        self.heads = int(cfg.num_attention_heads)
        self.hidden = int(cfg.hidden_size)
        self.eps = float(cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        emb = model.embeddings
        self.pos_offset = (int(cfg.pad_token_id or 0) + 1) if _PACKED_TYPES[cfg.model_type] else 0
        self.word = emb.word_embeddings.weight.detach()
        self.pos = emb.position_embeddings.weight.detach()
        tt = getattr(emb, "token_type_embeddings", None)
        self.type0 = tt.weight.detach()[0] if tt is not None else None
        self.ln0 = _norm(emb.LayerNorm)
        self.layers: list[dict[str, Any]] = [_layer_weights(layer) for layer in model.encoder.layer]

    def quantize_int8(self, calibration: Sequence[tuple[torch.Tensor, Groups]]) -> None:
        """Swap every linear layer for an int8 one (:class:`_Int8Linear`).

        ``calibration`` holds ``(ids, groups)`` batches run once in fp32 to
        find each layer's :data:`_INT8_OUTLIERS` largest input channels.
        """
        torch = attempt_import("torch")
        for layer in self.layers:
            for name in self._LINEARS:
                layer[name] = _Recorder(layer[name])
        with torch.inference_mode():
            for ids, groups in calibration:
                self(ids, groups)
        for layer in self.layers:
            for name in self._LINEARS:
                rec = layer[name]
                k = min(_INT8_OUTLIERS, rec.inner.weight.shape[1] - 1)
                idx = torch.sort(rec.absmax.topk(k).indices).values
                layer[name] = _Int8Linear(rec.inner.weight, rec.inner.bias, idx)

    def _embed(self, ids: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Word + position (+ token type 0) embeddings, layer-normalised."""
        torch, F = attempt_import("torch"), attempt_import("torch.nn.functional")
        pos = torch.cat([torch.arange(self.pos_offset, self.pos_offset + n).repeat(c) for _, _, c, n in groups])
        x = F.embedding(ids, self.word).add_(F.embedding(pos, self.pos))
        if self.type0 is not None:
            x.add_(self.type0)
        return F.layer_norm(x, (self.hidden,), *self.ln0, self.eps)

    def _block(self, p: dict[str, Any], x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """One transformer block; attention per run of equal-length sequences."""
        torch, F = attempt_import("torch"), attempt_import("torch.nn.functional")
        d, h = self.hidden, self.heads
        qkv = p["qkv"](x)
        ctx = torch.empty_like(x)
        for a, b, c, n in groups:
            q, k, v = qkv[a:b].view(c, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v)  # equal lengths: no mask needed
            ctx[a:b].view(c, n, h, d // h).copy_(o.transpose(1, 2))
        x = F.layer_norm(p["out"](ctx, True).add_(x), (d,), *p["ln1"], self.eps)
        y = p["ffn_in"](x)
        y = F.relu_(y) if self.act is None else F.gelu(y, approximate=self.act)
        return F.layer_norm(p["ffn_out"](y, True).add_(x), (d,), *p["ln2"], self.eps)

    def _pool(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Unit sentence vectors from the packed last hidden states."""
        torch, F = attempt_import("torch"), attempt_import("torch.nn.functional")
        x = x.float()
        parts = []
        for a, b, c, n in groups:
            seq = x[a:b].view(c, n, self.hidden)
            if self.pooling == "cls":
                parts.append(seq[:, 0])
            elif self.pooling == "max":
                parts.append(seq.amax(dim=1))
            else:
                parts.append(seq.sum(dim=1) / (n ** 0.5 if self.pooling == "mean_sqrt_len" else n))
        return F.normalize(torch.cat(parts), p=2.0, dim=1)

    def __call__(self, ids: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Unit sentence vectors of packed sequences.

        Parameters
        ----------
        ids : torch.Tensor
            int64 ``[tokens]``: the token ids of every sequence, one after another.
        groups : sequence of (start, stop, count, length)
            Runs of ``count`` sequences of ``length`` tokens at ``ids[start:stop]``.
        """
        x = self._embed(ids, groups)
        for p in self.layers:
            x = self._block(p, x, groups)
        return self._pool(x, groups)


def token_groups(lengths: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Runs of equal values in ``lengths`` as (token start, token stop, count, length).

    >>> token_groups(np.array([3, 3, 2]))
    [(0, 6, 2, 3), (6, 8, 1, 2)]
    """
    out, tok, i = [], 0, 0
    bounds = np.flatnonzero(np.diff(lengths)) + 1
    for j in [*bounds.tolist(), len(lengths)]:
        n, c = int(lengths[i]), j - i
        out.append((tok, tok + c * n, c, n))
        tok += c * n
        i = j
    return out
