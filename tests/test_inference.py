"""Fast inference (`encode` batching, single tokenization, compile) and `mmlib.inference`."""

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmlib import EncoderConfig, MultimodalEncoder
from mmlib.inference import (
    _ascii_length_bounds_tokens,
    _batches,
    _image_cost,
    _InputPlan,
    encode_to_disk,
    iter_embeddings,
    load_embeddings,
    read_index,
)
from mmlib.processing import build_inputs

WORDS = "a the red green blue circle square cat dog photo on left of small large sky".split()
ODD_TEXTS = ["", "a red circle", " leading space", "\nnew line first", "café 東京 ünïcode",
             "ends with <|im_end|> token", "  two  spaces  ", "punctuation!? first"]


def texts_of_mixed_length(n: int, seed: int = 0, low: int = 1, high: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def noise_image(seed: int, w: int = 56, h: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def one_by_one(enc, texts=None, images=None) -> torch.Tensor:
    n = len(texts if texts is not None else images)
    return torch.cat([enc.encode(texts=[texts[i]] if texts is not None else None,
                                 images=[images[i]] if images is not None else None)
                      for i in range(n)])


# -- tokenized once, same inputs as the processor -------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [512, 6, None])
def test_cached_text_batches_equal_processor_batches(tiny_encoder, side, max_length):
    tok = tiny_encoder.processor.tokenizer
    old = tok.padding_side
    tok.padding_side = side
    try:
        texts = ODD_TEXTS + texts_of_mixed_length(6, seed=1)
        stub = SimpleNamespace(processor=tiny_encoder.processor,
                               config=tiny_encoder.config.replace(max_length=max_length))
        plan = _InputPlan(stub, texts, None)
        idx = [3, 0, 9, 1, 13, 5, 4, 2, 6, 7]
        got = plan.batch(idx)
        want = build_inputs(tiny_encoder.processor, [texts[i] for i in idx], max_length=max_length)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
        assert plan.costs == [int(m.sum()) for m in plan.batch(range(len(texts)))["attention_mask"]]
    finally:
        tok.padding_side = old


def test_texts_are_tokenized_once_per_call(tiny_encoder, monkeypatch):
    """One batched tokenizer call for all prompts (plus one for the texts that may need
    truncation), never one per batch or per text."""
    tok = tiny_encoder.processor.tokenizer
    calls = []
    original = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__",
                        lambda self, *a, **k: calls.append(len(a[0])) or original(self, *a, **k))
    texts = texts_of_mixed_length(20, seed=2)
    tiny_encoder.encode_texts(texts, batch_size=4)
    assert calls == [20]  # short ASCII texts cannot exceed max_length: no truncation pass
    calls.clear()
    tiny_encoder.encode_texts(texts + ["blue " * 200, "é" * 5], batch_size=4)
    assert calls == [2, 22]  # the long one and the non-ASCII one are checked on their own


def test_ascii_length_bounds_token_count(tiny_encoder):
    tok = tiny_encoder.processor.tokenizer
    assert _ascii_length_bounds_tokens(tok)
    rng = random.Random(0)
    chars = [chr(c) for c in range(128)]
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    texts += ["<|im_end|>", " " * 9, "\n\n\n", "a" * 50]
    for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"], strict=True):
        assert len(ids) <= len(text) + 1, text


def test_image_cost_is_the_exact_token_count(tiny_encoder):
    proc = tiny_encoder.processor
    for w, h in [(56, 56), (300, 200), (50, 40), (1000, 1000), (96, 320)]:
        batch = build_inputs(proc, images=[noise_image(0, w, h)])
        tokens = int((batch["input_ids"] == proc.image_token_id).sum())
        assert _image_cost(noise_image(0, w, h), proc) == tokens, (w, h)
    assert _image_cost(None, proc) == 0


# -- batching --------------------------------------------------------------------------------
def test_token_budget_batches():
    rng = random.Random(0)
    costs = [rng.randint(1, 50) for _ in range(200)]
    order = sorted(range(200), key=costs.__getitem__)
    batches = list(_batches(order, None, costs, max_tokens=120))
    assert [i for b in batches for i in b] == order  # every input once, order kept
    for b in batches:
        assert len(b) * max(costs[i] for i in b) <= 120 or len(b) == 1
    # Short inputs share big batches, long ones small batches.
    assert len(batches[0]) > 3 * len(batches[-1])
    capped = list(_batches(order, 8, costs, max_tokens=120))
    assert max(len(b) for b in capped) <= 8
    assert list(_batches([0, 1, 2], None, [500, 1, 1], max_tokens=10)) == [[0], [1, 2]]
    assert list(_batches(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]


def test_encode_with_token_budget_and_prefetch_matches_one_by_one(tiny_encoder):
    texts = texts_of_mixed_length(24, seed=3)
    expected = one_by_one(tiny_encoder, texts)
    calls = []
    got = tiny_encoder.encode_texts(texts, max_tokens=200, callback=calls.append)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert sum(calls) == len(texts) and len(calls) > 1
    torch.testing.assert_close(tiny_encoder.encode_texts(texts, batch_size=5, prefetch=True),
                               expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_encoder.encode_texts(texts, max_tokens=0)


def test_default_batches_are_a_budget_of_batch_size_longest_inputs(tiny_encoder):
    """Default: no batch pads to more tokens than `batch_size` rows of the longest input (the
    memory of fixed-size batches), yet short inputs share larger batches; order is kept."""
    texts = texts_of_mixed_length(40, seed=5, low=1, high=30)
    shapes = []
    hook = tiny_encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        got = tiny_encoder.encode_texts(texts, batch_size=4)
    finally:
        hook.remove()
    longest = int(tiny_encoder.tokenize(texts)["attention_mask"].sum(1).max())
    assert sum(rows for rows, _ in shapes) == len(texts)
    assert all(rows * width <= 4 * longest for rows, width in shapes)
    assert max(rows for rows, _ in shapes) > 4  # short texts: more rows than batch_size
    assert shapes[-1][1] == longest
    torch.testing.assert_close(got, one_by_one(tiny_encoder, texts), atol=1e-5, rtol=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            tiny_encoder.encode_texts(texts, batch_size=bad)


def test_mixed_images_and_texts_with_token_budget(tiny_encoder, tmp_path):
    path = tmp_path / "img.png"
    noise_image(9, 84, 112).save(path)
    images = [noise_image(1, 112, 84), None, str(path), noise_image(2), noise_image(3, 168, 56)]
    texts = ["a cat", "only text here", None, "small", texts_of_mixed_length(1, high=30)[0]]
    expected = one_by_one(tiny_encoder, texts, images)
    got = tiny_encoder.encode(texts=texts, images=images, max_tokens=120, prefetch=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="input 1"):
        tiny_encoder.encode(texts=["ok", 3])


# -- torch.compile -----------------------------------------------------------------------------
def test_compile_flag_is_wired(monkeypatch):
    """`extra["compile"]` compiles the language model in place at the first encode, and encode
    then runs it (the real compile is slow on CPU: stubbed here, run by the test below)."""
    compiled = []

    def fake_compile(module, *args, **kwargs):
        compiled.append((type(module).__name__, kwargs))
        inner = module._call_impl

        def call(*a, **k):
            compiled.append("call")
            return inner(*a, **k)

        module._compiled_call_impl = call

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    enc = MultimodalEncoder(EncoderConfig(device="cpu", extra={"compile": True}))
    names = list(enc.state_dict())
    emb = enc.encode_texts(["a red circle", "a cat"])
    assert compiled[0] == ("Qwen2_5_VLTextModel", {"dynamic": True})
    assert "call" in compiled and enc._is_compiled()
    assert list(enc.state_dict()) == names  # parameter names (and save/load) unchanged
    enc.compile_for_inference()  # idempotent
    assert sum(isinstance(c, tuple) for c in compiled) == 1
    assert emb.shape == (2, enc.embed_dim)


@pytest.mark.skipif(os.environ.get("MMLIB_TEST_COMPILE") != "1" or not hasattr(torch, "compile"),
                    reason="real torch.compile: ~15 s on 2 idle CPU cores, 40 s under load; MMLIB_TEST_COMPILE=1")
def test_compiled_encoder_matches_eager():
    texts = texts_of_mixed_length(40, seed=4)
    enc = MultimodalEncoder(EncoderConfig(device="cpu"))
    eager = enc.encode_texts(texts, batch_size=8)
    enc.compile_for_inference()
    torch.testing.assert_close(enc.encode_texts(texts, batch_size=8), eager, atol=1e-5, rtol=0)
    assert enc._is_compiled()


# -- encode_to_disk ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_encode_to_disk_equals_encode_and_resumes(tiny_encoder, tmp_path, fmt, monkeypatch):
    texts = texts_of_mixed_length(23, seed=5)
    out = encode_to_disk(tiny_encoder, texts=texts, out_dir=tmp_path / "emb", chunk_size=10,
                         format=fmt, dim=32, show_progress=False)
    expected = tiny_encoder.encode_texts(texts, dim=32)
    got = load_embeddings(out)
    assert got.shape == (23, 32) and got.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(np.array(got)), expected, atol=1e-5, rtol=0)
    index = read_index(out)
    assert index["count"] == 23 and index["dim"] == 32 and index["dtype"] == "float32"
    assert [c["file"] for c in index["chunks"]] == [f"embeddings-0000{k}.{fmt}" for k in range(3)]
    assert [c["count"] for c in index["chunks"]] == [10, 10, 3]
    assert index["model_config"]["model_path"] == "tiny" and index["complete"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json"] + [c["file"] for c in index["chunks"]])  # no temporary files left

    # Resume: delete the middle chunk; only it is encoded again.
    (out / index["chunks"][1]["file"]).unlink()
    seen = []
    original = tiny_encoder.encode
    monkeypatch.setattr(tiny_encoder, "encode",
                        lambda **kw: seen.append(len(kw["texts"])) or original(**kw))
    encode_to_disk(tiny_encoder, texts=texts, out_dir=out, chunk_size=10, format=fmt, dim=32,
                   show_progress=False)
    assert seen == [10]
    torch.testing.assert_close(torch.from_numpy(np.array(load_embeddings(out, mmap=False))),
                               expected, atol=1e-5, rtol=0)
    assert [s for s, _ in iter_embeddings(out)] == [0, 10, 20]

    # A different corpus in the same folder is refused, not mixed in.
    with pytest.raises(ValueError, match="different job"):
        encode_to_disk(tiny_encoder, texts=texts[:-1] + ["changed"], out_dir=out, chunk_size=10,
                       format=fmt, dim=32, show_progress=False)


def test_encode_to_disk_images_float16_and_errors(tiny_encoder, tmp_path):
    images = [noise_image(i, 56 + 28 * (i % 3), 56) for i in range(5)]
    out = encode_to_disk(tiny_encoder, images=images, out_dir=tmp_path / "img", chunk_size=2,
                         format="npy", dtype="float16", show_progress=False)
    got = load_embeddings(out)
    assert got.dtype == np.float16 and got.shape == (5, tiny_encoder.embed_dim)
    torch.testing.assert_close(torch.from_numpy(got.astype(np.float32)),
                               tiny_encoder.encode_images(images), atol=2e-3, rtol=0)
    single = encode_to_disk(tiny_encoder, images=images[:2], out_dir=tmp_path / "one",
                            format="npy", show_progress=False)
    assert isinstance(load_embeddings(single), np.memmap)  # one npy chunk: the map itself

    # An interrupted job (index written, not complete) cannot be loaded by mistake.
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        load_embeddings(out)
    with pytest.raises(ValueError, match="format"):
        encode_to_disk(tiny_encoder, texts=["a"], out_dir=tmp_path / "x", format="csv")
    with pytest.raises(ValueError, match="empty"):
        encode_to_disk(tiny_encoder, texts=[], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="dim"):
        encode_to_disk(tiny_encoder, texts=["a"], out_dir=tmp_path / "x", dim=10**6)
    assert not (tmp_path / "x").exists()  # nothing written before the inputs are checked


@pytest.mark.parametrize("nudged", ["projection.fc2.bias", "backbone", "buffer"])
def test_encode_to_disk_resume_refuses_other_weights(tiny_encoder, tmp_path, monkeypatch, nudged):
    """Interrupted after 2 chunks by model A: resuming with model B (same config, one weight
    or buffer moved by 1e-3) is refused; resuming with A finishes equal to an uninterrupted run."""
    import copy

    texts = texts_of_mixed_length(25, seed=6)
    kw = dict(texts=texts, chunk_size=10, show_progress=False)
    whole = load_embeddings(encode_to_disk(tiny_encoder, out_dir=tmp_path / "whole", **kw))
    out = tmp_path / "part"
    original, calls = tiny_encoder.encode, []

    def interrupted(**kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(**kwargs)

    monkeypatch.setattr(tiny_encoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_to_disk(tiny_encoder, out_dir=out, **kw)
    monkeypatch.delattr(tiny_encoder, "encode")
    written = {p.name: p.read_bytes() for p in out.glob("embeddings-*")}
    assert sorted(written) == ["embeddings-00000.safetensors", "embeddings-00001.safetensors"]

    other = copy.deepcopy(tiny_encoder)
    name = {"backbone": [n for n, _ in other.named_parameters() if n.startswith("backbone.")][-1],
            "buffer": next(n for n, _ in other.named_buffers())}.get(nudged, nudged)
    with torch.no_grad():
        dict([*other.named_parameters(), *other.named_buffers()])[name].view(-1)[0] += 1e-3
    assert other.config.to_dict() == tiny_encoder.config.to_dict()
    with pytest.raises(ValueError, match=rf"{out.name}.*different weights.*out_dir"):
        encode_to_disk(other, out_dir=out, **kw)
    assert {p.name: p.read_bytes() for p in out.glob("embeddings-*")} == written  # nothing mixed in

    encode_to_disk(tiny_encoder, out_dir=out, **kw)
    assert np.array_equal(load_embeddings(out), whole)
    assert read_index(out)["weights_sha256"] == read_index(tmp_path / "whole")["weights_sha256"]
