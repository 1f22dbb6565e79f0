r"""Multi-level (2D-Matryoshka) contrastive loss: the Matryoshka loss at several encoder depths.

The encoder pools embeddings from several backbone layers ``l`` (through the shared projection);
each level gets the Matryoshka in-batch InfoNCE loss over the same dims and dim weights:

.. math::

    \mathcal{L} = \sum_{l} \lambda_l \sum_{d} w_d\, L_d\big(Q^{(l)}, T^{(l)}\big)

with ``L_d`` as in :func:`~mmlib.losses.matryoshka_in_batch_negative_loss` and level weights
``lambda_l`` (1 each by default). Training shallower layers too lets one truncate both width and
depth at inference.

Paper: Li et al. 2024, "2D Matryoshka Sentence Embeddings", https://arxiv.org/abs/2402.14776 ;
Kusupati et al. 2022, https://arxiv.org/abs/2205.13147 .

Example::

    >>> import torch
    >>> from mmlib.losses import MultiLevelContrastiveLoss
    >>> loss_fn = MultiLevelContrastiveLoss(dims=(16, None), level_weights={6: 0.5, 12: 1.0})
    >>> levels = {6: (torch.randn(4, 32), torch.randn(4, 32)),
    ...           12: (torch.randn(4, 32), torch.randn(4, 32))}
    >>> loss, details = loss_fn(levels, return_details=True)
    >>> sorted(details)
    [(6, 16), (6, 32), (12, 16), (12, 32)]

Levels may also be given as two sequences (or two stacked (L, B, E) tensors), one entry per
level: ``loss_fn(queries, targets)``; levels are then keyed 0, 1, ...

Each level's target rows ``B..N-1`` are hard negatives shared by the batch; identities
(``positive_ids``, ``hard_negative_ids``) apply to every level, with the masks of
:class:`~mmlib.losses.ContrastiveLossWithHardNegatives` (no positive is counted as a negative).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .hard_negatives import ContrastiveLossWithHardNegatives
from .matryoshka import DEFAULT_DIMS, raise_if_nonfinite
from .temperature import resolve_temperature

__all__ = ["MultiLevelContrastiveLoss"]

Levels = Mapping[Hashable, tuple[Tensor, Tensor]]


def _as_list(x: object, name: str) -> list:
    if isinstance(x, Tensor):
        if x.dim() != 3:
            raise ValueError(
                f"{name} as a tensor must be stacked levels of shape (L, B, E), got "
                f"{tuple(x.shape)}; pass a list with one (B, E) tensor per level."
            )
        return list(x.unbind(0))
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(
            f"{name} must be a sequence of (B, E) tensors (one per level), got {type(x).__name__}."
        )
    return list(x)


class MultiLevelContrastiveLoss(nn.Module):
    """Sum over levels of ``level_weight * matryoshka_in_batch_negative_loss`` (module docstring).

    Args:
        dims, weights, temperature, symmetric: shared by every level, as in
            :func:`~mmlib.losses.matryoshka_in_batch_negative_loss` (a temperature module is
            registered as a submodule and evaluated once per call).
        level_weights: None (1 each), a dict ``{level: weight}`` naming every level, or a
            sequence with one weight per level (in order).
        check_finite: raise ``FloatingPointError`` naming (level, dim) when a loss is NaN/inf.
    """

    def __init__(
        self,
        dims: int | Sequence[int | None] = DEFAULT_DIMS,
        weights: Sequence[float] | Mapping[int | None, float] | None = None,
        level_weights: Mapping[Hashable, float] | Sequence[float] | None = None,
        temperature: float | Tensor | nn.Module = 0.07,
        symmetric: bool = True,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(temperature, nn.Module):
            resolve_temperature(temperature, torch.device("cpu"))  # validate early
        self.dims = dims
        self.weights = weights
        self.level_weights = level_weights
        self.temperature = temperature
        self.symmetric = bool(symmetric)
        self.check_finite = check_finite

    def extra_repr(self) -> str:
        return f"dims={self.dims}, level_weights={self.level_weights}, symmetric={self.symmetric}"

    def _levels(self, queries, targets) -> list[tuple[Hashable, Tensor, Tensor]]:
        if isinstance(queries, Mapping):
            if targets is not None:
                raise TypeError(
                    "pass either a dict {level: (query, target)} or two sequences "
                    "(queries, targets), not a dict and targets."
                )
            levels = []
            for key, pair in queries.items():
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(
                        f"level {key!r} must map to a (query, target) pair, got "
                        f"{type(pair).__name__}."
                    )
                levels.append((key, pair[0], pair[1]))
        else:
            if targets is None:
                raise TypeError(
                    "targets is missing: pass two sequences (queries, targets) or a dict "
                    "{level: (query, target)}."
                )
            qs, ts = _as_list(queries, "queries"), _as_list(targets, "targets")
            if len(qs) != len(ts):
                raise ValueError(
                    f"queries has {len(qs)} levels but targets has {len(ts)}; give one target "
                    "tensor per query level."
                )
            levels = [(i, q, t) for i, (q, t) in enumerate(zip(qs, ts, strict=True))]
        if not levels:
            raise ValueError("no levels given; pass at least one (query, target) pair.")
        return levels

    def _level_weights(self, keys: list[Hashable]) -> list[float]:
        lw = self.level_weights
        if lw is None:
            return [1.0] * len(keys)
        if isinstance(lw, Mapping):
            unknown = [k for k in lw if k not in keys]
            missing = [k for k in keys if k not in lw]
            if unknown or missing:
                raise ValueError(
                    f"level_weights keys {sorted(lw, key=repr)} do not match the levels "
                    f"{keys} (missing {missing}, unknown {unknown}); name every level once."
                )
            values = [lw[k] for k in keys]
        else:
            values = list(lw)
            if len(values) != len(keys):
                raise ValueError(
                    f"level_weights has {len(values)} entries for {len(keys)} levels; give one "
                    "per level or a dict {level: weight}."
                )
        out = []
        for key, v in zip(keys, values, strict=True):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"level_weights[{key!r}] must be a real number, got {v!r}.")
            if not math.isfinite(float(v)) or v < 0:
                raise ValueError(f"level_weights[{key!r}] must be finite and >= 0, got {v}.")
            out.append(float(v))
        return out

    def forward(
        self,
        queries: Levels | Sequence[Tensor] | Tensor,
        targets: Sequence[Tensor] | Tensor | None = None,
        return_details: bool = False,
        *,
        positive_ids: Tensor | None = None,
        hard_negative_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[tuple[Hashable, int], Tensor]]:
        """Weighted sum over levels; details are ``{(level, dim): L}`` (0-dim, detached).

        ``positive_ids`` (B,) / ``hard_negative_ids`` (N - B,): int64 identities shared by
        every level (see :class:`~mmlib.losses.ContrastiveLossWithHardNegatives`).
        """
        levels = self._levels(queries, targets)
        level_weights = self._level_weights([key for key, _, _ in levels])
        temperature = self.temperature
        if isinstance(temperature, nn.Module):
            temperature = temperature()
        level_loss = ContrastiveLossWithHardNegatives(
            self.dims, self.weights, temperature, self.symmetric, check_finite=False
        )
        total = None
        details = {}
        for (key, q, t), lw in zip(levels, level_weights, strict=True):
            try:
                B = q.shape[0] if isinstance(q, Tensor) and q.dim() == 2 else 0
                hard = t[B:] if isinstance(t, Tensor) and t.dim() == 2 and t.shape[0] > B else None
                loss, per_dim = level_loss(
                    q,
                    t[:B] if hard is not None else t,
                    hard,
                    return_details=True,
                    positive_ids=positive_ids,
                    hard_negative_ids=hard_negative_ids,
                )
            except (TypeError, ValueError) as err:
                raise type(err)(f"level {key!r}: {err}") from err
            total = lw * loss if total is None else total + lw * loss
            details.update({(key, d): v for d, v in per_dim.items()})
        if self.check_finite:
            tau = float(temperature.detach()) if isinstance(temperature, Tensor) else temperature
            raise_if_nonfinite(type(self).__name__, details, total, float(tau), "(level, dim)")
        return (total, details) if return_details else total
