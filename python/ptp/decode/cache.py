"""A static KV cache whose batch rows have their own lengths, with tree rollback.

Layout per layer: transformers' ``StaticCache`` buffers ``[B, H_kv, S_max, D]``. HF's StaticCache
writes every row at the same position; here the decoder sets, before each forward, where each
row's new tokens go (``cache_lens[b] + i``, i = index of the node in the flattened draft tree), and
every layer's ``update`` scatters there. Positions ``>= cache_lens[b]`` hold stale or padding data
that the attention op never reads (a query sees ``< cache_lens[b]`` plus its own tree).

After verification only the accepted path stays: :meth:`RowCache.compact` moves the accepted
nodes' K/V from ``cache_lens[b] + node`` to ``cache_lens[b] + i`` (one gather + one scatter per
layer and tensor; nothing is recomputed). :meth:`RowCache.select_rows` drops finished rows.

Growth: the buffers start at ``initial_len`` positions and double (copying the rows; at most
``log2(max_cache_len / initial_len)`` times in a run) when a forward needs more, up to
``max_cache_len``. The attention reads only positions ``< cache_lens[b] + T``, and the CPU op
splits the key range in fixed chunks, so the buffer length changes no result; a long
``max_new_tokens`` no longer allocates (and zeroes, and masks over) its whole worst case up front.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, StaticLayer

__all__ = ["RowCache"]


class _RowLayer(StaticLayer):
    """One layer's buffers; writes go where the owning :class:`RowCache` says."""

    def __init__(self, max_cache_len: int, batch_size: int):
        super().__init__(max_cache_len=max_cache_len)
        self.expected_batch = batch_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H = key_states.shape[:2]
        self.keys = torch.zeros(B, H, self.max_cache_len, key_states.shape[-1], dtype=self.dtype,
                                device=self.device)
        self.values = torch.zeros(B, H, self.max_cache_len, value_states.shape[-1],
                                  dtype=self.dtype, device=self.device)
        self.is_initialized = True

    @torch.no_grad()
    def grow(self, new_len: int) -> None:
        """Reallocate the buffers with ``new_len`` positions, keeping the current ones."""
        if self.is_initialized:
            for name in ("keys", "values"):
                old = getattr(self, name)
                buf = old.new_zeros(*old.shape[:2], new_len, old.shape[-1])
                buf[:, :, :old.shape[2]].copy_(old)
                setattr(self, name, buf)
        self.max_cache_len = new_len

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor,
              start: Optional[int], index: Optional[torch.Tensor]):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[2]
        if start is not None:  # every row writes at the same offset: a slice copy
            self.keys[:, :, start:start + T].copy_(key_states)
            self.values[:, :, start:start + T].copy_(value_states)
        else:
            self.keys.scatter_(2, index.expand_as(key_states), key_states)
            self.values.scatter_(2, index.expand(*value_states.shape), value_states)
        return self.keys, self.values


class RowCache(Cache):
    """KV cache for ``batch_size`` rows of at most ``max_cache_len`` tokens each; the buffers
    hold ``initial_len`` positions (default: all of them) and double on demand."""

    def __init__(self, num_layers: int, batch_size: int, max_cache_len: int,
                 initial_len: Optional[int] = None):
        initial = max_cache_len if initial_len is None else min(int(initial_len), max_cache_len)
        if initial < 1:
            raise ValueError(f"initial_len must be >= 1, got {initial_len}")
        super().__init__(layers=[_RowLayer(initial, batch_size) for _ in range(num_layers)])
        # Not ``self.max_cache_len``: some transformers releases make that a read-only property.
        self.capacity = max_cache_len
        self.allocated = initial  # positions the buffers hold now (<= capacity)
        self._start: Optional[int] = 0
        self._index: Optional[torch.Tensor] = None

    def reserve(self, length: int) -> None:
        """Make the buffers hold at least ``length`` positions (doubling, capped at capacity)."""
        if length > self.capacity:
            raise ValueError(f"KV cache overflow: {length} positions > max_cache_len {self.capacity}")
        if length <= self.allocated:
            return
        new_len = min(self.capacity, max(length, 2 * self.allocated))
        for layer in self.layers:
            layer.grow(new_len)
        self.allocated = new_len

    def set_write_positions(self, cache_lens: torch.Tensor, host_lens: list[int],
                            num_new: int) -> None:
        """The next forward writes row b's T new tokens at ``cache_lens[b] .. + T - 1``."""
        if max(host_lens) + num_new > self.capacity:
            raise ValueError(f"KV cache overflow: {max(host_lens)} cached + {num_new} new tokens > "
                             f"max_cache_len {self.capacity}")
        self.reserve(max(host_lens) + num_new)
        if min(host_lens) == max(host_lens):
            self._start, self._index = host_lens[0], None
        else:
            pos = cache_lens.view(-1, 1) + torch.arange(num_new, device=cache_lens.device)
            self._start, self._index = None, pos.view(-1, 1, num_new, 1)

    def set_write_index(self, cache_lens: torch.Tensor, num_new: int) -> None:
        """As :meth:`set_write_positions`, from the device lengths alone (no host value, no growth:
        the caller checked the room): the writes of a captured CUDA graph
        (:mod:`ptp.decode.cuda_graphs`), whose replays must not bake in a host offset."""
        pos = cache_lens.view(-1, 1) + torch.arange(num_new, device=cache_lens.device)
        self._start, self._index = None, pos.view(-1, 1, num_new, 1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].write(key_states, value_states, self._start, self._index)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("RowCache rows have their own lengths: pass position_ids")

    @torch.no_grad()
    def compact(self, cache_lens: torch.Tensor, accepted_nodes: torch.Tensor,
                width: int) -> None:
        """Move accepted tree nodes into place.

        ``accepted_nodes [B, N+1]``: node ids of the accepted path (root 0 first), -1 padded;
        only the first ``width`` columns (max accepted path length + 1) are touched. Node
        ``accepted_nodes[b, i]`` (stored at ``cache_lens[b] + node``) moves to ``cache_lens[b] + i``.
        """
        nodes = accepted_nodes[:, :width]
        i = torch.arange(width, device=nodes.device)
        src = cache_lens.view(-1, 1) + torch.where(nodes >= 0, nodes, i)  # pads copy onto themselves
        dst = (cache_lens.view(-1, 1) + i).expand_as(src)
        for layer in self.layers:
            for buf in (layer.keys, layer.values):
                B, H, _, D = buf.shape
                s = src.view(B, 1, width, 1).expand(B, H, width, D)
                moved = buf.gather(2, s)  # a copy: source and destination may overlap
                buf.scatter_(2, dst.reshape(B, 1, width, 1).expand(B, H, width, D), moved)

    @torch.no_grad()
    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows ``keep`` (int64 indices), in that order."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys = layer.keys.index_select(0, keep)
                layer.values = layer.values.index_select(0, keep)
