"""Loading the Qwen2.5-VL backbone and its processor, and choosing devices, dtypes and attention.

`model_path` may be:
- `"tiny"`: the offline toy model (built once into the cache, then loaded from disk);
- `"preset:<name>"`: random weights with a released model's shapes (e.g. `preset:qwen2.5-vl-3b`);
- a local folder or a Hugging Face id (`Qwen/Qwen2.5-VL-3B-Instruct`), loaded with
  `from_pretrained` (safetensors only, never remote code: a folder whose configs name custom
  classes is refused before transformers reads it). An id is fetched with huggingface_hub
  first (or found in its cache offline), so an unreachable id fails in a second.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, Qwen2_5_VLModel
from transformers.utils import is_flash_attn_2_available

from mmlib.config import EncoderConfig
from mmlib.hf_utils import quiet_hf
from mmlib.presets import build_backbone_config, resolve_preset
from mmlib.tiny import build_tiny_processor, get_tiny_model_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model id needs from the hub: configs, tokenizer files, safetensors weights. Never
# Python files or pickled weights.
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: EncoderConfig) -> torch.device:
    """`device="auto"` → the first CUDA GPU if there is one, else the CPU."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EncoderConfig, device: torch.device) -> torch.dtype:
    """Weight dtype. `auto`: fp32 on CPU; on GPU, when the backbone's own weights do not train
    (LoRA or fully frozen), the autocast dtype (bf16, or fp16 on GPUs without bf16; fp32 with
    mixed precision off); fp32 master weights otherwise (AMP computes in half precision)."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cuda" and (config.use_lora or config.freeze_backbone == "all"):
        # One dtype for weights and compute: bf16 weights under fp16 autocast (a V100 / T4)
        # would be rounded to fp16 by every matmul and run the other ops in a dtype the GPU
        # lacks.
        return resolve_amp_dtype(config, device) or torch.float32
    return torch.float32


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """`auto` → flash_attention_2 where flash-attn and CUDA are present, else sdpa."""
    flash_ok = device.type == "cuda" and is_flash_attn_2_available()
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        why = "no CUDA device" if device.type != "cuda" else "the flash-attn package is not installed"
        raise ImportError(
            f"attn_implementation='flash_attention_2' cannot run here ({why}). Install it with "
            "`pip install -r requirements-gpu.txt` on a CUDA machine, or use "
            "attn_implementation='sdpa' (or 'auto', which picks the best available)."
        )
    return requested


def resolve_amp_dtype(config: EncoderConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32. `auto`: bf16 on GPUs that have it (fp16
    otherwise), none on CPU, where bf16 autocast is several times slower than fp32."""
    mp = config.mixed_precision
    if mp == "no":
        return None
    if mp == "bf16":
        return torch.bfloat16
    if mp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def load_backbone(config: EncoderConfig, path: str | None = None) -> tuple[Qwen2_5_VLModel, Any]:
    """(backbone, processor) for `path` (default: `config.model_path`)."""
    path = path or config.model_path
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    attn = resolve_attn_implementation(config.attn_implementation, device)

    preset = path.startswith("preset:") and resolve_preset(path)
    if path.startswith("preset:") and not preset:
        raise ValueError(f"unknown preset in model_path={path!r}; e.g. 'preset:qwen2.5-vl-3b'")
    if preset:
        return _random_backbone(preset, config, device, dtype, attn)

    if path == "tiny":
        with quiet_hf():
            folder = str(get_tiny_model_path())
    elif Path(path).expanduser().is_dir():
        folder = str(Path(path).expanduser())
    elif not _HUB_ID.match(path):
        raise FileNotFoundError(
            f"model_path={path!r} is neither 'tiny', a preset ('preset:qwen2.5-vl-3b'), an "
            "existing folder, nor a Hugging Face id like 'Qwen/Qwen2.5-VL-3B-Instruct'")
    else:
        folder = hub_snapshot(path)
    refuse_remote_code(folder)

    # trust_remote_code=False explicitly: without it transformers *asks* on stdin (and a
    # piped "y" runs the folder's code); refuse_remote_code above already stopped such folders.
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attn, use_safetensors=True,
                                  trust_remote_code=False)
    if config.device_map is not None:
        kwargs["device_map"] = config.device_map
    try:
        with quiet_hf():
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
            model = Qwen2_5_VLModel.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise OSError(f"could not load a Qwen2.5-VL model from {path!r} ({folder}): {e}") from e
    if config.device_map is None:
        model.to(device)
    _apply_image_limits(processor, config)
    return model, processor


def _random_backbone(preset: str, config: EncoderConfig, device: torch.device,
                     dtype: torch.dtype, attn: str) -> tuple[Qwen2_5_VLModel, Any]:
    """A random-weight model with a released size's shapes, built directly on `device`."""
    processor = build_tiny_processor(max_pixels=224 * 224 if preset == "tiny" else None)
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    backbone_config = build_backbone_config(preset, **ids)
    backbone_config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = Qwen2_5_VLModel(backbone_config)
    finally:
        torch.set_default_dtype(previous)
    _apply_image_limits(processor, config)
    return model, processor


def _apply_image_limits(processor: Any, config: EncoderConfig) -> None:
    max_pixels = config.extra.get("image_max_pixels")
    if max_pixels:
        ip = processor.image_processor
        ip.max_pixels = int(max_pixels)
        ip.size = {**dict(ip.size), "longest_edge": int(max_pixels)}


def hub_snapshot(repo_id: str) -> str:
    """Local folder of a Hugging Face model id: downloaded (safetensors, configs, tokenizer
    files; never code or pickles) or, offline, found in the local HF cache. Fails in about a
    second, not after minutes of retries, when the id is neither reachable nor cached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() \
        in ("1", "ON", "YES", "TRUE")
    try:
        with quiet_hf():
            return snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=offline,
                                     cache_dir=constants.HF_HUB_CACHE)
    except LocalEntryNotFoundError as e:
        why, fix = (("HF_HUB_OFFLINE is set", "with network, unset HF_HUB_OFFLINE (or set it "
                     "to 0) to download it") if offline else
                    ("the hub is unreachable", "connect to the network (or set HTTPS_PROXY) to "
                     "download it"))
        raise OSError(f"model_path={repo_id!r}: {why} and it is not in the local Hugging Face "
                      f"cache ({constants.HF_HUB_CACHE}). Use model_path='tiny', a preset "
                      f"('preset:qwen2.5-vl-3b') or a local folder; or {fix}") from e
    except (OSError, HFValidationError) as e:  # not found, gated, private, bad revision
        detail = " ".join(str(e).split())
        raise OSError(f"model_path={repo_id!r} could not be fetched from the Hugging Face hub "
                      f"({type(e).__name__}: {detail}). Check the id (and `hf auth login` for "
                      "gated models), or use model_path='tiny' or a local folder") from e


def refuse_remote_code(folder: str | Path) -> None:
    """Raise if any JSON file of `folder` names custom code (an `auto_map`), before any
    transformers call: mmlib never runs code shipped with a model."""
    for file in sorted(Path(folder).glob("*.json")):
        if file.name.endswith(".index.json"):
            continue  # a weight map: tensor names, never classes
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # unreadable configs fail later with transformers' own error
        found = _find_auto_map(data)
        if found:
            key, value = found
            raise ValueError(
                f"{file}: {key!r} names custom code ({value!r}); mmlib never runs code shipped "
                "with a model (trust_remote_code=False). Use a folder whose classes are stock "
                "transformers Qwen2.5-VL ones, or delete the auto_map entry if they are")


def _find_auto_map(data: Any, where: str = "") -> tuple[str, Any] | None:
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "auto_map" and value:
                return path, value
            found = _find_auto_map(value, path)
            if found:
                return found
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found = _find_auto_map(value, f"{where}[{i}]")
            if found:
                return found
    return None


def unwrap(backbone: torch.nn.Module) -> Qwen2_5_VLModel:
    """The `Qwen2_5_VLModel` under a peft wrapper (or the model itself)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
