"""Saving and loading a `MultimodalEncoder`: what a saved folder holds and how it comes back.

    enc.save_pretrained("out/enc")                 # -> save_encoder
    MultimodalEncoder.from_pretrained("out/enc")   # -> load_encoder

A saved folder holds `mmlib_config.json` (the config plus the `parts` written), the projection
(`projection.safetensors`), the processor, a model card (README.md), and either the whole
backbone (`backbone/`, a complete Qwen2.5-VL folder) or a LoRA adapter (`adapter/`), or neither
(a frozen base is referenced by `model_path`). The folder is written beside its target and
swapped in, so it never mixes two models; loading reads only the parts the config lists,
safetensors only, never code from the folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmlib.backbone import refuse_remote_code
from mmlib.config import SAVED_PARTS_KEY, EncoderConfig
from mmlib.hf_utils import quiet_hf

CONFIG_FILE = "mmlib_config.json"
PROJECTION_FILE = "projection.safetensors"
BACKBONE_DIR = "backbone"
ADAPTER_DIR = "adapter"


def saves_backbone(config: EncoderConfig, save_backbone: bool | None = None) -> bool:
    """Whether a save writes the whole backbone: by default only when its own weights train."""
    if save_backbone is None:
        return not config.use_lora and config.freeze_backbone != "all"
    return save_backbone


def save_encoder(encoder: Any, path: str | Path, save_backbone: bool | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None,
                 evaluation: Any = None, training: dict[str, Any] | None = None) -> Path:
    """Write config, projection (safetensors), processor, the backbone or LoRA adapter, and
    a model card (README.md, with `evaluation` per dim and the `training` settings if given).

    `save_backbone=None` saves the full backbone only when its own weights train
    (no LoRA, not fully frozen); otherwise the base model is referenced by `model_path`
    and only the adapter (if any) is written. `state_dict` (this module's full state
    dict, e.g. `mmlib.fsdp.full_state_dict` of a sharded encoder) replaces the weights
    read from the module itself. The folder is written beside `path` and then swapped in,
    so `path` holds exactly this model: a model saved there before is replaced, never
    mixed in. An existing `path` must be empty or a folder this method wrote.
    """
    target = Path(path).expanduser().resolve()
    if target.exists() and (not target.is_dir() or (
            any(target.iterdir()) and not (target / CONFIG_FILE).is_file())):
        raise FileExistsError(
            f"{path} exists and is not a saved encoder (no {CONFIG_FILE}): save_pretrained "
            "replaces the whole folder, so it only overwrites folders it wrote; choose a new "
            "or empty folder")
    save_backbone = saves_backbone(encoder.config, save_backbone)
    staging = target.parent / f".{target.name}.saving-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)  # left by a crash of this same process id
    staging.mkdir(parents=True)
    try:
        _write(encoder, staging, save_backbone, state_dict)
        from mmlib.model_card import mmlib_card

        (staging / "README.md").write_text(mmlib_card(encoder.config, evaluation, training))
        if target.exists():
            old = target.parent / f".{target.name}.replaced-{os.getpid()}"
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return Path(path)



def _write(encoder: Any, path: Path, save_backbone: bool,
           state_dict: dict[str, torch.Tensor] | None) -> None:
    parts: dict[str, dict[str, torch.Tensor] | None] = {"backbone.": None, "projection.": None}
    if state_dict is not None:
        for prefix in parts:
            parts[prefix] = {k[len(prefix):]: v for k, v in state_dict.items()
                             if k.startswith(prefix)}
    written = {"backbone": False, "adapter": False}
    with quiet_hf():
        if encoder.config.use_lora:
            encoder.backbone.save_pretrained(path / ADAPTER_DIR, state_dict=parts["backbone."])
            written["adapter"] = True
        elif save_backbone:
            # A complete Qwen2.5-VL folder: loadable on its own with from_pretrained.
            encoder.qwen.save_pretrained(path / BACKBONE_DIR, safe_serialization=True,
                                      state_dict=parts["backbone."])
            encoder.processor.save_pretrained(path / BACKBONE_DIR)
            written["backbone"] = True
    proj = parts["projection."] or encoder.projection.state_dict()
    proj = {k: v.detach().cpu().contiguous() for k, v in proj.items()}
    save_file(proj, str(path / PROJECTION_FILE))
    encoder.processor.save_pretrained(path)
    # `parts` tells from_pretrained what to load (the config alone cannot: a frozen or
    # LoRA model references its base by model_path).
    record = {**encoder.config.to_dict(), SAVED_PARTS_KEY: written}
    (path / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_encoder(cls: type, path_or_id: str | Path, **overrides: Any) -> Any:
    """`cls.from_pretrained`: a folder written by `save_encoder`, or a backbone (id, folder, 'tiny').

    `overrides` change the saved config; those the saved weights fix (embed_dim; the
    LoRA settings of a saved adapter; model_path when the backbone is saved) must agree
    with it.
    """
    path = Path(path_or_id).expanduser()
    if not (path / CONFIG_FILE).is_file():
        return cls(EncoderConfig(model_path=str(path_or_id), **overrides))
    saved = EncoderConfig.load(path / CONFIG_FILE)
    parts = saved_parts(path, saved)
    config = saved.replace(**overrides)
    check_overrides(path, saved, config, parts, overrides)
    backbone_dir = str(path / BACKBONE_DIR) if parts["backbone"] else None
    if not parts["adapter"]:
        enc = cls(config, _backbone_path=backbone_dir)
    else:
        # The adapter is loaded onto the base model, not created fresh.
        enc = cls(config.replace(use_lora=False), _backbone_path=backbone_dir)
        enc.backbone = load_adapter(enc.backbone, path / ADAPTER_DIR)
        enc.config = config
    enc.projection.load_state_dict(load_file(str(path / PROJECTION_FILE), device=str(enc.device)))
    return enc



def saved_parts(path: str | Path, config: EncoderConfig) -> dict[str, bool]:
    """Which weight parts (`backbone`, `adapter`) the saved encoder in `path` holds."""
    path = Path(path)
    record = json.loads((path / CONFIG_FILE).read_text()).get(SAVED_PARTS_KEY)
    if record is None:
        # Written before `parts` was recorded: a LoRA save never wrote backbone/ and a full
        # one never adapter/, so a folder holding the other is a stale leftover.
        return {"backbone": not config.use_lora and (path / BACKBONE_DIR).is_dir(),
                "adapter": config.use_lora and (path / ADAPTER_DIR).is_dir()}
    if not (isinstance(record, dict) and set(record) == {"backbone", "adapter"}
            and all(isinstance(v, bool) for v in record.values())):
        raise ValueError(f"{path / CONFIG_FILE}: {SAVED_PARTS_KEY!r} must map 'backbone' and "
                         f"'adapter' to true/false, got {record!r}")
    for part, folder in (("backbone", BACKBONE_DIR), ("adapter", ADAPTER_DIR)):
        if record[part] and not (path / folder).is_dir():
            raise FileNotFoundError(f"{path / CONFIG_FILE} lists a saved {part} but "
                                    f"{path / folder} is missing: the folder is incomplete")
    return record


# Fields the saved weights fix, per saved part: an override must agree with the saved value.
_FIXED_BY = {
    "projection": ("embed_dim",),
    "adapter": ("use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"),
    "backbone": ("model_path",),
}


def check_overrides(path: Path, saved: EncoderConfig, config: EncoderConfig,
                    parts: dict[str, bool], overrides: dict[str, Any]) -> None:
    """Refuse an override that the saved weights fix (see _FIXED_BY)."""
    for part, names in _FIXED_BY.items():
        if part != "projection" and not parts[part]:
            continue
        for name in names:
            if name in overrides and getattr(config, name) != getattr(saved, name):
                raise ValueError(
                    f"from_pretrained({str(path)!r}, {name}={overrides[name]!r}): the saved "
                    f"{part} was built with {name}={getattr(saved, name)!r} and cannot change; "
                    "drop the override (or train a new model)")


def load_adapter(backbone: nn.Module, folder: str | Path) -> nn.Module:
    """`backbone` with the LoRA adapter saved in `folder`: safetensors only, never a pickle."""
    from peft import PeftModel

    folder = Path(folder)
    refuse_remote_code(folder)
    config_file = folder / "adapter_config.json"
    peft_type = json.loads(config_file.read_text()).get("peft_type") if config_file.is_file() else None
    if peft_type != "LORA":
        raise ValueError(f"{config_file}: expected a LoRA adapter (peft_type 'LORA'), got "
                         f"{peft_type!r}; mmlib saves and loads LoRA adapters only")
    if not (folder / "adapter_model.safetensors").is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth",
                                                                          ".pkl", ".ckpt"))
        found = f"holds {pickled} but " if pickled else ""
        raise ValueError(f"{folder} {found}has no adapter_model.safetensors: pickled weights are "
                         "never loaded (unpickling can run code); convert them with "
                         "safetensors.torch.save_file in a trusted environment")
    with quiet_hf():
        return PeftModel.from_pretrained(backbone, str(folder), is_trainable=True)
