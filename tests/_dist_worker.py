"""Two-rank worker for tests/test_distributed.py (CPU, gloo), launched by torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/_dist_worker.py OUT REF_CHECKPOINT

Runs every distributed check in one launch (process start-up and imports dominate the cost)
and saves what each rank saw under OUT; the test compares it with a single process. The
inputs (`raw_inputs`, `make_encoder`, `trainer_config`) are shared with the test.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmlib import EncoderConfig, MultimodalEncoder
from mmlib.losses import matryoshka_in_batch_negative_loss

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle", "a blue square on the left", "green", "a small yellow star at the top",
         "a large purple ring", "cyan cross", "an orange diamond in the center", "white heart"]
EXTRA_PER_RANK = (2, 1)  # unequal on purpose: extra negatives of rank 0, rank 1
WORLD = 2
LOSS = functools.partial(matryoshka_in_batch_negative_loss, dims=[8, 16, 64])


def noise_image(seed: int, w: int = 56, h: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def raw_inputs() -> tuple[list[str], list[Image.Image], list[list[Image.Image]]]:
    """The global batch: 8 captions, their 8 images, and each rank's extra negative images."""
    images = [noise_image(i, 56 + 28 * (i % 2)) for i in range(8)]
    extras, seed = [], 100
    for n in EXTRA_PER_RANK:
        extras.append([noise_image(seed + k) for k in range(n)])
        seed += n
    return TEXTS, images, extras


def make_encoder(**overrides) -> MultimodalEncoder:
    torch.manual_seed(0)
    enc = MultimodalEncoder(EncoderConfig(device="cpu", embed_dim=64, mrl_dims=(8, 16, None),
                                          **overrides))
    return enc.train()


def grads(enc: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def trainer_config(output_dir: Path | str, **overrides):
    from mmlib.train import TrainConfig

    enc = EncoderConfig(device="cpu", embed_dim=32, mrl_dims=(8, 16, None), batch_size=8,
                        learning_rate=2e-3, seed=0)
    base = dict(encoder=enc, manifest=str(REPO / "data_samples/synthetic/manifest.jsonl"),
                eval_split=None, max_steps=2, warmup_steps=1, log_every=1, save_every=1,
                hard_negatives=True, output_dir=str(output_dir), progress=False)
    return TrainConfig(**{**base, **overrides})


def lora_trainer_config(output_dir: Path | str, **overrides):
    """LoRA (no dropout: masks would differ by rank) with gradient checkpointing, 2 steps."""
    cfg = trainer_config(output_dir, save_every=0, **overrides)
    cfg.encoder = cfg.encoder.replace(use_lora=True, lora_r=4, lora_dropout=0.0,
                                      gradient_checkpointing=True)
    return cfg


def counting_comms(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` and the collectives it ran: {op name: count}, e.g.
    {"c10d._reduce_scatter_base_": 6} (torch's CommDebugMode sees c10d and functional ops)."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        result = fn(*args, **kwargs)
    return result, {str(op): n for op, n in comm.get_comm_counts().items()}


# ----------------------------------------------------------------------------- the checks
def check_toy_gather(out: Path, rank: int) -> None:
    """Unequal sizes (2 and 3 rows); a rank-dependent loss whose gradient is known by hand."""
    from mmlib.distributed import all_gather_with_grad, gather_for_loss

    n = 2 + rank
    x = (torch.arange(n * 3, dtype=torch.float64).reshape(n, 3) + 100 * rank).requires_grad_()
    y, forward = counting_comms(all_gather_with_grad, x)
    c = torch.arange(15, dtype=torch.float64).reshape(5, 3)
    _, backward = counting_comms(((rank + 1) * c * y).sum().backward)
    # gather_for_loss layout: row values encode (rank, kind, index); kind 0 query, 1 positive,
    # 2 extra. Rank r: B_r = 1 + r queries, X_r = 2 - r extra negatives (rank 1 passes them
    # through `extra`, rank 0 as target rows beyond B_r).
    b, xn = 1 + rank, 2 - rank
    q = torch.tensor([[rank, 0, i] for i in range(b)], dtype=torch.float64)
    p = torch.tensor([[rank, 1, i] for i in range(b)], dtype=torch.float64)
    e = torch.tensor([[rank, 2, i] for i in range(xn)], dtype=torch.float64).reshape(xn, 3)
    gq, gt = gather_for_loss(q, torch.cat([p, e])) if rank == 0 else gather_for_loss(q, p, e)
    # identities in the same layout: rank r has B_r = 1 + r targets (ids 10 r + i) and
    # X_r = 2 - r hard negatives (ids 100 r + k) owned by its local query 0
    from mmlib.distributed import gather_loss_ids

    ids = gather_loss_ids(torch.tensor([10 * rank + i for i in range(b)]),
                          torch.tensor([100 * rank + k for k in range(xn)], dtype=torch.long),
                          torch.zeros(xn, dtype=torch.long))
    torch.save({"y": y.detach(), "grad": x.grad, "q": gq, "t": gt, "ids": ids,
                "comms": {"forward": forward, "backward": backward}}, out / f"toy_rank{rank}.pt")


def check_encoder_step(out: Path, rank: int) -> None:
    """One step on this rank's half of the global batch: plain, then GradCache."""
    from mmlib.distributed import average_gradients, gather_for_loss
    from mmlib.gradcache import gradcache_step

    enc = make_encoder()
    texts, images, extras = raw_inputs()
    rows = slice(4 * rank, 4 * rank + 4)
    query, target = enc.tokenize(texts[rows]), enc.tokenize(images=images[rows])
    extra = enc.tokenize(images=extras[rank])
    params = [p for p in enc.parameters() if p.requires_grad]

    q = enc(**query)
    t = torch.cat([enc(**target), enc(**extra)])
    gq, gt = gather_for_loss(q, t)
    loss = LOSS(gq, gt)
    loss.backward()
    raw = grads(enc)  # before averaging: W x this rank's share (checked in the test)
    average_gradients(params)
    result = {"loss": loss.detach(), "grads": grads(enc), "raw_grads": raw}

    enc.zero_grad(set_to_none=True)
    loss_gc = gradcache_step(enc, query, target, lambda q, t: LOSS(*gather_for_loss(q, t)),
                             micro_batch_size=3, extra_targets=extra)
    average_gradients(params)
    result.update(gradcache_loss=loss_gc, gradcache_grads=grads(enc))
    torch.save(result, out / f"encoder_rank{rank}.pt")


def check_trainer(out: Path, rank: int, reference_checkpoint: str) -> None:
    """2 steps from scratch, and step 2 resumed from a single-process checkpoint of step 1
    (with GradCache micro-batches of 3 of each rank's 4 rows, which must not change a thing,
    and a final evaluation, sharded over the ranks)."""
    from mmlib.train import Trainer

    resumed = {"resume": reference_checkpoint, "micro_batch_size": 3, "eval_split": "validation"}
    for name, extra in (("scratch", {}), ("resumed", resumed)):
        trainer = Trainer(trainer_config(out / name, **extra))
        if name == "resumed":  # rank 0 restores the checkpoint's RNG state, rank 1 has none
            torch.save(torch.get_rng_state(), out / f"resumed_rng_rank{rank}.pt")
        trainer.train()
        if name == "scratch":  # an error after step 2: rank 0 writes alone, rank 1 returns
            trainer.out, trainer._saved_at = out / "alone", None
            trainer._save_after(RuntimeError("a failure on one rank"))
        weights = {n: p.detach().clone() for n, p in trainer.encoder.named_parameters()
                   if p.requires_grad}
        torch.save(weights, out / f"{name}_weights_rank{rank}.pt")


def check_fsdp(out: Path, rank: int, reference_checkpoint: str) -> None:
    """The trainer with sharded weights (FSDP2, GradCache on): 2 steps from scratch with an
    evaluation at the end, and step 2 resumed from a single-process checkpoint."""
    import functools

    from mmlib.distributed import gather_for_loss, max_over_ranks
    from mmlib.fsdp import full_tensor, is_sharded, shard_encoder
    from mmlib.gradcache import gradcache_step
    from mmlib.train import Trainer

    # One step of a sharded encoder, plain and GradCache (micro-batches of 1 image: rank 0
    # runs 6 target micro-batches, rank 1 runs 5 and a dummy).
    enc = shard_encoder(make_encoder())
    texts, images, extras = raw_inputs()
    rows = slice(4 * rank, 4 * rank + 4)
    query, target = enc.tokenize(texts[rows]), enc.tokenize(images=images[rows])
    extra = enc.tokenize(images=extras[rank])

    def full_grads():
        return {n: full_tensor(p.grad) for n, p in enc.named_parameters() if p.grad is not None}

    loss = LOSS(*gather_for_loss(enc(**query), torch.cat([enc(**target), enc(**extra)])))
    loss.backward()
    result = {"loss": loss.detach(), "grads": full_grads()}
    enc.zero_grad(set_to_none=True)
    align = functools.partial(max_over_ranks, device=enc.device)
    loss_gc = gradcache_step(enc, query, target, lambda q, t: LOSS(*gather_for_loss(q, t)),
                             micro_batch_size=1, extra_targets=extra, align=align)
    result.update(gradcache_loss=loss_gc, gradcache_grads=full_grads())
    torch.save(result, out / f"fsdp_encoder_rank{rank}.pt")

    runs = (("fsdp", trainer_config, {"eval_split": "validation"}),
            ("fsdp_resumed", trainer_config, {"resume": reference_checkpoint}),
            ("fsdp_lora", lora_trainer_config, {}))
    for name, make_config, extra in runs:
        trainer = Trainer(make_config(out / name, fsdp=True, micro_batch_size=3, **extra))
        trainer.train()
        enc = trainer.encoder
        assert is_sharded(enc)
        weights = {n: full_tensor(p.detach()).clone() for n, p in enc.named_parameters()
                   if p.requires_grad}
        torch.save(weights, out / f"{name}_weights_rank{rank}.pt")
        if name == "fsdp":
            moments = {f"{n}::{k}": full_tensor(v).clone()
                       for n, p in enc.named_parameters() if p.requires_grad
                       for k, v in trainer.optimizer.state[p].items()}
            torch.save(moments, out / f"fsdp_moments_rank{rank}.pt")
            held = sum(p.to_local().numel() for p in enc.parameters())
            total = sum(p.numel() for p in enc.parameters())
            texts = TEXTS + [t + " and a grey triangle" for t in TEXTS]
            rows = []  # the rows of each forward of an evaluation
            hook = enc.register_forward_pre_hook(
                lambda m, args, kwargs, rows=rows: rows.append(kwargs["input_ids"].shape[0]),
                with_kwargs=True)
            df = trainer.evaluate()
            hook.remove()
            if df is not None:
                df.to_csv(out / f"fsdp_eval_rank{rank}.csv")
            torch.save({"held": held, "total": total, "texts": texts,
                        "embeddings": enc.encode_texts(texts, batch_size=4),
                        "eval_rows": rows}, out / f"fsdp_rank{rank}.pt")


def check_fsdp_bf16(out: Path, rank: int) -> None:
    """bf16 mixed precision under FSDP: the parameter dtypes each unit computes with (seen
    inside its forward), those of the shards and their gradients, and one step's loss and
    gradients (queries: this rank's 4 captions, targets: their images)."""
    from torch.distributed.tensor import DTensor

    from mmlib.distributed import gather_for_loss
    from mmlib.fsdp import full_tensor, shard_encoder

    enc = shard_encoder(make_encoder(mixed_precision="bf16"))
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = sorted({str(p.dtype) for p in module.parameters()})
        return hook

    qwen = enc.qwen
    parts = {"decoder layer": qwen.language_model.layers[0], "vision block": qwen.visual.blocks[0],
             "token embedding (root)": qwen.get_input_embeddings(), "projection": enc.projection}
    hooks = [m.register_forward_pre_hook(record(name)) for name, m in parts.items()]
    texts, images, _ = raw_inputs()
    rows = slice(4 * rank, 4 * rank + 4)
    q, t = enc(**enc.tokenize(texts[rows])), enc(**enc.tokenize(images=images[rows]))
    loss = LOSS(*gather_for_loss(q, t))
    loss.backward()
    for h in hooks:
        h.remove()
    params = list(enc.parameters())
    torch.save({"inside_forward": seen, "embeddings": str(q.dtype),
                "shards": sorted({str(p.dtype) for p in params}),
                "all_sharded": all(isinstance(p, DTensor) for p in params),
                "grads": {n: full_tensor(p.grad) for n, p in enc.named_parameters()
                          if p.grad is not None},
                "loss": loss.detach()}, out / f"fsdp_bf16_rank{rank}.pt")


def accum_trainer_config(output_dir: Path | str, **overrides):
    """One optimizer step of 2 accumulated batches (no checkpoint, no evaluation)."""
    cfg = trainer_config(output_dir, max_steps=1, save_every=0, **overrides)
    cfg.encoder = cfg.encoder.replace(grad_accum_steps=2)
    return cfg


def trainer_step(config) -> dict:
    """One optimizer step of a Trainer: its stats and (clipped, whole) gradients."""
    from mmlib.fsdp import full_tensor
    from mmlib.train import Trainer

    trainer = Trainer(config)
    stats = trainer.train_step(trainer._next_batches())
    trainer.close()
    return {"stats": stats, "grads": {n: full_tensor(p.grad).clone() for n, p in
                                      trainer.encoder.named_parameters() if p.grad is not None}}


def check_fsdp_multilevel(out: Path, rank: int) -> None:
    """loss=multilevel (embeddings of several decoder layers, `forward_layers`) under FSDP."""
    config = trainer_config(out / "multilevel", fsdp=True, loss="multilevel", max_steps=1,
                            save_every=0)
    torch.save(trainer_step(config), out / f"fsdp_multilevel_rank{rank}.pt")


def check_fsdp_grad_sync(out: Path, rank: int) -> None:
    """FSDP reduce-scatters counted over one step of 2 accumulated batches, plain and with
    GradCache (several backward passes per batch), and the step's (clipped) gradients."""
    from torch.distributed.fsdp import FSDPModule

    from mmlib.fsdp import full_tensor
    from mmlib.train import Trainer

    result = {}
    every = {"micro_batch_size": 2, "fsdp_sync_every_backward": True}  # the old way
    for name, extra in (("plain", {}), ("gradcache", {"micro_batch_size": 2}),
                        ("gradcache_every", every)):
        trainer = Trainer(accum_trainer_config(out / f"sync_{name}", fsdp=True, **extra))
        enc = trainer.encoder
        stats, comms = counting_comms(trainer.train_step, trainer._next_batches())
        trainer.close()
        result[name] = {
            "reduce_scatters": comms.get("c10d._reduce_scatter_base_", 0),
            "units": sum(isinstance(m, FSDPModule) for m in enc.modules()),
            "stats": stats,
            "grads": {n: full_tensor(p.grad).clone() for n, p in enc.named_parameters()
                      if p.grad is not None}}
    torch.save(result, out / f"fsdp_grad_sync_rank{rank}.pt")


def _status_kb(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def check_checkpoint_memory(out: Path, rank: int) -> None:
    """Each rank's extra resident memory while writing a checkpoint, next to the bytes of its
    own shard (trainable weights + AdamW moments): a frozen backbone and a wide projection
    (embed_dim 4096, 17 M trainable parameters, ~100 MB per rank) keep the noise small."""
    import ctypes
    import gc

    from mmlib.fsdp import is_sharded
    from mmlib.train import Trainer

    cfg = trainer_config(out / "memory", fsdp=True, save_every=0, max_steps=1)
    cfg.encoder = cfg.encoder.replace(embed_dim=4096, freeze_backbone="all")
    trainer = Trainer(cfg)
    trainer.train_step(trainer._next_batches())
    trainer._commit()
    assert is_sharded(trainer.encoder)
    local = [p for p in trainer.encoder.parameters() if p.requires_grad]
    local += [v for p in local for v in trainer.optimizer.state[p].values() if v.ndim]
    shard = sum(t.to_local().numel() * t.element_size() for t in local)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap counts as resident until trimmed
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    trainer.save_checkpoint()
    extra = (_status_kb("VmHWM") - before) * 1024
    torch.save({"extra": extra, "shard": shard}, out / f"memory_rank{rank}.pt")
    trainer.close()


def main() -> None:
    from mmlib.distributed import cleanup, init_distributed

    out, reference_checkpoint = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert info.world_size == WORLD and info.enabled, info
    try:
        for name, fn in (("toy", lambda: check_toy_gather(out, info.rank)),
                         ("encoder", lambda: check_encoder_step(out, info.rank)),
                         ("trainer", lambda: check_trainer(out, info.rank, reference_checkpoint)),
                         ("fsdp", lambda: check_fsdp(out, info.rank, reference_checkpoint)),
                         ("memory", lambda: check_checkpoint_memory(out, info.rank)),
                         ("fsdp_grad_sync", lambda: check_fsdp_grad_sync(out, info.rank)),
                         ("fsdp_bf16", lambda: check_fsdp_bf16(out, info.rank)),
                         ("fsdp_multilevel", lambda: check_fsdp_multilevel(out, info.rank))):
            start = time.perf_counter()
            fn()
            print(f"rank {info.rank}: {name} {time.perf_counter() - start:.1f} s", flush=True)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
