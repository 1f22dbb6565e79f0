import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from mmlib.config import EncoderConfig
from mmlib.presets import build_backbone_config


def test_defaults_validate_and_resolve_dims():
    cfg = EncoderConfig()
    assert cfg.model_path == "tiny" and cfg.temperature == 0.07
    # (256, 512, 1024, 2048, None) with E = 2048: "full" and 2048 are the same dim.
    assert cfg.resolved_mrl_dims() == [256, 512, 1024, 2048]


@pytest.mark.parametrize("dims", [(0, 64), (-8,), (4096,), (64.0,), ()])
def test_bad_mrl_dims_name_the_field(dims):
    with pytest.raises(ValueError, match="mrl_dims"):
        EncoderConfig(mrl_dims=dims, embed_dim=2048)


def test_mrl_dims_sorted_deduplicated_none_is_full():
    assert EncoderConfig(mrl_dims=[64, None, 8, 64], embed_dim=128).resolved_mrl_dims() == [8, 64, 128]


@pytest.mark.parametrize("field,value", [("freeze_backbone", "half"), ("mixed_precision", "fp8"),
                                         ("temperature", 0.0), ("temperature", float("nan")),
                                         ("embed_dim", 0), ("lora_r", -1), ("batch_size", 1.5),
                                         ("attn_implementation", "flash")])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EncoderConfig(**{field: value})


def test_freeze_accepts_booleans():
    assert EncoderConfig(freeze_backbone=True).freeze_backbone == "all"
    assert EncoderConfig(freeze_backbone=False).freeze_backbone == "none"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_load_round_trip(tmp_path, suffix):
    cfg = EncoderConfig(mrl_dims=(64, None), embed_dim=128, use_lora=True, lora_r=4,
                        freeze_backbone="vision", temperature=0.05)
    path = cfg.save(tmp_path / f"cfg{suffix}")
    assert EncoderConfig.load(path) == cfg


def test_unknown_field_is_an_error(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model_path": "tiny", "temprature": 0.1}))
    with pytest.raises(ValueError, match="temprature"):
        EncoderConfig.load(path)


def test_for_model_presets():
    assert EncoderConfig.for_model("3b").model_path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert EncoderConfig.for_model("7b", random_weights=True).model_path == "preset:qwen2.5-vl-7b"
    with pytest.raises(ValueError, match="unknown model preset"):
        EncoderConfig.for_model("13b")


# Published sizes of the released checkpoints (model cards: 3.75 B and 8.29 B parameters).
@pytest.mark.parametrize("preset,published", [("3b", 3.75e9), ("7b", 8.29e9)])
def test_released_presets_have_released_parameter_counts(preset, published):
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(build_backbone_config(preset))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - published) / published < 0.01


def test_preset_configs_are_consistent():
    for name in ("tiny", "3b", "7b", "32b", "72b"):
        cfg = build_backbone_config(name)
        text, vision = cfg.text_config, cfg.vision_config
        head_dim = text.hidden_size // text.num_attention_heads
        # Both mistakes below only surface at forward time with a misleading error.
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2, name
        assert vision.out_hidden_size == text.hidden_size, name
