"""Benchmark: mmlib's `encode_texts` / `encode_images` against a plain transformers loop.

The plain loop is what a user writes without mmlib: for each fixed-size batch of the inputs,
in input order, run the processor, `model(**inputs)`, masked mean pooling, the projection and
L2 normalisation (same weights as the mmlib encoder, so the embeddings must agree). mmlib
sorts the inputs by token count, batches neighbours, tokenizes texts once per call and
restores the input order.

Methods are timed round-robin (one full pass of each per round) so that load from other
processes hits them alike; each number is the median over rounds after a warm-up pass.
Padding fraction = padded positions / all positions of the batches actually run (read from the
attention masks the backbone received).

CPU (default when there is no GPU): the tiny model; 2000 texts whose lengths are drawn
uniformly from 8-128 tokens, and images of mixed sizes, batch 32.
GPU: a random-weight Qwen2.5-VL-3B (`preset:qwen2.5-vl-3b`) in bf16, for each attention
implementation (sdpa, and flash_attention_2 where installed): texts of 128 tokens,
448x448 images, and the mixed-length texts; embeddings/s, tokens/s and model FLOP utilisation
(2 x params x tokens for a forward, attention FLOPs left out, real tokens only) against
`--peak-tflops` (H100 SXM dense bf16: 989).

Usage::

    python benchmarks/bench_encoder.py                        # CPU, tiny model
    python benchmarks/bench_encoder.py --max-tokens 4096 --compile
    python benchmarks/bench_encoder.py --device cuda --peak-tflops 989   # 3B preset on a GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from contextlib import contextmanager

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.utils import is_flash_attn_2_available  # noqa: E402

from mmlib import EncoderConfig, MultimodalEncoder  # noqa: E402
from mmlib.head import masked_mean_pool  # noqa: E402
from mmlib.processing import format_prompt  # noqa: E402

WORDS = """a an the of on in at to and with next above left right top small large big red green
blue pink brown white cyan circle square triangle ring shape object objects scene photo picture
background bright astronaut cat coffee cup rocket camera man dog space suit flag standing holding
is it this there one two three some street building sky cloud grass tree water city""".split()


# -- inputs ------------------------------------------------------------------------------------
def make_texts(tokenizer, n: int, low: int, high: int, seed: int = 0) -> list[str]:
    """n deterministic texts with token counts drawn uniformly from [low, high]."""
    words = [w for w in WORDS
             if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
             and len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(low, high))) for _ in range(n)]


def make_images(n: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """n deterministic noise images, sizes drawn from `sizes` (width, height)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = sizes[rng.integers(len(sizes))]
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


# -- the plain loop ----------------------------------------------------------------------------
def plain_encode(enc: MultimodalEncoder, texts=None, images=None, batch_size: int = 32) -> torch.Tensor:
    """Fixed batches in input order: processor -> model(**inputs) -> pool -> projection -> L2."""
    n = len(texts if texts is not None else images)
    model, device = enc.qwen, enc.input_device
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            prompts = [format_prompt(texts[i] if texts is not None else None, images is not None)
                       for i in range(start, stop)]
            inputs = enc.processor(text=prompts, images=images[start:stop] if images else None,
                                   padding=True, return_tensors="pt").to(device)
            with enc.autocast():
                hidden = model(**inputs).last_hidden_state
            pooled = masked_mean_pool(hidden, inputs["attention_mask"])
            out.append(F.normalize(enc.projection(pooled), dim=-1).float().cpu())
    return torch.cat(out)


# -- measurement helpers -----------------------------------------------------------------------
@contextmanager
def padding_counter(enc: MultimodalEncoder):
    """Counts real and total positions of every attention mask the backbone receives."""
    counts = {"real": 0, "total": 0, "patches": 0}

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None:
            counts["real"] += int(mask.sum())
            counts["total"] += mask.numel()
        grid = kwargs.get("image_grid_thw")
        if grid is not None:
            counts["patches"] += int(grid.prod(-1).sum())

    handle = enc.qwen.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(methods: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per full pass of each method, run round-robin after one warm-up pass."""
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split(" ")[0]
    except OSError:
        return "n/a"


# -- one workload ------------------------------------------------------------------------------
def run_workload(label: str, encoders: dict[str, MultimodalEncoder], texts, images, args,
                 flops_per_token=None) -> None:
    """Time plain vs mmlib (and variants) on one input set and print a table."""
    base = encoders["plain"]
    device = base.input_device
    n = len(texts if texts is not None else images)
    kw = {"texts": texts} if texts is not None else {"images": images}
    methods = {"plain loop": lambda: plain_encode(base, batch_size=args.batch_size, **kw),
               "mmlib": lambda: base.encode(batch_size=args.batch_size, show_progress=False, **kw)}
    if args.max_tokens:
        methods[f"mmlib max_tokens={args.max_tokens}"] = lambda: base.encode(
            max_tokens=args.max_tokens, show_progress=False, **kw)
    if "compiled" in encoders:
        comp = encoders["compiled"]
        methods["mmlib + compile"] = lambda: comp.encode(batch_size=args.batch_size,
                                                         show_progress=False, **kw)
    # One untimed pass each: warm-up, padding counts, agreement with the plain loop.
    pads, outs, flops = {}, {}, {}
    for name, fn in methods.items():
        enc = encoders["compiled"] if name == "mmlib + compile" else base
        with padding_counter(enc) as counts:
            start = time.perf_counter()
            outs[name] = fn()
            first = time.perf_counter() - start
        pads[name] = 1 - counts["real"] / counts["total"]
        flops[name] = flops_per_token(counts) if flops_per_token else None
        if name == "mmlib + compile":
            print(f"  (first pass of mmlib + compile, compilation included: {first:.1f} s)")
    ref = outs["plain loop"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs = timed_rounds(methods, args.repeats, device)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    print(f"\n{label}: {n} inputs, batch {args.batch_size}, median of {args.repeats} rounds "
          f"(loadavg now {loadavg()})")
    cols = f"{'method':<28}{'emb/s':>10}{'padding':>9}{'speed-up':>10}{'max|diff|':>11}"
    if flops_per_token:
        cols += f"{'TFLOP/s':>9}{'MFU':>7}"
    print(cols)
    print("-" * len(cols))
    for name in methods:
        diff = (outs[name] - ref).abs().max().item()
        line = (f"{name:<28}{n / secs[name]:>10.1f}{100 * pads[name]:>8.1f}%"
                f"{secs['plain loop'] / secs[name]:>9.2f}x{diff:>11.1e}")
        if flops_per_token:
            tflops = flops[name] / secs[name] / 1e12
            line += f"{tflops:>9.1f}{100 * tflops / args.peak_tflops:>6.1f}%"
        print(line, flush=True)
    if mem is not None:
        print(f"peak GPU memory allocated: {mem:.1f} GiB")


# -- main --------------------------------------------------------------------------------------
def build(args, device: torch.device, attn: str, compiled: bool):
    if device.type == "cuda":
        cfg = EncoderConfig(model_path=args.model or "preset:qwen2.5-vl-3b", dtype="bfloat16",
                            attn_implementation=attn, device="cuda")
    else:
        cfg = EncoderConfig(model_path=args.model or "tiny", device="cpu", attn_implementation=attn)
    encoders = {"plain": MultimodalEncoder(cfg).eval()}
    if compiled:
        twin = MultimodalEncoder(cfg).eval()
        # Same weights (both are seeded by the config; copied to make the comparison explicit).
        twin.projection.load_state_dict(encoders["plain"].projection.state_dict())
        encoders["compiled"] = twin.compile_for_inference()
    return encoders


def flop_counter(enc: MultimodalEncoder):
    """Forward FLOPs from the counted positions: 2 x params x tokens for the language model
    (embedding table excluded) plus 2 x params x patches for the vision tower."""
    lm = enc.qwen.language_model
    lm_params = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    vis_params = sum(p.numel() for p in enc.qwen.visual.parameters())
    return lambda counts: 2 * lm_params * counts["real"] + 2 * vis_params * counts["patches"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default=None,
                        help="model_path (default: tiny on CPU, preset:qwen2.5-vl-3b on GPU)")
    parser.add_argument("--texts", type=int, default=2000, help="number of mixed-length texts")
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-text-tokens", type=int, default=128)
    parser.add_argument("--images", type=int, default=256, help="number of images (0: skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="also time mmlib with this token budget per batch")
    parser.add_argument("--compile", action="store_true", help="also time a compiled encoder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--attn", nargs="+", default=None,
                        help="attention implementations (GPU default: sdpa and flash_attention_2 "
                             "where installed; CPU: sdpa)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="GPU dense bf16 peak for MFU (H100 SXM: 989)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}; loadavg at start {loadavg()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    attns = args.attn or (["sdpa"] + (["flash_attention_2"] if cuda and is_flash_attn_2_available()
                                      else []))
    sizes = [(56, 56), (112, 84), (160, 120), (224, 224), (320, 240), (448, 336), (640, 480),
             (96, 320)]
    for attn in attns:
        encoders = build(args, device, attn, args.compile)
        tok = encoders["plain"].processor.tokenizer
        flops = flop_counter(encoders["plain"]) if cuda else None
        if cuda:
            fixed = make_texts(tok, args.texts, 128, 128, seed=1)
            run_workload(f"[{attn}] texts of 128 tokens", encoders, fixed, None, args, flops)
        mixed = make_texts(tok, args.texts, args.min_tokens, args.max_text_tokens)
        run_workload(f"[{attn}] texts of {args.min_tokens}-{args.max_text_tokens} tokens",
                     encoders, mixed, None, args, flops)
        if args.images:
            if cuda:
                imgs = make_images(args.images, [(448, 448)], seed=1)
                run_workload(f"[{attn}] 448x448 images", encoders, None, imgs, args, flops)
            imgs = make_images(args.images, sizes, seed=2)
            run_workload(f"[{attn}] images of mixed sizes", encoders, None, imgs, args, flops)
        del encoders
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print(f"\nloadavg at end {loadavg()}")


if __name__ == "__main__":
    main()
