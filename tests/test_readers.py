"""Readers of real caption sets (COCO, Flickr30k, Hugging Face datasets) on small files made here."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlib.data import ImageTextDataset, NoDuplicatesBatchSampler
from mmlib.processing import ImageLoadError, load_image

COLORS = ["red", "green", "blue", "yellow"]
# image file -> its captions (image 3 has none in the COCO file)
CAPTIONS = {
    "1000092795.jpg": ["Two young guys with shaggy hair look at their hands .",
                       "Two friends enjoy time spent together .",
                       "Two men in green shirts are standing in a yard ."],
    "10002456.jpg": ["Several men in hard hats are operating a giant pulley system .",
                     "Workers look down from up above on a piece of equipment ."],
    "1000268201.jpg": ["A child in a pink dress is climbing up a set of stairs .",
                       "A little girl climbing into a wooden playhouse ."],
}


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for name, color in zip([*CAPTIONS, "unused.jpg"], COLORS, strict=True):
        Image.new("RGB", (24, 16), color).save(root / name, format="PNG")
    return root


def _pixels(image) -> np.ndarray:
    return np.asarray(load_image(image))


def _expected() -> tuple[list[str], list[str]]:
    names = [n for n, caps in CAPTIONS.items() for _ in caps]
    return names, [c for caps in CAPTIONS.values() for c in caps]


def _check_protocol(ds: ImageTextDataset, root: Path | None, ids: list[str]) -> None:
    """What training and evaluation use: texts, image_ids, image_for(i), len, items."""
    names, texts = _expected()
    assert len(ds) == len(texts) and ds.texts == texts and ds.image_ids == ids
    for i, name in enumerate(names):
        ref = _pixels(root / name) if root else None
        if ref is not None:
            assert np.array_equal(_pixels(ds.image_for(i)), ref)
            assert np.array_equal(np.asarray(ds[i]["image"]), ref)
        assert ds[i]["text"] == texts[i] and ds[i]["image_id"] == ids[i]
    batches = list(NoDuplicatesBatchSampler(ds.image_ids, ds.texts, 3, drop_last=False))
    for b in batches:
        assert len({ds.image_ids[i] for i in b}) == len(b)


# ------------------------------------------------------------------------------------ COCO
def _coco(tmp_path: Path, **extra) -> Path:
    ids = {name: 100 + k for k, name in enumerate([*CAPTIONS, "unused.jpg"])}
    data = {"info": {}, "images": [{"id": i, "file_name": n, "height": 16, "width": 24}
                                   for n, i in ids.items()],
            "annotations": [{"id": 7 * k, "image_id": ids[n], "caption": c}
                            for k, (n, c) in enumerate(zip(*_expected(), strict=True))]}
    data["annotations"].reverse()  # rows follow the images' order, captions the file's
    for k, split in extra.get("splits", {}).items():
        data["images"][k]["split"] = split
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    return path


def test_coco(tmp_path, images, caplog):
    with caplog.at_level(logging.WARNING, logger="mmlib"):
        ds = ImageTextDataset.from_coco(_coco(tmp_path), images)  # annotations in reverse
    assert "1 image(s) without captions" in caplog.text
    # rows follow the images' order; an image's captions keep the annotation file's order
    assert ds.image_ids == [str(100 + k) for k, caps in enumerate(CAPTIONS.values()) for _ in caps]
    assert ds.texts == [c for caps in CAPTIONS.values() for c in caps[::-1]]
    for i in range(len(ds)):
        assert ds.image_for(i) == images / list(CAPTIONS)[int(ds.image_ids[i]) - 100]


def test_coco_rows_follow_images_then_file_order(tmp_path, images):
    path = _coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"].reverse()  # back to the natural order
    path.write_text(json.dumps(data))
    ds = ImageTextDataset.from_coco(path, images)
    _check_protocol(ds, images, [str(100 + list(CAPTIONS).index(n)) for n in _expected()[0]])


def test_coco_split_and_errors(tmp_path, images):
    path = _coco(tmp_path, splits={0: "test", 1: "train", 2: "test", 3: "train"})
    test = ImageTextDataset.from_coco(path, images, split="test")
    assert sorted(set(test.image_ids)) == ["100", "102"] and len(test) == 5
    with pytest.raises(ValueError, match=r"have no 'split' key.*one file per split"):
        ImageTextDataset.from_coco(_coco(tmp_path), images, split="test")
    data = json.loads(path.read_text())
    bad = dict(data, annotations=[*data["annotations"], {"image_id": 999, "caption": "x"}])
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"annotations\[7\] of .*image_id 999.*not in 'images'"):
        ImageTextDataset.from_coco(path, images)
    bad = dict(data, annotations=[{"image_id": 100, "text": "x"}])
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"annotations\[0\] of .*missing key\(s\) \['caption'\]"):
        ImageTextDataset.from_coco(path, images)
    bad = dict(data, images=[*data["images"], {"id": 100, "file_name": "x.jpg"}])
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"images\[4\] of .*duplicate image id 100"):
        ImageTextDataset.from_coco(path, images)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"no 'annotations' list.*COCO captions"):
        ImageTextDataset.from_coco(path, images)
    with pytest.raises(FileNotFoundError):
        ImageTextDataset.from_coco(tmp_path / "nope.json", images)


# -------------------------------------------------------------------------------- Flickr30k
def _token(tmp_path: Path) -> Path:
    path = tmp_path / "results_20130124.token"
    lines = [f"{n}#{k}\t{c}" for n, caps in CAPTIONS.items() for k, c in enumerate(caps)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _kaggle_csv(tmp_path: Path) -> Path:
    path = tmp_path / "results.csv"
    lines = ["image_name| comment_number| comment"]
    lines += [f"{n}| {k}| {c}" for n, caps in CAPTIONS.items() for k, c in enumerate(caps)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _karpathy(tmp_path: Path) -> Path:
    splits = ["train", "test", "test"]
    data = {"dataset": "flickr30k", "images": [
        {"filename": n, "imgid": k, "split": s,
         "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]}
        for k, ((n, caps), s) in enumerate(zip(CAPTIONS.items(), splits, strict=True))]}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("fmt", ["token", "csv", "karpathy"])
def test_flickr30k_formats_read_the_same(tmp_path, images, fmt):
    path = {"token": _token, "csv": _kaggle_csv, "karpathy": _karpathy}[fmt](tmp_path)
    ds = ImageTextDataset.from_flickr30k(path, images)
    _check_protocol(ds, images, _expected()[0])


def test_flickr30k_karpathy_split(tmp_path, images):
    test = ImageTextDataset.from_flickr30k(_karpathy(tmp_path), images, split="test")
    assert test.image_ids == ["10002456.jpg"] * 2 + ["1000268201.jpg"] * 2
    with pytest.raises(ValueError, match=r"unknown split 'val'.*\['test', 'train'\]"):
        ImageTextDataset.from_flickr30k(_karpathy(tmp_path), images, split="val")
    with pytest.raises(ValueError, match=r"no split.*dataset_flickr30k.json"):
        ImageTextDataset.from_flickr30k(_token(tmp_path), images, split="test")


def test_flickr30k_errors_name_the_line(tmp_path, images):
    path = _kaggle_csv(tmp_path)
    lines = path.read_text().splitlines()
    lines[4] = "10002456.jpg| 4 A dog runs ."  # a known malformed line of the Kaggle file
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 5 of .*results.csv.*image_name\| comment_number"):
        ImageTextDataset.from_flickr30k(path, images)
    path.write_text("image,caption\na.jpg,hi\n")
    with pytest.raises(ValueError, match=r"header.*image_name\| comment_number\| comment"):
        ImageTextDataset.from_flickr30k(path, images)
    path = _token(tmp_path)
    path.write_text(path.read_text() + "1000092795.jpg#3 no tab here\n")
    with pytest.raises(ValueError, match=r"line 8 of .*<image>#<k><TAB><caption>"):
        ImageTextDataset.from_flickr30k(path, images)
    path.write_text("1000092795.jpg#0\t   \n")
    with pytest.raises(ValueError, match=r"line 1 of .*empty caption"):
        ImageTextDataset.from_flickr30k(path, images)


def test_missing_image_names_the_file(tmp_path, images):
    (images / "10002456.jpg").unlink()
    ds = ImageTextDataset.from_flickr30k(_token(tmp_path), images)
    with pytest.raises(ImageLoadError, match=r"row 4 of .*results_20130124.token.*10002456.jpg"):
        ds[3]


# ------------------------------------------------------------------------ Hugging Face datasets
def _hf_records(images: Path) -> dict:
    """One record per image: a PIL image, one caption column and one list-of-captions column."""
    return {"image": [Image.open(images / n).convert("RGB") for n in CAPTIONS],
            "text": [caps[0] for caps in CAPTIONS.values()],
            "more": [caps[1:] for caps in CAPTIONS.values()]}


def test_hf_in_memory_dataset(images):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(_hf_records(images)).cast_column("image", datasets.Image())
    data = ImageTextDataset.from_hf(ds, caption_columns=("text", "more"))
    names = [n for n, caps in CAPTIONS.items() for _ in caps]
    assert data.image_ids == [str(list(CAPTIONS).index(n)) for n in names]  # the row index
    _check_protocol(data, images, data.image_ids)
    assert isinstance(data.image_for(0), Image.Image)  # no file to hand over: a PIL image
    with pytest.raises(ValueError, match="no image files.*image_for"):
        _ = data.image_paths


def test_hf_imagefolder_and_parquet(tmp_path, images):
    datasets = pytest.importorskip("datasets")
    with open(images / "metadata.jsonl", "w") as f:
        for n, caps in CAPTIONS.items():
            f.write(json.dumps({"file_name": n, "text": caps[0], "more": caps[1:]}) + "\n")
    folder = datasets.load_dataset("imagefolder", data_dir=str(images), cache_dir=str(tmp_path / "c"))
    data = ImageTextDataset.from_hf(folder, caption_columns=("text", "more"), split="train")
    names = [n for n, caps in CAPTIONS.items() for _ in caps]
    assert data.image_ids == [str((images / n).resolve()) for n in names]  # the file's path
    _check_protocol(data, images, data.image_ids)
    assert data.image_for(0) == images / "1000092795.jpg"  # files stay files

    parquet = tmp_path / "data.parquet"
    ds = datasets.Dataset.from_dict(_hf_records(images)).cast_column("image", datasets.Image())
    ds.to_parquet(str(parquet))
    loaded = datasets.load_dataset("parquet", data_files=str(parquet), cache_dir=str(tmp_path / "c"))
    data = ImageTextDataset.from_hf(loaded["train"], caption_columns=["text", "more"])
    _check_protocol(data, images, [str(list(CAPTIONS).index(n)) for n in names])


def test_hf_split_column_and_errors(images):
    datasets = pytest.importorskip("datasets")
    records = dict(_hf_records(images), split=["train", "test", "test"])
    ds = datasets.Dataset.from_dict(records).cast_column("image", datasets.Image())
    test = ImageTextDataset.from_hf(ds, caption_columns=("text",), split="test")
    assert test.texts == [caps[0] for caps in list(CAPTIONS.values())[1:]]
    assert test.image_ids == ["1", "2"]  # row indices of the whole dataset
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\].*\['image', 'text', 'more', 'split'\]"):
        ImageTextDataset.from_hf(ds, caption_columns=("caption",))
    with pytest.raises(ValueError, match=r"no column\(s\) \['img'\].*Pass image_column="):
        ImageTextDataset.from_hf(ds, image_column="img")
    with pytest.raises(ValueError, match=r"image_column='more' is .*neither an Image"):
        ImageTextDataset.from_hf(ds, image_column="more")
    with pytest.raises(ValueError, match=r"DatasetDict.*split=.*\['train'\]"):
        ImageTextDataset.from_hf(datasets.DatasetDict({"train": ds}))
    bad = datasets.Dataset.from_dict(dict(_hf_records(images), text=["a", None, "c"]))
    with pytest.raises(ValueError, match=r"row 2 of .*column 'text' holds no caption"):
        ImageTextDataset.from_hf(bad.cast_column("image", datasets.Image()))
    bad = datasets.Dataset.from_dict(dict(_hf_records(images), more=[["a"], ["b"], ["c", ""]]))
    with pytest.raises(ValueError, match=r"row 3 of .*column 'more'.*non-empty strings"):
        ImageTextDataset.from_hf(bad.cast_column("image", datasets.Image()), caption_columns=("more",))
    bad = datasets.Dataset.from_dict(dict(_hf_records(images), more=[["a"], [], ["c"]]))
    with pytest.raises(ValueError, match=r"row 2 of .*no caption in \['more'\]"):
        ImageTextDataset.from_hf(bad.cast_column("image", datasets.Image()), caption_columns=("more",))


def test_hf_corrupt_image_bytes_name_the_record():
    datasets = pytest.importorskip("datasets")
    good = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(good, format="PNG")
    records = {"image": [{"bytes": good.getvalue(), "path": None},
                         {"bytes": b"not an image", "path": None}], "text": ["a", "b"]}
    ds = datasets.Dataset.from_dict(records).cast_column("image", datasets.Image())
    data = ImageTextDataset.from_hf(ds)
    assert data[0]["image"].size == (8, 8)
    with pytest.raises(ImageLoadError, match=r"row 2 of Hugging Face dataset.*cannot decode"):
        data[1]
    assert len(ImageTextDataset.from_hf(ds, skip_bad=True)) == 1
