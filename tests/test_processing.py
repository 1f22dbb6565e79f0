"""mmlib.processing: images decode like the Qwen/transformers pipeline; texts are checked."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image as hf_load_image

from mmlib.processing import ImageLoadError, build_inputs, load_image


def quadrants(w: int = 48, h: int = 32) -> np.ndarray:
    """An upright (h, w, 3) image with four distinct solid quadrants (any flip or turn shows)."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 0)
    return a


def as_input(path, kind: str):
    """The same image as a path, a str, or an already opened PIL image."""
    return {"path": path, "str": str(path), "pil": Image.open(path)}[kind]


# EXIF orientation -> how the stored pixels relate to the upright picture (EXIF spec:
# 3 = stored turned 180 degrees, 6 = display needs a clockwise turn, 8 = counter-clockwise).
STORED = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


@pytest.mark.parametrize("kind", ["path", "pil"])
@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_is_applied(tmp_path, orientation, kind):
    upright = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(
        path, quality=100, subsampling=0, exif=exif)
    got = load_image(as_input(path, kind))
    assert got.mode == "RGB" and got.size == (upright.shape[1], upright.shape[0])
    assert np.abs(np.asarray(got, dtype=int) - upright).mean() < 2  # JPEG: near exact
    assert np.array_equal(np.asarray(got), np.asarray(hf_load_image(str(path))))


def test_rgba_la_and_palette_transparency_composite_on_white(tmp_path):
    alpha = np.array([[0, 128, 255, 64]], dtype=np.uint8).repeat(3, 0)
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 10
    want = np.rint(rgb * (alpha[..., None] / 255) + 255 * (1 - alpha[..., None] / 255))
    cases = {"rgba.png": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
             "la.png": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")}
    wants = {"rgba.png": want, "la.png": want[..., :1].repeat(3, -1)}
    # Palette with a transparent index 0: those pixels become white, the rest keep their colour.
    pal = Image.fromarray(np.array([[0, 1], [2, 0]], dtype=np.uint8), "P")
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60] + [0] * 759)
    cases["p.png"] = pal
    wants["p.png"] = np.array([[[255] * 3, [10, 20, 30]], [[40, 50, 60], [255] * 3]])
    for name, img in cases.items():
        path = tmp_path / name
        img.save(path, **({"transparency": 0} if name == "p.png" else {}))
        for kind in ("path", "pil"):
            got = np.asarray(load_image(as_input(path, kind)), dtype=int)
            assert np.abs(got - wants[name]).max() <= 1, (name, kind)
            hf = convert_to_rgb(ImageOps.exif_transpose(Image.open(path)), return_numpy=True)
            assert np.array_equal(got, hf), (name, kind)


@pytest.mark.parametrize("kind", ["path", "pil", "mode_I"])
def test_16_bit_images_scale_to_8_bit(tmp_path, kind):
    values = np.linspace(0, 65535, 64).round().astype(np.uint16)[None].repeat(4, 0)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    image = Image.fromarray(values.astype(np.int32), "I") if kind == "mode_I" else as_input(path, kind)
    got = np.asarray(load_image(image), dtype=int)
    want = values.astype(float) * 255 / 65535
    assert got.shape == (4, 64, 3) and np.abs(got - want[..., None]).max() <= 0.5 + 1e-9
    assert got[0, 0, 0] == 0 and got[0, -1, 0] == 255 and len(np.unique(got)) > 50


def test_16_bit_transparent_grey_value_composites_on_white(tmp_path):
    path = tmp_path / "key.png"
    Image.fromarray(np.array([[0, 100, 32896, 65535]], dtype=np.uint16)).save(path, transparency=100)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 255, 128, 255]  # 32896 / 257 = 128


def test_32_bit_values_beyond_16_bit_are_refused():
    img = Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I")
    with pytest.raises(ImageLoadError, match="70000"):
        load_image(img)


@pytest.mark.filterwarnings("ignore:Image size")  # PIL's own warning, which names no file
def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    big, huge = tmp_path / "big.png", tmp_path / "huge.png"
    Image.new("RGB", (40, 40)).save(big)   # 1600 pixels: over the limit, under twice it
    Image.new("RGB", (50, 50)).save(huge)  # 2500 pixels: over twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match=r"huge\.png.*MAX_IMAGE_PIXELS"):
        load_image(huge)
    with pytest.warns(Image.DecompressionBombWarning, match=r"big\.png"):
        assert load_image(big).size == (40, 40)


@pytest.mark.parametrize("kind", ["path", "pil"])
def test_extreme_aspect_ratio_names_the_file_and_ratio(tiny_encoder, tmp_path, kind):
    ok, bad = tmp_path / "ok.png", tmp_path / "line.png"
    Image.new("RGB", (200, 1)).save(ok)
    Image.new("RGB", (1, 400)).save(bad)
    # 200 is Qwen's own limit: the processor takes 1x200 and refuses 1x201.
    build_inputs(tiny_encoder.processor, images=[load_image(as_input(ok, kind))])
    with pytest.raises(ValueError, match="aspect ratio"):
        tiny_encoder.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                               images=[Image.new("RGB", (201, 1))])
    with pytest.raises(ImageLoadError, match=r"line\.png.*aspect ratio 400"):
        load_image(as_input(bad, kind))
    with pytest.raises(ImageLoadError, match="aspect ratio 400"):
        build_inputs(tiny_encoder.processor, texts=["x"], images=[Image.new("RGB", (400, 1))])


def test_lone_surrogate_names_the_input(tiny_encoder):
    texts = ["fine", "abc\ud800", "also fine"]
    with pytest.raises(ValueError, match=r"input 1.*surrogate.*replace"):
        build_inputs(tiny_encoder.processor, texts=texts)
    for call in (lambda: tiny_encoder.encode_texts(texts),
                 lambda: tiny_encoder.encode(texts=texts, images=[None, Image.new("RGB", (56, 56)), None])):
        with pytest.raises(ValueError, match=r"input 1.*surrogate"):
            call()
    # Valid non-ASCII text (including characters outside the BMP) is untouched.
    tiny_encoder.encode_texts(["café 東京 🙂", "plain"])
