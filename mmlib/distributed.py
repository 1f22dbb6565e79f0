"""Data-parallel training across GPUs and nodes (torchrun): process group, gathers, sharding.

    torchrun --nproc_per_node 8 -m mmlib.train --config configs/tiny_mrl.yaml

Every rank embeds its own slice of the global batch, then `gather_for_loss` collects all
ranks' embeddings *with gradient*, so every rank computes the loss of the whole global batch
(every rank's rows are negatives of every query). `average_gradients` then averages the
parameter gradients, and each step equals a single-process step on the same global batch
(tested in tests/test_distributed.py). `DistributedBatchSampler` gives rank r the r-th slice
of every global batch, so the data order and position do not depend on the world size.

Gradient bookkeeping, in one place. Rank r holds embeddings e_r (its rows) and computes a
loss L_r on the gathered E = [e_0; ...; e_{W-1}]. The gather's backward sums the gradient of
E over ranks and gives each rank its own rows: grad(e_r) = Σ_s ∂L_s/∂e_r, the gradient of the
total J = Σ_s L_s. Averaging the parameter gradients over ranks then gives ∂(J/W)/∂θ: the
gradient of the mean of the ranks' losses. Here every rank computes the *same* global loss L,
so grad(e_r) = W·∂L/∂e_r, rank r's parameter gradient is W·g_r (g_r: the part of ∂L/∂θ that
flows through rank r's rows), and the average (1/W)·Σ_r W·g_r = Σ_r g_r = ∂L/∂θ, exactly the
single-process gradient of the full batch.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "DistributedBatchSampler",
    "all_gather_with_grad",
    "average_gradients",
    "barrier",
    "broadcast_parameters",
    "cleanup",
    "encode_sharded",
    "gather_for_loss",
    "gather_sizes",
    "init_distributed",
    "is_distributed",
    "local_batch_size",
    "max_over_ranks",
    "shard_batch",
]

# Rank 0 writes checkpoints and computes evaluation metrics while the other ranks wait in their
# next collective; torch's default NCCL timeout (10 min) would kill a long one, so allow 30 min.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, GPU index on its node, and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def _device_for(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None and dev.index != local_rank:
            raise ValueError(f"device={device!r} under torchrun: each rank uses the GPU of its "
                             f"LOCAL_RANK (here cuda:{local_rank}); use device='auto' or 'cuda'")
        return torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", backend: str | None = None,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistInfo:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU); a no-op without torchrun.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT through `env://`) as set
    by torchrun. On CUDA each rank uses, and makes current, `cuda:LOCAL_RANK`, so that
    `device="cuda"` / `"auto"` elsewhere means this rank's GPU. Safe to call twice.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size <= 1:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return DistInfo(device=torch.device(device))
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no "
                           "torch.distributed support")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    dev = _device_for(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {missing} not set: launch with "
                               "torchrun (e.g. torchrun --nproc_per_node 2 -m mmlib.train ...)")
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method="env://", rank=rank,
                                world_size=world_size, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                    is_main=rank == 0)


def cleanup() -> None:
    """Leave the process group (a no-op when none was started)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


# ------------------------------------------------------------------------- gathers with grad
def gather_sizes(sizes: int | Sequence[int], device: torch.device | str = "cpu") -> list:
    """Every rank's integers, in rank order: `[n_0, ..., n_{W-1}]`, or a list of lists when
    each rank gives several numbers (all ranks must give the same count)."""
    one = isinstance(sizes, int)
    local = torch.tensor([sizes] if one else list(sizes), dtype=torch.long, device=device)
    if not is_distributed():
        out = [local]
    else:
        out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(out, local)
    return [int(t[0]) if one else t.tolist() for t in out]


def max_over_ranks(values: Sequence[int], device: torch.device | str = "cpu") -> list[int]:
    """Element-wise maximum of every rank's integers (the values themselves in one process)."""
    local = torch.tensor(list(values), dtype=torch.long, device=device)
    if is_distributed():
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return local.tolist()


def all_gather_with_grad(x: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """(Σ_r B_r, ...) concatenation of every rank's (B_r, ...) tensor in rank order, with
    gradients flowing back to each rank's own rows (summed over the ranks' losses).

    Per-rank sizes may differ; pass `sizes` (every rank's B_r) when known to skip one small
    collective. A collective in forward *and* backward: every rank must call it the same
    number of times in the same order, and run backward through it if any rank does.
    Returns `x` itself in a single process.

    torch's functional all-gather does the work: every rank pads its rows to the longest
    B_r, and the backward of the gather is a reduce-scatter with SUM. The gathered E is used
    by every rank's loss L_s, so ∂J/∂E = Σ_s ∂L_s/∂E (J = Σ_s L_s); rank r's rows e_r are
    one block of E, so grad(e_r) = Σ_s (∂L_s/∂E)[rows of r]: exactly a reduce-scatter of the
    ranks' gradients of E, each rank receiving its own block (padding rows get gradients
    that are dropped). Since every rank computes the same global loss L, grad(e_r) =
    W·∂L/∂e_r, and averaging the parameter gradients over ranks gives ∂L/∂θ, the
    single-process gradient (see the module docstring). A reduce-scatter sends each rank
    only its block, where an all-reduce of the whole gradient would send it all W blocks.
    """
    if x.ndim == 0:
        raise ValueError("all_gather_with_grad needs a tensor with a batch dim, got a scalar")
    if not is_distributed():
        return x
    sizes = tuple(gather_sizes(x.shape[0], x.device) if sizes is None else sizes)
    world, rank = dist.get_world_size(), dist.get_rank()
    if len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(f"sizes={list(sizes)} must give the rows of each of the {world} ranks; "
                         f"this rank (rank {rank}) has {x.shape[0]}")
    longest = max(sizes)
    if longest == 0:
        return x  # every rank is empty: nothing to exchange
    if x.shape[0] < longest:  # the gather needs equal shapes: pad, then cut the padding off
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    gathered = funcol.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
    blocks = funcol.wait_tensor(gathered).view(world, longest, *x.shape[1:])
    return torch.cat([blocks[r, :n] for r, n in enumerate(sizes)])


def gather_for_loss(query: Tensor, target: Tensor,
                    extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """All ranks' loss inputs in the layout of `matryoshka_in_batch_negative_loss`, with grad.

    Input, per rank r: `query` (B_r, E); `target` (B_r + X_r, E), whose row i is the positive
    of query i and whose rows B_r.. are this rank's extra negatives (e.g. hard negatives);
    `extra` (optional) more extra negatives, appended after those.

    Output, the same on every rank (W ranks, B = Σ_r B_r, X = Σ_r X_r):

        query  (B, E)      = [q_0; q_1; ...; q_{W-1}]
        target (B + X, E)  = [p_0; p_1; ...; p_{W-1}; x_0; x_1; ...; x_{W-1}]
                              └──── positives, row i ↔ query i ───┘└─ extra negatives ─┘

    with p_r = target_r[:B_r] and x_r = rank r's extras. This is exactly the single-process
    layout for the global batch that is the ranks' batches concatenated in rank order: row i
    of the global target is the positive of global query i, and every extra negative comes
    after *all* positives. (Appending each rank's extras right after its own positives would
    shift the diagonal, and silently train queries towards other rows, hard negatives
    included.) One collective in each direction; per-rank B_r and X_r may differ.
    Returns `(query, target [+ extra])` unchanged in a single process.
    """
    for name, t in (("query", query), ("target", target), ("extra", extra)):
        if t is not None and t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, E), got shape {tuple(t.shape)}")
    b = query.shape[0]
    if target.shape[0] < b or target.shape[1] != query.shape[1]:
        raise ValueError(f"target {tuple(target.shape)} must have at least as many rows as query "
                         f"{tuple(query.shape)} (row i = positive of query i) and the same width")
    if extra is not None:
        if extra.shape[1] != query.shape[1]:
            raise ValueError(f"extra {tuple(extra.shape)} must have the width of query "
                             f"{tuple(query.shape)}")
        target = torch.cat([target, extra])
    if not is_distributed():
        return query, target
    counts = gather_sizes([b, target.shape[0] - b], query.device)  # [[B_r, X_r], ...]
    # Rank r sends [q_r; p_r; x_r] (2·B_r + X_r rows) in one gather.
    gathered = all_gather_with_grad(torch.cat([query, target]),
                                    sizes=[2 * br + xr for br, xr in counts])
    chunks = gathered.split([2 * br + xr for br, xr in counts])
    queries = [c[:br] for c, (br, _) in zip(chunks, counts, strict=True)]
    positives = [c[br:2 * br] for c, (br, _) in zip(chunks, counts, strict=True)]
    extras = [c[2 * br:] for c, (br, _) in zip(chunks, counts, strict=True)]
    return torch.cat(queries), torch.cat(positives + extras)


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of `x` (no gradient; row counts may differ), concatenated in rank order."""
    with torch.no_grad():  # the same padded gather, without a graph
        return all_gather_with_grad(x)


def encode_sharded(encoder: Any, texts: Sequence[Any] | None = None,
                   images: Sequence[Any] | None = None, batch_size: int | None = None,
                   **kwargs: Any) -> Tensor:
    """`encoder.encode(texts, images, ...)` with each rank embedding a contiguous 1/W of the
    inputs; every rank gets all the embeddings, in input order, on the CPU (a collective;
    plain `encode` in a single process).

    Under FSDP every forward is a collective, so all ranks run the same number: the shares
    are padded to one length with copies of the last input (dropped after the gather), and
    batches hold `batch_size` rows (default: the encoder's) instead of a token budget.
    """
    if not is_distributed():
        return encoder.encode(texts, images, batch_size=batch_size, **kwargs)
    n = len(texts if texts is not None else images)
    world, rank = dist.get_world_size(), dist.get_rank()
    share = -(-n // world)
    mine = [min(i, n - 1) for i in range(rank * share, (rank + 1) * share)]

    def pick(items: Sequence[Any] | None) -> list[Any] | None:
        return None if items is None else [items[i] for i in mine]

    rows = batch_size or encoder.config.batch_size
    emb = encoder.encode(pick(texts), pick(images), batch_size=rows, max_tokens=sys.maxsize,
                         **kwargs)
    return gather_rows(emb.to(encoder.device))[:n].cpu()  # NCCL gathers GPU tensors only


def gather_loss_ids(target_ids: Tensor, hard_negative_ids: Tensor,
                    hard_negative_owner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Identities in the layout of `gather_for_loss`: all ranks' target ids (row i = global
    query i), then all ranks' hard-negative ids, and their owners as global query rows."""
    if not is_distributed():
        return target_ids, hard_negative_ids, hard_negative_owner
    counts = gather_sizes(target_ids.shape[0], target_ids.device)
    offset = sum(counts[:dist.get_rank()])
    return (gather_rows(target_ids), gather_rows(hard_negative_ids),
            gather_rows(hard_negative_owner + offset))


# ------------------------------------------------------------------------- parameter gradients
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s trainable parameters and buffers to every rank (as DDP does at start)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src)
        for b in module.buffers():
            dist.broadcast(b, src)


def average_gradients(params: Iterable[torch.nn.Parameter],
                      bucket_bytes: int = 64 * 2**20) -> None:
    """Replace every `.grad` by its mean over ranks (a no-op in a single process).

    A parameter without a gradient on any rank keeps `grad=None` (so the optimizer skips it,
    as in a single process); one with a gradient on some ranks only counts zeros elsewhere.
    Gradients travel in flat buckets of about `bucket_bytes` (a few large collectives).
    """
    if not is_distributed():
        return
    params = list(params)
    world = dist.get_world_size()
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad)  # every rank must reduce the same list of tensors
    grads = []
    for p, n in zip(params, has_grad.tolist(), strict=True):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[Tensor] = []
    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or g.device != bucket[0].device
                       or sum(t.numel() * t.element_size() for t in bucket) >= bucket_bytes):
            _reduce_bucket(bucket, world)
            bucket = []
        bucket.append(g)
    if bucket:
        _reduce_bucket(bucket, world)


def _reduce_bucket(grads: list[Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


# ------------------------------------------------------------------------------ data sharding
def local_batch_size(global_batch_size: int, world_size: int) -> int:
    """Rows per rank of a global batch; the global batch must split evenly."""
    if global_batch_size % world_size:
        raise ValueError(f"batch_size={global_batch_size} is the global batch and must be "
                         f"divisible by the world size {world_size} (each rank takes "
                         f"batch_size / {world_size} rows); e.g. use "
                         f"{max(world_size, global_batch_size // world_size * world_size)}")
    return global_batch_size // world_size


def shard_batch(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous slice of a global batch (slices differ by at most one row;
    concatenated in rank order they give the batch back)."""
    n = len(batch)
    if n < world_size:
        raise ValueError(f"a batch of {n} rows cannot give each of {world_size} ranks a row")
    return list(batch[rank * n // world_size:(rank + 1) * n // world_size])


class DistributedBatchSampler(Sampler[list[int]]):
    """Rank r's slice of every global batch of a batch sampler (e.g. `LengthBucketSampler`).

    The wrapped sampler yields the *global* batches (deterministic by seed and epoch, the same
    on every rank); rank r gets `shard_batch(batch, r, W)` of each. So the W ranks together
    see exactly the single-process global batch, and a data position counted in global
    batches means the same thing on any world size (checkpoints resume across world sizes).
    """

    def __init__(self, batch_sampler: Sampler[list[int]], rank: int | None = None,
                 world_size: int | None = None):
        if world_size is None:
            world_size = dist.get_world_size() if is_distributed() else 1
        if rank is None:
            rank = dist.get_rank() if is_distributed() else 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
        self.batch_sampler, self.rank, self.world_size = batch_sampler, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch of the wrapped sampler (same on every rank)."""
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            yield shard_batch(batch, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.batch_sampler)
