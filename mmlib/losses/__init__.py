"""Contrastive losses for Matryoshka embeddings (one loss per module)."""

from .hard_negatives import ContrastiveLossWithHardNegatives
from .matryoshka import (
    DEFAULT_DIMS,
    default_dims,
    matryoshka_in_batch_negative_loss,
    resolve_dims,
    resolve_dims_and_weights,
)
from .multilevel import MultiLevelContrastiveLoss
from .naive import naive_matryoshka_loss
from .temperature import LearnableTemperature

__all__ = [
    "DEFAULT_DIMS",
    "ContrastiveLossWithHardNegatives",
    "LearnableTemperature",
    "MultiLevelContrastiveLoss",
    "default_dims",
    "matryoshka_in_batch_negative_loss",
    "naive_matryoshka_loss",
    "resolve_dims",
    "resolve_dims_and_weights",
]
