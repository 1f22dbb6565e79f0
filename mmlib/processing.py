"""Turning texts and images into Qwen2.5-VL inputs.

Each input is one user turn of the Qwen chat format, with the image placeholder first when
there is an image:

    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>a red circle<|im_end|>

The processor expands `<|image_pad|>` to one token per merged 28x28 patch and returns
everything the model needs. Pass its *whole* output on: without `mm_token_type_ids`
Qwen2.5-VL silently falls back to 1-D positions instead of M-RoPE.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | str | os.PathLike

VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class ImageLoadError(ValueError):
    """An image could not be read: missing, not an image, or truncated."""


def load_image(image: ImageLike) -> Image.Image:
    """Open (or pass through) an image as fully decoded RGB; errors name the file."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
    path = Path(image)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not deep in the processor
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise ImageLoadError(f"image file not found: '{path}'") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"'{path}' is not a readable image file") from e
    except (OSError, SyntaxError) as e:
        raise ImageLoadError(f"cannot decode image '{path}' (truncated or corrupt?): {e}") from e


def format_prompt(text: str | None, has_image: bool) -> str:
    """The user turn for one input (the chat template's user turn, without a system turn)."""
    return f"<|im_start|>user\n{VISION_PLACEHOLDER if has_image else ''}{text or ''}<|im_end|>"


def _truncate(tokenizer: Any, text: str, max_length: int | None) -> str:
    if max_length is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_length else tokenizer.decode(ids[:max_length])


def count_inputs(texts: Sequence[Any] | None, images: Sequence[Any] | None, caller: str) -> int:
    """Number of inputs of a texts/images call: item i is texts[i] and/or images[i]."""
    if texts is None and images is None:
        raise ValueError(f"{caller} needs texts, images or both")
    n = len(texts if texts is not None else images)
    if n == 0:
        raise ValueError(f"{caller}: empty input, pass at least one text or image")
    if texts is not None and images is not None and len(texts) != len(images):
        raise ValueError(f"texts and images pair up one to one, got {len(texts)} texts "
                         f"and {len(images)} images")
    return n


def build_inputs(
    processor: Any,
    texts: Sequence[str | None] | None = None,
    images: Sequence[ImageLike | None] | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Processor batch for N inputs: item i is texts[i] and/or images[i] (either may be None).

    `max_length` caps the text tokens of each input (image tokens are never cut, which would
    break the image/token correspondence).
    """
    n = count_inputs(texts, images, "build_inputs")
    texts = list(texts) if texts is not None else [None] * n
    images = list(images) if images is not None else [None] * n
    prompts, pil_images = [], []
    for i, (text, image) in enumerate(zip(texts, images, strict=True)):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"input {i}: text must be a str or None, got {type(text).__name__}")
        if text is None and image is None:
            raise ValueError(f"input {i} has neither text nor image")
        if image is not None:
            pil_images.append(load_image(image))
        prompts.append(format_prompt(_truncate(processor.tokenizer, text or "", max_length),
                                     image is not None))
    batch = processor(text=prompts, images=pil_images or None, padding=True, return_tensors="pt")
    return dict(batch)
