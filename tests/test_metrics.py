"""Tests for mmlib.metrics against hand-computed cases and a pure-Python reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from mmlib.metrics import (
    bootstrap_ci,
    bootstrap_indices,
    cosine_similarity_matrix,
    evaluate_matryoshka,
    mrr,
    ndcg_at_k,
    per_query_metrics,
    recall_at_k,
    retrieval_cost_table,
    retrieval_metrics,
    topk_accuracy,
)


def embed_scores(scores: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose cosine scores rank exactly like ``scores`` (ties stay exact ties).

    Targets are one-hot, so query i's score for target j is scores[i][j] / ||scores[i]||: a
    positive per-row rescaling, which keeps each row's order and its ties bit-exact.
    """
    s = torch.tensor(scores, dtype=torch.float32)
    return s, torch.eye(s.shape[1])


def sign_embeddings(n: int, e: int, seed: int, flip: float = 0.0, base: torch.Tensor | None = None):
    """±1 embeddings: after normalisation every score is a multiple of 1/e, exact in float32.

    So any matmul blocking gives bit-identical scores, and there are many genuine ties.
    """
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return torch.randint(0, 2, (n, e), generator=g).float() * 2 - 1
    mask = torch.rand(base.shape, generator=g) < flip
    return torch.where(mask, -base, base)


def reference(scores: list[list[float]], rel: list[set[int]], ks: list[int]) -> dict[str, float]:
    """Brute force: sort every row (ties: irrelevant first, i.e. pessimistic), read off ranks."""
    out = {f"top{k}": 0.0 for k in ks}
    out.update({f"recall@{k}": 0.0 for k in ks})
    out.update({f"ndcg@{k}": 0.0 for k in ks})
    out["mrr"] = 0.0
    for row, r in zip(scores, rel, strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j in r))  # noqa: B023
        ranks = [p for p, j in enumerate(order) if j in r]  # 0-based, ascending
        for k in ks:
            out[f"top{k}"] += ranks[0] < k
            out[f"recall@{k}"] += sum(p < k for p in ranks) / len(r)
            dcg = sum(1 / math.log2(p + 2) for p in ranks if p < k)
            idcg = sum(1 / math.log2(i + 2) for i in range(min(k, len(r))))
            out[f"ndcg@{k}"] += dcg / idcg
        out["mrr"] += 1 / (ranks[0] + 1)
    return {key: v / len(scores) for key, v in out.items()}


# --------------------------------------------------------------------------- hand cases

# Diagonal positives. Positive scores: 0.9 (rank 1), 0.4 (rank 3: 0.5 and 0.8 above),
# 0.6 (rank 2: 0.7 above), 0.5 tied with two other 0.5s (pessimistic: rank 3).
HAND = [
    [0.9, 0.1, 0.2, 0.3],
    [0.5, 0.4, 0.8, 0.1],
    [0.3, 0.7, 0.6, 0.2],
    [0.2, 0.5, 0.5, 0.5],
]


def test_cosine_similarity_matrix_truncates_and_renormalises():
    a = torch.tensor([[3.0, 4.0, 100.0]])
    b = torch.tensor([[4.0, 3.0, -50.0], [0.0, 1.0, 0.0]])
    full = cosine_similarity_matrix(a, b)
    assert full.dtype == torch.float32 and full.shape == (1, 2)
    # Prefix [:2] of a is (3, 4) -> (0.6, 0.8); of b: (0.8, 0.6) and (0, 1).
    assert cosine_similarity_matrix(a, b, dim=2)[0].tolist() == pytest.approx([0.96, 0.8])
    assert full[0, 1].item() == pytest.approx(4 / math.sqrt(3**2 + 4**2 + 100**2))
    bf16 = cosine_similarity_matrix(a.bfloat16(), b.bfloat16(), dim=2)
    assert bf16.dtype == torch.float32


def test_hand_case_topk_mrr_ndcg():
    q, t = embed_scores(HAND)
    assert topk_accuracy(q, t, ks=(1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 1.0}
    assert mrr(q, t) == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 3) / 4)
    # nDCG@2, one relevant each: q0 at rank 1 -> 1, q2 at rank 2 -> 1/log2(3), others 0.
    assert ndcg_at_k(q, t, ks=2)[2] == pytest.approx((1 + 0.6309297535714574) / 4)
    assert recall_at_k(q, t, ks=(1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 1.0}
    assert mrr(q, t, k=2) == pytest.approx((1 + 1 / 2) / 4)


def test_ties_are_pessimistic():
    # Every score equal: a collapsed encoder must not look perfect.
    q, t = torch.ones(5, 8), torch.ones(5, 8)
    assert topk_accuracy(q, t, ks=(1, 4, 5)) == {1: 0.0, 4: 0.0, 5: 1.0}
    assert mrr(q, t) == pytest.approx(1 / 5)
    # One tie above a strictly lower score: positive (0.5) tied with target 0 -> rank 2.
    q, t = embed_scores([[0.5, 0.5, 0.1]])
    assert topk_accuracy(q, t, ks=(1, 2), labels=torch.tensor([1])) == {1: 0.0, 2: 1.0}
    assert topk_accuracy(q, t, ks=(1, 2), labels=torch.tensor([0])) == {1: 0.0, 2: 1.0}


def test_several_relevant_hand_case():
    # Order: t1 .9, t3 .7, t2 .5, t4 .3, t0 .1; relevant {2, 4} sit at ranks 3 and 4.
    q, t = embed_scores([[0.1, 0.9, 0.5, 0.7, 0.3]])
    rel = [[2, 4]]
    assert recall_at_k(q, t, ks=(1, 3, 4, 10), relevant=rel) == {
        1: 0.0,
        3: 0.5,
        4: 1.0,
        10: 1.0,  # k beyond the 5-target corpus is clipped
    }
    assert mrr(q, t, relevant=rel) == pytest.approx(1 / 3)
    ideal = 1 + 1 / math.log2(3)
    nd = ndcg_at_k(q, t, ks=(3, 4, 10), relevant=rel)
    assert nd[3] == pytest.approx((1 / 2) / ideal)
    assert nd[4] == pytest.approx((1 / 2 + 1 / math.log2(5)) / ideal)
    assert nd[10] == pytest.approx(nd[4])
    # Same query, relevant {0, 1}: t1 is first -> hit@1, recall@1 = 1/2, nDCG ideal is 2 items.
    m = retrieval_metrics(q, t, ks=(1, 5), relevant=[[0, 1]])
    assert m["top1"] == 1.0 and m["recall@1"] == 0.5 and m["recall@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / ideal)


def test_several_relevant_with_ties():
    # All three tie; pessimistic puts irrelevant t1 first, relevant t0/t2 at ranks 2 and 3.
    q, t = embed_scores([[0.5, 0.5, 0.5]])
    m = retrieval_metrics(q, t, ks=(1, 2, 3), relevant=[[0, 2]])
    assert (m["recall@1"], m["recall@2"], m["recall@3"]) == (0.0, 0.5, 1.0)
    assert m["mrr"] == pytest.approx(1 / 2)
    assert m["ndcg@3"] == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    )


def test_relevance_formats_agree():
    q, t = embed_scores(HAND)
    lists = [[0, 2], [1], [1, 2, 3], [3]]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i, r in enumerate(lists):
        mask[i, r] = True
    a = retrieval_metrics(q, t, ks=(1, 2, 3), relevant=lists)
    b = retrieval_metrics(q, t, ks=(1, 2, 3), relevant=mask)
    dup = retrieval_metrics(q, t, ks=(1, 2, 3), relevant=[r + r for r in lists])
    assert a == b == dup
    scores = [row[:] for row in HAND]
    assert a == pytest.approx(reference(scores, [set(r) for r in lists], [1, 2, 3]))
    # None, labels tensor and one-element lists all mean the same single positive.
    diag = retrieval_metrics(q, t, ks=(1, 2))
    assert diag == retrieval_metrics(q, t, ks=(1, 2), relevant=torch.arange(4))
    assert diag == retrieval_metrics(q, t, ks=(1, 2), relevant=[[i] for i in range(4)])


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("ties", [False, True])
def test_matches_bruteforce_reference(ties):
    rng = random.Random(0)
    n_q, n_t, ks = 40, 60, [1, 3, 10, 100]
    if ties:
        # Integer scores in {0..4}: plenty of exact ties.
        scores = [[float(rng.randint(0, 4)) for _ in range(n_t)] for _ in range(n_q)]
        for row in scores:
            row[0] = row[0] or 1.0  # no all-zero rows (cosine undefined)
        q, t = embed_scores(scores)
    else:
        g = torch.Generator().manual_seed(0)
        q, t = torch.randn(n_q, 16, generator=g), torch.randn(n_t, 16, generator=g)
    rel = [set(rng.sample(range(n_t), rng.randint(1, 4))) for _ in range(n_q)]
    sim = cosine_similarity_matrix(q, t).tolist()
    got = retrieval_metrics(q, t, ks=ks, relevant=[sorted(r) for r in rel], chunk_size=7)
    assert got == pytest.approx(reference(sim, rel, ks))
    assert mrr(q, t, relevant=[sorted(r) for r in rel]) == pytest.approx(got["mrr"])
    single = [{rng.randrange(n_t)} for _ in range(n_q)]
    labels = torch.tensor([next(iter(r)) for r in single])
    acc = topk_accuracy(q, t, ks=ks, labels=labels, chunk_size=5)
    ref = reference(sim, single, ks)
    assert acc == pytest.approx({k: ref[f"top{k}"] for k in ks})


def test_labels_equal_diagonal_after_permutation():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(50, 32, generator=g)
    t = q + 0.8 * torch.randn(50, 32, generator=g)
    perm = torch.randperm(50, generator=g)
    t_perm = t[perm]  # query i's positive now sits at row inv[i]
    inv = torch.argsort(perm)
    ks = (1, 5, 10)
    assert topk_accuracy(q, t_perm, ks=ks, labels=inv) == topk_accuracy(q, t, ks=ks)
    assert mrr(q, t_perm, relevant=inv) == mrr(q, t)
    a = evaluate_matryoshka(q, t, dims=(8, None), ks=ks)
    b = evaluate_matryoshka(q, t_perm, dims=(8, None), ks=ks, labels=inv)
    pd.testing.assert_frame_equal(a, b)


def test_chunked_equals_unchunked_3000():
    base = sign_embeddings(3000, 64, seed=2)
    q, t = base, sign_embeddings(3000, 64, seed=3, flip=0.3, base=base)
    rel = torch.zeros(3000, 3000, dtype=torch.bool)
    rel[torch.arange(3000), torch.arange(3000)] = True
    rel[torch.arange(3000), (torch.arange(3000) * 7 + 1) % 3000] = True
    ks = (1, 5, 10)
    small = retrieval_metrics(q, t, ks=ks, relevant=rel, chunk_size=256)
    big = retrieval_metrics(q, t, ks=ks, relevant=rel, chunk_size=4096)
    assert small == big
    assert 0 < small["top1"] < 1
    assert topk_accuracy(q, t, ks=ks, chunk_size=256) == topk_accuracy(q, t, ks=ks)


def test_k_larger_than_corpus():
    q, t = embed_scores(HAND)
    assert topk_accuracy(q, t, ks=(4, 1000)) == {4: 1.0, 1000: 1.0}
    assert recall_at_k(q, t, ks=1000, relevant=[[0, 1, 2, 3]] * 4) == {1000: 1.0}
    assert ndcg_at_k(q, t, ks=1000, relevant=[[0, 1, 2, 3]] * 4) == {1000: pytest.approx(1.0)}


# --------------------------------------------------------------------------- errors


def test_errors_are_clear():
    q, t = torch.randn(3, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="no relevant target"):
        recall_at_k(q, t, relevant=[[0], [], [1]])
    with pytest.raises(ValueError, match="no relevant target"):
        mrr(q, t, relevant=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        topk_accuracy(q, t, labels=torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="at least as many targets"):
        topk_accuracy(t, q)
    with pytest.raises(ValueError, match="same embedding size"):
        topk_accuracy(q, torch.randn(3, 5))
    with pytest.raises(ValueError, match="dim must be"):
        topk_accuracy(q, t, dim=5)
    with pytest.raises(ValueError, match="NaN"):
        topk_accuracy(q * float("nan"), t)
    with pytest.raises(ValueError, match="ks must be"):
        topk_accuracy(q, t, ks=(0, 1))
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(q, t, relevant=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        topk_accuracy(torch.empty(0, 4), t)


# --------------------------------------------------------------------------- matryoshka table


def test_evaluate_matryoshka_shape_and_values():
    base = sign_embeddings(80, 32, seed=4)
    q, t = base, sign_embeddings(80, 32, seed=5, flip=0.25, base=base)
    df = evaluate_matryoshka(q, t, dims=(16, 8, None, 32), ks=(1, 5))
    assert df.index.name == "dim" and list(df.index) == [8, 16, 32]
    assert list(df.columns) == [
        "q2t_top1",
        "q2t_top5",
        "q2t_mrr",
        "t2q_top1",
        "t2q_top5",
        "t2q_mrr",
        "bytes_fp32",
    ]
    for d in (8, 16, 32):
        fwd = topk_accuracy(q, t, ks=(1, 5), dim=d)
        bwd = topk_accuracy(t, q, ks=(1, 5), dim=d)
        assert df.loc[d, "q2t_top1"] == fwd[1] and df.loc[d, "q2t_top5"] == fwd[5]
        assert df.loc[d, "t2q_top1"] == bwd[1] and df.loc[d, "t2q_top5"] == bwd[5]
        assert df.loc[d, "q2t_mrr"] == pytest.approx(mrr(q, t, dim=d))
        assert df.loc[d, "bytes_fp32"] == 4 * d
    # Default dims: powers of two from 8, plus the full width.
    assert list(evaluate_matryoshka(q, t, ks=1).index) == [8, 16, 32]


def test_evaluate_matryoshka_reverse_direction_with_labels_and_extra_negatives():
    g = torch.Generator().manual_seed(6)
    img = torch.randn(10, 16, generator=g)  # 6 images with captions + 4 distractors
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5])  # 12 captions
    cap = img[labels] + 0.9 * torch.randn(12, 16, generator=g)
    df = evaluate_matryoshka(cap, img, dims=(None,), ks=(1, 2), labels=labels)
    assert df.loc[16, "q2t_top1"] == topk_accuracy(cap, img, ks=1, labels=labels)[1]
    # t2q: each of the 6 captioned images retrieves among the 12 captions; any of its
    # captions counts (hit rate); distractor images 6..9 have no caption and are left out.
    rel = [[i for i, lab in enumerate(labels.tolist()) if lab == j] for j in range(6)]
    exp = retrieval_metrics(img[:6], cap, ks=(1, 2), relevant=rel)
    assert df.loc[16, "t2q_top1"] == exp["top1"] and df.loc[16, "t2q_top2"] == exp["top2"]
    assert df.loc[16, "t2q_mrr"] == pytest.approx(exp["mrr"])
    assert df.attrs["n_t2q_queries"] == 6
    sim = cosine_similarity_matrix(img[:6], cap).tolist()
    assert exp == pytest.approx(reference(sim, [set(r) for r in rel], [1, 2]))


# --------------------------------------------------------------------------- cost table


def test_retrieval_cost_table():
    df = retrieval_cost_table([None, 64], n_corpus=1000, full_dim=128)
    assert list(df.index) == [64, 128]
    row = df.loc[64]
    assert (row["bytes_fp32"], row["bytes_fp16"], row["bytes_int8"], row["bytes_binary"]) == (
        256,
        128,
        64,
        8,
    )
    assert row["index_bytes_fp32"] == 256_000 and row["flops_per_query"] == 128_000
    assert df.loc[128, "flops_per_query"] == 256_000
    with pytest.raises(ValueError, match="full_dim"):
        retrieval_cost_table([None], n_corpus=10)


def test_ks_accept_any_integral_and_refuse_floats_and_bools():
    """numpy/torch integers are ks like any int (results keyed by plain ints); 5.0 and True are not."""
    import numpy as np

    q, t = sign_embeddings(12, 16, seed=7), sign_embeddings(20, 16, seed=8)
    want = topk_accuracy(q, t, ks=(1, 5))
    for ks in (np.array([1, 5]), [np.int64(1), np.int32(5)], torch.tensor([5, 1]), (1, 5)):
        got = topk_accuracy(q, t, ks=ks)
        assert got == want and all(type(k) is int for k in got), ks
    assert recall_at_k(q, t, ks=np.int64(5)) == recall_at_k(q, t, ks=5)
    assert ndcg_at_k(q, t, ks=np.array(5)) == ndcg_at_k(q, t, ks=5)
    assert mrr(q, t, k=np.int64(5)) == mrr(q, t, k=5)
    assert evaluate_matryoshka(q, t, dims=[8], ks=np.array([1, 5])).equals(
        evaluate_matryoshka(q, t, dims=[8], ks=(1, 5)))
    for bad in (5.0, [1, 5.0], np.array([1.0, 5.0]), True, [1, True], np.bool_(True), "5", [], 0):
        with pytest.raises(ValueError, match="ks must be"):
            topk_accuracy(q, t, ks=bad)
    for bad in (5.0, [5], True):
        with pytest.raises(ValueError, match="k must be"):
            mrr(q, t, k=bad)


# --------------------------------------------------------------------------- tie conventions

TIE_KEYS = {
    # Sort keys for target j of one query (scores s, relevant set r), best first.
    "pessimistic": lambda s, r, j: (-s[j], j in r),  # relevant after tied irrelevant
    "optimistic": lambda s, r, j: (-s[j], j not in r),  # relevant before tied irrelevant
    "trec_eval": lambda s, r, j: (-s[j], -j),  # trec_eval: tied docs by docno descending
}


def reference_ties(scores, rel, ks, ties):
    """Brute force with an explicit tie-break key; same outputs as ``reference``."""
    out = {f"{m}{k}": 0.0 for m in ("top", "recall@", "ndcg@") for k in ks}
    out["mrr"] = 0.0
    for s, r in zip(scores, rel, strict=True):
        order = sorted(range(len(s)), key=lambda j: TIE_KEYS[ties](s, r, j))  # noqa: B023
        ranks = [p for p, j in enumerate(order) if j in r]
        for k in ks:
            out[f"top{k}"] += ranks[0] < k
            out[f"recall@{k}"] += sum(p < k for p in ranks) / len(r)
            dcg = sum(1 / math.log2(p + 2) for p in ranks if p < k)
            out[f"ndcg@{k}"] += dcg / sum(1 / math.log2(i + 2) for i in range(min(k, len(r))))
        out["mrr"] += 1 / (ranks[0] + 1)
    return {key: v / len(scores) for key, v in out.items()}


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "trec_eval"])
def test_tie_conventions_match_sorted_reference(ties):
    rng = random.Random(5)
    n_q, n_t, ks = 30, 25, [1, 2, 5, 30]
    # Integer scores in {1..4}: most relevant targets tie with others, also with each other.
    scores = [[float(rng.randint(1, 4)) for _ in range(n_t)] for _ in range(n_q)]
    q, t = embed_scores(scores)
    rel = [set(rng.sample(range(n_t), rng.randint(1, 5))) for _ in range(n_q)]
    got = retrieval_metrics(q, t, ks=ks, relevant=[sorted(r) for r in rel], chunk_size=7,
                            ties=ties)
    assert got == pytest.approx(reference_ties(scores, rel, ks, ties))
    per_query = per_query_metrics(q, t, ks=ks, relevant=[sorted(r) for r in rel], ties=ties)
    assert len(per_query) == n_q
    assert per_query.mean().to_dict() == pytest.approx(got)


def test_tie_conventions_on_a_collapsed_encoder():
    q, t = torch.ones(5, 8), torch.ones(5, 8)  # every score equal; query i's positive is i
    assert topk_accuracy(q, t, ks=(1, 5), ties="optimistic") == {1: 1.0, 5: 1.0}
    assert mrr(q, t, ties="optimistic") == 1.0
    # trec_eval order: targets 4, 3, 2, 1, 0, so target i sits at 0-based position 4 - i.
    assert topk_accuracy(q, t, ks=(1, 2), ties="trec_eval") == {1: 0.2, 2: 0.4}
    assert mrr(q, t, ties="trec_eval") == pytest.approx(sum(1 / r for r in range(1, 6)) / 5)
    df = evaluate_matryoshka(q, t, dims=[8], ks=(1,), ties="optimistic")
    assert df.loc[8, "q2t_top1"] == 1.0 and df.loc[8, "t2q_top1"] == 1.0
    with pytest.raises(ValueError, match="ties must be one of"):
        recall_at_k(q, t, ties="average")


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_equals_naive_loop_and_validates():
    rng = np.random.default_rng(0)
    values = np.stack([rng.random(200) < 0.3, rng.random(200)], axis=1).astype(float)
    idx = bootstrap_indices(200, 500, seed=3)
    assert idx.shape == (500, 200) and (idx == bootstrap_indices(200, 500, seed=3)).all()
    lo, hi = bootstrap_ci(values, ci=0.9, n_boot=500, seed=3)
    means = np.array([values[i].mean(0) for i in idx])  # the textbook loop
    assert lo == pytest.approx(np.quantile(means, 0.05, axis=0), abs=1e-12)
    assert hi == pytest.approx(np.quantile(means, 0.95, axis=0), abs=1e-12)
    assert (lo <= values.mean(0)).all() and (values.mean(0) <= hi).all()
    lo1, hi1 = bootstrap_ci(values[:, 1], ci=0.9, n_boot=500, seed=3)
    assert lo1.shape == () and float(lo1) == pytest.approx(lo[1]) and float(hi1) == hi[1]
    # Width ~ 1/sqrt(n): the same values four times over give half the width.
    lo4, hi4 = bootstrap_ci(np.tile(values, (4, 1)), ci=0.9, n_boot=2000)
    lo_, hi_ = bootstrap_ci(values, ci=0.9, n_boot=2000)
    assert (hi4 - lo4) / (hi_ - lo_) == pytest.approx([0.5, 0.5], abs=0.1)
    with pytest.raises(ValueError, match="ci must be"):
        bootstrap_ci(values, ci=95)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.5, float("nan")])
    with pytest.raises(ValueError, match="indices must be"):
        bootstrap_ci(values, indices=idx[:, :10])
    with pytest.raises(ValueError, match="n_boot must be"):
        bootstrap_ci(values, n_boot=0)


def test_numpy_ints_are_ints_and_bools_are_not():
    """Sizes read from arrays (np.int64) are accepted like ints; True is never a size."""
    q, t = embed_scores([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 1.0, 3.0]])
    want = topk_accuracy(q, t, ks=1, dim=2, chunk_size=2)
    assert topk_accuracy(q, t, ks=1, dim=np.int64(2), chunk_size=np.int64(2)) == want
    with pytest.raises(ValueError, match="dim"):
        topk_accuracy(q, t, ks=1, dim=True)
    with pytest.raises(ValueError, match="chunk_size"):
        topk_accuracy(q, t, ks=1, chunk_size=True)
