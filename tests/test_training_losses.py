"""Training with every loss from the config: hard negatives that never hurt a positive, guides,
shared / per-query hard negatives, multi-level, learnable temperature, per-dim logging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmlib.config import EncoderConfig
from tests.test_losses import naive_candidate_loss
from tests.test_train import interrupted_then_resumed


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


# ------------------------------------------------------------------ every loss from the CLI
def write_config(tmp_path, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        "encoder:\n  device: cpu\n  embed_dim: 32\n  mrl_dims: [8, 16, null]\n  batch_size: 4\n"
        f"  learning_rate: 0.002\n  seed: 0\nmanifest: {MANIFEST}\neval_split: null\n"
        f"max_steps: 2\nwarmup_steps: 1\nlog_every: 1\noutput_dir: {tmp_path / 'run'}\n"
        "progress: false\n")
    return path


def read_log(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def naive_step_losses(trainer, batch):
    """{metrics name: loss} of one batch, from the trainer's embeddings, by explicit loops over
    who sees whom (identities, owners, guard), independent of the loss modules."""
    cfg = trainer.config
    enc = trainer.encoder.eval()
    tid = batch["target_ids"].tolist()
    hid, own = batch["hard_negative_ids"].tolist(), batch["hard_negative_owner"].tolist()
    B, M = len(tid), len(hid)
    per_query = cfg.hard_negative_mode == "per_query"

    def sees_hard(i, m):
        repeat = any(hid[k] == hid[m] and (not per_query or own[k] == own[m]) for k in range(m))
        return (not per_query or own[m] == i) and hid[m] not in tid and not repeat

    layers = cfg.layers if cfg.loss == "multilevel" else [None]
    weights = cfg.dim_weights or [1.0] * len(cfg.loss_dims)
    layer_weights = cfg.layer_weights or [1.0] * len(layers)
    out, total = {}, 0.0
    with torch.no_grad():
        def embed(b, layer, model=enc):
            if b is None:
                return None
            return model(**b) if layer is None else model.forward_layers(b, [layer])[layer]

        for layer, lw in zip(layers, layer_weights, strict=True):
            q, p, h = (embed(batch[k], layer) for k in ("query", "target", "hard_negatives"))
            guide = None
            if cfg.guide == "frozen":
                guide = [embed(batch[k], None, trainer.guide) for k in
                         ("query", "target", "hard_negatives")]
            for d, w in zip(cfg.loss_dims, weights, strict=True):
                g = guide if guide is not None else [None if x is None else x[:, :d]
                                                     for x in (q, p, h)]
                gq, gp, gh = (None if x is None else torch.nn.functional.normalize(x, dim=1)
                              for x in g)

                def dropped(a, b, pos, m=cfg.guide_margin):
                    return cfg.guide != "none" and float(a @ b) > float(pos) - m

                cols = [[j for j in range(B) if j == i or (tid[j] != tid[i] and not dropped(
                    gq[i], gp[j], gq[i] @ gp[i]))] for i in range(B)]
                hard = [[m for m in range(M) if sees_hard(i, m) and not dropped(
                    gq[i], gh[m], gq[i] @ gp[i])] for i in range(B)]
                rows = [[i for i in range(B) if i == j or (tid[i] != tid[j] and not dropped(
                    gq[i], gp[j], gq[j] @ gp[j]))] for j in range(B)]
                loss = naive_candidate_loss(q, p, h, d, cfg.encoder.temperature, cfg.symmetric,
                                            cols, hard, rows)
                out[f"loss@{d}" if layer is None else f"loss@L{layer}@{d}"] = float(loss)
                total += lw * w * float(loss)
    out["loss"] = total
    return out


LOSS_CASES = {
    "mrl": [],
    "full": ["loss=full"],
    "mrl_hard_image2text": ["hard_negatives=true", "direction=image2text"],
    "hard_shared_frozen": ["loss=hard_negatives", "guide=frozen", "guide_margin=0.0"],
    "hard_per_query_self": ["loss=hard_negatives", "hard_negative_mode=per_query", "guide=self",
                            "guide_margin=0.05", "dim_weights=[2.0,1.0,0.5]"],
    "multilevel": ["loss=multilevel", "layers=[-1,1]", "layer_weights=[1.0,0.5]"],
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_each_loss_trains_from_the_cli_and_its_first_step_equals_a_naive_loop(tmp_path, case):
    from mmlib.train import TrainConfig, Trainer, main

    path, overrides = write_config(tmp_path), LOSS_CASES[case]
    main(["--config", str(path), "--set", *overrides])
    log = [r for r in read_log(tmp_path / "run") if r["split"] == "train"]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    # Same seed: the run's first batch (in another folder: one run per output_dir).
    fresh = Trainer(TrainConfig.load(path, [*overrides, f"output_dir={tmp_path / 'fresh'}"]))
    want = naive_step_losses(fresh, fresh._next_batches()[0])
    got = {k: v for k, v in log[0].items() if k == "loss" or k.startswith("loss@")}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=2e-5, abs=1e-6), key


def test_cli_subprocess_learnable_temperature_and_frozen_guide(tmp_path):
    import os
    import subprocess
    import sys

    path = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "mmlib.train", "--config", str(path), "--set", "loss=hard_negatives",
         "guide=frozen", "guide_margin=0.1", "learnable_temperature=true"],
        capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    log = read_log(tmp_path / "run")
    assert {"loss@8", "loss@16", "loss@32", "temperature"} <= log[0].keys()
    assert log[0]["temperature"] == pytest.approx(0.07, rel=1e-6)  # the value step 1 used
    assert log[1]["temperature"] != log[0]["temperature"]  # it trains


def _tiny_run(tmp_path, **overrides):
    base = dict(loss="hard_negatives", guide="frozen", guide_margin=0.1, learnable_temperature=True,
                max_steps=4)
    base.update(overrides)
    return tiny_config(tmp_path, **base)


def test_learnable_temperature_joins_optimizer_and_checkpoint_and_resumes_exactly(tmp_path,
                                                                                    monkeypatch):
    from mmlib.train import Trainer

    straight = Trainer(_tiny_run(tmp_path / "a"))
    start = {n: p.detach().clone() for n, p in straight.encoder.named_parameters()}
    straight.train()
    tau = straight.loss_fn.temperature
    assert any(p is tau.log_scale for g in straight.optimizer.param_groups for p in g["params"])
    # the guide stays the starting encoder
    for n, p in straight.guide.named_parameters():
        assert torch.equal(p, start[n]) and not p.requires_grad, n

    resumed = interrupted_then_resumed(_tiny_run, tmp_path / "b", monkeypatch)
    keys = ("loss", "temperature", "loss@8")
    a = [[r[k] for k in keys] for r in read_log(tmp_path / "a" / "run")]
    b = [[r[k] for k in keys] for r in read_log(tmp_path / "b" / "run")]
    assert a == b and len(a) == 4 and a[0][1] != a[-1][1]
    assert torch.equal(resumed.loss_fn.temperature.log_scale, tau.log_scale)


@pytest.mark.parametrize("mode", ["shared", "per_query"])
def test_gradcache_matches_plain_step_for_hard_negative_losses(tmp_path, mode):
    from mmlib.train import Trainer

    plain = Trainer(_tiny_run(tmp_path / "p", hard_negative_mode=mode))
    cached = Trainer(_tiny_run(tmp_path / "c", hard_negative_mode=mode, micro_batch_size=3))
    batch = plain._next_batches()[0]
    assert batch["hard_negatives"] is not None
    losses = [t._batch_loss(batch) for t in (plain, cached)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in ((plain.encoder, cached.encoder), (plain.loss_fn, cached.loss_fn)):
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4,
                                           atol=1e-5 * float(p.grad.abs().max()), msg=n)
    assert cached.loss_fn.temperature.log_scale.grad is not None


@pytest.mark.parametrize("overrides,pattern", [
    (dict(loss="triplet"), "loss must be one of"),
    (dict(guide="self"), "options of loss=hard_negatives"),
    (dict(loss="hard_negatives", hard_negative_mode="mine"), "hard_negative_mode must be one of"),
    (dict(loss="hard_negatives", guide="teacher"), "guide must be one of"),
    (dict(loss="hard_negatives", guide_margin=0.1), "no effect with guide='none'"),
    (dict(loss="multilevel", micro_batch_size=2), "micro_batch_size"),
    (dict(loss="multilevel", layers=[-1, -2], layer_weights=[1.0]), "one per layer"),
    (dict(loss="multilevel", layers=[]), "layers must be a non-empty list"),
])
def test_bad_loss_settings_name_the_field(tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(tmp_path, **overrides)


def test_plot_training_curves_draws_every_logged_loss(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from mmlib.plots import plot_training_curves

    rows = [{"step": s, "split": "train", "loss": 3.0 / s, "loss@8": 1.2 / s,
             "loss@L-2@8": 2.0 / s, "lr": 0.1} for s in (1, 2, 3)]
    rows.append({"step": 3, "split": "validation", "dim": 8, "top1": 0.5})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in (path, tmp_path, pd.read_json(path, lines=True)):
        ax = plot_training_curves(source)
        assert [line.get_label() for line in ax.get_lines()] == ["loss", "loss@8", "loss@L-2@8"]
        assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([1.2, 0.6, 0.4])
        plt.close("all")
    with pytest.raises(ValueError, match="temperature"):
        plot_training_curves(path, columns=["temperature"])
