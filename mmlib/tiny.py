"""A tiny, randomly initialised Qwen2.5-VL built offline.

Real Qwen2.5-VL weights cannot be downloaded everywhere (CI, air-gapped clusters, a
classroom), so the default model is the real architecture at toy size: the same
`Qwen2_5_VLModel` class (vision tower, patch merger, M-RoPE), the same processor and chat
template, and a byte-level BPE tokenizer trained here with the Qwen special tokens. It is
written with `save_pretrained` and read back with `from_pretrained`, so every code path a
real checkpoint takes is exercised. The same seed always gives identical weights.

    python -m mmlib.tiny PATH        # build into PATH
    get_tiny_model_path()            # build once into the cache folder, then reuse it
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLModel,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from mmlib.hf_utils import quiet_hf
from mmlib.presets import build_backbone_config

TINY_SEED = 0
TINY_VOCAB_SIZE = 512
# Bump when the tiny recipe changes, so cached builds of an older recipe are rebuilt.
TINY_VERSION = 2

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template (the one shipped with Qwen2.5-VL-*-Instruct).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small, fixed corpus for the tokenizer: the words of the synthetic scenes and photo
# captions plus everyday English, so common words become single tokens.
_WORDS = """
a an the of on in at to and with next near above below left right top bottom center middle
corner small large big tiny huge semicircle red green blue yellow orange purple pink brown black white
gray grey cyan magenta circle square triangle star cross diamond hexagon ring heart shape
shapes object objects scene image photo picture background noise dark light bright
person astronaut cat coffee cup rocket camera man woman dog horse moon space suit flag
sitting standing holding looking street building sky cloud grass tree water beach city
what is this there are one two three four five many some it its beside under over behind
""".split()
_SENTENCES = [
    "a large red circle on the left next to a small blue square",
    "a small green triangle at the top on a noisy background",
    "a photo of an astronaut in a white space suit with a flag",
    "a cup of coffee on a saucer seen from above",
    "a cat with green eyes looking at the camera",
    "a rocket standing on the launch pad under a blue sky",
    "a man holding a camera on a tripod in a field",
    "What is shown in this picture? There are two objects in the scene.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
]


def _train_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the Qwen special tokens, trained on the fixed corpus above."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _SENTENCES * 20 + [" ".join(_WORDS)] * 20 + [f" {w}" for w in _WORDS] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=4096,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>",
                              "vision_eos_token": "<|vision_end|>"},
    )


def build_tiny_processor(max_pixels: int | None = 224 * 224) -> Qwen2_5_VLProcessor:
    """The real Qwen2.5-VL processor around the locally trained tokenizer.

    Each merged 28x28 block of an image becomes one token; the tiny model caps images at
    224x224 (64 tokens) to stay fast on CPU. `max_pixels=None` keeps Qwen's own limit.
    """
    tokenizer = _train_tokenizer()
    limits = {"min_pixels": 56 * 56} | ({"max_pixels": max_pixels} if max_pixels else {})
    image_processor = Qwen2VLImageProcessor(**limits)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(path: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Build the tiny model and its processor into `path` with `save_pretrained`."""
    path = Path(path)
    processor = build_tiny_processor()
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("bos_token_id", "<|endoftext|>"), ("eos_token_id", "<|im_end|>"),
        ("pad_token_id", "<|endoftext|>")]}
    config = build_backbone_config("tiny", vocab_size=len(tok), **ids)
    # Seeded init on CPU in fp32 makes the weights bit-identical across builds.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLModel(config)
    path.mkdir(parents=True, exist_ok=True)
    with quiet_hf():
        model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    (path / "mmlib_tiny.json").write_text(json.dumps({"seed": seed, "version": TINY_VERSION}))
    return path


def default_cache_dir() -> Path:
    """Where `model_path="tiny"` is built: $MMLIB_CACHE or ~/.cache/mmlib."""
    env = os.environ.get("MMLIB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mmlib"


def get_tiny_model_path(seed: int = TINY_SEED, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached tiny model for `seed`, building it first if it is missing or stale."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"tiny-qwen2.5-vl-seed{seed}"
    stamp = path / "mmlib_tiny.json"
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()) == {"seed": seed, "version": TINY_VERSION}:
                return path
        except json.JSONDecodeError:
            pass
    # Build into a temporary folder and rename, so a crash never leaves half a model.
    tmp = root / f".{path.name}.tmp-{os.getpid()}"
    build_tiny_model(tmp, seed=seed)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def main() -> None:
    """CLI: build the tiny model into a folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", help="output folder (default: the mmlib cache)")
    parser.add_argument("--seed", type=int, default=TINY_SEED)
    args = parser.parse_args()
    start = time.perf_counter()
    path = build_tiny_model(args.path, args.seed) if args.path else get_tiny_model_path(args.seed)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"tiny Qwen2.5-VL built in {time.perf_counter() - start:.1f} s: {path} "
          f"({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
