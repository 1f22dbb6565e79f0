r"""Matryoshka in-batch-negative (InfoNCE) loss: every Matryoshka dim for the cost of one.

The loss (its formula, inputs and semantics) is defined in ``losses/naive.py``.
This is the fast equivalent of :func:`~mmlib.losses.naive_matryoshka_loss` (``losses/naive.py``:
the same definition written as one matmul and two cross-entropies per dim): same arguments, same
values and gradients (``tests/test_losses.py`` checks them equal). Read that one to learn the
loss; use this one to train.

Papers: Kusupati et al. 2022, "Matryoshka Representation Learning",
https://arxiv.org/abs/2205.13147 ; van den Oord et al. 2018 (InfoNCE),
https://arxiv.org/abs/1807.03748 .

How it stays cheap. The embedding is cut into bands ``[0, d1), [d1, d2), ...``. Each band's partial
product ``Q_band @ T_band^T`` and squared norms are computed once; running sums give every dim's
un-normalised similarity, normalised by row/column scaling vectors (never a divided matrix). One
``torch.autograd.Function`` computes each dim's softmax gradient itself (row direction, and the
column direction when symmetric, on the same exp buffer, plus the gradient through the norms),
batched over all dims as one (K, B, N) stack so the elementwise work is a fixed number of
operations, accumulates them from the largest dim down in one buffer (so band ``j`` receives the
sum over all dims that contain it), and does exactly two matmuls per band in backward. Forward +
backward cost about one full-width loss (see ``benchmarks/bench_losses.py``), not one per dim as
a per-dim loop does.

Example::

    >>> import torch
    >>> from mmlib.losses import matryoshka_in_batch_negative_loss
    >>> q = torch.randn(8, 64, requires_grad=True)
    >>> t = torch.randn(8, 64, requires_grad=True)
    >>> loss, per_dim = matryoshka_in_batch_negative_loss(
    ...     q, t, dims=(16, 32, None), return_details=True)
    >>> sorted(per_dim)
    [16, 32, 64]
    >>> loss.backward()
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .temperature import resolve_temperature

__all__ = [
    "DEFAULT_DIMS",
    "default_dims",
    "matryoshka_in_batch_negative_loss",
    "resolve_dims",
    "resolve_dims_and_weights",
]

# The default ladder. It adapts to the width: passed as dims (the default of every loss and of
# EncoderConfig.mrl_dims), it means "the entries of (256, 512, 1024, 2048) that are <= E, plus E"
# (E = 1024 -> 256, 512, 1024; E < 256 -> E only). Any other dims tuple is taken literally.
DEFAULT_DIMS: tuple[int | None, ...] = (256, 512, 1024, 2048, None)

_NORM_EPS = 1e-12  # same clamp as torch.nn.functional.normalize
# Cosines are in [-1, 1], so logits are in [-1/tau, 1/tau]: while 1/tau <= 70 (tau >= 0.0143) a
# plain exp(S) neither overflows (a sum of N values <= N e^70 is finite for N < 1e8) nor
# underflows (>= e^-70, a normal float32), and one exp serves both the row and the column
# softmax. Colder temperatures take the max-subtracted path (one exp per direction).
_ONE_EXP_MAX_SCALE = 70.0


# --------------------------------------------------------------------------------------------
# argument validation (shared with hard_negatives.py and multilevel.py)
# --------------------------------------------------------------------------------------------
def _as_dim(value: object, width: int) -> int:
    if value is None:
        return width
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(
            f"dims entries must be positive ints or None (= full width {width}), got "
            f"{value!r} of type {type(value).__name__}."
        )
    dim = int(value.__index__())
    if dim <= 0:
        raise ValueError(f"dims entries must be positive, got {dim}; use e.g. dims=(256, None).")
    if dim > width:
        raise ValueError(
            f"dims entry {dim} is larger than the embedding width E={width}; drop it or use "
            "None for the full width."
        )
    return dim


def _given_dims(dims: object) -> list[object]:
    if dims is None:
        raise TypeError(
            "dims must be a sequence of ints and/or None; for the full width only pass dims=(None,)."
        )
    if isinstance(dims, bool):
        raise TypeError(f"dims must be a sequence of ints and/or None, got {dims!r}.")
    if hasattr(dims, "__index__"):
        return [dims]
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
        raise TypeError(
            f"dims must be a sequence of ints and/or None, got {type(dims).__name__}; "
            "e.g. dims=(256, 512, None)."
        )
    given = list(dims)
    if not given:
        raise ValueError("dims is empty; pass at least one dim, e.g. dims=(None,).")
    return given


def default_dims(width: int) -> tuple[int, ...]:
    """The default ladder at width ``E``: the entries of (256, 512, 1024, 2048) <= E, plus E."""
    return tuple(sorted({d for d in DEFAULT_DIMS if d is not None and d <= width} | {width}))


def _given_or_default(dims: object, width: int) -> list[object]:
    if isinstance(dims, (tuple, list)) and tuple(dims) == DEFAULT_DIMS:
        return list(default_dims(width))
    return _given_dims(dims)


def resolve_dims(dims: int | Sequence[int | None], width: int) -> tuple[int, ...]:
    """Validate ``dims`` against width ``E``: ``None`` -> E, de-duplicated, sorted ascending.

    ``DEFAULT_DIMS`` adapts to the width (:func:`default_dims`); other dims are taken literally.
    """
    return tuple(sorted({_as_dim(d, width) for d in _given_or_default(dims, width)}))


def _as_weight(value: object, where: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"weights {where} must be a real number, got {type(value).__name__}.")
    weight = float(value)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weights {where} must be finite and >= 0, got {weight}.")
    return weight


def resolve_dims_and_weights(
    dims: int | Sequence[int | None],
    weights: Sequence[float] | Mapping[int | None, float] | None,
    width: int,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Resolve ``dims`` (see :func:`resolve_dims`) and align ``weights`` with them.

    ``weights``: ``None`` (1 each), a sequence as long as the *given* ``dims`` (so it may name
    ``None`` or a duplicate; merged entries must agree), or a dict ``{dim: weight}`` covering every
    dim (``None`` and ``E`` name the same dim). Weights must be finite and >= 0.
    """
    given = _given_or_default(dims, width)
    resolved = tuple(sorted({_as_dim(d, width) for d in given}))
    if weights is None:
        return resolved, (1.0,) * len(resolved)

    if isinstance(weights, Mapping):
        pairs = []
        for key, value in weights.items():
            dim = _as_dim(key, width)
            if dim not in resolved:
                raise ValueError(
                    f"weights has an entry for dim {key!r} (= {dim}) which is not in dims "
                    f"{resolved}; remove it or add it to dims."
                )
            pairs.append((dim, _as_weight(value, f"[{key!r}]")))
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
            raise TypeError(
                "weights must be None, a sequence as long as dims, or a dict {dim: weight}; "
                f"got {type(weights).__name__}."
            )
        weights = list(weights)
        if len(weights) != len(given):
            raise ValueError(
                f"weights has {len(weights)} entries but dims has {len(given)} ({given}); give "
                "one weight per entry of dims, or a dict {dim: weight}."
            )
        pairs = [
            (_as_dim(d, width), _as_weight(w, f"[{i}]"))
            for i, (d, w) in enumerate(zip(given, weights, strict=True))
        ]

    by_dim: dict[int, float] = {}
    for dim, weight in pairs:
        if dim in by_dim and by_dim[dim] != weight:
            raise ValueError(
                f"dim {dim} is given twice (e.g. as {dim} and None with E={width}) with different "
                f"weights {by_dim[dim]} and {weight}; give it once or with equal weights."
            )
        by_dim[dim] = weight
    missing = [d for d in resolved if d not in by_dim]
    if missing:
        raise ValueError(f"weights has no entry for dims {missing}; add them to the weights dict.")
    return resolved, tuple(by_dim[d] for d in resolved)


def check_embeddings(
    query: object,
    target: object,
    *,
    names: tuple[str, str] = ("query", "target"),
    same_rows: bool = False,
) -> None:
    """Raise a clear TypeError/ValueError unless ``query`` (B, E) / ``target`` (N, E), N >= B >= 1."""
    qn, tn = names
    for name, x in ((qn, query), (tn, target)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (embeddings), got {x.dtype}; "
                f"cast it with {name}.float()."
            )
        if x.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D (rows, embedding width), got shape {tuple(x.shape)}; "
                "flatten extra dims or select one level."
            )
    if query.shape[1] != target.shape[1]:
        raise ValueError(
            f"{qn} and {tn} must have the same embedding width, got {query.shape[1]} and "
            f"{target.shape[1]}; project them to the same size."
        )
    if query.shape[1] == 0:
        raise ValueError(f"{qn} and {tn} have embedding width 0.")
    if query.shape[0] == 0:
        raise ValueError(f"{qn} is an empty batch (B = 0); the loss needs at least one pair.")
    if same_rows and target.shape[0] != query.shape[0]:
        raise ValueError(
            f"{tn} must have one row per {qn} row, got {target.shape[0]} and {query.shape[0]}."
        )
    if target.shape[0] < query.shape[0]:
        raise ValueError(
            f"{tn} has {target.shape[0]} rows but {qn} has {query.shape[0]}: {tn} row i must be "
            f"the positive of {qn} row i (N >= B); pass the positives first, then extra negatives."
        )
    if query.device != target.device:
        raise ValueError(
            f"{qn} is on {query.device} but {tn} is on {target.device}; move them to one device."
        )


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Context manager that disables autocast for ``device_type`` (a no-op where unsupported)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def raise_if_nonfinite(
    name: str, per_key: dict, loss: Tensor, temperature: float, what: str = "dim"
) -> None:
    """Raise FloatingPointError naming the first key (a dim, by default) whose loss is NaN/inf."""
    values = torch.stack([loss.detach(), *(v.detach() for v in per_key.values())])
    if bool(torch.isfinite(values).all()):
        return
    for key, value in per_key.items():
        if not bool(torch.isfinite(value)):
            raise FloatingPointError(
                f"{name}: the loss at {what} {key} is {float(value)} (temperature={temperature:g}). "
                "Check the embeddings for NaN/inf, or raise the temperature; pass "
                "check_finite=False to get the value instead of this error."
            )
    raise FloatingPointError(
        f"{name}: the weighted total loss is {float(loss)} although every per-dim loss is "
        "finite (weights too large?); pass check_finite=False to skip this check."
    )


# --------------------------------------------------------------------------------------------
# the fused autograd function
# --------------------------------------------------------------------------------------------
def _prefix_norms(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """(K, rows): the L2 norm of ``x[:, :d]`` for each ``d`` in ``dims`` (ascending)."""
    rows, top = x.shape[0], dims[-1]
    chunk = math.gcd(*dims)
    if chunk >= 16:
        # one reduction over chunk-wide pieces, then running sums over the few pieces
        pieces = torch.linalg.vector_norm(x[:, :top].reshape(rows, top // chunk, chunk), dim=2)
        cum = pieces.square_().cumsum_(1)
        return cum[:, [d // chunk - 1 for d in dims]].T.sqrt_()
    bands = zip((0, *dims[:-1]), dims, strict=True)
    band_norms = torch.stack([torch.linalg.vector_norm(x[:, lo:hi], dim=1) for lo, hi in bands])
    return band_norms.square_().cumsum_(0).sqrt_()


class _MatryoshkaInfoNCE(torch.autograd.Function):
    """All Matryoshka dims of the in-batch InfoNCE loss in one pass; see the module docstring.

    Inputs are float32. The per-dim softmax / normalisation work runs batched over a (K, B, N)
    stack of similarity matrices (K = number of dims), so the number of elementwise operations
    does not grow with K (only the band matmuls do, and their total size equals one full-width
    matmul). The gradient w.r.t. each dim's un-normalised similarity, for a unit upstream
    gradient, is formed in forward (it needs the softmax, which is at hand there, so nothing is
    recomputed) and turned into input gradients in backward with two matmuls per band.
    Memory: at most 3 K B x N float32 in forward (logits, exp, gradient), K B x N kept for
    backward and only when a gradient is needed (a per-dim autograd loop keeps about 2 K plus
    normalised copies of the input prefixes for every dim).

    Dims are indexed largest first (m = 0 is the largest dim), so that a running sum over m is
    the sum over every dim that contains band m.
    """

    @staticmethod
    def forward(ctx, query, target, tau_tensor, tau, dims, weights, symmetric):
        B, N = query.shape[0], target.shape[0]
        K = len(dims)
        need_grad = any(ctx.needs_input_grad[:3])
        alpha, beta = (0.5, 0.5) if symmetric else (1.0, 0.0)
        inv_tau = tau_tensor.reciprocal() if tau_tensor is not None else 1.0 / tau
        highs = dims[::-1]
        lows = (*highs[1:], 0)  # band m = columns [lows[m], highs[m])

        q_norm = _prefix_norms(query, dims).flip(0).clamp_min_(_NORM_EPS)  # (K, B)
        t_norm = _prefix_norms(target, dims).flip(0).clamp_min_(_NORM_EPS)  # (K, N)
        row_scale = q_norm.reciprocal().mul_(inv_tau)[:, :, None]  # 1 / (|q_i[:d]| tau)
        col_scale = t_norm.reciprocal()[:, None, :]  # 1 / |t_j[:d]|

        # logits[m] = q[:, :d_m] @ t[:, :d_m]^T (running sum of band products), then scaled
        logits = torch.empty(K, B, N, dtype=torch.float32, device=query.device)
        for m in reversed(range(K)):
            q_band, t_band = query[:, lows[m] : highs[m]], target[:, lows[m] : highs[m]]
            if m == K - 1:
                torch.mm(q_band, t_band.T, out=logits[m])
            else:
                torch.addmm(logits[m + 1], q_band, t_band.T, out=logits[m])
        logits.mul_(row_scale).mul_(col_scale)
        pos = logits.diagonal(dim1=1, dim2=2).clone()  # (K, B) positive logits

        if 1.0 / tau <= _ONE_EXP_MAX_SCALE:
            # one exp serves both directions: softmax_row = E / row_sum, softmax_col = E / col_sum
            expd = col_exp = torch.exp(logits)
            row_sum = expd.sum(2)
            row_lse = row_sum.log()
            if symmetric:
                col_sum = expd[:, :, :B].sum(1)
                col_lse = col_sum.log()
        else:
            row_max = logits.amax(2)
            col_exp = None
            expd = torch.sub(logits, row_max[:, :, None]).exp_()
            row_sum = expd.sum(2)
            row_lse = row_sum.log() + row_max
            if symmetric:
                col_max = logits[:, :, :B].amax(1)
                col_exp = torch.sub(logits[:, :, :B], col_max[:, None, :]).exp_()
                col_sum = col_exp.sum(1)
                col_lse = col_sum.log() + col_max
        per_dim = alpha * (row_lse - pos).mean(1)
        if symmetric:
            per_dim = per_dim + beta * (col_lse - pos).mean(1)
        w = torch.tensor(weights[::-1], dtype=torch.float32, device=query.device)
        total = (per_dim * w).sum()
        per_dim = per_dim.flip(0)  # ascending dims, as returned
        ctx.mark_non_differentiable(per_dim)
        if not need_grad:
            return total, per_dim

        # dS = w/B * (alpha * softmax_row + beta * softmax_col - I)
        scale = w / B
        row_coef = (alpha * scale[:, None] / row_sum)[:, :, None]
        if symmetric:
            col_coef = (beta * scale[:, None] / col_sum)[:, None, :]
            dlogits = torch.mul(expd, row_coef) if col_exp is expd else expd.mul_(row_coef)
            dlogits[:, :, :B].addcmul_(col_exp[:, :, :B], col_coef)
        else:
            dlogits = expd.mul_(row_coef)
        del expd, col_exp
        dlogits.diagonal(dim1=1, dim2=2).sub_(scale[:, None])
        # rho_i = sum_j dS_ij S_ij, gamma_j = sum_i dS_ij S_ij: the gradient through the norms
        prod = logits.mul_(dlogits)
        rho, gamma = prod.sum(2), prod.sum(1)
        del prod, logits
        # dL/dR = dS * a_i * c_j, R the un-normalised similarity
        dsim = dlogits.mul_(row_scale).mul_(col_scale)
        # through |q_i[:d]|: dL/dq_i[:d] += -rho_i / |q_i[:d]|^2 q_i[:d] (0 where clamped)
        q_coef = (rho / q_norm.square()).mul_(q_norm > _NORM_EPS).neg_()
        t_coef = (gamma / t_norm.square()).mul_(t_norm > _NORM_EPS).neg_()
        # save_for_backward (not ctx attributes) so that autograd frees the buffers right after
        # backward instead of keeping them as long as the loss tensor lives
        ctx.save_for_backward(query, target, q_coef, t_coef, rho.sum(), dsim)
        ctx.dims = dims
        ctx.tau = tau
        return total, per_dim

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_per_dim):
        query, target, q_coef, t_coef, rho_sum, dsim = ctx.saved_tensors
        need_q, need_t, need_tau = ctx.needs_input_grad[:3]
        dims = ctx.dims
        K, top = len(dims), dims[-1]
        highs = dims[::-1]
        lows = (*highs[1:], 0)
        grad_q = grad_t = grad_tau = None
        if need_q:
            grad_q = torch.zeros_like(query) if top < query.shape[1] else torch.empty_like(query)
        if need_t:
            grad_t = torch.zeros_like(target) if top < target.shape[1] else torch.empty_like(target)

        # G_m = sum over the dims that contain band m = dsim[0] + ... + dsim[m], in one running
        # buffer (the saved dsim stays intact, so backward may run again with retain_graph)
        acc = dsim[0]
        for m in range(K):
            if m == 1:
                acc = torch.add(acc, dsim[1])
            elif m > 1:
                acc.add_(dsim[m])
            lo, hi = lows[m], highs[m]
            if need_q:
                torch.mm(acc, target[:, lo:hi], out=grad_q[:, lo:hi])
            if need_t:
                torch.mm(acc.T, query[:, lo:hi], out=grad_t[:, lo:hi])
        del acc

        # upstream gradient (skipped when it is exactly 1 on CPU, where checking is free), then the
        # norm terms: band m gets the coefficients summed over the dims containing it
        unit = grad_total.device.type == "cpu" and float(grad_total) == 1.0
        for grad, x, coef in ((grad_q, query, q_coef), (grad_t, target, t_coef)):
            if grad is None:
                continue
            if not unit:
                grad.mul_(grad_total)
            coef = coef.cumsum(0).mul_(grad_total)
            per_col = torch.cat(
                [coef[m, :, None].expand(-1, highs[m] - lows[m]) for m in reversed(range(K))], 1
            )
            grad[:, :top].addcmul_(x[:, :top], per_col)
        if need_tau:
            # S = R a c with a = 1 / (|q| tau): dL/dtau = -sum_k sum_ij dS_ij S_ij / tau
            grad_tau = rho_sum.mul(-grad_total / ctx.tau)
        return grad_q, grad_t, grad_tau, None, None, None, None


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def matryoshka_in_batch_negative_loss(
    query: Tensor,
    target: Tensor,
    dims: int | Sequence[int | None] = DEFAULT_DIMS,
    weights: Sequence[float] | Mapping[int | None, float] | None = None,
    temperature: float | Tensor | nn.Module = 0.07,
    symmetric: bool = True,
    return_details: bool = False,
    check_finite: bool = True,
) -> Tensor | tuple[Tensor, dict[int, Tensor]]:
    """Matryoshka in-batch-negative InfoNCE loss ``sum_d w_d L_d`` (float32); see module docstring.

    The fast equivalent of :func:`~mmlib.losses.naive_matryoshka_loss` (equal values and gradients).

    Args:
        query: (B, E) embeddings (any float dtype; computed in float32, autocast disabled).
        target: (N, E), N >= B; row i is the positive of query i, rows B.. are shared negatives.
        dims: prefix sizes; ``None`` = E. Validated, de-duplicated, sorted.
        weights: None (1 each), one per given dim, or ``{dim: weight}``; finite, >= 0.
        temperature: float, 0-dim tensor (gets a gradient) or a module returning one, e.g.
            :class:`~mmlib.losses.LearnableTemperature`.
        symmetric: also add the target->query direction over the first B target rows (averaged).
        return_details: also return ``{dim: L_d}`` (0-dim, detached).
        check_finite: raise ``FloatingPointError`` naming the dim when a loss is NaN/inf.
    """
    check_embeddings(query, target)
    dims_r, weights_r = resolve_dims_and_weights(dims, weights, query.shape[1])
    tau, tau_tensor = resolve_temperature(temperature, query.device)
    with no_autocast(query.device.type):
        loss, per_dim = _MatryoshkaInfoNCE.apply(
            query.float(), target.float(), tau_tensor, tau, dims_r, weights_r, bool(symmetric)
        )
    details = {d: per_dim[i] for i, d in enumerate(dims_r)}
    if check_finite:
        raise_if_nonfinite("matryoshka_in_batch_negative_loss", details, loss, tau)
    return (loss, details) if return_details else loss
