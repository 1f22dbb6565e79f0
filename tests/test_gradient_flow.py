"""Tests for mmlib.gradient_flow: hand-set gradients, a real backward, LoRA's zero-initialised B."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmlib.gradient_flow import (
    gradient_flow,
    gradient_flow_history,
    layer_name,
    summarize_gradient_flow,
)


def _model_with_hand_grads() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[2].weight.grad = torch.zeros(4, 4)  # trainable, zero gradient
    model[2].bias.grad = None  # trainable, never reached by backward
    model[3].weight.grad = torch.full((2, 4), 1e4)  # huge
    model[3].bias.grad = torch.tensor([0.3, -0.4])
    return model


def test_gradient_flow_flags():
    model = _model_with_hand_grads()
    df = gradient_flow(model)
    assert list(df["name"]) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "3.weight",
        "3.bias",
    ]
    assert list(df["layer"]) == ["0", "0", "2", "2", "3", "3"]
    assert list(df["numel"]) == [16, 4, 16, 4, 8, 2]
    assert list(df["frozen"]) == [True, True, False, False, False, False]
    assert list(df["vanishing"]) == [False, False, True, True, False, False]
    assert list(df["exploding"]) == [False, False, False, False, True, False]
    assert df["grad_norm"].iloc[:2].isna().all()
    assert list(df["grad_norm"].iloc[2:4]) == [0.0, 0.0]
    w3 = df.set_index("name").loc["3.weight"]
    assert w3["grad_norm"] == pytest.approx(1e4 * math.sqrt(8))
    assert w3["grad_max_abs"] == pytest.approx(1e4) and w3["grad_mean_abs"] == pytest.approx(1e4)
    assert w3["grad_to_weight"] == pytest.approx(1e4 * math.sqrt(8) / model[3].weight.norm().item())
    b3 = df.set_index("name").loc["3.bias"]
    assert b3["grad_norm"] == pytest.approx(0.5)
    assert b3["grad_max_abs"] == pytest.approx(0.4) and b3["grad_mean_abs"] == pytest.approx(0.35)

    summary = summarize_gradient_flow(df)
    assert list(summary.index) == ["0", "2", "3"]
    assert list(summary["frozen"]) == [True, False, False]
    assert list(summary["vanishing"]) == [False, True, False]
    assert list(summary["exploding"]) == [False, False, True]
    assert math.isnan(summary.loc["0", "grad_norm"])
    assert summary.loc["3", "grad_norm"] == pytest.approx(math.sqrt(8e8 + 0.25))


def test_gradient_flow_nonfinite_and_thresholds():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].weight.grad = torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])
    model[0].bias.grad = torch.tensor([1e-3, 0.0])
    df = gradient_flow(model, vanishing=1e-2, exploding=10.0)
    assert list(df["exploding"]) == [True, False]
    assert list(df["vanishing"]) == [False, True]


def test_gradient_flow_after_real_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    model(torch.randn(5, 8)).pow(2).mean().backward()
    df = gradient_flow(model)
    assert not df["vanishing"].any() and not df["exploding"].any()
    assert (df["grad_norm"] > 0).all() and (df["weight_norm"] > 0).all()


def test_layer_name_grouping():
    name = "backbone.model.language_model.layers.3.mlp.up_proj.weight"
    assert layer_name(name) == "backbone.model.language_model.layers.3"
    assert layer_name("backbone.model.visual.patch_embed.proj.weight") == (
        "backbone.model.visual.patch_embed"
    )
    assert layer_name("projection.0.weight") == "projection.0"
    assert layer_name("logit_scale") == "logit_scale"
    lora = "backbone.base_model.model.language_model.layers.1.self_attn.q_proj.lora_B.default.weight"
    assert layer_name(lora) == "backbone.base_model.model.language_model.layers.1.lora_B"


# --------------------------------------------------------------------------- LoRA
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 2)])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))


def _lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))


def _step(model, opt=None):
    model.zero_grad(set_to_none=True)
    model(torch.randn(8, 6, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
    flow = gradient_flow(model)
    if opt is not None:
        opt.step()
    return flow


def test_lora_a_zero_at_init_is_expected_not_vanishing():
    """At initialisation B = 0, so A's gradient is exactly 0 by construction: not a vanishing
    gradient. A and B are separate layer groups, so B's healthy gradient stays visible."""
    model = _lora_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    first = _step(model, opt)
    a = first[first["name"].str.contains("lora_A")]
    b = first[first["name"].str.contains("lora_B")]
    assert (a["grad_norm"] == 0).all() and (b["grad_norm"] > 0).all()
    assert a["zero_at_init"].all() and not a["vanishing"].any()
    assert not b["zero_at_init"].any() and not b["vanishing"].any()
    summary = summarize_gradient_flow(first)
    a_layer, b_layer = a["layer"].iloc[0], b["layer"].iloc[0]
    assert a_layer.endswith(".lora_A") and b_layer.endswith(".lora_B")
    assert summary.loc[a_layer, "zero_at_init"] and not summary.loc[a_layer, "vanishing"]
    assert summary.loc[b_layer, "grad_norm"] == pytest.approx(math.sqrt((b["grad_norm"] ** 2).sum()))
    assert not summary["vanishing"].any()
    # after one step B != 0 and A receives a gradient
    second = _step(model)
    assert (second.loc[second["name"].str.contains("lora_A"), "grad_norm"] > 0).all()
    assert not second["zero_at_init"].any()


def test_a_zero_lora_a_gradient_with_nonzero_b_is_still_vanishing():
    model = _lora_model()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
        if "lora_A" in name:
            p.grad = torch.zeros_like(p)
    flow = gradient_flow(model)
    a = flow[flow["name"].str.contains("lora_A")]
    assert a["vanishing"].all() and not a["zero_at_init"].any()


# --------------------------------------------------------------------------- over steps
def test_gradient_flow_history_is_the_per_layer_norm_per_step():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    flows = []
    for scale in (1.0, 2.0, 0.5):
        model[1].weight.grad = torch.full((1, 3), scale)  # norm: scale * sqrt(3)
        model[1].bias.grad = torch.full((1,), scale)      # with the bias: scale * 2
        flows.append(gradient_flow(model))
    history = gradient_flow_history(flows)
    assert list(history.index) == [1, 2, 3] and history.index.name == "step"
    assert list(history.columns) == ["1"]  # the frozen layer "0" is left out
    assert history["1"].tolist() == pytest.approx([2.0, 4.0, 1.0])
    with pytest.raises(ValueError, match="flows is empty"):
        gradient_flow_history([])


def test_metrics_still_exports_gradient_flow():
    from mmlib import metrics

    assert metrics.gradient_flow is gradient_flow
    assert metrics.summarize_gradient_flow is summarize_gradient_flow
    assert metrics.layer_name is layer_name
