"""`EncoderConfig`: every knob of the encoder and its training, validated up front.

A config round-trips through JSON and YAML (`save` / `load`), and a bad value fails at
construction with a message naming the field, long before a model is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmlib.losses.matryoshka import resolve_dims
from mmlib.presets import PRESETS, resolve_preset

# The default ladder adapts to embed_dim: the entries of (256, 512, 1024, 2048) <= embed_dim,
# plus embed_dim (mmlib.losses.default_dims); any other mrl_dims is taken literally.
DEFAULT_MRL_DIMS: tuple[int | None, ...] = (256, 512, 1024, 2048, None)
# peft matches a string target as a full-name regex; restricting it to the language model
# keeps LoRA off the vision tower's MLPs, which share the names gate/up/down_proj.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

_CHOICES = {
    "mixed_precision": ("auto", "bf16", "fp16", "no"),
    "freeze_backbone": ("none", "vision", "all"),
    "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
}


@dataclass
class EncoderConfig:
    """Configuration of a `MultimodalEncoder` and of its training."""

    model_path: str = "tiny"
    mrl_dims: tuple[int | None, ...] = DEFAULT_MRL_DIMS
    embed_dim: int = 2048
    temperature: float = 0.07
    mixed_precision: str = "auto"
    dtype: str = "auto"
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = DEFAULT_LORA_TARGETS
    freeze_backbone: str = "none"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    device: str = "auto"
    device_map: str | dict[str, Any] | None = None
    max_length: int | None = 512
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # YAML and JSON give lists; booleans are accepted for freezing ("freeze_backbone=True").
        if isinstance(self.freeze_backbone, bool):
            self.freeze_backbone = "all" if self.freeze_backbone else "none"
        if isinstance(self.mrl_dims, (list, tuple)):
            self.mrl_dims = tuple(self.mrl_dims)
        self.validate()

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError(f"model_path must be a non-empty string, got {self.model_path!r}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        _positive_int("embed_dim", self.embed_dim)
        self.resolved_mrl_dims()  # validates mrl_dims against embed_dim
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")
        for name in ("lora_r", "lora_alpha", "grad_accum_steps", "batch_size"):
            _positive_int(name, getattr(self, name))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.max_length is not None:
            _positive_int("max_length", self.max_length)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")

    def resolved_mrl_dims(self) -> list[int]:
        """`mrl_dims` with None → embed_dim, validated, de-duplicated and sorted."""
        try:
            return list(resolve_dims(self.mrl_dims, self.embed_dim))
        except (TypeError, ValueError) as e:
            raise ValueError(f"mrl_dims={self.mrl_dims!r} (embed_dim={self.embed_dim}): {e}") from e

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def for_model(cls, name: str, random_weights: bool = False, **overrides: Any) -> EncoderConfig:
        """Config for a preset: `"3b"` → the released checkpoint id, or its random-weight twin."""
        key = resolve_preset(name)
        if key is None:
            raise ValueError(f"unknown model preset {name!r}; choose 'tiny' or one of {sorted(PRESETS)}")
        if key == "tiny":
            path = "tiny"
        else:
            path = f"preset:{key}" if random_weights else PRESETS[key]["hf_id"]
        return cls(model_path=path, **overrides)

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (tuples become lists) for JSON / YAML."""
        d = dataclasses.asdict(self)
        d["mrl_dims"] = list(self.mrl_dims)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        """Build from a dict; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown EncoderConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**data)

    def replace(self, **overrides: Any) -> EncoderConfig:
        """A validated copy with some fields changed."""
        return self.from_dict({**self.to_dict(), **overrides})

    def save(self, path: str | Path) -> Path:
        """Write as YAML (.yaml/.yml) or JSON (anything else)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EncoderConfig:
        """Read a config written by `save` (YAML or JSON by suffix)."""
        path = Path(path)
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of EncoderConfig fields, got {type(data).__name__}")
        return cls.from_dict(data)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")

