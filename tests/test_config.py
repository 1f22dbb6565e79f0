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


# -- coercion by declared field type (YAML 1.1 reads 3e-4 as a string) ---------------------
def test_yaml_scientific_floats_are_coerced(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 3e-4\nlora_dropout: 1e-1\nmax_grad_norm: 5e-1\n")
    cfg = EncoderConfig.load(path)
    assert (cfg.learning_rate, cfg.lora_dropout, cfg.max_grad_norm) == (3e-4, 0.1, 0.5)
    assert all(type(v) is float for v in (cfg.learning_rate, cfg.lora_dropout, cfg.max_grad_norm))


@pytest.mark.parametrize("text,expected", [("true", True), ("False", False), ("YES", True),
                                           ("no", False), ("1", True), ("0", False)])
def test_bool_strings(text, expected):
    assert EncoderConfig.from_dict({"use_lora": text}).use_lora is expected


@pytest.mark.parametrize("field,value", [("use_lora", "maybe"), ("use_lora", 2),
                                         ("gradient_checkpointing", "off-ish"),
                                         ("batch_size", 2.5), ("batch_size", True),
                                         ("batch_size", "abc"), ("seed", "abc"), ("seed", -1),
                                         ("learning_rate", "fast"), ("learning_rate", True),
                                         ("learning_rate", float("inf")), ("max_length", 8.5),
                                         ("lora_target_modules", 3), ("model_path", 5),
                                         ("extra", [1]), ("device_map", 3), ("device", 0),
                                         ("mrl_dims", "8,16")])
def test_bad_typed_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EncoderConfig.from_dict({field: value})


def test_strings_and_ints_coerced_to_declared_types():
    cfg = EncoderConfig.from_dict({"batch_size": "8", "temperature": 1, "max_length": "null",
                                   "mrl_dims": ["8", None], "embed_dim": "16",
                                   "lora_target_modules": ["q_proj", "v_proj"],
                                   "device_map": {"": "cpu"}, "max_grad_norm": None})
    assert cfg.batch_size == 8 and type(cfg.temperature) is float and cfg.temperature == 1.0
    assert cfg.max_length is None and cfg.mrl_dims == (8, None) and cfg.embed_dim == 16
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.device_map == {"": "cpu"}
    with pytest.raises(ValueError, match=r"lora_target_modules\[1\]"):
        EncoderConfig.from_dict({"lora_target_modules": ["q_proj", 7]})


def test_validation_helper_refuses_bools_and_floats_for_ints():
    from mmlib.validation import ValidationError, require_int

    assert require_int("n", 3, minimum=0) == 3 and require_int("n", None, optional=True) is None
    for bad in (True, 2.5, "3", None):
        with pytest.raises(ValidationError, match="n must be an integer"):
            require_int("n", bad)
    with pytest.raises(ValidationError, match="n must be >= 0, got -1"):
        require_int("n", -1, minimum=0)
    # Both a ValueError and a TypeError, so callers that raised either keep their contract.
    assert issubclass(ValidationError, ValueError) and issubclass(ValidationError, TypeError)


# -- TrainConfig: files, --set overrides, dotted field names -------------------------------
def _train_yaml(tmp_path, text: str):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_train_config_coerces_files_and_overrides(tmp_path):
    from mmlib.train import TrainConfig

    path = _train_yaml(tmp_path, "encoder:\n  learning_rate: 1e-4\n  use_lora: 'false'\n"
                                 "  lora_dropout: 1e-1\nweight_decay: 1e-2\nsymmetric: 'no'\n")
    cfg = TrainConfig.load(path, ["max_steps=50", "encoder.learning_rate=3e-4", "eval_split=null"])
    assert cfg.encoder.learning_rate == 3e-4 and cfg.encoder.lora_dropout == 0.1
    assert cfg.encoder.use_lora is False and cfg.symmetric is False and cfg.weight_decay == 0.01
    assert cfg.max_steps == 50 and cfg.eval_split is None


@pytest.mark.parametrize("text,overrides,name", [
    ("encoder: 5\n", [], "encoder must be a mapping"),
    ("max_steps: 3\n", ["encoder.seed=abc"], "encoder.seed"),
    ("max_steps: 3\n", ["encoder.learning_rate=abc"], "encoder.learning_rate"),
    ("encoder:\n  batch_size: 2.5\n", [], "encoder.batch_size"),
    ("encoder:\n  temprature: 0.1\n", [], "encoder.temprature"),
    ("max_steps: 3\n", ["encoder=5", "encoder.seed=1"], "encoder"),
    ("save_every: abc\n", [], "save_every"),
    ("max_steps: 3\n", ["eval_every=-1"], "eval_every"),
    ("max_steps: 3\n", ["warmup_steps=-2"], "warmup_steps"),
    ("max_steps: 2.5\n", [], "max_steps"),
    ("max_steps: true\n", [], "max_steps"),
    ("max_steps: 3\n", ["log_every=0"], "log_every"),
    ("max_steps: 3\n", ["micro_batch_size=0"], "micro_batch_size"),
    ("max_steps: 3\n", ["weight_decay=-1e-2"], "weight_decay"),
    ("max_steps: 3\n", ["fsdp=perhaps"], "fsdp"),
    ("max_steps: 3\n", ["output_dir="], "output_dir"),
    ("max_steps: 3\n", ["manifest=7"], "manifest"),
    ("max_steps: 3\n", ["resume=''"], "resume"),
])
def test_train_config_bad_values_fail_early_naming_the_field(tmp_path, text, overrides, name):
    from mmlib.train import TrainConfig

    with pytest.raises(ValueError, match=name):
        TrainConfig.load(_train_yaml(tmp_path, text), overrides)


def test_readme_training_command_runs(tmp_path):
    """The README's line, verbatim, on a copy of configs/tiny_mrl.yaml shrunk to run in seconds."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "configs" / "tiny_mrl.yaml").read_text())
    data["encoder"].update(batch_size=8, embed_dim=32, mrl_dims=[8, None], device="cpu")
    # The committed sample, not the 1920-image set the config names (seconds, not a generation).
    data.update(manifest=str(root / "data_samples/synthetic/manifest.jsonl"),
                output_dir=str(tmp_path / "run"),
                eval_every=0, eval_split=None, warmup_steps=1, progress=False)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_mrl.yaml").write_text(yaml.safe_dump(data))
    line = "python -m mmlib.train --config configs/tiny_mrl.yaml --set max_steps=50 encoder.learning_rate=3e-4"
    argv = [sys.executable, *line.split()[1:]]
    argv[argv.index("max_steps=50")] = "max_steps=2"  # the only change: two steps, not fifty
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 2 steps" in proc.stdout
    saved = json.loads((tmp_path / "run" / "final" / "mmlib_config.json").read_text())
    assert saved["learning_rate"] == 3e-4
