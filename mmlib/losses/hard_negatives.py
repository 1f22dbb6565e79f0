r"""Matryoshka InfoNCE with hard negatives, identity masks, in-batch mining and a false-negative guard.

For query ``i`` and each dim ``d`` (prefixes re-normalised, cosines ``c``), the candidates are
the B in-batch positives ``p_j`` plus the hard negatives ``h_m`` it may see:

.. math::

    \ell^{\to}_i = -\log \frac{e^{c(q_i, p_i)/\tau}}
        {\sum_{j \in \mathcal{J}_i} e^{c(q_i, p_j)/\tau} + \sum_{m \in \mathcal{M}_i}
         e^{c(q_i, h_m)/\tau}}

    L_d = \tfrac12\big(\mathrm{mean}_i\,\ell^{\to}_i + \mathrm{mean}_j\,\ell^{\leftarrow}_j\big)
    \ (\text{symmetric}),\qquad \mathcal{L} = \sum_d w_d L_d

where the reverse term ``l<-_j`` scores target ``p_j`` against the B queries only (hard negatives
enter the query->target direction only).

Which hard negatives a query sees:

- **shared** (a 2-D ``(M, E)`` tensor, the default of training): every query sees every hard
  negative of the batch, as sentence-transformers' ``MultipleNegativesRankingLoss`` does;
- **per query** (a 3-D ``(B, K, E)`` tensor, or 2-D with ``hard_negative_owner``): query ``i``
  sees only its own.

``J_i`` / ``M_i`` are what is left after these masks (the positive ``p_i`` never is masked):

- **identities** (``positive_ids``, ``hard_negative_ids``: int64, equal id = the same item, e.g.
  the same image): a hard negative that is the same item as *any* positive of the batch is
  dropped for every query (it is that row's positive, and a duplicate column for the others);
  a repeated hard negative counts once; an in-batch target sharing query ``i``'s positive id is
  not a negative of ``i`` (both directions). So no positive is ever counted as a negative.
- **false-negative guard** (``margin``, off by default): a negative whose guide cosine exceeds
  the positive's guide cosine minus ``margin`` is dropped. The guide is a separate model when
  its embeddings are passed (``guide_query`` ... : GISTEmbed, the guide cosines are full-width
  and decide for every dim), else the model itself at each dim (**self-guided**: masks decided
  by the embeddings being trained). In the reverse direction the same rule uses that target's
  positive.
- **in-batch mining** (``mine_hardest = k > 0``): each query keeps only its k highest-scoring
  in-batch negatives that survived (each target likewise in the reverse direction); hard
  negatives are not mined.

Masks are decided without gradient. Without masks (only shared hard negatives that are no
positive, no guard, no mining) the loss is computed by the fused
:func:`~mmlib.losses.matryoshka_in_batch_negative_loss` on ``[positives; hard negatives]``.

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
    >>> shared = torch.randn(5, 32)             # 5 hard negatives shared by the batch
    >>> loss = loss_fn(q, p, shared, positive_ids=torch.arange(4),
    ...                hard_negative_ids=torch.tensor([7, 8, 2, 9, 9]))  # 2: row 2's positive

With ``hard_negatives=None``, ``mine_hardest=0`` and ``margin=None`` it equals
:func:`~mmlib.losses.matryoshka_in_batch_negative_loss`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmlib.validation import is_int

from .matryoshka import (
    DEFAULT_DIMS,
    check_embeddings,
    matryoshka_in_batch_negative_loss,
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
    B, E = query.shape
    per_query = hard.dim() == 3 and hard.shape[0] == B and hard.shape[2] == E
    shared = hard.dim() == 2 and hard.shape[1] == E
    if not (per_query or shared):
        raise ValueError(
            f"hard_negatives must have shape (B, K, E) = ({B}, K, {E}) (K per query) or (M, {E}) "
            f"(shared by the batch), got {tuple(hard.shape)}."
        )
    if hard.device != query.device:
        raise ValueError(
            f"hard_negatives is on {hard.device} but query is on {query.device}; move them."
        )


def _check_ids(ids: object, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """``ids`` as an int64 tensor of ``shape`` on ``device`` (clear errors otherwise)."""
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int64 ids), got {ids!r:.80}.")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(ids.shape)}.")
    return ids.to(device=device, dtype=torch.long)


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


def identity_masks(
    positive_ids: Tensor | None,
    hard_negative_ids: Tensor | None,
    hard_negative_owner: Tensor | None,
    batch: int,
    n_hard: int,
) -> tuple[Tensor, Tensor]:
    """(B, B) and (B, M) masks (True = not a negative of that query) from ids and owners.

    In-batch: target j != i with query i's positive id. Hard negative m: not owned by i (when
    owners are given), the same item as any positive of the batch, or a repeat of an earlier
    hard negative that i also sees.
    """
    device = (positive_ids if positive_ids is not None else hard_negative_ids)
    device = device.device if device is not None else torch.device("cpu")
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    in_batch = torch.zeros_like(eye)
    hard = torch.zeros(batch, n_hard, dtype=torch.bool, device=device)
    if positive_ids is not None:
        in_batch = (positive_ids[:, None] == positive_ids[None, :]) & ~eye
    if hard_negative_owner is not None:
        hard |= hard_negative_owner[None, :] != torch.arange(batch, device=device)[:, None]
    if hard_negative_ids is not None and n_hard:
        same = hard_negative_ids[:, None] == hard_negative_ids[None, :]
        if hard_negative_owner is not None:
            same &= hard_negative_owner[:, None] == hard_negative_owner[None, :]
        repeat = same.tril(-1).any(1)
        if positive_ids is not None:
            repeat |= (hard_negative_ids[:, None] == positive_ids[None, :]).any(1)
        hard |= repeat[None, :]
    return in_batch, hard


def _normalized(x: Tensor | None) -> Tensor | None:
    return None if x is None else F.normalize(x.detach().float(), dim=-1)


class ContrastiveLossWithHardNegatives(nn.Module):
    """Matryoshka InfoNCE over in-batch positives plus hard negatives (module docstring).

    Args:
        dims, weights: as in :func:`~mmlib.losses.matryoshka_in_batch_negative_loss`.
        temperature: float, 0-dim tensor, or a module returning one (e.g.
            :class:`~mmlib.losses.LearnableTemperature`, registered as a submodule).
        symmetric: add the target->query direction over the in-batch block (averaged).
        mine_hardest: 0 (off) or k > 0: keep only each query's k hardest in-batch negatives.
        margin: None (off) or the false-negative guard margin in cosine units (the guide is the
            model itself unless guide embeddings are passed to ``forward``).
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
        if not is_int(mine_hardest):
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
        *,
        positive_ids: Tensor | None = None,
        hard_negative_ids: Tensor | None = None,
        hard_negative_owner: Tensor | None = None,
        guide_query: Tensor | None = None,
        guide_positive: Tensor | None = None,
        guide_hard_negatives: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
        """Loss for ``query`` (B, E), ``positive`` (B, E) and ``hard_negatives``: (B, K, E) per
        query, (M, E) shared (per query with ``hard_negative_owner`` (M,)), or None.

        ``positive_ids`` (B,) / ``hard_negative_ids`` ((B, K) or (M,)): int64 identities (see
        the module docstring). ``guide_*``: a guide model's embeddings of the same rows (any
        width), used by the guard instead of the model's own cosines (needs ``margin``).
        """
        check_embeddings(query, positive, names=("query", "positive"), same_rows=True)
        B, device = query.shape[0], query.device
        hard, hard_ids, owner = self._flat_hard(
            query, hard_negatives, hard_negative_ids, hard_negative_owner
        )
        if positive_ids is not None:
            positive_ids = _check_ids(positive_ids, "positive_ids", (B,), device)
        M = 0 if hard is None else hard.shape[0]
        guide = self._guide(query, guide_query, guide_positive, guide_hard_negatives, hard)
        dims, weights = resolve_dims_and_weights(self.dims, self.weights, query.shape[1])
        tau, tau_tensor = resolve_temperature(self.temperature, device)
        temperature = tau_tensor if tau_tensor is not None else tau

        with torch.no_grad():
            in_batch_drop, hard_drop = identity_masks(positive_ids, hard_ids, owner, B, M)
        if self.margin is None and not self.mine_hardest and not bool(in_batch_drop.any()) and (
            owner is None
        ):
            # Shared hard negatives, no guard, no mining: a dropped column is dropped for every
            # query, so the fused loss on the kept columns is exactly this loss.
            target = positive
            if hard is not None:
                target = torch.cat([positive, hard[~hard_drop[0]]])
            total, details = matryoshka_in_batch_negative_loss(
                query, target, dims, weights, temperature, self.symmetric,
                return_details=True, check_finite=False,
            )
        else:
            total, details = self._masked(
                query, positive, hard, in_batch_drop, hard_drop, guide, dims, weights, temperature
            )
        if self.check_finite:
            raise_if_nonfinite(type(self).__name__, details, total, tau)
        return (total, details) if return_details else total

    def _flat_hard(self, query, hard, ids, owner):
        """Hard negatives as (M, E) with (M,) ids and owners (None = shared)."""
        if hard is None:
            if ids is not None or owner is not None:
                raise ValueError(
                    "hard_negative_ids / hard_negative_owner were given without hard_negatives."
                )
            return None, None, None
        _check_hard_negatives(hard, query)
        B, device = query.shape[0], query.device
        if hard.dim() == 3:
            if owner is not None:
                raise ValueError(
                    "hard_negative_owner is only for 2-D (M, E) hard_negatives; a (B, K, E) "
                    "tensor already gives each query its own K."
                )
            K = hard.shape[1]
            if ids is not None:
                ids = _check_ids(ids, "hard_negative_ids", (B, K), device).reshape(-1)
            owner = torch.arange(B, device=device).repeat_interleave(K)
            return hard.reshape(B * K, -1), ids, owner
        M = hard.shape[0]
        if ids is not None:
            ids = _check_ids(ids, "hard_negative_ids", (M,), device)
        if owner is not None:
            owner = _check_ids(owner, "hard_negative_owner", (M,), device)
            if M and (int(owner.min()) < 0 or int(owner.max()) >= B):
                raise ValueError(
                    f"hard_negative_owner must index the {B} queries (0..{B - 1}), got values "
                    f"{int(owner.min())}..{int(owner.max())}."
                )
        return hard, ids, owner

    def _guide(self, query, g_query, g_positive, g_hard, hard):
        """Normalised guide embeddings (q, p, h) or None; checked against the inputs."""
        given = [g is not None for g in (g_query, g_positive, g_hard)]
        if not any(given):
            return None
        if self.margin is None:
            raise ValueError(
                "guide embeddings were passed but margin is None: the guide only decides which "
                "negatives the false-negative guard drops; set margin (e.g. 0.0)."
            )
        if g_query is None or g_positive is None or (g_hard is None) != (hard is None):
            raise ValueError(
                "pass guide_query and guide_positive (and guide_hard_negatives exactly when "
                "there are hard negatives) together."
            )
        B = query.shape[0]
        for name, g, rows in (("guide_query", g_query, B), ("guide_positive", g_positive, B),
                              ("guide_hard_negatives", g_hard, None if hard is None else
                               hard.shape[0])):
            if g is None:
                continue
            if g.dim() == 3:  # (B, K, E') per query, flattened like the hard negatives
                g = g.reshape(-1, g.shape[-1])
            if g.dim() != 2 or g.shape[0] != rows:
                raise ValueError(f"{name} must have one row per input row ({rows}), got shape "
                                 f"{tuple(g.shape)}.")
        g_hard = None if g_hard is None else g_hard.reshape(-1, g_hard.shape[-1])
        q, p, h = (_normalized(x) for x in (g_query, g_positive, g_hard))
        return q @ p.T, None if h is None else q @ h.T

    def _masked(self, query, positive, hard, in_batch_drop, hard_drop, guide, dims, weights,
                temperature):
        """The loss with per-query masks, one dim after another."""
        with no_autocast(query.device.type):
            q, p = query.float(), positive.float()
            h = hard.float() if hard is not None else None
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
                    band_h = q[:, lo:d] @ h[:, lo:d].T  # (B, M)
                    prod_h = band_h if prod_h is None else prod_h + band_h
                lo = d
                inv_q = _inv_norm(q[:, :d])
                cos = prod * inv_q[:, None] * _inv_norm(p[:, :d])[None, :]
                cos_h = None if h is None else prod_h * inv_q[:, None] * _inv_norm(h[:, :d])[None]
                loss_d = self._loss_from_cosines(
                    cos, cos_h, in_batch_drop, hard_drop, guide, temperature
                )
                details[d] = loss_d.detach()
                total = total + w * loss_d
        return total, details

    def _loss_from_cosines(self, cos, cos_h, in_batch_drop, hard_drop, guide, temperature):
        """Masked InfoNCE at one dim from in-batch cosines (B, B) and hard cosines (B, M)."""
        B = cos.shape[0]
        labels = torch.arange(B, device=cos.device)

        with torch.no_grad():
            eye = torch.eye(B, dtype=torch.bool, device=cos.device)
            row_mask, col_mask = in_batch_drop.clone(), in_batch_drop.clone()
            hard_mask = hard_drop
            if self.margin is not None:
                g_cos, g_cos_h = guide if guide is not None else (cos, cos_h)
                pos = g_cos.diagonal()
                row_mask |= (g_cos > pos[:, None] - self.margin) & ~eye
                col_mask |= (g_cos > pos[None, :] - self.margin) & ~eye
                if g_cos_h is not None:
                    hard_mask = hard_mask | (g_cos_h > pos[:, None] - self.margin)
            if self.mine_hardest:
                row_mask = _keep_hardest(cos, row_mask, self.mine_hardest, dim=1)
                col_mask = _keep_hardest(cos, col_mask, self.mine_hardest, dim=0)

        # Scale, then mask: -inf / tau would send NaN to a learnable temperature.
        scaled = cos / temperature
        logits = scaled.masked_fill(row_mask, -math.inf)
        if cos_h is not None:
            hard_logits = (cos_h / temperature).masked_fill(hard_mask, -math.inf)
            logits = torch.cat([logits, hard_logits], dim=1)
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            reverse = scaled.masked_fill(col_mask, -math.inf).T
            loss = (loss + F.cross_entropy(reverse, labels)) / 2
        return loss
