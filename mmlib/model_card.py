"""Model cards (README.md) for saved and exported encoders: what the model is, its Matryoshka
dims, how it was trained and evaluated when known, and how to load it."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from mmlib.config import EncoderConfig

_KEY_FIELDS = ("model_path", "embed_dim", "temperature", "use_lora", "lora_r", "freeze_backbone",
               "max_length", "learning_rate", "batch_size", "seed")


def _summary(config: EncoderConfig) -> list[str]:
    dims = config.resolved_mrl_dims()
    lines = [
        f"- Base model: `{config.model_path}` (Qwen2.5-VL backbone)",
        f"- Embedding width: {config.embed_dim}; Matryoshka dims: {', '.join(map(str, dims))} "
        "(any prefix of these lengths, re-normalised, is itself an embedding)",
        "- Pipeline: Qwen2.5-VL → mean pooling over the tokens → Linear → GELU → Linear → "
        "LayerNorm → L2 norm",
        f"- Text cap: {config.max_length} tokens per input (prompt included)",
    ]
    if config.prompts:
        lines.append("- Prompts (prepended to an input's text, after the image): " + ", ".join(
            f"`{name}`: {text!r}" for name, text in config.prompts.items()))
    return lines


def _evaluation_table(evaluation: pd.DataFrame) -> list[str]:
    cols = [c for c in evaluation.columns if c.startswith(("q2t_top", "t2q_top"))
            and not c.endswith(("_lo", "_hi"))] or list(evaluation.columns)
    df = evaluation[cols].round(4)
    header = "| dim | " + " | ".join(cols) + " |"
    rule = "|" + "---|" * (len(cols) + 1)
    rows = [f"| {idx} | " + " | ".join(f"{v:g}" for v in row) + " |" for idx, row in df.iterrows()]
    return ["## Evaluation", "",
            "Retrieval per Matryoshka dim (`q2t`: text→image, `t2q`: image→text, top-k hit rate):",
            "", header, rule, *rows, ""]


def mmlib_card(config: EncoderConfig, evaluation: pd.DataFrame | None = None,
               training: dict[str, Any] | None = None) -> str:
    """README.md of a `save_pretrained` folder."""
    dims = config.resolved_mrl_dims()
    fields = {k: config.to_dict()[k] for k in _KEY_FIELDS}
    lines = ["# mmlib multimodal embedding model", "",
             "Image and text embeddings in one space, trained with Matryoshka representation "
             "learning (mmlib).", "", *_summary(config), "",
             "## Configuration", "", "```json", json.dumps(fields, indent=2), "```",
             "(the full config is `mmlib_config.json`)", ""]
    if training:
        lines += ["## Training", "", "```json", json.dumps(training, indent=2, default=str), "```", ""]
    if evaluation is not None and len(evaluation):
        lines += _evaluation_table(evaluation)
    lines += [
        "## Use with mmlib", "", "```python", "from mmlib import MultimodalEncoder",
        "enc = MultimodalEncoder.from_pretrained('path/to/this/folder')",
        f"q = enc.encode_queries(texts=['a red circle'], dim={dims[0]})",
        "d = enc.encode_documents(images=['photo.jpg'])", "```", "",
        "## Use with sentence-transformers", "",
        "Export first (identical embeddings): `python -m mmlib.export path/to/this/folder "
        "exported/`, then see the exported folder's README.", ""]
    return "\n".join(lines)


def sentence_transformers_card(config: EncoderConfig) -> str:
    """README.md of a `mmlib.export.to_sentence_transformers` folder."""
    dims = config.resolved_mrl_dims()
    prompt = ", prompt_name='query'" if "query" in config.prompts else ""
    lines = [
        "---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, matryoshka, multimodal, mmlib]", "---", "",
        "# mmlib multimodal embedding model (sentence-transformers export)", "",
        "Exported from mmlib with `mmlib.export.to_sentence_transformers`: embeddings equal "
        "mmlib's `encode` (texts, images, image+text).", "", *_summary(config), "",
        "## Usage", "", "```python", "from sentence_transformers import SentenceTransformer",
        "from PIL import Image", "model = SentenceTransformer('path/to/this/folder')",
        f"texts = model.encode(['a red circle']{prompt})",
        "images = model.encode([Image.open('photo.jpg')])",
        "both = model.encode([{'image': Image.open('photo.jpg'), 'text': 'a caption'}])", "```", "",
        "## Matryoshka dims", "",
        f"Trained dims: {', '.join(map(str, dims))}. Truncate with `truncate_dim` AND pass "
        "`normalize_embeddings=True`: sentence-transformers does not re-normalise a truncated "
        "embedding otherwise (cosine similarity is unaffected, dot products are).", "",
        "```python",
        f"small = model.encode(['a red circle'], truncate_dim={dims[0]}, normalize_embeddings=True)",
        "```", "",
        "## Notes", "",
        "- Inputs are rendered by this folder's chat template (Qwen's, without the default system "
        "turn); a prompt is placed in the user turn after the image. Keep the template.",
        "- `max_seq_length` covers the text cap plus the template's tokens. A text longer than "
        "the cap paired with an image is truncated differently from mmlib (here the image tokens "
        "count too).", ""]
    return "\n".join(lines)
