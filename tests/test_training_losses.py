"""Training with every loss from the config: hard negatives that never hurt a positive, guides,
shared / per-query hard negatives, multi-level, learnable temperature, per-dim logging."""

from __future__ import annotations

import pytest

from mmlib.config import EncoderConfig


@pytest.mark.parametrize("width,expected", [(256, [256]), (1024, [256, 512, 1024]),
                                            (64, [64]), (2048, [256, 512, 1024, 2048])])
def test_encoder_config_default_dims_follow_embed_dim(width, expected):
    cfg = EncoderConfig(embed_dim=width)
    assert cfg.resolved_mrl_dims() == expected
    assert EncoderConfig.from_dict(cfg.to_dict()).resolved_mrl_dims() == expected
