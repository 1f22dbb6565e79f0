"""A plain, readable training loop for the Matryoshka image–text encoder.

    python -m mmlib.train --config configs/tiny_mrl.yaml
    python -m mmlib.train --config configs/tiny_mrl.yaml --set max_steps=50 encoder.learning_rate=3e-4

One optimizer step = `grad_accum_steps` batches of `batch_size` pairs. Within a batch,
`micro_batch_size` switches on GradCache (same loss and gradients as the whole batch, memory
of one micro-batch); accumulation across batches does *not* add negatives. AdamW with linear
warm-up and cosine decay, AMP from the encoder config (bf16 on GPU; fp16 uses a GradScaler),
gradient clipping with the norm logged, periodic retrieval evaluation per Matryoshka dim,
metrics as JSONL, sharded checkpoints (mmlib/checkpoint.py) that resume exactly.
`loss` chooses mrl | full | hard_negatives | multilevel (see LOSSES_DOC); per-dim losses are
logged as `loss@64` (`loss@L-2@64` per layer), see `mmlib.plots.plot_training_curves`.

One run per `output_dir` (mmlib/run_dir.py): a lock names the live run, a fresh run refuses a
folder holding another run's outputs (`resume=auto` continues it, `overwrite=true` replaces
it), and checkpoints appear whole or not at all (written under a temporary name, fsynced,
renamed), so `resume=auto` after a kill finds the newest complete one. Ctrl-C and SIGTERM
(cluster preemption) are acted on between steps: the last completed step is saved and the CLI
exits with 130 / 143; an exception inside a step also saves the last completed step first.

Under torchrun (`torchrun --nproc_per_node 8 -m mmlib.train --config ...`) `batch_size` is the
global batch: each rank embeds batch_size / W pairs, the embeddings are gathered with gradient
so that every rank computes the loss of the whole global batch, gradients are averaged, and a
step equals the single-process step on the same global batch (see mmlib/distributed.py). Rank
0 logs; evaluation is sharded (each rank embeds its share, rank 0 computes the metrics); every
rank writes its own part of a checkpoint, which resumes on any world size.
`fsdp: true` also shards weights, gradients and optimizer moments over the ranks, for models
that do not fit one GPU (mmlib/fsdp.py); the step and the checkpoints stay the same.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import logging
import math
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from mmlib import checkpoint
from mmlib.config import EncoderConfig
from mmlib.data import (
    BATCH_SAMPLERS,
    ImageTextCollator,
    ImageTextDataset,
    LengthBucketSampler,
    NoDuplicatesBatchSampler,
    text_lengths,
)
from mmlib.distributed import (
    DistributedBatchSampler,
    average_gradients,
    barrier,
    broadcast_parameters,
    cleanup,
    encode_sharded,
    gather_for_loss,
    gather_loss_ids,
    init_distributed,
    local_batch_size,
    max_over_ranks,
)
from mmlib.encoder import MultimodalEncoder
from mmlib.evaluation import evaluate_image_caption, evaluation_embeddings
from mmlib.fsdp import (
    check_deferred_gradients_fit,
    full_state_dict,
    full_tensor,
    set_gradient_sync,
    shard_encoder,
)
from mmlib.gradcache import backward_outputs, detach_outputs, gradcache_step, split_batch
from mmlib.losses import (
    ContrastiveLossWithHardNegatives,
    LearnableTemperature,
    MultiLevelContrastiveLoss,
)
from mmlib.run_dir import (
    CheckpointError,
    RunDirBusy,
    RunLock,
    atomic_dir,
    checkpoint_state,
    clear_previous_run,
    last_good,
    latest_checkpoint,
    previous_run,
    scan_checkpoints,
    write_text_atomic,
)
from mmlib.validation import (
    ValidationError,
    coerce_fields,
    require_int,
    require_number,
    require_str,
)

logger = logging.getLogger("mmlib")


@dataclass
class TrainConfig:
    """A training run: the encoder's config plus data, schedule and logging."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    manifest: str = "data_samples/synthetic/manifest.jsonl"
    train_split: str | None = "train"
    eval_split: str | None = "validation"
    direction: str = "text2image"
    loss: str = "mrl"  # mrl | full | hard_negatives | multilevel (see LOSSES)
    symmetric: bool = True
    hard_negatives: bool = False
    skip_bad: bool = False
    max_steps: int = 100
    micro_batch_size: int | None = None
    warmup_steps: int = 10
    weight_decay: float = 0.01
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    log_every: int = 10
    output_dir: str = "runs/tiny"
    resume: str | None = None  # a checkpoint folder, or "auto" for the latest in output_dir
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2)
    # fsdp with several backward passes a step (accumulation, GradCache): reduce-scatter after
    # each (less memory) instead of once after the last (holds whole fp32 gradients between)
    fsdp_sync_every_backward: bool = False
    progress: bool = True
    overwrite: bool = False  # a fresh run may replace the outputs of an earlier run in output_dir
    # "no_duplicates": shuffled, no image or caption twice in a batch; "length_grouped": batches
    # of similar caption length (less padding, but every batch's negatives have one length)
    batch_sampler: str = "no_duplicates"

    learnable_temperature: bool = False  # CLIP-style, starts at encoder.temperature; logged
    hard_negative_mode: str = "shared"  # loss=hard_negatives: "shared" (MNRL) | "per_query"
    guide: str = "none"  # loss=hard_negatives false-negative guard: "none" | "self" | "frozen"
    guide_margin: float = 0.0  # guard: drop negatives scoring > positive - margin (by the guide)
    dim_weights: list[float] | dict[int, float] | None = None  # one per loss dim; None = 1 each
    layers: list[int] = field(default_factory=lambda: [-1, -2])  # loss=multilevel: decoder layers
    layer_weights: list[float] | None = None  # loss=multilevel: one per layer; None = 1 each

    def __post_init__(self) -> None:
        # Every field to its declared type (a dict `encoder` → EncoderConfig, "3e-4" → 3e-4),
        # errors naming the dotted field (encoder.learning_rate), before anything is built.
        coerce_fields(self)
        self._check_loss_fields()
        if self.direction not in ("text2image", "image2text"):
            raise ValueError(f"direction must be 'text2image' or 'image2text', got {self.direction!r}")
        for name in ("max_steps", "log_every"):
            require_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every"):  # 0: none / only at the end
            require_int(name, getattr(self, name), minimum=0)
        require_int("micro_batch_size", self.micro_batch_size, optional=True)
        require_number("weight_decay", self.weight_decay, at_least=0)
        for name in ("manifest", "output_dir"):
            require_str(name, getattr(self, name))
        for name in ("train_split", "eval_split", "resume"):
            require_str(name, getattr(self, name), optional=True)
        if self.batch_sampler not in BATCH_SAMPLERS:
            raise ValueError(f"batch_sampler must be one of {BATCH_SAMPLERS}, got {self.batch_sampler!r}")
        if self.fsdp_sync_every_backward and not self.fsdp:
            raise ValueError("fsdp_sync_every_backward is an option of fsdp=true; set fsdp: true "
                             "or drop it")

    def _check_loss_fields(self) -> None:
        """Raise ValueError naming a bad or contradictory loss setting."""
        for name, choices in (("loss", LOSSES), ("hard_negative_mode", ("shared", "per_query")),
                              ("guide", ("none", "self", "frozen"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.loss != "hard_negatives" and (self.guide != "none"
                                              or self.hard_negative_mode != "shared"):
            raise ValueError(f"guide={self.guide!r} / hard_negative_mode={self.hard_negative_mode!r}"
                             f" are options of loss=hard_negatives, not of loss={self.loss!r}")
        if not isinstance(self.guide_margin, (int, float)) or not math.isfinite(self.guide_margin):
            raise ValueError(f"guide_margin must be a finite number, got {self.guide_margin!r}")
        if self.guide == "none" and self.guide_margin != 0.0:
            raise ValueError(f"guide_margin={self.guide_margin} has no effect with guide='none'; "
                             "set guide to 'self' or 'frozen', or drop guide_margin")
        if self.loss == "multilevel":
            if not self.layers or not all(isinstance(x, int) and x != 0 for x in self.layers):
                raise ValueError(f"layers must be a non-empty list of decoder layers (1-based, or "
                                 f"-1 for the last), got {self.layers!r}")
            if self.layer_weights is not None and len(self.layer_weights) != len(self.layers):
                raise ValueError(f"layer_weights has {len(self.layer_weights)} entries for layers "
                                 f"{self.layers}; give one per layer or null")
            if self.micro_batch_size is not None:
                raise ValueError("loss=multilevel cannot run with micro_batch_size (GradCache "
                                 "caches one embedding per row, not one per layer): set "
                                 "micro_batch_size to null or use loss=mrl")
        if self.fsdp and (self.learnable_temperature or self.guide == "frozen"):
            raise ValueError("fsdp=true supports neither learnable_temperature nor guide=frozen "
                             "(the temperature is not sharded, a frozen copy would be); turn them off")

    @property
    def loss_dims(self) -> list[int]:
        """The dims the loss is summed over."""
        dims = self.encoder.resolved_mrl_dims()
        return [self.encoder.embed_dim] if self.loss == "full" else dims

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (nested encoder config) for YAML / JSON."""
        d = dataclasses.asdict(self)
        d["encoder"] = self.encoder.to_dict()
        return d

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML/JSON config; `overrides` like `max_steps=50` or `encoder.lr=...`."""
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must look like key=value (e.g. max_steps=50)")
            target = data
            *parents, leaf = key.split(".")
            for i, p in enumerate(parents):
                target = target.setdefault(p, {})
                if not isinstance(target, dict):
                    raise ValidationError(".".join(parents[:i + 1]), f"is {target!r}, not a "
                                          f"mapping, so override {item!r} cannot set a field in it")
            target[leaf] = yaml.safe_load(value)  # a string where YAML 1.1 reads one: coerced
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig field(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)


LOSSES = ("mrl", "full", "hard_negatives", "multilevel")
LOSSES_DOC = """
mrl             Matryoshka InfoNCE over encoder.mrl_dims (weights: dim_weights)
full            the same at the full width only
hard_negatives  mrl plus the manifest's hard negatives (read automatically), shared by the batch
                (hard_negative_mode: shared, as MNRL) or per_query, and a false-negative guard
                (guide: self = the model's own scores at each dim, frozen = a frozen copy of the
                starting encoder, as GISTEmbed; guide_margin)
multilevel      mrl at several decoder layers (layers, layer_weights; 2D Matryoshka)
Every loss masks hard negatives that are some row's positive; learnable_temperature for any.
"""


def build_loss(config: TrainConfig) -> torch.nn.Module:
    """The loss module a config asks for (its parameters, e.g. a learnable temperature, train)."""
    enc = config.encoder
    temperature = (LearnableTemperature(enc.temperature) if config.learnable_temperature
                   else enc.temperature)
    dims, weights = config.loss_dims, config.dim_weights
    if config.loss == "multilevel":
        return MultiLevelContrastiveLoss(dims, weights, config.layer_weights, temperature,
                                         config.symmetric)
    margin = float(config.guide_margin) if config.guide != "none" else None
    return ContrastiveLossWithHardNegatives(dims, weights, temperature, config.symmetric,
                                            margin=margin)


def loss_metric_name(key: Any) -> str:
    """metrics.jsonl column of a per-dim loss: `loss@64`, or `loss@L-2@64` per layer."""
    if isinstance(key, tuple):
        return f"loss@L{key[0]}@{key[1]}"
    return f"loss@{key}"


# -- schedule -------------------------------------------------------------------------------
def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# Encoder settings that change the trainable parameters or their shapes: resuming a checkpoint
# written with other values cannot work (compared before the model is built).
SHAPE_FIELDS = ("embed_dim", "use_lora", "lora_r", "lora_target_modules")


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by `Trainer.train` on SIGINT / SIGTERM, after saving the last completed step."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"{signal.Signals(signum).name}; checkpoint: {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


# -- trainer ----------------------------------------------------------------------------------
class Trainer:
    """Owns the encoder, data, optimizer and schedule of one run."""

    def __init__(self, config: TrainConfig, encoder: MultimodalEncoder | None = None):
        self._lock = RunLock(config.output_dir)  # held until train() ends or close()
        try:
            self._setup(config, encoder)
        except BaseException:
            self._lock.release()
            raise
        weakref.finalize(self, self._lock.release)

    def close(self) -> None:
        """Release output_dir for another run (train() does this when it ends)."""
        self._lock.release()

    def _setup(self, config: TrainConfig, encoder: MultimodalEncoder | None) -> None:
        self.config = config
        enc_cfg = config.encoder
        if enc_cfg.batch_size < 2:
            raise ValueError(f"encoder.batch_size={enc_cfg.batch_size}: a contrastive loss needs "
                             "at least 2 pairs per batch (the other pairs are the negatives); "
                             "set encoder.batch_size >= 2")
        # Under torchrun: join the process group (one GPU per rank); otherwise a no-op, world 1.
        self.dist = init_distributed(enc_cfg.device)
        if self.dist.enabled:
            if enc_cfg.device_map is not None:
                raise ValueError("encoder.device_map spreads one model over several GPUs; it "
                                 "cannot be combined with torchrun data parallelism (one GPU per "
                                 "rank): set device_map to null or launch a single process")
            local_batch_size(enc_cfg.batch_size, self.dist.world_size)  # raises if uneven
        elif config.fsdp:
            raise ValueError("fsdp=true shards the model over torchrun processes; launch with "
                             "torchrun --nproc_per_node N (N >= 2) or set fsdp to false")
        self.out = Path(config.output_dir)
        self._claim_output_dir()
        resume = self._resolve_resume(config.resume) if config.resume else None
        if resume is not None:
            self._check_resumable(resume)  # before the (possibly slow) model build
        torch.manual_seed(config.encoder.seed)
        self.encoder = encoder or MultimodalEncoder(config.encoder)
        broadcast_parameters(self.encoder)  # every rank starts from rank 0's weights
        if config.fsdp:
            if self.encoder.amp_dtype == torch.float16:
                raise ValueError("fsdp=true does not support fp16 mixed precision (its loss "
                                 "scaler cannot see sharded gradients): use bf16 or fp32")
            shard_encoder(self.encoder)  # before the optimizer: parameters become shards
            if not config.fsdp_sync_every_backward:
                # The price of one reduce-scatter per step (mmlib.fsdp.set_gradient_sync).
                whole = 4 * sum(p.numel() for p in self.encoder.parameters() if p.requires_grad)
                check_deferred_gradients_fit(whole, self.encoder.device)
                if self.dist.is_main:
                    logger.info("fsdp: gradients are reduce-scattered once per step; between the "
                                "step's backward passes every rank holds the whole fp32 "
                                "gradient (%.2f GB here): set fsdp_sync_every_backward=true if "
                                "that does not fit", whole / 1e9)
        self.train_set = ImageTextDataset(config.manifest, split=config.train_split,
                                          direction=config.direction, skip_bad=config.skip_bad,
                                          with_hard_negatives=(config.hard_negatives or
                                                               config.loss == "hard_negatives"))
        self.eval_set = (ImageTextDataset(config.manifest, split=config.eval_split,
                                          skip_bad=config.skip_bad)
                         if config.eval_split else None)
        if config.batch_sampler == "length_grouped":
            lengths = text_lengths(self.train_set.texts, self.encoder.processor.tokenizer)
            self.sampler = LengthBucketSampler(lengths, enc_cfg.batch_size, shuffle=True,
                                               seed=enc_cfg.seed, drop_last=True)
        else:  # raises when there are fewer distinct images or captions than batch_size
            self.sampler = NoDuplicatesBatchSampler(self.train_set.image_ids, self.train_set.texts,
                                                    enc_cfg.batch_size, shuffle=True,
                                                    seed=enc_cfg.seed, drop_last=True)
        if len(self.sampler) == 0:
            raise ValueError(f"batch_size={enc_cfg.batch_size} is larger than the "
                             f"{len(self.train_set)} training rows")
        if self.dist.enabled:
            # The sampler above yields the global batches (same on every rank); each rank takes
            # its slice, so the ranks together see exactly the single-process batch and the
            # data position (epoch, batch_in_epoch) stays counted in global batches.
            self.sampler = DistributedBatchSampler(self.sampler, self.dist.rank,
                                                   self.dist.world_size)
        self.collate = ImageTextCollator(self.encoder.processor, max_length=enc_cfg.max_length,
                                         direction=config.direction, prompts=enc_cfg.prompts)
        self.loss_fn = build_loss(config).to(self.encoder.device)
        # GISTEmbed's guide: a frozen copy of the starting encoder (also on resume: copied
        # before the checkpoint is loaded).
        self.guide = (copy.deepcopy(self.encoder).eval().requires_grad_(False)
                      if config.guide == "frozen" else None)
        self._details: list[dict[str, torch.Tensor]] = []  # per-dim losses of the current step
        self.optimizer = torch.optim.AdamW(
            param_groups(torch.nn.ModuleList([self.encoder, self.loss_fn]), config.weight_decay),
            lr=enc_cfg.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(warmup_cosine, warmup=config.warmup_steps,
                                              total=config.max_steps))
        fp16 = self.encoder.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.encoder.device.type, enabled=fp16)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already consumed
        self._order: list[list[int]] = []
        self._order_epoch = -1
        self._saved_at: int | None = None  # the step of this run's latest checkpoint
        self._updating = False  # inside the optimizer update (weights between two steps)
        self._pending_signal: int | None = None
        self._commit()
        if resume is not None:
            self.load_checkpoint(resume)
            if resume.parent.resolve() == self.out.resolve():
                self._saved_at = self.step
        if config.resume and self.dist.is_main:
            self._trim_log(self.step)

    # -- one optimizer step ------------------------------------------------------------------
    def _embed(self, batch: dict[str, Any]) -> Any:
        """Embeddings of a processor batch: (B, E), or {layer: (B, E)} for loss=multilevel."""
        if self.config.loss == "multilevel":
            return self.encoder.forward_layers(batch, self.config.layers)
        return self.encoder(**batch)

    def _guide_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The frozen guide's (query, [targets; hard negatives]) embeddings, no grad."""
        if self.guide is None:
            return None
        mb = self.config.micro_batch_size
        parts = [batch["query"], batch["target"]] + ([batch["hard_negatives"]]
                                                     if batch["hard_negatives"] is not None else [])
        with torch.no_grad():
            embs = [torch.cat([self.guide(**m) for m in split_batch(p, mb)]) if mb else
                    self.guide(**p) for p in parts]
        return embs[0], torch.cat(embs[1:])

    def _loss(self, q: Any, t: Any, batch: dict[str, Any] | None = None,
              guide: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Loss of the (global) batch: under torchrun every rank gathers all ranks' query and
        target embeddings, with gradient, and computes the same loss of the global batch.
        `t` is [positives; hard negatives]; `batch` gives their identities (target_ids,
        hard_negative_ids, hard_negative_owner); per-dim losses are kept for the log."""
        multilevel = isinstance(q, dict)
        ids = None  # batches from ImageTextCollator carry identities; without them, no masks
        if batch is not None and batch.get("target_ids") is not None:
            ids = tuple(batch[k].to(self.encoder.device)
                        for k in ("target_ids", "hard_negative_ids", "hard_negative_owner"))
        if self.dist.enabled:
            if multilevel:  # t: this rank's positives, then its hard negatives
                pairs = {k: gather_for_loss(q[k], t[k]) for k in q}
                q, t = {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}
            else:
                q, t = gather_for_loss(q, t)
            ids = gather_loss_ids(*ids) if ids is not None else None
            if guide is not None:
                guide = gather_for_loss(*guide)
        pos_ids, hard_ids, owner = ids if ids is not None else (None, None, None)
        n = next(iter(q.values())).shape[0] if multilevel else q.shape[0]
        if hard_ids is not None and hard_ids.numel() == 0:
            hard_ids = None
        if multilevel:
            loss, details = self.loss_fn(
                {k: (q[k], t[k]) for k in q}, return_details=True, positive_ids=pos_ids,
                hard_negative_ids=hard_ids)
        else:
            kwargs = {"positive_ids": pos_ids}
            hard = t[n:] if t.shape[0] > n else None
            if hard is not None:
                kwargs["hard_negative_ids"] = hard_ids
                if self.config.hard_negative_mode == "per_query":
                    if owner is None:
                        raise ValueError("hard_negative_mode=per_query needs the batch's "
                                         "hard_negative_owner (ImageTextCollator gives it)")
                    kwargs["hard_negative_owner"] = owner
            if guide is not None:
                gq, gt = guide
                kwargs.update(guide_query=gq, guide_positive=gt[:n],
                              guide_hard_negatives=gt[n:] if hard is not None else None)
            loss, details = self.loss_fn(q, t[:n], hard, return_details=True, **kwargs)
        self._details.append({loss_metric_name(k): v for k, v in details.items()})
        return loss

    def _batch_loss(self, batch: dict[str, Any],
                    before_last_backward: Callable[[], None] | None = None) -> torch.Tensor:
        """Forward + backward of one batch (divided by the accumulation count);
        `before_last_backward` runs just before its last backward pass."""
        accum = self.config.encoder.grad_accum_steps
        guide = self._guide_embeddings(batch)

        def loss_fn(q: Any, t: Any) -> torch.Tensor:
            return self._loss(q, t, batch, guide) / accum

        mb = self.config.micro_batch_size
        # Under FSDP every forward and backward is a collective (layers are gathered), so all
        # ranks must run the same ones, even when their hard-negative counts differ.
        align = functools.partial(max_over_ranks, device=self.encoder.device) \
            if self.config.fsdp else None
        if mb is not None and mb < batch["query"]["input_ids"].shape[0]:
            return gradcache_step(self.encoder, batch["query"], batch["target"], loss_fn, mb,
                                  extra_targets=batch["hard_negatives"],
                                  scale=self.scaler.scale, align=align,
                                  before_last_backward=before_last_backward) * accum
        outputs = [self._embed(batch["query"]), self._embed(batch["target"])]
        hard = batch["hard_negatives"]
        any_hard = align([hard is not None])[0] if align is not None else hard is not None
        if hard is not None:
            outputs.append(self._embed(hard))
        elif any_hard:
            # Another rank embeds hard negatives: run a one-row dummy in the same place and keep
            # none of its rows (zero gradient, same graph shape, so the same collectives).
            outputs.append(self._embed(split_batch(batch["target"], 1)[0]))
        # Under FSDP the batch that reduce-scatters (the step's last, see train_step) sends the
        # loss's gradient back through each encoder call in its own pass: a unit used by
        # several calls of one pass would reduce-scatter at each call's end (the earlier
        # passes' gradients with the first), not once.
        leaves = detach_outputs(outputs) if before_last_backward is not None else outputs
        q, *targets = leaves
        if hard is None and any_hard:
            dummy = targets.pop()
            targets.append({k: v[:0] for k, v in dummy.items()} if isinstance(dummy, dict)
                           else dummy[:0])
        if isinstance(q, dict):
            t = {k: torch.cat([x[k] for x in targets]) for k in q}
        else:
            t = torch.cat(targets)
        loss = loss_fn(q, t)
        self.scaler.scale(loss).backward()
        if leaves is not outputs:
            backward_outputs(outputs, leaves, before_last_backward)
        return loss.detach() * accum

    def _loss_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The loss's trainable parameters (a learnable temperature), named for checkpoints."""
        return {f"loss.{n}": p for n, p in self.loss_fn.named_parameters() if p.requires_grad}

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` batches; returns loss, grad norm, lr."""
        self.encoder.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._details = []
        # Under FSDP the gradients of all backward passes are summed unsharded and
        # reduce-scattered once, in the last pass (mmlib.fsdp.set_gradient_sync).
        defer = self.config.fsdp and not self.config.fsdp_sync_every_backward
        set_gradient_sync(self.encoder, not defer)
        sync = functools.partial(set_gradient_sync, self.encoder, True) if defer else None
        losses = [self._batch_loss(b, sync if i == len(batches) - 1 else None)
                  for i, b in enumerate(batches)]
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        params += list(self._loss_parameters().values())
        if self.dist.enabled and not self.config.fsdp:  # FSDP's reduce-scatter averages itself
            # Rank r's gradient is W x the part of the global loss's gradient that flows through
            # its rows (the gather's backward sums over the W ranks, which all compute the same
            # loss); the mean over ranks is therefore the single-process gradient exactly (the
            # derivation is in mmlib/distributed.py). We average by hand after the backward
            # passes rather than wrap the encoder in DistributedDataParallel: a step runs the
            # encoder several times (query, targets, hard negatives) and GradCache and gradient
            # accumulation run several backward passes, which DDP only handles with no_sync /
            # static_graph care; one explicit average is simpler and testably exact. The cost
            # is no overlap of the gradient all-reduce with the backward pass.
            average_gradients(params)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.encoder.max_grad_norm
        grad_norm = full_tensor(  # under FSDP, a norm over every rank's shards
            torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf")))
        lr = self.scheduler.get_last_lr()[0]
        self._updating = True  # an exception from here on leaves no consistent step to save
        learnable = getattr(self.loss_fn, "temperature", None)  # the value this step's loss used
        tau = learnable.temperature if isinstance(learnable, LearnableTemperature) else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self._updating = False
        stats = {"loss": float(torch.stack(losses).mean()), "grad_norm": float(grad_norm), "lr": lr}
        for name in self._details[0] if self._details else []:  # mean over accumulated batches
            stats[name] = float(torch.stack([d[name] for d in self._details]).mean())
        if tau is not None:
            stats["temperature"] = tau
        return stats

    def _commit(self) -> None:
        """Remember the data position and RNG state after a completed step: a checkpoint
        written on Ctrl-C must not count batches drawn for a step that never finished."""
        # This rank's generators only (CPU and the GPU it trains on): a checkpoint of 8 ranks
        # resumes on 4 or 16, each rank restoring its own state where the checkpoint has one.
        self._committed = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                           "rng": checkpoint.rng_state(checkpoint.accelerators(self.encoder))}

    # -- data order (deterministic, resumable) ------------------------------------------------
    def _next_batches(self) -> list[dict[str, Any]]:
        out = []
        while len(out) < self.config.encoder.grad_accum_steps:
            if self._order_epoch != self.epoch:
                self.sampler.set_epoch(self.epoch)
                self._order, self._order_epoch = list(self.sampler), self.epoch
            order = self._order
            if self.batch_in_epoch >= len(order):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                continue
            idx = order[self.batch_in_epoch]
            self.batch_in_epoch += 1
            out.append(self.collate([self.train_set[i] for i in idx]))
        return out

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run until `max_steps`; returns the final evaluation (and timing). Releases
        output_dir when it ends, however it ends."""
        try:
            if self.dist.is_main:
                self._lock.acquire()  # a no-op unless an earlier train() released it
            return self._train()
        finally:
            self._lock.release()

    def _train(self) -> dict[str, Any]:
        cfg = self.config
        main = self.dist.is_main  # only rank 0 writes files and logs
        evaluates = self.eval_set is not None  # every rank embeds its share (see evaluate)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "train_config.yaml",
                              yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress or not main,
                   desc="train", unit="step", dynamic_ncols=True)
        start = time.perf_counter()
        try:
            with self._signals_deferred():
                while self.step < cfg.max_steps:
                    self._stop_if_signalled()
                    stats = self.train_step(self._next_batches())
                    self._commit()
                    if not math.isfinite(stats["loss"]):
                        self.save_checkpoint()
                        raise FloatingPointError(f"loss is {stats['loss']} at step {self.step}; "
                                                 "checkpoint saved. Lower the learning rate or "
                                                 "use bf16.")
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                                    grad=f"{stats['grad_norm']:.2f}")
                    if self.step % cfg.log_every == 0 or self.step == 1:
                        self.log({"split": "train", "epoch": self.epoch, **stats,
                                  "elapsed_s": round(time.perf_counter() - start, 3)})
                    if (cfg.eval_every and self.step % cfg.eval_every == 0
                            and self.step < cfg.max_steps and evaluates):
                        self.evaluate()
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_checkpoint()
                self._stop_if_signalled()
        except TrainingInterrupted:
            raise  # saved already (or a second signal: stop at once)
        except BaseException as error:
            self._save_after(error)
            raise
        finally:
            bar.close()
        train_time = time.perf_counter() - start
        self._checkpoint_now()
        df = self.evaluate() if evaluates else None  # before the save: the model card lists it
        weights = (full_state_dict(self.encoder, main, keep=self.encoder.saves_weight)
                   if cfg.fsdp else None)
        if main:
            with atomic_dir(self.out / "final") as tmp:
                self.encoder.save_pretrained(tmp, state_dict=weights, evaluation=df, training={
                    k: v for k, v in cfg.to_dict().items() if k != "encoder"})
        del weights
        barrier()  # every rank returns once the final model is written
        result = {"train_time_s": train_time, "steps": self.step}
        if evaluates and main:
            df.to_csv(self.out / "eval.csv")
            result["eval"] = df
        return result

    # -- signals and failures ----------------------------------------------------------------
    @contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """SIGINT / SIGTERM only set a flag that the loop acts on between steps, so that a
        checkpoint is always of a completed step; a second signal stops at once, unsaved.
        The previous handlers come back afterwards (handlers exist only in the main thread)."""
        self._pending_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def defer(signum: int, frame: Any) -> None:
            if self._pending_signal is not None:
                raise TrainingInterrupted(signum, None)
            self._pending_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is not signal.SIG_IGN:  # an ignored signal stays ignored
                previous[sig] = handler
                signal.signal(sig, defer)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _stop_if_signalled(self) -> None:
        """Between steps: after SIGINT / SIGTERM (on any rank) save the step, then raise."""
        signum = self._pending_signal or 0
        if self.dist.enabled:  # all ranks stop at the same step (saving may be collective)
            signum = max_over_ranks([signum], device=self.encoder.device)[0]
        if not signum:
            return
        path = self._checkpoint_now()
        if self.dist.is_main:
            print(f"\n{signal.Signals(signum).name} at step {self.step}: checkpoint saved to "
                  f"{path}; resume with --set resume=auto (or resume={path})", file=sys.stderr)
        raise TrainingInterrupted(signum, path)

    def _save_after(self, error: BaseException) -> None:
        """After an exception in the loop, save the last completed step where that is sound."""
        if self._updating:
            logger.error("%s inside the optimizer update of step %d: no checkpoint saved (the "
                         "weights are between two steps)", type(error).__name__, self.step + 1)
            return
        if self.config.fsdp:
            logger.error("%s after step %d: no checkpoint saved (under FSDP saving needs every "
                         "rank)", type(error).__name__, self.step)
            return
        if not self.dist.is_main:  # the other ranks may be stuck in a collective: rank 0
            return  # writes alone (without FSDP it holds all the weights and moments)
        try:
            path = self._checkpoint_now(collective=False)
        except Exception as e:  # keep the original error; say why nothing was saved
            logger.error("could not save a checkpoint after %s: %s", type(error).__name__, e)
            return
        if self.dist.is_main:
            print(f"\n{type(error).__name__} after step {self.step}: checkpoint saved to {path}; "
                  f"resume with --set resume=auto (or resume={path})", file=sys.stderr)

    def evaluate(self):
        """Retrieval metrics on the eval split per dim; logged and returned as a DataFrame.

        Under torchrun every rank must call it: each embeds its 1/W share of the eval set
        (`encode_sharded`), rank 0 computes the metrics and returns them, the others None."""
        main = self.dist.is_main
        encode = functools.partial(encode_sharded, self.encoder) if self.dist.enabled else None
        texts, images, caption_image = evaluation_embeddings(
            self.encoder, self.eval_set, show_progress=None if main else False, encode=encode)
        if not main:
            return None
        df = evaluate_image_caption(texts, images, caption_image,
                                    dims=self.config.encoder.mrl_dims)
        for dim, row in df.iterrows():
            self.log({"split": self.config.eval_split, "dim": int(dim),
                      **{k: round(float(v), 6) for k, v in row.items()}})
        return df

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (read it with pandas.read_json(lines=True))."""
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **record}) + "\n")

    def _trim_log(self, step: int) -> None:
        """On resume: drop metrics.jsonl records after `step` (the run repeats those steps)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
        keep, unreadable = [], 0
        for line in lines:
            try:
                record_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                unreadable += 1  # e.g. a line cut short by a kill
                continue
            if record_step <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) < len(lines):
            logger.warning("%s: dropped %d records after step %d (the resumed run repeats those "
                           "steps) and %d unreadable lines", path, len(lines) - len(keep) - unreadable,
                           step, unreadable)
            write_text_atomic(path, "".join(keep))

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpointed(self) -> torch.nn.Module:
        """What a checkpoint saves, under stable names: `encoder.*` and the loss's `loss.*`
        (a learnable temperature resumes too); the optimizer is keyed by these names."""
        return torch.nn.ModuleDict({"encoder": self.encoder, "loss": self.loss_fn})

    def save_checkpoint(self, collective: bool = True) -> Path:
        """Trainable weights, optimizer moments, schedule, data position and RNG state.

        Under torchrun every rank writes its own part (mmlib/checkpoint.py: its FSDP shards, or
        its share of the replicated tensors, and its RNG state), so no rank gathers the model;
        the folder appears whole once all are done. The position counts global batches and the
        shards are resharded on load, so a checkpoint resumes on any world size, with or
        without FSDP. `collective=False`: this rank writes alone (plain data parallelism only,
        where every rank holds everything; after an error on one rank).
        """
        path = self.out / f"checkpoint-{self.step:06d}"
        done = self._committed
        state = {"step": self.step, "epoch": done["epoch"], "batch_in_epoch": done["batch_in_epoch"],
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "config": self.config.to_dict(), "world_size": self.dist.world_size}
        checkpoint.save(path, self._checkpointed(), self.optimizer, state, done["rng"],
                        rank=self.dist.rank, device=self.dist.device,
                        collective=self.dist.enabled and collective,
                        pause=functools.partial(checkpoint.pause_for_tests, self.step))
        self._saved_at = self.step
        return path

    def _checkpoint_now(self, collective: bool = True) -> Path:
        """A checkpoint of the current step: written unless this run already holds it."""
        if self._saved_at == self.step:
            return self.out / f"checkpoint-{self.step:06d}"
        return self.save_checkpoint(collective)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything `save_checkpoint` wrote, so training continues bit for bit (on
        another world size: up to the float rounding of another summation order)."""
        path = Path(path)
        state_file = path / checkpoint.STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not an mmlib checkpoint (no {state_file.name})")
        state = json.loads(state_file.read_text())
        saved = state.get("config", {}).get("encoder", {}).get("model_path")
        checkpoint.load(path, self._checkpointed(), self.optimizer,
                        hint=f"it was written for model_path={saved!r} (this run: "
                             f"{self.config.encoder.model_path!r})")
        checkpoint.load_rng(path, self.dist.rank, checkpoint.accelerators(self.encoder),
                            checkpoint.fallback_seed(self.config.encoder.seed, state["step"],
                                                     self.dist.rank))
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.scheduler.load_state_dict(state["scheduler"])
        # The current lr comes from this run's schedule (max_steps may have been extended).
        sched = self.scheduler
        lrs = [base * lam(sched.last_epoch) for base, lam in zip(sched.base_lrs, sched.lr_lambdas,
                                                                  strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        self.scaler.load_state_dict(state["scaler"])
        self._commit()
        logger.info("resumed from %s at step %d", path, self.step)

    def _resolve_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume: a given folder, or for "auto" the newest complete one in
        output_dir (None when there is none yet: the run starts at step 0)."""
        if resume != "auto":
            return Path(resume)
        found = latest_checkpoint(self.out)
        if found is None:
            logger.info("resume='auto': no checkpoint in %s yet, starting at step 0", self.out)
        return found

    def _check_resumable(self, path: Path) -> None:
        """Every file of checkpoint `path` is whole and it was written for this model's shapes;
        errors name the bad file and the last good checkpoint, or the differing settings."""
        try:
            state = checkpoint_state(path)
        except CheckpointError as e:
            others = [g for g in scan_checkpoints(path.parent)[0]
                      if g[1].resolve() != path.resolve()]
            raise CheckpointError(f"{e}; {last_good(others)}") from None
        saved = state.get("config", {}).get("encoder", {})
        ours = json.loads(json.dumps(self.config.encoder.to_dict()))  # lists, as in state.json
        differ = {k: (saved[k], ours[k]) for k in SHAPE_FIELDS if k in saved and saved[k] != ours[k]}
        if differ:
            listed = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"cannot resume {path}: it was written with other model settings "
                             f"({listed}); set them back, or start a new run in another output_dir")

    def _claim_output_dir(self) -> None:
        """Rank 0 locks output_dir and checks it holds no other run (or clears it with
        overwrite=true); the other ranks wait for the verdict."""
        cfg, error = self.config, None
        if cfg.overwrite and cfg.resume:
            raise ValueError(f"overwrite=true starts a new run but resume={cfg.resume!r} continues "
                             "one: set only one of them")
        if self.dist.is_main:
            try:
                self._lock.acquire()
                old = previous_run(self.out)
                if old and cfg.overwrite:
                    logger.warning("overwrite=true: deleting the earlier run's outputs in %s: %s",
                                   self.out, ", ".join(p.name for p in old))
                    clear_previous_run(self.out)
                elif old and not cfg.resume:
                    raise FileExistsError(
                        f"output_dir {self.out} holds an earlier run "
                        f"({', '.join(p.name for p in old[:6])}): continue it with resume=auto, "
                        "replace it with overwrite=true, or choose another output_dir")
            except Exception as e:  # noqa: BLE001 (re-raised below, after the other ranks know)
                error = e
        if self.dist.enabled:  # a collective: every rank learns whether rank 0 failed
            failed = max_over_ranks([int(error is not None)], self.dist.device)[0]
            if failed and error is None:
                raise RuntimeError(f"rank 0 could not claim output_dir {self.out}: see its error")
        if error is not None:
            raise error


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Train an mmlib encoder.",
                                     epilog="losses (--set loss=...):" + LOSSES_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML/JSON TrainConfig file")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override fields, e.g. max_steps=50 encoder.learning_rate=3e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # a bad config or a folder in use: one clear line, no traceback
        config = TrainConfig.load(args.config, args.set)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.exit(2, f"mmlib.train: error: {e}\n")
    try:
        try:
            trainer = Trainer(config)
        except (FileExistsError, RunDirBusy) as e:
            parser.exit(2, f"mmlib.train: error: {e}\n")
        result = trainer.train()
    except KeyboardInterrupt as e:  # 130 after Ctrl-C, 143 after SIGTERM (checkpoint saved)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    finally:
        cleanup()  # leave the torchrun process group, if any
    if not trainer.dist.is_main:
        return
    print(f"trained {result['steps']} steps in {result['train_time_s']:.1f} s; "
          f"model saved to {Path(config.output_dir) / 'final'}")
    if "eval" in result:
        cols = [c for c in result["eval"].columns if c.endswith(("top1", "top5", "mrr"))]
        print(result["eval"][cols].round(4).to_string())


if __name__ == "__main__":
    main()
