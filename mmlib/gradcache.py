"""GradCache: contrastive batches larger than memory, with the exact full-batch gradient.

A contrastive loss needs every embedding of the batch at once (each row is a negative of
every other), so plain gradient accumulation would shrink the negatives to a micro-batch.
GradCache (Gao et al. 2021, https://arxiv.org/abs/2101.06983) splits the work instead:

1. embed every micro-batch **without** gradients (activations freed at once);
2. compute the full-batch loss on those embeddings and its gradient w.r.t. the embeddings
   only (cheap: the loss is tiny next to the encoder);
3. re-embed each micro-batch **with** gradients and back-propagate the cached embedding
   gradient, `emb.backward(grad_slice)`; parameter gradients add up over micro-batches.

By the chain rule the parameter gradients equal those of one big batch; peak memory is that
of one micro-batch. Each micro-batch's RNG state is replayed in step 3 so dropout masks match
step 1. Cost: about one extra forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Batch = dict[str, Any]


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Split a processor batch into micro-batches of at most `size` rows (images follow rows)."""
    if size <= 0:
        raise ValueError(f"micro-batch size must be positive, got {size}")
    n = batch["input_ids"].shape[0]
    grid = batch.get("image_grid_thw")
    if grid is not None:
        # pixel_values are concatenated patches of all images in row order; images belong to
        # the rows that hold image tokens, in order.
        patches_per_image = grid.prod(-1).tolist()
        image_rows = _rows_with_images(batch)
        offsets = [0]
        for p in patches_per_image:
            offsets.append(offsets[-1] + p)
    out = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        mb = {k: v[start:stop] for k, v in batch.items()
              if k not in ("pixel_values", "image_grid_thw") and torch.is_tensor(v)}
        if grid is not None:
            idx = [i for i, r in enumerate(image_rows) if start <= r < stop]
            if idx:
                mb["image_grid_thw"] = grid[idx[0]:idx[-1] + 1]
                mb["pixel_values"] = batch["pixel_values"][offsets[idx[0]]:offsets[idx[-1] + 1]]
        out.append(mb)
    return out


def _rows_with_images(batch: Batch) -> list[int]:
    """Row of each image in the batch (one image per row at most, as mmlib builds inputs)."""
    types = batch["mm_token_type_ids"]
    return [r for r in range(types.shape[0]) if bool((types[r] == 1).any())]


class _RngState:
    """Snapshot of the CPU and CUDA RNG states, replayable later."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run a block with the saved states; the global RNG is untouched afterwards."""
        with torch.random.fork_rng(devices=list(range(len(self.cuda))) if self.cuda else []):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def _embed(encoder: Callable[..., torch.Tensor], batches: Sequence[Batch],
           dummies: int = 0) -> tuple[torch.Tensor, list]:
    states, embs = [], []
    with torch.no_grad():
        for mb in batches:
            states.append(_RngState())
            embs.append(encoder(**mb))
        for _ in range(dummies):
            with _RngState().replay():  # leaves the RNG stream as if it never ran
                encoder(**split_batch(batches[0], 1)[0])
    return torch.cat(embs), states


def _passes(batches: Sequence[Batch], states: list, grad: torch.Tensor,
            dummies: int = 0) -> list[tuple[Batch, _RngState, torch.Tensor | None]]:
    """(micro-batch, RNG state, its rows of `grad`) per backward pass; dummies get None."""
    rows = [mb["input_ids"].shape[0] for mb in batches]
    out = list(zip(batches, states, grad.split(rows), strict=True))
    return out + [(split_batch(batches[0], 1)[0], _RngState(), None)] * dummies


def _backprop(encoder: Callable[..., torch.Tensor], passes: list,
              before_last: Callable[[], None] | None = None) -> None:
    for i, (mb, state, grad) in enumerate(passes):
        with state.replay():
            emb = encoder(**mb)
        if before_last is not None and i == len(passes) - 1:
            before_last()
        # A dummy's gradient is zero: parameters unchanged, collectives matched.
        emb.backward(torch.zeros_like(emb) if grad is None else grad.to(emb.dtype))


def detach_outputs(outputs: Sequence[Any]) -> list[Any]:
    """Each output (a tensor or a dict of tensors) detached as a leaf that requires grad: a
    loss on these fills their `.grad` without back-propagating into the model."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().requires_grad_(True)
    return [{k: leaf(v) for k, v in o.items()} if isinstance(o, dict) else leaf(o) for o in outputs]


def backward_outputs(outputs: Sequence[Any], leaves: Sequence[Any],
                     before_last: Callable[[], None] | None = None) -> None:
    """One backward pass per output, each with its leaf's gradient (from `detach_outputs`,
    after the loss's backward): the chain rule, as GradCache's re-embedding pass uses.
    `before_last` is called just before the last pass."""
    for i, (out, leaf) in enumerate(zip(outputs, leaves, strict=True)):
        outs, ins = (list(out.values()), list(leaf.values())) if isinstance(out, dict) \
            else ([out], [leaf])
        grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in ins]
        if before_last is not None and i == len(outputs) - 1:
            before_last()
        torch.autograd.backward(outs, grads)


def gradcache_step(
    encoder: Callable[..., torch.Tensor],
    query: Batch,
    target: Batch,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    micro_batch_size: int,
    extra_targets: Batch | None = None,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    align: Callable[[list[int]], list[int]] | None = None,
    before_last_backward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Loss of the full batch with parameter gradients accumulated micro-batch by micro-batch.

    `encoder(**batch)` returns embeddings; `loss_fn(q, t)` is any contrastive loss (its own
    parameters, e.g. a learnable temperature, get their gradients too). `extra_targets` are
    appended to the targets (extra negatives). `scale` (e.g. `GradScaler.scale`) is applied
    to the loss before its backward. `align` maps this process's micro-batch counts
    `[queries, targets]` to the counts to run (under FSDP: the maximum over ranks, since every
    rank must run every forward and backward); missing ones run a one-row dummy whose
    gradient is zero. `before_last_backward` is called just before the last backward pass
    through the encoder (under FSDP: turn the gradient reduce-scatter back on). Returns the
    detached loss.
    """
    q_batches = split_batch(query, micro_batch_size)
    t_batches = split_batch(target, micro_batch_size)
    if extra_targets is not None:
        t_batches += split_batch(extra_targets, micro_batch_size)
    q_pad = t_pad = 0
    if align is not None:
        nq, nt = align([len(q_batches), len(t_batches)])
        q_pad, t_pad = nq - len(q_batches), nt - len(t_batches)
    q, q_states = _embed(encoder, q_batches, q_pad)
    t, t_states = _embed(encoder, t_batches, t_pad)
    q.requires_grad_(True)
    t.requires_grad_(True)
    loss = loss_fn(q, t)
    (scale(loss) if scale is not None else loss).backward()
    passes = _passes(q_batches, q_states, q.grad, q_pad)
    passes += _passes(t_batches, t_states, t.grad, t_pad)
    _backprop(encoder, passes, before_last_backward)
    return loss.detach()
