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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Image.Image | str | os.PathLike

VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class ImageLoadError(ValueError):
    """An image could not be read: missing, not an image, truncated, too large or too thin."""


# Qwen2-VL's smart_resize refuses images whose longer side is over 200x the shorter one.
MAX_ASPECT_RATIO = 200


def load_image(image: ImageLike) -> Image.Image:
    """Decode an image (a path or a PIL image) as the Qwen/transformers pipeline sees it.

    Like `transformers.image_utils.load_image` followed by the processor's `convert_to_rgb`:
    EXIF orientation applied, transparency (alpha band, or a palette/`transparency` key)
    composited on white, then RGB; 16-bit grey (modes I;16*, I) scaled 0..65535 -> 0..255
    instead of clipped. Errors name the file.
    """
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or f"PIL image {image.mode} {image.size[0]}x{image.size[1]}"
        return _to_rgb(image, name)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
    path = Path(image)
    try:
        img = Image.open(path)
        with img:
            _warn_if_large(img, path)
            return _to_rgb(img, str(path))
    except FileNotFoundError as e:
        raise ImageLoadError(f"image file not found: '{path}'") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"'{path}' is not a readable image file") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"'{path}' is too large to decode safely ({e}); if you trust the "
                             "file, raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None)") from e


def _warn_if_large(img: Image.Image, path: Path) -> None:
    """PIL's decompression-bomb warning does not say which file: say it (PIL's own still shows;
    capturing it with `warnings.catch_warnings` is not thread-safe, and encode prefetches)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.size[0] * img.size[1] > limit:
        warnings.warn(f"'{path}' has {img.size[0] * img.size[1]} pixels, over "
                      f"PIL.Image.MAX_IMAGE_PIXELS = {limit} (a decompression bomb?); decoding it "
                      "anyway, as PIL does below twice the limit", Image.DecompressionBombWarning,
                      stacklevel=3)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Fully decoded, upright, RGB copy of `img` (see `load_image`)."""
    try:
        img.load()  # decode now: a truncated file fails here, not deep in the processor
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError) as e:
        raise ImageLoadError(f"cannot decode image '{name}' (truncated or corrupt?): {e}") from e
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I: 16-bit grey (PNG, TIFF)
        values = np.asarray(img, dtype=np.int64)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise ImageLoadError(f"'{name}' is a {img.mode} image with values {lo}..{hi}, outside "
                                 "16-bit 0..65535: scale it to 8 bits yourself")
        grey = Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), "L")
        key = img.info.get("transparency")  # a tRNS grey value: those pixels are transparent
        img = grey if key is None else Image.merge(
            "LA", (grey, Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")))
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = img if img.mode == "RGB" else img.convert("RGB")  # exif_transpose made a copy
    ratio = max(rgb.size) / max(1, min(rgb.size))
    if ratio > MAX_ASPECT_RATIO:
        raise ImageLoadError(f"'{name}' is {rgb.size[0]}x{rgb.size[1]} pixels, aspect ratio "
                             f"{ratio:g} > {MAX_ASPECT_RATIO} (Qwen's image processor limit): crop, "
                             "pad or tile it")
    return rgb


def format_prompt(text: str | None, has_image: bool) -> str:
    """The user turn for one input (the chat template's user turn, without a system turn)."""
    return f"<|im_start|>user\n{VISION_PLACEHOLDER if has_image else ''}{text or ''}<|im_end|>"


def apply_prompt(texts: Sequence[str | None] | None, images: Sequence[Any] | None,
                 prompt: str) -> Sequence[str | None] | None:
    """`texts` with `prompt` prepended to each input's text (an image-only input gets the
    prompt as its text), so the prompt sits in the user turn after the image placeholder:
    `<|im_start|>user\n<vision>{prompt}{text}<|im_end|>`. The prompt counts towards
    `max_length` (prompt and text are truncated together), as in sentence-transformers."""
    if not prompt:
        return texts
    n = count_inputs(texts, images, "apply_prompt")
    texts = list(texts) if texts is not None else [None] * n
    out: list[str | None] = []
    for i, text in enumerate(texts):
        check_text(text, i)
        has_image = images is not None and images[i] is not None
        # An input with neither text nor image stays empty, so its error is raised later.
        out.append(prompt + (text or "") if text is not None or has_image else None)
    return out


def _truncate(tokenizer: Any, text: str, max_length: int | None) -> str:
    if max_length is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_length else tokenizer.decode(ids[:max_length])


def check_text(text: Any, index: int) -> None:
    """A text input must be None or a str that UTF-8 can encode; errors name the input."""
    if text is None:
        return
    if not isinstance(text, str):
        raise TypeError(f"input {index}: text must be a str or None, got {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: the tokenizer refuses it
            raise ValueError(
                f"input {index}: text has an invalid code point {text[e.start]!r} at character "
                f"{e.start} (a lone surrogate, e.g. from bytes decoded with 'surrogateescape'); "
                "replace invalid code points first, e.g. "
                "text.encode('utf-8', 'replace').decode('utf-8')") from e


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
        check_text(text, i)
        if text is None and image is None:
            raise ValueError(f"input {i} has neither text nor image")
        if image is not None:
            pil_images.append(load_image(image))
        prompts.append(format_prompt(_truncate(processor.tokenizer, text or "", max_length),
                                     image is not None))
    batch = processor(text=prompts, images=pil_images or None, padding=True, return_tensors="pt")
    return dict(batch)
