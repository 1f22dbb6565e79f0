"""Shared fixtures: the tiny model is built once per machine into the repo's cache folder."""

import os
from pathlib import Path

import pytest

# Keep builds inside the checkout (git-ignored) unless the caller chose a cache.
os.environ.setdefault("MMLIB_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "mmlib"))


@pytest.fixture(scope="session")
def tiny_encoder():
    """A fresh tiny encoder in eval mode (tests must not train it in place)."""
    from mmlib import EncoderConfig, MultimodalEncoder

    enc = MultimodalEncoder(EncoderConfig(model_path="tiny", device="cpu"))
    return enc.eval()


@pytest.fixture(scope="session")
def tiny_path():
    """Folder of the cached tiny backbone."""
    from mmlib.tiny import get_tiny_model_path

    return get_tiny_model_path()
