"""Prompts in, for :meth:`ptp.decode.decoder.Decoder.generate`: text -> token ids (the tokenizer's
chat template for instruct models), checks that fail before the model runs (token ids outside the
vocabulary, a prompt plus ``max_new_tokens`` beyond the model's context), and the model's default
end-of-sequence tokens.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

__all__ = ["Prompt", "chat_prompt_ids", "encode_text", "default_eos_token_ids", "split_prompts",
           "prompt_token_ids", "check_context"]

# A prompt: text (tokenized by the Decoder's tokenizer) or token ids (a list of ints, 1-D tensor).
Prompt = Union[str, Sequence[int], torch.Tensor]


def chat_prompt_ids(tokenizer, user_message: str) -> list[int]:
    """The user message wrapped in the tokenizer's chat template, as token ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_text(tokenizer, text: str, chat_template: Optional[bool] = None) -> list[int]:
    """Token ids of a text prompt: wrapped as a user message in the tokenizer's chat template
    (``chat_template`` True, or None and the tokenizer has a template: instruct models), else
    tokenized as it is (with the special tokens the tokenizer adds, e.g. BOS)."""
    if tokenizer is None:
        raise ValueError("text prompts need the Decoder's tokenizer (Decoder(model, tokenizer, "
                         "drafter)); or pass token ids")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        chat_template = has_template
    if chat_template:
        if not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        return chat_prompt_ids(tokenizer, text)
    return list(tokenizer(text)["input_ids"])


def default_eos_token_ids(model, tokenizer=None) -> tuple[int, ...]:
    """The model's end-of-sequence tokens: ``model.generation_config.eos_token_id`` (an int or a
    list) and the tokenizer's ``eos_token_id``, sorted, without duplicates."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(sorted(set(int(i) for i in ids)))


def split_prompts(prompts) -> tuple[bool, list]:
    """``(single, batch)``: one prompt (a ``str``, a sequence of ints, a 1-D tensor) becomes a
    batch of one; a list of prompts (or a 2-D tensor) is the batch itself."""
    if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1):
        return True, [prompts]
    batch = list(prompts)
    if batch and (isinstance(batch[0], numbers.Number)
                  or isinstance(batch[0], torch.Tensor) and batch[0].dim() == 0):
        return True, [batch]  # a sequence of numbers: one prompt (prompt_token_ids checks them)
    return False, batch


def prompt_token_ids(index: int, prompt, vocab_size: int) -> list[int]:
    """Token ids (a sequence of ints or a 1-D integer tensor) as a list, each in
    ``[0, vocab_size)``; a clear ``ValueError`` naming prompt ``index`` otherwise."""
    ids = prompt if isinstance(prompt, torch.Tensor) else torch.as_tensor(list(prompt))
    if ids.numel() and (ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex):
        raise ValueError(f"prompt {index}: token ids must be integers, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"prompt {index}: token ids must be one sequence, got shape {list(ids.shape)}")
    ids = ids.tolist()
    bad = [(j, t) for j, t in enumerate(ids) if not 0 <= t < vocab_size]
    if bad:
        j, t = bad[0]
        raise ValueError(f"prompt {index}: token id {t} at position {j} is outside the model's "
                         f"vocabulary [0, {vocab_size}) ({len(bad)} such ids)")
    return ids


def check_context(prompt_lengths: Sequence[int], max_new_tokens: int, max_positions: Optional[int],
                  labels: Optional[Sequence[str]] = None) -> None:
    """Raise ``ValueError`` when a prompt plus ``max_new_tokens`` exceeds ``max_positions`` (the
    model's ``max_position_embeddings``; None: no limit); ``labels`` name the prompts in the
    message (default ``prompt 0``, ``prompt 1``, ...)."""
    if max_positions is None:
        return
    for i, n in enumerate(prompt_lengths):
        if n + max_new_tokens > max_positions:
            label = labels[i] if labels is not None else f"prompt {i}"
            raise ValueError(f"{label} has {n} tokens + max_new_tokens {max_new_tokens} = "
                             f"{n + max_new_tokens}, more than the model's max_position_embeddings "
                             f"{max_positions}: shorten the prompt or lower max_new_tokens")
