"""Benchmark: one contrastive training step with LoRA, gradient checkpointing and GradCache.

Each step embeds a global batch of (text query, image target) pairs, computes the Matryoshka
in-batch-negative loss over all of it (`mmlib.losses.matryoshka_in_batch_negative_loss`) and
back-propagates micro-batch by micro-batch with `mmlib.gradcache.gradcache_step`, then takes
an AdamW step. The micro-batch is fixed while the global batch grows, so peak memory should
stay flat while the step time grows linearly. `--plain` adds the same step without GradCache
(the whole batch in one forward/backward) for comparison; it runs out of memory first.

GPU: a random-weight Qwen2.5-VL-3B (`preset:qwen2.5-vl-3b`, bf16 weights, bf16 autocast),
global batches 64-1024, micro-batch 32, 64-token texts and 448x448 images; memory is
`torch.cuda.max_memory_allocated` during one step (static: allocated before it).
CPU: the same code on the tiny model with smaller batches; memory is measured in a fresh
child process per configuration (model + inputs, one warm-up step): the peak RSS during one
more step (Linux: VmHWM, reset through /proc/self/clear_refs; elsewhere the lifetime
`ru_maxrss`) and its growth over the RSS just before that step.
Step times: for each global batch, one warm-up step per method (it also creates the AdamW
state), then `--repeats` timed steps, the methods interleaved round by round.

Usage::

    python benchmarks/bench_train.py                   # CPU, tiny model
    python benchmarks/bench_train.py --plain
    python benchmarks/bench_train.py --device cuda     # 3B preset on one GPU
    python benchmarks/bench_train.py --device cuda --batches 64 256 1024 --micro-batch 16
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from mmlib import EncoderConfig, MultimodalEncoder  # noqa: E402
from mmlib.gradcache import gradcache_step, split_batch  # noqa: E402
from mmlib.losses import matryoshka_in_batch_negative_loss  # noqa: E402
from mmlib.processing import build_inputs  # noqa: E402

WORDS = "a the red green blue circle square cat dog photo on left of small large sky".split()


def build_encoder(args) -> MultimodalEncoder:
    cuda = args.device == "cuda"
    cfg = EncoderConfig(model_path=args.model or ("preset:qwen2.5-vl-3b" if cuda else "tiny"),
                        use_lora=True, gradient_checkpointing=True,
                        device="cuda" if cuda else "cpu", max_length=None)
    torch.manual_seed(0)
    return MultimodalEncoder(cfg)


def build_pairs(enc: MultimodalEncoder, n: int, args) -> tuple[dict, dict]:
    """n (text query, image target) pairs: texts of exactly `text_tokens` tokens, noise images."""
    tok = enc.processor.tokenizer
    words = [w for w in WORDS if all(len(tok(x, add_special_tokens=False)["input_ids"]) == 1
                                     for x in (w, " " + w))]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(args.text_tokens)) for _ in range(n)]
    queries = build_inputs(enc.processor, texts=texts)
    if not args.image_size:
        return queries, build_inputs(enc.processor, texts=texts[::-1])
    gen = np.random.default_rng(0)
    s = args.image_size
    images = [Image.fromarray(gen.integers(0, 256, (s, s, 3), dtype=np.uint8)) for _ in range(n)]
    return queries, build_inputs(enc.processor, images=images)


def make_step(enc: MultimodalEncoder, query: dict, target: dict, micro: int | None):
    """One optimizer step: GradCache with micro-batch `micro`, or the whole batch at once."""
    dims = enc.config.resolved_mrl_dims()
    loss_fn = functools.partial(matryoshka_in_batch_negative_loss, dims=dims,
                                temperature=enc.config.temperature)
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=1e-5)
    enc.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if micro is not None:
            loss = gradcache_step(enc, query, target, loss_fn, micro)
        else:
            loss = loss_fn(enc(**query), enc(**target))
            loss.backward()
            loss = loss.detach()
        opt.step()
        return float(loss)

    return step


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS since the last `reset_peak_rss`) in MB; Linux reads /proc,
    elsewhere the peak is the process-lifetime `ru_maxrss` (not reset)."""
    try:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except OSError:
        import psutil

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS
        return psutil.Process().memory_info().rss / 2**20, peak


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_memory(batch: int, method: str, args) -> dict:
    """Peak RSS of one step (after a warm-up step) in a fresh process, so that memory kept by
    the allocator from other configurations does not blur it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--memory-child",
           str(batch), method, "--micro-batch", str(args.micro_batch), "--text-tokens",
           str(args.text_tokens), "--image-size", str(args.image_size), "--threads",
           str(torch.get_num_threads())] + (["--model", args.model] if args.model else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"memory child for batch {batch} ({method}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory_child(args) -> None:
    """CPU: build model and inputs, one warm-up step, then the peak RSS of one more step."""
    batch, method = int(args.memory_child[0]), args.memory_child[1]
    enc = build_encoder(args)
    query, target = build_pairs(enc, batch, args)
    step = make_step(enc, query, target, args.micro_batch if method == "gradcache" else None)
    step()
    gc.collect()
    reset_peak_rss()
    before, _ = rss_mb()
    step()
    print(json.dumps({"rss_before_mb": before, "rss_peak_mb": rss_mb()[1]}))


def measure_batch(enc, query, target, args) -> list[dict]:
    """Both methods on one global batch: memory of one step each (after a warm-up step that
    also creates the optimizer state), then step times from interleaved rounds."""
    cuda = args.device == "cuda"
    micro = {"gradcache": args.micro_batch, "plain": None}
    methods = ["gradcache"] + (["plain"] if args.plain else [])
    rows = {m: {"batch": query["input_ids"].shape[0], "method": m} for m in methods}
    steps = {}
    for m in methods:
        steps[m] = make_step(enc, query, target, micro[m])
        try:
            steps[m]()  # warm-up (allocates AdamW state)
            if cuda:
                torch.cuda.synchronize()
                static = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                rows[m]["loss"] = steps[m]()
                torch.cuda.synchronize()
                rows[m]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                rows[m]["static_gib"] = static / 2**30
            else:
                rows[m].update(cpu_memory(rows[m]["batch"], m, args))
        except torch.cuda.OutOfMemoryError:
            rows[m]["oom"] = True
        if rows[m].get("oom"):  # outside the except block, so the traceback's memory is free
            steps.pop(m)
            enc.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    times = {m: [] for m in steps}
    for _ in range(args.repeats):
        for m, step in steps.items():
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - start)
    for m, ts in times.items():
        rows[m]["step_s"] = statistics.median(ts)
    enc.zero_grad(set_to_none=True)
    return [rows[m] for m in methods]


def run(args) -> list[dict]:
    enc = build_encoder(args)
    counts = enc.parameter_counts()
    print(f"model {enc.config.model_path}: {counts['total'] / 1e9:.3f} B parameters, "
          f"{counts['trainable'] / 1e6:.2f} M trainable (LoRA + projection), "
          f"weights {next(enc.qwen.parameters()).dtype}, autocast {enc.amp_dtype}")
    query_all, target_all = build_pairs(enc, max(args.batches), args)
    print_header(args)
    out = []
    for batch in sorted(args.batches):
        query = split_batch(query_all, batch)[0]
        target = split_batch(target_all, batch)[0]
        for row in measure_batch(enc, query, target, args):
            print_row(row, args, flush=True)
            out.append(row)
            if row.get("oom"):
                args.plain = False  # larger batches cannot fit either
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return out


def print_header(args) -> None:
    mem = "peak GPU GiB  (static)" if args.device == "cuda" else "peak RSS MB  step growth MB"
    print(f"{'global batch':>12}{'micro':>7}{'method':>11}{'step s':>9}{'pairs/s':>9}  {mem}")
    print("-" * 72)


def print_row(row: dict, args, flush: bool = False) -> None:
    micro = args.micro_batch if row["method"] == "gradcache" else row["batch"]
    head = f"{row['batch']:>12}{micro:>7}{row['method']:>11}"
    if row.get("oom"):
        print(f"{head}{'out of memory':>20}", flush=flush)
        return
    line = f"{head}{row['step_s']:>9.2f}{row['batch'] / row['step_s']:>9.1f}  "
    if "peak_gib" in row:
        line += f"{row['peak_gib']:>12.2f}  ({row['static_gib']:.2f})"
    else:
        line += f"{row['rss_peak_mb']:>12.0f}  {row['rss_peak_mb'] - row['rss_before_mb']:>14.0f}"
    print(line, flush=flush)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default=None,
                        help="model_path (default: preset:qwen2.5-vl-3b on GPU, tiny on CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="global batch sizes (GPU: 64 128 256 512 1024; CPU: 8 16 32 64 128)")
    parser.add_argument("--micro-batch", type=int, default=None, help="GPU: 32, CPU: 8")
    parser.add_argument("--text-tokens", type=int, default=None, help="GPU: 64, CPU: 32")
    parser.add_argument("--image-size", type=int, default=None,
                        help="square target images (GPU: 448, CPU: 224); 0: text targets")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (GPU: 2, CPU: 3)")
    parser.add_argument("--plain", action="store_true", help="also run without GradCache")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    gpu = args.device == "cuda"
    defaults = dict(batches=[64, 128, 256, 512, 1024] if gpu else [8, 16, 32, 64, 128],
                    micro_batch=32 if gpu else 8, text_tokens=64 if gpu else 32,
                    image_size=448 if gpu else 224, repeats=2 if gpu else 3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    load = open("/proc/loadavg").read().split(" ")[0] if os.path.exists("/proc/loadavg") else "n/a"
    print(f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}; loadavg {load}; {time.strftime('%Y-%m-%d %H:%M')}")
    target = f"{args.image_size}x{args.image_size} images" if args.image_size else "texts"
    print(f"LoRA + gradient checkpointing + GradCache; queries: {args.text_tokens}-token texts, "
          f"targets: {target}; Matryoshka loss; AdamW; median of {args.repeats} steps after 1 "
          "warm-up step")
    run(args)


if __name__ == "__main__":
    main()
