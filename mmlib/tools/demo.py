"""`make demo`: the trained tiny MRL model at work on held-out captions.

    python -m mmlib.tools.demo                  # after `make train` (else trains once, cached)
    python -m mmlib.tools.demo --captions 5 --outputs outputs

Loads `runs/tiny_mrl/final` (or the same config trained here once, see `mmlib.runs`), and for
a few captions of the test split prints the top-3 test images with their cosine scores at the
smallest Matryoshka dim and at full width; then text→image top-1 per dim for the MRL model
against the full-width-only model truncated (`configs/tiny_full.yaml`), with 95 % bootstrap
intervals; then where the executed notebooks and their figures are.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from mmlib.evaluation import evaluate_image_caption, image_index
from mmlib.runs import trained_encoder
from mmlib.synthetic import ensure_generated

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = "data_samples/generated/synthetic"  # the comparison configs' set (1203 test captions)


def embed_test_split(enc, dataset) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """(caption embeddings, unique-image embeddings, caption→image index, first row per image)."""
    caption_image, first_rows = image_index(dataset.image_ids)
    texts = enc.encode_texts(dataset.texts, show_progress=False)
    images = enc.encode_images([dataset.image_for(r) for r in first_rows], show_progress=False)
    return texts, images, caption_image, first_rows


def top_k(query: torch.Tensor, images: torch.Tensor, dim: int, k: int = 3):
    """Cosine scores and indices of the k best images for each query, at prefix `dim`."""
    q, t = F.normalize(query[:, :dim], dim=-1), F.normalize(images[:, :dim], dim=-1)
    return (q @ t.T).topk(k, dim=-1)


def show_top3(dataset, texts, images, caption_image, first_rows, rows, dims) -> None:
    """Print each chosen caption's top-3 images (file names, scores) per dim; * = its image."""
    names = [Path(str(dataset.image_for(r))).name for r in first_rows]
    for row in rows:
        print(f"\n  {dataset.texts[row]!r}  (its image: {names[caption_image[row]]})")
        for dim in dims:
            scores, idx = top_k(texts[row:row + 1], images, dim)
            hits = [f"{'*' if int(i) == caption_image[row] else ' '}{names[int(i)]} {float(s):.3f}"
                    for s, i in zip(scores[0], idx[0], strict=True)]
            print(f"    dim {dim:>4}: " + "   ".join(hits))


def top1_with_ci(df: pd.DataFrame) -> pd.Series:
    """'18.8 [16.7, 21.0]' per dim: text→image top-1 % with its 95 % interval."""
    return df.apply(lambda r: f"{100 * r['q2t_top1']:.1f} "
                              f"[{100 * r['q2t_top1_lo']:.1f}, {100 * r['q2t_top1_hi']:.1f}]", axis=1)


def show_longer_training(dims: list[int]) -> None:
    """The committed benchmark's longest runs at the smallest dims: where truncation costs."""
    path = ROOT / "benchmarks" / "results" / "compare_mrl_full.csv"
    if not path.is_file():
        return
    runs = pd.read_csv(path)
    runs = runs[(runs["sampler"] == "no_duplicates") & (runs["steps"] == runs["steps"].max())]
    cells = {model: top1_with_ci(rows.set_index("dim").loc[dims]) for model, rows in runs.groupby("model")}
    print(f"\nthe same two configs trained {runs['steps'].max()} steps ({path.relative_to(ROOT)}; "
          "README 'Longer training'):")
    print(pd.DataFrame(cells).rename_axis("dim").to_string())


def main(argv: list[str] | None = None) -> None:
    """Show the trained model: top-3 images per caption, MRL vs truncation, where outputs are."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=4, help="held-out captions to show")
    parser.add_argument("--steps", type=int, default=200,
                        help="training steps when no finished run of the config exists")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs",
                        help="where `make demo` wrote the executed notebooks and figures")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    manifest = ensure_generated(ROOT / SYNTHETIC, n=1920)
    from mmlib.data import ImageTextDataset

    test = ImageTextDataset(manifest, split="test")
    models = {}
    for name in ("tiny_mrl", "tiny_full"):
        enc, source = trained_encoder(ROOT / "configs" / f"{name}.yaml", steps=args.steps,
                                      runs_dir=ROOT / "runs")
        models[name] = enc
        print(f"{name}: {source}")
    mrl = models["tiny_mrl"]
    dims = list(mrl.config.resolved_mrl_dims())
    print(f"test split: {len(test)} captions of {len(set(test.image_ids))} images; "
          f"dims {dims}; loaded in {time.perf_counter() - start:.0f} s")

    embedded = {name: embed_test_split(enc, test) for name, enc in models.items()}
    texts, images, caption_image, first_rows = embedded["tiny_mrl"]
    # A fixed, spread-out choice of held-out captions (no RNG: the same ones every run).
    rows = [round(i * (len(test) - 1) / max(1, args.captions - 1)) for i in range(args.captions)]
    print(f"\nMRL model: top-3 test images per caption at dim {dims[0]} and {dims[-1]} "
          "(cosine; * marks the caption's own image)")
    show_top3(test, texts, images, caption_image, first_rows, rows, (dims[0], dims[-1]))

    table = {}
    for name, (t, i, ci, _) in embedded.items():
        df = evaluate_image_caption(t, i, ci, dims=dims, ks=(1,), ci=0.95)
        table[name] = top1_with_ci(df)
    chance = 100 / len(first_rows)
    print(f"\ntext→image top-1 % on the test split, 95 % bootstrap interval (chance {chance:.1f} %):")
    print(pd.DataFrame({"MRL loss over all dims": table["tiny_mrl"],
                        "full-width loss, truncated": table["tiny_full"]}).to_string())
    show_longer_training(dims[:2])

    print(f"\nexecuted notebooks: {args.outputs / 'notebooks'}/ (`make demo` runs them first)")
    print(f"figures:            {args.outputs / 'figures'}/")
    print(f"committed notebooks with outputs: {ROOT / 'notebooks'}/ (`make lab` opens them)")


if __name__ == "__main__":
    main()
