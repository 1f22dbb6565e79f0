"""Matplotlib figures for the notebooks: gradient flow, accuracy vs dim, losses, similarities.

Every function takes data and an optional ``ax``, draws with the object API (safe under the
Agg backend), returns the Axes and never calls ``plt.show``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from mmlib.gradient_flow import gradient_flow_history, summarize_gradient_flow

__all__ = [
    "plot_gradient_flow",
    "plot_gradient_flow_over_steps",
    "plot_accuracy_vs_dim",
    "plot_per_dim_loss",
    "plot_similarity_heatmap",
    "plot_cost_vs_accuracy",
    "plot_training_curves",
    "plot_accuracy_vs_bytes",
    "plot_mrope_positions",
    "plot_pooling_shares",
]

_COLORS = {"ok": "tab:blue", "vanishing": "tab:orange", "exploding": "tab:red", "frozen": "0.8",
           "zero_at_init": "tab:green"}


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _as_results(results: Mapping[str, pd.DataFrame] | pd.DataFrame) -> dict[str, pd.DataFrame]:
    if isinstance(results, pd.DataFrame):
        return {"": results}
    if not results:
        raise ValueError("results is empty; pass a DataFrame or {model name: DataFrame}")
    return dict(results)


def _column(df: pd.DataFrame, metric: str, name: str) -> pd.Series:
    if metric not in df.columns:
        raise ValueError(f"{name}: no column {metric!r}; available: {list(df.columns)}")
    return df[metric]


def plot_gradient_flow(
    df: pd.DataFrame,
    ax: Axes | None = None,
    log: bool = True,
    vanishing: float | None = None,
    exploding: float | None = None,
) -> Axes:
    """Bar of gradient L2 norm per layer: frozen grey, vanishing orange, exploding red, and
    green for a gradient that is zero by design (LoRA's A while B = 0 at initialisation).

    ``df`` is :func:`mmlib.gradient_flow.gradient_flow` output (grouped per layer here) or its
    :func:`~mmlib.gradient_flow.summarize_gradient_flow`. Bars with no finite positive height
    (frozen, zero or non-finite gradient) are drawn at the bottom/top of the axis so that every
    layer keeps a visible bar. ``vanishing``/``exploding`` draw the thresholds as dashed lines.
    """
    summary = summarize_gradient_flow(df) if "name" in df.columns else df
    if len(summary) == 0:
        raise ValueError("df is empty; run gradient_flow(model) after loss.backward()")
    norms = summary["grad_norm"].to_numpy(dtype=float)
    finite_pos = norms[np.isfinite(norms) & (norms > 0)]
    low_candidates = list(finite_pos) + ([vanishing] if vanishing else [])
    high_candidates = list(finite_pos) + ([exploding] if exploding else [])
    # Placeholder heights: log axes cannot show 0/NaN and inf has no height at all.
    floor = (min(low_candidates) / 10) if low_candidates else 1e-12
    ceil = (max(high_candidates) * 10) if high_candidates else 1.0
    if not log:
        # Linear axis: a small stub keeps frozen / zero-gradient layers visible.
        floor = 0.02 * (max(finite_pos) if finite_pos.size else 1.0)
        ceil = (max(finite_pos) * 1.5) if finite_pos.size else 1.0
    heights, colors = [], []
    for (_, row), g in zip(summary.iterrows(), norms, strict=True):
        if row["frozen"]:
            kind = "frozen"
        elif row["exploding"]:
            kind = "exploding"
        elif row["vanishing"]:
            kind = "vanishing"
        elif row.get("zero_at_init", False):
            kind = "zero_at_init"
        else:
            kind = "ok"
        if math.isnan(g) or g <= 0:
            g = floor if kind != "exploding" else ceil
        elif math.isinf(g):
            g = ceil
        heights.append(g)
        colors.append(_COLORS[kind])
    ax = _axes(ax, (max(6.0, 0.35 * len(summary)), 4.0))
    x = np.arange(len(summary))
    ax.bar(x, heights, color=colors, edgecolor="0.3", linewidth=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in summary.index], rotation=90, fontsize=7)
    if log:
        ax.set_yscale("log")
    if vanishing is not None:
        ax.axhline(vanishing, color=_COLORS["vanishing"], linestyle="--", linewidth=1)
    if exploding is not None:
        ax.axhline(exploding, color=_COLORS["exploding"], linestyle="--", linewidth=1)
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("Gradient flow per layer")
    ax.legend(
        handles=[
            Patch(color=_COLORS["ok"], label="trainable"),
            Patch(color=_COLORS["vanishing"], label="vanishing"),
            Patch(color=_COLORS["exploding"], label="exploding"),
            Patch(color=_COLORS["frozen"], label="frozen"),
            Patch(color=_COLORS["zero_at_init"], label="0 by design (LoRA A while B = 0)"),
        ],
        fontsize=8,
    )
    return ax


def plot_gradient_flow_over_steps(
    flows: Sequence[pd.DataFrame] | pd.DataFrame,
    ax: Axes | None = None,
    layers: Sequence[str] | None = None,
    log: bool = True,
) -> Axes:
    """Per-layer gradient L2 norm vs training step, one line per (trainable) layer.

    ``flows`` is one :func:`mmlib.gradient_flow.gradient_flow` table per step, or their
    :func:`~mmlib.gradient_flow.gradient_flow_history`; ``layers`` picks columns. Zero norms
    (e.g. LoRA's A at step 1) are left out on a log axis rather than drawn at a fake height.
    """
    history = flows if isinstance(flows, pd.DataFrame) else gradient_flow_history(flows)
    if layers is not None:
        missing = [name for name in layers if name not in history.columns]
        if missing:
            raise ValueError(f"layers {missing} not in the history; available: {list(history.columns)}")
        history = history[list(layers)]
    ax = _axes(ax, (7.0, 4.0))
    for name in history.columns:
        values = history[name].astype(float)
        if log:
            values = values.where(values > 0)
        ax.plot(history.index, values, marker="o", markersize=3, linewidth=1.2, label=str(name))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title("Gradient flow over training steps")
    ax.set_xticks(list(history.index))
    if len(history.columns) <= 12:
        ax.legend(fontsize=7)
    return ax


def plot_accuracy_vs_dim(
    results: Mapping[str, pd.DataFrame] | pd.DataFrame,
    metric: str = "q2t_top1",
    ax: Axes | None = None,
    chance: float | None = None,
) -> Axes:
    """One line per model (e.g. "MRL" vs "full-dim only") of ``metric`` against dim, log2 x-axis.

    Each DataFrame is :func:`mmlib.metrics.evaluate_matryoshka` or
    :func:`mmlib.evaluation.evaluate_dataset` output (index = dim); where it has
    ``{metric}_lo``/``{metric}_hi`` columns (``ci=0.95``) the interval is a shaded band.
    ``chance`` draws a dashed horizontal chance level (e.g. k / n_targets).
    """
    results = _as_results(results)
    ax = _axes(ax, (6.0, 4.0))
    all_dims: set[int] = set()
    for label, df in results.items():
        y = _column(df, metric, label or "results")
        dims = [int(d) for d in df.index]
        all_dims.update(dims)
        (line,) = ax.plot(dims, y.to_numpy(dtype=float), marker="o", label=label or None)
        if f"{metric}_lo" in df.columns and f"{metric}_hi" in df.columns:
            ax.fill_between(dims, df[f"{metric}_lo"].to_numpy(dtype=float),
                            df[f"{metric}_hi"].to_numpy(dtype=float), color=line.get_color(),
                            alpha=0.2, linewidth=0)
    if chance is not None:
        ax.axhline(chance, color="0.5", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log", base=2)
    ticks = sorted(all_dims)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(d) for d in ticks])
    ax.minorticks_off()
    ax.set_xlabel("embedding dim (prefix)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs embedding dim")
    ax.grid(True, alpha=0.3)
    if any(results) or chance is not None:
        ax.legend()
    return ax


def plot_per_dim_loss(
    details: Mapping[int | None, float] | pd.DataFrame | pd.Series, ax: Axes | None = None
) -> Axes:
    """Bar per Matryoshka dim of its loss term L_d (``return_details=True`` output).

    A DataFrame needs dims as its index and a ``loss`` column (or exactly one column).
    """
    series: pd.Series | None
    if isinstance(details, pd.DataFrame):
        if "loss" in details.columns:
            series = details["loss"]
        elif details.shape[1] == 1:
            series = details.iloc[:, 0]
        else:
            raise ValueError(
                f"details DataFrame needs a 'loss' column or a single column, got "
                f"{list(details.columns)}"
            )
    elif isinstance(details, pd.Series):
        series = details
    else:
        if not details:
            raise ValueError("details is empty; pass {dim: loss}")
        # Not via pd.Series: a None key would turn the whole index into floats with NaN.
        series = None
        labels = [_dim_label(d) for d in details]
        values = [float(v) for v in details.values()]
    if series is not None:
        labels = [_dim_label(d) for d in series.index]
        values = [float(v) for v in series.to_numpy()]
    ax = _axes(ax, (6.0, 4.0))
    x = np.arange(len(values))
    ax.bar(x, values, color="tab:blue")
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_xlabel("Matryoshka dim")
    ax.set_ylabel("loss term $L_d$")
    ax.set_title("Loss per Matryoshka dim")
    return ax


def plot_similarity_heatmap(
    sim: np.ndarray | object,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    ax: Axes | None = None,
    fmt: str = ".2f",
    annotate: bool = True,
) -> Axes:
    """Annotated heatmap of a similarity matrix (e.g. queries x targets cosine scores)."""
    arr = _to_numpy(sim)
    if arr.ndim != 2:
        raise ValueError(f"sim must be a 2-D matrix, got shape {arr.shape}")
    if len(row_labels) != arr.shape[0] or len(col_labels) != arr.shape[1]:
        raise ValueError(
            f"labels must match sim's shape {arr.shape}: got {len(row_labels)} row labels "
            f"and {len(col_labels)} column labels"
        )
    ax = _axes(ax, (1.0 + 0.8 * arr.shape[1], 1.0 + 0.6 * arr.shape[0]))
    im = ax.imshow(arr, cmap="viridis", aspect="auto")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(np.arange(arr.shape[1]))
    ax.set_yticks(np.arange(arr.shape[0]))
    ax.set_xticklabels([str(c) for c in col_labels], rotation=45, ha="right")
    ax.set_yticklabels([str(r) for r in row_labels])
    if annotate:
        # Dark text on light cells and vice versa, relative to the colour scale's midpoint.
        mid = (np.nanmin(arr) + np.nanmax(arr)) / 2
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                color = "black" if arr[i, j] > mid else "white"
                ax.text(j, i, format(arr[i, j], fmt), ha="center", va="center", color=color)
    ax.set_title("Cosine similarity")
    return ax


def plot_cost_vs_accuracy(
    results: Mapping[str, pd.DataFrame] | pd.DataFrame,
    metric: str = "q2t_top1",
    cost: str = "bytes_fp32",
    ax: Axes | None = None,
) -> Axes:
    """One line per model of ``metric`` against storage ``cost`` (log2 x), points labelled by dim."""
    results = _as_results(results)
    ax = _axes(ax, (6.0, 4.0))
    for label, df in results.items():
        y = _column(df, metric, label or "results").to_numpy(dtype=float)
        x = _column(df, cost, label or "results").to_numpy(dtype=float)
        ax.plot(x, y, marker="o", label=label or None)
        for xi, yi, d in zip(x, y, df.index, strict=True):
            ax.annotate(f"d={d}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log", base=2)
    ticks = sorted({float(v) for df in results.values() for v in df[cost]})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{v:g}" for v in ticks])
    ax.minorticks_off()
    ax.margins(x=0.1)
    ax.set_xlabel(f"{cost} per vector")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs storage")
    ax.grid(True, alpha=0.3)
    if any(results):
        ax.legend()
    return ax


def plot_training_curves(
    metrics: str | Path | pd.DataFrame,
    ax: Axes | None = None,
    columns: Sequence[str] | None = None,
    logy: bool = False,
) -> Axes:
    """Training loss against step: the total ``loss`` and every per-dim (per-layer) term.

    ``metrics``: a run's ``metrics.jsonl`` (or its folder), or that file read into a DataFrame.
    Only ``split == "train"`` rows are used. ``columns``: which to draw (default ``loss`` and
    every ``loss@...`` column, e.g. ``loss@64``, ``loss@L-2@64``); the learnable temperature
    (``temperature``) may be named too.
    """
    if isinstance(metrics, (str, Path)):
        path = Path(metrics)
        path = path / "metrics.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no metrics file at '{path}'; pass a run's metrics.jsonl")
        metrics = pd.read_json(path, lines=True)
    if not isinstance(metrics, pd.DataFrame):
        raise TypeError(f"metrics must be a path or a DataFrame, got {type(metrics).__name__}")
    df = metrics[metrics["split"] == "train"] if "split" in metrics.columns else metrics
    if "step" not in df.columns or df.empty:
        raise ValueError("metrics have no training rows with a 'step' column; pass the "
                         "metrics.jsonl that mmlib.train writes")
    if columns is None:
        columns = [c for c in df.columns if c == "loss" or c.startswith("loss@")]
    missing = [c for c in columns if c not in df.columns]
    if missing or not columns:
        raise ValueError(f"columns {missing or columns} not in the metrics; available: "
                         f"{sorted(df.columns)}")
    ax = _axes(ax, (7.0, 4.0))
    for col in columns:
        rows = df[["step", col]].dropna().sort_values("step")
        ax.plot(rows["step"], rows[col], label=col, linewidth=2.0 if col == "loss" else 1.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_accuracy_vs_bytes(df: pd.DataFrame, metric: str = "q2t_top1", ax: Axes | None = None,
                           annotate: bool = True) -> Axes:
    """Retrieval `metric` against bytes per vector (log x), one line per precision, each point
    labelled with its dim; error bars from ``{metric}_lo``/``_hi`` when present.

    ``df`` is :func:`mmlib.quantize.evaluate_quantized` output (index dim, precision; a
    ``bytes`` column).
    """
    flat = df.reset_index() if {"dim", "precision"} - set(df.columns) else df
    for col in ("dim", "precision", "bytes"):
        _column(flat, col, "df")
    _column(flat, metric, "df")
    if len(flat) == 0:
        raise ValueError("df is empty; pass evaluate_quantized(...) output")
    ax = _axes(ax, (6, 4))
    for precision, part in flat.groupby("precision", sort=False):
        part = part.sort_values("bytes")
        x, y = part["bytes"].to_numpy(float), part[metric].to_numpy(float)
        if f"{metric}_lo" in part and f"{metric}_hi" in part:
            err = np.vstack([y - part[f"{metric}_lo"].to_numpy(float),
                             part[f"{metric}_hi"].to_numpy(float) - y])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=str(precision))
        else:
            ax.plot(x, y, marker="o", label=str(precision))
        if annotate:
            for xi, yi, d in zip(x, y, part["dim"], strict=True):
                ax.annotate(_dim_label(d), (xi, yi), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per vector")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs storage")
    ax.legend(title="precision")
    return ax


def plot_mrope_positions(
    position_ids: np.ndarray | object,
    image: np.ndarray | object | None = None,
    ax: Axes | None = None,
) -> Axes:
    """M-RoPE (t, h, w) position of every token of one input against its index in the prompt.

    ``position_ids`` is (3, T) (one row of ``get_rope_index``'s (3, B, T) output); ``image``,
    a (T,) boolean mask of the image tokens, is shaded.
    """
    pos = _to_numpy(position_ids)
    if pos.ndim != 2 or pos.shape[0] != 3:
        raise ValueError(f"position_ids must be (3, T) for (t, h, w), got shape {pos.shape}")
    ax = _axes(ax, (9.0, 3.5))
    x = np.arange(pos.shape[1])
    for row, (name, style) in enumerate([("t", "-"), ("h", "--"), ("w", ":")]):
        ax.plot(x, pos[row], style, marker=".", markersize=3, label=name)
    if image is not None:
        mask = _to_numpy(image).astype(bool)
        if mask.shape != x.shape:
            raise ValueError(f"image must be a (T,) mask with T = {len(x)}, got shape {mask.shape}")
        if mask.any():
            idx = np.flatnonzero(mask)
            ax.axvspan(idx[0] - 0.5, idx[-1] + 0.5, color="0.9", zorder=0, label="image tokens")
    ax.set_xlabel("token index in the prompt")
    ax.set_ylabel("rotary position")
    ax.set_title("M-RoPE positions (t, h, w)")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def plot_pooling_shares(shares: pd.DataFrame, ax: Axes | None = None) -> Axes:
    """Stacked horizontal bar per input (rows) of each token group's share (columns, e.g.
    template / image / text) of the pooled vector."""
    if shares.empty:
        raise ValueError("shares is empty; pass one row per input and one column per token group")
    ax = _axes(ax, (7.0, 0.6 + 0.6 * len(shares)))
    left = np.zeros(len(shares))
    y = np.arange(len(shares))
    for col in shares.columns:
        values = shares[col].to_numpy(dtype=float)
        ax.barh(y, values, left=left, label=str(col))
        left = left + values
    ax.set_yticks(y)
    ax.set_yticklabels([str(i) for i in shares.index])
    ax.invert_yaxis()
    ax.set_xlabel("share of the pooled vector")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def _to_numpy(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()  # torch tensor, any dtype/device
    return np.asarray(x, dtype=float)


def _dim_label(d: object) -> str:
    # None / NaN (a None that went through a float index) is the full width.
    if d is None or (isinstance(d, float) and math.isnan(d)):
        return "full"
    return str(int(d)) if float(d).is_integer() else str(d)
