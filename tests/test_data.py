"""Tests for the synthetic generator, the committed samples and mmlib.data (the last test builds the tiny model)."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmlib import synthetic
from mmlib.data import (
    ImageTextCollator,
    ImageTextDataset,
    LengthBucketSampler,
    NoDuplicatesBatchSampler,
    caption_key,
    padding_fraction,
    read_manifest,
    text_lengths,
)
from mmlib.processing import ImageLoadError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_samples"
SYNTHETIC = SAMPLES / "synthetic" / "manifest.jsonl"
PHOTOS = SAMPLES / "photos" / "captions.jsonl"


@pytest.fixture(scope="module")
def gen():
    return synthetic


@pytest.fixture(scope="module")
def small_set(gen, tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return gen.generate(out, n=80, seed=3)


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- generator
def test_generator_is_deterministic(gen, small_set, tmp_path):
    again = gen.generate(tmp_path / "again", n=80, seed=3)
    assert _files(small_set.parent) == _files(again.parent)
    other = gen.generate(tmp_path / "other", n=80, seed=4)
    assert _files(other.parent) != _files(small_set.parent)


def test_generator_cli_matches_function(gen, small_set, tmp_path):
    gen.main(["--out", str(tmp_path / "cli"), "--n", "80", "--seed", "3"])
    assert _files(tmp_path / "cli") == _files(small_set.parent)


def _by_image(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["image_id"], []).append(r)
    return out


def _says(text: str, attrs: dict, gen) -> bool:
    """Does a caption name all four main attributes (in any of the phrasings)?"""
    size_words = (attrs["size"], gen.SIZE_WORDS[attrs["size"]])
    pos_words = (gen.POSITION_PHRASES[attrs["position"]], gen.POSITION_WORDS[attrs["position"]])
    words = text.replace(",", "").split()
    return (attrs["color"] in words and attrs["shape"] in words
            and any(w in words for w in size_words) and any(p in text for p in pos_words))


def test_generator_rows(gen, small_set):
    rows = _rows(small_set)
    images = _by_image(rows)
    assert len(images) == 80
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts), "captions must be unique across the set"
    image_of_text = {r["text"]: r["image_id"] for r in rows}
    for image_id, group in images.items():
        assert 3 <= len(group) <= 5
        assert len({(r["image"], r["split"], json.dumps(r["attributes"])) for r in group}) == 1
        assert group[0]["image"] == f"images/{image_id}.png"
        a = group[0]["attributes"]
        assert group[0]["split"] == gen.split_of(a)
        assert group[0]["text"].startswith(f"a {a['size']} {a['color']} {a['shape']} ")
        mentioned = [d for d in a["distractors"] if d["mentioned"]]
        for r in group:  # every caption names the main object's attributes (and the mention)
            assert _says(r["text"], a, gen), r["text"]
            assert all(f"{d['color']} {d['shape']}" in r["text"] for d in mentioned)
            assert 1 <= len(r["hard_negatives"]) <= 3
            for h in r["hard_negatives"]:
                assert image_of_text.get(h) != image_id, "a hard negative of its own image"
                assert not _says(h, a, gen), (r["text"], h)
        for d in a["distractors"]:  # the caption names the main object unambiguously
            assert d["shape"] != a["shape"] and d["color"] != a["color"]
        with Image.open(small_set.parent / group[0]["image"]) as img:
            assert img.size == (a["image_size"], a["image_size"])
            assert 56 <= img.width <= 112 and img.width % 28 == 0
    assert 3.5 < len(rows) / len(images) < 4.5
    present = [h for r in rows for h in r["hard_negatives"] if h in image_of_text]
    assert len(present) > 0.1 * len(rows)  # some hard negatives have images in the set


def test_generator_beyond_all_combinations_keeps_captions_unambiguous(gen, tmp_path):
    n = len(gen.all_combinations()) + 60  # combinations repeat: distractor mentions differ
    rows = _rows(gen.generate(tmp_path / "big", n=n, seed=0, sizes=[56]))
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    images = _by_image(rows)
    assert len(images) == n
    by_combo: dict[tuple, list[dict]] = {}
    for group in images.values():
        a = group[0]["attributes"]
        by_combo.setdefault(tuple(a[k] for k in gen.ATTRIBUTES), []).append(a)
    repeated = [v for v in by_combo.values() if len(v) > 1]
    assert len(repeated) == 60
    for same in repeated:  # A's mentioned distractor is not in B: A's captions are false of B
        for x in same:
            mention = [(d["color"], d["shape"]) for d in x["distractors"] if d["mentioned"]]
            assert len(mention) == 1
            for y in same:
                if y is not x:
                    assert mention[0] not in {(d["color"], d["shape"]) for d in y["distractors"]}


def test_plan_gives_the_held_out_set_at_least_1000_captions(gen, small_set):
    """The >= 1000-caption test split (`--n 1920`), counted from the plan without drawing."""
    test = [len(t) for a, t in gen.plan(1920, seed=0) if gen.split_of(a) == "test"]
    assert sum(test) >= 1000 and len(test) == 3 * 101
    generated = [len(g) for g in _by_image(_rows(small_set)).values()]
    assert [len(t) for _, t in gen.plan(80, seed=3)] == generated


def test_ensure_generated_generates_once(gen, small_set, tmp_path, monkeypatch):
    out = tmp_path / "gen"
    manifest = gen.ensure_generated(out, n=80, seed=3)
    assert _files(out) == _files(small_set.parent)
    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("regenerated"))
    assert gen.ensure_generated(out, n=80, seed=3) == manifest
    monkeypatch.undo()
    gen.ensure_generated(out, n=12, seed=3)  # other arguments: regenerated in place
    assert len(_by_image(_rows(manifest))) == 12 and len(list((out / "images").iterdir())) == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_split_is_a_stable_function_of_the_main_attributes(gen, small_set, tmp_path):
    counts = Counter(gen.split_of(c) for c in gen.all_combinations())
    assert counts == {"train": 444, "validation": 95, "test": 101}  # pinned: never reshuffle
    assert gen.split_of({"shape": "circle", "color": "red", "size": "large",
                         "position": "left"}) == "train"
    combo_split = {}
    for manifest in (small_set, gen.generate(tmp_path / "s9", n=120, seed=9)):
        for r in _rows(manifest):
            key = tuple(r["attributes"][k] for k in gen.ATTRIBUTES)
            assert combo_split.setdefault(key, r["split"]) == r["split"]


def test_images_do_not_depend_on_n(gen, small_set, tmp_path):
    fewer = gen.generate(tmp_path / "fewer", n=30, seed=3)
    a, b = _rows(fewer), _rows(small_set)
    assert [r["text"] for r in a] == [r["text"] for r in b[:len(a)]]
    for r in a:
        assert (fewer.parent / r["image"]).read_bytes() == (small_set.parent / r["image"]).read_bytes()


def test_generator_rejects_bad_arguments(gen, tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        gen.generate(tmp_path, n=0)
    with pytest.raises(ValueError, match="sizes"):
        gen.generate(tmp_path, n=3, sizes=[8])


# ------------------------------------------------------------------------ committed samples
def test_committed_synthetic_sample(gen):
    rows = _rows(SYNTHETIC)
    folder = SYNTHETIC.parent
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024, f"committed sample is {total} bytes"
    on_disk = {str(p.relative_to(folder)) for p in (folder / "images").iterdir()}
    assert on_disk == {r["image"] for r in rows}, "every image has rows, every row an image"
    images = _by_image(rows)
    assert len(images) == 600 and len(rows) == sum(len(g) for g in images.values())
    assert all(3 <= len(g) <= 5 for g in images.values())
    assert len({r["text"] for r in rows}) == len(rows)
    counts = Counter(r["split"] for r in rows)
    assert set(counts) == {"train", "validation", "test"}
    assert 0.6 < counts["train"] / len(rows) < 0.8
    assert min(counts["validation"], counts["test"]) >= 0.1 * len(rows)
    train = {tuple(r["attributes"][k] for k in gen.ATTRIBUTES) for r in rows if r["split"] == "train"}
    held = {tuple(r["attributes"][k] for k in gen.ATTRIBUTES) for r in rows if r["split"] != "train"}
    assert not train & held
    ds = ImageTextDataset(SYNTHETIC, split="train")  # rows sharing an image share its identity
    assert len(set(ds.image_ids)) == len({r["image"] for r in rows if r["split"] == "train"})


def test_committed_sample_is_what_the_generator_makes(gen, tmp_path):
    """Same manifest and same pixels as `python -m mmlib.synthetic --n 600 --seed 0` (PNG bytes may
    differ across zlib versions, pixels may not)."""
    params = json.loads((SYNTHETIC.parent / "generator.json").read_text())
    assert params == {"n": 600, "seed": 0, "sizes": list(gen.IMAGE_SIZES),
                      "version": gen.GENERATOR_VERSION}
    fresh = gen.generate(tmp_path / "fresh", n=params["n"], seed=params["seed"])
    assert fresh.read_text(encoding="utf-8") == SYNTHETIC.read_text(encoding="utf-8")
    for r in _rows(SYNTHETIC)[::60]:
        a = np.asarray(Image.open(SYNTHETIC.parent / r["image"]).convert("RGB"))
        b = np.asarray(Image.open(fresh.parent / r["image"]).convert("RGB"))
        assert np.array_equal(a, b), r["image"]


def test_committed_photos():
    ds = ImageTextDataset(PHOTOS)
    assert 6 <= len(ds) <= 8
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].mode == "RGB" and max(item["image"].size) <= 224
        assert len(item["text"].split()) >= 5
    assert len(set(ds.texts)) == len(ds)


# --------------------------------------------------------------------------------- dataset
def _write_csv(path: Path, rows: list[dict], hard: str) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "text", "split", "hard_negatives"])
        w.writeheader()
        for r in rows:
            hn = json.dumps(r["hard_negatives"]) if hard == "json" else "|".join(r["hard_negatives"])
            w.writerow({"image": r["image"], "text": r["text"], "split": r["split"], "hard_negatives": hn})
    return path


@pytest.mark.parametrize("hard", ["json", "pipe"])
def test_jsonl_and_csv_read_the_same(small_set, hard):
    csv_path = _write_csv(small_set.parent / f"manifest_{hard}.csv", _rows(small_set), hard)
    for split in (None, "train", "test"):
        a = ImageTextDataset(small_set, split=split, with_hard_negatives=True)
        b = ImageTextDataset(csv_path, split=split, with_hard_negatives=True)
        assert len(a) == len(b) > 0
        for i in (0, len(a) - 1):
            x, y = a[i], b[i]
            assert x["text"] == y["text"] and x["hard_negatives"] == y["hard_negatives"]
            assert x["index"] == y["index"] == i
            assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))


def test_dataset_items(small_set):
    ds = ImageTextDataset(small_set, split="train")
    item = ds[0]
    assert set(item) >= {"image", "text", "hard_negatives", "index"}
    assert isinstance(item["image"], Image.Image) and item["image"].mode == "RGB"
    assert item["hard_negatives"] == []  # only with with_hard_negatives=True
    assert ds[-1]["index"] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert sum(len(ImageTextDataset(small_set, split=s)) for s in ("train", "validation", "test")) \
        == len(_rows(small_set))


def test_hard_negatives_follow_the_direction(small_set):
    t2i = ImageTextDataset(small_set, direction="text2image", with_hard_negatives=True)
    i2t = ImageTextDataset(small_set, direction="image2text", with_hard_negatives=True)
    by_text = dict(zip(t2i.texts, range(len(t2i)), strict=True))
    resolved = 0
    for i in range(len(t2i)):
        item = t2i[i]
        assert i2t[i]["hard_negatives"] == item["hard_negatives"]
        present = [by_text[t] for t in item["hard_negatives"] if t in by_text]
        assert len(item["hard_negative_images"]) == len(present)
        for img, k in zip(item["hard_negative_images"], present, strict=True):
            assert np.array_equal(np.asarray(img), np.asarray(t2i[k]["image"]))
            assert t2i.image_ids[k] != t2i.image_ids[i], "a hard negative shows this image"
        resolved += len(present)
    assert resolved > 0
    assert "hard_negative_images" not in i2t[0]


def _copy_rows(src: Path, dst: Path, n: int) -> tuple[Path, list[dict]]:
    """The first caption of each of the first n images (one row per image file)."""
    rows = [g[0] for g in _by_image(_rows(src)).values()][:n]
    (dst / "images").mkdir(parents=True)
    for r in rows:
        (dst / r["image"]).write_bytes((src.parent / r["image"]).read_bytes())
    manifest = dst / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest, rows


def test_missing_and_truncated_images_name_file_and_row(small_set, tmp_path):
    manifest, rows = _copy_rows(small_set, tmp_path, 6)
    (tmp_path / rows[1]["image"]).unlink()
    data = (tmp_path / rows[3]["image"]).read_bytes()
    (tmp_path / rows[3]["image"]).write_bytes(data[: len(data) // 2])
    (tmp_path / rows[4]["image"]).write_text("not an image")
    ds = ImageTextDataset(manifest)
    assert len(ds) == 6  # lazily checked
    for i in (1, 3, 4):
        with pytest.raises(ImageLoadError) as info:
            ds[i]
        msg = str(info.value)
        assert f"row {i + 1} of {manifest}" in msg and rows[i]["image"] in msg
    assert isinstance(info.value, ValueError)
    ds[0]  # good rows still load


def test_skip_bad_skips_counts_and_warns(small_set, tmp_path, caplog):
    manifest, rows = _copy_rows(small_set, tmp_path, 6)
    (tmp_path / rows[2]["image"]).unlink()
    (tmp_path / rows[5]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with caplog.at_level(logging.WARNING, logger="mmlib"):
        ds = ImageTextDataset(manifest, skip_bad=True)
    assert len(ds) == 4
    assert [s["row"] for s in ds.skipped] == [3, 6]
    assert [s["image"] for s in ds.skipped] == [rows[2]["image"], rows[5]["image"]]
    assert "skipped 2 of 6 rows" in caplog.text
    assert [ds[i]["text"] for i in range(4)] == [rows[k]["text"] for k in (0, 1, 3, 4)]
    for r in rows:
        (tmp_path / r["image"]).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="every row"):
        ImageTextDataset(manifest, skip_bad=True)


def test_bad_manifests_raise_clear_errors(small_set, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        ImageTextDataset(empty)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        ImageTextDataset(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("image,text\n")
    with pytest.raises(ValueError, match="no rows"):
        ImageTextDataset(tmp_path / "header.csv")
    with pytest.raises(ValueError, match=r"unknown split 'dev'.*'test', 'train', 'validation'"):
        ImageTextDataset(small_set, split="dev")
    (tmp_path / "nocap.csv").write_text("image,caption\na.png,hi\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['text'\]"):
        ImageTextDataset(tmp_path / "nocap.csv")
    (tmp_path / "nocap.jsonl").write_text('{"image": "a.png", "text": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"row 2 of .*missing column\(s\) \['text'\]"):
        ImageTextDataset(tmp_path / "nocap.jsonl")
    (tmp_path / "nosplit.jsonl").write_text('{"image": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="no 'split'"):
        ImageTextDataset(tmp_path / "nosplit.jsonl", split="train")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 .*invalid JSON"):
        read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported manifest format"):
        read_manifest(tmp_path / "m.txt")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="direction"):
        ImageTextDataset(small_set, direction="both")


def test_root_overrides_the_manifest_folder(small_set, tmp_path):
    rows = _rows(small_set)[:3]
    manifest = tmp_path / "elsewhere.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ImageTextDataset(manifest, root=small_set.parent)
    assert ds[2]["text"] == rows[2]["text"]
    assert ds.image_paths[0] == small_set.parent / rows[0]["image"]


# -------------------------------------------------------------------------------- collator
class _FakeProcessor:
    """Stands in for the Qwen processor: tokenizes on spaces, one token per 28 px block."""

    class _Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            if isinstance(text, str):
                return {"input_ids": list(range(len(text.split())))}
            return {"input_ids": [list(range(len(t.split()))) for t in text]}

    tokenizer = _Tokenizer()

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        lengths = [len(t.split()) for t in text]
        width = max(lengths)
        out = {"input_ids": torch.zeros(len(text), width, dtype=torch.long),
               "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths])}
        if images:
            out["image_grid_thw"] = torch.tensor([[1, im.height // 14, im.width // 14] for im in images])
        return out


def test_collator_directions(small_set):
    proc = _FakeProcessor()
    ds = ImageTextDataset(small_set, with_hard_negatives=True)
    items = [ds[i] for i in range(6)]
    b = ImageTextCollator(proc)(items)
    assert b["query"]["input_ids"].shape[0] == 6 and "image_grid_thw" not in b["query"]
    assert b["target"]["image_grid_thw"].shape == (6, 3)
    assert torch.equal(b["indices"], torch.arange(6))
    n_neg = sum(len(it["hard_negative_images"]) for it in items)
    assert len(b["hard_negative_owner"]) == n_neg
    if n_neg:
        assert b["hard_negatives"]["image_grid_thw"].shape[0] == n_neg
    b = ImageTextCollator(proc, direction="image2text")(items)
    assert "image_grid_thw" in b["query"] and "image_grid_thw" not in b["target"]
    assert b["hard_negatives"]["input_ids"].shape[0] == sum(len(it["hard_negatives"]) for it in items)
    plain = ImageTextDataset(small_set)
    b = ImageTextCollator(proc)([plain[0], plain[1]])
    assert b["hard_negatives"] is None and b["hard_negative_owner"].numel() == 0
    with pytest.raises(ValueError, match="empty batch"):
        ImageTextCollator(proc)([])
    loader = torch.utils.data.DataLoader(plain, batch_size=4, collate_fn=ImageTextCollator(proc))
    assert torch.equal(next(iter(loader))["indices"], torch.arange(4))


# --------------------------------------------------------------------------------- sampler
def _caption_lengths() -> list[int]:
    return text_lengths([r["text"] for r in _rows(SYNTHETIC)], _FakeProcessor())


@pytest.mark.parametrize("n,bs,drop_last", [(600, 16, False), (600, 16, True), (37, 8, False),
                                            (5, 8, False), (64, 8, True)])
def test_sampler_covers_every_index_once(n, bs, drop_last):
    lengths = [random.Random(n + i).randint(1, 50) for i in range(n)]
    s = LengthBucketSampler(lengths, bs, drop_last=drop_last, bucket_size_multiplier=4)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        if drop_last:
            assert all(len(b) == bs for b in batches) and len(flat) == n // bs * bs
        else:
            assert sorted(flat) == list(range(n))
            assert sum(len(b) < bs for b in batches) <= 1


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths = _caption_lengths()
    a, b = LengthBucketSampler(lengths, 16, seed=1), LengthBucketSampler(lengths, 16, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(LengthBucketSampler(lengths, 16, seed=2)) != list(LengthBucketSampler(lengths, 16, seed=1))
    ordered = LengthBucketSampler(lengths, 16, shuffle=False)
    assert list(ordered) == list(ordered)


def test_sampler_reduces_padding():
    lengths = _caption_lengths()
    assert len(set(lengths)) >= 2
    bucketed = padding_fraction(list(LengthBucketSampler(lengths, 16, seed=0)), lengths)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=g).tolist()
    random_batches = [order[i:i + 16] for i in range(0, len(order), 16)]
    baseline = padding_fraction(random_batches, lengths)
    assert bucketed < 0.5 * baseline, (bucketed, baseline)
    wide = [random.Random(i).randint(5, 120) for i in range(2000)]
    order = list(range(2000))
    random.Random(0).shuffle(order)
    assert (padding_fraction(list(LengthBucketSampler(wide, 32)), wide)
            < 0.2 * padding_fraction([order[i:i + 32] for i in range(0, 2000, 32)], wide))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketSampler([1, 2], 0)
    with pytest.raises(ValueError, match="empty"):
        LengthBucketSampler([], 4)


def test_text_lengths_and_padding_fraction():
    assert text_lengths(["a b c", "d"], _FakeProcessor()) == [3, 1]
    assert text_lengths([], _FakeProcessor()) == []
    assert padding_fraction([[0, 1]], [3, 1]) == pytest.approx(2 / 6)
    assert padding_fraction([[0], [1]], [3, 1]) == 0.0


# ------------------------------------------------------------------------- manifest encoding
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_manifest_names_file_and_line(tmp_path, suffix):
    head = b"image,text\n" if suffix == ".csv" else b""
    lines = [b'{"image": "a.png", "text": "tea"}', b'{"image": "b.png", "text": "cafe"}',
             b'{"image": "c.png", "text": "caf\xe9"}']  # Latin-1 e-acute: not UTF-8
    if suffix == ".csv":
        lines = [b"a.png,tea", b"b.png,cafe", b"c.png,caf\xe9"]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(head + b"\n".join(lines) + b"\n")
    line = 4 if suffix == ".csv" else 3
    with pytest.raises(ValueError, match=rf"latin1\{suffix}.*line {line}.*UTF-8"):
        read_manifest(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_manifest_with_utf8_bom_reads_like_without(tmp_path, suffix):
    rows = [{"image": "a.png", "text": "café 東京"}, {"image": "b.png", "text": "tea"}]
    if suffix == ".csv":
        body = "image,text\n" + "".join(f"{r['image']},{r['text']}\n" for r in rows)
    else:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_bytes(body.encode("utf-8"))
    bom.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    got = read_manifest(bom)
    assert got == read_manifest(plain)
    assert [(r.image, r.text, r.line) for r in got] == [
        (r["image"], r["text"], i + (2 if suffix == ".csv" else 1)) for i, r in enumerate(rows)]


# ---------------------------------------------------------------- no-duplicates batch sampler
def _five_captions(n_images: int = 40, seed: int = 0) -> tuple[list[str], list[str]]:
    """5 captions per image, lengths 2-14 words, and captions repeated across images (also
    up to case / spacing / a final period, which `caption_key` treats as identical)."""
    rng = random.Random(seed)
    ids, texts = [], []
    for img in range(n_images):
        for k in range(5):
            ids.append(f"img{img}")
            texts.append(" ".join(f"w{img}_{k}_{j}" for j in range(rng.randint(2, 14))))
    texts[7] = texts[30]                        # images 1 and 6 share a caption
    texts[12], texts[55] = "A dog runs.", "a  dog runs"  # images 2 and 11, up to case/period
    texts[100] = texts[101] = texts[160]        # image 20 has one caption twice, image 32 too
    return ids, texts


def _assert_no_duplicates(batches, ids, texts):
    for b in batches:
        assert len({ids[i] for i in b}) == len(b), f"an image repeats in batch {b}"
        assert len({caption_key(texts[i]) for i in b}) == len(b), f"a caption repeats in {b}"


def test_caption_key_ignores_case_spacing_and_final_period():
    assert caption_key("A dog runs.") == caption_key(" a  dog runs ") == "a dog runs"
    assert caption_key("a dog runs") != caption_key("a dog ran")


@pytest.mark.parametrize("bs,drop_last", [(16, True), (16, False), (7, True), (40, True)])
def test_no_duplicates_sampler_properties(bs, drop_last):
    ids, texts = _five_captions()
    s = NoDuplicatesBatchSampler(ids, texts, bs, seed=0, drop_last=drop_last)
    for epoch in range(4):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) > 0  # len() is exact, for every epoch
        _assert_no_duplicates(batches, ids, texts)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)), "a row twice in one epoch"
        if drop_last:
            assert all(len(b) == bs for b in batches)
            assert len(flat) >= len(ids) - 2 * bs  # only the conflicting tail is left out
        else:
            assert sorted(flat) == list(range(len(ids)))  # every row exactly once


def test_no_duplicates_sampler_is_deterministic_and_resumable():
    ids, texts = _five_captions()
    a = NoDuplicatesBatchSampler(ids, texts, 16, seed=1)
    b = NoDuplicatesBatchSampler(ids, texts, 16, seed=1)
    assert list(a) == list(b) == list(a)
    a.set_epoch(3)
    assert list(a) != list(b)
    resumed = NoDuplicatesBatchSampler(ids, texts, 16, seed=1)  # a fresh one re-creates epoch 3
    resumed.set_epoch(3)
    assert list(resumed) == list(a)
    assert list(NoDuplicatesBatchSampler(ids, texts, 16, seed=2)) != list(b)
    ordered = list(NoDuplicatesBatchSampler(ids, texts, 16, shuffle=False))
    _assert_no_duplicates(ordered, ids, texts)
    assert ordered[0] == [5 * k for k in range(16)]  # in order, deferring rows of seen images


def _spread(batches, lengths):
    """Mean within-batch standard deviation of caption lengths."""
    return float(np.mean([np.std([lengths[i] for i in b]) for b in batches]))


def test_no_duplicates_batches_are_not_length_sorted():
    ids, texts = _five_captions()
    lengths = [len(t.split()) for t in texts]
    shuffled = NoDuplicatesBatchSampler(ids, texts, 16, seed=0)
    bucketed = LengthBucketSampler(lengths, 16, seed=0, drop_last=True)
    for epoch in range(3):
        shuffled.set_epoch(epoch)
        bucketed.set_epoch(epoch)
        order = list(range(len(ids)))
        random.Random(epoch).shuffle(order)
        random_batches = [order[i:i + 16] for i in range(0, len(order) - 15, 16)]
        assert _spread(list(shuffled), lengths) > 0.8 * _spread(random_batches, lengths)
        assert _spread(list(bucketed), lengths) < 0.3 * _spread(random_batches, lengths)
        flat = [i for b in shuffled for i in b]  # and the order is a shuffle, not the index order
        assert abs(np.corrcoef(flat, np.arange(len(flat)))[0, 1]) < 0.3


def test_no_duplicates_sampler_rejects_bad_input():
    ids, texts = (x[:20] for x in _five_captions())  # 4 images
    with pytest.raises(ValueError, match="batch_size"):
        NoDuplicatesBatchSampler(ids, texts, 0)
    with pytest.raises(ValueError, match="empty"):
        NoDuplicatesBatchSampler([], [], 4)
    with pytest.raises(ValueError, match=r"20 image ids but 19 texts"):
        NoDuplicatesBatchSampler(ids, texts[:-1], 4)
    with pytest.raises(ValueError, match=r"only 4 distinct images.*batch_size=5"):
        NoDuplicatesBatchSampler(ids, texts, 5, drop_last=True)


def test_distributed_wrapper_shards_no_duplicates_batches():
    from mmlib.distributed import DistributedBatchSampler
    from tests.test_distributed import assert_slices_concatenate

    ids, texts = _five_captions()
    glob = NoDuplicatesBatchSampler(ids, texts, 12, seed=3)
    ranks = [DistributedBatchSampler(NoDuplicatesBatchSampler(ids, texts, 12, seed=3), r, 3)
             for r in range(3)]
    for epoch in (0, 1):
        assert_slices_concatenate(glob, ranks, epoch)


def test_train_config_batch_sampler_is_validated():
    from mmlib.train import TrainConfig

    assert TrainConfig().batch_sampler == "no_duplicates"
    assert TrainConfig(batch_sampler="length_grouped").batch_sampler == "length_grouped"
    with pytest.raises(ValueError, match=r"batch_sampler must be one of .*'no_duplicates'"):
        TrainConfig(batch_sampler="random")


def test_trainer_batches_hold_each_image_once(tmp_path):
    from mmlib.config import EncoderConfig
    from mmlib.train import TrainConfig, Trainer

    enc = EncoderConfig(device="cpu", embed_dim=32, mrl_dims=(8, None), batch_size=32, seed=0)
    cfg = dict(encoder=enc, manifest=str(SYNTHETIC), eval_split=None, max_steps=1,
               output_dir=str(tmp_path), progress=False)
    trainer = Trainer(TrainConfig(**cfg))
    assert isinstance(trainer.sampler, NoDuplicatesBatchSampler)
    ids = trainer.train_set.image_ids
    assert len(set(ids)) < len(ids)  # the committed sample has several captions per image
    batches = list(trainer.sampler)
    _assert_no_duplicates(batches, ids, trainer.train_set.texts)
    assert len(batches) == len(ids) // 32 or len(batches) == len(ids) // 32 - 1
    cfg["output_dir"] = str(tmp_path / "grouped")  # one run per folder: the first holds its lock
    grouped = Trainer(TrainConfig(**cfg, batch_sampler="length_grouped"), encoder=trainer.encoder)
    assert isinstance(grouped.sampler, LengthBucketSampler)
    with pytest.raises(ValueError, match=r"distinct images for batch_size=2000"):
        Trainer(TrainConfig(**{**cfg, "encoder": enc.replace(batch_size=2000),
                               "output_dir": str(tmp_path / "big")}),
                encoder=trainer.encoder)


def test_synthetic_manifest_spec_generates_once_into_the_cache(tmp_path, monkeypatch):
    from mmlib.synthetic import resolve_manifest

    monkeypatch.setenv("MMLIB_CACHE", str(tmp_path))
    assert resolve_manifest("data/x.jsonl") == Path("data/x.jsonl")  # a path stays a path
    ds = ImageTextDataset("synthetic:12:3", split=None)
    path = tmp_path / "synthetic" / "n12-seed3" / "manifest.jsonl"
    assert ds.manifest == path and len(set(ds.image_ids)) == 12
    stamp = path.stat().st_mtime_ns
    assert resolve_manifest("synthetic:12:3") == path and path.stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ValueError, match="at least one image"):
        resolve_manifest("synthetic:0")
