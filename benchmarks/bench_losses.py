"""Benchmark: the fused Matryoshka loss vs its readable reference, a plain full-width loss and
sentence-transformers' MatryoshkaLoss (forward + backward).

Methods, all symmetric InfoNCE at temperature 0.07 on random (B, E) query / target embeddings:

- ``naive``       ``mmlib.losses.naive_matryoshka_loss``: for each dim, normalise the prefix, one
                  full similarity matmul, two cross-entropies (the readable reference).
- ``mmlib``       ``matryoshka_in_batch_negative_loss`` over the same dims (the fused equivalent).
- ``mmlib-full``  the same function with ``dims=[E]`` (one dim).
- ``plain-full``  the five-line loss one writes without MRL: ``F.normalize`` + matmul +
                  two ``F.cross_entropy`` at the full width only.
- ``st``          sentence-transformers' ``MatryoshkaLoss(MultipleNegativesRankingLoss(
                  directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                  scale=1/0.07))`` over the same dims: the same loss (checked), on a stub model that
                  returns the embeddings, so only the loss is timed.

Methods are timed round-robin (one call of each per round) so that load from other processes
hits them alike; each number is the median over rounds after warm-up. The three ratios that
answer "what do the extra dims cost" are printed side by side: ``mmlib / mmlib-full`` (four dims
vs its own one-dim call), ``mmlib / plain-full`` (vs the loss one would write without MRL) and
``st / mmlib`` (how much faster than sentence-transformers); ``naive / mmlib`` too. At every size
the script first checks that mmlib, the naive reference and sentence-transformers agree (loss and
gradients) and prints the largest differences.

On a shared machine the timings move with the load from other processes (each multithreaded
elementwise op can stall for a scheduler slice); round-robin timing keeps the ratios comparable.

Usage::

    python benchmarks/bench_losses.py                      # B = 256, 1024, 4096
    python benchmarks/bench_losses.py --sizes 1024 --repeats 9
    python benchmarks/bench_losses.py --no-st              # without sentence-transformers
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mmlib.losses import matryoshka_in_batch_negative_loss, naive_matryoshka_loss

TEMPERATURE = 0.07


def plain_full_loss(query, target, temperature=TEMPERATURE):
    """The loss one writes without MRL: full width only, symmetric InfoNCE."""
    labels = torch.arange(query.shape[0])
    sim = F.normalize(query, dim=1) @ F.normalize(target, dim=1).T / temperature
    return (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2


def st_matryoshka_loss(width, dims):
    """sentence-transformers' MatryoshkaLoss(MNRL) set up to equal our symmetric loss, on a stub
    model whose forward returns the given embeddings (so only the loss is timed)."""
    from sentence_transformers.sentence_transformer.losses import (
        MatryoshkaLoss,
        MultipleNegativesRankingLoss,
    )

    class Embeddings(torch.nn.Module):
        def forward(self, features):
            return {"sentence_embedding": features["embedding"]}

        def get_embedding_dimension(self):
            return width

    stub = Embeddings()
    mnrl = MultipleNegativesRankingLoss(
        stub, scale=1 / TEMPERATURE, directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction")
    loss = MatryoshkaLoss(stub, mnrl, matryoshka_dims=list(dims))
    return lambda q, t: loss([{"embedding": q}, {"embedding": t}], None)


def max_diffs(got_fn, ref_fn, q, t):
    """|loss difference| and the largest gradient difference relative to the largest gradient."""
    ref = ref_fn()
    ref_grads = torch.autograd.grad(ref, (q, t))
    got = got_fn()
    got_grads = torch.autograd.grad(got, (q, t))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    grad_err = 0.0
    for g, r in zip(got_grads, ref_grads, strict=True):
        scale = float(r.abs().max())
        torch.testing.assert_close(g / scale, r / scale, rtol=1e-4, atol=1e-5)
        grad_err = max(grad_err, float((g - r).abs().max()) / scale)
    return abs(float(got.detach()) - float(ref.detach())), grad_err


def bench_size(batch, width, dims, repeats, warmup, with_st=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, width, generator=gen, requires_grad=True)
    t = torch.randn(batch, width, generator=gen, requires_grad=True)
    methods = {
        "naive": lambda: naive_matryoshka_loss(q, t, dims=dims, temperature=TEMPERATURE),
        "mmlib": lambda: matryoshka_in_batch_negative_loss(
            q, t, dims=dims, temperature=TEMPERATURE
        ),
        "mmlib-full": lambda: matryoshka_in_batch_negative_loss(
            q, t, dims=[width], temperature=TEMPERATURE
        ),
        "plain-full": lambda: plain_full_loss(q, t),
    }
    if with_st:
        st = st_matryoshka_loss(width, dims)
        methods["st"] = lambda: st(q, t)
    errors = {name: max_diffs(methods[name], methods["naive"], q, t)
              for name in methods if name in ("mmlib", "st")}
    errors["plain-full"] = max_diffs(methods["plain-full"], methods["mmlib-full"], q, t)

    def step(fn):
        q.grad = t.grad = None
        start = time.perf_counter()
        fn().backward()
        return time.perf_counter() - start

    for _ in range(warmup):
        for fn in methods.values():
            step(fn)
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(step(fn))
    result = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    return result, errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="batch sizes B (N = B)"
    )
    parser.add_argument("--width", type=int, default=2048, help="embedding width E")
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-st", action="store_true", help="skip sentence-transformers")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with_st = not args.no_st

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, E={args.width}, "
        f"dims={args.dims}, symmetric, forward+backward, median of {args.repeats} rounds (ms); "
        f"loadavg {open('/proc/loadavg').read().split()[0]}"
    )
    names = ["naive", "mmlib", "mmlib-full", "plain-full"] + (["st"] if with_st else [])
    ratios = [("mmlib/mmlib-full", "mmlib", "mmlib-full"), ("mmlib/plain-full", "mmlib", "plain-full")]
    ratios += [("st/mmlib", "st", "mmlib")] if with_st else []
    ratios += [("naive/mmlib", "naive", "mmlib")]
    header = f"{'B':>5} " + " ".join(f"{n:>10}" for n in names) + " " + " ".join(
        f"{r[0]:>16}" for r in ratios)
    print(header)
    print("-" * len(header))
    worst = {}
    for batch in args.sizes:
        r, errors = bench_size(batch, args.width, args.dims, args.repeats, args.warmup, with_st)
        for name, (loss_err, grad_err) in errors.items():
            old_loss, old_grad = worst.get(name, (0.0, 0.0))
            worst[name] = (max(old_loss, loss_err), max(old_grad, grad_err))
        print(
            f"{batch:>5} " + " ".join(f"{r[n]:>10.1f}" for n in names) + " "
            + " ".join(f"{r[a] / r[b]:>16.2f}" for _, a, b in ratios),
            flush=True,
        )
    print("agreement (largest |loss diff|, largest |grad diff| / largest grad entry):")
    for name, (loss_err, grad_err) in worst.items():
        ref = "mmlib-full" if name == "plain-full" else "naive"
        print(f"  {name:>10} vs {ref:<10} {loss_err:.1e}  {grad_err:.1e}")


if __name__ == "__main__":
    main()
