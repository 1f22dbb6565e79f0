"""mmlib.runs: a finished run is loaded, a shortened run is trained once and then cached."""

from __future__ import annotations

import shutil

import torch

from mmlib.runs import run_folder, trained_encoder

CONFIG = """encoder:
  model_path: tiny
  embed_dim: 32
  mrl_dims: [8, null]
  batch_size: 4
  device: cpu
manifest: {manifest}
max_steps: 50
warmup_steps: 1
eval_split: null
output_dir: runs/tiny_test
"""


def _config(tmp_path):
    from tests.test_data import SYNTHETIC

    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.format(manifest=SYNTHETIC))
    return path


def test_trains_once_then_loads_the_cached_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLIB_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path)
    texts = ["a small red circle on the left", "a large blue star"]
    first, how = trained_encoder(cfg, steps=2)
    assert how == "trained here (2 steps)"
    again, how = trained_encoder(cfg, steps=2)
    assert how == "cached run (2 steps)"
    folder = run_folder(cfg, steps=2)
    assert (folder / "final").is_dir() and (folder / "metrics.jsonl").is_file()
    assert torch.allclose(first.encode_texts(texts), again.encode_texts(texts), atol=1e-6)
    other, how = trained_encoder(cfg, steps=3)  # another run: trained, not the cached one
    assert how == "trained here (3 steps)"
    assert not torch.allclose(first.encode_texts(texts), other.encode_texts(texts), atol=1e-4)


def test_loads_a_finished_run_of_the_same_config_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLIB_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path)
    enc, _ = trained_encoder(cfg, steps=2)
    cached = next((tmp_path / "cache" / "runs").iterdir())
    runs = tmp_path / "runs"
    shutil.copytree(cached, runs / "tiny_test")
    # The copy was trained for 2 steps, the config says 50: not the config's run.
    _, how = trained_encoder(cfg, steps=2, runs_dir=runs)
    assert how == "cached run (2 steps)"
    _, how = trained_encoder(cfg, runs_dir=runs, overrides=["max_steps=2", "warmup_steps=1"])
    assert how == "loaded tiny_test/final (2 steps)"
