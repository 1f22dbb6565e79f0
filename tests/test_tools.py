"""Tests for mmlib.tools: the demo's ranking helper (the notebook runner is in test_notebooks)."""

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
