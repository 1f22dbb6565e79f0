"""Gradient-flow diagnostics: which parameters a loss reaches, and how hard, step by step.

    loss.backward()
    flow = gradient_flow(model)                  # one row per parameter tensor, with flags
    summarize_gradient_flow(flow)                # one row per layer
    gradient_flow_history([flow_1, flow_2, ...]) # per-layer gradient norm per step

Flags: *vanishing* (a trainable tensor's gradient norm below ``vanishing``, or no gradient at
all) and *exploding* (above ``exploding`` or non-finite). One case is zero by design and is not
flagged: LoRA initialises ``B = 0`` so that training starts at the base model, and the gradient
of ``A`` in ``W x + (alpha/r) B A x`` is ``(alpha/r) Bᵀ (dL/dy) xᵀ = 0`` while ``B = 0``.
Such an ``A`` gets ``zero_at_init=True`` instead; after the first optimizer step ``B != 0`` and
``A`` learns. LoRA ``A`` and ``B`` form separate layer groups (``….lora_A`` / ``….lora_B``),
so the figure shows them apart instead of OR-ing their flags.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pandas as pd
from torch import nn

__all__ = ["gradient_flow", "gradient_flow_history", "layer_name", "summarize_gradient_flow"]

_LORA_PART = re.compile(r"\.(lora_[AB])\.")
COLUMNS = ["name", "layer", "numel", "frozen", "grad_norm", "grad_mean_abs", "grad_max_abs",
           "weight_norm", "grad_to_weight", "vanishing", "exploding", "zero_at_init"]


def layer_name(param_name: str, depth: int = 4) -> str:
    """Coarse group of a parameter: its module path up to the first numeric part, or ``depth``
    parts; LoRA ``A`` and ``B`` matrices get their own groups (``<layer>.lora_A``/``.lora_B``)."""
    lora = _LORA_PART.search(param_name)
    suffix = f".{lora.group(1)}" if lora else ""
    parts = param_name.split(".")[:-1]  # drop "weight"/"bias"
    if not parts:
        return param_name  # a parameter registered on the root module
    for i, p in enumerate(parts):
        if p.isdigit():
            # Stop at the first block index so "...layers.3.mlp.up_proj" groups into layer 3.
            return ".".join(parts[: i + 1]) + suffix
    return ".".join(parts[:depth]) + suffix


def _zero_b(name: str, params: dict[str, nn.Parameter]) -> bool:
    """True when `name` is a LoRA A matrix whose B partner is all zeros (LoRA's initialisation)."""
    if ".lora_A." not in name:
        return False
    partner = params.get(name.replace(".lora_A.", ".lora_B."))
    return partner is not None and not bool(partner.detach().any())


def gradient_flow(
    model: nn.Module, vanishing: float = 1e-7, exploding: float = 1e3, layer_depth: int = 4
) -> pd.DataFrame:
    """Per-parameter gradient statistics after ``backward()``, with vanishing/exploding flags.

    Frozen parameters (``requires_grad=False``) get NaN gradient statistics and are never
    flagged. A trainable parameter whose ``.grad`` is None counts as a zero gradient (it
    received no signal) and is flagged vanishing, except a LoRA ``A`` whose ``B`` is still
    zero: its gradient is exactly zero by construction (``zero_at_init``, not vanishing).
    ``grad_to_weight`` is NaN when the weight norm is 0.
    """
    params = dict(model.named_parameters())
    rows = []
    for name, p in params.items():
        frozen = not p.requires_grad
        weight_norm = p.detach().float().norm().item()
        if frozen:
            g_norm = g_mean = g_max = math.nan
        elif p.grad is None:
            g_norm = g_mean = g_max = 0.0
        else:
            g = p.grad.detach().float()
            g_norm = g.norm().item()
            g_mean = g.abs().mean().item() if g.numel() else 0.0
            g_max = g.abs().max().item() if g.numel() else 0.0
        by_design = (not frozen) and g_norm == 0.0 and _zero_b(name, params)
        rows.append({
            "name": name,
            "layer": layer_name(name, layer_depth),
            "numel": p.numel(),
            "frozen": frozen,
            "grad_norm": g_norm,
            "grad_mean_abs": g_mean,
            "grad_max_abs": g_max,
            "weight_norm": weight_norm,
            "grad_to_weight": g_norm / weight_norm if weight_norm > 0 else math.nan,
            "vanishing": (not frozen) and not by_design and g_norm < vanishing,
            "exploding": (not frozen) and (not math.isfinite(g_norm) or g_norm > exploding),
            "zero_at_init": by_design,
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def summarize_gradient_flow(df: pd.DataFrame) -> pd.DataFrame:
    """Per-layer view of :func:`gradient_flow`: L2 norms combined, flags OR-ed, module order
    kept; ``zero_at_init`` when every trainable tensor of the layer is zero by design."""
    out = []
    for layer, g in df.groupby("layer", sort=False):
        trainable = g[~g["frozen"]]
        grad_norm = math.sqrt((trainable["grad_norm"] ** 2).sum()) if len(trainable) else math.nan
        weight_norm = math.sqrt((g["weight_norm"] ** 2).sum())
        by_design = trainable["zero_at_init"] if "zero_at_init" in g else pd.Series(False, g.index)
        out.append({
            "layer": layer,
            "n_tensors": len(g),
            "numel": int(g["numel"].sum()),
            "trainable_numel": int(trainable["numel"].sum()),
            "frozen": bool(g["frozen"].all()),
            "grad_norm": grad_norm,
            "weight_norm": weight_norm,
            "grad_to_weight": grad_norm / weight_norm if weight_norm > 0 else math.nan,
            "vanishing": bool(g["vanishing"].any()),
            "exploding": bool(g["exploding"].any()),
            "zero_at_init": bool(len(trainable)) and bool(by_design.all()),
        })
    return pd.DataFrame(out).set_index("layer")


def gradient_flow_history(flows: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per-layer gradient norm at each step: rows = step (1-based), columns = layers (frozen
    layers dropped), from one :func:`gradient_flow` table per step."""
    if not flows:
        raise ValueError("flows is empty: pass one gradient_flow(model) table per step")
    steps = {}
    for step, flow in enumerate(flows, start=1):
        summary = summarize_gradient_flow(flow)
        steps[step] = summary.loc[~summary["frozen"], "grad_norm"]
    history = pd.DataFrame(steps).T
    history.index.name = "step"
    return history
