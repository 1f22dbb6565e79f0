"""Write a few real photographs from scikit-image's bundled (offline) sample data.

    python data_samples/make_photos.py --out data_samples/photos

Each image is resized so its long side is at most 224 px and saved as JPEG (quality 85);
``captions.jsonl`` holds one caption per image, written for this project. The sources are
public domain / CC0 (see data_samples/README.md). Deterministic for a given Pillow and
scikit-image version.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

MAX_SIDE = 224
QUALITY = 85

# skimage.data loader name -> caption (written for this project)
PHOTOS = {
    "astronaut": "an astronaut in an orange space suit smiling in front of an American flag "
                 "and a space shuttle model",
    "coffee": "a red cup of espresso on a red saucer with a spoon on a wooden table",
    "chelsea": "a close-up of a tabby cat with green eyes looking at the camera",
    "rocket": "a rocket on a launch pad between tall towers under a dark blue evening sky",
    "camera": "a black and white photo of a man in a dark coat looking through a camera "
              "on a tripod in a field",
    "hubble_deep_field": "a deep space image of countless small galaxies and stars on a "
                         "black background",
    "coins": "a grey photo of rows of ancient coins on a dark background",
    "retina": "a medical photograph of a human retina with red blood vessels and a bright "
              "optic disc",
}


def load(name: str) -> Image.Image:
    """Load one skimage.data image (bundled with scikit-image, no network) as PIL."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def make_photos(out_dir: str | Path = "data_samples/photos", max_side: int = MAX_SIDE) -> Path:
    """Write the JPEGs and captions.jsonl under `out_dir`; returns the captions path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, text in PHOTOS.items():
        img = load(name)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        scale = max_side / max(img.size)
        if scale < 1:
            size = (round(img.width * scale), round(img.height * scale))
            img = img.resize(size, Image.Resampling.LANCZOS)
        fname = f"{name}.jpg"
        img.save(out / fname, format="JPEG", quality=QUALITY, optimize=True)
        rows.append({"image": fname, "text": text, "source": f"skimage.data.{name}()"})
    captions = out / "captions.jsonl"
    with open(captions, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return captions


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data_samples/photos", help="output folder")
    p.add_argument("--max-side", type=int, default=MAX_SIDE, help="longest side in pixels")
    args = p.parse_args(argv)
    path = make_photos(args.out, args.max_side)
    print(f"wrote {len(PHOTOS)} photos and {path}")


if __name__ == "__main__":
    main()
