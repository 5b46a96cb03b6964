"""``refresh --finetune-encoder``: adapt the text encoder to the store's feedback.

The fusion model is trained first, with the encoder's vectors fixed. Then the
last ``layers`` transformer layers of a *copy* of the encoder are trained on
the same examples, with everything else of the trained model held fixed::

    logit(u, i) = (v_i(θ) + c_i) · x_u + bv · v_i(θ) + d_i

where ``v_i(θ)`` is the pooled, normalised encoder output for item ``i``'s
document, ``c_i = alpha W a_i + r_i`` and ``d_i = b0 + ba · a_i + rb_i`` come
from the trained model, and ``x_u`` is the user's vector from their training
history. Positives are pushed up; explicit negatives, shown-but-ignored
impressions and one in-batch sampled item per positive are pushed down
(weighted like the fusion loss). So the encoder learns which words predict
what *these* users pick, while the fusion it feeds stays the same shape.

The copy is saved as a Hugging Face directory (safetensors weights, the
tokenizer and the sentence-transformers pooling files) under
``<store>/encoders/``; its content hash gives it a new encoder id, so every
item is re-encoded into a new cache and the old vectors stay.
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dynstore.errors import ConfigError
from dynstore.model.histories import build_histories, normalise
from dynstore.encoders.hf import HFEncoder, quiet_transformers
from dynstore.lazy import attempt_import

__all__ = ["finetune_encoder", "FINETUNE_LAYERS"]

FINETUNE_LAYERS = 2
LR = 3e-5
BATCH = 32
# One pass over the positives, capped: on a CPU a step of MiniLM over
# ~100-token documents costs seconds (forward through every layer), on a GPU
# milliseconds; --finetune-steps overrides the cap.
MAX_STEPS_CPU = 60
MAX_STEPS_GPU = 3000
_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass
class _Events:
    """The training events fine-tuning learns from: those whose item has a document."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    weight: np.ndarray  # like the fusion loss: negatives and impressions weighted by the config
    target: np.ndarray
    text_of: dict[int, str]  # item row -> its document, cleaned like inference


def _events(encoder: HFEncoder, docs: list[str | None], train: Any, cfg: Any) -> _Events:
    """Positive (and, when the model uses them, negative) events of items that have a document."""
    use = (train.label == 1) | (cfg.use_negatives & (train.label <= 0))
    ev_user, ev_item, ev_label = train.user[use], train.item[use], train.label[use]
    rows_kept, texts, _ = encoder.prepare([d or "" for d in docs])  # cleaned, lower-cased like inference
    text_of = dict(zip(rows_kept, texts))
    has_doc = np.fromiter((int(i) in text_of for i in ev_item), bool, ev_item.size)
    ev_user, ev_item, ev_label = ev_user[has_doc], ev_item[has_doc], ev_label[has_doc]
    if not (ev_label == 1).any():
        raise ConfigError("--finetune-encoder: no positive events with a document in the training window")
    weight = np.where(ev_label == 1, 1.0, np.where(ev_label == -1, cfg.neg_weight, cfg.impression_weight))
    return _Events(ev_user, ev_item, ev_label, weight, (ev_label == 1).astype(np.float32), text_of)


def _fixed_terms(model: Any, train: Any, residuals: Any, users: np.ndarray) -> dict[str, np.ndarray]:
    """What the fine-tune holds fixed: the trained item side minus its text part, and user vectors.

    Returns ``C`` and ``D`` per item, ``bv``, ``X`` per user of ``users`` and
    ``urow`` (user id -> row of ``X``).
    """
    Vn = normalise(train.V)  # what item_side adds to
    Wf, bias = model.item_side(train.V, train.A, residuals)
    act = model.activity(train.item, train.ts, train.label, Vn.shape[0])
    if act is not None:  # behaviour as of the end of the window is held fixed too
        bias = bias + model.dynamic_bias(act.items.features(np.arange(Vn.shape[0]), act.now()))
    ptr, hit, hl, hts = build_histories(users, train.user, train.item, train.label, train.ts)
    urow = np.full(int(train.UA.shape[0]), -1, np.int64)
    urow[users] = np.arange(users.size)
    return {"C": Wf - Vn, "D": bias - Vn @ model.params["bv"], "bv": model.params["bv"],
            "X": model.user_vectors(train.UA[users], ptr, hit, hl, hts, Wf), "urow": urow}


def _layers_of(model: Any) -> list:
    """The transformer blocks of a BERT-family model, first to last."""
    for path in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if len(obj):
            return list(obj)
    raise ConfigError(f"--finetune-encoder: cannot find the transformer layers of {type(model).__name__}")


def _trainable_copy(encoder: HFEncoder, layers: int, dev: Any) -> tuple[Any, list, int]:
    """(fp32 copy of the encoder's model in train mode, its trainable parameters, layers trained).

    Only the last ``layers`` blocks learn; the rest (embeddings included) stay frozen.
    """
    net = copy.deepcopy(encoder.model).float().to(dev)
    net.train()
    for prm in net.parameters():
        prm.requires_grad_(False)
    blocks = _layers_of(net)
    layers = max(1, min(int(layers), len(blocks)))
    trainable = [prm for blk in blocks[-layers:] for prm in blk.parameters()]
    for prm in trainable:
        prm.requires_grad_(True)
    return net, trainable, layers


class _Objective:
    """The fine-tuning loss: weighted BCE of events, plus one sampled item per positive."""

    def __init__(self, encoder: HFEncoder, net: Any, ev: _Events, fixed: dict[str, np.ndarray], dev: Any,
                 n_sampled_negatives: float) -> None:
        torch = attempt_import("torch")
        self.encoder, self.net, self.ev, self.dev = encoder, net, ev, dev
        self.sampled_weight = float(min(n_sampled_negatives, 4.0))
        self.urow = fixed["urow"]
        self.Xt = torch.from_numpy(fixed["X"]).to(dev)
        self.Ct, self.Dt, self.bvt = (torch.from_numpy(np.ascontiguousarray(fixed[k], np.float32)).to(dev)
                                      for k in ("C", "D", "bv"))

    def vectors(self, items: np.ndarray) -> Any:
        """Pooled, normalised vectors of the copy for ``items``' documents (with gradients)."""
        enc = self.encoder.tokenizer([self.ev.text_of[int(i)] for i in items], truncation=True,
                                     max_length=self.encoder.max_length, padding=True, return_tensors="pt",
                                     return_token_type_ids=False)
        ids, mask = enc["input_ids"].to(self.dev), enc["attention_mask"].to(self.dev)
        hidden = self.net(input_ids=ids, attention_mask=mask)[0]
        return self.encoder.pool(hidden, mask.bool(), mask.sum(dim=1))

    def __call__(self, rows: np.ndarray, neg_items: np.ndarray) -> Any:
        """Weighted BCE of the events ``rows``, plus one sampled item per positive."""
        torch, ev, dev = attempt_import("torch"), self.ev, self.dev
        F = torch.nn.functional
        uniq, inv = np.unique(np.r_[ev.item[rows], neg_items], return_inverse=True)
        v = self.vectors(uniq)
        inv_t = torch.from_numpy(inv).to(dev)
        x = self.Xt[torch.from_numpy(self.urow[ev.user[rows]]).to(dev)]
        uq = torch.from_numpy(uniq).to(dev)
        w_all = v + self.Ct[uq]
        b_all = v @ self.bvt + self.Dt[uq]
        n = rows.size
        it = inv_t[:n]
        logit = (w_all[it] * x).sum(1) + b_all[it]
        y = torch.from_numpy(ev.target[rows]).to(dev)
        wt = torch.from_numpy(ev.weight[rows].astype(np.float32)).to(dev)
        loss = (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * wt).sum()
        pos = torch.from_numpy(ev.label[rows] == 1).to(dev)
        nt = inv_t[n:]
        nlogit = (w_all[nt] * x).sum(1) + b_all[nt]
        sw = pos.float() * self.sampled_weight
        loss = loss + (F.softplus(nlogit) * sw).sum()  # BCE with y = 0
        return loss / (wt.sum() + sw.sum()).clamp(min=1e-6)


def _amp(dev: Any, encoder: Any) -> Callable[[], Any]:
    """bf16 autocast where the hardware runs it natively, else no autocast.

    What the encoder itself uses on such CPUs, and any CUDA GPU with bf16:
    about twice the speed, no loss scaling needed.
    """
    torch = attempt_import("torch")
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if dev.type == "cpu" and getattr(encoder, "precision", "fp32") == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def _probe_loss(loss_of: _Objective, amp: Callable[[], Any], probe: np.ndarray, probe_neg: np.ndarray) -> float:
    """The objective on a fixed sample of events, in eval mode, without gradients."""
    torch = attempt_import("torch")
    loss_of.net.eval()
    with torch.no_grad(), amp():
        out = float(sum(loss_of(probe[s:s + 64], probe_neg[s:s + 64]).item() * len(probe[s:s + 64])
                        for s in range(0, probe.size, 64)) / probe.size)
    loss_of.net.train()
    return out


def _train(loss_of: _Objective, trainable: list, lr: float, steps: int, batch_size: int,
           rng: np.random.Generator, amp: Callable[[], Any], progress: Callable[[int, int], Any] | None) -> None:
    """``steps`` AdamW steps over the events in a random order, each with sampled negatives."""
    torch = attempt_import("torch")
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    candidates = np.fromiter(loss_of.ev.text_of, np.int64)
    order = rng.permutation(loss_of.ev.item.size)
    for step in range(steps):
        s = (step * batch_size) % order.size
        rows = order[s:s + batch_size]
        if rows.size < batch_size and order.size >= batch_size:
            rows = np.r_[rows, order[: batch_size - rows.size]]
        neg = candidates[rng.integers(0, candidates.size, rows.size)]
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = loss_of(rows, neg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if progress is not None:
            progress(step + 1, steps)


def _new_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.name[3:]) for p in root.glob("ft-*") if p.name[3:].isdigit()), default=0)
    return root / f"ft-{n}"


def _copy_pooling_files(src: Path, dst: Path) -> None:
    """The sentence-transformers files that give the copy the same pooling as its base."""
    for name in _ST_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "modules.json").is_file():
        for module in json.loads((src / "modules.json").read_text()):
            sub = str(module.get("path", ""))
            if sub and (src / sub).is_dir():
                shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)


def _save(net: Any, encoder: HFEncoder, out_root: Path, meta: dict[str, Any]) -> Path:
    """Write the trained copy as a Hugging Face directory ``out_root/ft-<n>``, atomically by rename."""
    out = _new_dir(Path(out_root))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    net.eval()
    with quiet_transformers():
        net.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
        encoder.tokenizer.save_pretrained(str(tmp))
    _copy_pooling_files(Path(encoder.path), tmp)
    (tmp / "dynstore_finetune.json").write_text(json.dumps({"base": encoder.id, **meta}, indent=1))
    for f in tmp.iterdir():  # save_pretrained may add pickles on some versions: never keep them
        if f.suffix in (".bin", ".pt", ".pth", ".pkl"):
            f.unlink()
    tmp.rename(out)
    return out


def finetune_encoder(encoder: Any, docs: list[str | None], train: Any, model: Any, residuals: Any, out_root: Path,
                     *, layers: int = FINETUNE_LAYERS, steps: int | None = None, lr: float = LR,
                     batch_size: int = BATCH, seed: int = 0, device: str = "cpu",
                     progress: Callable[[int, int], Any] | None = None) -> dict:
    """Fine-tune a copy of ``encoder`` on ``train``; save it under ``out_root``.

    Parameters
    ----------
    encoder : HFEncoder
        The store's encoder; it is not modified (a deep copy is trained).
    docs : list of str or None
        Item documents, aligned with the rows of ``train.V``.
    train : TrainingData
        The refresh's training events (the holdout is not in it).
    model : FusionModel
        The trained candidate; its parameters are held fixed.
    residuals : (R, rb)
        Per-item residuals aligned with ``train.V``.
    out_root : Path
        Parent directory; the encoder goes to ``out_root / "ft-<n>"``.
    layers, steps, lr, batch_size, seed, device
        Last ``layers`` transformer layers are trained for ``steps`` AdamW
        steps of ``batch_size`` events (default: one pass over the positives,
        capped at ``MAX_STEPS_CPU`` on a CPU, ``MAX_STEPS_GPU`` on a GPU).

    Returns
    -------
    dict
        ``path`` (the saved encoder), ``steps``, ``layers``, ``examples``,
        ``loss_before`` / ``loss_after`` (the objective on a fixed sample of
        training events, before and after), ``seconds``.
    """
    if not isinstance(encoder, HFEncoder):
        raise ConfigError(f"--finetune-encoder needs a Hugging Face encoder; this store uses {encoder.id!r}")
    torch = attempt_import("torch")
    t0 = time.perf_counter()
    ev = _events(encoder, docs, train, model.config)
    fixed = _fixed_terms(model, train, residuals, np.unique(ev.user))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dev = torch.device(device)
    net, trainable, layers = _trainable_copy(encoder, layers, dev)
    loss_of = _Objective(encoder, net, ev, fixed, dev, model.config.n_sampled_negatives)
    amp = _amp(dev, encoder)
    # a fixed sample of events (and one sampled item each) to compare the loss on
    probe = rng.choice(ev.item.size, size=min(128, ev.item.size), replace=False)
    probe_neg = rng.integers(0, train.V.shape[0], probe.size)
    probe_neg = np.array([j if j in ev.text_of else int(ev.item[r]) for j, r in zip(probe_neg, probe)], np.int64)
    before = _probe_loss(loss_of, amp, probe, probe_neg)
    if steps is None:
        cap = MAX_STEPS_GPU if dev.type == "cuda" else MAX_STEPS_CPU
        steps = int(min(cap, max(1, -(-int((ev.label == 1).sum()) // batch_size))))
    steps = max(1, int(steps))
    _train(loss_of, trainable, lr, steps, batch_size, rng, amp, progress)
    after = _probe_loss(loss_of, amp, probe, probe_neg)
    out = _save(net, encoder, out_root, {"layers": layers, "steps": steps, "lr": lr, "batch_size": batch_size,
                                         "seed": seed, "loss_before": before, "loss_after": after})
    return {"path": str(out), "steps": steps, "layers": layers, "examples": int(ev.item.size),
            "loss_before": round(before, 6), "loss_after": round(after, 6),
            "seconds": round(time.perf_counter() - t0, 3)}
