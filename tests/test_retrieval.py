"""FunnelIndex against a naive float64 brute-force search (and a naive funnel)."""

import mmap

import numpy as np
import pytest
import torch

from mmlib.inference import encode_to_disk
from mmlib.retrieval import FittedEmbeddings, FunnelIndex, overlap_recall, variance_spectrum


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(corpus, queries, d, k, among=None):
    """Top k by float64 cosine at prefix d (ties: lower id), optionally among given ids per query."""
    sims = unit(np.asarray(queries, np.float64)[:, :d]) @ unit(np.asarray(corpus, np.float64)[:, :d]).T
    scores, ids = [], []
    for i, row in enumerate(sims):
        pool = np.arange(len(row)) if among is None else np.asarray(among[i])
        order = pool[np.lexsort((pool, -row[pool]))][:k]
        ids.append(order)
        scores.append(row[order])
    return np.array(scores), np.array(ids)


def naive_funnel(corpus, queries, dims, shortlists, k):
    """Each stage ranks the previous survivors by brute force (stage 0: every row)."""
    among = None
    for d, keep in zip(dims, [*shortlists, k], strict=True):
        scores, among = brute(corpus, queries, d, keep, among)
    return scores, among


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # Decaying spectrum (like MRL embeddings: early coordinates carry more), plus duplicate rows.
    corpus = (rng.standard_normal((300, 32)) * np.linspace(3, 0.3, 32)).astype(np.float32)
    corpus[[17, 101, 250]] = corpus[5]          # exact ties with row 5
    # Scaled by powers of two (exact in floating point): the same cosine as row 7, bit for bit.
    corpus[[60, 61]] = corpus[7] * np.array([[2.0], [4.0]], np.float32)
    queries = corpus[:40] + 0.4 * rng.standard_normal((40, 32)).astype(np.float32)
    queries[0] = corpus[5]                      # its top hits are four tied rows
    return corpus, queries


@pytest.mark.parametrize("first_stage,precision", [("flat", "float32"), ("hnsw", "int8"),
                                                   ("ivf", "binary")])
def test_shortlist_of_n_is_exact(data, first_stage, precision):
    corpus, queries = data
    index = FunnelIndex(corpus, dims=(8, 16, None), shortlists=(300, 300), first_stage=first_stage,
                        precision=precision)
    scores, ids = index.search(queries, k=10)
    ref_scores, ref_ids = brute(corpus, queries, 32, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
    assert list(ids[0, :4]) == [5, 17, 101, 250]  # tied rows: lower id first


def test_plain_exact_search_matches_brute_force_with_ties(data):
    corpus, queries = data
    scores, ids = FunnelIndex(torch.from_numpy(corpus), dims=(None,), shortlists=()).search(
        torch.from_numpy(queries), k=12)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    ref_scores, ref_ids = brute(corpus, queries, 32, 12)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=0, atol=1e-6)
    # Query 7's rows 7, 60, 61 tie in cosine (60 and 61 are scaled copies of 7).
    hits = ids[7, :3].tolist()
    assert hits == sorted(hits) and set(hits) == {7, 60, 61}


def test_funnel_matches_naive_funnel(data):
    corpus, queries = data
    for dims, shortlists in [((8, None), (50,)), ((4, 16, None), (120, 30)), ((16,), ())]:
        scores, ids = FunnelIndex(corpus, dims=dims, shortlists=shortlists).search(queries, k=5)
        resolved = tuple(32 if d is None else d for d in dims)
        ref_scores, ref_ids = naive_funnel(corpus, queries, resolved, shortlists, 5)
        np.testing.assert_array_equal(ids, ref_ids, err_msg=str(dims))
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("first_stage,precision", [("hnsw", "float32"), ("ivf", "float32"),
                                                   ("flat", "int8"), ("flat", "binary")])
def test_approximate_first_stages_return_exact_scores(data, first_stage, precision):
    corpus, queries = data
    index = FunnelIndex(corpus, dims=(16, None), shortlists=(150,), first_stage=first_stage,
                        precision=precision, nlist=4, nprobe=4)
    scores, ids = index.search(queries, k=10)
    # Whatever stage 0 approximated, each returned score is the exact full-width cosine, sorted.
    exact = np.take_along_axis(unit(queries.astype(np.float64)) @ unit(corpus.astype(np.float64)).T, ids, 1)
    np.testing.assert_allclose(scores, exact, rtol=0, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, brute(corpus, queries, 32, 10)[1],
                                                                  strict=True)])
    assert recall >= 0.9, recall


def owner(array):
    """The object that owns an array's memory (the end of its .base chain)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


class _RowsEncoder(torch.nn.Module):
    """Stands in for an encoder: 'text' i embeds to row i of a fixed matrix."""

    def __init__(self, rows):
        super().__init__()
        self.register_buffer("rows", torch.from_numpy(rows))
        self.embed_dim = rows.shape[1]
        self.config = type("Cfg", (), {"to_dict": staticmethod(lambda: {
            "model_path": "rows", "embed_dim": rows.shape[1], "max_length": 0, "use_lora": False,
            "lora_r": 0})})()

    def encode(self, texts=None, images=None, dim=None, callback=None, **_):
        out = self.rows[[int(t) for t in texts]]
        if callback:
            callback(len(texts))
        return out


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_encode_to_disk_folder_is_memory_mapped(tmp_path, data, fmt):
    corpus, queries = data
    folder = encode_to_disk(_RowsEncoder(corpus), texts=[str(i) for i in range(len(corpus))],
                            out_dir=tmp_path / fmt, chunk_size=70, format=fmt, show_progress=False)
    in_ram = FunnelIndex(corpus, dims=(8, None), shortlists=(60,))
    for reads in ("pread", "mmap"):
        on_disk = FunnelIndex(folder, dims=(8, None), shortlists=(60,), reads=reads)
        assert len(on_disk.rows.chunks) == 5
        assert all(isinstance(owner(a), mmap.mmap) for _, a in on_disk.rows.chunks)  # not in RAM
        for a, b in zip(on_disk.search(queries, k=7), in_ram.search(queries, k=7), strict=True):
            np.testing.assert_array_equal(a, b)


def test_cost_counts_each_stage(data):
    corpus, _ = data
    cost = FunnelIndex(corpus, dims=(8, 16, None), shortlists=(100, 20)).cost(k=10)
    assert cost["flops_per_query"] == 2 * (300 * 8 + 100 * 16 + 20 * 32)
    assert cost["bytes_per_query"] == 300 * 8 * 4 + 100 * 32 * 4
    assert cost["index_bytes"] == 300 * 8 * 4
    assert FunnelIndex(corpus, dims=(16, None), precision="binary").memory_bytes() == 300 * 2


@pytest.mark.parametrize("kwargs,match", [
    ({"dims": (16, 8)}, "strictly ascending"),
    ({"dims": (32, None)}, "strictly ascending"),
    ({"dims": (None, 8)}, "strictly ascending"),
    ({"dims": (8, 64)}, r"in \[1, 32\]"),
    ({"dims": ()}, "non-empty"),
    ({"dims": (8, None), "shortlists": ()}, "one entry per stage"),
    ({"dims": (4, 8, None), "shortlists": (10, 20)}, "must not increase"),
    ({"shortlists": (0,), "dims": (8, None)}, "positive int"),
    ({"first_stage": "annoy"}, "first_stage"),
    ({"precision": "fp16"}, "precision"),
    ({"dims": (12, None), "precision": "binary"}, "multiple of 8"),
])
def test_bad_index_arguments(data, kwargs, match):
    kwargs = {"dims": (8, None), "shortlists": (50,), **kwargs}
    with pytest.raises(ValueError, match=match):
        FunnelIndex(data[0], **kwargs)


def test_bad_corpus(data):
    with pytest.raises(ValueError, match="empty"):
        FunnelIndex(np.zeros((0, 32), np.float32))
    bad = data[0].copy()
    bad[42, 3] = np.nan
    with pytest.raises(ValueError, match="row 42 is not finite"):
        FunnelIndex(bad, dims=(8, None), shortlists=(10,))
    with pytest.raises(FileNotFoundError, match="index.json"):
        FunnelIndex("/nonexistent/folder")


def test_bad_queries(data):
    corpus, queries = data
    index = FunnelIndex(corpus, dims=(8, None), shortlists=(20,))
    with pytest.raises(ValueError, match="width 16 but the index holds width 32"):
        index.search(queries[:, :16])
    with pytest.raises(ValueError, match="must each be >= k=30"):
        index.search(queries, k=30)
    with pytest.raises(ValueError, match="exceeds the 300 indexed rows"):
        FunnelIndex(corpus, dims=(None,), shortlists=()).search(queries, k=301)
    nan = queries.copy()
    nan[3, 0] = np.nan
    with pytest.raises(ValueError, match="queries row 3 is not finite"):
        index.search(nan)
    zero = queries.copy()
    zero[5, :8] = 0
    with pytest.raises(ValueError, match="queries row 5 is all zeros at width 8"):
        index.search(zero)
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search(queries, k=0)


def test_query_batches_do_not_change_results(data):
    corpus, queries = data
    index = FunnelIndex(corpus, dims=(8, None), shortlists=(50,))
    ref_scores, ref_ids = naive_funnel(corpus, queries, (8, 32), (50,), 5)
    for batch_size in (1, 7, 16, 40, 1000):  # uneven last batches included
        scores, ids = index.search(queries, k=5, batch_size=batch_size)
        np.testing.assert_array_equal(ids, ref_ids, err_msg=f"batch_size={batch_size}")
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)


def test_variance_spectrum_and_overlap_recall_by_hand():
    x = np.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [1.0, -2.0, 2.0], [-1.0, 2.0, -2.0]])
    # per-coordinate variances 1, 4, 2 (of 7)
    np.testing.assert_allclose(variance_spectrum(x, [1, 2, 3]), [1 / 7, 5 / 7, 1.0])
    assert overlap_recall([[1, 2, 3], [4, 5, 6]], [[3, 2, 9], [7, 8, 9]]) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError, match="must both be"):
        overlap_recall([[1, 2]], [[1, 2, 3]])


def test_fitted_embeddings_match_moments_and_query_cosine():
    rng = np.random.default_rng(1)
    scale = np.linspace(2, 0.2, 16)
    images = unit(rng.standard_normal((800, 16)) * scale + 0.3)
    pairs = np.repeat(np.arange(800), 2)
    texts = unit(images[pairs] + 0.3 * rng.standard_normal((1600, 16)) * scale)
    fit = FittedEmbeddings(images, texts, pairs)
    samples = fit.corpus(np.random.default_rng(0), 20000)
    assert samples.dtype == np.float32 and np.allclose(np.linalg.norm(samples, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(variance_spectrum(samples, [2, 4, 8]), variance_spectrum(images, [2, 4, 8]),
                               atol=0.05)  # Gaussian vs the normalised real rows
    queries = fit.queries(np.random.default_rng(5), samples[:4000].astype(np.float64))
    real = np.mean(np.sum(texts * images[pairs], axis=1))
    assert np.mean(np.sum(queries * samples[:4000], axis=1)) == pytest.approx(real, abs=0.01)
