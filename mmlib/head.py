"""What sits on top of the backbone: pooling, the projection, L2 normalisation.

    hidden (B, T, H) --pool--> (B, H) --projection--> (B, E) --L2--> unit vectors

Pooling (`EncoderConfig.pooling`):
- `mean`: the mean over every real token, the chat template's included (the seed's choice);
- `mean_content`: the mean over the input's own text and image tokens only. Under causal
  attention the template prefix `<|im_start|>user\n` has the same hidden states for every
  input, so in `mean` it adds a shared vector that weighs most in short inputs;
- `last`: the last real token (`<|im_end|>`), the only one that has seen the whole input
  (VLM2Vec, GME, Tevatron).

Matryoshka: any prefix `[:d]` of an embedding is itself an embedding once re-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlib.processing import format_prompt

POOLINGS = ("mean", "mean_content", "last")


def _real_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`attention_mask` as booleans on hidden's device, after checking shapes and that no row
    is all padding."""
    if hidden.ndim != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, T, H) and attention_mask (B, T), got "
                         f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=hidden.device, dtype=torch.bool)
    _check_rows("attention_mask", ~mask.any(1), "are all padding (attention_mask is 0 "
                "everywhere): every input needs at least one real token")
    return mask


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the tokens where `attention_mask` is 1, in float32."""
    mask = _real_tokens(hidden, attention_mask)
    # masked_fill, not multiply: padded positions may hold NaN/inf (fully masked attention
    # rows under left padding), and NaN * 0 is still NaN.
    summed = hidden.float().masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True).to(summed.dtype)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token (any padding side), in float32."""
    mask = _real_tokens(hidden, attention_mask)
    count = mask.long().cumsum(1)
    last = (mask & (count == count[:, -1:])).int().argmax(1)  # first (only) such position
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def _check_rows(name: str, bad: torch.Tensor, problem: str) -> None:
    """Raise a ValueError naming the rows of the batch where `bad` is True."""
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"{name}: rows {rows} of the batch {problem}")


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of mmlib's prompt template (`format_prompt`): the header `<|im_start|>user\\n`,
    the closing `<|im_end|>`, the image's `<|vision_start|>`/`<|vision_end|>` markers and
    its `<|image_pad|>` tokens."""

    header: tuple[int, ...]
    end: int
    markers: tuple[int, ...]
    image: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> PromptTokens:
        """Read the ids off the tokenized template of an empty text and of an empty image."""
        text = tokenizer(format_prompt("", False))["input_ids"]
        image = tokenizer(format_prompt("", True))["input_ids"]
        header, end = tuple(text[:-1]), text[-1]
        vision = image[len(header):-1]  # <|vision_start|> <|image_pad|> <|vision_end|>
        if tuple(image[:len(header)]) != header or image[-1] != end or len(vision) != 3:
            raise ValueError(f"the tokenizer does not split mmlib's prompt template into the "
                             f"expected special tokens (got {image}); is it a Qwen2.5-VL tokenizer?")
        return cls(header=header, end=end, markers=(vision[0], vision[2]), image=vision[1])


def token_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt: PromptTokens) -> dict[str, torch.Tensor]:
    """(B, T) boolean masks of the real tokens that are `template`, `image` or `text`.

    Positions are counted over real tokens only, so left and right padding give the same
    groups. Template: the header, the vision markers and the closing `<|im_end|>`. A leading
    newline of the text may merge into the header's newline token (it then counts as template).
    """
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"expected input_ids and attention_mask of one shape (B, T), got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    rank = mask.long().cumsum(1) - 1  # index among the row's real tokens
    n = mask.sum(1, keepdim=True)
    fix = "build batches with encoder.tokenize / mmlib.processing.build_inputs"
    # The header's last token is the newline, which BPE may merge with the text's own leading
    # whitespace: check the ones before it exactly.
    for r, token in enumerate(prompt.header[:-1]):
        _check_rows("token_groups", (mask & (rank == r) & (input_ids != token)).any(1),
                    f"do not start with mmlib's prompt header {list(prompt.header)}: {fix}")
    last = mask & (rank == n - 1)
    _check_rows("token_groups", (last & (input_ids != prompt.end)).any(1) | (n.squeeze(1) == 0),
                f"do not end with <|im_end|> (id {prompt.end}): {fix}")
    inside = mask & (rank >= len(prompt.header)) & ~last
    markers = torch.as_tensor(prompt.markers, device=input_ids.device)
    content = inside & ~torch.isin(input_ids, markers)
    image = content & (input_ids == prompt.image)
    return {"template": mask & ~content, "image": image, "text": content & ~image}


def mean_contributions(hidden: torch.Tensor, attention_mask: torch.Tensor,
                       groups: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each token group's (B, H) term of the `mean` pooling: sum of its tokens' states / n_real.

    Over a partition of the real tokens (`token_groups`) the terms add up to `masked_mean_pool`.
    """
    mask = _real_tokens(hidden, attention_mask)
    n = mask.sum(1, keepdim=True).float()
    return {name: hidden.float().masked_fill(~(g.to(mask.device) & mask).unsqueeze(-1), 0.0).sum(1) / n
            for name, g in groups.items()}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean",
         input_ids: torch.Tensor | None = None, prompt: PromptTokens | None = None) -> torch.Tensor:
    """(B, T, H) hidden states → (B, H) float32 by `pooling` (see the module docstring)."""
    if pooling == "mean":
        return masked_mean_pool(hidden, attention_mask)
    if pooling == "last":
        return last_token_pool(hidden, attention_mask)
    if pooling == "mean_content":
        if input_ids is None or prompt is None:
            raise ValueError("pooling='mean_content' needs input_ids and the PromptTokens of the "
                             "tokenizer (PromptTokens.from_tokenizer)")
        groups = token_groups(input_ids.to(hidden.device), attention_mask.to(hidden.device), prompt)
        content = groups["image"] | groups["text"]
        _check_rows("pooling='mean_content'", ~content.any(1),
                    "have no text or image token (an empty text?): give every input some "
                    "content, or use pooling='mean'")
        return masked_mean_pool(hidden, content.long())
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


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
