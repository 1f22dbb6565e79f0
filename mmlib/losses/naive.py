r"""The readable Matryoshka in-batch-negative loss: one prefix, one matmul, two cross-entropies per dim.

This is the definition, written the way one reads it; :func:`~mmlib.losses.matryoshka_in_batch_negative_loss`
is its fast equivalent (same arguments, same values and gradients, tested equal in
``tests/test_losses.py``), which shares the prefix products between dims instead of one matmul per dim.

For each dim ``d`` in ``dims`` (``None`` = the full width ``E``), with ``query`` (B, E) and
``target`` (N, E), N >= B, where target row ``i`` is the positive of query ``i`` and rows
``B..N-1`` are extra negatives shared by every query:

.. math::

    q = \frac{Q_{:, :d}}{\lVert Q_{:, :d} \rVert},\quad
    t = \frac{T_{:, :d}}{\lVert T_{:, :d} \rVert},\quad
    S^{(d)} = \frac{q t^\top}{\tau}

    L_d = \tfrac12\Big[\mathrm{CE}\big(S^{(d)}, \mathrm{arange}(B)\big)
          + \mathrm{CE}\big(S^{(d)}_{:, :B}{}^\top, \mathrm{arange}(B)\big)\Big]
    \quad(\text{symmetric; one-way: only the first term, without the } \tfrac12)

    \mathcal{L} = \sum_d w_d L_d

Papers: Kusupati et al. 2022, "Matryoshka Representation Learning",
https://arxiv.org/abs/2205.13147 ; van den Oord et al. 2018 (InfoNCE),
https://arxiv.org/abs/1807.03748 . sentence-transformers' ``MatryoshkaLoss(
MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"),
partition_mode="per_direction", scale=1/τ))`` computes the same symmetric loss.

Inputs: ``query`` (B, E) and ``target`` (N, E) float tensors (computed in float32);
``dims`` ints and/or ``None``; ``weights`` None, one per given dim, or ``{dim: weight}``;
``temperature`` a float, a one-element tensor or a module returning one (it gets a gradient).

Example::

    >>> import torch
    >>> from mmlib.losses import naive_matryoshka_loss
    >>> q, t = torch.randn(8, 64), torch.randn(8, 64)
    >>> loss, per_dim = naive_matryoshka_loss(q, t, dims=(16, 32, None), return_details=True)
    >>> sorted(per_dim)
    [16, 32, 64]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .matryoshka import DEFAULT_DIMS, check_embeddings, no_autocast, resolve_dims_and_weights
from .temperature import resolve_temperature

__all__ = ["naive_matryoshka_loss"]


def naive_matryoshka_loss(
    query: Tensor,
    target: Tensor,
    dims: int | Sequence[int | None] = DEFAULT_DIMS,
    weights: Sequence[float] | Mapping[int | None, float] | None = None,
    temperature: float | Tensor | nn.Module = 0.07,
    symmetric: bool = True,
    return_details: bool = False,
) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
    """``sum_d w_d L_d`` straight from the definition, one matmul per dim (see module docstring)."""
    check_embeddings(query, target)
    dims_r, weights_r = resolve_dims_and_weights(dims, weights, query.shape[1])
    tau, tau_tensor = resolve_temperature(temperature, query.device)
    tau = tau if tau_tensor is None else tau_tensor
    B = query.shape[0]
    labels = torch.arange(B, device=query.device)
    per_dim = {}
    with no_autocast(query.device.type):
        for d in dims_r:
            q = F.normalize(query[:, :d].float(), dim=1)
            t = F.normalize(target[:, :d].float(), dim=1)
            sim = q @ t.T / tau  # (B, N): row i's positive is column i, columns B.. are negatives
            loss = F.cross_entropy(sim, labels)
            if symmetric:  # target -> query over the B paired targets only
                loss = (loss + F.cross_entropy(sim[:, :B].T, labels)) / 2
            per_dim[d] = loss
    total = sum(w * per_dim[d] for d, w in zip(dims_r, weights_r, strict=True))
    return (total, {d: v.detach() for d, v in per_dim.items()}) if return_details else total
