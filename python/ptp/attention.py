"""Attention of HF models through ``ptp_ext.ops.tree_attention``, registered as the transformers
attention implementation ``"ptp"`` (no forked modeling code).

The decoder passes two extra keyword arguments to the model's forward, which transformers hands on
to every attention call:

* ``ptp_cache_lens`` ``[B]`` int64: committed tokens per row before the new ones;
* ``ptp_tree_mask`` ``[B, T, T]`` bool or None (None = causal among the new tokens);
* ``ptp_prefill`` bool: the first call of a batch (every ``cache_lens`` 0, causal), which runs
  on SDPA over the first T cache slots instead.

With :class:`ptp.cache.RowCache` the key / value arguments are the full static buffers
``[B, H_kv, S_max, D]`` with the new tokens already written at ``cache_lens[b] + i``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ptp_ext import ops

__all__ = ["ATTN_IMPLEMENTATION", "register", "ptp_attention"]

ATTN_IMPLEMENTATION = "ptp"


def ptp_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    ptp_cache_lens: Optional[torch.Tensor] = None,
    ptp_tree_mask: Optional[torch.Tensor] = None,
    ptp_prefill: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention signature: query ``[B, H_q, T, D]`` -> output ``[B, T, H_q, D]``."""
    T = query.shape[2]
    if ptp_prefill:
        # Every row starts at 0: plain causal attention over the first T slots (rows are right
        # padded; a real token never sees a pad to its right).
        out = F.scaled_dot_product_attention(query, key[:, :, :T], value[:, :, :T], is_causal=True,
                                             scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if ptp_cache_lens is None:
        raise ValueError("the 'ptp' attention implementation is driven by ptp.decoder: it needs "
                         "ptp_cache_lens (and a ptp.cache.RowCache); use 'sdpa' for other callers")
    out = ops.tree_attention(query.transpose(1, 2).contiguous(), key, value, ptp_cache_lens,
                             ptp_tree_mask, scale=scaling)
    return out, None


def register() -> str:
    """Register ``"ptp"`` with transformers (idempotent); returns the implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, ptp_attention)
    return ATTN_IMPLEMENTATION
