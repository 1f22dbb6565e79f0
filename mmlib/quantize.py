"""Quantized embeddings (int8 with calibration ranges, binary) and their retrieval accuracy.

Codes are those of sentence-transformers' ``quantize_embeddings``, computed in torch:

- int8: per coordinate, ``[lo, hi]`` (from calibration embeddings) is cut into 256 buckets;
  code = floor((x - lo) / step) - 128 with step = (hi - lo) / 255. Values outside the
  calibration range fall into the end buckets (that is what the ranges mean).
- binary: the sign bits (x > 0), packed 8 per byte (numpy's ``packbits`` order) minus 128.

Scores: int8 codes by their exact integer dot product; binary codes by ``d - 2 * hamming``
(the dot product of the ±1 vectors). ``bytes_per_vector``: 4d, d and ceil(d / 8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from mmlib.evaluation import evaluate_image_caption, image_index

if TYPE_CHECKING:
    from mmlib.encoder import MultimodalEncoder

PRECISIONS = ("float32", "int8", "binary")
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_embeddings(name: str, x: Any) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise ValueError(f"{name} must be a non-empty float (N, D) matrix, got dtype {x.dtype} "
                         f"and shape {tuple(x.shape)}")
    return x.float()


def bytes_per_vector(dim: int, precision: str) -> int:
    """Storage of one `dim`-wide vector at `precision`."""
    _check_precision(precision)
    return {"float32": 4 * dim, "int8": dim, "binary": math.ceil(dim / 8)}[precision]


def quantization_ranges(calibration: Tensor) -> Tensor:
    """(2, D) per-coordinate minimum and maximum of calibration embeddings (N >= 2 rows)."""
    calibration = _check_embeddings("calibration", calibration)
    if calibration.shape[0] < 2:
        raise ValueError("int8 ranges need at least 2 calibration embeddings, got 1; pass more "
                         "(e.g. a sample of the corpus) or explicit ranges")
    return torch.stack([calibration.min(0).values, calibration.max(0).values])


def quantize(embeddings: Tensor, precision: str, ranges: Tensor | None = None) -> Tensor:
    """float32 (as is), int8 (N, D) or binary (N, ceil(D / 8)) int8 codes of `embeddings`.

    int8 needs `ranges` (`quantization_ranges` of calibration embeddings); without them the
    embeddings calibrate themselves, as sentence-transformers does.
    """
    _check_precision(precision)
    x = _check_embeddings("embeddings", embeddings)
    if precision == "float32":
        return x
    if precision == "binary":
        bits = (x > 0).to(torch.int32)
        bits = F.pad(bits, (0, (-bits.shape[1]) % 8)).view(x.shape[0], -1, 8)
        return ((bits * _BIT_WEIGHTS).sum(-1) - 128).to(torch.int8)
    ranges = quantization_ranges(x) if ranges is None else torch.as_tensor(ranges).float()
    if ranges.shape != (2, x.shape[1]):
        raise ValueError(f"ranges must be (2, {x.shape[1]}) (min and max per coordinate), got "
                         f"{tuple(ranges.shape)}")
    lo = ranges[0]
    steps = (ranges[1] - lo) / 255
    steps = torch.where(steps == 0, torch.ones_like(steps), steps)
    return (torch.floor((x - lo) / steps).clamp(0, 255) - 128).to(torch.int8)


def unpack_binary(codes: Tensor, dim: int) -> Tensor:
    """(N, dim) ±1 float vectors of binary codes (the first `dim` bits)."""
    bits = (codes.to(torch.int32) + 128).unsqueeze(-1).bitwise_and(_BIT_WEIGHTS).ne(0)
    bits = bits.reshape(codes.shape[0], -1)
    if bits.shape[1] < dim:
        raise ValueError(f"codes hold {bits.shape[1]} bits, fewer than dim={dim}")
    return bits[:, :dim].float() * 2 - 1


def similarity(query: Tensor, target: Tensor, precision: str, dim: int | None = None) -> Tensor:
    """(Nq, Nt) scores of quantized codes: float32 dot, exact int8 dot, binary d - 2*hamming.

    `dim` (the vectors' width) is needed for binary codes whose width is not a multiple of 8.
    """
    _check_precision(precision)
    if precision == "float32":
        return query.float() @ target.float().T
    if precision == "int8":
        # float64 holds every int8 dot product exactly (|sum| <= D * 128^2 << 2^53).
        return query.double() @ target.double().T
    dim = dim if dim is not None else 8 * query.shape[1]
    return unpack_binary(query, dim).double() @ unpack_binary(target, dim).double().T


def _cosine_equivalent(text: Tensor, image: Tensor, precision: str, dim: int) -> tuple[Tensor, Tensor]:
    """Float vectors whose cosine is a fixed positive multiple of `similarity` of the codes,
    for every text-image pair, so the cosine-based metrics rank exactly as the scorer does."""
    if precision == "float32":
        return text, image
    if precision == "binary":
        return unpack_binary(text, dim), unpack_binary(image, dim)  # all of norm sqrt(dim)
    # int8: pad every vector to one common norm R with its own extra coordinate (texts and
    # images use separate ones, so no cross term): cosine = (code_t . code_i) / R^2.
    t, i = text.double(), image.double()
    nt, ni = (t * t).sum(1), (i * i).sum(1)
    r2 = torch.maximum(nt.max(), ni.max())
    zt, zi = torch.zeros_like(nt), torch.zeros_like(ni)
    return (torch.cat([t, (r2 - nt).sqrt()[:, None], zt[:, None]], 1),
            torch.cat([i, zi[:, None], (r2 - ni).sqrt()[:, None]], 1))


def evaluate_quantized(
    encoder: MultimodalEncoder,
    dataset: Any,
    dims: Sequence[int | None] | None = None,
    precisions: Sequence[str] = PRECISIONS,
    calibration: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    ci: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    show_progress: bool | None = None,
) -> pd.DataFrame:
    """Image–caption retrieval per dim × precision (the `mmlib.evaluation` protocol).

    Embeds once at full width (captions as queries, images as documents, with their prompts
    when configured); per dim the prefix is re-normalised and quantized, texts and images
    alike, and scored with `similarity`. int8 ranges come from `calibration` (full-width float
    embeddings, e.g. of the training split, truncated and re-normalised per dim like the data);
    None calibrates on the evaluated embeddings themselves. Index (dim, precision); columns
    ``bytes`` per vector plus those of `evaluate_image_caption` (``_lo``/``_hi`` with `ci`).
    """
    for p in precisions:
        _check_precision(p)
    texts, image_ids = list(dataset.texts), list(dataset.image_ids)
    caption_image, first_rows = image_index(image_ids)
    prompts = getattr(encoder.config, "prompts", None) or {}
    role = {r: {"prompt_name": r} if r in prompts else {} for r in ("query", "document")}
    text_emb = encoder.encode_texts(texts, batch_size=batch_size, show_progress=show_progress,
                                    **role["query"])
    image_emb = encoder.encode_images([dataset.image_for(r) for r in first_rows],
                                      batch_size=batch_size, show_progress=show_progress,
                                      **role["document"])
    full = text_emb.shape[1]
    cal = torch.cat([text_emb, image_emb]) if calibration is None else \
        _check_embeddings("calibration", calibration)
    if cal.shape[1] != full:
        raise ValueError(f"calibration has width {cal.shape[1]}, the encoder's embeddings {full}: "
                         "pass full-width embeddings of the same encoder")
    dims = list(dims) if dims is not None else list(encoder.config.resolved_mrl_dims())
    rows = []
    for d in dims:
        d = full if d is None else d
        t, i = F.normalize(text_emb[:, :d], dim=-1), F.normalize(image_emb[:, :d], dim=-1)
        ranges = quantization_ranges(F.normalize(cal[:, :d], dim=-1)) if "int8" in precisions else None
        for p in precisions:
            qt, qi = quantize(t, p, ranges), quantize(i, p, ranges)
            et, ei = _cosine_equivalent(qt, qi, p, d)
            df = evaluate_image_caption(et, ei, caption_image, dims=[None], ks=ks, ci=ci,
                                        n_boot=n_boot, seed=seed)
            row = df.iloc[0].drop("bytes_fp32").to_dict()
            rows.append({"dim": d, "precision": p, "bytes": bytes_per_vector(d, p), **row})
    return pd.DataFrame(rows).set_index(["dim", "precision"])
