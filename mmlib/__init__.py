"""mmlib: multimodal (image + text) embeddings on Qwen2.5-VL with Matryoshka Representation Learning."""

from mmlib.config import EncoderConfig
from mmlib.encoder import MultimodalEncoder

__all__ = ["EncoderConfig", "MultimodalEncoder"]
__version__ = "0.1.0"
