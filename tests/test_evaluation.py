"""Tests for mmlib.evaluation: the image–caption protocol (unique images, hit-any), CIs, ties."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmlib.data import ImageTextDataset
from mmlib.evaluation import evaluate_dataset, evaluate_image_caption
from mmlib.metrics import bootstrap_indices, evaluate_matryoshka, per_query_metrics


class LookupEncoder:
    """A fake encoder: fixed vectors per caption text and per image path (no model)."""

    def __init__(self, text_vecs: dict[str, torch.Tensor], image_vecs: dict[str, torch.Tensor],
                 dims: list[int]):
        self.text_vecs, self.image_vecs = text_vecs, image_vecs
        self.config = SimpleNamespace(resolved_mrl_dims=lambda: list(dims))
        self.calls: dict[str, int] = {"texts": 0, "images": 0}

    def encode_texts(self, texts, dim=None, **kwargs):
        self.calls["texts"] += len(texts)
        return F.normalize(torch.stack([self.text_vecs[t] for t in texts]), dim=-1)

    def encode_images(self, images, dim=None, **kwargs):
        self.calls["images"] += len(images)
        return F.normalize(torch.stack([self.image_vecs[Path(p).name] for p in images]), dim=-1)


def five_caption_set(tmp_path: Path, n_images: int = 6, per_image: int = 5, e: int = 32,
                     noise: float = 1e-3) -> tuple[ImageTextDataset, LookupEncoder]:
    """A manifest with `per_image` captions per image and a perfect encoder for it."""
    g = torch.Generator().manual_seed(0)
    image_vecs, text_vecs, rows = {}, {}, []
    for i in range(n_images):
        name = f"img{i}.png"
        image_vecs[name] = torch.randn(e, generator=g)
        for c in range(per_image):
            text = f"caption {c} of image {i}"
            # Perfect: each caption sits on its image's embedding, up to a tiny perturbation.
            text_vecs[text] = image_vecs[name] + noise * torch.randn(e, generator=g)
            rows.append({"image": name, "text": text})
    # Interleave rows (image order != row order) so first-appearance order is exercised.
    rows = rows[1::2] + rows[::2]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ImageTextDataset(manifest), LookupEncoder(text_vecs, image_vecs, [8, 16, e])


def test_perfect_encoder_scores_one_with_five_captions_per_image(tmp_path):
    ds, enc = five_caption_set(tmp_path)
    df = evaluate_dataset(enc, ds, ks=(1, 5, 10))
    assert list(df.index) == [8, 16, 32]
    for col in ("q2t_top1", "t2q_top1", "q2t_top5", "t2q_top5", "q2t_mrr", "t2q_mrr"):
        assert (df[col] == 1.0).all(), (col, df[col].tolist())
    assert df.attrs["n_captions"] == 30 and df.attrs["n_images"] == 6
    assert (df["chance_top1"] == 1 / 6).all()
    # Every unique image is embedded once, every caption once.
    assert enc.calls == {"texts": 30, "images": 6}


def test_duplicate_captions_follow_the_tie_rule(tmp_path):
    # "a dog" describes images A and B: its (shared) embedding ties A and B exactly.
    rows = [("A", "a dog"), ("A", "a red dog"), ("B", "a dog"), ("B", "a cat"), ("C", "a bird")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"{i}.png", "text": t}) + "\n"
                                for i, t in rows))
    ds = ImageTextDataset(manifest)
    texts = {"a dog": [1.0, 1.0, 0.0], "a red dog": [1.0, 0.0, 0.0], "a cat": [0.0, 1.0, 0.0],
             "a bird": [0.0, 0.0, 1.0]}
    enc = LookupEncoder({t: torch.tensor(v) for t, v in texts.items()},
                        {f"{n}.png": torch.eye(3)[i] for i, n in enumerate("ABC")}, [3])
    # text→image ranks of the two "a dog" rows (A, B tie above C); the other captions rank 1.
    # pessimistic: 2 and 2; optimistic: 1 and 1; trec_eval (index descending, B=1 before A=0):
    # 2 for A's row, 1 for B's.
    expected = {"pessimistic": (3 / 5, (0.5 + 1 + 0.5 + 1 + 1) / 5),
                "optimistic": (1.0, 1.0),
                "trec_eval": (4 / 5, (0.5 + 1 + 1 + 1 + 1) / 5)}
    for ties, (top1, mrr_) in expected.items():
        df = evaluate_dataset(enc, ds, ks=(1, 2), ties=ties)
        assert df.loc[3, "q2t_top1"] == pytest.approx(top1), ties
        assert df.loc[3, "q2t_mrr"] == pytest.approx(mrr_), ties
        assert df.loc[3, "q2t_top2"] == 1.0
        # image→text: A's best caption "a red dog" (score 1), B's "a cat", C's "a bird".
        assert df.loc[3, "t2q_top1"] == 1.0 and df.loc[3, "t2q_mrr"] == 1.0
        assert df.attrs["n_images"] == 3 and df.attrs["ties"] == ties


# --------------------------------------------------------------------------- hand case

# Images are one-hot, captions unit vectors, so cos(caption, image j) = caption[j].
HAND_CAPTIONS = [
    [1.0, 0.0, 0.0],  # c0 -> I0: I0 first                      (t2i rank 1)
    [0.6, 0.8, 0.0],  # c1 -> I0: I1 .8 above I0 .6             (rank 2)
    [0.0, 0.6, 0.8],  # c2 -> I1: I2 .8 above I1 .6             (rank 2)
    [0.36, 0.48, 0.8],  # c3 -> I1: I2 .8 above I1 .48          (rank 2)
    [0.0, 0.0, 1.0],  # c4 -> I2                                 (rank 1)
    [0.8, 0.0, 0.6],  # c5 -> I2: I0 .8 above I2 .6             (rank 2)
    [0.48, 0.64, 0.6],  # c6 -> I2: I1 .64 above I2 .6          (rank 2)
]
HAND_IMAGE = [0, 0, 1, 1, 2, 2, 2]


def test_hand_case_both_directions():
    text, image = torch.tensor(HAND_CAPTIONS), torch.eye(3)
    df = evaluate_image_caption(text, image, HAND_IMAGE, dims=[None], ks=(1, 2, 5))
    row = df.loc[3]
    l2 = math.log2
    # text→image ranks 1, 2, 2, 2, 1, 2, 2.
    assert row["q2t_top1"] == pytest.approx(2 / 7)
    assert row["q2t_top2"] == row["q2t_top5"] == 1.0
    assert row["q2t_mrr"] == pytest.approx((2 + 5 / 2) / 7)
    assert row["q2t_ndcg@10"] == pytest.approx((2 + 5 / l2(3)) / 7)
    # image→text. I0 column: c0 1, c5 .8, c1 .6, c6 .48, c3 .36 -> relevant c0, c1 at 1, 3.
    # I1: c1 .8, c6 .64, c2 .6, c3 .48 -> relevant c2, c3 at 3, 4.
    # I2: c4 1, c2 .8, c3 .8, c5 .6, c6 .6 -> relevant c4, c5, c6 at 1, 4, 5.
    assert row["t2q_top1"] == pytest.approx(2 / 3)
    assert row["t2q_top2"] == pytest.approx(2 / 3) and row["t2q_top5"] == 1.0
    assert row["t2q_mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    idcg2, idcg3 = 1 + 1 / l2(3), 1 + 1 / l2(3) + 1 / l2(4)
    ndcg = [(1 + 1 / l2(4)) / idcg2, (1 / l2(4) + 1 / l2(5)) / idcg2,
            (1 + 1 / l2(5) + 1 / l2(6)) / idcg3]
    assert row["t2q_ndcg@10"] == pytest.approx(sum(ndcg) / 3)
    assert row["chance_top1"] == pytest.approx(1 / 3) and row["bytes_fp32"] == 12
    assert df.attrs["n_captions"] == 7 and df.attrs["n_images"] == 3


# --------------------------------------------------------------------------- naive reference


def naive_protocol(text: torch.Tensor, image: torch.Tensor, caption_image: list[int], dim: int,
                   ks: list[int], ties: str) -> dict[str, float]:
    """Plain-Python protocol on ±1 embeddings: integer dot products, an explicit sort key."""
    t = [[int(x) for x in row[:dim]] for row in text]
    im = [[int(x) for x in row[:dim]] for row in image]

    def ranks(q: list[int], corpus: list[list[int]], relevant: set[int]) -> list[int]:
        s = [sum(a * b for a, b in zip(q, c, strict=True)) for c in corpus]
        key = {"pessimistic": lambda j: (-s[j], j in relevant),  # irrelevant first among ties
               "optimistic": lambda j: (-s[j], j not in relevant),
               "trec_eval": lambda j: (-s[j], -j)}[ties]  # tied: index descending
        order = sorted(range(len(corpus)), key=key)
        return [p for p, j in enumerate(order) if j in relevant]

    out: dict[str, float] = {}
    queries = {
        "q2t": [(t[c], im, {caption_image[c]}) for c in range(len(t))],
        "t2q": [(im[i], t, {c for c, j in enumerate(caption_image) if j == i})
                for i in range(len(im))],
    }
    for name, qs in queries.items():
        rs = [(ranks(q, corpus, rel), len(rel)) for q, corpus, rel in qs]
        for k in ks:
            out[f"{name}_top{k}"] = sum(r[0] < k for r, _ in rs) / len(rs)
        out[f"{name}_mrr"] = sum(1 / (r[0] + 1) for r, _ in rs) / len(rs)
        ndcg = [sum(1 / math.log2(p + 2) for p in r if p < 10)
                / sum(1 / math.log2(p + 2) for p in range(min(10, n))) for r, n in rs]
        out[f"{name}_ndcg@10"] = sum(ndcg) / len(rs)
    return out


def signed_set(n_images: int = 12, e: int = 64, seed: int = 0):
    """±1 embeddings (every cosine exact in float32 at dims 4, 16, 64: many genuine ties),
    1-4 captions per image, one caption duplicated onto another image, two equal images."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 2, (n_images, e), generator=g).float() * 2 - 1
    image[1] = image[0]  # two different images with identical embeddings
    caption_image = [i for i in range(n_images)
                     for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
    flips = torch.rand(len(caption_image), e, generator=g) < 0.3
    text = torch.where(flips, -image[caption_image], image[caption_image])
    text[-1] = text[0]  # a duplicate caption describing another image
    return text, image, caption_image


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "trec_eval"])
def test_matches_naive_reference_with_ties(ties):
    text, image, caption_image = signed_set()
    ks = [1, 5, 10]
    df = evaluate_image_caption(text, image, caption_image, dims=[4, 16, 64], ks=ks, ties=ties,
                                chunk_size=5)
    for d in (4, 16, 64):
        expected = naive_protocol(text, image, caption_image, d, ks, ties)
        got = {key: df.loc[d, key] for key in expected}
        assert got == pytest.approx(expected), (ties, d)


def test_single_caption_per_image_equals_evaluate_matryoshka():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(40, 32, generator=g)
    text = image + 1.2 * torch.randn(40, 32, generator=g)
    dims, ks = [8, 16, 32], (1, 5, 10)
    old = evaluate_matryoshka(text, image, dims=dims, ks=ks)
    new = evaluate_image_caption(text, image, list(range(40)), dims=dims, ks=ks)
    assert new[old.columns].to_numpy() == pytest.approx(old.to_numpy(), abs=1e-12)
    # Permuted pairing (caption i describes image perm[i]) = evaluate_matryoshka(labels=perm).
    perm = torch.randperm(40, generator=g)
    old = evaluate_matryoshka(text, image[perm.argsort()], dims=dims, ks=ks, labels=perm)
    new = evaluate_image_caption(text, image[perm.argsort()], perm, dims=dims, ks=ks)
    assert new[old.columns].to_numpy() == pytest.approx(old.to_numpy(), abs=1e-12)
    assert (new["chance_top1"] == 1 / 40).all()


# --------------------------------------------------------------------------- bootstrap CIs


def noisy_set(n_images: int = 40, per_image: int = 3, noise: float = 2.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n_images, 32, generator=g)
    caption_image = [i for i in range(n_images) for _ in range(per_image)]
    text = image[caption_image] + noise * torch.randn(len(caption_image), 32, generator=g)
    return text, image, caption_image


def test_ci_matches_a_naive_bootstrap_loop():
    text, image, caption_image = noisy_set()
    df = evaluate_image_caption(text, image, caption_image, dims=[8, 32], ks=(1, 5), ci=0.9,
                                n_boot=300, seed=7)
    for name, q, t, rel, seed in (
        ("q2t", text, image, torch.tensor(caption_image), 7),
        ("t2q", image, text, [[c for c, j in enumerate(caption_image) if j == i]
                              for i in range(40)], 8),
    ):
        for d in (8, 32):
            pq = per_query_metrics(q, t, ks=(1, 5, 10), relevant=rel, dim=d)
            idx = bootstrap_indices(len(pq), 300, seed)
            for m in ("top1", "top5", "mrr", "ndcg@10"):
                v = pq[m].to_numpy()
                means = [v[idx[b]].mean() for b in range(300)]  # the textbook loop
                lo, hi = np.quantile(means, [0.05, 0.95])
                assert df.loc[d, f"{name}_{m}_lo"] == pytest.approx(lo, abs=1e-12)
                assert df.loc[d, f"{name}_{m}_hi"] == pytest.approx(hi, abs=1e-12)
                # Sanity: the interval holds the point estimate.
                assert lo <= df.loc[d, f"{name}_{m}"] <= hi


def test_ci_is_deterministic_and_shrinks_like_one_over_sqrt_n():
    text, image, caption_image = noisy_set(seed=1)
    args = dict(dims=[8, 32], ks=(1, 5), ci=0.95, n_boot=2000)
    a = evaluate_image_caption(text, image, caption_image, seed=0, **args)
    assert a.equals(evaluate_image_caption(text, image, caption_image, seed=0, **args))
    b = evaluate_image_caption(text, image, caption_image, seed=1, **args)
    assert not a.equals(b)
    # Every caption four times: the text→image per-query values repeat, so the point estimates
    # stay and the interval narrows by sqrt(4) = 2.
    reps = 4
    big = evaluate_image_caption(text.repeat(reps, 1), image, caption_image * reps, **args)
    for m in ("top1", "top5", "mrr", "ndcg@10"):
        col = f"q2t_{m}"
        assert big[col].to_numpy() == pytest.approx(a[col].to_numpy())
        ratio = (big[f"{col}_hi"] - big[f"{col}_lo"]) / (a[f"{col}_hi"] - a[f"{col}_lo"])
        assert ratio.to_numpy() == pytest.approx(0.5, abs=0.1), (m, ratio.tolist())


def test_bad_inputs_raise_clear_errors():
    text, image = torch.tensor(HAND_CAPTIONS), torch.eye(3)
    with pytest.raises(ValueError, match="one integer image index per caption"):
        evaluate_image_caption(text, image, [0, 1, 2])
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        evaluate_image_caption(text, image, [0, 0, 1, 1, 2, 2, 3])
    with pytest.raises(ValueError, match="have no caption"):
        evaluate_image_caption(text, image, [0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="ties must be one of"):
        evaluate_image_caption(text, image, HAND_IMAGE, ties="random")
    for bad in (1.5, 0, True):
        with pytest.raises(ValueError, match="ci must be"):
            evaluate_image_caption(text, image, HAND_IMAGE, ci=bad)
    with pytest.raises(ValueError, match="n_boot must be"):
        evaluate_image_caption(text, image, HAND_IMAGE, ci=0.95, n_boot=0)
