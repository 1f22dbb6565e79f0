"""Retrieval evaluation of an encoder on an image–caption dataset, per Matryoshka dim."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from mmlib.data import ImageTextDataset
from mmlib.encoder import MultimodalEncoder
from mmlib.metrics import evaluate_matryoshka


def embed_dataset(encoder: MultimodalEncoder, dataset: ImageTextDataset,
                  batch_size: int | None = None,
                  show_progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption embeddings, image embeddings) of a dataset, full width, row i ↔ row i."""
    texts = encoder.encode_texts(dataset.texts, batch_size=batch_size, show_progress=show_progress)
    images = encoder.encode_images(dataset.image_paths, batch_size=batch_size,
                                   show_progress=show_progress)
    return texts, images


def evaluate_dataset(encoder: MultimodalEncoder, dataset: ImageTextDataset,
                     dims: Sequence[int | None] | None = None, ks: Sequence[int] = (1, 5, 10),
                     batch_size: int | None = None,
                     show_progress: bool | None = None) -> pd.DataFrame:
    """Text→image (`q2t_*`) and image→text (`t2q_*`) retrieval metrics, one row per dim.

    Captions are the queries; the positive of caption i is image i. The embeddings are
    computed once at full width and truncated per dim.
    """
    texts, images = embed_dataset(encoder, dataset, batch_size, show_progress)
    dims = list(dims) if dims is not None else list(encoder.config.resolved_mrl_dims())
    df = evaluate_matryoshka(texts, images, dims=dims, ks=tuple(ks))
    df["chance_top1"] = 1.0 / len(dataset)
    return df
