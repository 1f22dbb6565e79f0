"""MRL vs the full-width-only baseline, before and after the batch-sampler change.

    python benchmarks/compare_mrl_full.py                 # 4 runs x 300 steps, ~6 min on 2 CPU cores
    python benchmarks/compare_mrl_full.py --steps 300 1200 2000 --samplers no_duplicates  # ~25 min

Trains `configs/tiny_mrl.yaml` and `configs/tiny_full.yaml` (they differ only in `loss`) once per
batch sampler (`length_grouped`, the old default, and `no_duplicates`, the new one) on the
multi-caption synthetic set (`manifest: synthetic:1920`: 1920 images, 1203 held-out test captions of 303
images), then evaluates each final model on the test split with the image-caption protocol
(unique images; image->text hit if any caption is in the top k) and 95 % percentile-bootstrap
intervals over queries. Prints a Markdown table and writes compare_mrl_full.csv (and
compare_mrl_full_encodes.csv) to runs/compare, or to `--results benchmarks/results` for the
committed copies, keeping the rows of earlier invocations' other runs.

It also prints what each model's image embedding encodes, the reason truncation does or does
not hurt: the participation ratio (effective number of dimensions, (sum s^2)^2 / sum s^4 over
the squared singular values s^2 of the centred test-image embeddings) and, per attribute, how
often a test image's attribute is its nearest class centroid of the train images (cosine, all
E numbers; chance = 1 / number of values: shape and colour 0.125, size 0.5, position 0.2). A model that encodes only a handful of directions
loses little when truncated to 8 numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmlib.data import ImageTextDataset  # noqa: E402
from mmlib.encoder import MultimodalEncoder  # noqa: E402
from mmlib.evaluation import evaluate_dataset  # noqa: E402
from mmlib.runs import finished  # noqa: E402
from mmlib.synthetic import ATTRIBUTES, resolve_manifest  # noqa: E402
from mmlib.train import TrainConfig, Trainer  # noqa: E402

METRICS = ("q2t_top1", "q2t_top5", "t2q_top1", "t2q_top5")
LOSSES = {"MRL": "configs/tiny_mrl.yaml", "full-width only": "configs/tiny_full.yaml"}


def run(config: str, sampler: str, out: Path, steps: int) -> tuple[MultimodalEncoder, bool]:
    """Train one config with one sampler for `steps` into `out`, or load the run there if it
    was trained from the same settings (then True)."""
    overrides = [f"batch_sampler={sampler}", f"output_dir={out}", "overwrite=true",
                 "progress=false", "eval_every=0", "eval_split=null", f"max_steps={steps}"]
    cfg = TrainConfig.load(ROOT / config, overrides)
    if finished(out, cfg):
        return MultimodalEncoder.from_pretrained(out / "final"), True
    trainer = Trainer(cfg)
    trainer.train()
    trainer.close()
    return trainer.encoder, False


def training_seconds(folder: Path) -> float | None:
    """The run's training time as its metrics.jsonl logged it (`elapsed_s` of the last step)."""
    log = pd.read_json(folder / "metrics.jsonl", lines=True)
    return float(log["elapsed_s"].dropna().iloc[-1]) if "elapsed_s" in log else None


def what_it_encodes(encoder: MultimodalEncoder, manifest: str, n_train: int = 600) -> dict[str, float]:
    """Participation ratio of the test images' embeddings and nearest-centroid accuracy of each
    attribute (centroids from `n_train` train images)."""
    path = Path(resolve_manifest(manifest))
    first: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        first.setdefault(row["image_id"], row)
    train = [r for r in first.values() if r["split"] == "train"][:n_train]
    test = [r for r in first.values() if r["split"] == "test"]
    emb = {name: encoder.encode_images([str(path.parent / r["image"]) for r in rows],
                                       show_progress=False).double().numpy()
           for name, rows in (("train", train), ("test", test))}
    s2 = np.linalg.svd(emb["test"] - emb["test"].mean(0), compute_uv=False) ** 2
    out = {"participation_ratio": float(s2.sum() ** 2 / (s2 ** 2).sum())}
    for attr in ATTRIBUTES:
        values = sorted({r["attributes"][attr] for r in train})
        labels = np.array([values.index(r["attributes"][attr]) for r in train])
        centroids = np.stack([emb["train"][labels == v].mean(0) for v in range(len(values))])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        guess = (emb["test"] @ centroids.T).argmax(1)
        truth = np.array([values.index(r["attributes"][attr]) for r in test])
        out[f"probe_{attr}"] = float((guess == truth).mean())
    return out


def cell(df: pd.DataFrame, dim: int, metric: str) -> str:
    """'24.1 [21.7, 26.6]' in percent."""
    v, lo, hi = (100 * df.loc[dim, f"{metric}{s}"] for s in ("", "_lo", "_hi"))
    return f"{v:.1f} [{lo:.1f}, {hi:.1f}]"


def main(argv: list[str] | None = None) -> None:
    """Train the four runs, evaluate with CIs, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[None],
                        help="max_steps of the runs, one set of runs each (default: the configs')")
    parser.add_argument("--samplers", nargs="+", default=["length_grouped", "no_duplicates"])
    parser.add_argument("--out", default=str(ROOT / "runs" / "compare"), help="the runs' folders")
    parser.add_argument("--results", default=None,
                        help="where compare_mrl_full.csv and compare_mrl_full_encodes.csv go (default: "
                             "--out; the committed copies: benchmarks/results)")
    args = parser.parse_args(argv)

    cfg = TrainConfig.load(ROOT / LOSSES["MRL"])
    test = ImageTextDataset(cfg.manifest, split="test")
    dims = cfg.encoder.resolved_mrl_dims()
    print(f"test split: {len(test)} captions of {len(set(test.image_ids))} images; dims {dims}")

    rows, encodes = [], {}
    for steps, sampler, (name, config) in itertools.product(args.steps, args.samplers, LOSSES.items()):
        steps = steps or cfg.max_steps
        suffix = "" if steps == cfg.max_steps else f"-{steps}"
        folder = Path(args.out) / f"{sampler}-{Path(config).stem}{suffix}"
        encoder, loaded = run(config, sampler, folder, steps)
        seconds = training_seconds(folder)
        df = evaluate_dataset(encoder.eval(), test, dims=dims, ci=0.95, show_progress=False)
        took = f"{'loaded, ' if loaded else ''}trained in {seconds:.0f} s"
        print(f"{steps:>5} steps {sampler:>15} {name:>16}: {took}, full-width q2t_top1 "
              f"{df.loc[dims[-1], 'q2t_top1']:.3f}", flush=True)
        encodes[(steps, sampler, name)] = what_it_encodes(encoder, cfg.manifest)
        for dim in dims:
            rows.append({"steps": steps, "sampler": sampler, "model": name, "dim": dim,
                         "train_s": None if seconds is None else round(seconds, 1),
                         **{c: df.loc[dim, c] for c in df.columns if c.startswith(METRICS)}})
        table = pd.DataFrame({f"{name}, {m}": [cell(df, d, m) for d in dims] for m in METRICS},
                             index=pd.Index(dims, name="dim"))
        print(table.to_string(), flush=True)
    print("\nwhat the image embedding encodes (test images; attribute columns: nearest-centroid "
          "accuracy)")
    encoded = pd.DataFrame(encodes).T.rename_axis(["steps", "sampler", "model"])
    print(encoded.round(2).to_string())
    results = Path(args.results or args.out)
    results.mkdir(parents=True, exist_ok=True)
    keys = ["steps", "sampler", "model"]
    for path, new in ((results / "compare_mrl_full.csv", pd.DataFrame(rows)),
                      (results / "compare_mrl_full_encodes.csv", encoded.reset_index())):
        old = pd.read_csv(path) if path.is_file() else None
        if old is not None and set(keys) <= set(old.columns):  # keep other runs' earlier rows
            done = set(map(tuple, new[keys].astype(str).values))
            new = pd.concat([old[[tuple(k) not in done for k in old[keys].astype(str).values]], new])
        elif old is not None:
            print(f"{path} has no {keys} columns (an older layout): replaced")
        new.sort_values(keys, kind="stable").to_csv(path, index=False)
        print(f"wrote {path} (with earlier invocations' other runs)")


if __name__ == "__main__":
    main()
