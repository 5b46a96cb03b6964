"""Model: the fusion + user model and everything that fits or judges it (no I/O).

Owns hyper-parameters, attribute features, behaviour dynamics, histories, the
item-item term, the trainer, evaluation metrics and encoder fine-tuning.
May import: the top-level helpers and ``encoders`` (fine-tuning only).
"""
