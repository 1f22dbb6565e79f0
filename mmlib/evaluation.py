"""Image–caption retrieval evaluation (the Flickr30k / COCO protocol), per Matryoshka dim.

Protocol: every unique image is embedded once (first-appearance order of
``dataset.image_ids``) and every caption once. Per dim (prefix re-normalised):

- text→image (``q2t_*``): each caption is a query with exactly one relevant image, its own.
- image→text (``t2q_*``): each unique image is a query; all of its captions are relevant, and
  ``t2q_top{k}`` counts a hit when ANY of them is in the top k (the standard image→text R@k).

Metrics: ``top{k}`` (R@k), ``mrr`` (1 / rank of the first relevant item) and ``ndcg@10``
(binary gains; ideal DCG over min(10, #relevant)). Ties follow :mod:`mmlib.metrics`
(``ties="pessimistic"`` by default: a relevant item tied with irrelevant ones ranks after all
of them, so duplicate embeddings never inflate a score).

Confidence intervals (``ci=0.95``): percentile bootstrap over queries, per direction. Each
direction's queries (captions for q2t, images for t2q) are resampled with replacement
``n_boot`` times; a metric's interval is the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles
of its resample means, in columns ``{col}_lo`` / ``{col}_hi``. The same resamples serve every
metric and dim (paired), drawn from ``seed`` (q2t) and ``seed + 1`` (t2q). The five captions
of one image are not independent queries, so the q2t interval is somewhat too narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mmlib.metrics import (
    _check_ks,
    _check_ties,
    _resolve_dims,
    bootstrap_ci,
    bootstrap_indices,
    per_query_metrics,
)
from mmlib.validation import is_int

if TYPE_CHECKING:
    from mmlib.encoder import MultimodalEncoder

NDCG_K = 10


def embed_dataset(encoder: MultimodalEncoder, dataset: Any, batch_size: int | None = None,
                  show_progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption embeddings, image embeddings) of a dataset, full width, row i ↔ row i."""
    texts = encoder.encode_texts(dataset.texts, batch_size=batch_size, show_progress=show_progress)
    images = encoder.encode_images([dataset.image_for(i) for i in range(len(dataset))],
                                   batch_size=batch_size, show_progress=show_progress)
    return texts, images


def image_index(image_ids: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """``(caption_image, first_rows)``: each row's unique-image index (first-appearance order)
    and the first row of each unique image."""
    index: dict[Hashable, int] = {}
    caption_image, first_rows = [], []
    for row, image_id in enumerate(image_ids):
        if image_id not in index:
            index[image_id] = len(first_rows)
            first_rows.append(row)
        caption_image.append(index[image_id])
    return caption_image, first_rows


def _check_protocol(ci: float | None, n_boot: int, ties: str) -> None:
    _check_ties(ties)
    if ci is not None and (isinstance(ci, bool) or not isinstance(ci, float | int)
                           or not 0 < ci < 1):
        raise ValueError(f"ci must be None (no intervals) or a level in (0, 1) such as 0.95, "
                         f"got {ci!r}")
    if not is_int(n_boot) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int (e.g. 1000), got {n_boot!r}")


def _check_caption_image(caption_image: Sequence[int] | Tensor, n_captions: int,
                         n_images: int) -> Tensor:
    ci_ = torch.as_tensor(caption_image)
    if ci_.dim() != 1 or ci_.shape[0] != n_captions or ci_.is_floating_point() \
            or ci_.dtype == torch.bool:
        raise ValueError(
            f"caption_image must hold one integer image index per caption ({n_captions}), got "
            f"dtype {ci_.dtype} and shape {tuple(ci_.shape)}"
        )
    ci_ = ci_.long().cpu()
    if ci_.numel() and (ci_.min() < 0 or ci_.max() >= n_images):
        raise ValueError(f"caption_image values must lie in [0, {n_images}) (rows of image_emb), "
                         f"got min {int(ci_.min())}, max {int(ci_.max())}")
    orphans = (torch.bincount(ci_, minlength=n_images) == 0).nonzero().flatten()
    if orphans.numel():
        raise ValueError(
            f"{orphans.numel()} images have no caption (e.g. image rows {orphans[:10].tolist()}): "
            "an image→text query needs at least one relevant caption; drop those images"
        )
    return ci_


def evaluate_image_caption(
    text_emb: Tensor,
    image_emb: Tensor,
    caption_image: Sequence[int] | Tensor,
    dims: Sequence[int | None] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ties: str = "pessimistic",
    chunk_size: int = 4096,
) -> pd.DataFrame:
    """Text→image (``q2t_*``) and image→text (``t2q_*``) metrics from precomputed embeddings.

    ``text_emb`` (n_captions, E), ``image_emb`` (n_images, E) with each image once, and
    ``caption_image[i]`` the row of caption i's image. One row per dim: ``{q2t,t2q}_top{k}``,
    ``_mrr``, ``_ndcg@10``, ``bytes_fp32``, ``chance_top1`` (1 / n_images), and with ``ci`` the
    ``{col}_lo`` / ``{col}_hi`` bootstrap bounds (see the module docstring). ``ties``:
    "pessimistic" (default), "optimistic" or "trec_eval" (tied targets by index descending:
    image rows for q2t, caption rows for t2q). ``df.attrs``: ``n_captions``, ``n_images``.
    """
    _check_protocol(ci, n_boot, ties)
    ks = _check_ks(ks)
    text_emb, image_emb = torch.as_tensor(text_emb), torch.as_tensor(image_emb)
    for name, x in (("text_emb", text_emb), ("image_emb", image_emb)):
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (N, E) tensor, got {tuple(x.shape)}")
    n_captions, n_images = text_emb.shape[0], image_emb.shape[0]
    labels = _check_caption_image(caption_image, n_captions, n_images)
    order = torch.argsort(labels, stable=True)
    bounds = torch.cumsum(torch.bincount(labels, minlength=n_images), 0).tolist()
    captions_of = [order[a:b].tolist() for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
    dims_ = _resolve_dims(dims, text_emb.shape[1])
    wanted = [f"top{k}" for k in ks] + ["mrr", f"ndcg@{NDCG_K}"]
    ks_all = sorted({*ks, NDCG_K})
    rows, per_query = [], {"q2t": [], "t2q": []}
    for d in dims_:
        row: dict[str, float] = {"dim": d}
        for name, q, t, rel in (("q2t", text_emb, image_emb, labels),
                                ("t2q", image_emb, text_emb, captions_of)):
            pq = per_query_metrics(q, t, ks=ks_all, relevant=rel, dim=d, chunk_size=chunk_size,
                                   ties=ties)[wanted]
            row.update({f"{name}_{m}": float(pq[m].mean()) for m in wanted})
            per_query[name].append(pq.to_numpy())
        row["bytes_fp32"] = 4 * d
        row["chance_top1"] = 1.0 / n_images
        rows.append(row)
    df = pd.DataFrame(rows).set_index("dim")
    if ci is not None:
        for j, name in enumerate(("q2t", "t2q")):
            values = np.concatenate(per_query[name], axis=1)  # (n_queries, dims x metrics)
            idx = bootstrap_indices(values.shape[0], n_boot, seed + j)
            lo, hi = bootstrap_ci(values, ci=ci, indices=idx)
            shape = (len(dims_), len(wanted))
            for bound, arr in (("lo", lo), ("hi", hi)):
                for i, m in enumerate(wanted):
                    df[f"{name}_{m}_{bound}"] = arr.reshape(shape)[:, i]
    df.attrs.update(n_captions=n_captions, n_images=n_images, ties=ties, ci=ci,
                    n_boot=n_boot if ci is not None else None, seed=seed)
    return df


def evaluate_dataset(encoder: MultimodalEncoder, dataset: Any, dims: Sequence[int | None] | None = None,
                     ks: Sequence[int] = (1, 5, 10), batch_size: int | None = None,
                     show_progress: bool | None = None, ci: float | None = None,
                     n_boot: int = 1000, seed: int = 0,
                     ties: str = "pessimistic") -> pd.DataFrame:
    """Image–caption retrieval metrics per dim (see the module docstring for the protocol).

    ``dataset`` provides ``texts``, ``image_ids`` (rows sharing an image share its id),
    ``image_for(i)`` and ``len``; unique images are embedded once, captions once, at full
    width. ``dims=None``: the encoder's ``mrl_dims``. Returns :func:`evaluate_image_caption`.
    """
    _check_protocol(ci, n_boot, ties)  # before the (slow) embedding
    text_emb, image_emb, caption_image = evaluation_embeddings(encoder, dataset, batch_size,
                                                               show_progress)
    dims = list(dims) if dims is not None else list(encoder.config.resolved_mrl_dims())
    return evaluate_image_caption(text_emb, image_emb, caption_image, dims=dims, ks=ks, ci=ci,
                                  n_boot=n_boot, seed=seed, ties=ties)


def evaluation_embeddings(encoder: MultimodalEncoder, dataset: Any, batch_size: int | None = None,
                          show_progress: bool | None = None,
                          encode: Callable[..., Tensor] | None = None,
                          ) -> tuple[Tensor, Tensor, list[int]]:
    """``(caption embeddings, unique-image embeddings, caption_image)`` as `evaluate_dataset`
    embeds them (full width, prompts by role); ``encode(texts=... | images=..., **kwargs)``
    replaces ``encoder.encode_texts`` / ``encode_images`` (e.g.
    ``functools.partial(mmlib.distributed.encode_sharded, encoder)`` under torchrun)."""
    texts, image_ids = list(dataset.texts), list(dataset.image_ids)
    if len(texts) != len(image_ids):
        raise ValueError(f"dataset gives {len(texts)} texts but {len(image_ids)} image_ids; "
                         "both must have one entry per row")
    caption_image, first_rows = image_index(image_ids)
    # Captions are the queries, images the documents: their prompts, when configured.
    prompts = getattr(getattr(encoder, "config", None), "prompts", None) or {}
    role = {r: {"prompt_name": r} if r in prompts else {} for r in ("query", "document")}

    def embed(kind: str, items: list[Any], **kwargs: Any) -> Tensor:
        if encode is None:  # encode_texts / encode_images: all a duck-typed encoder needs
            return getattr(encoder, f"encode_{kind}")(items, **kwargs)
        return encode(**{kind: items}, **kwargs)

    text_emb = embed("texts", texts, batch_size=batch_size, show_progress=show_progress,
                     **role["query"])
    image_emb = embed("images", [dataset.image_for(r) for r in first_rows], batch_size=batch_size,
                      show_progress=show_progress, **role["document"])
    return text_emb, image_emb, caption_image
