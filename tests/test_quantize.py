"""mmlib.quantize: codes equal sentence-transformers' quantize_embeddings; scorers and the
dim x precision evaluation agree with naive references."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from mmlib.quantize import (  # noqa: E402
    bytes_per_vector,
    evaluate_quantized,
    quantization_ranges,
    quantize,
    similarity,
    unpack_binary,
)

st_quant = pytest.importorskip("sentence_transformers.util.quantization")


def _emb(n=40, d=21, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("d", [21, 64])
def test_codes_equal_sentence_transformers(d):
    emb, cal = _emb(d=d), _emb(n=200, d=d, seed=1)
    ranges = quantization_ranges(cal)
    ours = quantize(emb, "int8", ranges).numpy()
    theirs = st_quant.quantize_embeddings(emb.numpy(), "int8", calibration_embeddings=cal.numpy())
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(quantize(emb, "int8").numpy(),
                                  st_quant.quantize_embeddings(emb.numpy(), "int8"))
    np.testing.assert_array_equal(quantize(emb, "binary").numpy(),
                                  st_quant.quantize_embeddings(emb.numpy(), "binary"))
    assert ours.dtype == np.int8 and ours.shape == (40, d)
    assert quantize(emb, "binary").shape == (40, -(-d // 8)) == (40, bytes_per_vector(d, "binary"))


def test_scores_by_hand():
    q = torch.tensor([[1.0, -2.0, 0.5]])
    t = torch.tensor([[0.5, 1.0, -1.0], [3.0, -1.0, 2.0]])
    codes_q, codes_t = quantize(q, "binary"), quantize(t, "binary")
    # signs q: + - +, t0: + + - (2 differ), t1: + - + (0 differ); score = 3 - 2 * hamming
    assert similarity(codes_q, codes_t, "binary", dim=3).tolist() == [[-1.0, 3.0]]
    assert unpack_binary(codes_t, 3).tolist() == [[1, 1, -1], [1, -1, 1]]
    ranges = torch.tensor([[-3.0, -3.0, -3.0], [3.0, 3.0, 3.0]])
    iq, it = quantize(q, "int8", ranges), quantize(t, "int8", ranges)
    expected = iq.long() @ it.long().T  # exact integer dot products
    assert similarity(iq, it, "int8").long().tolist() == expected.tolist()
    # by hand: step 6/255; q0 = floor(4 / step) - 128 = floor(170) - 128 = 42
    assert int(iq[0, 0]) == 42
    with pytest.raises(ValueError, match="precision must be one of"):
        quantize(q, "int4")
    with pytest.raises(ValueError, match="at least 2 calibration"):
        quantize(q, "int8")
    with pytest.raises(ValueError, match=r"ranges must be \(2, 3\)"):
        quantize(q, "int8", torch.zeros(2, 4))


class _Set:
    """Twelve captions of six random images (two captions each)."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
                       for _ in range(6)]
        colors = ["red", "blue", "green", "yellow", "white", "black"]
        self.texts = [f"a {c} {s}" for c in colors for s in ("circle", "square")]
        self.image_ids = [str(i // 2) for i in range(12)]

    def image_for(self, i):
        return self.images[i // 2]


class _FixedEncoder:
    """Duck-typed encoder: captions are their image's random embedding plus noise."""

    def __init__(self, width=64):
        g = torch.Generator().manual_seed(0)
        self.image = torch.randn(6, width, generator=g)
        self.text = self.image.repeat_interleave(2, 0) + 1.2 * torch.randn(12, width, generator=g)
        self.config = None

    def encode_texts(self, texts, **kwargs):
        assert len(texts) == 12 and not kwargs.get("prompt_name")
        return self.text

    def encode_images(self, images, **kwargs):
        assert len(images) == 6
        return self.image


def test_evaluate_quantized_matches_naive_scoring():
    data, enc = _Set(), _FixedEncoder()
    df = evaluate_quantized(enc, data, dims=[16, None], ks=(1,))
    assert list(df.index) == [(d, p) for d in (16, 64) for p in ("float32", "int8", "binary")]
    assert df.loc[(16, "int8"), "bytes"] == 16 and df.loc[(16, "binary"), "bytes"] == 2
    assert df.loc[(64, "float32"), "bytes"] == 256
    text, image = enc.text, enc.image
    owner = torch.arange(12) // 2
    for d in (16, 64):
        t, i = F.normalize(text[:, :d], dim=-1), F.normalize(image[:, :d], dim=-1)
        ranges = quantization_ranges(F.normalize(torch.cat([text, image])[:, :d], dim=-1))
        for p in ("float32", "int8", "binary"):
            scores = similarity(quantize(t, p, ranges), quantize(i, p, ranges), p, dim=d)
            scores = scores.double()
            # text -> image: the own image must score strictly above every other image
            own = scores[torch.arange(12), owner]
            others = scores.masked_fill(F.one_hot(owner, 6).bool(), -np.inf).max(1).values
            q2t = float((own > others).double().mean())
            # image -> text: any own caption strictly above every other caption
            s = scores.T  # (6, 12)
            mine = F.one_hot(owner, 6).T.bool()
            best_own = s.masked_fill(~mine, -np.inf).max(1).values
            best_other = s.masked_fill(mine, -np.inf).max(1).values
            t2q = float((best_own > best_other).double().mean())
            assert df.loc[(d, p), "q2t_top1"] == pytest.approx(q2t), (d, p)
            assert df.loc[(d, p), "t2q_top1"] == pytest.approx(t2q), (d, p)
    # Quantization costs accuracy somewhere, yet stays far above chance (1/6).
    assert (df["q2t_top1"] > 1 / 3).all()
    assert df.loc[(16, "binary"), "q2t_top1"] < df.loc[(64, "float32"), "q2t_top1"]


def test_evaluate_quantized_calibration_and_errors(tiny_encoder):
    data = _Set()
    far = torch.full((2, 2048), 0.0)
    far[0], far[1] = -1.0, 1.0  # ranges much wider than the data: coarser int8 buckets
    df = evaluate_quantized(tiny_encoder, data, dims=[2048], precisions=("int8",), ks=(1,),
                            calibration=far, ci=0.9, n_boot=50)
    assert {"q2t_top1_lo", "q2t_top1_hi"} <= set(df.columns)
    with pytest.raises(ValueError, match="calibration has width 8"):
        evaluate_quantized(tiny_encoder, data, dims=[16], calibration=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="precision must be one of"):
        evaluate_quantized(tiny_encoder, data, precisions=("fp8",))


def test_plot_accuracy_vs_bytes():
    rows = [(d, p, b, a) for d, scale in ((64, 1), (256, 4)) for p, b, a in (
        ("float32", 4 * d, 0.5 * scale / 4), ("int8", d, 0.45 * scale / 4),
        ("binary", d // 8, 0.3 * scale / 4))]
    df = pd.DataFrame(rows, columns=["dim", "precision", "bytes", "q2t_top1"]).set_index(
        ["dim", "precision"])
    ax = plt.figure().gca()
    from mmlib.plots import plot_accuracy_vs_bytes

    assert plot_accuracy_vs_bytes(df, ax=ax) is ax
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"float32", "int8", "binary"}
    np.testing.assert_array_equal(lines["binary"].get_xdata(), [8, 32])
    np.testing.assert_allclose(lines["int8"].get_ydata(), [0.1125, 0.45])
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.texts][:2] == ["64", "256"]
    with pytest.raises(ValueError, match="no column 'q2t_top5'"):
        plot_accuracy_vs_bytes(df, metric="q2t_top5")
    plt.close("all")
