"""Attention of HF models through ``ptp_ext.ops.tree_attention``, registered as the transformers
attention implementation ``"ptp"`` (no forked modeling code).

The decoder passes extra keyword arguments to the model's forward, which transformers hands on
to every attention call:

* ``ptp_cache_lens`` ``[B]`` int64: committed tokens per row before the new ones;
* ``ptp_tree_mask`` ``[B, T, T]`` bool or None (None = causal among the new tokens);
* ``ptp_prefill`` bool: the first call of a batch (every ``cache_lens`` 0, causal), which runs
  on SDPA over the first T cache slots instead;
* ``ptp_window`` a :class:`WindowPlan` or None: the positions of the call's tokens, for the
  layers with a sliding window (transformers passes each layer's ``sliding_window``).

With :class:`ptp.decode.cache.RowCache` the key / value arguments are the full static buffers
``[B, H_kv, S_max, D]`` with the new tokens already written at ``cache_lens[b] + i``.

Sliding windows (Mistral, Qwen2 with ``use_sliding_window``, Gemma 2/3's local layers): a query
at position p sees the keys at positions ``> p - window`` (transformers' rule). The op has no
window argument, so a call whose queries reach past the window runs the op on *views* of the
cache that start at each query's first visible key, grouped by that start (:class:`WindowPlan`):

* a chain node (it sees exactly the nodes before it, at consecutive positions) runs as a 1-token
  call over ``[p + 1 - window, p]``, the drafted nodes before it read as committed keys: the very
  call plain decoding makes for that token;
* any other query (tree nodes, drafter aux rows) runs in a call over the prefix of the new tokens
  up to it, its tree mask cut to the keys within the window, its view starting at the window's
  first committed key (or at the first new token when the window starts inside the tree).

Either way a query's keys fall in the key blocks of plain decoding's call for its token, starting
at the same key, so the CPU op's row invariance carries over: chains and trees give bitwise the
logits of plain decoding past the window too (``tests/test_decoder_exact.py``). A call whose
queries all sit within the window is the one plain call, as without a window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ptp_ext import ops

__all__ = ["ATTN_IMPLEMENTATION", "register", "ptp_attention", "WindowPlan", "tree_attention",
           "layer_windows"]

ATTN_IMPLEMENTATION = "ptp"


@dataclass
class _Call:
    """One op call of a windowed layer: queries ``q_lo:q_hi`` of row ``b`` over the cache view
    ``[key_lo, key_hi)`` with ``cache_len`` committed keys; outputs ``keep`` go to ``rows``."""
    b: int
    q_lo: int
    q_hi: int
    key_lo: int
    key_hi: int
    cache_len: torch.Tensor  # [1]
    mask: Optional[torch.Tensor]  # [1, q_hi - q_lo, q_hi - q_lo] bool, None = causal
    rows: torch.Tensor  # query indices in the call's row
    keep: torch.Tensor  # the same queries' indices in the op's output


class WindowPlan:
    """The positions of one decoding call's tokens and, per window size, the op calls that apply
    the window (computed on first use, on the host; one device sync per decoding call).

    ``positions [B, T]`` (token i of row b sits at ``positions[b, i]``; committed key j at j),
    ``cache_lens [B]``, ``tree_mask [B, T, T]`` bool or None (causal). ``model_window`` is the
    model config's window, for the check that every attention layer reports its own.
    """

    def __init__(self, positions: torch.Tensor, cache_lens: torch.Tensor,
                 tree_mask: Optional[torch.Tensor], model_window: Optional[int] = None):
        self.positions, self.cache_lens, self.tree_mask = positions, cache_lens, tree_mask
        self.model_window = model_window
        self._host = None
        self._calls: dict[int, Optional[list[_Call]]] = {}

    def _host_data(self):
        if self._host is None:
            pos = self.positions.detach().cpu()
            mask = self.tree_mask.detach().cpu() if self.tree_mask is not None else None
            self._host = (pos.tolist(), self.cache_lens.detach().cpu().tolist(), mask,
                          int(pos.max()) if pos.numel() else -1)
        return self._host

    def exceeds(self, window: Optional[int]) -> bool:
        """Whether some query of the call sees fewer keys with ``window`` than without."""
        return window is not None and self._host_data()[3] >= window

    def calls(self, window: int) -> Optional[list[_Call]]:
        """The op calls of a layer with ``window``, or None when no query reaches past it."""
        if window not in self._calls:
            self._calls[window] = self._plan(int(window)) if self.exceeds(window) else None
        return self._calls[window]

    def _plan(self, window: int) -> list[_Call]:
        if window < 1:
            raise ValueError(f"sliding window must be >= 1, got {window}")
        pos, lens, mask, _ = self._host_data()
        dev = self.positions.device
        calls = []
        for b, (p, L) in enumerate(zip(pos, lens)):
            T = len(p)
            groups: dict[int, list[int]] = {}  # first visible position -> queries
            for i, pi in enumerate(p):
                groups.setdefault(max(0, pi + 1 - window), []).append(i)
            for lo, members in groups.items():
                i = members[-1]
                if len(members) == 1 and self._is_chain_node(p, L, mask, b, i):
                    # plain decoding's call for this token: the nodes before it read as committed
                    calls.append(_Call(b, i, i + 1, lo, L + i + 1, torch.tensor([L + i - lo], device=dev),
                                       None, torch.tensor([i], device=dev), torch.tensor([0], device=dev)))
                    continue
                m = i + 1  # members ascend: the prefix of the new tokens up to the last one
                start = min(lo, L)
                mk = mask[b, :m, :m].clone() if mask is not None else None
                if lo > L:
                    # the window starts inside the tree (deeper than the window): new tokens
                    # before its first position are out of sight (committed ones are cut by the
                    # view's start)
                    if mk is None:
                        mk = torch.ones(m, m, dtype=torch.bool).tril()
                    mk &= (torch.tensor(p[:m]) >= lo).view(1, m)
                idx = torch.tensor(members, device=dev)
                calls.append(_Call(b, 0, m, start, L + m, torch.tensor([L - start], device=dev),
                                   mk.unsqueeze(0).to(dev) if mk is not None else None, idx, idx))
        return calls

    @staticmethod
    def _is_chain_node(p: list[int], L: int, mask, b: int, i: int) -> bool:
        """Node i sees exactly nodes 0..i, which sit at positions L..L+i (plain decoding's view)."""
        if any(p[j] != L + j for j in range(i + 1)):
            return False
        if mask is None:
            return True
        row = mask[b, i]
        return bool(row[:i + 1].all()) and not bool(row[i + 1:].any())


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   cache_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], scale: Optional[float],
                   window: Optional[int] = None, plan: Optional[WindowPlan] = None) -> torch.Tensor:
    """``ops.tree_attention`` (query ``[B, T, H_q, D]`` -> ``[B, T, H_q, D]``) with a layer's
    sliding ``window`` applied by ``plan`` (module docstring); ``window`` None: full attention."""
    calls = plan.calls(window) if (plan is not None and window is not None) else None
    if calls is None:
        return ops.tree_attention(query, key, value, cache_lens, tree_mask, scale=scale)
    out = torch.empty_like(query)
    for c in calls:
        k = key[c.b:c.b + 1, :, c.key_lo:c.key_hi]
        v = value[c.b:c.b + 1, :, c.key_lo:c.key_hi]
        # a view of the cache: contiguous as it is for one KV head, copied otherwise
        k = k if k.is_contiguous() else k.contiguous()
        v = v if v.is_contiguous() else v.contiguous()
        o = ops.tree_attention(query[c.b:c.b + 1, c.q_lo:c.q_hi], k, v, c.cache_len, c.mask,
                               scale=scale)
        out[c.b].index_copy_(0, c.rows, o[0].index_select(0, c.keep))
    return out


def layer_windows(config) -> list[Optional[int]]:
    """Each layer's sliding window (None: full attention), as transformers' attention modules
    pass it: ``layer_types`` where the config has them, else the config's ``sliding_window``."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    n = config.num_hidden_layers
    if types is None:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types[:n]]


def _prefill_mask(T: int, window: Optional[int], device) -> Optional[torch.Tensor]:
    if window is None or T <= window:
        return None
    i = torch.arange(T, device=device)
    d = i.view(T, 1) - i.view(1, T)
    return (d >= 0) & (d < window)


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
    ptp_window: Optional[WindowPlan] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention signature: query ``[B, H_q, T, D]`` -> output ``[B, T, H_q, D]``."""
    if getattr(module, "attn_logit_softcapping", None) or kwargs.get("softcap"):
        raise ValueError(f"the 'ptp' attention has no attention-logit softcapping "
                         f"({type(module).__name__}): use 'sdpa' or 'eager' for this model")
    if "sliding_window" in kwargs:
        window = kwargs["sliding_window"]
    elif ptp_window is not None and ptp_window.exceeds(ptp_window.model_window):
        raise ValueError(f"{type(module).__name__} does not pass its sliding window to the attention, "
                         f"and the sequence reaches past the model's ({ptp_window.model_window})")
    else:
        window = None
    T = query.shape[2]
    if ptp_prefill:
        # Every row starts at 0: plain causal attention over the first T slots (rows are right
        # padded; a real token never sees a pad to its right), within the window if any.
        mask = _prefill_mask(T, window, query.device)
        out = F.scaled_dot_product_attention(query, key[:, :, :T], value[:, :, :T], attn_mask=mask,
                                             is_causal=mask is None, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if ptp_cache_lens is None:
        raise ValueError("the 'ptp' attention implementation is driven by ptp.decode.decoder: it needs "
                         "ptp_cache_lens (and a ptp.decode.cache.RowCache); use 'sdpa' for other callers")
    out = tree_attention(query.transpose(1, 2).contiguous(), key, value, ptp_cache_lens, ptp_tree_mask,
                         scaling, window, ptp_window)
    return out, None


def register() -> str:
    """Register ``"ptp"`` with transformers (idempotent); returns the implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, ptp_attention)
    return ATTN_IMPLEMENTATION
