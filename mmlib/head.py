"""What sits on top of the backbone: masked mean pooling, the projection, L2 normalisation.

    hidden (B, T, H) --mean over real tokens--> (B, H) --projection--> (B, E) --L2--> unit vectors

Matryoshka: any prefix `[:d]` of an embedding is itself an embedding once re-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the tokens where `attention_mask` is 1, in float32."""
    if hidden.ndim != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, T, H) and attention_mask (B, T), got "
                         f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=hidden.device, dtype=torch.bool)
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"rows {rows} of the batch are all padding (attention_mask is 0 "
                         f"everywhere): every input needs at least one real token")
    # masked_fill, not multiply: padded positions may hold NaN/inf (fully masked attention
    # rows under left padding), and NaN * 0 is still NaN.
    summed = hidden.float().masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)
    return summed / counts.unsqueeze(-1).to(summed.dtype)


def truncate_and_normalize(embeddings: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Keep the first `dim` coordinates (all when None) and L2-normalise again."""
    if dim is not None:
        full = embeddings.shape[-1]
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= full:
            raise ValueError(f"dim must be an int in [1, {full}] or None, got {dim!r}")
        embeddings = embeddings[..., :dim]
    return F.normalize(embeddings, p=2, dim=-1)


class ProjectionHead(nn.Module):
    """Linear(H, E) → GELU → Linear(E, E) → LayerNorm(E), Xavier-initialised."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.in_dim, self.embed_dim = in_dim, embed_dim
        self.fc1 = nn.Linear(in_dim, embed_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(embed_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases keep the output scale independent of H and E."""
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self.norm.reset_parameters()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, H) → (B, E), not yet normalised."""
        return self.norm(self.fc2(self.act(self.fc1(pooled))))
