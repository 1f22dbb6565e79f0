import json

import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

from mmlib.tiny import SPECIAL_TOKENS, build_tiny_model


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_file(build_tiny_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(build_tiny_model(tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_loads_through_from_pretrained_with_real_architecture(tiny_path):
    model = Qwen2_5_VLModel.from_pretrained(tiny_path)
    processor = AutoProcessor.from_pretrained(tiny_path)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert hasattr(model, "visual") and hasattr(model.visual, "merger")
    tok = processor.tokenizer
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok.tokenize(t)) == 1
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")


def test_chat_template_renders_image_placeholder(tiny_path):
    processor = AutoProcessor.from_pretrained(tiny_path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    s = processor.apply_chat_template(msgs, tokenize=False)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in s


def test_cache_stamp_records_seed(tiny_path):
    assert json.loads((tiny_path / "mmlib_tiny.json").read_text())["seed"] == 0


def test_released_checkpoint_layout_loads_into_the_encoder(tmp_path, tiny_path):
    """Released checkpoints are saved as ...ForConditionalGeneration; the encoder must load
    their backbone weights unchanged (and drop the LM head)."""
    from mmlib import EncoderConfig, MultimodalEncoder

    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_path)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.01)  # differ from the tiny weights, so a silent fallback would show
    full.save_pretrained(tmp_path / "released")
    AutoProcessor.from_pretrained(tiny_path).save_pretrained(tmp_path / "released")
    enc = MultimodalEncoder(EncoderConfig(model_path=str(tmp_path / "released"), embed_dim=64,
                                          mrl_dims=(None,)))
    ref = dict(full.model.named_parameters())
    got = dict(enc.qwen.named_parameters())
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_python_m_mmlib_tiny_prints_no_runtime_warning():
    """`python -m mmlib.tiny` must not find mmlib.tiny already imported by the package."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mmlib.tiny", "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "always"})
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr, out.stderr
