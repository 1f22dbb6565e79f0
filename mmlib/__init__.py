"""mmlib: multimodal (image + text) embeddings on Qwen2.5-VL with Matryoshka Representation Learning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmlib.config import EncoderConfig
    from mmlib.encoder import MultimodalEncoder

__all__ = ["EncoderConfig", "MultimodalEncoder"]
__version__ = "0.1.0"

# Imported on first use (PEP 562), not with the package: `python -m mmlib.tiny` (or any other
# module run with -m) would otherwise find itself already imported through the encoder.
_LAZY = {"EncoderConfig": "mmlib.config", "MultimodalEncoder": "mmlib.encoder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmlib' has no attribute {name!r}")
