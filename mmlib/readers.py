"""Readers of real image–caption sets into `ManifestRow`s: COCO, Flickr30k, Hugging Face datasets.

Nothing is downloaded: each reader parses files you already have (or a `datasets` object you
loaded). Use them through `ImageTextDataset.from_coco / .from_flickr30k / .from_hf`, which
return the same dataset object as a manifest does. One row per caption; the rows of one image
share its `image_id`, so batches and evaluation treat them as one image. Errors name the file
and the entry, line or record, and say what was expected.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmlib.data import ManifestRow
from mmlib.processing import ImageLoadError, load_image

logger = logging.getLogger("mmlib")

KAGGLE_HEADER = ["image_name", "comment_number", "comment"]


def _load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: '{path}'")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _need(entry: Any, keys: Sequence[str], where: str, expected: str) -> None:
    """Raise naming `where` when `entry` is not a dict holding every key."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object like {expected}, got {entry!r:.80}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; found {sorted(entry)}; "
                         f"expected {expected}")


def _caption(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: empty caption {value!r}; every caption must be a "
                         "non-empty string (remove the entry or fill it in)")
    return value.strip()


def _row(rows: list[ManifestRow], image: str, text: str, image_id: str,
         split: str | None = None, line: int | None = None) -> None:
    n = len(rows) + 1
    rows.append(ManifestRow(n, line or n, image, text, split, [], image_id))


# ------------------------------------------------------------------------------------ COCO
def read_coco(path: str | Path, split: str | None = None) -> list[ManifestRow]:
    """COCO captions JSON → rows in image order, each image's captions in file order.

    Image identity is the COCO image id; an image entry's optional "split" key is its split
    (the official files come one per split). Images without captions are counted in a warning.
    """
    data = _load_json(path)
    shape = "{'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}"
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{path}: no '{key}' list; a COCO captions file looks like {shape}")
    images: dict[Any, dict] = {}
    for k, im in enumerate(data["images"]):
        _need(im, ("id", "file_name"), f"images[{k}] of {path}", "{'id', 'file_name'}")
        if im["id"] in images:
            raise ValueError(f"images[{k}] of {path}: duplicate image id {im['id']!r}")
        images[im["id"]] = im
    captions: dict[Any, list[str]] = {i: [] for i in images}
    for k, ann in enumerate(data["annotations"]):
        where = f"annotations[{k}] of {path}"
        _need(ann, ("image_id", "caption"), where, "{'image_id', 'caption'}")
        if ann["image_id"] not in images:
            raise ValueError(f"{where}: caption for image_id {ann['image_id']!r}, which is not "
                             "in 'images'; add the image entry or remove the annotation")
        captions[ann["image_id"]].append(_caption(ann["caption"], where))
    if split is not None and any("split" not in im for im in images.values()):
        raise ValueError(f"split={split!r} requested but the images of {path} have no 'split' "
                         "key (the official COCO files come one file per split): read that "
                         "split's file with split=None")
    rows: list[ManifestRow] = []
    for i, im in images.items():
        for text in captions[i]:
            _row(rows, str(im["file_name"]), text, str(i), im.get("split"))
    bare = sum(not c for c in captions.values())
    if bare:
        logger.warning("%d image(s) without captions in %s (no rows for them)", bare, path)
    if not rows:
        raise ValueError(f"{path} has no captions ('annotations' is empty)")
    return rows


# -------------------------------------------------------------------------------- Flickr30k
def read_flickr30k(path: str | Path, split: str | None = None) -> list[ManifestRow]:
    """Flickr30k captions → rows; the format comes from the file: `.json` the Karpathy split
    (`dataset_flickr30k.json`), `.csv` the Kaggle `image_name| comment_number| comment`,
    anything else `results_20130124.token` (`<image>#<k><TAB><caption>`). Image identity is
    the file name."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return read_karpathy(path)
    if split is not None:
        raise ValueError(f"split={split!r} requested but {path} has no split; the Karpathy "
                         "split file dataset_flickr30k.json does: read that instead, or pass "
                         "split=None")
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: '{path}'")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows: list[ManifestRow] = []
    if path.suffix.lower() == ".csv":
        header = [h.strip() for h in lines[0].split("|")] if lines else []
        if header != KAGGLE_HEADER:
            raise ValueError(f"{path}: header {lines[:1]} is not the Kaggle Flickr30k header "
                             f"'image_name| comment_number| comment'")
        expected = "'<image>| <k>| <caption>' (header image_name| comment_number| comment)"
        for n, line in enumerate(lines[1:], start=2):
            parts = line.split("|", 2)
            if not line.strip():
                continue
            if len(parts) != 3:
                raise ValueError(f"line {n} of {path}: expected {expected}, got {line!r:.100}")
            name = parts[0].strip()
            _row(rows, name, _caption(parts[2], f"line {n} of {path}"), name, line=n)
    else:
        expected = "'<image>#<k><TAB><caption>' (results_20130124.token format)"
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            key, tab, text = line.partition("\t")
            name, hash_, _ = key.partition("#")
            if not tab or not hash_ or not name.strip():
                raise ValueError(f"line {n} of {path}: expected {expected}, got {line!r:.100}")
            _row(rows, name.strip(), _caption(text, f"line {n} of {path}"), name.strip(), line=n)
    if not rows:
        raise ValueError(f"{path} has no captions")
    return rows


def read_karpathy(path: str | Path) -> list[ManifestRow]:
    """Karpathy split JSON (`dataset_flickr30k.json`, `dataset_coco.json`): images
    [{filename, split, sentences [{raw}]}, optional filepath] → rows with their split
    ("train", "val", "test", "restval"). Image identity: filepath/filename."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: no 'images' list; a Karpathy split file looks like "
                         "{'images': [{'filename', 'split', 'sentences': [{'raw'}]}]}")
    rows: list[ManifestRow] = []
    for k, im in enumerate(data["images"]):
        where = f"images[{k}] of {path}"
        _need(im, ("filename", "split", "sentences"), where,
              "{'filename', 'split', 'sentences': [{'raw'}]}")
        name = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else str(im["filename"])
        for j, sentence in enumerate(im["sentences"]):
            _need(sentence, ("raw",), f"{where}, sentences[{j}]", "{'raw': caption}")
            _row(rows, name, _caption(sentence["raw"], f"{where}, sentences[{j}]"), name,
                 str(im["split"]))
    if not rows:
        raise ValueError(f"{path} has no captions")
    return rows


# ------------------------------------------------------------------------ Hugging Face datasets
def _decode(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageLoadError(f"{where}: cannot decode the image bytes: {e}") from e


def read_hf(
    dataset: Any,
    image_column: str = "image",
    caption_columns: Sequence[str] = ("text",),
    split: str | None = None,
    image_id_column: str | None = None,
) -> tuple[list[ManifestRow], str, Callable[[ManifestRow], Image.Image] | None, str | None]:
    """Rows of a `datasets.Dataset` (or `DatasetDict[split]`), the source name for errors, the
    image loader (None when every image is a file on disk) and the split left to select.

    A row's `row` is its record's 1-based index. The image column is an `Image` feature
    (files stay paths; bytes are decoded when read) or a column of file paths. A caption
    column holds a string or a list of strings; a "split" column, when present, is the split.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"a DatasetDict needs split= one of {list(dataset)}, got {split!r}")
        dataset, name, split = dataset[split], f"Hugging Face dataset [{split}]", None
    elif isinstance(dataset, datasets.Dataset):
        name = "Hugging Face dataset"
    else:
        raise TypeError(f"expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")
    if dataset.info.dataset_name:
        name = name.replace("dataset", f"dataset '{dataset.info.dataset_name}'", 1)
    caption_columns = [caption_columns] if isinstance(caption_columns, str) else list(caption_columns)
    wanted = [image_column, *caption_columns, *([image_id_column] if image_id_column else [])]
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name} has no column(s) {missing}; its columns are "
                         f"{dataset.column_names}. Pass image_column='...', "
                         "caption_columns=(...) or image_id_column='...'")
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"{name}: image_column={image_column!r} is {feature}, neither an Image "
                         "feature nor file paths")
    has_split = "split" in dataset.column_names
    columns = [c for c in dict.fromkeys([*wanted, *(["split"] if has_split else [])])]
    rows: list[ManifestRow] = []
    on_disk = True
    for index, record in enumerate(_records(dataset, columns)):
        where = f"row {index + 1} of {name}"
        image = record[image_column]
        data, path = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (None, image)
        if data is None and not path:
            raise ValueError(f"{where}: column {image_column!r} holds no image")
        on_disk = on_disk and data is None
        if image_id_column:
            image_id = str(record[image_id_column])
        elif path and data is None:
            image_id = str(Path(path).resolve())
        else:
            image_id = str(path) if path else str(index)
        texts = []
        for col in caption_columns:
            value = record[col]
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"{where}: column {col!r} holds no caption ({value!r}); fill "
                                 "it in or drop the record")
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(f"{where}: column {col!r} must hold a caption or a list of "
                                 f"non-empty strings, got {value!r:.100}")
            texts.extend(v.strip() for v in values)
        if not texts:
            raise ValueError(f"{where}: no caption in {caption_columns}")
        split_value = str(record["split"]) if has_split and record["split"] is not None else None
        for text in texts:
            rows.append(ManifestRow(index + 1, index + 1, str(path or f"<bytes of row {index + 1}>"),
                                    text, split_value, [], image_id))
    if not rows:
        raise ValueError(f"{name} has no records")
    if on_disk:
        return rows, name, None, split

    def loader(row: ManifestRow) -> Image.Image:
        image = dataset[row.row - 1][image_column]
        if image["bytes"] is None:
            return load_image(image["path"])
        return _decode(image["bytes"], f"row {row.row} of {name}")

    return rows, name, loader, split


def _records(dataset: Any, columns: list[str], chunk: int = 1000):
    """Records of `columns`, read in Arrow chunks (image bytes are not copied into Python)."""
    arrow = dataset.select_columns(columns).with_format("arrow")
    for start in range(0, len(dataset), chunk):
        table = arrow[start:start + chunk]
        images = table.column(columns[0])
        rest = {c: table.column(c).to_pylist() for c in columns[1:]}
        if hasattr(images.type, "get_field_index") and images.type.get_field_index("path") >= 0:
            paths = images.combine_chunks().field("path").to_pylist()
            bytes_null = images.combine_chunks().field("bytes").is_null().to_pylist()
            image_values = [{"path": p, "bytes": None if null else b""}
                            for p, null in zip(paths, bytes_null, strict=True)]
        else:
            image_values = images.to_pylist()
        for k, image in enumerate(image_values):
            yield {columns[0]: image, **{c: rest[c][k] for c in rest}}
