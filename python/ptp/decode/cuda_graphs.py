"""CUDA graphs for the decoding calls: draft trees padded to a few fixed bucket sizes, each bucket's
target call captured once and replayed.

A decoding call of a small model on a GPU is launch-bound: SmolLM2-135M's 30 layers are ~400 kernel
launches, each ~5-10 us of Python and driver work, against ~2 us of GPU work per kernel. A CUDA
graph replays the whole call with one launch. A graph fixes every shape and address, so:

* **Buckets.** A call's rows are ``N1`` tree nodes (root included) and ``A`` drafter aux rows; the
  call runs in the graph of bucket ``(N1b, Ab)``, the smallest ``N1b >= N1`` of
  :data:`NODE_BUCKETS` and ``Ab >= A`` of :data:`AUX_BUCKETS` (``Ab = 0`` when there are no aux
  rows). A call beyond the largest bucket runs eagerly (uncaptured), with the same result.
* **Padding** (:func:`pad_call`). Tree rows ``N1 .. N1b-1`` are padding nodes: token 0, position
  ``cache_lens[b]``, and a mask row that sees only itself (and the committed prefix). Aux rows move
  from ``N1`` to ``N1b`` (the LoRA gate's suffix is then the same for every call of the bucket) and
  padding aux rows see only themselves. No real row sees a padding row, so the real rows' logits
  are those of the unpadded call: bitwise on the CPU with the row-invariant linears
  (``tests/test_cuda_graphs.py``). On the GPU the kernels a bucket's rows run through (cuBLAS
  tiles, tree attention's key splits) depend on the bucket, not on the real rows; a token's
  logits can differ by rounding between buckets, as they do between unpadded calls of different
  sizes.
* **Static buffers.** Every bucket owns its input buffers (ids, positions, cache lengths, mask,
  aux embeddings); a replay copies the step's padded inputs into them. The KV cache is the
  graph's too: it must not move, so the decoder allocates it once at its full capacity plus the
  largest bucket (padding rows write their keys at ``cache_lens[b] + N1 ..``, positions the
  attention never reads as context) and reuses it across ``generate`` calls of the same shape.
  The write positions come from the device (:meth:`ptp.decode.cache.RowCache.set_write_index`),
  never from host integers baked into the graph.
* **Capture** is lazy: the first call of a bucket runs it once eagerly on a side stream (the
  warm-up: cuBLAS handles, kernel attributes; its K/V writes are the real ones), captures it, then
  replays it. Graphs share one memory pool (they never run concurrently). A drafter's adapter
  context (gated LoRA on the aux rows) is entered around capture and replay alike.
* **Compaction** of the accepted path in the KV cache (:meth:`GraphRunner.compact`) is captured per
  node bucket too, over all ``N1b`` columns (the padding of ``accepted_nodes`` copies in place),
  so it needs no host value.

Exactness. Replays are bitwise reproducible (the same kernels on the same inputs), so a decode
is reproducible run to run. Across buckets it is not bitwise: in float32 a token's logits
move by ~1e-6 with the bucket (cuBLAS tiles, attention key splits), as between unpadded calls of
different sizes, and speculative decoding emits plain decoding's tokens unless a greedy top-2 gap
or a sampled uniform falls within that rounding (none on the 13 dev prompts is the expectation
``benchmarks/gpu_e2e.sh`` checks). In bfloat16 the same holds with ~1e-2 instead of ~1e-6: tokens
stay identical only where the argmax gap exceeds bf16 rounding (true of the tests' tiny model,
not guaranteed on real text); each step's verification is still exact for the logits its call
computed. Bitwise plain = speculative needs the row-invariant CPU path.

The prefill stays outside graphs (its length changes every prompt). :class:`GraphRunner` with
``capture=False`` runs the padded calls eagerly: the CPU-testable path that the tests compare with
the unpadded calls.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ptp.decode.draft import AuxRows

__all__ = ["NODE_BUCKETS", "AUX_BUCKETS", "pick_bucket", "PaddedCall", "pad_call", "GraphRunner",
           "tree_mask_and_depth_closure", "cache_slack", "rounded_capacity"]

# Tree rows per call (root included): chains of 1-16 nodes, the PTP and lookup trees (17 or 65
# rows with the root) and the trees with merged lookup paths (<= 193 rows at --max-draft-nodes
# 192). Steps of ~1.25-1.5x: padding costs at most a third of a call's rows, and the number of
# graphs (one per bucket pair used) stays in the tens.
NODE_BUCKETS: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 72, 96, 128, 160, 192, 256)
# Aux rows per call: 0 (none), then groups of k = 4 or 8 slot rows after up to ~200 nodes.
AUX_BUCKETS: tuple[int, ...] = (0, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512,
                                640, 768, 1024, 1280, 1536, 1792, 2048, 2560)


def pick_bucket(n: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket ``>= n``, or None when ``n`` exceeds the largest."""
    if n < 0:
        raise ValueError(f"row count must be >= 0, got {n}")
    for b in buckets:
        if b >= n:
            return int(b)
    return None


def cache_slack(max_nodes: int, max_aux: int, node_buckets: Sequence[int] = NODE_BUCKETS,
                aux_buckets: Sequence[int] = AUX_BUCKETS) -> int:
    """KV positions a padded call can write beyond its real rows' room: the largest bucket the
    decoder may use (calls past the largest buckets run eagerly and need none)."""
    n1b = pick_bucket(max_nodes, node_buckets) or 0
    ab = (pick_bucket(max_aux, aux_buckets) or 0) if max_aux > 0 else 0
    return n1b + ab


def rounded_capacity(needed: int, minimum: int = 1024) -> int:
    """A KV capacity ``>= needed``: the next power of two (at least ``minimum``), so that prompts of
    different lengths reuse one cache, and with it the captured graphs."""
    cap = max(int(minimum), 1)
    while cap < needed:
        cap *= 2
    return cap


def tree_mask_and_depth_closure(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as :func:`ptp.decode.decoder.tree_mask_and_depth`, in ``ceil(log2(N+1))``
    batched boolean products (pointer doubling on the ancestor relation) instead of a loop over
    the nodes: a handful of launches on a GPU instead of ~7 per node."""
    B, N1 = parents.shape
    dev = parents.device
    eye = torch.eye(N1, dtype=torch.bool, device=dev).expand(B, N1, N1)
    valid = (parents >= 0) & (torch.arange(N1, device=dev) > 0)
    up = torch.zeros(B, N1, N1, dtype=torch.float32, device=dev)
    up.scatter_(2, parents.clamp_min(0).unsqueeze(-1), valid.unsqueeze(-1).float())
    reach = eye | (up > 0)  # ancestor-or-self within distance 1
    span = 1
    while span < N1:  # after each squaring: within distance 2 * span
        reach = reach | (torch.bmm(reach.float(), reach.float()) > 0)
        span *= 2
    depth = reach.sum(-1) - 1
    return reach.contiguous(), depth.long()


@dataclass
class PaddedCall:
    """A decoding call's inputs padded to bucket ``(N1b, Ab)``; ``num_nodes`` / ``num_aux`` are the
    real counts (tree rows ``[:num_nodes]``, aux rows ``[N1b:N1b + num_aux]``)."""

    input_ids: torch.Tensor  # [B, N1b] int64
    position_ids: torch.Tensor  # [B, N1b + Ab] int64
    tree_mask: torch.Tensor  # [B, N1b + Ab, N1b + Ab] bool
    aux_embeds: Optional[torch.Tensor]  # [B, Ab, hidden] or None when Ab == 0
    num_nodes: int
    num_aux: int

    @property
    def bucket(self) -> tuple[int, int]:
        return self.input_ids.shape[1], 0 if self.aux_embeds is None else self.aux_embeds.shape[1]


def pad_call(input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: Optional[torch.Tensor],
             cache_lens: torch.Tensor, aux: Optional[AuxRows], n1b: int, ab: int) -> PaddedCall:
    """Pad one call (``input_ids [B, N1]``, ``position_ids [B, N1 + A]``, ``tree_mask [B, T, T]`` or
    None = causal, ``aux`` with A rows) to ``N1b`` tree rows and ``Ab`` aux rows.

    Padding rows see only themselves (and, in the attention, the committed prefix) and no real row
    sees them; aux rows are moved to start at ``N1b``.
    """
    B, N1 = input_ids.shape
    A = aux.num_rows if aux is not None else 0
    T = N1 + A
    if n1b < N1:
        raise ValueError(f"node bucket {n1b} is smaller than the call's {N1} tree rows")
    if ab < A or (A > 0 and ab == 0):
        raise ValueError(f"aux bucket {ab} is smaller than the call's {A} aux rows")
    if position_ids.shape != (B, T):
        raise ValueError(f"position_ids must be [B, N1 + A] = [{B}, {T}], got {list(position_ids.shape)}")
    dev = input_ids.device
    Tb = n1b + ab
    ids = torch.zeros(B, n1b, dtype=input_ids.dtype, device=dev)
    ids[:, :N1] = input_ids
    pos = cache_lens.view(B, 1).to(position_ids.dtype).expand(B, Tb).clone()
    pos[:, :N1] = position_ids[:, :N1]
    pos[:, n1b:n1b + A] = position_ids[:, N1:]
    mask = torch.eye(Tb, dtype=torch.bool, device=dev).repeat(B, 1, 1)
    if tree_mask is None:
        if A:
            raise ValueError("aux rows need an explicit tree_mask")
        mask[:, :N1, :N1] = torch.ones(N1, N1, dtype=torch.bool, device=dev).tril()
    else:
        if tree_mask.dim() == 2:
            tree_mask = tree_mask.unsqueeze(0).expand(B, T, T)
        if tree_mask.shape != (B, T, T):
            raise ValueError(f"tree_mask must be [B, T, T] = [{B}, {T}, {T}], got {list(tree_mask.shape)}")
        mask[:, :N1, :N1] = tree_mask[:, :N1, :N1]
        if A:
            mask[:, n1b:n1b + A, :N1] = tree_mask[:, N1:, :N1]
            mask[:, n1b:n1b + A, n1b:n1b + A] = tree_mask[:, N1:, N1:]
    emb = None
    if ab:
        emb = torch.zeros(B, ab, aux.embeds.shape[-1], dtype=aux.embeds.dtype, device=dev)
        emb[:, :A] = aux.embeds.to(dev)
    return PaddedCall(ids, pos, mask, emb, N1, A)


class _Bucket:
    """One bucket's static buffers, graph and outputs."""

    __slots__ = ("ids", "pos", "lens", "mask", "emb", "rows", "graph", "logits", "hidden")

    def __init__(self, B: int, n1b: int, ab: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device):
        Tb = n1b + ab
        self.ids = torch.zeros(B, n1b, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, Tb, dtype=torch.long, device=device)
        self.lens = torch.zeros(B, dtype=torch.long, device=device)
        self.mask = torch.eye(Tb, dtype=torch.bool, device=device).repeat(B, 1, 1)
        self.emb = torch.zeros(B, ab, hidden_size, dtype=dtype, device=device) if ab else None
        self.rows = None  # [B, Tb] bool: the aux rows (the drafter's adapter context)
        if ab:
            self.rows = torch.zeros(B, Tb, dtype=torch.bool, device=device)
            self.rows[:, n1b:] = True
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None
        self.hidden: Optional[torch.Tensor] = None


class GraphRunner:
    """Runs a decoder's decoding calls padded to buckets, in captured CUDA graphs.

    Parameters
    ----------
    fast : ptp.decode.fastpath.FastForward
        The target's direct layer loop (graphs need it: the HF forward does host work per call).
    cache : ptp.decode.cache.RowCache
        The KV cache the graphs write; allocated at its full capacity (it must not grow or move).
    aux_context : callable
        ``aux_context(rows [B, T] bool)`` -> context manager enabling the drafter's adapter on the
        aux rows (``Drafter.aux_context``).
    capture : bool
        Capture and replay CUDA graphs (CUDA only); False runs the padded calls eagerly.
    linears : ptp.decode.linear.LinearRouter, optional
        Row-invariant linears for eager CPU calls (None on the GPU).
    """

    def __init__(self, fast, cache, aux_context: Callable, capture: bool, linears=None,
                 node_buckets: Sequence[int] = NODE_BUCKETS, aux_buckets: Sequence[int] = AUX_BUCKETS):
        if list(node_buckets) != sorted(set(node_buckets)) or node_buckets[0] < 1:
            raise ValueError(f"node_buckets must be increasing and >= 1, got {list(node_buckets)}")
        if list(aux_buckets) != sorted(set(aux_buckets)) or aux_buckets[0] != 0:
            raise ValueError(f"aux_buckets must be increasing and start at 0, got {list(aux_buckets)}")
        self.fast = fast
        self.cache = cache
        self.aux_context = aux_context
        self.capture = bool(capture)
        self.linears = linears
        self.node_buckets = tuple(int(b) for b in node_buckets)
        self.aux_buckets = tuple(int(b) for b in aux_buckets)
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        self._compact: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self._buffers: Optional[int] = None
        self.replays = 0  # statistics: calls served by a graph (or a padded eager call)
        self.eager_calls = 0  # calls too large for the buckets
        self.captures = 0
        self.rows = 0  # real rows (tree + aux) of every call
        self.bucket_rows = 0  # rows computed (the buckets' rows; eager calls: their own)

    def stats(self) -> dict:
        """The counters: calls (graph replays and eager), captures, real and computed rows."""
        return {"replays": self.replays, "eager_calls": self.eager_calls, "captures": self.captures,
                "rows": self.rows, "bucket_rows": self.bucket_rows}

    # -- bookkeeping ---------------------------------------------------------------------------
    def bucket_for(self, num_nodes: int, num_aux: int) -> Optional[tuple[int, int]]:
        """``(N1b, Ab)`` of a call, or None when it exceeds the largest buckets."""
        n1b = pick_bucket(num_nodes, self.node_buckets)
        ab = pick_bucket(num_aux, self.aux_buckets) if num_aux > 0 else 0
        if n1b is None or ab is None:
            return None
        return n1b, ab

    def graph_for(self, batch_size: int, n1b: int, ab: int) -> Optional[torch.cuda.CUDAGraph]:
        """The captured graph of bucket ``(n1b, ab)`` at ``batch_size`` rows (benchmarks replay it
        alone), or None before its first call."""
        b = self._buckets.get((batch_size, n1b, ab))
        return b.graph if b is not None else None

    def _check_buffers(self) -> None:
        """Drop every graph when the cache's buffers moved (rows dropped from the batch)."""
        layer = self.cache.layers[0]
        ptr = layer.keys.data_ptr() if getattr(layer, "is_initialized", False) else None
        if ptr != self._buffers:
            self._buckets.clear()
            self._compact.clear()
            self._buffers = ptr

    def fits(self, cache_lens_max: int, num_rows: int) -> bool:
        """Whether a padded call of ``num_rows`` rows at the largest root index fits the cache."""
        return cache_lens_max + num_rows <= self.cache.allocated

    def _adapter(self, b: _Bucket):
        """The drafter's adapter context for the bucket's aux rows. Entered outside a capture: it
        reads the mask on the host (a sync, not allowed while capturing); the graph keeps what
        the adapter does on those rows."""
        return self.aux_context(b.rows) if b.rows is not None else contextlib.nullcontext()

    def _run_padded(self, b: _Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded call on the bucket's buffers (what a graph captures), inside _adapter(b)."""
        n1b = b.ids.shape[1]
        self.cache.set_write_index(b.lens, b.pos.shape[1])
        h = self.fast.embed(b.ids)
        if b.emb is not None:
            h = torch.cat([h, b.emb], dim=1)
        hidden = self.fast(h, b.pos, self.cache, b.lens, b.mask, self.linears)
        logits = self.fast.logits(hidden[:, :n1b], self.linears)
        return logits, hidden

    # -- the call ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_lens: torch.Tensor,
                tree_mask: Optional[torch.Tensor], aux: Optional[AuxRows], host_max_len: int
                ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(logits [B, N1, V], hidden [B, N1 + A, H])`` of the call, or None when it needs no
        bucket's graph (too large for the buckets or the cache's slack: the caller runs it eagerly).

        The logits are a view of the bucket's static output when B == 1 (a copy otherwise),
        valid until the next call of the runner; the hidden states are a copy.
        """
        B, N1 = input_ids.shape
        A = aux.num_rows if aux is not None else 0
        key = self.bucket_for(N1, A)
        self.rows += N1 + A
        if key is None or not self.fits(host_max_len, key[0] + key[1]):
            self.eager_calls += 1
            self.bucket_rows += N1 + A
            return None
        self.bucket_rows += key[0] + key[1]
        self._check_buffers()
        n1b, ab = key
        p = pad_call(input_ids, position_ids, tree_mask, cache_lens, aux, n1b, ab)
        b = self._buckets.get((B, n1b, ab))
        new = b is None
        if new:
            b = _Bucket(B, n1b, ab, self.fast.embed.weight.shape[1], self.fast.embed.weight.dtype,
                        input_ids.device)
            self._buckets[(B, n1b, ab)] = b
        b.ids.copy_(p.input_ids, non_blocking=True)
        b.pos.copy_(p.position_ids, non_blocking=True)
        b.lens.copy_(cache_lens, non_blocking=True)
        b.mask.copy_(p.tree_mask, non_blocking=True)
        if b.emb is not None:
            b.emb.copy_(p.aux_embeds, non_blocking=True)
        self.replays += 1
        if not self.capture:
            with self._adapter(b):
                b.logits, b.hidden = self._run_padded(b)
        elif new:
            try:
                self._capture(b)
            except BaseException:
                del self._buckets[(B, n1b, ab)]  # no half-made bucket left behind
                raise
            b.graph.replay()
        else:
            b.graph.replay()
        logits = b.logits[:, :N1].contiguous()  # a view when B == 1 (verify needs it contiguous)
        if A:
            hidden = torch.cat([b.hidden[:, :N1], b.hidden[:, n1b:n1b + A]], dim=1)
        else:
            hidden = b.hidden[:, :N1].clone()  # a drafter may keep it past the next replay
        return logits, hidden

    def _capture(self, b: _Bucket) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with self._adapter(b):
            with torch.cuda.stream(stream):
                self._run_padded(b)  # warm-up (cuBLAS handles, kernel attributes, lazy inits)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                b.logits, b.hidden = self._run_padded(b)
        b.graph = graph
        self.captures += 1

    # -- compaction ----------------------------------------------------------------------------
    def compact(self, cache_lens: torch.Tensor, accepted_nodes: torch.Tensor) -> None:
        """:meth:`RowCache.compact` over all ``N1`` columns of ``accepted_nodes`` (padding copies in
        place), replayed from a graph per node bucket: no host value needed."""
        B, N1 = accepted_nodes.shape
        n1b = pick_bucket(N1, self.node_buckets)
        if not self.capture or n1b is None:
            self.cache.compact(cache_lens, accepted_nodes, N1)
            return
        self._check_buffers()
        key = (B, n1b)
        entry = self._compact.get(key)
        if entry is None:
            lens = torch.zeros(B, dtype=torch.long, device=cache_lens.device)
            nodes = torch.full((B, n1b), -1, dtype=torch.long, device=cache_lens.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: -1 everywhere copies every position in place
                self.cache.compact(lens, nodes, n1b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                self.cache.compact(lens, nodes, n1b)
            entry = (graph, lens, nodes)
            self._compact[key] = entry
            self.captures += 1
        graph, lens, nodes = entry
        lens.copy_(cache_lens)
        nodes[:, :N1].copy_(accepted_nodes)
        nodes[:, N1:] = -1
        graph.replay()
