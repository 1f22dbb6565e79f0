"""Sharded training checkpoints: every rank writes its own part (torch.distributed.checkpoint).

    python -m mmlib.checkpoint convert runs/x/checkpoint-000100 out/   # one-process safetensors
    python -m mmlib.checkpoint export runs/x/checkpoint-000100 out/    # a from_pretrained folder

A checkpoint folder `checkpoint-NNNNNN/` holds

    dcp/.metadata              DCP's index: each tensor's global shape and where its pieces lie
    dcp/__<r>_0.distcp         rank r's pieces of the trainable weights and AdamW moments
    rng-rank<r>.safetensors    rank r's random state: CPU and the GPU it trains on
    state.json                 step, data position, scheduler, scaler, config, world size (last)

Weights and moments go through `get_state_dict` (canonical names, frozen weights left out) and
`dcp.save`: under FSDP each rank writes the shards it holds, under plain data parallelism the
replicated tensors are split between the ranks, so no rank ever holds more than its own state
(the old format gathered everything on rank 0: ~12 bytes per parameter, ~400 GB at 32B).
`dcp.load` reshards on the way in, so a checkpoint resumes on any world size, with or without
FSDP. The folder is written under a temporary name and renamed whole (mmlib/run_dir.py):
rank 0 creates it, every rank writes into it, rank 0 renames it once all are done.

DCP's `.metadata` is a pickle; it is read here with an unpickler that admits only DCP's own
metadata classes. DCP would unpickle an entry the index declares as bytes; `load` and
`read_full` ask only for entries declared as tensors (others are refused by name first), so a
checkpoint folder cannot run code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from mmlib.distributed import is_distributed
from mmlib.run_dir import CheckpointError, fresh_tmp_dir, fsync_dir, publish_dir

logger = logging.getLogger("mmlib")

STATE_FILE = "state.json"
SHARDED_DIR = "dcp"
MODEL, OPTIM = "model", "optim"  # top-level keys of the sharded state
LEGACY_FILES = ("trainable.safetensors", "optimizer.safetensors")  # the pre-DCP layout


def rng_file(rank: int) -> str:
    """Name of rank `rank`'s RNG file in a checkpoint folder."""
    return f"rng-rank{rank}.safetensors"


# -- reading DCP metadata without running code ------------------------------------------------
_METADATA_CLASSES = ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                     "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "_MEM_FORMAT_ENCODING")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                 ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),
                 ("collections", "OrderedDict"),
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                 *(("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES)}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch dtypes and sizes; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} (not DCP metadata)")


class SafeReader(dcp.FileSystemReader):
    """`FileSystemReader` whose `.metadata` is unpickled with DCP's own classes only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(folder: str | Path) -> Metadata:
    """The DCP index of checkpoint `folder`: `state_dict_metadata[key].size` is the global shape."""
    return SafeReader(Path(folder) / SHARDED_DIR).read_metadata()


# -- checking a checkpoint is whole -----------------------------------------------------------
def verify(path: str | Path) -> dict[str, Any]:
    """The state.json of checkpoint `path` after checking that every file is there and whole
    (each shard file as long as the index says); `CheckpointError` names the bad file."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path / STATE_FILE} is missing: {path} is not a complete checkpoint")
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is corrupt ({e})") from e
    index = path / SHARDED_DIR / ".metadata"
    if not index.is_file():
        legacy = all((path / n).is_file() for n in LEGACY_FILES)
        raise CheckpointError(f"{index} is missing: {path} is not a complete checkpoint" + (
            " (it has the pre-DCP layout, trainable.safetensors + optimizer.safetensors, "
            "which this version does not resume)" if legacy else ""))
    try:
        metadata = read_metadata(path)
    except Exception as e:  # noqa: BLE001 (any unreadable index is a corrupt checkpoint)
        raise CheckpointError(f"{index} is corrupt ({type(e).__name__}: {e})") from e
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, length in sorted(needed.items()):
        file = path / SHARDED_DIR / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint")
        if file.stat().st_size < length:
            raise CheckpointError(f"{file} is corrupt (truncated: {file.stat().st_size} bytes, "
                                  f"the index needs {length})")
    for name in state.get("rng_files", []):
        try:
            with safe_open(str(path / name), framework="pt"):
                pass  # the header is checked against the file's size: catches truncation
        except FileNotFoundError:
            raise CheckpointError(f"{path / name} is missing: {path} is not a complete "
                                  "checkpoint") from None
        except SafetensorError as e:
            raise CheckpointError(f"{path / name} is corrupt ({e})") from e
    return state


# -- random state, one file per rank ----------------------------------------------------------
def accelerators(module: nn.Module) -> list[torch.device]:
    """The GPUs holding `module`'s parameters (this rank's one under torchrun), in order."""
    found = {p.device for p in module.parameters() if p.device.type == "cuda"}
    return sorted(found, key=lambda d: d.index or 0)


def rng_state(devices: Iterable[torch.device] = ()) -> dict[str, Tensor]:
    """This process's CPU generator state and that of each of `devices` (`cuda.<i>`: the i-th
    GPU it trains on), never of GPUs it does not use."""
    out = {"cpu": torch.get_rng_state()}
    for i, device in enumerate(devices):
        out[f"cuda.{i}"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(saved: dict[str, Tensor] | None, devices: Iterable[torch.device],
                fallback_seed: int) -> list[str]:
    """Set the generators from `saved` (as `rng_state` wrote it); those it lacks are seeded
    with `fallback_seed` instead. Returns the names of the seeded ones (empty: all restored)."""
    saved, devices = saved or {}, list(devices)
    missing = [n for n in ["cpu", *(f"cuda.{i}" for i in range(len(devices)))] if n not in saved]
    if missing:
        torch.manual_seed(fallback_seed)  # CPU and every GPU; the saved ones are set below
    if "cpu" in saved:
        torch.set_rng_state(saved["cpu"])
    for i, device in enumerate(devices):
        if f"cuda.{i}" in saved:
            torch.cuda.set_rng_state(saved[f"cuda.{i}"], device)
    return missing


def fallback_seed(seed: int, step: int, rank: int) -> int:
    """A seed for a rank that a checkpoint holds no RNG state for: fixed by (seed, step, rank)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:7], "big")


def write_rng(folder: str | Path, rank: int, state: dict[str, Tensor]) -> None:
    """Write rank `rank`'s `rng_state` into checkpoint folder `folder` (durably)."""
    file = Path(folder) / rng_file(rank)
    save_file(state, str(file))
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def load_rng(path: str | Path, rank: int, devices: Iterable[torch.device], seed: int) -> None:
    """Restore rank `rank`'s generators from checkpoint `path`; what the checkpoint has no
    state for (it was written by fewer ranks, or on fewer GPUs) is seeded with `seed` (logged)."""
    path, devices = Path(path), list(devices)
    file = path / rng_file(rank)
    missing = restore_rng(load_file(str(file)) if file.is_file() else None, devices, seed)
    if missing:
        written = len(list(path.glob("rng-rank*.safetensors")))
        logger.warning("rank %d: %s holds no RNG state for this rank's %s (it has %d rank(s)' "
                       "states): seeded with %d instead, so dropout differs from an unbroken run",
                       rank, path, " and ".join(missing), written, seed)


@contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process save / load, even when asked for one (no_dist)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        yield


# -- the sharded state ------------------------------------------------------------------------
_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # frozen weights are not saved


def _optim_key(name: str, key: str) -> str:
    """DCP's flattened key of one optimizer state entry."""
    return f"{OPTIM}.state.{name}.{key}"


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{model: trainable weights, optim: {state: AdamW moments}} under canonical names, sharded
    as the live tensors are. This run's optimizer hyper-parameters are not part of it."""
    if not optimizer.state:  # before the first step: nothing to save (and get_state_dict
        return {MODEL: get_model_state_dict(model, options=_OPTIONS)}  # would initialise it)
    weights, optim = get_state_dict(model, optimizer, options=_OPTIONS)
    return {MODEL: weights, OPTIM: {"state": optim["state"]}}


def _agree(error: BaseException | None, device: torch.device, collective: bool) -> None:
    """A barrier that also tells every rank whether some rank failed (and raises there)."""
    if collective:
        failed = torch.tensor([int(error is not None)], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            raise RuntimeError("another rank failed while writing the checkpoint: see its error")
    if error is not None:
        raise error


def save(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         state: dict[str, Any], rng: dict[str, Tensor], *, rank: int, device: torch.device,
         collective: bool, pause: Callable[[], None] = lambda: None) -> Path:
    """Write checkpoint `path` whole or not at all; with `collective` every rank of the process
    group calls it and writes its own part, else this process writes everything alone (it
    must hold whole tensors). `pause` runs between the shards and state.json (a test hook)."""
    path = Path(path)
    main = rank == 0 or not collective
    rank = rank if collective else 0
    tmp, error = path.with_name(".tmp-" + path.name), None
    try:
        if main:  # 1. rank 0 makes an empty temporary folder
            try:
                tmp = fresh_tmp_dir(path)
            except Exception as e:  # noqa: BLE001 (raised on every rank by _agree)
                error = e
        _agree(error, device, collective)
        try:  # 2a. every rank: its state (a failure here must not leave the others in dcp.save)
            training = _training_state(model, optimizer)
        except Exception as e:  # noqa: BLE001
            error = e
        _agree(error, device, collective)
        try:  # 2b. every rank: its shards (dcp.save passes a rank's failure to all) and RNG
            with _quiet():
                dcp.save(training, no_dist=not collective,
                         storage_writer=dcp.FileSystemWriter(tmp / SHARDED_DIR))
            write_rng(tmp, rank, rng)
        except Exception as e:  # noqa: BLE001
            error = e
        _agree(error, device, collective)
        if main:  # 3. rank 0: state.json last, then fsync and rename
            try:
                pause()
                world = dist.get_world_size() if collective else 1
                state = {**state, "rng_files": [rng_file(r) for r in range(world)]}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
                # Every rank's files must be here: an output_dir that is not shared between
                # nodes would otherwise publish a checkpoint missing the other nodes' shards.
                verify(tmp)
                publish_dir(tmp, path)
            except Exception as e:  # noqa: BLE001
                error = e
        _agree(error, device, collective)
    except BaseException:
        if main:  # a kill leaves the temporary folder; an error (or Ctrl-C) removes it
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_fits(path: Path, metadata: Metadata, model: nn.Module, hint: str) -> None:
    """Raise ValueError unless the checkpoint holds exactly this model's trainable weights,
    with the same (global) shapes."""
    saved = {k[len(MODEL) + 1:]: md for k, md in metadata.state_dict_metadata.items()
             if k.startswith(MODEL + ".")}
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in saved)
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable parameters {missing[:5]}: was it "
                         "written with another freezing / LoRA setting?")
    wrong = [f"{n} {tuple(md.size) if isinstance(md, TensorStorageMetadata) else 'non-tensor'}"
             f" (this model: {tuple(params[n].shape) if n in params else 'no such parameter'})"
             for n, md in saved.items() if n not in params
             or not isinstance(md, TensorStorageMetadata) or md.size != params[n].shape]
    if wrong:
        raise ValueError(f"checkpoint {path} does not fit this model: {wrong[:3]}; {hint}")


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         hint: str = "") -> None:
    """Load checkpoint `path`'s weights and moments into `model` and `optimizer`, resharded to
    this run's layout (a collective under torchrun). Saved weights of parameters frozen in
    this run load too; this run keeps its own hyper-parameters; a parameter without saved
    moments gets none (as before its first update)."""
    path = Path(path)
    metadata = read_metadata(path)
    _check_fits(path, metadata, model, hint)
    saved = metadata.state_dict_metadata
    has_moments = any(k.startswith(OPTIM + ".") for k in saved)
    if has_moments:
        weights, optim = get_state_dict(model, optimizer)  # initialises moments: zeros, step 1
        moments = {name: entry for name, entry in optim["state"].items()
                   if all(_optim_key(name, k) in saved for k in entry)}
        for name, entry in moments.items():
            for key, value in entry.items():
                md = saved[_optim_key(name, key)]
                if not isinstance(md, TensorStorageMetadata) or md.size != value.shape:
                    raise ValueError(f"checkpoint {path}: optimizer state {name}.{key} does not "
                                     f"fit this model; {hint}")
    else:  # written before the first step
        weights, moments = get_model_state_dict(model), {}
    weights = {k: v for k, v in weights.items() if f"{MODEL}.{k}" in saved}
    with _quiet():
        dcp.load({MODEL: weights, OPTIM: {"state": moments}}, no_dist=not is_distributed(),
                 storage_reader=SafeReader(path / SHARDED_DIR))
    options = StateDictOptions(strict=False)  # weights frozen in both runs are not in it
    if has_moments:
        set_state_dict(model, optimizer, model_state_dict=weights, options=options,
                       optim_state_dict={"state": moments, "param_groups": optim["param_groups"]})
    else:
        set_model_state_dict(model, weights, options=options)
        optimizer.state.clear()


# -- one-process files ------------------------------------------------------------------------
def _encoder_name(key: str) -> str:
    """`encoder.x` → `x` (the encoder's own names); the loss keeps its `loss.` prefix."""
    return key[len("encoder."):] if key.startswith("encoder.") else key


def read_full(path: str | Path, part: str = MODEL) -> dict[str, Tensor]:
    """Whole tensors of checkpoint `path`, read in one process from every rank's pieces:
    `part="model"` gives the trainable weights by the encoder's parameter names (`loss.*` for
    the loss's), `"optim"` the AdamW state as `<name>::exp_avg`, `::exp_avg_sq`, `::step`."""
    path = Path(path)
    prefix = MODEL + "." if part == MODEL else OPTIM + ".state."
    tensors = {k: torch.empty(md.size, dtype=md.properties.dtype)
               for k, md in read_metadata(path).state_dict_metadata.items()
               if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if tensors:  # flat keys: DCP matches them to the saved flattened ones
        with _quiet():
            dcp.load(tensors, storage_reader=SafeReader(path / SHARDED_DIR), no_dist=True)
    names = {k: k[len(prefix):] for k in tensors}
    if part != MODEL:  # encoder.x.exp_avg -> encoder.x::exp_avg
        names = {k: "::".join(n.rsplit(".", 1)) for k, n in names.items()}
    return {_encoder_name(names[k]): t for k, t in tensors.items()}


def convert(path: str | Path, out: str | Path) -> Path:
    """Write checkpoint `path` as one-process files in `out`: trainable.safetensors and
    optimizer.safetensors (as `read_full` names them) and state.json. Needs the memory of
    the weights, then of the moments (one part at a time). Returns `out`."""
    path, out = Path(path), Path(out)
    verify(path)
    out.mkdir(parents=True, exist_ok=True)
    for part, name in ((MODEL, LEGACY_FILES[0]), (OPTIM, LEGACY_FILES[1])):
        tensors = read_full(path, part)
        save_file(tensors, str(out / name))
        del tensors
    shutil.copy(path / STATE_FILE, out / STATE_FILE)
    fsync_dir(out)
    return out


def export(path: str | Path, out: str | Path, device: str = "cpu") -> Path:
    """Write checkpoint `path` as a `MultimodalEncoder.from_pretrained` folder: the encoder of
    its config (frozen weights from `model_path`) with the checkpoint's trainable weights."""
    from mmlib.config import EncoderConfig
    from mmlib.encoder import MultimodalEncoder

    path = Path(path)
    config = verify(path)["config"]["encoder"]
    encoder = MultimodalEncoder(EncoderConfig(**{**config, "device": device, "device_map": None}))
    weights = {k: t for k, t in read_full(path).items() if not k.startswith("loss.")}
    params = dict(encoder.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        raise ValueError(f"checkpoint {path} does not hold this encoder's trainable weights: "
                         f"missing {sorted(trainable - set(weights))[:3]}, "
                         f"unknown {sorted(set(weights) - trainable)[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    encoder.save_pretrained(out)
    return Path(out)


def pause_for_tests(step: int) -> None:
    """Test hook (MMLIB_TEST_PAUSE_CHECKPOINT="<step>:<marker>"): half-way through writing
    checkpoint <step>, create <marker> and wait until it is removed, so that a test can kill
    or signal the run inside the write."""
    at, _, marker = os.environ.get("MMLIB_TEST_PAUSE_CHECKPOINT", "").partition(":")
    if not marker or int(at) != step:
        return
    Path(marker).touch()
    deadline = time.monotonic() + 300
    while Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> None:
    """CLI: `convert CKPT OUT` (one-process safetensors) or `export CKPT OUT` (an encoder)."""
    parser = argparse.ArgumentParser(prog="python -m mmlib.checkpoint",
                                     description="Turn a sharded training checkpoint into files "
                                                 "that load in one process.")
    parser.add_argument("command", choices=("convert", "export"),
                        help="convert: trainable.safetensors + optimizer.safetensors + "
                             "state.json; export: a MultimodalEncoder.from_pretrained folder")
    parser.add_argument("checkpoint", help="a checkpoint-NNNNNN folder")
    parser.add_argument("out", help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = (convert if args.command == "convert" else export)(args.checkpoint, args.out)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"mmlib.checkpoint: error: {e}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
