"""Adaptive retrieval at a million vectors: FunnelIndex vs exact full-width FAISS IndexFlatIP.

    python benchmarks/bench_retrieval.py                      # N = 1,000,000, 1,000 queries, 2 threads
    python benchmarks/bench_retrieval.py --n 100000 --quick   # a smaller, shorter run

1. Embeds the generated synthetic set (1920 images, 7718 captions) with the trained tiny MRL and
   full-width-only models (`mmlib.runs.trained_encoder(..., steps=200)`).
2. Fits, per model, a Gaussian to the image embeddings (mean, full covariance) and one to the
   caption - image residuals; prints the per-prefix variance spectrum of real vs fitted vectors
   and the funnel's recall on the real embeddings vs fitted ones of the same size.
3. Writes N fitted corpus vectors (L2-normalised samples) as an encode_to_disk folder of .npy
   chunks, and queries = normalise(corpus row + alpha * residual sample), alpha set so that the
   mean query-row cosine equals the real caption-image one.
4. Runs each configuration in a fresh subprocess (numpy + faiss only, no torch), the same thread
   count for all: build time, median queries/s over repeats, peak RSS (VmHWM), recall@10
   against the exact full-width results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mmlib.retrieval import FittedEmbeddings

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "data_samples/generated/synthetic/manifest.jsonl"
MODELS = {"MRL": "configs/tiny_mrl.yaml", "full-width only": "configs/tiny_full.yaml"}
CHUNK = 100_000


# -- worker (fresh process: numpy + faiss + mmlib/retrieval.py only) ---------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(spec: dict) -> dict:
    """Build one configuration, time `repeats` searches of all queries, report memory."""
    import faiss

    faiss.omp_set_num_threads(spec["threads"])
    # mmlib/retrieval.py by path: importing the package would import torch (~0.7 GB of RSS).
    module = importlib.util.spec_from_file_location("mmlib_retrieval", ROOT / "mmlib/retrieval.py")
    retrieval = importlib.util.module_from_spec(module)
    module.loader.exec_module(retrieval)
    queries = np.load(spec["queries"])
    rss_start = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if spec["method"] == "exact":
        index = faiss.IndexFlatIP(queries.shape[1])
        for _, array in retrieval._folder_rows(Path(spec["corpus"])).chunks:
            index.add(np.ascontiguousarray(array, dtype=np.float32))
        index_bytes = index.ntotal * index.d * 4

        def search():
            return index.search(queries, spec["k"])[1]
    else:
        index = retrieval.FunnelIndex(spec["corpus"], **spec["kwargs"])
        index_bytes = index.memory_bytes()

        def search():
            return index.search(queries, spec["k"])[1]
    build = time.perf_counter() - t0
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        ids = search()
        times.append(time.perf_counter() - t0)
    np.save(spec["ids_out"], ids)
    return {"build_s": build, "qps": len(queries) / float(np.median(times)),
            "peak_rss_mb": _status_kb("VmHWM") / 1024, "rss_start_mb": rss_start / 1024,
            "index_mb": index_bytes / 2 ** 20, "load": os.getloadavg()[0]}


def run_worker(spec: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"worker failed for {spec}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- real embeddings and the fitted distribution -----------------------------------------------
def real_embeddings(name: str, cache: Path) -> dict:
    """Caption and image embeddings of the whole generated set, and each caption's image."""
    from mmlib.data import ImageTextDataset
    from mmlib.evaluation import image_index
    from mmlib.inference import weights_fingerprint
    from mmlib.runs import trained_encoder
    from mmlib.synthetic import ensure_generated

    ensure_generated(MANIFEST.parent, n=1920)
    enc, source = trained_encoder(ROOT / MODELS[name], steps=200, runs_dir=ROOT / "runs")
    path = cache / f"real-{weights_fingerprint(enc)[:16]}.npz"
    if not path.is_file():
        ds = ImageTextDataset(MANIFEST)
        caption_image, first_rows = image_index(ds.image_ids)
        texts = enc.encode_texts(ds.texts, show_progress=False).numpy()
        images = enc.encode_images([ds.image_for(r) for r in first_rows], show_progress=False).numpy()
        np.savez(path, texts=texts, images=images, caption_image=np.array(caption_image))
    data = dict(np.load(path))
    data["source"] = source
    return data


def small_scale(real: dict, fitted: FittedEmbeddings, dims: list[int], shortlist: int) -> list[tuple]:
    """Funnel recall@10 on the real embeddings vs fitted vectors of the same counts."""
    from mmlib.retrieval import FunnelIndex, overlap_recall

    rng = np.random.default_rng(3)
    corpus = fitted.corpus(rng, len(real["images"]))
    queries = fitted.queries(rng, corpus[rng.integers(0, len(corpus), len(real["texts"]))])
    rows = []
    for kind, c, q in (("real", real["images"], real["texts"]), ("fitted", corpus, queries)):
        exact = FunnelIndex(c, dims=(None,), shortlists=()).search(q, k=10)[1]
        rows.append((kind, [overlap_recall(FunnelIndex(c, dims=(d, None), shortlists=(shortlist,))
                                      .search(q, k=10)[1], exact) for d in dims]))
    return rows


def write_corpus(fitted: FittedEmbeddings, folder: Path, n: int, n_queries: int, seed: int) -> Path:
    """An encode_to_disk-style folder of fitted vectors (+ queries.npy); reused when present."""
    params = {"n": n, "queries": n_queries, "seed": seed, "alpha": fitted.alpha}
    index_path = folder / "index.json"
    if index_path.is_file() and json.loads(index_path.read_text()).get("params") == params:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chunks = []
    for k, start in enumerate(range(0, n, CHUNK)):
        count = min(CHUNK, n - start)
        np.save(folder / f"embeddings-{k:05d}.npy", fitted.corpus(rng, count))
        chunks.append({"file": f"embeddings-{k:05d}.npy", "start": start, "count": count})
    rows = np.sort(rng.choice(n, size=n_queries, replace=False))
    base = np.concatenate([np.load(folder / c["file"], mmap_mode="r")[rows[(rows >= c["start"]) & (
        rows < c["start"] + c["count"])] - c["start"]] for c in chunks])
    np.save(folder / "queries.npy", fitted.queries(rng, base.astype(np.float64))[rng.permutation(n_queries)])
    index = {"count": n, "dim": base.shape[1], "dtype": "float32", "format": "npy", "chunk_size": CHUNK,
             "chunks": chunks, "complete": True, "params": params,
             "fitted": "normalise(mean + z @ chol(cov).T), z ~ N(0, I); mean/cov of the model's "
                       "image embeddings of the generated synthetic set"}
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    return folder


def configurations(width: int, quick: bool) -> list[tuple[str, dict]]:
    """(label, FunnelIndex kwargs) of every configuration benchmarked."""
    small = [d for d in (8, 16, 32, 64) if d <= width // 4]
    mid = width // 4
    ivf = {"first_stage": "ivf", "nlist": 1024, "train_size": 65536}
    out = [(f"flat d={d} S={s}", {"dims": (d, None), "shortlists": (s,)})
           for d in small for s in ((1000,) if quick else (200, 1000))]
    out += [(f"ivf d={d} nprobe={p} S={s}", {"dims": (d, None), "shortlists": (s,), "nprobe": p, **ivf})
            for d, p, s in ((16, 32, 1000), (32, 32, 400), (32, 64, 1000))]
    out += [(f"funnel flat 16->{mid}->{width} S=2000,200", {"dims": (16, mid, None), "shortlists": (2000, 200)}),
            (f"funnel ivf 16->{mid}->{width} S=2000,200", {"dims": (16, mid, None), "shortlists": (2000, 200),
                                                          "nprobe": 64, **ivf}),
            ("ivf d=32 nprobe=64 S=1000 reads=mmap", {"dims": (32, None), "shortlists": (1000,), "nprobe": 64,
                                                     "reads": "mmap", **ivf})]
    if not quick:
        out += [("flat int8 d=32 S=1000", {"dims": (32, None), "shortlists": (1000,), "precision": "int8"}),
                ("flat binary d=64 S=1000", {"dims": (64, None), "shortlists": (1000,), "precision": "binary"}),
                ("hnsw d=32 M=16 S=400", {"dims": (32, None), "shortlists": (400,), "first_stage": "hnsw",
                                          "hnsw_m": 16, "ef_construction": 40, "ef_search": 400})]
    return [(label, kw) for label, kw in out if all(d is None or d < width for d in kw["dims"][:-1])]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--cache", type=Path, default=None,
                   help="where corpora go (default $MMLIB_CACHE/bench_retrieval)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from mmlib.retrieval import FittedEmbeddings, overlap_recall, variance_spectrum
    from mmlib.tiny import default_cache_dir

    cache = args.cache or default_cache_dir() / "bench_retrieval"
    cache.mkdir(parents=True, exist_ok=True)
    print(f"N={args.n:,} corpus vectors, {args.queries} queries, k={args.k}, {args.threads} threads "
          f"(faiss + BLAS), median of {args.repeats}; loadavg {os.getloadavg()[0]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    for name in args.models:
        real = real_embeddings(name, cache)
        width = real["images"].shape[1]
        dims = [d for d in (8, 16, 32, 64, 128) if d < width] + [width]
        fitted = FittedEmbeddings(real["images"], real["texts"], real["caption_image"])
        print(f"\n## {name} ({real['source']}): {len(real['images'])} images, {len(real['texts'])} "
              f"captions, E={width}; real caption-image cosine {fitted.target_cos:.3f}, alpha "
              f"{fitted.alpha:.3f}", flush=True)
        sample = fitted.corpus(np.random.default_rng(4), 20000)
        print("variance share of the first d coords  " + " ".join(f"d={d:<5}" for d in dims))
        for kind, x in (("real image embeddings", real["images"]), ("fitted samples", sample)):
            print(f"  {kind:36s}" + " ".join(f"{v:7.3f}" for v in variance_spectrum(x, dims)))
        small = [d for d in dims if d <= width // 4]
        print("recall@10 of flat d -> E, shortlist 50, on 1920 images / 7718 captions:  "
              + " ".join(f"d={d:<5}" for d in small))
        for kind, rec in small_scale(real, fitted, small, 50):
            print(f"  {kind:70s}" + " ".join(f"{v:7.3f}" for v in rec), flush=True)

        folder = write_corpus(fitted, cache / f"{name.split()[0].lower()}-n{args.n}-q{args.queries}",
                              args.n, args.queries, seed=0)
        base = {"corpus": str(folder), "queries": str(folder / "queries.npy"), "k": args.k,
                "threads": args.threads, "repeats": args.repeats}
        exact = run_worker({**base, "method": "exact", "ids_out": str(cache / "ids-exact.npy")},
                           args.threads)
        truth = np.load(cache / "ids-exact.npy")
        print(f"\n{'method':38s} {'recall@10':>9s} {'q/s':>8s} {'speed-up':>8s} {'build s':>8s} "
              f"{'index MB':>9s} {'peak RSS MB':>11s} {'load':>5s}")
        print(f"{'exact IndexFlatIP d=' + str(width):38s} {1.0:9.3f} {exact['qps']:8.1f} {1.0:8.2f} "
              f"{exact['build_s']:8.1f} {exact['index_mb']:9.0f} {exact['peak_rss_mb']:11.0f} "
              f"{exact['load']:5.1f}", flush=True)
        for label, kwargs in configurations(width, args.quick):
            res = run_worker({**base, "method": "funnel", "kwargs": kwargs,
                              "ids_out": str(cache / "ids-funnel.npy")}, args.threads)
            rec = overlap_recall(np.load(cache / "ids-funnel.npy"), truth)
            print(f"{label:38s} {rec:9.3f} {res['qps']:8.1f} {res['qps'] / exact['qps']:8.2f} "
                  f"{res['build_s']:8.1f} {res['index_mb']:9.0f} {res['peak_rss_mb']:11.0f} "
                  f"{res['load']:5.1f}", flush=True)
    print(f"\nloadavg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
