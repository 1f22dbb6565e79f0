"""Image–caption data: a manifest-backed dataset, a collate function and batch samplers.

A manifest is JSONL (one object per line) or CSV with at least the columns ``image`` (a path
relative to the manifest's folder, or absolute) and ``text``; optional ``split`` and
``hard_negatives`` (a list of captions: a JSON list, or ``|``-separated in CSV) and ``image_id``.

Several rows may share one image (Flickr30k and COCO have five captions per image). An image's
identity is its ``image_id`` when the manifest gives one, else its resolved path
(`ImageTextDataset.image_ids`): evaluation embeds each image once, and batches never hold one
image twice.

Real caption sets read into the same object (no download; see `mmlib.readers`):
`ImageTextDataset.from_coco(json, image_root)`, `.from_flickr30k(token_csv_or_karpathy_json,
image_root, split=None)`, `.from_hf(datasets_obj, image_column="image", caption_columns=("text",))`.
Training batches come from `NoDuplicatesBatchSampler` (shuffled, no image or caption twice in
a batch); `LengthBucketSampler` is an opt-in that shapes the negatives.

    ds = ImageTextDataset("data_samples/synthetic/manifest.jsonl", split="train")
    sampler = NoDuplicatesBatchSampler(ds.image_ids, ds.texts, batch_size=16, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ImageTextCollator(processor))
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from mmlib.processing import ImageLoadError, apply_prompt, build_inputs, load_image
from mmlib.synthetic import resolve_manifest

logger = logging.getLogger("mmlib")

DIRECTIONS = ("text2image", "image2text")
REQUIRED_COLUMNS = ("image", "text")


@dataclass
class ManifestRow:
    """One manifest record; `row` is its 1-based record number, `line` its line in the file."""

    row: int
    line: int
    image: str
    text: str
    split: str | None = None
    hard_negatives: list[str] = field(default_factory=list)
    image_id: str | None = None  # explicit identity; None = the resolved image path

    def where(self, manifest: str | Path) -> str:
        """'row 17 of data/x.jsonl' (with the file line too when it differs)."""
        line = f" (line {self.line})" if self.line != self.row else ""
        return f"row {self.row}{line} of {manifest}"


# ------------------------------------------------------------------------------- manifests
def _parse_hard_negatives(value: Any, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: hard_negatives is not a valid JSON list: {e}") from e
        else:
            return [part.strip() for part in s.split("|") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: hard_negatives must be a list of strings, got {value!r}")
    return list(value)


def _make_row(data: dict, row: int, line: int, manifest: Path) -> ManifestRow:
    where = f"row {row} of {manifest}"
    missing = [c for c in REQUIRED_COLUMNS if c not in data]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {sorted(data)}. "
                         f"A manifest needs the columns {list(REQUIRED_COLUMNS)}")
    image, text = data["image"], data["text"]
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{where}: 'image' must be a non-empty path, got {image!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'text' must be a non-empty string, got {text!r}")
    split = data.get("split")
    split = None if split in (None, "") else str(split)
    hard = _parse_hard_negatives(data.get("hard_negatives"), where)
    image_id = data.get("image_id")
    image_id = None if image_id in (None, "") else str(image_id)
    return ManifestRow(row, line, image.strip(), text, split, hard, image_id)


def read_manifest(manifest: str | Path) -> list[ManifestRow]:
    """Parse a JSONL or CSV manifest into rows (validated; errors name the row)."""
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: '{path}'")
    suffix = path.suffix.lower()
    rows: list[ManifestRow] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        with _utf8_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {line_no} of {path}: invalid JSON: {e}") from e
                if not isinstance(data, dict):
                    raise ValueError(f"line {line_no} of {path}: expected a JSON object, "
                                     f"got {type(data).__name__}")
                rows.append(_make_row(data, len(rows) + 1, line_no, path))
    elif suffix == ".csv":
        with _utf8_text(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise ValueError(f"manifest {path} is empty (no header row)")
            missing = [c for c in REQUIRED_COLUMNS if c not in reader.fieldnames]
            if missing:
                raise ValueError(f"manifest {path} lacks column(s) {missing}; header is "
                                 f"{reader.fieldnames}. Required: {list(REQUIRED_COLUMNS)}")
            for data in reader:
                rows.append(_make_row(data, len(rows) + 1, reader.line_num, path))
    else:
        raise ValueError(f"unsupported manifest format '{path.suffix}' for {path}: "
                         "use .jsonl (one JSON object per line) or .csv")
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    return rows


def _utf8_text(path: Path, newline: str | None = None) -> io.StringIO:
    """The file as text: UTF-8, a leading BOM dropped; errors name the line (decoded whole, as
    a text stream decodes in blocks and cannot say which line a bad byte is on)."""
    raw = path.read_bytes()
    try:
        return io.StringIO(raw.decode("utf-8-sig"), newline=newline)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"manifest {path}, line {line}: byte {raw[e.start:e.start + 1]!r} is not "
                         f"UTF-8 ({e.reason}); re-encode the file as UTF-8, e.g. "
                         f"`iconv -f latin1 -t utf-8` for Latin-1") from e


def select_split(rows: list[ManifestRow], split: str | None, source: str | Path) -> list[ManifestRow]:
    """The rows of `split` (all rows for None); errors name the source and the splits it has."""
    if split is None:
        return rows
    if any(r.split is None for r in rows):
        first = next(r for r in rows if r.split is None)
        raise ValueError(f"split={split!r} requested but {first.where(source)} has no 'split' "
                         "value; pass split=None to use every row")
    available = sorted({r.split for r in rows})
    rows = [r for r in rows if r.split == split]
    if not rows:
        raise ValueError(f"unknown split {split!r} in {source}; available: {available}")
    return rows


# --------------------------------------------------------------------------------- dataset
class ImageTextDataset(Dataset):
    """Image–caption pairs from a manifest; items are dicts with a PIL RGB image and its text.

    `direction` says which side is the query: "text2image" (caption finds image) or
    "image2text". With `with_hard_negatives`, items carry the row's hard-negative captions,
    and for text2image also the images of those captions that are rows of this dataset
    ("hard_negative_images"), so that hard negatives are in the target modality either way.
    `skip_bad=True` checks every image up front and drops unreadable rows, listing them in
    `skipped` and logging a warning; otherwise a bad image raises `ImageLoadError` naming the
    file and the manifest row when the item is read.
    """

    def __init__(
        self,
        manifest: str | Path,
        split: str | None = None,
        root: str | Path | None = None,
        direction: str = "text2image",
        skip_bad: bool = False,
        with_hard_negatives: bool = False,
    ):
        manifest = resolve_manifest(manifest)  # a path, or "synthetic:N" (generated once)
        self._setup(read_manifest(manifest), manifest, root if root is not None else manifest.parent,
                    split, direction, skip_bad, with_hard_negatives)

    @classmethod
    def from_rows(
        cls,
        rows: list[ManifestRow],
        source: str | Path,
        root: str | Path | None = None,
        split: str | None = None,
        direction: str = "text2image",
        skip_bad: bool = False,
        with_hard_negatives: bool = False,
        loader: Callable[[ManifestRow], Image.Image] | None = None,
    ) -> ImageTextDataset:
        """A dataset of parsed rows (what the readers build). `source` names them in errors;
        `loader(row)`, when given, returns a row's image instead of opening `root / row.image`."""
        self = cls.__new__(cls)
        self._setup(rows, source, root, split, direction, skip_bad, with_hard_negatives, loader)
        return self

    @classmethod
    def from_coco(cls, annotations: str | Path, image_root: str | Path,
                  split: str | None = None, **kwargs: Any) -> ImageTextDataset:
        """COCO captions JSON (`images` [{id, file_name}], `annotations` [{image_id, caption}]):
        one row per caption, image identity the COCO image id. See `mmlib.readers.read_coco`."""
        from mmlib.readers import read_coco

        return cls.from_rows(read_coco(annotations, split), Path(annotations), image_root,
                             split, **kwargs)

    @classmethod
    def from_flickr30k(cls, captions: str | Path, image_root: str | Path,
                       split: str | None = None, **kwargs: Any) -> ImageTextDataset:
        """Flickr30k (or 8k) captions: `results_20130124.token`, the Kaggle `results.csv`, or
        the Karpathy split `dataset_flickr30k.json` (the only one with splits); image identity
        the file name. See `mmlib.readers.read_flickr30k`."""
        from mmlib.readers import read_flickr30k

        return cls.from_rows(read_flickr30k(captions, split), Path(captions), image_root,
                             split, **kwargs)

    @classmethod
    def from_hf(cls, dataset: Any, image_column: str = "image",
                caption_columns: Sequence[str] = ("text",), split: str | None = None,
                image_id_column: str | None = None, **kwargs: Any) -> ImageTextDataset:
        """A Hugging Face `datasets.Dataset` (or a `DatasetDict` and its `split`) with an image
        column and caption columns (strings or lists of strings): one row per caption. Image
        identity: `image_id_column`, else the image's file path, else the record's index.
        See `mmlib.readers.read_hf`."""
        from mmlib.readers import read_hf

        rows, source, loader, split = read_hf(dataset, image_column, caption_columns, split,
                                              image_id_column)
        return cls.from_rows(rows, source, None, split, loader=loader, **kwargs)

    def _setup(self, rows: list[ManifestRow], source: str | Path, root: str | Path | None,
               split: str | None, direction: str, skip_bad: bool, with_hard_negatives: bool,
               loader: Callable[[ManifestRow], Image.Image] | None = None) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.manifest = source
        self.root = Path(root) if root is not None else None
        self.split = split
        self.direction = direction
        self.with_hard_negatives = with_hard_negatives
        self._loader = loader
        rows = select_split(rows, split, source)
        self.skipped: list[dict] = []
        if skip_bad:
            rows = self._drop_unreadable(rows)
        self.rows = rows
        self._row_of_text = {}
        for k, r in enumerate(rows):
            self._row_of_text.setdefault(r.text, k)

    def _drop_unreadable(self, rows: list[ManifestRow]) -> list[ManifestRow]:
        good = []
        for r in rows:
            try:
                self._read_image(r)
            except ImageLoadError as e:
                self.skipped.append({"row": r.row, "image": r.image, "error": str(e)})
            else:
                good.append(r)
        if self.skipped:
            shown = "; ".join(f"row {s['row']}: '{s['image']}'" for s in self.skipped[:5])
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            logger.warning("skipped %d of %d rows of %s with unreadable images: %s%s",
                           len(self.skipped), len(rows), self.manifest, shown, more)
        if not good:
            raise ValueError(f"every row of {self.manifest} (split={self.split!r}) has an "
                             f"unreadable image; first: {self.skipped[0]['error']}")
        return good

    def image_path(self, row: ManifestRow) -> Path:
        """Absolute or root-relative path of a row's image."""
        if self._loader is not None:
            raise ValueError(f"{self.manifest} has no image files (its images come from a "
                             "loader, e.g. a Hugging Face dataset): use dataset.image_for(i) or "
                             "dataset[i]['image']")
        p = Path(row.image)
        return p if p.is_absolute() or self.root is None else self.root / p

    def _read_image(self, row: ManifestRow) -> Image.Image:
        return self._loader(row) if self._loader is not None else load_image(self.image_path(row))

    def load_row_image(self, row: ManifestRow) -> Image.Image:
        """RGB image of a row; errors name the file and the manifest row."""
        try:
            return self._read_image(row)
        except ImageLoadError as e:
            raise ImageLoadError(
                f"{row.where(self.manifest)}: cannot read image '{row.image}': {e}") from e

    @property
    def texts(self) -> list[str]:
        """Captions in dataset order (no image is read)."""
        return [r.text for r in self.rows]

    @property
    def image_paths(self) -> list[Path]:
        """Image paths in dataset order (a dataset without files raises: use `image_for`)."""
        return [self.image_path(r) for r in self.rows]

    def image_for(self, index: int) -> Any:
        """What to hand `encode_images` for row `index`: a path, or for a dataset without
        files (e.g. Hugging Face images stored as bytes) its PIL image. Nothing is decoded
        for files until the encoder reads them."""
        row = self.rows[index]
        return self.load_row_image(row) if self._loader is not None else self.image_path(row)

    def image_id(self, row: ManifestRow) -> str:
        """A row's image identity: its explicit `image_id`, else its resolved path."""
        return row.image_id if row.image_id is not None else str(self.image_path(row).resolve())

    @property
    def image_ids(self) -> list[str]:
        """Image identity of each row, in dataset order (rows sharing an image share it)."""
        return [self.image_id(r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        index = index % len(self)
        row = self.rows[index]
        item = {
            "image": self.load_row_image(row),
            "text": row.text,
            "hard_negatives": list(row.hard_negatives) if self.with_hard_negatives else [],
            "index": index,
            "image_id": self.image_id(row),
            "row": row.row,
            "direction": self.direction,
        }
        if self.with_hard_negatives and self.direction == "text2image":
            found = [self._row_of_text[t] for t in row.hard_negatives if t in self._row_of_text]
            item["hard_negative_images"] = [self.load_row_image(self.rows[k]) for k in found]
            item["hard_negative_image_ids"] = [self.image_id(self.rows[k]) for k in found]
        return item

    def __repr__(self) -> str:
        return (f"ImageTextDataset({str(self.manifest)!r}, split={self.split!r}, rows={len(self)}, "
                f"direction={self.direction!r}, skipped={len(self.skipped)})")


# -------------------------------------------------------------------------------- collator
def stable_id(kind: str, value: str) -> int:
    """A 64-bit identity of an item that is the same in every process and run (not `hash`)."""
    digest = hashlib.blake2b(f"{kind}\0{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _image_ids(values: Sequence[Any], what: str) -> list[int]:
    if any(v is None for v in values):
        raise ValueError(f"{what} are missing: items need them (ImageTextDataset items carry "
                         "them) so that the loss can tell an image from a copy of itself")
    return [stable_id("image", str(v)) for v in values]


class ImageTextCollator:
    """collate_fn: dataset items -> {"query", "target", "hard_negatives", "indices"} batches.

    text2image: query = captions, target = images, hard negatives = images of hard-negative
    captions; image2text: query = images, target = captions, hard negatives = captions.
    Hard negatives of all items are flattened into one batch (extra negatives, i.e. target
    rows B..N-1 of the loss); "hard_negative_owner" gives the item each came from.
    "target_ids" (B,) and "hard_negative_ids" (M,) are int64 identities (`stable_id` of the
    image id, or of the caption): the loss never counts a hard negative that is some row's
    positive, nor a row sharing a query's positive, as a negative.
    """

    def __init__(self, processor: Any, max_length: int | None = None, direction: str | None = None,
                 prompts: dict[str, str] | None = None):
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS} or None, got {direction!r}")
        self.processor = processor
        self.max_length = max_length
        self.direction = direction
        # EncoderConfig.prompts: the query side gets "query", targets and hard negatives
        # "document" (as encode_queries / encode_documents embed them).
        self.prompts = dict(prompts or {})

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        if len(items) == 0:
            raise ValueError("cannot collate an empty batch")
        direction = self.direction or items[0].get("direction", "text2image")
        query, document = self.prompts.get("query", ""), self.prompts.get("document", "")
        text_prompt, image_prompt = (query, document) if direction == "text2image" else (document, query)
        texts = self._inputs([it["text"] for it in items], None, text_prompt)
        images = self._inputs(None, [it["image"] for it in items], image_prompt)
        query, target = (texts, images) if direction == "text2image" else (images, texts)
        key = "hard_negative_images" if direction == "text2image" else "hard_negatives"
        owners, negatives, neg_ids = [], [], []
        for k, it in enumerate(items):
            found = it.get(key, [])
            if direction == "text2image":
                ids = it.get("hard_negative_image_ids", [None] * len(found))
                if len(ids) != len(found):
                    raise ValueError(f"item {k}: {len(found)} hard_negative_images but "
                                     f"{len(ids)} hard_negative_image_ids; give one id per image")
                ids = _image_ids(ids, f"item {k}: hard_negative_image_ids") if found else []
            else:
                ids = [stable_id("text", t) for t in found]
            owners += [k] * len(found)
            negatives += found
            neg_ids += ids
        if direction == "text2image":
            target_ids = _image_ids([it.get("image_id") for it in items], "items' 'image_id'")
        else:
            target_ids = [stable_id("text", it["text"]) for it in items]
        hard = None
        if negatives:
            if direction == "text2image":
                hard = self._inputs(None, negatives, image_prompt)
            else:
                hard = self._inputs(negatives, None, text_prompt)
        return {
            "query": query,
            "target": target,
            "hard_negatives": hard,
            "hard_negative_owner": torch.tensor(owners, dtype=torch.long),
            "target_ids": torch.tensor(target_ids, dtype=torch.long),
            "hard_negative_ids": torch.tensor(neg_ids, dtype=torch.long),
            "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }

    def _inputs(self, texts: list | None, images: list | None, prompt: str) -> dict[str, Any]:
        return build_inputs(self.processor, apply_prompt(texts, images, prompt), images,
                            max_length=self.max_length)


# -------------------------------------------------------------------------------- samplers
BATCH_SAMPLERS = ("no_duplicates", "length_grouped")


def caption_key(text: str) -> str:
    """What makes two captions "the same" for batching: case, spacing and a final period ignored."""
    return " ".join(text.lower().split()).rstrip(" .")


class NoDuplicatesBatchSampler(Sampler[list[int]]):
    """Uniformly shuffled batches in which no image and no caption appears twice.

    For in-batch-negative losses the batch *is* the set of negatives: a second caption of the
    same image (or the same caption of another image) would be a false negative. Like
    sentence-transformers' `NoDuplicatesBatchSampler`: shuffle the rows, then fill each batch
    in that order, deferring a row whose image id or caption (`caption_key`) is already in the
    batch to a later batch. Unlike it, nothing is resampled: every row appears at most once
    per epoch (`drop_last=False`: exactly once, conflicting leftovers in short batches;
    `drop_last=True`: only full batches, the leftovers are dropped), and `len()` is the exact
    number of batches of the current epoch. Deterministic given `seed` and the epoch
    (`set_epoch`), so a fresh sampler re-creates any epoch's list exactly.
    """

    def __init__(
        self,
        image_ids: Sequence[str],
        texts: Sequence[str],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(image_ids) != len(texts):
            raise ValueError(f"got {len(image_ids)} image ids but {len(texts)} texts: pass one "
                             "of each per row (dataset.image_ids, dataset.texts)")
        if len(image_ids) == 0:
            raise ValueError("image_ids is empty: nothing to sample")
        self.image_keys = _dense_ids(image_ids)
        self.text_keys = _dense_ids([caption_key(t) for t in texts])
        n_images, n_texts = max(self.image_keys) + 1, max(self.text_keys) + 1
        if drop_last and min(n_images, n_texts) < batch_size:
            what = "images" if n_images < batch_size else "captions"
            raise ValueError(f"only {min(n_images, n_texts)} distinct {what} for batch_size="
                             f"{batch_size}: no batch can avoid repeating one; lower the batch "
                             "size or use drop_last=False")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (changes the order when shuffling)."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        n = len(self.image_keys)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = (torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)).tolist()
        # Rows not yet batched, as a linked list over `order`: filling a batch scans from the
        # head and unlinks what it takes, so a deferred row keeps its place for the next batch.
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        head, batches = 0, []
        while head != -1:
            batch, images, texts = [], set(), set()
            pos, prev = head, -1
            while pos != -1 and len(batch) < self.batch_size:
                i = order[pos]
                if self.image_keys[i] in images or self.text_keys[i] in texts:
                    prev = pos  # conflict: defer it, keep scanning
                else:
                    batch.append(i)
                    images.add(self.image_keys[i])
                    texts.add(self.text_keys[i])
                    if prev == -1:
                        head = nxt[pos]
                    else:
                        nxt[prev] = nxt[pos]
                pos = nxt[pos]
            if len(batch) == self.batch_size or not self.drop_last:
                batches.append(batch)
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self._batches()])

    def __len__(self) -> int:
        return len(self._batches())


def _dense_ids(values: Sequence[Any]) -> list[int]:
    """0..k-1 labels, equal where the values are equal."""
    index: dict[Any, int] = {}
    return [index.setdefault(v, len(index)) for v in values]


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of similar length (opt-in: `TrainConfig.batch_sampler="length_grouped"`):
    shuffle, cut into pools of batch_size x multiplier, sort each pool by length, cut into
    batches, then shuffle the batch order.

    This shapes the negatives: with an in-batch-negative loss every batch holds only captions
    of about one length (when the pool covers the whole set, of exactly one length), so the
    model learns to tell apart captions of equal length only. It saves padding, and it does not
    keep an image or caption from appearing twice in a batch; `NoDuplicatesBatchSampler` is the
    default for training.

    Deterministic given `seed` and the epoch (`set_epoch`); every index appears exactly once
    per epoch (only the last batch may be short, and `drop_last` drops it). Use as a
    DataLoader `batch_sampler`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        bucket_size_multiplier: int = 50,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_size_multiplier < 1:
            raise ValueError(f"bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
        if len(lengths) == 0:
            raise ValueError("lengths is empty: nothing to sample")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pool_size = batch_size * bucket_size_multiplier
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (changes the order when shuffling)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        batches = []
        for start in range(0, n, self.pool_size):
            pool = order[start:start + self.pool_size]
            pool = pool[torch.argsort(self.lengths[pool], stable=True)]
            batches.extend(pool[i:i + self.batch_size].tolist()
                           for i in range(0, len(pool), self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return iter(batches)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def text_lengths(texts: Sequence[str], tokenizer: Any) -> list[int]:
    """Token count of each text (no special tokens); accepts a tokenizer or a processor."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if len(texts) == 0:
        return []
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions when each batch is padded to its longest member."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if len(b))
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / padded if padded else 0.0
