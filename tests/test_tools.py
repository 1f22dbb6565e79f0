"""Tests for mmlib.tools: the demo's ranking helper and longer-training table (the notebook
runner is in test_notebooks)."""

import pytest
import torch

from mmlib.tools.demo import top_k


def test_top_k_ranks_by_cosine_of_the_renormalised_prefix():
    # Image 0 wins on the first two coordinates, image 2 on the full vector.
    images = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [0.5, -0.1, 0.0, 5.0]])
    query = torch.tensor([[1.0, 0.1, 0.0, 9.0]])
    scores, idx = top_k(query, images, dim=2, k=3)
    assert idx[0].tolist() == [0, 2, 1]
    q2 = torch.tensor([1.0, 0.1]) / torch.tensor([1.0, 0.1]).norm()
    assert scores[0, 0].item() == pytest.approx(float(q2[0]))
    scores, idx = top_k(query, images, dim=4, k=1)
    want = float(query[0] @ images[2] / (query[0].norm() * images[2].norm()))
    assert idx[0].tolist() == [2] and scores[0, 0].item() == pytest.approx(want)


def test_the_demo_shows_the_longest_committed_runs_at_the_smallest_dims(capsys):
    """After its own 300-step table the demo shows the committed benchmark's longest runs (where
    the truncated full-width model falls behind), read from the CSV, not typed in."""
    from pathlib import Path

    import pandas as pd

    from mmlib.tools.demo import show_longer_training

    show_longer_training([8, 16])
    out = capsys.readouterr().out
    runs = pd.read_csv(Path(__file__).resolve().parents[1] / "benchmarks/results/compare_mrl_full.csv")
    runs = runs[runs["sampler"] == "no_duplicates"]
    longest = runs[runs["steps"] == runs["steps"].max()]
    assert f"trained {runs['steps'].max()} steps" in out
    assert len(longest) == 12  # 2 models x 6 dims
    for _, row in longest[longest["dim"].isin([8, 16])].iterrows():
        assert f"{100 * row['q2t_top1']:.1f} [{100 * row['q2t_top1_lo']:.1f}, " in out
