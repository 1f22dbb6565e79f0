"""Retrieval metrics for Matryoshka embeddings, bootstrap intervals and cost tables.

(Gradient-flow diagnostics live in `mmlib.gradient_flow`; they are re-exported here.)

Every similarity is the cosine of the prefix ``[:dim]`` of each embedding, re-normalised after
truncation and computed in float32 (``dim=None`` means the full width).

Tie rule (the same for every ranking metric in this module): **pessimistic**. A relevant target
is ranked *behind* every irrelevant target whose score is greater than *or equal to* its own, so
the 0-based position of a query's single positive is the number of other targets scoring
``>=`` it. With several relevant targets, the m-th best relevant one (0-based, best first) sits
at ``m + #{irrelevant targets scoring >= it}``. Why pessimistic: a collapsed encoder that gives
every target the same score must score 0, not 100 %, and the result must not depend on the
arbitrary order that ``torch.topk``/``sort`` give to equal values.

Other conventions, for comparing with peers (``ties=`` on every ranking function):
``"optimistic"`` ranks a relevant target *ahead* of the irrelevant ones it ties with (an upper
bound); ``"trec_eval"`` orders tied targets by target index *descending*, as trec_eval (and
pytrec_eval, which wraps it) orders tied documents by docno descending (``strcmp`` in
``comp_sim_docno``, ``form_res_rels.c``): numbers agree when the run file names target j by j
zero-padded to one width (so string order is numeric order).

Large corpora: queries are processed ``chunk_size`` rows at a time, so the largest tensor ever
built is ``chunk_size x n_targets`` scores (plus one counting buffer of that size). Positions are
found by counting scores ``>=`` the relevant ones (one pass per relevant target that can still
land in the top ``max(ks)``), never by a full sort.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from mmlib.gradient_flow import gradient_flow, layer_name, summarize_gradient_flow  # re-exported
from mmlib.losses.matryoshka import resolve_dims
from mmlib.validation import is_int

__all__ = [
    "cosine_similarity_matrix",
    "topk_accuracy",
    "recall_at_k",
    "mrr",
    "ndcg_at_k",
    "retrieval_metrics",
    "evaluate_matryoshka",
    "gradient_flow",
    "summarize_gradient_flow",
    "layer_name",
    "retrieval_cost_table",
    "per_query_metrics",
    "bootstrap_indices",
    "bootstrap_ci",
    "TIES",
]

TIES = ("pessimistic", "optimistic", "trec_eval")

# --------------------------------------------------------------------------- input checks


def _check_embeddings(query: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    query, target = torch.as_tensor(query), torch.as_tensor(target)
    for name, x in (("query", query), ("target", target)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (N, E) tensor, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty (0 rows); pass at least one embedding")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf values; check the encoder output")
    if query.shape[1] != target.shape[1]:
        raise ValueError(
            f"query and target must have the same embedding size, got {query.shape[1]} "
            f"and {target.shape[1]}"
        )
    return query, target


def _check_dim(dim: int | None, full: int) -> int:
    if dim is None:
        return full
    if not is_int(dim) or not 1 <= dim <= full:
        raise ValueError(f"dim must be an int in [1, {full}] or None (full size), got {dim!r}")
    return int(dim)


def _check_ks(ks: int | Sequence[int], name: str = "ks") -> list[int]:
    """Sorted distinct plain ints from an integral or a sequence/array of integrals (not 5.0, True)."""
    given = ks
    if hasattr(ks, "tolist") and not isinstance(ks, (list, tuple)):
        ks = ks.tolist()  # numpy / torch scalars and arrays -> Python numbers, bools stay bools
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        ks = [ks]
    ks = list(ks)
    if not ks or any(not is_int(k) or k < 1 for k in ks):
        raise ValueError(f"{name} must be positive integers (e.g. (1, 5, 10); numpy ints are fine, "
                         f"floats and bools are not), got {given!r}")
    return sorted({int(k) for k in ks})


def _check_chunk(chunk_size: int) -> int:
    return _check_count("chunk_size", chunk_size)


def _check_ties(ties: str) -> str:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return ties


def _resolve_dims(dims: Sequence[int | None] | None, full: int) -> list[int]:
    """Validate, de-duplicate and sort dims; None means the full size."""
    if dims is None:
        # Powers of two from 8 below the full width, then the full width itself.
        dims = [2**i for i in range(3, full.bit_length()) if 2**i < full] + [full]
    return list(resolve_dims(dims, full))


def _prefix_normalize(x: Tensor, dim: int) -> Tensor:
    # Float32 whatever the input dtype: bf16 scores create spurious ties.
    return F.normalize(x[:, :dim].float(), dim=-1)


# --------------------------------------------------------------------------- relevance


def _build_relevance(
    relevant: Tensor | Sequence[Sequence[int]] | None, n_q: int, n_t: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Turn any relevance spec into CSR form (crow (n_q+1,), col (nnz,)), de-duplicated."""
    if relevant is None:
        if n_q > n_t:
            raise ValueError(
                f"relevant/labels=None means query i's positive is target i, which needs at "
                f"least as many targets as queries; got {n_q} queries and {n_t} targets. "
                "Pass labels (index of each query's positive target)."
            )
        rows = cols = torch.arange(n_q)
    elif isinstance(relevant, Tensor) and relevant.dtype == torch.bool:
        if tuple(relevant.shape) != (n_q, n_t):
            raise ValueError(
                f"a boolean relevance matrix must have shape (n_queries, n_targets) = "
                f"({n_q}, {n_t}), got {tuple(relevant.shape)}"
            )
        rows, cols = relevant.cpu().nonzero(as_tuple=True)
    elif isinstance(relevant, Tensor):
        if relevant.dim() != 1 or relevant.shape[0] != n_q or relevant.is_floating_point():
            raise ValueError(
                f"labels must be an integer tensor of shape (n_queries,) = ({n_q},) giving the "
                f"index of each query's positive target, got dtype {relevant.dtype} and shape "
                f"{tuple(relevant.shape)}"
            )
        rows, cols = torch.arange(n_q), relevant.cpu().long()
    else:
        lists = [[r] if isinstance(r, int) else list(r) for r in relevant]
        if len(lists) != n_q:
            raise ValueError(
                f"relevant must have one list of target indices per query ({n_q}), got {len(lists)}"
            )
        rows = torch.tensor([i for i, r in enumerate(lists) for _ in r], dtype=torch.long)
        cols = torch.tensor([int(j) for r in lists for j in r], dtype=torch.long)
    if cols.numel() and (cols.min() < 0 or cols.max() >= n_t):
        raise ValueError(
            f"relevant target indices must lie in [0, {n_t}); got min {int(cols.min())}, "
            f"max {int(cols.max())}"
        )
    key = torch.unique(rows * n_t + cols)  # sorted row-major, duplicates dropped
    rows, cols = key // n_t, key % n_t
    counts = torch.bincount(rows, minlength=n_q)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{empty.numel()} queries have no relevant target (e.g. query indices "
            f"{empty[:10].tolist()}); every ranking metric needs at least one relevant target "
            "per query: drop those queries or add their positives"
        )
    crow = torch.zeros(n_q + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(counts, 0)
    return crow.to(device), cols.to(device)


def _transpose_relevance(crow: Tensor, col: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Target->query relevance: (targets kept, crow, col) over targets with >= 1 query."""
    n_q = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_q, device=col.device), crow[1:] - crow[:-1])
    key = torch.unique(col * n_q + rows)
    t_idx, q_idx = key // n_q, key % n_q
    # Targets that are nobody's positive (extra negatives) have no relevant query and are
    # left out of the reverse direction, as in the loss's reverse term.
    kept, t_compact = torch.unique(t_idx, return_inverse=True)
    counts = torch.bincount(t_compact, minlength=kept.numel())
    crow_t = torch.zeros(kept.numel() + 1, dtype=torch.long, device=col.device)
    crow_t[1:] = torch.cumsum(counts, 0)
    return kept, crow_t, q_idx


# --------------------------------------------------------------------------- ranking core


def _relevant_positions(
    q: Tensor, t: Tensor, crow: Tensor, col: Tensor, depth: int, chunk_size: int,
    ties: str = "pessimistic",
) -> tuple[Tensor, Tensor]:
    """0-based positions of each query's best ``depth`` relevant targets under the tie rule.

    Returns ``(pos (Nq, depth) long, n_rel (Nq,) long)``; missing slots hold ``n_t``.
    """
    n_q, n_t = q.shape[0], t.shape[0]
    depth = max(1, min(depth, n_t))
    counts = crow[1:] - crow[:-1]
    pos_out = torch.full((n_q, depth), n_t, dtype=torch.long, device=q.device)
    t_T = t.T.contiguous()
    target_idx = torch.arange(n_t, device=q.device)
    # Counting into a float buffer (ge(out=float) then sum) is ~6x faster on CPU than summing
    # a bool mask; counts stay exact integers while n_t < 2**24 in float32 (else float64).
    count_dtype = torch.float32 if n_t < 2**24 else torch.float64
    buf = torch.empty((min(chunk_size, n_q), n_t), dtype=count_dtype, device=q.device)
    for s in range(0, n_q, chunk_size):
        e = min(s + chunk_size, n_q)
        scores = q[s:e] @ t_T  # (C, n_t): the only big tensor, bounded by chunk_size
        c = counts[s:e]
        lo, hi = int(crow[s]), int(crow[e])
        rows = torch.repeat_interleave(torch.arange(e - s, device=q.device), c)
        within = torch.arange(hi - lo, device=q.device) - torch.repeat_interleave(crow[s:e] - lo, c)
        r_max = int(c.max())
        # Relevant scores gathered from the same matmul as the corpus scores, so equal
        # vectors give bit-identical scores and the tie rule sees them as ties.
        rel = scores.new_full((e - s, r_max), -math.inf)
        rel[rows, within] = scores[rows, col[lo:hi]]
        d = min(depth, r_max)
        if ties == "trec_eval":
            # Relevant targets in the final order: score descending, then index descending
            # (two stable sorts); padding (-inf, index -1) sorts last.
            rel_idx = torch.full((e - s, r_max), -1, dtype=torch.long, device=q.device)
            rel_idx[rows, within] = col[lo:hi]
            o = torch.argsort(rel_idx, dim=1, descending=True, stable=True)
            rel_s, rel_idx = rel.gather(1, o), rel_idx.gather(1, o)
            o = torch.argsort(rel_s, dim=1, descending=True, stable=True)
            top, top_idx = rel_s.gather(1, o)[:, :d], rel_idx.gather(1, o)[:, :d]
        else:
            top = rel.topk(d, dim=1).values  # best relevant scores, descending
        for m in range(d):
            v = top[:, m : m + 1]
            if ties == "pessimistic":  # everything scoring >= v, minus the relevant ones
                before = torch.ge(scores, v, out=buf[: e - s]).sum(1).long() - (rel >= v).sum(1) + m
            elif ties == "optimistic":  # only strictly better irrelevant targets come first
                before = torch.gt(scores, v, out=buf[: e - s]).sum(1).long() - (rel > v).sum(1) + m
            else:  # trec_eval: a strict total order (score, index), so count what precedes it
                j = top_idx[:, m : m + 1]
                before = (torch.gt(scores, v, out=buf[: e - s]).sum(1).long()
                          + ((scores == v) & (target_idx > j)).sum(1))
            pos_out[s:e, m] = torch.where(c > m, before, n_t)
    return pos_out, counts


def _positions(
    query: Tensor,
    target: Tensor,
    relevant: Tensor | Sequence[Sequence[int]] | None,
    depth: int,
    dim: int | None,
    chunk_size: int,
    ties: str = "pessimistic",
) -> tuple[Tensor, Tensor, int]:
    query, target = _check_embeddings(query, target)
    d = _check_dim(dim, query.shape[1])
    chunk_size = _check_chunk(chunk_size)
    ties = _check_ties(ties)
    n_q, n_t = query.shape[0], target.shape[0]
    crow, col = _build_relevance(relevant, n_q, n_t, query.device)
    q, t = _prefix_normalize(query, d), _prefix_normalize(target.to(query.device), d)
    pos, n_rel = _relevant_positions(q, t, crow, col, depth, chunk_size, ties)
    return pos, n_rel, n_t


# Per-query values (one float64 entry per query); the corpus-level metric is their mean.
def _hit_q(pos: Tensor, k: int) -> Tensor:
    return (pos[:, 0] < k).double()


def _recall_q(pos: Tensor, n_rel: Tensor, k: int) -> Tensor:
    return (pos < k).sum(1).double() / n_rel.double()


def _ndcg_q(pos: Tensor, n_rel: Tensor, k: int) -> Tensor:
    gains = torch.where(pos < k, 1.0 / torch.log2(pos.double() + 2.0), 0.0).sum(1)
    # Ideal DCG: all relevant targets first, as many as fit in the top k.
    n_ideal = torch.clamp(n_rel, max=k)
    disc_cum = torch.cumsum(1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0), 0)
    idcg = disc_cum.to(pos.device)[n_ideal - 1]
    return gains / idcg


def _rr_q(pos: Tensor, k: int | None) -> Tensor:
    rr = 1.0 / (pos[:, 0].double() + 1.0)
    if k is not None:
        rr = torch.where(pos[:, 0] < k, rr, 0.0)
    return rr


def _hit(pos: Tensor, k: int) -> float:
    return _hit_q(pos, k).mean().item()


def _recall(pos: Tensor, n_rel: Tensor, k: int) -> float:
    return _recall_q(pos, n_rel, k).mean().item()


def _ndcg(pos: Tensor, n_rel: Tensor, k: int) -> float:
    return _ndcg_q(pos, n_rel, k).mean().item()


def _mrr(pos: Tensor, k: int | None) -> float:
    return _rr_q(pos, k).mean().item()


# --------------------------------------------------------------------------- public metrics


def cosine_similarity_matrix(a: Tensor, b: Tensor, dim: int | None = None) -> Tensor:
    """Cosine similarities (N, M) of the re-normalised ``[:dim]`` prefixes, in float32."""
    a, b = _check_embeddings(a, b)
    d = _check_dim(dim, a.shape[1])
    # A zero prefix normalises to zeros, so its similarities are 0 (never NaN).
    return _prefix_normalize(a, d) @ _prefix_normalize(b.to(a.device), d).T


def topk_accuracy(
    query: Tensor,
    target: Tensor,
    ks: int | Sequence[int] = (1, 5, 10),
    labels: Tensor | None = None,
    dim: int | None = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
) -> dict[int, float]:
    """Fraction of queries whose positive (target i, or ``labels[i]``) ranks within the top k."""
    ks = _check_ks(ks)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dtype == torch.bool or labels.dim() != 1:
            raise ValueError(
                "labels must be an integer tensor (n_queries,); for several positives per "
                "query use recall_at_k(relevant=...)"
            )
    pos, _, n_t = _positions(query, target, labels, 1, dim, chunk_size, ties)
    return {k: _hit(pos, min(k, n_t)) for k in ks}


def recall_at_k(
    query: Tensor,
    target: Tensor,
    ks: int | Sequence[int] = (1, 5, 10),
    relevant: Tensor | Sequence[Sequence[int]] | None = None,
    dim: int | None = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
) -> dict[int, float]:
    """Mean over queries of |relevant ∩ top-k| / |relevant| (k clipped to the corpus size)."""
    ks = _check_ks(ks)
    pos, n_rel, n_t = _positions(query, target, relevant, max(ks), dim, chunk_size, ties)
    return {k: _recall(pos, n_rel, min(k, n_t)) for k in ks}


def ndcg_at_k(
    query: Tensor,
    target: Tensor,
    ks: int | Sequence[int] = (10,),
    relevant: Tensor | Sequence[Sequence[int]] | None = None,
    dim: int | None = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
) -> dict[int, float]:
    """Mean nDCG@k with binary gains, log2 discount and ideal DCG over min(k, |relevant|)."""
    ks = _check_ks(ks)
    pos, n_rel, n_t = _positions(query, target, relevant, max(ks), dim, chunk_size, ties)
    return {k: _ndcg(pos, n_rel, min(k, n_t)) for k in ks}


def mrr(
    query: Tensor,
    target: Tensor,
    relevant: Tensor | Sequence[Sequence[int]] | None = None,
    dim: int | None = None,
    chunk_size: int = 4096,
    k: int | None = None,
    ties: str = "pessimistic",
) -> float:
    """Mean reciprocal 1-based rank of the first relevant target (0 beyond rank k if k given)."""
    if k is not None:
        checked = _check_ks(k, "k")
        if len(checked) != 1 or isinstance(k, Sequence):
            raise ValueError(f"k must be one positive integer or None, got {k!r}")
        k = checked[0]
    pos, _, _ = _positions(query, target, relevant, 1, dim, chunk_size, ties)
    return _mrr(pos, k)


def retrieval_metrics(
    query: Tensor,
    target: Tensor,
    ks: int | Sequence[int] = (1, 5, 10),
    relevant: Tensor | Sequence[Sequence[int]] | None = None,
    dim: int | None = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
) -> dict[str, float]:
    """All metrics in one ranking pass: ``top{k}`` (hit rate), ``recall@k``, ``ndcg@k``, ``mrr``."""
    cols = _per_query(query, target, ks, relevant, dim, chunk_size, ties)
    return {name: v.mean().item() for name, v in cols.items()}


def evaluate_matryoshka(
    query: Tensor,
    target: Tensor,
    dims: Sequence[int | None] | None = None,
    ks: int | Sequence[int] = (1, 5, 10),
    labels: Tensor | None = None,
    relevant: Tensor | Sequence[Sequence[int]] | None = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
) -> pd.DataFrame:
    """Top-k accuracy and MRR in both directions for each Matryoshka prefix dim (one row each).

    Columns: ``q2t_top{k}``, ``q2t_mrr``, ``t2q_top{k}``, ``t2q_mrr``, ``bytes_fp32``; index
    ``dim``. ``top{k}`` is the fraction of queries with a relevant item in the top k (equal to
    top-k accuracy with one positive). Positives: ``labels`` (one per query), ``relevant``
    (several), or neither (query i <-> target i). The t2q direction ranks the queries for each
    target, with the transposed relation; targets that are nobody's positive (extra negatives)
    have nothing to retrieve and are left out of t2q (they still count as q2t negatives).
    ``dims=None`` means powers of two from 8 plus the full size.
    """
    if labels is not None and relevant is not None:
        raise ValueError("pass either labels or relevant, not both")
    spec = labels if labels is not None else relevant
    query, target = _check_embeddings(query, target)
    ks = _check_ks(ks)
    chunk_size = _check_chunk(chunk_size)
    ties = _check_ties(ties)
    full = query.shape[1]
    dims_ = _resolve_dims(dims, full)
    n_q, n_t = query.shape[0], target.shape[0]
    target = target.to(query.device)
    crow, col = _build_relevance(spec, n_q, n_t, query.device)
    kept, crow_t, col_t = _transpose_relevance(crow, col)
    rows = []
    for d in dims_:
        q, t = _prefix_normalize(query, d), _prefix_normalize(target, d)
        row: dict[str, float | int] = {"dim": d}
        directions = (
            ("q2t", q, t, crow, col),
            ("t2q", t[kept], q, crow_t, col_t),
        )
        for name, a, b, cr, cl in directions:
            pos, _ = _relevant_positions(a, b, cr, cl, 1, chunk_size, ties)
            for k in ks:
                row[f"{name}_top{k}"] = _hit(pos, min(k, b.shape[0]))
            row[f"{name}_mrr"] = _mrr(pos, None)
        row["bytes_fp32"] = 4 * d
        rows.append(row)
    df = pd.DataFrame(rows).set_index("dim")
    df.attrs.update(n_queries=n_q, n_targets=n_t, n_t2q_queries=int(kept.numel()))
    return df


def per_query_metrics(
    query: Tensor,
    target: Tensor,
    ks: int | Sequence[int] = (1, 5, 10),
    relevant: Tensor | Sequence[Sequence[int]] | None = None,
    dim: int | None = None,
    chunk_size: int = 4096,
    ties: str = "pessimistic",
) -> pd.DataFrame:
    """One row per query: ``top{k}`` (0/1), ``recall@k``, ``ndcg@k``, ``mrr`` (reciprocal rank).

    Column means equal :func:`retrieval_metrics`; the rows are what a bootstrap resamples.
    """
    cols = _per_query(query, target, ks, relevant, dim, chunk_size, ties)
    return pd.DataFrame({name: v.cpu().numpy() for name, v in cols.items()})


def _per_query(query, target, ks, relevant, dim, chunk_size, ties) -> dict[str, Tensor]:
    """Each metric's per-query values, from one ranking pass."""
    ks = _check_ks(ks)
    pos, n_rel, n_t = _positions(query, target, relevant, max(ks), dim, chunk_size, ties)
    cols: dict[str, Tensor] = {}
    for k in ks:
        cols[f"top{k}"] = _hit_q(pos, min(k, n_t))
    for k in ks:
        cols[f"recall@{k}"] = _recall_q(pos, n_rel, min(k, n_t))
    for k in ks:
        cols[f"ndcg@{k}"] = _ndcg_q(pos, n_rel, min(k, n_t))
    cols["mrr"] = _rr_q(pos, None)
    return cols


def _check_count(name: str, value: int) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) int32 row indices drawn uniformly with replacement, fixed by (n, n_boot, seed)."""
    _check_count("n", n)
    _check_count("n_boot", n_boot)
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n), dtype=np.int32)


def bootstrap_ci(
    values: np.ndarray | Sequence[float] | Tensor,
    ci: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval ``(lo, hi)`` of the mean of per-query ``values``.

    ``values`` is (n,) or (n, m) (m metrics sharing the queries). Each of ``n_boot`` resamples
    draws n rows with replacement (``indices``, default :func:`bootstrap_indices`), and the
    interval is the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles (numpy's linear
    interpolation) of the resample means. Vectorised: the means are resample counts (n_boot, n)
    times ``values``, so 1000 resamples of a few thousand queries take milliseconds. Columns
    share the resamples (paired). Returns arrays of shape (m,), or 0-d arrays for 1-D input.
    """
    if isinstance(ci, bool) or not isinstance(ci, float | int) or not 0 < ci < 1:
        raise ValueError(f"ci must be a confidence level in (0, 1), e.g. 0.95, got {ci!r}")
    v = values.detach().double().cpu().numpy() if isinstance(values, Tensor) else values
    v = np.asarray(v, dtype=np.float64)
    if v.ndim not in (1, 2) or v.shape[0] == 0:
        raise ValueError(f"values must be (n,) or (n, m) with n >= 1, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("values contains NaN or inf; bootstrap per-query metric values")
    n = v.shape[0]
    idx = bootstrap_indices(n, n_boot, seed) if indices is None else np.asarray(indices)
    if idx.ndim != 2 or idx.shape[1] != n or idx.size == 0 or idx.min() < 0 or idx.max() >= n:
        raise ValueError(
            f"indices must be (n_boot, {n}) row indices in [0, {n}), got shape {idx.shape}"
        )
    flat = v.reshape(n, -1)
    means = np.empty((idx.shape[0], flat.shape[1]))
    block = max(1, 2**22 // n)  # resamples per block: bounds the (block, n) count matrix
    for s in range(0, idx.shape[0], block):
        b = idx[s : s + block]
        offsets = np.arange(b.shape[0], dtype=np.int64)[:, None] * n
        counts = np.bincount((b + offsets).ravel(), minlength=b.size).reshape(b.shape)
        means[s : s + block] = counts.astype(np.float64) @ flat / n
    alpha = (1.0 - float(ci)) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    shape = v.shape[1:]
    return lo.reshape(shape), hi.reshape(shape)


# --------------------------------------------------------------------------- cost


def retrieval_cost_table(
    dims: Sequence[int | None], n_corpus: int, full_dim: int | None = None
) -> pd.DataFrame:
    """Storage per vector / per index and brute-force FLOPs per query for each dim.

    Bytes per vector: fp32 = 4d, fp16/bf16 = 2d, int8 = d (scalar quantisation, shared scale
    not counted), binary = ceil(d/8). ``index_bytes_*`` = bytes per vector x ``n_corpus``;
    ``flops_per_query`` = 2·d·n_corpus (one multiply-add per stored number).
    """
    if not isinstance(n_corpus, int) or n_corpus < 1:
        raise ValueError(f"n_corpus must be a positive int, got {n_corpus!r}")
    if any(d is None for d in dims) and full_dim is None:
        raise ValueError("dims contains None (full size): pass full_dim to resolve it")
    dims_ = _resolve_dims(dims, full_dim if full_dim is not None else max(dims))
    rows = []
    for d in dims_:
        per = {"fp32": 4 * d, "fp16": 2 * d, "int8": d, "binary": -(-d // 8)}
        row: dict[str, int] = {"dim": d}
        row.update({f"bytes_{k}": v for k, v in per.items()})
        row.update({f"index_bytes_{k}": v * n_corpus for k, v in per.items()})
        row["flops_per_query"] = 2 * d * n_corpus
        rows.append(row)
    return pd.DataFrame(rows).set_index("dim")
