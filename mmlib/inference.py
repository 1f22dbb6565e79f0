"""Inference: how `encode` batches inputs, and encoding corpora larger than memory to disk.

    emb = enc.encode_texts(texts, dim=512)       # in memory: encode_batched below
    out = encode_to_disk(enc, texts=corpus, out_dir="emb/corpus", dim=512)
    emb = load_embeddings(out)                   # (N, 512) float32 numpy array

`encode` (the model's inference entry point) runs `encode_batched`: the inputs are tokenized
once (`_InputPlan`), sorted by token count, cut into token-budget batches (`_batches`),
padded (`_pad`), optionally prepared one batch ahead in a thread (`_prefetched`), run through
the model and put back in input order.

`encode_to_disk` cuts the inputs into chunks of `chunk_size` (each chunk is length-sorted and
batched by `encode`, then written in input order), so only one chunk of embeddings is ever in
memory. Each chunk goes to `embeddings-00000.safetensors` (or `.npy`), written to a temporary name
and renamed, so a file with the final name is always complete. `index.json` records the
count, dim, dtype, chunk files, a fingerprint of the inputs, the model config and a sha256
of the weights. Run the same call again after an interruption: chunks already on disk (with
the right row count and dim) are skipped. A different corpus, config or model (any weight
changed) in the same folder is refused rather than mixed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from mmlib.processing import ImageLike, build_inputs, check_text, count_inputs, format_prompt
from mmlib.validation import is_int

INDEX_FILE = "index.json"
TENSOR_NAME = "embeddings"
FORMATS = {"safetensors": ".safetensors", "npy": ".npy"}
DTYPES = {"float32": np.float32, "float16": np.float16}
# Config fields that change the embeddings (checked on resume, with the weights' sha256).
_MODEL_KEYS = ("model_path", "embed_dim", "max_length", "use_lora", "lora_r")


def encode_to_disk(
    encoder: Any,
    texts: Sequence[str | None] | None = None,
    images: Sequence[ImageLike | None] | None = None,
    *,
    out_dir: str | os.PathLike,
    dim: int | None = None,
    chunk_size: int = 10_000,
    format: str = "safetensors",
    dtype: str = "float32",
    batch_size: int | None = None,
    max_tokens: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Embed texts and/or images (paired by index, as in `encode`) chunk by chunk into
    `out_dir`; resumable. Returns `out_dir` (read it with `load_embeddings`).

    Each call hashes the encoder's weights once (`weights_fingerprint`) so that a resume with
    another model is refused. sha256 runs on one CPU core: 0.7-0.8 GB/s measured on the tiny
    model (loaded 2-core box; plain sha256 there: 1-1.8 GB/s), so ~5-10 s for a 3B model in
    bf16 (7.5 GB), plus copying the weights to the CPU; small next to encoding a corpus.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not is_int(chunk_size) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    n = count_inputs(texts, images, "encode_to_disk")
    if dim is not None and (not is_int(dim) or not 0 < dim <= encoder.embed_dim):
        raise ValueError(f"dim must be an int in [1, {encoder.embed_dim}] or None, got {dim!r}")
    width = encoder.embed_dim if dim is None else dim
    weights = weights_fingerprint(encoder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = FORMATS[format]
    chunks = [{"file": f"embeddings-{k:05d}{ext}", "start": start,
               "count": min(chunk_size, n - start)}
              for k, start in enumerate(range(0, n, chunk_size))]
    index = {
        "count": n,
        "dim": width,
        "dtype": dtype,
        "format": format,
        "chunk_size": chunk_size,
        "fingerprint": _fingerprint(texts, images),
        "chunks": chunks,
        "complete": False,
        "model_config": encoder.config.to_dict(),
        "weights_sha256": weights,
    }
    index["model_identity"] = {k: index["model_config"][k] for k in _MODEL_KEYS}
    _check_resumable(out / INDEX_FILE, index)
    _write_json(out / INDEX_FILE, index)

    bar = tqdm(total=n, disable=not show_progress, desc="encode_to_disk", unit="input")
    with bar:
        for chunk in chunks:
            path = out / chunk["file"]
            start, count = chunk["start"], chunk["count"]
            if _rows_on_disk(path, width) == count:
                bar.update(count)
                continue
            part = slice(start, start + count)
            emb = encoder.encode(texts=texts[part] if texts is not None else None,
                                 images=images[part] if images is not None else None,
                                 dim=dim, batch_size=batch_size, max_tokens=max_tokens,
                                 show_progress=False, callback=bar.update)
            _write_chunk(path, emb.numpy().astype(DTYPES[dtype], copy=False))
    index["complete"] = True
    _write_json(out / INDEX_FILE, index)
    return out


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the name, dtype, shape and bytes of every parameter and buffer of `module`
    (for an encoder: backbone, adapter, projection); any change to any weight changes it."""
    h = hashlib.sha256()
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            t = tensor.detach()
            h.update(f"{kind}\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            # Raw bytes (a uint8 view works for every dtype, bf16 included; numpy has no bf16).
            h.update(t.reshape(-1).view(torch.uint8).cpu().numpy().data)
    return h.hexdigest()


def load_embeddings(out_dir: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """(N, d) embeddings written by `encode_to_disk`, in input order.

    The result is one array in memory, filled chunk by chunk (with `mmap=True`, `.npy` chunks
    are memory-mapped, so no chunk is held twice); a single `.npy` chunk is returned as the
    memory map itself. Use `iter_embeddings` to stream a corpus that does not fit in memory.
    """
    index = read_index(out_dir)
    parts = [array for _, array in iter_embeddings(out_dir, mmap=mmap)]
    if len(parts) == 1:
        return parts[0]
    out = np.empty((index["count"], index["dim"]), dtype=DTYPES[index["dtype"]])
    start = 0
    for array in parts:
        out[start:start + len(array)] = array
        start += len(array)
    return out


def iter_embeddings(out_dir: str | os.PathLike, mmap: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, chunk array) for each chunk of an `encode_to_disk` folder, in order."""
    out = Path(out_dir)
    index = read_index(out)
    for chunk in index["chunks"]:
        path = out / chunk["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run encode_to_disk again with the same "
                                    "inputs to write it")
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r" if mmap else None)
        else:
            with safe_open(str(path), framework="np") as f:
                array = f.get_tensor(TENSOR_NAME)
        if array.shape != (chunk["count"], index["dim"]):
            raise ValueError(f"{path} holds {array.shape}, expected ({chunk['count']}, "
                             f"{index['dim']}): delete it and run encode_to_disk again")
        yield chunk["start"], array


def read_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The `index.json` of a finished `encode_to_disk` folder."""
    path = Path(out_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out_dir} an encode_to_disk folder?")
    index = json.loads(path.read_text())
    if not index.get("complete"):
        raise ValueError(f"{out_dir} is incomplete (interrupted?): run encode_to_disk again with "
                         "the same inputs to finish it")
    return index


# -- the in-memory batching planner behind `MultimodalEncoder.encode` -----------------------
def encode_batched(
    encoder: Any,
    texts: Sequence[str | None] | None,
    images: Sequence[ImageLike | None] | None,
    *,
    dim: int | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    show_progress: bool | None = None,
    prefetch: bool | None = None,
    callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The body of `MultimodalEncoder.encode` (inputs already checked): plan, sort by token
    count, batch by token budget, run the model, restore the input order."""
    plan = _InputPlan(encoder, texts, images)
    order = sorted(range(len(plan)), key=plan.costs.__getitem__)
    if max_tokens is None:
        # The budget of `batch_size` rows of the longest input: no batch holds more padded
        # tokens (so no more memory) than a fixed-size batch that contains the longest
        # input, while short inputs share proportionally larger batches.
        max_tokens = (batch_size or encoder.config.batch_size) * max(1, max(plan.costs))
        batch_size = None
    batches = list(_batches(order, batch_size, plan.costs, max_tokens))
    show = show_progress if show_progress is not None else len(batches) > 8
    if prefetch is None:
        prefetch = encoder.input_device.type == "cuda"
    was_training = encoder.training
    encoder.eval()
    chunks = []
    try:
        bar = tqdm(total=len(plan), disable=not show, desc="encode", unit="input")
        with bar, _prefetched(map(plan.batch, batches), enabled=prefetch) as prepared:
            for batch in prepared:
                # encoder(...), not encoder.forward: module hooks (FSDP's all-gather) must run.
                chunks.append(encoder(**batch, dim=dim).float().cpu())
                rows = chunks[-1].shape[0]
                bar.update(rows)
                if callback is not None:
                    callback(rows)
    finally:
        encoder.train(was_training)
    out = torch.cat(chunks)
    restored = torch.empty_like(out)
    restored[torch.as_tensor(order)] = out
    return restored


def _image_cost(image: ImageLike | None, processor: Any = None) -> int:
    """Image tokens of an input, from the image header only: exact with the processor (its
    resize limits), else approximate (one per 28x28 block)."""
    if image is None:
        return 0
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            with Image.open(image) as img:
                width, height = img.size
    except Exception:
        return 0  # unreadable files fail later with a clear error from load_image
    ip = getattr(processor, "image_processor", None)
    if ip is not None and hasattr(ip, "get_number_of_image_patches"):
        try:
            return ip.get_number_of_image_patches(height, width, {}) // ip.merge_size ** 2
        except Exception:
            pass  # e.g. an extreme aspect ratio: the processor raises its own error later
    return max(1, width * height // (28 * 28))


def _batches(order: list[int], batch_size: int | None, costs: Sequence[int] | None = None,
             max_tokens: int | None = None) -> Iterator[list[int]]:
    """Consecutive slices of `order`: at most `batch_size` rows and, with `max_tokens`, at most
    `max_tokens` padded tokens (rows x largest cost); an input over budget gets its own batch."""
    if max_tokens is None:
        if batch_size is None:
            raise ValueError("_batches needs batch_size or max_tokens")
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]
        return
    batch: list[int] = []
    longest = 0
    for i in order:
        cost = max(1, costs[i])
        full = batch_size is not None and len(batch) >= batch_size
        if batch and (full or (len(batch) + 1) * max(longest, cost) > max_tokens):
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, cost)
    if batch:
        yield batch


class _InputPlan:
    """The inputs of one `encode` call, tokenized once.

    Text-only: the whole prompts are tokenized once, in one batched call, so a batch is only
    padding of cached ids (identical to the processor's output); texts that may be longer
    than `max_length` (all but short ASCII ones with a byte-level tokenizer) are first
    tokenized alone and truncated exactly as `build_inputs` does. With images, each batch
    goes through the processor (pixels must be processed anyway) with the already truncated
    texts. `costs[i]` is the token count of input i (exact for text-only inputs and images).
    """

    def __init__(self, encoder: Any, texts, images):
        self.processor = encoder.processor
        tok = self.processor.tokenizer
        self.images = images
        self.n = len(texts if texts is not None else images)
        self.texts = None
        self.prompt_ids: list[list[int]] | None = None
        costs = [0] * self.n
        if texts is not None:
            for i, text in enumerate(texts):
                check_text(text, i)
            self.texts = list(texts)
            max_length = encoder.config.max_length
            # Text-only: lengths come from the prompt ids below, and only texts that may be
            # over max_length are tokenized on their own. With images: all, for the lengths.
            if images is None:
                bounded = _ascii_length_bounds_tokens(tok)
                check = [i for i, t in enumerate(self.texts) if max_length is not None and not (
                    bounded and t.isascii() and len(t) + 1 <= max_length)]
            else:
                check = list(range(self.n))
            ids = tok([self.texts[i] or "" for i in check], add_special_tokens=False)["input_ids"] \
                if check else []
            for i, x in zip(check, ids, strict=True):
                if max_length is not None and len(x) > max_length:
                    self.texts[i] = tok.decode(x[:max_length])  # as build_inputs truncates
                costs[i] = len(x) if max_length is None else min(len(x), max_length)
        if images is None:
            # Exactly what the processor does for text-only inputs (it calls the tokenizer).
            prompts = [format_prompt(t, False) for t in self.texts]
            self.prompt_ids = tok(prompts)["input_ids"]
            costs = [len(x) for x in self.prompt_ids]
        else:
            overhead = len(tok(format_prompt("", True))["input_ids"]) - 1
            costs = [c + overhead + _image_cost(img, self.processor)
                     for c, img in zip(costs, images, strict=True)]
        self.costs = costs

    def __len__(self) -> int:
        return self.n

    def batch(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        """Model inputs for inputs `idx`, in that order."""
        if self.prompt_ids is not None:
            return _pad([self.prompt_ids[i] for i in idx], self.processor.tokenizer)
        return build_inputs(self.processor,
                            [self.texts[i] for i in idx] if self.texts is not None else None,
                            [self.images[i] for i in idx], max_length=None)


def _ascii_length_bounds_tokens(tokenizer: Any) -> bool:
    """True when an ASCII text of L characters has at most L + 1 tokens: byte-level BPE (every
    token covers at least one byte; +1 for a prefix space) and a normaliser that leaves ASCII
    unchanged. Lets `encode` skip tokenizing short texts a second time for truncation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    norm = backend.normalizer
    return "ByteLevel(" in repr(backend.pre_tokenizer) and (
        norm is None or repr(norm) in ("NFC()", "NFKC()", "NFD()", "NFKD()"))


def _pad(ids: Sequence[Sequence[int]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Pad token id lists like the tokenizer does (its padding side and pad id)."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    left = tokenizer.padding_side == "left"
    for row, x in enumerate(ids):
        span = slice(longest - len(x), longest) if left else slice(0, len(x))
        input_ids[row, span] = torch.as_tensor(x, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask,
            "mm_token_type_ids": torch.zeros_like(input_ids)}


@contextlib.contextmanager
def _prefetched(items: Iterator[Any], enabled: bool) -> Iterator[Iterator[Any]]:
    """`items`, with the next one computed in a background thread while the caller works on
    the current one (overlaps tokenization and image decoding with the model on a GPU)."""
    if not enabled:
        yield items
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmlib-prefetch")

    def run() -> Iterator[Any]:
        it = iter(items)
        pending = pool.submit(next, it, _DONE)
        while True:
            item = pending.result()
            if item is _DONE:
                return
            pending = pool.submit(next, it, _DONE)
            yield item

    try:
        yield run()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_DONE = object()


# -- helpers -----------------------------------------------------------------------------------
def _check_resumable(path: Path, index: dict[str, Any]) -> None:
    """An existing index must describe the same job, or resuming would mix two corpora."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old.get("weights_sha256") != index["weights_sha256"]:
        theirs = (old.get("weights_sha256") or "none recorded")[:12]
        raise ValueError(
            f"{path.parent} holds embeddings of a model with different weights (weights sha256 "
            f"{theirs}, this encoder's {index['weights_sha256'][:12]}): resuming would mix two "
            f"models' embeddings. Use another out_dir, or delete {path.parent} to start over")
    keys = ("count", "dim", "dtype", "format", "chunk_size", "fingerprint", "model_identity")
    changed = [k for k in keys if old.get(k) != index[k]]
    if changed:
        raise ValueError(f"{path.parent} already holds embeddings of a different job (differs in "
                         f"{changed}); use a new out_dir or delete the old one")


def _fingerprint(texts: Sequence | None, images: Sequence | None) -> str:
    """sha256 of the inputs (texts, image paths, or the pixels of in-memory images)."""
    h = hashlib.sha256()
    for name, items in (("texts", texts), ("images", images)):
        if items is None:
            continue
        h.update(name.encode())
        for item in items:
            if item is None:
                h.update(b"\x00none")
            elif isinstance(item, str):
                h.update(b"\x00s" + item.encode("utf-8", "surrogatepass"))
            elif isinstance(item, os.PathLike):
                h.update(b"\x00p" + os.fspath(item).encode("utf-8", "surrogatepass"))
            elif hasattr(item, "tobytes"):  # a PIL image
                h.update(f"\x00i{item.mode}{item.size}".encode() + item.tobytes())
            else:
                h.update(b"\x00r" + repr(item).encode())
    return h.hexdigest()


def _rows_on_disk(path: Path, width: int) -> int | None:
    """Row count of a complete chunk file of the right width, else None (read headers only)."""
    if not path.is_file():
        return None
    try:
        if path.suffix == ".npy":
            shape = np.load(path, mmap_mode="r").shape
        else:
            with safe_open(str(path), framework="np") as f:
                shape = tuple(f.get_slice(TENSOR_NAME).get_shape())
    except Exception:
        return None  # unreadable: written again
    return shape[0] if len(shape) == 2 and shape[1] == width else None


def _write_chunk(path: Path, array: np.ndarray) -> None:
    """Write to a temporary name, then rename: a file with the final name is complete."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix == ".npy":
        np.save(tmp, array)
    else:
        save_file({TENSOR_NAME: np.ascontiguousarray(array)}, str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)

