"""`MultimodalEncoder`: Qwen2.5-VL → pooling (`config.pooling`) → projection → L2-normalised embedding.

    enc = MultimodalEncoder(EncoderConfig())            # the tiny offline model
    e = enc.encode_texts(["a red circle"], dim=256)     # (1, 256), unit norm
    loss = mrl_loss(enc(**query_batch), enc(**target_batch))

Training goes through `forward` (gradients on); `encode_*` are for inference (no grad,
batched by length, original order restored).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from mmlib.backbone import (
    load_backbone,
    resolve_amp_dtype,
    resolve_device,
    unwrap,
)
from mmlib.config import EncoderConfig
from mmlib.head import ProjectionHead, PromptTokens, pool, truncate_and_normalize
from mmlib.hf_utils import quiet_hf
from mmlib.inference import encode_batched
from mmlib.processing import ImageLike, apply_prompt, build_inputs, count_inputs
from mmlib.saving import load_encoder, save_encoder, saves_backbone
from mmlib.validation import require_int

logger = logging.getLogger("mmlib")

_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                 "mm_token_type_ids")


class MultimodalEncoder(nn.Module):
    """Image + text embedding model with Matryoshka-truncatable outputs."""

    def __init__(self, config: EncoderConfig | None = None, *, _backbone_path: str | None = None,
                 **overrides: Any):
        super().__init__()
        config = config or EncoderConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.backbone, self.processor = load_backbone(self.config, _backbone_path)
        hidden = self.qwen.config.text_config.hidden_size
        # Fresh weights (head, LoRA) come from config.seed, not from the global RNG: two
        # encoders built from one config are identical, and building one draws no numbers
        # from the caller's stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.projection = ProjectionHead(hidden, self.config.embed_dim).to(self.input_device)
            self._apply_freezing()
            if self.config.use_lora:
                self._add_lora()
        if self.config.gradient_checkpointing:
            self.qwen.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})

    # -- structure -------------------------------------------------------------------------
    @property
    def qwen(self) -> nn.Module:
        """The underlying `Qwen2_5_VLModel` (unwrapped from peft)."""
        return unwrap(self.backbone)

    @property
    def input_device(self) -> torch.device:
        """Where input tensors go (the token embedding's device, also under a device_map)."""
        return self.qwen.get_input_embeddings().weight.device

    @property
    def device(self) -> torch.device:
        """Device of the projection head (where embeddings come out)."""
        return self.projection.fc1.weight.device

    @property
    def embed_dim(self) -> int:
        """Full embedding width E."""
        return self.config.embed_dim

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype for this config and device (None = fp32)."""
        return resolve_amp_dtype(self.config, resolve_device(self.config))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op when mixed precision is off)."""
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.input_device.type, dtype=dtype)

    def _apply_freezing(self) -> None:
        mode = self.config.freeze_backbone
        for name, p in self.qwen.named_parameters():
            frozen = mode == "all" or (mode == "vision" and name.startswith("visual."))
            p.requires_grad_(not frozen)

    def _add_lora(self) -> None:
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules, bias="none")
        with quiet_hf():
            self.backbone = get_peft_model(self.backbone, lora)
        counts = self.parameter_counts()
        logger.info("LoRA: %d trainable of %d parameters (%.3f%%)", counts["trainable"],
                    counts["total"], 100 * counts["trainable"] / counts["total"])

    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameter counts."""
        params = list(self.parameters())
        return {"total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad)}

    def parameter_table(self) -> pd.DataFrame:
        """Parameters per component (vision tower, merger, language model, LoRA, projection)."""
        rows: dict[str, list[int]] = {}
        for name, p in self.named_parameters():
            part = component_of(name)
            total, trainable = rows.setdefault(part, [0, 0])
            rows[part] = [total + p.numel(), trainable + (p.numel() if p.requires_grad else 0)]
        df = pd.DataFrame.from_dict(rows, orient="index", columns=["parameters", "trainable"])
        df.index.name = "component"
        df.loc["total"] = df.sum()
        return df

    # -- forward ---------------------------------------------------------------------------
    def _position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """M-RoPE positions computed from the attention mask, so that padding (left or right)
        and the other rows of the batch never shift an input's positions."""
        mask = batch["attention_mask"]
        if batch.get("image_grid_thw") is not None:
            pos, _ = self.qwen.get_rope_index(
                batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
            return pos
        pos = (mask.long().cumsum(-1) - 1).clamp_(min=0)
        return pos.unsqueeze(0).expand(3, -1, -1)

    def _hidden_states(self, batch: dict[str, Any], layers: Sequence[int] | None = None):
        missing = [k for k in ("input_ids", "attention_mask") if batch.get(k) is None]
        if missing:
            raise ValueError(f"missing model inputs {missing}: pass the processor's whole output")
        if batch.get("pixel_values") is not None and batch.get("mm_token_type_ids") is None:
            raise ValueError("mm_token_type_ids is missing: pass the processor's whole output "
                             "(without it Qwen2.5-VL silently drops M-RoPE)")
        inputs = {k: v.to(self.input_device) for k, v in batch.items()
                  if k in _MODEL_INPUTS and v is not None}
        inputs["position_ids"] = self._position_ids(inputs)
        inputs.pop("mm_token_type_ids", None)  # only needed for the positions computed above
        with self.autocast():
            out = self.backbone(**inputs, use_cache=False, output_hidden_states=layers is not None)
        return out, inputs["attention_mask"]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        dim: int | None = None,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor | dict[int, torch.Tensor]:
        """(B, E) L2-normalised embeddings of a processor batch, with gradients (float32);
        with `layers`, {layer: (B, E)} (see `forward_layers`)."""
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                     image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids)
        if layers is not None:
            return self._layer_embeddings(batch, layers, dim)
        out, mask = self._hidden_states(batch)
        return self._embed(out.last_hidden_state, mask, dim, input_ids)

    def forward_layers(self, batch: dict[str, Any], layers: Sequence[int],
                       dim: int | None = None) -> dict[int, torch.Tensor]:
        """Embeddings pooled from several decoder layers in one forward, all through the shared
        projection: {layer: (B, E)}. Layer L is the output of decoder block L (1-based; -1 is
        the last). Intermediate layers go through the backbone's final RMSNorm first, so every
        level reaches the projection at the same scale (as the last layer does)."""
        # Through __call__, as every forward: module hooks must run (under FSDP the root's
        # pre-forward gathers the embeddings and the final norm).
        return self(**{k: batch.get(k) for k in _MODEL_INPUTS}, dim=dim, layers=layers)

    def _layer_embeddings(self, batch: dict[str, Any], layers: Sequence[int],
                          dim: int | None) -> dict[int, torch.Tensor]:
        n_layers = self.qwen.config.text_config.num_hidden_layers
        resolved = {}
        for layer in layers:
            idx = layer if layer > 0 else n_layers + 1 + layer
            if not 1 <= idx <= n_layers:
                raise ValueError(f"layer {layer} out of range: the backbone has {n_layers} decoder "
                                 f"layers (use 1..{n_layers} or -1..-{n_layers})")
            resolved[layer] = idx
        out, mask = self._hidden_states(batch, layers=list(resolved.values()))
        norm = self.qwen.language_model.norm
        result = {}
        for layer, idx in resolved.items():
            hidden = out.last_hidden_state if idx == n_layers else norm(out.hidden_states[idx])
            result[layer] = self._embed(hidden, mask, dim, batch["input_ids"])
        return result

    def _embed(self, hidden: torch.Tensor, mask: torch.Tensor, dim: int | None,
               input_ids: torch.Tensor) -> torch.Tensor:
        pooling = self.config.pooling
        prompt = self.prompt_tokens if pooling == "mean_content" else None
        pooled = pool(hidden, mask, pooling, input_ids, prompt).to(self.device)
        # The head runs in fp32 outside autocast: it is tiny and its LayerNorm/L2 norm are
        # where low precision hurts most.
        with torch.autocast(device_type=self.device.type, enabled=False):
            return truncate_and_normalize(self.projection(pooled), dim)

    @property
    def prompt_tokens(self) -> PromptTokens:
        """Token ids of the prompt template (what `mean_content` pooling leaves out)."""
        if getattr(self, "_prompt_tokens", None) is None:
            self._prompt_tokens = PromptTokens.from_tokenizer(self.processor.tokenizer)
        return self._prompt_tokens

    # -- inference -------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str | None] | None = None,
                 images: Sequence[ImageLike | None] | None = None) -> dict[str, torch.Tensor]:
        """Processor batch for texts and/or images (item i = texts[i] + images[i])."""
        return build_inputs(self.processor, texts, images, max_length=self.config.max_length)

    def encode_texts(self, texts: Sequence[str], dim: int | None = None, **kwargs: Any) -> torch.Tensor:
        """(N, d) unit-norm embeddings of texts, no grad, in input order."""
        _check_list("texts", texts)
        return self.encode(texts=texts, dim=dim, **kwargs)

    def encode_images(self, images: Sequence[ImageLike], dim: int | None = None,
                      **kwargs: Any) -> torch.Tensor:
        """(N, d) unit-norm embeddings of images (PIL images or paths), no grad, in input order."""
        _check_list("images", images)
        return self.encode(images=images, dim=dim, **kwargs)

    def encode_queries(self, texts: Sequence[str | None] | None = None,
                       images: Sequence[ImageLike | None] | None = None, **kwargs: Any) -> torch.Tensor:
        """`encode` with the "query" prompt when the config has one (else no prompt)."""
        return self.encode(texts, images, prompt_name=self._role_prompt("query"), **kwargs)

    def encode_documents(self, texts: Sequence[str | None] | None = None,
                         images: Sequence[ImageLike | None] | None = None,
                         **kwargs: Any) -> torch.Tensor:
        """`encode` with the "document" prompt when the config has one (else no prompt)."""
        return self.encode(texts, images, prompt_name=self._role_prompt("document"), **kwargs)

    def _role_prompt(self, role: str) -> str | None:
        return role if role in self.config.prompts else None

    def prompt(self, prompt_name: str | None) -> str:
        """The text of the configured prompt `prompt_name` ("" for None)."""
        if prompt_name is None:
            return ""
        if prompt_name not in self.config.prompts:
            raise ValueError(f"prompt_name={prompt_name!r} is not a configured prompt; "
                             f"config.prompts has {sorted(self.config.prompts)} (set "
                             "EncoderConfig(prompts={...}) or drop prompt_name)")
        return self.config.prompts[prompt_name]

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[ImageLike | None] | None = None,
        dim: int | None = None,
        batch_size: int | None = None,
        show_progress: bool | None = None,
        max_tokens: int | None = None,
        prefetch: bool | None = None,
        callback: Callable[[int], None] | None = None,
        prompt_name: str | None = None,
    ) -> torch.Tensor:
        """(N, d) embeddings of N inputs, each texts[i] and/or images[i] as one input.

        `prompt_name` prepends `config.prompts[prompt_name]` to every input's text (see
        `mmlib.processing.apply_prompt`).

        Inputs are sorted by token count and batched so that similar lengths share a batch
        (little padding), then returned in the original order, on the CPU, in float32.
        Texts are tokenized once for the whole call. Batches are token budgets: each holds at
        most `max_tokens` padded tokens (rows x its longest input); by default the budget is
        `batch_size` (default `config.batch_size`) rows of the longest input of the call, so
        memory stays that of fixed batches of `batch_size` while short inputs share larger
        batches. With both given, `batch_size` also caps the rows of a batch. `prefetch` builds the next batch in a background thread while the model
        runs (default: on for CUDA). `callback(n)` is called with the row count of each
        finished batch. `config.extra["compile"] = True` compiles the language model at the
        first call (see `compile_for_inference`).
        """
        if texts is not None:
            _check_list("texts", texts, allow_none=images is not None)
        if images is not None:
            _check_list("images", images, allow_none=texts is not None)
        count_inputs(texts, images, "encode")
        texts = apply_prompt(texts, images, self.prompt(prompt_name))
        require_int("max_tokens", max_tokens, optional=True)
        if self.config.extra.get("compile") and not self._is_compiled():
            self.compile_for_inference()
        require_int("batch_size", batch_size, optional=True)
        return encode_batched(self, texts, images, dim=dim, batch_size=batch_size,
                              max_tokens=max_tokens, show_progress=show_progress,
                              prefetch=prefetch, callback=callback)

    def compile_for_inference(self, dynamic: bool = True, **compile_kwargs: Any) -> MultimodalEncoder:
        """`torch.compile` the language model in place (`nn.Module.compile`, dynamic shapes).

        Parameter names, `state_dict` and save/load are unchanged; every later forward (encode
        and training alike) runs the compiled module. The first batch pays the compilation
        (tens of seconds on CPU, a minute or more for the 3B model on GPU); the vision tower
        stays eager (its shapes are data dependent). Returns self.
        """
        if not hasattr(torch, "compile"):
            raise RuntimeError("torch.compile is unavailable in this torch build")
        if not self._is_compiled():
            self.qwen.language_model.compile(dynamic=dynamic, **compile_kwargs)
        return self

    def _is_compiled(self) -> bool:
        return getattr(self.qwen.language_model, "_compiled_call_impl", None) is not None

    # -- save / load (mmlib/saving.py) -----------------------------------------------------
    def save_pretrained(self, path: str | Path, save_backbone: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None,
                        evaluation: pd.DataFrame | None = None,
                        training: dict[str, Any] | None = None) -> Path:
        """Write config, projection, processor, the backbone or LoRA adapter and a model card
        into `path`, replacing what was there (see `mmlib.saving.save_encoder`)."""
        return save_encoder(self, path, save_backbone, state_dict, evaluation, training)

    def saves_weight(self, name: str, save_backbone: bool | None = None) -> bool:
        """Whether `save_pretrained` writes the state-dict entry `name` (the projection, plus
        the LoRA adapter or the whole backbone); lets a sharded model gather only those."""
        if name.startswith("projection."):
            return True
        if self.config.use_lora:
            return "lora_" in name
        return saves_backbone(self.config, save_backbone) and name.startswith("backbone.")

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, **overrides: Any) -> MultimodalEncoder:
        """Load a folder written by `save_pretrained`, or wrap a backbone (id, folder, 'tiny');
        overrides the saved weights fix must agree (see `mmlib.saving.load_encoder`)."""
        return load_encoder(cls, path_or_id, **overrides)


def component_of(name: str) -> str:
    """Coarse component of a parameter name: vision tower, merger, language model, LoRA, projection."""
    if "lora_" in name:
        return "LoRA adapters"
    if name.startswith("projection."):
        return "projection"
    if ".visual.merger." in f".{name}":
        return "merger"
    if ".visual." in f".{name}":
        return "vision tower"
    return "language model"


def _check_list(name: str, items: Any, allow_none: bool = False) -> None:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list, got {type(items).__name__}")
    if len(items) == 0:
        raise ValueError(f"{name} is empty: pass at least one item")
    if not allow_none and any(x is None for x in items):
        raise ValueError(f"{name} contains None at index {[x is None for x in items].index(True)}")
