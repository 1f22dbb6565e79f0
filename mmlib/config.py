"""`EncoderConfig`: every knob of the encoder and its training, validated up front.

A config round-trips through JSON and YAML (`save` / `load`), and a bad value fails at
construction with a message naming the field, long before a model is built.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmlib.losses.matryoshka import resolve_dims
from mmlib.presets import PRESETS, resolve_preset
from mmlib.validation import (
    ValidationError,
    coerce_fields,
    require_choice,
    require_int,
    require_number,
    require_str,
)

# The default ladder adapts to embed_dim: the entries of (256, 512, 1024, 2048) <= embed_dim,
# plus embed_dim (mmlib.losses.default_dims); any other mrl_dims is taken literally.
DEFAULT_MRL_DIMS: tuple[int | None, ...] = (256, 512, 1024, 2048, None)
# peft matches a string target as a full-name regex; restricting it to the language model
# keeps LoRA off the vision tower's MLPs, which share the names gate/up/down_proj.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# mmlib_config.json of a saved encoder also records which weight parts it holds (see
# MultimodalEncoder.save_pretrained); it is not a config field.
SAVED_PARTS_KEY = "parts"

_CHOICES = {
    "mixed_precision": ("auto", "bf16", "fp16", "no"),
    "freeze_backbone": ("none", "vision", "all"),
    "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "pooling": ("mean", "mean_content", "last"),  # mmlib.head.POOLINGS
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
    # Named texts prepended to an input's text (see mmlib.processing.apply_prompt), e.g.
    # {"query": "Find an image that matches: ", "document": ""}; training gives the query side
    # "query" and the target side "document" when they are set.
    prompts: dict[str, str] = field(default_factory=dict)
    pooling: str = "mean"  # "mean" | "mean_content" | "last" (mmlib.head)

    def __post_init__(self) -> None:
        # Booleans are accepted for freezing ("freeze_backbone=True"); every other field is
        # converted to its declared type (YAML 1.1 reads 3e-4 as a string, --set gives strings).
        if isinstance(self.freeze_backbone, bool):
            self.freeze_backbone = "all" if self.freeze_backbone else "none"
        coerce_fields(self)
        self.validate()

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise a ValueError (`ValidationError`) naming the first bad field."""
        require_str("model_path", self.model_path)
        for name, choices in _CHOICES.items():
            require_choice(name, getattr(self, name), choices)
        require_int("embed_dim", self.embed_dim)
        self.resolved_mrl_dims()  # validates mrl_dims against embed_dim
        require_number("temperature", self.temperature, above=0)
        for name in ("lora_r", "lora_alpha", "grad_accum_steps", "batch_size"):
            require_int(name, getattr(self, name))
        require_int("seed", self.seed, minimum=0)
        require_int("max_length", self.max_length, optional=True)
        require_number("lora_dropout", self.lora_dropout, at_least=0, below=1)
        require_number("max_grad_norm", self.max_grad_norm, above=0, optional=True)
        require_number("learning_rate", self.learning_rate, above=0)
        for name in ("use_lora", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(name, f"must be true or false, got {getattr(self, name)!r}")
        targets = self.lora_target_modules
        if not (isinstance(targets, str) and targets) and not (
                isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
            raise ValidationError("lora_target_modules", "must be a regex string or a non-empty "
                                  f"list of module names, got {targets!r}")
        require_str("device", self.device)
        if not (self.device_map is None or isinstance(self.device_map, (str, dict))):
            raise ValidationError("device_map", f"must be a string, a mapping or None, got "
                                  f"{self.device_map!r}")
        if not isinstance(self.extra, dict):
            raise ValidationError("extra", f"must be a mapping, got {self.extra!r}")
        for name in self.prompts:
            if not name.strip():
                raise ValidationError("prompts", f"prompt names must be non-empty, got {name!r}")

    def resolved_mrl_dims(self) -> list[int]:
        """`mrl_dims` with None → embed_dim, validated, de-duplicated and sorted."""
        try:
            return list(resolve_dims(self.mrl_dims, self.embed_dim))
        except (TypeError, ValueError) as e:
            raise ValidationError("mrl_dims", f"= {self.mrl_dims!r} (embed_dim={self.embed_dim}): "
                                              f"{e}") from e

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
        if not isinstance(data, dict):
            raise ValidationError("EncoderConfig", f"needs a mapping of fields, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValidationError(unknown[0], f"is not an EncoderConfig field (unknown: {unknown}); "
                                              f"valid fields: {sorted(names)}")
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
        """Read a config written by `save`, or a saved encoder's mmlib_config.json (YAML or
        JSON by suffix); values are converted to the fields' types."""
        path = Path(path)
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of EncoderConfig fields, got {type(data).__name__}")
        data.pop(SAVED_PARTS_KEY, None)  # a saved encoder's record of its weight files
        try:
            return cls.from_dict(data)
        except ValidationError as e:
            raise ValidationError(e.name, f"{e.problem} (in {path})") from e

