"""`make demo`: load the encoder, embed a few texts and images, print a similarity table.

    python -m mmlib.demo                 # the tiny offline model ($MMLIB_MODEL picks another)
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd
import torch
from PIL import Image, ImageDraw

from mmlib import EncoderConfig, MultimodalEncoder

SCENES = {
    "a red circle": ("red", "circle"),
    "a blue square": ("blue", "square"),
    "a green triangle": ("green", "triangle"),
}


def draw(colour: str, shape: str, size: int = 84) -> Image.Image:
    """A single coloured shape on white."""
    img = Image.new("RGB", (size, size), "white")
    d, m = ImageDraw.Draw(img), size // 5
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=colour)
    return img


def main() -> None:
    """Print embeddings and a text × image similarity table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.environ.get("MMLIB_MODEL", "tiny"))
    parser.add_argument("--dim", type=int, default=None, help="Matryoshka dim (default: full)")
    args = parser.parse_args()

    start = time.perf_counter()
    enc = MultimodalEncoder(EncoderConfig(model_path=args.model))
    print(f"loaded {args.model!r} in {time.perf_counter() - start:.1f} s on {enc.device}")
    print(enc.parameter_table().to_string(), "\n")

    texts = list(SCENES)
    images = [draw(*SCENES[t]) for t in texts]
    text_emb = enc.encode_texts(texts, dim=args.dim)
    image_emb = enc.encode_images(images, dim=args.dim)
    pair_emb = enc.encode(texts=texts, images=images, dim=args.dim)
    torch.set_printoptions(precision=4, sci_mode=False)
    for name, emb in [("text", text_emb), ("image", image_emb), ("image+text", pair_emb)]:
        print(f"{name:>10} embeddings {tuple(emb.shape)}, norms {[round(x, 4) for x in emb.norm(dim=-1).tolist()]}")
        print(f"{'':>10} first values {emb[0, :6]}")
    sim = pd.DataFrame((text_emb @ image_emb.T).numpy(), index=texts,
                       columns=[f"img: {t}" for t in texts]).round(3)
    print("\ncosine similarity, texts × images:")
    print(sim.to_string())
    if args.model == "tiny":
        print("\n(the tiny model has random weights: train it with mmlib.train for meaningful "
              "similarities)")


if __name__ == "__main__":
    main()
