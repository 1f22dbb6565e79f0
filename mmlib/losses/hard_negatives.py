r"""Matryoshka InfoNCE with explicit hard negatives, optional in-batch mining and a false-negative guard.

For query ``i`` and each dim ``d`` (prefixes re-normalised, cosines ``c``), the candidates are
all B in-batch positives ``p_j`` plus the query's own K hard negatives ``h_{i,k}``:

.. math::

    \ell^{\to}_i = -\log \frac{e^{c(q_i, p_i)/\tau}}
        {\sum_{j \in \mathcal{J}_i} e^{c(q_i, p_j)/\tau} + \sum_{k \in \mathcal{K}_i}
         e^{c(q_i, h_{i,k})/\tau}}

    L_d = \tfrac12\big(\mathrm{mean}_i\,\ell^{\to}_i + \mathrm{mean}_j\,\ell^{\leftarrow}_j\big)
    \ (\text{symmetric}),\qquad \mathcal{L} = \sum_d w_d L_d

where the reverse term ``l<-_j`` scores target ``p_j`` against the B queries only (hard negatives
enter the query->target direction only). ``J_i`` / ``K_i`` are the candidates left after:

- **false-negative guard** (``margin``, off by default; GISTEmbed-style): a negative whose cosine
  exceeds the positive's cosine minus ``margin`` is set to -inf (the positive never is). In the
  reverse direction the same rule uses that target's positive.
- **in-batch mining** (``mine_hardest = k > 0``): each query keeps only its k highest-scoring
  in-batch negatives that survived the guard (each target likewise in the reverse direction);
  the positive and all explicit hard negatives are always kept.

Masks are decided per dim, from that dim's cosines, without gradient.

Papers: Karpukhin et al. 2020 (DPR, in-batch + hard negatives), https://arxiv.org/abs/2004.04906 ;
Solatorio 2024 (GISTEmbed, guided false-negative filtering), https://arxiv.org/abs/2402.16829 ;
Kusupati et al. 2022 (Matryoshka), https://arxiv.org/abs/2205.13147 .

Example::

    >>> import torch
    >>> from mmlib.losses import ContrastiveLossWithHardNegatives
    >>> loss_fn = ContrastiveLossWithHardNegatives(dims=(16, None), margin=0.05)
    >>> q, p = torch.randn(4, 32), torch.randn(4, 32)
    >>> hard = torch.randn(4, 3, 32)            # 3 hard negatives per query
    >>> loss = loss_fn(q, p, hard)

With ``hard_negatives=None``, ``mine_hardest=0`` and ``margin=None`` it equals
:func:`~mmlib.losses.matryoshka_in_batch_negative_loss` (which is faster for that case).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .matryoshka import (
    DEFAULT_DIMS,
    check_embeddings,
    no_autocast,
    raise_if_nonfinite,
    resolve_dims_and_weights,
)
from .temperature import resolve_temperature

__all__ = ["ContrastiveLossWithHardNegatives"]

_NORM_EPS = 1e-12


def _check_hard_negatives(hard: object, query: Tensor) -> None:
    if not isinstance(hard, Tensor):
        raise TypeError(
            f"hard_negatives must be a torch.Tensor or None, got {type(hard).__name__}."
        )
    if not hard.is_floating_point():
        raise TypeError(f"hard_negatives must be floating point, got {hard.dtype}.")
    if hard.dim() != 3 or hard.shape[0] != query.shape[0] or hard.shape[2] != query.shape[1]:
        raise ValueError(
            f"hard_negatives must have shape (B, K, E) = ({query.shape[0]}, K, {query.shape[1]}), "
            f"got {tuple(hard.shape)}; for one negative per query use hard.unsqueeze(1)."
        )
    if hard.device != query.device:
        raise ValueError(
            f"hard_negatives is on {hard.device} but query is on {query.device}; move them."
        )


def _inv_norm(x: Tensor) -> Tensor:
    """1 / max(|x|, eps) over the last dim (the scaling of ``F.normalize``)."""
    return torch.linalg.vector_norm(x, dim=-1).clamp_min(_NORM_EPS).reciprocal()


def _keep_hardest(cos: Tensor, masked: Tensor, k: int, dim: int) -> Tensor:
    """Mask (True = drop) every in-batch negative outside the k best survivors along ``dim``."""
    n = cos.shape[dim]
    if k >= n - 1:
        return masked
    scores = cos.masked_fill(masked, -math.inf)
    scores.diagonal().fill_(-math.inf)
    top = scores.topk(k, dim=dim).indices
    keep = torch.zeros_like(masked).scatter_(dim, top, True)
    keep.diagonal().fill_(True)
    return masked | ~keep


class ContrastiveLossWithHardNegatives(nn.Module):
    """Matryoshka InfoNCE over in-batch positives plus per-query hard negatives (module docstring).

    Args:
        dims, weights: as in :func:`~mmlib.losses.matryoshka_in_batch_negative_loss`.
        temperature: float, 0-dim tensor, or a module returning one (e.g.
            :class:`~mmlib.losses.LearnableTemperature`, registered as a submodule).
        symmetric: add the target->query direction over the in-batch block (averaged).
        mine_hardest: 0 (off) or k > 0: keep only each query's k hardest in-batch negatives.
        margin: None (off) or the false-negative guard margin in cosine units.
        check_finite: raise ``FloatingPointError`` naming the dim when a loss is NaN/inf.
    """

    def __init__(
        self,
        dims: int | Sequence[int | None] = DEFAULT_DIMS,
        weights: Sequence[float] | Mapping[int | None, float] | None = None,
        temperature: float | Tensor | nn.Module = 0.07,
        symmetric: bool = True,
        mine_hardest: int = 0,
        margin: float | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(mine_hardest, bool) or not isinstance(mine_hardest, numbers.Integral):
            raise TypeError(f"mine_hardest must be an int >= 0, got {mine_hardest!r}.")
        if mine_hardest < 0:
            raise ValueError(f"mine_hardest must be >= 0 (0 = off), got {mine_hardest}.")
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
                raise TypeError(f"margin must be a real number or None, got {margin!r}.")
            if not math.isfinite(float(margin)):
                raise ValueError(f"margin must be finite or None (off), got {margin}.")
            margin = float(margin)
        if not isinstance(temperature, nn.Module):
            resolve_temperature(temperature, torch.device("cpu"))  # validate early
        self.dims = dims
        self.weights = weights
        self.temperature = temperature
        self.symmetric = bool(symmetric)
        self.mine_hardest = int(mine_hardest)
        self.margin = margin
        self.check_finite = check_finite

    def extra_repr(self) -> str:
        return (
            f"dims={self.dims}, symmetric={self.symmetric}, mine_hardest={self.mine_hardest}, "
            f"margin={self.margin}"
        )

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        hard_negatives: Tensor | None = None,
        return_details: bool = False,
    ) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Loss for ``query`` (B, E), ``positive`` (B, E), ``hard_negatives`` (B, K, E) or None."""
        check_embeddings(query, positive, names=("query", "positive"), same_rows=True)
        if hard_negatives is not None:
            _check_hard_negatives(hard_negatives, query)
            if hard_negatives.shape[1] == 0:
                hard_negatives = None
        dims, weights = resolve_dims_and_weights(self.dims, self.weights, query.shape[1])
        tau, tau_tensor = resolve_temperature(self.temperature, query.device)
        temperature = tau_tensor if tau_tensor is not None else tau

        with no_autocast(query.device.type):
            q = query.float()
            p = positive.float()
            h = hard_negatives.float() if hard_negatives is not None else None
            details = {}
            total = q.new_zeros(())
            # Band partial products summed into running prefix scores (autograd then hands each
            # band the sum of the gradients of all dims containing it: two matmuls per band).
            prod = prod_h = None
            lo = 0
            for d, w in zip(dims, weights, strict=True):
                band = q[:, lo:d] @ p[:, lo:d].T
                prod = band if prod is None else prod + band
                if h is not None:
                    band_h = torch.bmm(h[:, :, lo:d], q[:, lo:d, None]).squeeze(2)  # (B, K)
                    prod_h = band_h if prod_h is None else prod_h + band_h
                lo = d
                inv_q = _inv_norm(q[:, :d])
                cos = prod * inv_q[:, None] * _inv_norm(p[:, :d])[None, :]
                cos_h = None if h is None else prod_h * inv_q[:, None] * _inv_norm(h[..., :d])
                loss_d = self._loss_from_cosines(cos, cos_h, temperature)
                details[d] = loss_d.detach()
                total = total + w * loss_d
        if self.check_finite:
            raise_if_nonfinite(type(self).__name__, details, total, tau)
        return (total, details) if return_details else total

    def _loss_from_cosines(self, cos: Tensor, cos_h: Tensor | None, temperature) -> Tensor:
        """Masked InfoNCE at one dim from in-batch cosines (B, B) and hard cosines (B, K)."""
        B = cos.shape[0]
        labels = torch.arange(B, device=cos.device)

        with torch.no_grad():
            pos = cos.diagonal()
            eye = torch.eye(B, dtype=torch.bool, device=cos.device)
            if self.margin is not None:
                row_mask = (cos > pos[:, None] - self.margin) & ~eye
                col_mask = (cos > pos[None, :] - self.margin) & ~eye
                hard_mask = None if cos_h is None else cos_h > pos[:, None] - self.margin
            else:
                row_mask = col_mask = torch.zeros_like(eye)
                hard_mask = None
            if self.mine_hardest:
                row_mask = _keep_hardest(cos, row_mask, self.mine_hardest, dim=1)
                col_mask = _keep_hardest(cos, col_mask, self.mine_hardest, dim=0)

        logits = cos.masked_fill(row_mask, -math.inf)
        if cos_h is not None:
            hard_logits = cos_h if hard_mask is None else cos_h.masked_fill(hard_mask, -math.inf)
            logits = torch.cat([logits, hard_logits], dim=1)
        loss = F.cross_entropy(logits / temperature, labels)
        if self.symmetric:
            reverse = cos.masked_fill(col_mask, -math.inf).T / temperature
            loss = (loss + F.cross_entropy(reverse, labels)) / 2
        return loss
