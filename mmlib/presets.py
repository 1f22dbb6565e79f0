"""Backbone presets: the tiny offline model and the released Qwen2.5-VL sizes.

The released configs are copied from the `config.json` of each Qwen2.5-VL-*-Instruct
checkpoint, so `build_backbone_config("qwen2.5-vl-3b")` gives a model with exactly the
released shapes (random weights) without any download. That is what the benchmarks use,
and what the meta-device tests count parameters on.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import Qwen2_5_VLConfig

# Vision towers of the released models share everything but the output width
# (it must equal the language model's hidden size) and the MLP width.
_VISION_COMMON: dict[str, Any] = dict(
    depth=32,
    hidden_size=1280,
    hidden_act="silu",
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)

_TEXT_COMMON: dict[str, Any] = dict(
    hidden_act="silu",
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151645,
)

# Token ids of the released tokenizer (the tiny tokenizer gets its own, see mmlib.tiny).
_RELEASED_TOKEN_IDS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": dict(
        hf_id="Qwen/Qwen2.5-VL-3B-Instruct",
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                  num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  tie_word_embeddings=True),
        vision=dict(intermediate_size=3420, out_hidden_size=2048),
        tie_word_embeddings=True,
        released_params=3_754_622_976,
    ),
    "qwen2.5-vl-7b": dict(
        hf_id="Qwen/Qwen2.5-VL-7B-Instruct",
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  tie_word_embeddings=False),
        vision=dict(intermediate_size=3420, out_hidden_size=3584),
        tie_word_embeddings=False,
        released_params=8_292_166_656,
    ),
    "qwen2.5-vl-32b": dict(
        hf_id="Qwen/Qwen2.5-VL-32B-Instruct",
        text=dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                  num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                  tie_word_embeddings=False),
        vision=dict(intermediate_size=3456, out_hidden_size=5120),
        tie_word_embeddings=False,
        released_params=33_452_718_336,
    ),
    "qwen2.5-vl-72b": dict(
        hf_id="Qwen/Qwen2.5-VL-72B-Instruct",
        text=dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                  num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                  tie_word_embeddings=False),
        vision=dict(intermediate_size=3456, out_hidden_size=8192),
        tie_word_embeddings=False,
        released_params=73_410_777_344,
    ),
}

# The tiny model: real architecture, toy sizes. head_dim = 64 / 4 = 16, so the M-RoPE
# sections must sum to 8; the vision output width must equal the text width.
TINY: dict[str, Any] = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
              max_position_embeddings=4096, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [2, 3, 3]},
              tie_word_embeddings=False),
    vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                tokens_per_second=2, hidden_act="silu", in_channels=3),
    tie_word_embeddings=False,
)

ALIASES = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b", "32b": "qwen2.5-vl-32b",
           "72b": "qwen2.5-vl-72b"}


def preset_names() -> list[str]:
    """Names accepted by `build_backbone_config` (besides their short aliases)."""
    return ["tiny", *PRESETS]


def resolve_preset(name: str) -> str | None:
    """Canonical preset name for `name` (case-insensitive, short aliases allowed), or None."""
    key = name.lower().removeprefix("preset:")
    key = ALIASES.get(key, key)
    if key == "tiny" or key in PRESETS:
        return key
    return None


def build_backbone_config(name: str, **token_ids: int) -> Qwen2_5_VLConfig:
    """A fresh `Qwen2_5_VLConfig` for a preset; `token_ids` override the special-token ids."""
    key = resolve_preset(name)
    if key is None:
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names()} "
                         f"or their aliases {sorted(ALIASES)}")
    spec = TINY if key == "tiny" else PRESETS[key]
    if key == "tiny":
        text, vision = copy.deepcopy(spec["text"]), copy.deepcopy(spec["vision"])
    else:
        text = {**copy.deepcopy(_TEXT_COMMON), **spec["text"]}
        vision = {**copy.deepcopy(_VISION_COMMON), **spec["vision"]}
    ids = {**_RELEASED_TOKEN_IDS, **token_ids}
    if "vocab_size" in token_ids:
        text["vocab_size"] = ids.pop("vocab_size")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in ids:
            text[k] = ids.pop(k)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=spec["tie_word_embeddings"], **ids)
