"""Benchmark: fused Matryoshka loss vs a per-dim loop vs a single full-dim loss (forward + backward).

Methods, all symmetric InfoNCE at temperature 0.07 on random (B, E) query / target embeddings:

- ``naive``       per-dim loop as in sentence-transformers' MatryoshkaLoss: for each dim, normalise
                  the prefix, one full similarity matmul, two cross-entropies.
- ``mmlib``       ``matryoshka_in_batch_negative_loss`` over the same dims.
- ``mmlib-full``  the same function with ``dims=[E]`` (one dim).
- ``plain-full``  ``F.normalize`` + matmul + ``F.cross_entropy`` at the full dim only.

Methods are timed round-robin (one call of each per round) so that load from other processes
hits them alike; each number is the median over rounds after warm-up. Ratios are computed from
the same run: ``mmlib / plain-full``, ``mmlib / mmlib-full`` (targets: <= 1.4) and
``naive / mmlib`` (target: >= 1.4). At every size the script first checks that mmlib and the
naive loop agree (loss and gradients) and prints the differences.

On a shared machine the timings move with the load from other processes (each multithreaded
elementwise op can stall for a scheduler slice); round-robin timing keeps the ratios comparable.

Usage::

    python benchmarks/bench_losses.py                      # B = 256, 1024, 4096 (~1-2 min)
    python benchmarks/bench_losses.py --sizes 1024 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mmlib.losses import matryoshka_in_batch_negative_loss

TEMPERATURE = 0.07


def naive_loss(query, target, dims, temperature=TEMPERATURE):
    """Per-dim loop: normalise prefix, full matmul, symmetric cross-entropy, summed over dims."""
    labels = torch.arange(query.shape[0])
    total = 0.0
    for d in dims:
        sim = F.normalize(query[:, :d], dim=1) @ F.normalize(target[:, :d], dim=1).T / temperature
        total = total + (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
    return total


def check_agreement(q, t, dims):
    """Assert that mmlib equals the naive loop (loss and both gradients); return the errors."""
    ref = naive_loss(q, t, dims)
    ref_grads = torch.autograd.grad(ref, (q, t))
    got = matryoshka_in_batch_negative_loss(q, t, dims=dims, temperature=TEMPERATURE)
    got_grads = torch.autograd.grad(got, (q, t))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    grad_err = 0.0
    for g, r in zip(got_grads, ref_grads, strict=True):
        scale = float(r.abs().max())
        torch.testing.assert_close(g / scale, r / scale, rtol=1e-4, atol=1e-5)
        grad_err = max(grad_err, float((g - r).abs().max()) / scale)
    return abs(float(got.detach()) - float(ref.detach())), grad_err


def bench_size(batch, width, dims, repeats, warmup, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, width, generator=gen, requires_grad=True)
    t = torch.randn(batch, width, generator=gen, requires_grad=True)
    loss_err, grad_err = check_agreement(q, t, dims)
    methods = {
        "naive": lambda: naive_loss(q, t, dims),
        "mmlib": lambda: matryoshka_in_batch_negative_loss(
            q, t, dims=dims, temperature=TEMPERATURE
        ),
        "mmlib-full": lambda: matryoshka_in_batch_negative_loss(
            q, t, dims=[width], temperature=TEMPERATURE
        ),
        "plain-full": lambda: naive_loss(q, t, [width]),
    }

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
    result.update(loss_err=loss_err, grad_err=grad_err)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="batch sizes B (N = B)"
    )
    parser.add_argument("--width", type=int, default=2048, help="embedding width E")
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    args = parser.parse_args(argv)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, E={args.width}, "
        f"dims={args.dims}, symmetric, forward+backward, median of {args.repeats} rounds (ms)"
    )
    header = (
        f"{'B':>5} {'naive':>8} {'mmlib':>8} {'mmlib-full':>10} {'plain-full':>10} "
        f"{'mmlib/plain-full':>16} {'mmlib/mmlib-full':>16} {'naive/mmlib':>11} "
        f"{'|loss diff|':>11} {'grad diff':>9}"
    )
    print(header)
    print("-" * len(header))
    for batch in args.sizes:
        r = bench_size(batch, args.width, args.dims, args.repeats, args.warmup)
        print(
            f"{batch:>5} {r['naive']:>8.1f} {r['mmlib']:>8.1f} {r['mmlib-full']:>10.1f} "
            f"{r['plain-full']:>10.1f} {r['mmlib'] / r['plain-full']:>16.2f} "
            f"{r['mmlib'] / r['mmlib-full']:>16.2f} {r['naive'] / r['mmlib']:>11.2f} "
            f"{r['loss_err']:>11.1e} {r['grad_err']:>9.1e}",
            flush=True,
        )
    print("grad diff: max |mmlib - naive| over both inputs, relative to the largest naive entry")


if __name__ == "__main__":
    main()
