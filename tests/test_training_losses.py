"""Training with every loss from the config: hard negatives that never hurt a positive, guides,
shared / per-query hard negatives, multi-level, learnable temperature, per-dim logging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmlib.config import EncoderConfig
from tests.test_losses import naive_candidate_loss


@pytest.mark.parametrize("width,expected", [(256, [256]), (1024, [256, 512, 1024]),
                                            (64, [64]), (2048, [256, 512, 1024, 2048])])
def test_encoder_config_default_dims_follow_embed_dim(width, expected):
    cfg = EncoderConfig(embed_dim=width)
    assert cfg.resolved_mrl_dims() == expected
    assert EncoderConfig.from_dict(cfg.to_dict()).resolved_mrl_dims() == expected


# ------------------------------------------------------------------ helpers
MANIFEST = "data_samples/synthetic/manifest.jsonl"
LOSS_DIMS = (8, 16, 32)


def write_collision_manifest(tmp_path) -> str:
    """Six rows whose hard negatives are mostly positives of other rows; rows 1 and 4 share an
    image. With the batch of rows 0-4, only image 5 (text2image) and the captions 'caption
    five' / 'a caption of no row' (image2text) are true hard negatives."""
    img = Path(MANIFEST).resolve().parent / "images"
    rows = [(0, "caption zero", ["caption one", "caption five"]), (1, "caption one", []),
            (2, "caption two", ["caption three", "caption zero"]),
            (3, "caption three", ["a caption of no row"]), (1, "caption four", ["caption two"]),
            (5, "caption five", [])]
    path = tmp_path / "collide.jsonl"
    with open(path, "w") as f:
        for k, text, hard in rows:
            f.write(json.dumps({"image": str(img / f"{k:06d}.png"), "text": text,
                                "split": "train", "hard_negatives": hard}) + "\n")
    return str(path)


def tiny_config(tmp_path, **overrides):
    from mmlib.train import TrainConfig

    enc = dict(device="cpu", embed_dim=32, mrl_dims=(8, 16, None), batch_size=4,
               learning_rate=2e-3, seed=0)
    enc.update(overrides.pop("encoder", {}))
    base = dict(encoder=EncoderConfig(**enc), manifest=MANIFEST, eval_split=None, max_steps=2,
                warmup_steps=1, log_every=1, output_dir=str(tmp_path / "run"), progress=False)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("direction,kept", [("text2image", [1]), ("image2text", [1, 4])])
def test_trainer_never_counts_a_positive_as_a_hard_negative(tmp_path, direction, kept):
    from mmlib.train import Trainer

    cfg = tiny_config(tmp_path, manifest=write_collision_manifest(tmp_path), direction=direction,
                      hard_negatives=True, encoder={"batch_size": 5})
    trainer = Trainer(cfg)
    trainer.encoder.eval()  # no dropout: the reference below sees the same embeddings
    batch = trainer.collate([trainer.train_set[i] for i in range(5)])
    loss = trainer._batch_loss(batch)
    with torch.no_grad():
        q, p, h = (trainer.encoder(**batch[k]) for k in ("query", "target", "hard_negatives"))
    same = {(1, 4), (4, 1)} if direction == "text2image" else set()  # rows 1, 4: one image
    cols = [[j for j in range(5) if (i, j) not in same] for i in range(5)]
    ref = sum(naive_candidate_loss(q, p, h, d, 0.07, True, cols, [kept] * 5, cols)
              for d in LOSS_DIMS)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
