"""ptp: exact speculative decoding (PTP, masked-input MTP, MTP heads, prompt lookup) over HF models.

The public API (everything else is internal and may change)::

    import ptp

    model, tokenizer = ptp.load_target("smollm2")  # or a from_pretrained name/path, or a .gguf file
    decoder = ptp.Decoder(model, tokenizer, ptp.make_drafter("auto", model, tokenizer))
    result = decoder.generate("Write a haiku about the sea.", ptp.GenerationConfig(max_new_tokens=64))
    print(result.text)

``load_target(name_or_path, dtype, device)``
    ``(model, tokenizer)``: ``"smollm2"`` (SmolLM2-135M-Instruct), ``"gemma3"``, a ``.gguf``
    file, or any ``from_pretrained`` name or path.
``Decoder(model, tokenizer=None, drafter=None)``
    Exact (speculative) decoding; ``Decoder.generate(prompts, config)`` takes one prompt (text or
    token ids) and returns one ``SequenceResult``, or a list of prompts and returns a list.
``GenerationConfig``
    ``max_new_tokens``, ``sampling``, ``eos_token_ids`` (None: the model's), ``stop_strings``,
    ``chat_template`` (None: the tokenizer's template when it has one), ...
``SamplingConfig(temperature=0, top_k=0, top_p=1, seed=0)``
    Greedy at temperature 0; samples are a pure function of (seed, sequence, position).
``SequenceResult``
    ``new_token_ids``, ``text``, ``finish_reason``, ``target_calls``, ``tokens_per_call``, ...
``make_drafter(name_or_path, model, tokenizer, **options)`` / ``drafter_names()``
    A drafter by registered name (``auto``, ``lookup``, ``ptp``, ...) or checkpoint directory.
``__version__``

The names load on first use, so ``import ptp`` (and the ``ptp`` command's ``--help``) stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "load_target": "ptp.models",
    "Decoder": "ptp.decode.decoder",
    "GenerationConfig": "ptp.decode.decoder",
    "SequenceResult": "ptp.decode.decoder",
    "SamplingConfig": "ptp.decode.sampling",
    "make_drafter": "ptp.drafters",
    "drafter_names": "ptp.drafters",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'ptp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
