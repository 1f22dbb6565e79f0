"""Trained runs for notebooks and scripts: load a finished run, or train it once and cache it.

    enc, source = trained_encoder("configs/tiny_mrl.yaml", steps=200)

`make train` writes `runs/<name>/final`; a notebook loads that when it was trained from the same
config. Otherwise the config is trained here, shortened to `steps`, into the cache
(`$MMLIB_CACHE/runs/<hash of the effective config>`), so that the next notebook that asks for
the same run loads it instead of training again. Training is deterministic from the config's
seed, so a cached run is the run the config describes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from mmlib.encoder import MultimodalEncoder
from mmlib.saving import CONFIG_FILE
from mmlib.tiny import default_cache_dir
from mmlib.train import TrainConfig, Trainer

# Fields that do not change the trained weights.
_NOT_WEIGHTS = ("output_dir", "resume", "overwrite", "progress", "eval_every", "eval_split",
                "log_every", "save_every")


def _weights_key(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    for name in _NOT_WEIGHTS:
        d.pop(name, None)
    if d["loss"] == "full":  # the full-width loss never reads the dims: they only name evaluations
        d["encoder"].pop("mrl_dims")
    return d


def finished(folder: Path, cfg: TrainConfig) -> bool:
    """`folder` holds a final model trained from exactly `cfg` (up to logging/eval settings)."""
    saved = folder / "train_config.yaml"
    if not ((folder / "final" / CONFIG_FILE).is_file() and saved.is_file()):
        return False
    try:
        done = TrainConfig(**yaml.safe_load(saved.read_text()))
    except (TypeError, ValueError):
        return False
    return _weights_key(done) == _weights_key(cfg)


def _locate(config_path: str | os.PathLike, steps: int | None, runs_dir: str | os.PathLike | None,
            overrides: Sequence[str]) -> tuple[Path, TrainConfig, str]:
    """(run folder, its config, how it is reached): `runs_dir`'s finished run of the config as
    written, else the cache folder of the run shortened to `steps`."""
    cfg = TrainConfig.load(config_path, list(overrides))
    name = Path(cfg.output_dir).name
    if runs_dir is not None and finished(Path(runs_dir) / name, cfg):
        return Path(runs_dir) / name, cfg, f"loaded {name}/final ({cfg.max_steps} steps)"
    if steps is not None:
        overrides = [*overrides, f"max_steps={steps}", f"warmup_steps={max(1, steps // 10)}"]
        cfg = TrainConfig.load(config_path, overrides)
    digest = hashlib.sha256(json.dumps(_weights_key(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir() / "runs" / f"{name}-{digest}", cfg, "cache"


def run_folder(config_path: str | os.PathLike, steps: int | None = None,
               runs_dir: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Path:
    """The folder (final/, metrics.jsonl, train_config.yaml) that `trained_encoder` with the
    same arguments loads from or trains into."""
    return _locate(config_path, steps, runs_dir, overrides)[0]


def trained_encoder(config_path: str | os.PathLike, steps: int | None = None,
                    runs_dir: str | os.PathLike | None = None,
                    overrides: Sequence[str] = ()) -> tuple[MultimodalEncoder, str]:
    """(encoder in eval mode, where it came from) for a training config.

    Looks in `runs_dir / <output_dir name>` for a run of the config as written (e.g. from
    `make train`), then in the cache for a run shortened to `steps`; trains the latter if
    neither exists. `overrides` are `--set`-style strings applied to the config first."""
    folder, cfg, how = _locate(config_path, steps, runs_dir, overrides)
    if how != "cache":
        return MultimodalEncoder.from_pretrained(folder / "final").eval(), how
    if finished(folder, cfg):
        return (MultimodalEncoder.from_pretrained(folder / "final").eval(),
                f"cached run ({cfg.max_steps} steps)")
    short = [*overrides, f"output_dir={folder}", "overwrite=true", "progress=false",
             "eval_split=null", "eval_every=0", "save_every=0"]
    if steps is not None:
        short += [f"max_steps={steps}", f"warmup_steps={max(1, steps // 10)}"]
    trainer = Trainer(TrainConfig.load(config_path, short))
    trainer.train()
    trainer.close()
    return trainer.encoder.eval(), f"trained here ({cfg.max_steps} steps)"
