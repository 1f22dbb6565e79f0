"""Fully sharded data parallelism (FSDP2): train an encoder too large for one GPU's memory.

    torchrun --nproc_per_node 8 -m mmlib.train --config configs/tiny_mrl.yaml --set fsdp=true

Data parallelism (mmlib/distributed.py) keeps a whole copy of the weights, gradients and
AdamW moments on every rank. With `fsdp=true` every rank keeps 1/W of each of them instead
(torch's `fully_shard`): a decoder layer or vision block is all-gathered just before its
forward (and again before its backward) and freed right after (in bf16 under bf16 mixed
precision), and its gradients are reduce-scattered, once per optimizer step however many
backward passes it takes (`set_gradient_sync`), so each rank updates only its own shard
(see docs/distributed.md, "What a step communicates"). The training *maths* does not
change: embeddings are still gathered across ranks so the global batch supplies the
negatives, and FSDP's reduce-scatter averages the gradients over ranks exactly as
`average_gradients` does, so a step equals the single-process step on the global batch
(tested in tests/test_distributed.py).

Sharding units: each vision block, each decoder layer, the projection head (its own unit
because its dtype may differ from a bf16 backbone's), and the rest (embeddings, final norm,
patch embedding, merger) with the encoder as the root. The final model is written in the
ordinary single-process format (full tensors, gathered one at a time); checkpoints are written
shard by shard by every rank (mmlib/checkpoint.py) and resharded on load. Both load anywhere:
one process, DDP, or FSDP on another world size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_deferred_gradients_fit", "full_state_dict", "full_tensor", "is_sharded", "set_gradient_sync",
           "shard_encoder"]


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_encoder(encoder: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """Shard a `MultimodalEncoder` in place over every rank of the process group (FSDP2).

    Call it after the weights are final on every rank (e.g. after `broadcast_parameters`)
    and before building the optimizer: parameters are replaced by sharded DTensors.
    `reshard_after_forward=False` keeps each layer gathered from forward to backward (more
    memory, fewer all-gathers). Under bf16 mixed precision the backbone's units are gathered
    in bf16 (half the all-gather traffic and unsharded memory) and their gradients
    reduce-scattered in fp32; the shards, the optimizer and the projection head stay fp32.
    Returns the encoder.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_encoder needs a process group: launch with torchrun "
                           "(e.g. torchrun --nproc_per_node 2 -m mmlib.train ... --set fsdp=true)")
    if is_sharded(encoder):
        return encoder
    device = encoder.device
    if any(p.device != device for p in encoder.parameters()):
        raise ValueError("fsdp: every parameter must be on this rank's device; device_map "
                         "(one model over several GPUs) cannot be combined with fsdp")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    qwen = encoder.qwen
    # The backbone would run in bf16 under autocast anyway; the head runs outside autocast in
    # fp32 (its LayerNorm and L2 norm are where low precision hurts), so it keeps no policy.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if encoder.amp_dtype == torch.bfloat16 else MixedPrecisionPolicy()
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    for unit in [*qwen.visual.blocks, *qwen.language_model.layers]:
        fully_shard(unit, mp_policy=policy, **kw)
    fully_shard(encoder.projection, **kw)
    # The root gathers what is left; it stays gathered from forward to backward by default.
    fully_shard(encoder, mp_policy=policy, **kw)
    return encoder


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Whether the next backward passes reduce-scatter the gradients of a sharded `module`
    (a no-op for any other module).

    Off, each rank adds every backward pass's gradients to whole, unsharded ones (in fp32)
    and communicates nothing; the first backward with it on reduce-scatters the sum. Several
    backward passes per step (accumulation, GradCache) then cost one reduce-scatter per
    unit instead of one per pass, but hold the trainable parameters' full gradients
    between passes (4 bytes per parameter on every rank).
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)


def check_deferred_gradients_fit(whole_bytes: int, device: torch.device) -> None:
    """Refuse one-reduce-scatter-per-step on a GPU where the whole fp32 gradient it holds
    between backward passes (`whole_bytes`) would take more than half the GPU's memory."""
    if device.type != "cuda":
        return  # CPU training: host memory, no fixed budget to compare with
    total = torch.cuda.get_device_properties(device).total_memory
    if whole_bytes > total / 2:
        raise ValueError(
            f"fsdp: one reduce-scatter per step keeps the whole fp32 gradient of the trainable "
            f"parameters on every rank between backward passes ({whole_bytes / 1e9:.1f} GB), more "
            f"than half of this GPU's {total / 1e9:.0f} GB: set fsdp_sync_every_backward=true "
            "(a reduce-scatter per backward pass, sharded gradients) or train fewer parameters "
            "(LoRA)")


def is_sharded(module: nn.Module) -> bool:
    """True when some parameter of `module` is a sharded DTensor (after `shard_encoder`)."""
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) for p in module.parameters())


def full_tensor(t: Any) -> Any:
    """The whole tensor behind a DTensor shard (a collective: every rank must call it);
    anything else unchanged."""
    if isinstance(t, _dtensor_type()):
        return t.full_tensor()
    return t


def full_state_dict(module: nn.Module, main: bool = True,
                    keep: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """`module.state_dict()` with whole tensors on the CPU, gathered one tensor at a time
    (a collective under FSDP: every rank calls it; only ranks with `main` keep the tensors,
    the others get an empty dict). `keep(name)` selects entries (e.g. only a LoRA adapter's,
    so a frozen 72B base is never gathered)."""
    out = {}
    for name, t in module.state_dict().items():
        if keep is not None and not keep(name):
            continue
        whole = full_tensor(t)
        if main:
            out[name] = whole.detach().cpu().contiguous()
        del whole
    return out
