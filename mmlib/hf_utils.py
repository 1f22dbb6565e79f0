"""Keeping Hugging Face libraries quiet where their output is noise (notebooks, logs)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Hide transformers' per-file progress bars and peft's call of a deprecated API."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # peft still calls transformers' deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                    category=FutureWarning)
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
