"""The fusion model's hyper-parameters and training data (:class:`ModelConfig`,
:class:`TrainingData`): plain values shared by the model, its trainer and evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["ModelConfig", "TrainingData"]


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`FusionModel` (all JSON-able; saved with each version).

    Attributes
    ----------
    alpha_init : float
        Initial weight of the attribute term ``W a_i``.
    min_history : int
        Training positives an item needs to get a residual ``r_i, rb_i``.
    half_life : float
        History weights decay as ``exp(-rank / half_life)`` (rank 0 = most recent).
    max_history : int
        Only the most recent events of each kind enter a user vector.
    short_half_life, short_history : float, int
        The same for the short-term aggregate of the positives (``g_short``).
    epochs, batch_size, lr : training schedule (AdamW).
    weight_decay : float
        Decoupled weight decay of the shared parameters (``W, bv, ba, U, u0``).
    residual_decay : float
        Decoupled weight decay of the per-item residuals ``r_i, rb_i``.
    n_sampled_negatives : float
        Total loss weight of uniformly sampled negatives per positive.
    sample_pool : int
        Sampled items shared by a batch (each positive is scored against all of them).
    neg_weight, impression_weight : float
        Loss weights of explicit negatives (label -1) and impressions (label 0).
        Impressions weigh little (0.1, chosen on the validation slices of both
        quality benchmarks: +10 % NDCG@10 on the shop, neutral on MovieLens):
        they are many (8 per positive in the shop) and an often-shown item is
        ignored often because it is shown often.
    residual_dropout : float
        Probability that a warm target's residuals are hidden in a training step.
    prior_weight : float
        Weight of the new-user ("prior") scoring of every positive.
    history_stride : int
        Events of a user per history snapshot (1 = every event sees all earlier ones).
    scalar_lr_mult : float
        Learning-rate multiplier of the scalars ``alpha, b0, g_pos, g_neg``.
    user_transform : bool
        Learn ``M`` in ``(I + M)`` applied to the history terms (False keeps ``M = 0``).
    time_decay_days : float or None
        Half-life (days before the newest event) of event weights; None = no decay.
    seed : int
    use_negatives : bool
        False is the ablation that ignores explicit negatives and impressions
        (in the loss and in the user vector).
    objective : {"softmax", "bce"}
        Loss of the positives (see :mod:`dynstore.model.training`).
    user_weight_power : float
        Event weights are divided by ``n_user_events ** power``, so heavy users do not
        dominate (0: every event counts alike; 1: every user counts alike).
    item_item : bool
        Fuse the closed-form item-item component (:mod:`dynstore.model.itemitem`), its weight
        ``gamma`` chosen on the holdout of a fit.
    content_prior : bool
        Fit the closed-form content prior (:mod:`dynstore.model.prior`) with every version; its
        weight ``beta`` chosen on the cuts of a fit (0: not used).
    item_item_recency : float
        Half-life, in positives (rank 0 = the most recent), of a history entry's weight in
        the item-item term: 0 weighs a user's whole history alike. Chosen by a fit among
        ``selection.RECENCIES`` with ``gamma`` on the pooled cuts (see docs/model.md).
    user_knn : int
        Neighbours of the user-kNN term (:mod:`dynstore.model.userknn`; 0: no such term); its
        weight ``delta`` chosen on the pooled cuts of a fit, on top of the item-item term.
    user_knn_recency : float
        Half-life, in positives (rank 0 = the most recent), of a positive's weight on the
        query side when the user-kNN term finds a user's neighbours; 0 weighs them alike.
        Measured against the online effect, not chosen by refresh (docs/model.md).
    user_knn_max_users : int
        Refresh tries the user-kNN term only while at most this many users have a
        positive: its cost grows with users x users (``benchmarks/bench_userknn.py``); above
        it ``delta`` stays 0 and serving pays nothing.
    prior_k : float
        The content prior keeps ``k / (n + k)`` of its weight after ``n`` positives of
        the item. 0.1: one positive leaves 9 %; with 10 the prior reordered warm items
        with few events and cost new users 0.004 NDCG@10 on MovieLens' rolling cuts.
    start_z : float
        With a holdout, a trained state replaces the start (and a non-zero item-item
        weight replaces none) only if its per-user NDCG@10 beats the start's by more than
        this many standard errors of the paired difference.
    dynamics_epochs, dynamics_lr, first_phase : int, float, tuple of str
        The first phase of training: only the parameters named in ``first_phase`` learn
        (default: the weights of the behaviour and segment features, and ``b0``), at
        ``dynamics_lr`` (see :meth:`dynstore.model.training.Trainer.fit`).
    """

    alpha_init: float = 0.1
    min_history: int = 5
    half_life: float = 20.0
    max_history: int = 200
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 0.003
    weight_decay: float = 1e-4
    residual_decay: float = 1e-3
    n_sampled_negatives: float = 16.0
    sample_pool: int = 2048
    neg_weight: float = 1.0
    impression_weight: float = 0.1
    residual_dropout: float = 0.0
    prior_weight: float = 1.0
    history_stride: int = 8
    scalar_lr_mult: float = 10.0
    user_transform: bool = True
    time_decay_days: float | None = 365.0
    short_history: int = 10
    short_half_life: float = 2.0
    seed: int = 0
    use_negatives: bool = True
    objective: str = "softmax"
    user_weight_power: float = 0.5
    item_item: bool = True
    content_prior: bool = True
    prior_k: float = 0.1
    item_item_recency: float = 0.0
    user_knn: int = 50
    user_knn_recency: float = 0.0
    user_knn_max_users: int = 20_000
    start_z: float = 1.64
    dynamics_epochs: int = 2
    first_phase: tuple = ("theta", "theta_seg", "b0")
    dynamics_lr: float = 0.01
    dynamic: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in known})
        out.first_phase = tuple(out.first_phase)  # JSON gives a list
        return out


@dataclass
class TrainingData:
    """Everything :meth:`FusionModel.fit` needs, as aligned numpy arrays.

    Attributes
    ----------
    V : float32 [n_items, d]
        Semantic vectors (normalised by the model if they are not).
    A : float32 [n_items, fa]
        Item attribute features.
    UA : float32 [n_users, fu]
        User attribute features.
    user, item : int64 [n]
        Row indices into ``UA`` and ``V``/``A``.
    ts : int64 [n]
        Event time, epoch seconds.
    label : int8 [n]
        1 positive, -1 explicit negative, 0 shown-but-ignored impression.
    UK : int64 [n_users, n_segment_columns], optional
        Segment keys of each user (:meth:`FeatureSpec.segments`; -1: none).
    """

    V: np.ndarray
    A: np.ndarray
    UA: np.ndarray
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    label: np.ndarray
    UK: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.V = np.ascontiguousarray(self.V, dtype=np.float32)
        self.A = np.ascontiguousarray(self.A, dtype=np.float32).reshape(self.V.shape[0], -1)
        self.UA = np.ascontiguousarray(self.UA, dtype=np.float32)
        if self.UA.ndim == 1:
            self.UA = self.UA.reshape(-1, 0) if self.UA.size == 0 else self.UA[:, None]
        self.user = np.asarray(self.user, dtype=np.int64)
        self.item = np.asarray(self.item, dtype=np.int64)
        self.ts = np.asarray(self.ts, dtype=np.int64)
        self.label = np.asarray(self.label, dtype=np.int8)
        if self.UK is None:
            self.UK = np.zeros((self.UA.shape[0], 0), np.int64)
        self.UK = np.asarray(self.UK, dtype=np.int64).reshape(self.UA.shape[0], -1)
        n = self.user.shape[0]
        if not (self.item.shape[0] == self.ts.shape[0] == self.label.shape[0] == n):
            raise ValueError("user, item, ts and label must have the same length")
        if n and (self.item.min() < 0 or self.item.max() >= self.V.shape[0]):
            raise ValueError("item index out of range of V")
        if n and (self.user.min() < 0 or self.user.max() >= self.UA.shape[0]):
            raise ValueError("user index out of range of UA")
