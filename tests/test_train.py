import json
import math

import pytest
import torch

from mmlib.config import EncoderConfig
from mmlib.train import TrainConfig, Trainer, warmup_cosine

MANIFEST = "data_samples/synthetic/manifest.jsonl"


def small_config(tmp_path, **overrides) -> TrainConfig:
    enc = dict(device="cpu", embed_dim=32, mrl_dims=(8, 16, None), batch_size=8,
               learning_rate=2e-3, seed=0)
    enc.update(overrides.pop("encoder", {}))
    base = dict(encoder=EncoderConfig(**enc), manifest=MANIFEST, eval_split=None, max_steps=4,
                warmup_steps=1, log_every=1, output_dir=str(tmp_path / "run"), progress=False)
    base.update(overrides)
    return TrainConfig(**base)


def read_log(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_warmup_cosine_by_hand():
    assert warmup_cosine(0, warmup=4, total=10) == 0.25
    assert warmup_cosine(3, warmup=4, total=10) == 1.0
    assert warmup_cosine(4, warmup=4, total=10) == 1.0
    assert math.isclose(warmup_cosine(7, warmup=4, total=10), 0.5)  # halfway through the decay
    assert warmup_cosine(10, warmup=4, total=10) == 0.0


def interrupted_then_resumed(make_config, folder, monkeypatch) -> Trainer:
    """Ctrl-C at the start of step 3 (a checkpoint of step 2 is saved), then a second Trainer
    with resume=auto runs to the end; returns that Trainer."""
    stopped = Trainer(make_config(folder))
    real_step = stopped.train_step

    def interrupt_at_step_3(batches):
        if stopped.step == 2:
            raise KeyboardInterrupt
        return real_step(batches)

    monkeypatch.setattr(stopped, "train_step", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    resumed = Trainer(make_config(folder, resume="auto"))
    assert resumed.step == 2
    resumed.train()
    return resumed


def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path, monkeypatch):
    straight = Trainer(small_config(tmp_path / "a"))
    straight.train()
    resumed = interrupted_then_resumed(small_config, tmp_path / "b", monkeypatch)
    a = {r["step"]: r["loss"] for r in read_log(tmp_path / "a" / "run")}
    b = {r["step"]: r["loss"] for r in read_log(tmp_path / "b" / "run")}
    assert a == b and sorted(a) == [1, 2, 3, 4]
    for (n, p), q in zip(straight.encoder.named_parameters(), resumed.encoder.parameters(),
                         strict=True):
        assert torch.equal(p, q), n


def test_clipping_bounds_the_norm(tmp_path):
    trainer = Trainer(small_config(tmp_path, encoder={"max_grad_norm": 1e-3}))
    stats = trainer.train_step(trainer._next_batches())
    params = [p for p in trainer.encoder.parameters() if p.grad is not None]
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert stats["grad_norm"] > 1e-3  # reported: the norm before clipping
    assert clipped <= 1e-3 * (1 + 1e-4)


def test_bf16_autocast_step_on_cpu(tmp_path):
    trainer = Trainer(small_config(tmp_path, encoder={"mixed_precision": "bf16"}))
    stats = trainer.train_step(trainer._next_batches())
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0


def test_short_run_lowers_the_training_loss(tmp_path):
    trainer = Trainer(small_config(tmp_path, max_steps=12))
    batch = trainer.collate([trainer.train_set[i] for i in range(16)])

    def loss_on_fixed_batch():
        with torch.no_grad():
            q, t = trainer.encoder(**batch["query"]), trainer.encoder(**batch["target"])
            return float(trainer.loss_fn(q, t))

    before = loss_on_fixed_batch()
    trainer.train()
    assert loss_on_fixed_batch() < 0.9 * before


def test_gradcache_step_matches_plain_step(tmp_path):
    """The trainer's GradCache path gives the loss and gradients of the plain path (compared
    before the optimizer: Adam amplifies float noise on near-zero gradients)."""
    plain = Trainer(small_config(tmp_path / "p"))
    cached = Trainer(small_config(tmp_path / "c", micro_batch_size=3))
    batch = plain._next_batches()[0]
    losses = [t._batch_loss(batch) for t in (plain, cached)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(plain.encoder.named_parameters(), cached.encoder.parameters(),
                         strict=True):
        if p.grad is not None:  # summation order differs: tolerance scales with the gradient
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4,
                                       atol=1e-5 * float(p.grad.abs().max()), msg=n)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("encoder:\n  embed_dim: 64\n  mrl_dims: [8, null]\nmax_steps: 7\n")
    cfg = TrainConfig.load(path, ["max_steps=3", "encoder.learning_rate=0.01", "loss=full"])
    assert cfg.max_steps == 3 and cfg.encoder.learning_rate == 0.01 and cfg.loss_dims == [64]
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.load(path, ["max_steps"])
    path.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match="max_step"):
        TrainConfig.load(path)


def test_periodic_eval_without_eval_split_is_skipped(tmp_path):
    trainer = Trainer(small_config(tmp_path, max_steps=2, eval_every=1))
    assert trainer.train()["steps"] == 2 and trainer.eval_set is None


def test_batch_larger_than_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(small_config(tmp_path, encoder={"batch_size": 10_000}))
