"""Export a `MultimodalEncoder` as a sentence-transformers model with identical embeddings.

    path = to_sentence_transformers(encoder, "exported/")        # or: python -m mmlib.export RUN OUT
    SentenceTransformer(path).encode(["a red circle", pil_image])  # == encoder.encode(...)

Only stock sentence-transformers modules are used, one per step of mmlib's data flow:

    Transformer(backbone, unpad_inputs=False)  the Qwen2.5-VL backbone (LoRA merged in), whose
                                               chat template renders exactly mmlib's prompt
    → Pooling("mean") → Dense(H, E, GELU) → Dense(E, E, identity) → LayerNorm(E) → Normalize

The chat template (`CHAT_TEMPLATE`) is Qwen's minus the default system turn and minus the
newline after `<|im_end|>`; sentence-transformers passes a prompt as a system message, which the
template writes into the user turn after the image placeholder, where mmlib puts it
(`mmlib.processing.apply_prompt`). With Qwen's stock template embeddings differ by ~0.4.

Truncation: mmlib caps an input's text (prompt included) at `max_length` tokens;
sentence-transformers truncates the whole rendered sequence, so `max_seq_length` is
`max_length` plus the template's own tokens, and it restores the closing `<|im_end|>`. Text-only
inputs therefore match at any length; an image+text input whose text is cut differs (there
sentence-transformers counts the image tokens too).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmlib.processing import format_prompt

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from mmlib.encoder import MultimodalEncoder

logger = logging.getLogger("mmlib")

# A system message's text (sentence-transformers' prompt) goes into the user turn after the
# images and before the text, exactly where mmlib puts a prompt. No default system turn, no
# newline after <|im_end|>, no generation prompt: the rendered string is mmlib's format_prompt.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prompt='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.prompt = ns.prompt + message['content'] -%}"
    "{%- else -%}{%- for c in message['content'] -%}{%- if c['type'] == 'text' -%}"
    "{%- set ns.prompt = ns.prompt + c['text'] -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- else -%}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{%- if message['content'] is string -%}{{ ns.prompt }}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'video' or 'video' in c -%}"
    "{{ raise_exception('mmlib models embed text and images, not videos') }}"
    "{%- elif c['type'] == 'image' or 'image' in c or 'image_url' in c -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- endif -%}{%- endfor -%}"
    "{{ ns.prompt }}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# mmlib pooling name -> sentence-transformers Pooling mode computing exactly the same thing.
_POOLING = {"mean": "mean"}


def to_sentence_transformers(encoder: MultimodalEncoder, path: str | os.PathLike,
                             max_seq_length: int | None = None) -> Path:
    """Write `encoder` as a sentence-transformers folder at `path` (new or empty); returns it.

    The backbone is written in float32 with any LoRA adapter merged into a copy (the encoder
    is not changed); a frozen backbone is copied into the folder, so it loads on its own. The
    config's `prompts` become the model's prompts (no default prompt). README.md is a model
    card with the Matryoshka dims and how to load and truncate.

    `max_seq_length` (default: `text_max_seq_length(encoder)`, exact for texts of any length)
    is the cap on a whole rendered input, image tokens included: sentence-transformers refuses
    an image whose tokens do not fit (a warning at export says when the processor's largest
    image would not); a larger value admits large images but truncates long texts later than
    mmlib does.
    """
    target = Path(path).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder: export into a new "
                              "or empty folder")
    pooling = getattr(encoder.config, "pooling", "mean")
    if pooling not in _POOLING:
        raise ValueError(f"pooling={pooling!r} has no exact sentence-transformers equivalent "
                         f"(exportable: {sorted(_POOLING)}); export a model trained with "
                         "pooling='mean'")
    if max_seq_length is None:
        max_seq_length = text_max_seq_length(encoder)
        _warn_if_images_do_not_fit(encoder, max_seq_length)
    staging = target.parent / f".{target.name}.exporting-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)  # left by a crash of this same process id
    staging.mkdir(parents=True)
    try:
        _save_backbone(encoder, staging / "backbone")
        model = build_sentence_transformer(encoder, staging / "backbone", max_seq_length,
                                           pooling=_POOLING[pooling])
        model.save(str(staging / "model"), create_model_card=False)
        from mmlib.model_card import sentence_transformers_card

        (staging / "model" / "README.md").write_text(sentence_transformers_card(encoder.config))
        if target.exists():
            target.rmdir()
        (staging / "model").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Path(path)


def build_sentence_transformer(encoder: MultimodalEncoder, backbone_dir: str | os.PathLike,
                               max_seq_length: int | None, pooling: str = "mean") -> SentenceTransformer:
    """The in-memory sentence-transformers model of `encoder` over a saved backbone folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        LayerNorm,
        Normalize,
        Pooling,
        Transformer,
    )

    head = encoder.projection
    hidden, embed = head.in_dim, head.embed_dim
    transformer = Transformer(str(backbone_dir), unpad_inputs=False,
                              max_seq_length=max_seq_length,
                              processor_kwargs={"chat_template": CHAT_TEMPLATE},
                              model_kwargs={"dtype": torch.float32})
    fc1, fc2, norm = (copy.deepcopy(m).float().cpu() for m in (head.fc1, head.fc2, head.norm))
    if not isinstance(head.act, torch.nn.GELU) or head.act.approximate != "none":
        raise ValueError(f"the projection's activation is {head.act!r}; the export writes nn.GELU()")
    dense1 = Dense(hidden, embed, activation_function=torch.nn.GELU(),
                   init_weight=fc1.weight.data, init_bias=fc1.bias.data)
    dense2 = Dense(embed, embed, activation_function=None,
                   init_weight=fc2.weight.data, init_bias=fc2.bias.data)
    layer_norm = LayerNorm(embed)
    if layer_norm.norm.eps != norm.eps or not norm.elementwise_affine:
        raise ValueError(f"the projection's LayerNorm ({norm}) differs from "
                         f"sentence-transformers' ({layer_norm.norm}) beyond its weights")
    layer_norm.norm.load_state_dict(norm.state_dict())
    modules = [transformer, Pooling(hidden, pooling_mode=pooling), dense1, dense2, layer_norm,
               Normalize()]
    return SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="cosine",
                               prompts=dict(encoder.config.prompts), default_prompt_name=None)


def text_max_seq_length(encoder: MultimodalEncoder) -> int | None:
    """sentence-transformers' `max_seq_length` equivalent to mmlib's `max_length`: mmlib's cap
    on text tokens plus the template's tokens around a text-only input (the whole rendered
    sequence is what sentence-transformers truncates)."""
    if encoder.config.max_length is None:
        return None
    overhead = len(encoder.processor.tokenizer(format_prompt("", False))["input_ids"])
    return encoder.config.max_length + overhead


def _warn_if_images_do_not_fit(encoder: MultimodalEncoder, max_seq_length: int | None) -> None:
    ip = encoder.processor.image_processor
    max_pixels = getattr(ip, "max_pixels", None) or dict(ip.size).get("longest_edge")
    if max_seq_length is None or not max_pixels:
        return
    tok = encoder.processor.tokenizer
    image_tokens = max_pixels // (ip.patch_size * ip.merge_size) ** 2
    needed = len(tok(format_prompt("", True))["input_ids"]) - 1 + image_tokens
    if needed > max_seq_length:
        logger.warning(
            "max_seq_length=%d (max_length plus the template) is shorter than the largest image "
            "the processor makes (%d tokens with the template): sentence-transformers will refuse "
            "such images. Lower the image size (extra.image_max_pixels) or pass a larger "
            "max_seq_length (long texts are then cut later than in mmlib)", max_seq_length, needed)


def _save_backbone(encoder: MultimodalEncoder, folder: Path) -> None:
    """A standalone float32 Qwen2.5-VL folder: LoRA merged into a copy, processor alongside."""
    from mmlib.hf_utils import quiet_hf

    with quiet_hf():
        backbone = copy.deepcopy(encoder.backbone)
        if encoder.config.use_lora:
            backbone = backbone.merge_and_unload()
        backbone = backbone.to(device="cpu", dtype=torch.float32)
        backbone.save_pretrained(folder, safe_serialization=True)
        encoder.processor.save_pretrained(folder)


def _encoder_folder(run_or_model: Path) -> Path:
    """A saved encoder folder: the argument itself, or the `final/` model of a run folder."""
    from mmlib.saving import CONFIG_FILE

    for candidate in (run_or_model, run_or_model / "final"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{run_or_model} is neither a saved encoder (no {CONFIG_FILE}) nor a "
                            "run folder with a final/ model: pass the output_dir of a finished "
                            "training run or a save_pretrained folder")


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m mmlib.export RUN_DIR OUT_DIR`."""
    parser = argparse.ArgumentParser(prog="python -m mmlib.export", description=(
        "Export a trained mmlib encoder (a run folder or a save_pretrained folder) as a "
        "sentence-transformers model with identical embeddings."))
    parser.add_argument("run_dir", type=Path, help="training output_dir (uses final/) or a "
                        "save_pretrained folder")
    parser.add_argument("out_dir", type=Path, help="new or empty folder to write")
    parser.add_argument("--device", default="cpu", help="device to load the encoder on (default cpu)")
    args = parser.parse_args(argv)
    from mmlib.encoder import MultimodalEncoder

    folder = _encoder_folder(args.run_dir)
    encoder = MultimodalEncoder.from_pretrained(folder, device=args.device)
    out = to_sentence_transformers(encoder, args.out_dir)
    print(f"exported {folder} -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
