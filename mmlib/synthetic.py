"""Generate a synthetic, compositional image–caption set (PIL-drawn scenes, 3-5 captions each).

Each image shows one *main* object (shape x color x size x position) on a grey gradient /
speckle background, plus 0-2 smaller *distractors* whose shape and color both differ from
the main object's. Each image gets 3-5 captions: word-order and phrasing variants of the same
attributes ("a large red circle on the left", "on the left, a big red circle", "a red circle,
large, at the left side", ...), sometimes mentioning one distractor ("... next to a blue
square"). One manifest row per caption; the rows of an image share its file and `image_id`.

    python -m mmlib.synthetic --out data_samples/synthetic --n 600 --seed 0   # committed sample
    python -m mmlib.synthetic --out data_samples/generated/synthetic --n 1920  # >= 1000 test captions
    ImageTextDataset("synthetic:1920", split="test")   # the same set as a manifest spec: generated
                                                       # once into $MMLIB_CACHE, then reused

Deterministic: the same arguments give byte-identical PNGs and manifest. Image i does not
depend on ``n`` as long as n stays on the same side of the 640 attribute combinations (its
hard negatives may, since they prefer captions present in the set). The split
(train/validation/test, ~70/15/15) is a hash of the main object's attributes, so a held-out
image shows an attribute *combination* never seen in training (each attribute value is).
Beyond 640 images combinations repeat, and then every image mentions a distractor that no
other image of its combination contains, so that each caption is true of exactly one image.

Manifest rows (``manifest.jsonl``)::

    {"image": "images/000000.png", "image_id": "000000", "text": "...", "split": "train",
     "attributes": {"shape", "color", "size", "position", "image_size", "background",
                    "distractors": [{"shape", "color", "mentioned"}]},
     "hard_negatives": ["same caption with one main attribute changed", ...]}
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "semicircle")
COLORS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 200),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SIZES = {"small": 0.30, "large": 0.56}  # object diameter as a fraction of the image side
POSITIONS = {  # object centre (x, y) as fractions of the image side
    "left": (0.27, 0.50),
    "right": (0.73, 0.50),
    "top": (0.50, 0.27),
    "bottom": (0.50, 0.73),
    "center": (0.50, 0.50),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
DISTRACTOR_SIZE = 0.17  # distractor diameter as a fraction of the image side
IMAGE_SIZES = (56, 84, 112)  # multiples of 28 (Qwen2.5-VL: 14 px patches, 2x2 merge)
SPLITS = (("train", 70), ("validation", 85), ("test", 100))  # cumulative percent

# Fixed palette: object colors first, then background greys (muted, so colors stay salient
# and black / white stay distinct from the background).
N_GREYS = 24
GREY_LEVELS = np.linspace(60, 200, N_GREYS).round().astype(int).tolist()
PALETTE = [c for rgb in COLORS.values() for c in rgb] + [g for g in GREY_LEVELS for _ in range(3)]
COLOR_INDEX = {name: i for i, name in enumerate(COLORS)}
GREY0 = len(COLORS)
BG_LO, BG_HI = 5, 19  # background gradients use greys in this index range (~90-175)

ATTRIBUTES = ("shape", "color", "size", "position")
VALUES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": tuple(POSITIONS)}


def article(word: str) -> str:
    """'a' or 'an' for the given next word."""
    return "an" if word[0] in "aeiou" else "a"


SIZE_WORDS = {"small": "little", "large": "big"}  # the phrasing variants' synonyms
POSITION_WORDS = {
    "left": "at the left side",
    "right": "at the right side",
    "top": "near the top",
    "bottom": "near the bottom",
    "center": "in the middle",
}
N_TEMPLATES = 5
CAPTIONS_PER_IMAGE = (3, 5)  # inclusive range
GENERATOR_VERSION = 2  # bump whenever the output of generate() changes


def caption(attrs: dict, mention: dict | None = None, template: int = 0) -> str:
    """Caption of the main object in phrasing `template` (0 = "a large red circle on the
    left"), optionally mentioning one distractor. Each template is injective and no two
    templates can produce the same string."""
    size, color, shape = attrs["size"], attrs["color"], attrs["shape"]
    pos, pos2, size2 = POSITION_PHRASES[attrs["position"]], POSITION_WORDS[attrs["position"]], SIZE_WORDS[size]
    other = f"{article(mention['color'])} {mention['color']} {mention['shape']}" if mention else None
    if template == 0:
        text, tail = f"a {size} {color} {shape} {pos}", " next to {}"
    elif template == 1:
        text, tail = f"{pos}, a {size2} {color} {shape}", " next to {}"
    elif template == 2:
        text, tail = f"{article(color)} {color} {shape}, {size}, {pos2}", ", beside {}"
    elif template == 3:
        text, tail = f"there is a {size2} {color} {shape} {pos2}", " beside {}"
    elif template == 4:
        text, tail = f"the {shape} {pos} is {size} and {color}", ", with {} nearby"
    else:
        raise ValueError(f"template must be in 0..{N_TEMPLATES - 1}, got {template!r}")
    return text + tail.format(other) if other else text


def split_of(attrs: dict) -> str:
    """Stable split from a hash of the main object's attribute combination."""
    key = "|".join(str(attrs[a]) for a in ATTRIBUTES)
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return next(name for name, upper in SPLITS if bucket < upper)


def all_combinations() -> list[dict]:
    """Every main-object attribute combination, in a fixed order."""
    return [dict(zip(ATTRIBUTES, vals, strict=True)) for vals in itertools.product(*VALUES.values())]


# --------------------------------------------------------------------------------- drawing
def _regular(cx: float, cy: float, r: float, n: int, start: float, inner: float = 0.0) -> list:
    """Vertices of a regular polygon (or a star when inner > 0)."""
    pts = []
    steps = 2 * n if inner else n
    for k in range(steps):
        rad = r if (not inner or k % 2 == 0) else r * inner
        a = start + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: int):
    """Draw `shape` centred at (cx, cy) with radius r (half the diameter), palette index fill."""
    up = -math.pi / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_regular(cx, cy, r, 5, up, inner=0.45), fill=fill)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "ring":
        width = max(2, round(0.38 * r))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=width)
    elif shape == "semicircle":  # flat side down, centred on its bounding box
        oy = cy + 0.5 * r
        draw.pieslice((cx - r, oy - r, cx + r, oy + r), 180, 360, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """Palette-index array: flat or linear grey gradient, plus random grey speckle."""
    lo, hi = sorted(rng.integers(BG_LO, BG_HI + 1, size=2).tolist())
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    kind = ("flat", "horizontal", "vertical", "diagonal")[int(rng.integers(4))]
    ramp = {"flat": np.zeros_like(xx), "horizontal": xx, "vertical": yy, "diagonal": (xx + yy) / 2}[kind]
    if rng.random() < 0.5:
        ramp = 1 - ramp
    arr = (lo + np.round(ramp * (hi - lo))).astype(np.uint8) + GREY0
    density = float(rng.uniform(0.0, 0.08))
    mask = rng.random((size, size)) < density
    arr[mask] = GREY0 + rng.integers(0, N_GREYS, size=int(mask.sum()))
    return arr, f"{kind} gradient, {density:.0%} speckle" if kind != "flat" else f"flat, {density:.0%} speckle"


def _overlaps(box: tuple, boxes: list[tuple], margin: float) -> bool:
    x0, y0, x1, y1 = box
    return any(
        x0 < b[2] + margin and b[0] - margin < x1 and y0 < b[3] + margin and b[1] - margin < y1
        for b in boxes
    )


def render(rng: np.random.Generator, attrs: dict, image_size: int, n_distractors: int):
    """Render one scene; returns (PIL palette image, background description, distractors)."""
    arr, bg = background(rng, image_size)
    img = Image.fromarray(arr, mode="P")
    img.putpalette(PALETTE)
    draw = ImageDraw.Draw(img)
    s = image_size
    fx, fy = POSITIONS[attrs["position"]]
    cx = (fx + rng.uniform(-0.03, 0.03)) * s
    cy = (fy + rng.uniform(-0.03, 0.03)) * s
    r = SIZES[attrs["size"]] * rng.uniform(0.92, 1.08) * s / 2
    draw_shape(draw, attrs["shape"], cx, cy, r, COLOR_INDEX[attrs["color"]])
    boxes = [(cx - r, cy - r, cx + r, cy + r)]
    distractors = []
    for _ in range(n_distractors):
        shape = str(rng.choice([x for x in SHAPES if x != attrs["shape"]]))
        color = str(rng.choice([c for c in COLORS if c != attrs["color"]]))
        dr = DISTRACTOR_SIZE * rng.uniform(0.9, 1.1) * s / 2
        for _try in range(30):  # find a free spot; give up (no distractor) if there is none
            dx, dy = rng.uniform(dr + 1, s - dr - 1, size=2)
            box = (dx - dr, dy - dr, dx + dr, dy + dr)
            if not _overlaps(box, boxes, margin=0.04 * s):
                draw_shape(draw, shape, dx, dy, dr, COLOR_INDEX[color])
                boxes.append(box)
                distractors.append({"shape": shape, "color": color})
                break
    return img, bg, distractors


# ------------------------------------------------------------------------------ generation
def plan(n: int, seed: int = 0) -> list[tuple[dict, list[int]]]:
    """Image i's main attributes and caption templates (canonical first), without drawing:
    each cycle through the 640 combinations is a fresh permutation."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    combos = all_combinations()
    out = []
    for cycle in range(math.ceil(n / len(combos))):
        perm = np.random.default_rng([seed, cycle, 20_000]).permutation(len(combos))
        for j in perm[: n - len(out)]:
            rng = np.random.default_rng([seed, len(out), 30_000])
            k = int(rng.integers(CAPTIONS_PER_IMAGE[0], CAPTIONS_PER_IMAGE[1] + 1))
            others = (1 + rng.permutation(N_TEMPLATES - 1))[: k - 1].tolist()
            out.append((combos[int(j)], [0, *others]))
    return out


def _pairs(distractors: list[dict], mentioned_only: bool = False) -> set[tuple[str, str]]:
    return {(d["color"], d["shape"]) for d in distractors if d["mentioned"] or not mentioned_only}


def _scene(seed: int, i: int, attrs: dict, templates: list[int], sizes: Sequence[int],
           always_mention: bool, taken: set, same_combo: list[list[dict]]):
    """Image i: render until its captions are new to the set and, when combinations repeat,
    until it mentions a distractor that no earlier image of its combination contains and
    contains none that one of them mentions (deterministic retries)."""
    seen = set().union(*(_pairs(d) for d in same_combo))
    seen_mentions = set().union(*(_pairs(d, mentioned_only=True) for d in same_combo))
    for attempt in range(100):
        rng = np.random.default_rng([seed, i, attempt])
        image_size = int(rng.choice(sizes))
        n_distractors = int(rng.choice([1, 2])) if always_mention else int(rng.choice([0, 1, 1, 2]))
        img, bg, distractors = render(rng, attrs, image_size, n_distractors)
        mentioned = None
        if distractors and (always_mention or rng.random() < 0.5):
            mentioned = 0
        for k, d in enumerate(distractors):
            d["mentioned"] = k == mentioned
        if always_mention and (mentioned is None or _pairs(distractors, True) & seen
                               or _pairs(distractors) & seen_mentions):
            continue
        mention = distractors[mentioned] if mentioned is not None else None
        texts = [caption(attrs, mention, t) for t in templates]
        if not taken.intersection(texts):
            full = {**attrs, "image_size": image_size, "background": bg, "distractors": distractors}
            return img, texts, full
    raise RuntimeError(f"could not find unique captions for image {i} ({attrs}); lower --n")


def hard_negatives(seed: int, i: int, attrs: dict, mention: dict | None, template: int,
                   existing: set) -> list[str]:
    """1-3 captions in this caption's phrasing with one main attribute changed (preferring
    captions of the set: those are captions of other images, never of this one)."""
    rng = np.random.default_rng([seed, i, template, 10_000])
    k = int(rng.integers(1, 4))
    order = rng.permutation(len(ATTRIBUTES)).tolist()
    out = []
    for a in (ATTRIBUTES[j] for j in order[:k]):
        options = [caption({**attrs, a: v}, mention, template) for v in VALUES[a] if v != attrs[a]]
        present = [t for t in options if t in existing]
        pool = present or options
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def generate(
    out_dir: str | Path,
    n: int = 600,
    seed: int = 0,
    sizes: Sequence[int] = IMAGE_SIZES,
    image_dir: str = "images",
) -> Path:
    """Write `n` PNG scenes, `manifest.jsonl` (3-5 rows per image) and `generator.json` (the
    arguments) under `out_dir`; returns the manifest path."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bad = [s for s in sizes if not 28 <= int(s) <= 1024]
    if not sizes or bad:
        raise ValueError(f"sizes must be image sides in pixels (28-1024), got {list(sizes)}")
    out = Path(out_dir)
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    always_mention = n > len(all_combinations())
    width = max(6, len(str(n - 1)))
    images, taken, by_combo = [], set(), {}
    for i, (attrs, templates) in enumerate(plan(n, seed)):
        combo = tuple(attrs[a] for a in ATTRIBUTES)
        same = by_combo.setdefault(combo, [])
        img, texts, full = _scene(seed, i, attrs, templates, sizes, always_mention, taken, same)
        same.append(full["distractors"])
        taken.update(texts)
        image_id = f"{i:0{width}d}"
        rel = f"{image_dir}/{image_id}.png"
        img.save(out / rel, format="PNG", optimize=True)
        images.append((rel, image_id, full, templates, texts))
    rows = []
    for i, (rel, image_id, full, templates, texts) in enumerate(images):
        mention = next((d for d in full["distractors"] if d["mentioned"]), None)
        for t, text in zip(templates, texts, strict=True):
            rows.append({"image": rel, "image_id": image_id, "text": text,
                         "split": split_of(full), "attributes": full,
                         "hard_negatives": hard_negatives(seed, i, full, mention, t, taken)})
    written = {Path(r["image"]).name for r in rows}
    for stale in (out / image_dir).glob("*.png"):  # images of an earlier, larger run
        if re.fullmatch(r"\d+\.png", stale.name) and stale.name not in written:
            stale.unlink()
    manifest = out / "manifest.jsonl"
    with open(manifest, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "generator.json").write_text(json.dumps(_params(n, seed, sizes)) + "\n")
    return manifest


def _params(n: int, seed: int, sizes: Sequence[int]) -> dict:
    return {"n": int(n), "seed": int(seed), "sizes": [int(s) for s in sizes],
            "version": GENERATOR_VERSION}


def ensure_generated(out_dir: str | Path, n: int, seed: int = 0,
                     sizes: Sequence[int] = IMAGE_SIZES) -> Path:
    """The manifest of `generate(out_dir, n, seed, sizes)`, generating it only when `out_dir`
    does not hold exactly that set yet (safe when several processes call it at once)."""
    out = Path(out_dir)
    stamp = out / "generator.json"

    def ready() -> bool:
        try:
            return json.loads(stamp.read_text()) == _params(n, seed, sizes)
        except (OSError, ValueError):
            return False

    if ready() and (out / "manifest.jsonl").is_file():
        return out / "manifest.jsonl"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, n=n, seed=seed, sizes=sizes)
    if not ready():  # another process may have finished first
        shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not ready():
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return out / "manifest.jsonl"


_SPEC = re.compile(r"^synthetic:(\d+)(?::(\d+))?$")


def resolve_manifest(manifest: str | os.PathLike) -> Path:
    """A manifest path as given, or for the spec `synthetic:N[:SEED]` the manifest of the
    synthetic set of N images (seed 0 by default), generated on first use into
    `$MMLIB_CACHE/synthetic/nN-seedS` (git-ignored under `make`) and reused after that."""
    match = _SPEC.match(str(manifest))
    if match is None:
        return Path(manifest)
    from mmlib.tiny import default_cache_dir  # the cache that holds the tiny model too

    n, seed = int(match[1]), int(match[2] or 0)
    if n < 1:
        raise ValueError(f"manifest {manifest!r}: the synthetic set needs at least one image")
    return ensure_generated(default_cache_dir() / "synthetic" / f"n{n}-seed{seed}", n=n, seed=seed)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data_samples/synthetic", help="output folder")
    p.add_argument("--n", type=int, default=600, help="number of images (3-5 captions each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=int, nargs="+", default=list(IMAGE_SIZES),
                   help="image sides to draw from (multiples of 28 suit Qwen2.5-VL)")
    args = p.parse_args(argv)
    manifest = generate(args.out, n=args.n, seed=args.seed, sizes=args.sizes)
    counts: dict[str, int] = {}
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            split = json.loads(line)["split"]
            counts[split] = counts.get(split, 0) + 1
    print(f"wrote {args.n} images, {sum(counts.values())} captions to {manifest} ({counts})")


if __name__ == "__main__":
    main()
