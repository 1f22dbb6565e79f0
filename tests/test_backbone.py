"""Loading backbones safely: no remote code, safetensors only, fail fast for unreachable ids."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmlib import EncoderConfig, MultimodalEncoder

ROOT = Path(__file__).resolve().parents[1]

# Imported, this file leaves a marker beside the model (transformers imports a copy from its
# modules cache, so the path is absolute): the proof that a folder's code ran.
EVIL_PY = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import Qwen2_5_VLProcessor
class EvilProcessor(Qwen2_5_VLProcessor):
    pass
"""


def _subprocess_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _evil_copy(tiny_path: Path, dest: Path, file: str) -> Path:
    """The tiny model folder with an `auto_map` naming a custom class in `file`."""
    shutil.copytree(tiny_path, dest)
    (dest / "evil.py").write_text(EVIL_PY.format(marker=str(dest / "RAN")))
    data = json.loads((dest / file).read_text()) if (dest / file).exists() else {}
    data["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
    if file == "processor_config.json":
        data["processor_class"] = "EvilProcessor"
    (dest / file).write_text(json.dumps(data))
    return dest


def test_remote_code_folder_is_refused_even_when_stdin_says_yes(tiny_path, tmp_path):
    folder = _evil_copy(tiny_path, tmp_path / "evil", "processor_config.json")
    script = ("from mmlib import EncoderConfig, MultimodalEncoder\n"
              f"MultimodalEncoder(EncoderConfig(model_path={str(folder)!r}, device='cpu'))\n")
    proc = subprocess.run([sys.executable, "-c", script], input="y\ny\n", capture_output=True,
                          text=True, env=_subprocess_env(HF_HOME=str(tmp_path / "hf")),
                          timeout=120)
    assert not (folder / "RAN").exists(), "the folder's Python file was executed"
    assert proc.returncode != 0
    assert "processor_config.json" in proc.stderr and "auto_map" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("file", ["processor_config.json", "preprocessor_config.json",
                                  "tokenizer_config.json", "config.json"])
def test_auto_map_in_any_config_file_is_refused_before_transformers(tiny_path, tmp_path,
                                                                    monkeypatch, file):
    import mmlib.backbone as backbone

    folder = _evil_copy(tiny_path, tmp_path / "evil", file)

    def never(*args, **kwargs):
        raise AssertionError("transformers was called on an untrusted folder")

    monkeypatch.setattr(backbone.AutoProcessor, "from_pretrained", never)
    monkeypatch.setattr(backbone.Qwen2_5_VLModel, "from_pretrained", never)
    with pytest.raises(ValueError, match=rf"{file}.*auto_map"):
        MultimodalEncoder(EncoderConfig(model_path=str(folder), device="cpu"))
    assert not (folder / "RAN").exists()


def test_transformers_is_told_never_to_trust_remote_code(monkeypatch):
    import mmlib.backbone as backbone

    seen = []
    for cls in (backbone.AutoProcessor, backbone.Qwen2_5_VLModel):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    MultimodalEncoder(EncoderConfig(model_path="tiny", device="cpu", embed_dim=32,
                                    mrl_dims=(8, None)))
    assert seen == [False, False]


class _Marker:
    """Unpickled, this creates a file: the proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_adapter_is_refused_unread(tmp_path):
    enc = MultimodalEncoder(EncoderConfig(device="cpu", embed_dim=32, mrl_dims=(8, None),
                                          use_lora=True, lora_r=4))
    enc.save_pretrained(tmp_path / "enc")
    adapter = tmp_path / "enc" / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Marker(marker)}))
    with pytest.raises(ValueError, match=r"adapter_model\.bin.*safetensors"):
        MultimodalEncoder.from_pretrained(tmp_path / "enc")
    assert not marker.exists()


def test_unreachable_hub_id_fails_fast_naming_the_fix(tmp_path):
    """No network here: the error must come in seconds (it took 141 s of retries), naming the
    id and the ways out. With network, the hub answers 'not found' just as fast."""
    script = ("from mmlib import EncoderConfig, MultimodalEncoder\n"
              "MultimodalEncoder(EncoderConfig(model_path='nobody/not-a-model', device='cpu'))\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, env=_subprocess_env(HF_HOME=str(tmp_path / "hf")))
    assert time.perf_counter() - start < 30
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "nobody/not-a-model" in last and "'tiny'" in last, proc.stderr[-2000:]


def test_hub_id_in_the_local_cache_loads_offline(tiny_path, tmp_path, monkeypatch):
    """Offline, an id whose snapshot is in the Hugging Face cache loads from there."""
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hub" / "models--someone--tiny-vl"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kw = dict(device="cpu", embed_dim=32, mrl_dims=(8, None))
    cached = MultimodalEncoder(EncoderConfig(model_path="someone/tiny-vl", **kw))
    torch.testing.assert_close(cached.encode_texts(["a red circle"]),
                               MultimodalEncoder(EncoderConfig(**kw)).encode_texts(["a red circle"]),
                               atol=0, rtol=0)
    with pytest.raises(OSError, match="someone/other.*HF_HUB_OFFLINE"):
        MultimodalEncoder(EncoderConfig(model_path="someone/other", **kw))


@pytest.mark.parametrize("bf16", [True, False])
def test_half_precision_weights_follow_the_autocast_dtype(monkeypatch, bf16):
    """LoRA / frozen backbones get half-precision weights on CUDA: the autocast dtype the GPU
    supports (fp16 on a V100 / T4, never bf16 under fp16 autocast). No GPU needed: the
    device is only named and the bf16 query is patched."""
    from mmlib.backbone import resolve_amp_dtype, resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda, half = torch.device("cuda"), torch.bfloat16 if bf16 else torch.float16
    for kw in (dict(use_lora=True), dict(freeze_backbone="all")):
        cfg = EncoderConfig(**kw)
        assert resolve_amp_dtype(cfg, cuda) == resolve_dtype(cfg, cuda) == half, kw
        assert resolve_dtype(cfg, torch.device("cpu")) == torch.float32
        off = cfg.replace(mixed_precision="no")  # no autocast: fp32 weights
        assert resolve_amp_dtype(off, cuda) is None and resolve_dtype(off, cuda) == torch.float32
        assert resolve_dtype(cfg.replace(mixed_precision="fp16"), cuda) == torch.float16
    full = EncoderConfig()  # the backbone trains: fp32 master weights, autocast computes
    assert resolve_dtype(full, cuda) == torch.float32 and resolve_amp_dtype(full, cuda) == half
    assert resolve_dtype(EncoderConfig(use_lora=True, dtype="float32"), cuda) == torch.float32
