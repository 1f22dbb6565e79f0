"""Tests for mmlib.plots: each function returns an Axes with the expected artists."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from torch import nn  # noqa: E402

from mmlib.gradient_flow import gradient_flow  # noqa: E402
from mmlib.metrics import evaluate_matryoshka, retrieval_cost_table  # noqa: E402
from mmlib.plots import (  # noqa: E402
    plot_accuracy_vs_dim,
    plot_cost_vs_accuracy,
    plot_gradient_flow,
    plot_gradient_flow_over_steps,
    plot_per_dim_loss,
    plot_similarity_heatmap,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _grad_df() -> pd.DataFrame:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[2].weight.grad = torch.zeros(4, 4)
    model[3].weight.grad = torch.full((2, 4), 1e4)
    model[3].bias.grad = torch.ones(2)
    return gradient_flow(model)


@pytest.mark.parametrize("log", [True, False])
def test_plot_gradient_flow_bars_and_colours(log):
    ax = plot_gradient_flow(_grad_df(), log=log, vanishing=1e-7, exploding=1e3)
    assert isinstance(ax, Axes)
    bars = ax.patches
    assert len(bars) == 3  # layers "0" (frozen), "2" (vanishing), "3" (exploding)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "3"]
    assert bars[0].get_facecolor() == to_rgba("0.8")
    assert bars[1].get_facecolor() == to_rgba("tab:orange")
    assert bars[2].get_facecolor() == to_rgba("tab:red")
    assert all(b.get_height() > 0 for b in bars)  # frozen / zero still visible
    assert ax.get_yscale() == ("log" if log else "linear")
    assert len(ax.lines) == 2  # the two threshold lines
    assert ax.get_legend() is not None


def test_plot_gradient_flow_on_given_axes_accepts_summary():
    from mmlib.gradient_flow import summarize_gradient_flow

    fig, ax = plt.subplots()
    out = plot_gradient_flow(summarize_gradient_flow(_grad_df()), ax=ax)
    assert out is ax and len(ax.patches) == 3


def _lora_like(b_value: float) -> nn.Module:
    """A layer with peft-style LoRA parameter names: base (frozen), lora_A, lora_B."""
    layer = nn.Module()
    layer.base = nn.Linear(3, 3)
    layer.base.requires_grad_(False)
    layer.lora_A = nn.ModuleDict({"default": nn.Linear(3, 2, bias=False)})
    layer.lora_B = nn.ModuleDict({"default": nn.Linear(2, 3, bias=False)})
    nn.init.constant_(layer.lora_B["default"].weight, b_value)
    layer.lora_A["default"].weight.grad = torch.zeros(2, 3)  # exactly 0, as while B = 0
    layer.lora_B["default"].weight.grad = torch.ones(3, 2)
    return nn.ModuleDict({"layers": nn.ModuleList([layer])})


def test_plot_gradient_flow_shows_lora_a_and_b_apart_with_the_zero_labelled():
    ax = plot_gradient_flow(gradient_flow(_lora_like(0.0)), vanishing=1e-7)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["layers.0", "layers.0.lora_A", "layers.0.lora_B"]
    colours = [b.get_facecolor() for b in ax.patches]
    assert colours == [to_rgba("0.8"), to_rgba("tab:green"), to_rgba("tab:blue")]
    assert "0 by design" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    # the same zero with B != 0 is a real vanishing gradient
    ax2 = plot_gradient_flow(gradient_flow(_lora_like(0.5)), vanishing=1e-7)
    assert ax2.patches[1].get_facecolor() == to_rgba("tab:orange")


def test_plot_gradient_flow_over_steps_one_line_per_trainable_layer():
    flows = []
    model = _lora_like(0.0)
    for step in range(3):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, float(step))
        flows.append(gradient_flow(model))
    ax = plot_gradient_flow_over_steps(flows)
    assert [line.get_label() for line in ax.lines] == ["layers.0.lora_A", "layers.0.lora_B"]
    # step 1's zero norms are left out of the log axis (NaN), steps 2-3 drawn
    y = ax.lines[1].get_ydata()
    assert pd.isna(y[0]) and list(y[1:]) == pytest.approx([1.0 * 6**0.5, 2.0 * 6**0.5])
    with pytest.raises(ValueError, match="not in the history"):
        plot_gradient_flow_over_steps(flows, layers=["nope"])


def _results():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(40, 32, generator=g)
    t = q + torch.randn(40, 32, generator=g)
    mrl = evaluate_matryoshka(q, t, dims=(8, 16, None), ks=(1, 5))
    base = evaluate_matryoshka(q, torch.randn(40, 32, generator=g), dims=(8, 16, None), ks=(1, 5))
    return {"MRL": mrl, "full-dim only": base}


def test_plot_accuracy_vs_dim_lines_and_ticks():
    res = _results()
    ax = plot_accuracy_vs_dim(res, metric="q2t_top5", chance=5 / 40)
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 3  # two models + chance
    assert ax.lines[-1].get_linestyle() == "--"
    assert list(ax.get_xticks()) == [8, 16, 32]
    assert ax.get_xscale() == "log"
    assert list(ax.lines[0].get_ydata()) == list(res["MRL"]["q2t_top5"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "MRL",
        "full-dim only",
        "chance",
    ]
    ax2 = plot_accuracy_vs_dim(res["MRL"])
    assert len(ax2.lines) == 1
    with pytest.raises(ValueError, match="no column"):
        plot_accuracy_vs_dim(res, metric="nope")


def test_plot_per_dim_loss_bars():
    details = {64: 2.5, 128: 2.0, 256: 1.5}
    ax = plot_per_dim_loss(details)
    assert [b.get_height() for b in ax.patches] == [2.5, 2.0, 1.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "128", "256"]
    ax = plot_per_dim_loss({8: 1.0, None: 0.5})  # None = full width
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "full"]
    df = pd.DataFrame({"loss": [1.0, 0.5]}, index=pd.Index([8, None], name="dim"))
    ax = plot_per_dim_loss(df)
    assert len(ax.patches) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "full"]


def test_plot_similarity_heatmap_annotated():
    sim = torch.tensor([[0.9, 0.1, -0.2], [0.0, 0.75, 0.3]])
    ax = plot_similarity_heatmap(sim, ["q0", "q1"], ["a", "b", "c"])
    assert len(ax.images) == 1
    assert len(ax.texts) == 6
    assert ax.texts[0].get_text() == "0.90" and ax.texts[4].get_text() == "0.75"
    with pytest.raises(ValueError, match="labels"):
        plot_similarity_heatmap(sim, ["q0"], ["a", "b", "c"])


def test_plot_cost_vs_accuracy_lines():
    res = _results()
    ax = plot_cost_vs_accuracy(res)
    assert len(ax.lines) == 2
    assert list(ax.lines[0].get_xdata()) == [32, 64, 128]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "64", "128"]
    assert len(ax.texts) == 6  # one dim label per point
    cost = retrieval_cost_table([8, 16, 32], n_corpus=40)
    assert list(cost["bytes_fp32"]) == [32, 64, 128]


def test_plot_accuracy_vs_dim_draws_ci_bands():
    from mmlib.evaluation import evaluate_image_caption

    g = torch.Generator().manual_seed(0)
    image = torch.randn(30, 32, generator=g)
    caption_image = [i for i in range(30) for _ in range(2)]
    text = image[caption_image] + 1.5 * torch.randn(60, 32, generator=g)
    with_ci = evaluate_image_caption(text, image, caption_image, dims=(8, 16, None), ks=(1, 5),
                                     ci=0.95, n_boot=200)
    res = {"MRL": with_ci, "no CI": _results()["MRL"]}
    ax = plot_accuracy_vs_dim(res, metric="q2t_top5")
    assert len(ax.lines) == 2
    assert len(ax.collections) == 1  # one band: only the frame with _lo/_hi columns
    band = ax.collections[0]
    # The band spans lo..hi at each dim, in the colour of its line.
    verts = band.get_paths()[0].vertices
    for d in (8, 16, 32):
        ys = verts[verts[:, 0] == d, 1]
        assert min(ys) == pytest.approx(with_ci.loc[d, "q2t_top5_lo"])
        assert max(ys) == pytest.approx(with_ci.loc[d, "q2t_top5_hi"])
    assert to_rgba(band.get_facecolor()[0])[:3] == to_rgba(ax.lines[0].get_color())[:3]
