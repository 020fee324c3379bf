"""A decoding call's whole layer stack in one op: ``ptp_ext.ops.decode_step`` over a model's weights.

The direct layer loop of :mod:`ptp.decode.fastpath` still makes ~40 op calls per layer (norms,
rotary, projections, cache writes, attention, residuals), each a dispatcher call and, for the
big ones, a fork/join of the thread pool: on a 2-core CPU SmolLM2-135M's decoding step spent
most of its ~18 ms there, against ~4 ms of weight streaming. ``decode_step`` runs the same layers
(RMSNorm, projections over the GGUF blocks or float32 weights, rotary, KV-cache write, tree
attention, SiLU-gated MLP, residuals, final norm) in one OpenMP region, calling the kernels of
``quant_linear`` / ``invariant_linear`` / ``tree_attention`` directly.

:class:`NativeStep` packs a :class:`~ptp.decode.fastpath.FastForward`'s weights once (the float32
tensors as they are; the GGUF blocks copied into one huge-page mapping, Q4_1 with float32 scales
when few threads run) and runs the op. It is exact in the sense the decoder needs (every row's
output bitwise independent of the call's other rows: plain and speculative decoding give
identical tokens) but not bitwise the HF forward (its norms and elementwise ops round
differently, at float32 rounding level). The decoder uses it for every decoding call of a CPU
model whose structure it supports (``GenerationConfig.native_step``; the prefill keeps the HF
forward), including calls with a gated-LoRA adapter on the aux rows (the self-speculative
drafters), so all decoding calls of a run go through the same arithmetic.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from ptp_ext import ops

from ptp.decode.linear import LinearPlan

__all__ = ["NativeStep", "native_step_for", "huge_page_copies", "SPLIT_Q4_1_MAX_THREADS"]

# NativeStep re-lays Q4_1 with float32 scales (ops.q4_1_split) when torch runs at most this many
# threads: on the 2-core EPYC dev VM SmolLM2's 1- and 2-row calls ran 0.4-5.7 % faster with it
# (interleaved A/B in one process, 128-900-token contexts, three rounds, every ratio >= 1; with
# the huge-page copies too, four rounds: -2 to +3.5 %, median +2 %). More cores share the memory
# channels, and 20 % more bytes would cost more than the ops they save.
SPLIT_Q4_1_MAX_THREADS = 4


def huge_page_copies(tensors: list[torch.Tensor]):
    """``(mapping, copies)``: copies of the CPU ``tensors`` in one anonymous mapping, each
    64-byte aligned, the first at a 2 MiB boundary, the mapping advised for transparent huge
    pages: streamed through 2 MiB pages instead of 4 KiB ones, they need 512x fewer address
    translations (Linux's default THP mode, ``madvise``, backs only advised regions; elsewhere the
    advice is a no-op; SmolLM2's calls on the 2-core dev VM: -1 to +4 %, interleaved A/B).
    ``(None, tensors)`` when there is nothing to copy or the platform has no ``madvise``. Keep
    ``mapping`` alive as long as the copies."""
    import mmap

    if not tensors or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None, list(tensors)
    sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]
    align = 2 << 20
    total = (sum(sizes) + 2 * align - 1) // align * align
    m = mmap.mmap(-1, total)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    off = (-buf.data_ptr()) % align
    try:
        m.madvise(mmap.MADV_HUGEPAGE)  # before the pages are touched
    except OSError:
        pass  # no THP in this kernel: ordinary pages
    copies = []
    for t, size in zip(tensors, sizes):
        n = t.numel() * t.element_size()
        c = buf[off:off + n].view(t.dtype).view(t.shape)
        c.copy_(t)
        copies.append(c)
        off += size
    return m, copies

# model (its embedding module) -> (key, NativeStep): native_step_for's packings
_PACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
_FORMATS = {None: 0, "q4_1": 1, "q8_0": 2}
_SILU = {"SiLU", "SiLUActivation"}  # torch's module and transformers' (ACT2FN["silu"])


def _unsupported(fast) -> Optional[str]:
    """Why ``fast``'s model cannot run through ``decode_step`` (None: it can)."""
    layers = fast.layers
    if not layers:
        return "the model has no layers"
    norms = [fast.norm] + [m for L in layers for m in (L.ln1, L.ln2)]
    for n in norms:
        if type(n).__name__ not in _NORMS:
            return f"norm {type(n).__name__} is not a Llama-style RMSNorm"
        w = getattr(n, "weight", None)
        if w is None or w.dtype != torch.float32 or w.device.type != "cpu":
            return "norm weights must be float32 on the CPU"
    eps = {float(n.variance_epsilon) for n in norms}
    if len(eps) != 1:
        return f"the norms use different epsilons {sorted(eps)}"
    if len({(L.head_dim, L.scaling) for L in layers}) != 1:
        return "the layers differ in head_dim or attention scaling"
    for L in layers:
        extra = [getattr(L, n, None) for n in ("q_norm", "k_norm", "post_attn", "post_ff", "rope", "window")]
        if any(e is not None for e in extra):
            return "the layers have q/k norms, extra norms, typed rotaries or a sliding window (Gemma 3)"
        if L.act is not F.silu and type(L.act).__name__ not in _SILU:
            return f"activation {L.act!r} is not SiLU"
        for p in (L.q, L.k, L.v, L.o, L.gate, L.up, L.down):
            if p.linear is None:
                return f"projection {type(p.module).__name__} is not an nn.Linear (or a gated LoRA over one)"
            w = p.linear.weight
            if w.device.type != "cpu" or (p.qweight is None and w.dtype != torch.float32):
                return "projection weights must be float32 (or GGUF blocks) on the CPU"
            if p.lora and (p.module.lora_A.dtype != torch.float32 or p.module.lora_B.dtype != torch.float32):
                return "LoRA adapters must be float32"
    return None


class NativeStep:
    """``hidden = step(h, position_ids, cache, cache_lens, tree_mask)``: the final normed hidden
    states of a decoding call through ``ptp_ext.ops.decode_step``, or None when this call needs
    the Python loop (a LoRA gate whose aux rows are not a suffix of every batch row)."""

    def __init__(self, fast, split_q4_1: Optional[bool] = None, huge_pages: bool = True):
        reason = _unsupported(fast)
        if reason is not None:
            raise ValueError(f"decode_step cannot run this model: {reason}")
        self.rotary = fast.rotary
        # rope types whose cos / sin at a position never change (dynamic / longrope rescale with
        # the sequence), with head_dim a multiple of 32 (ATen's float cos / sin then take no
        # scalar tail, whose results can differ from the vector path's by an ulp)
        head_dim = int(fast.layers[0].head_dim)
        self._static_rope = (getattr(self.rotary, "rope_type", "default") in ("default", "linear", "llama3")
                             and hasattr(self.rotary, "inv_freq") and head_dim % 32 == 0)
        self._rope_table = None  # (key, cos [n, head_dim], sin [n, head_dim])
        self.eps = float(fast.norm.variance_epsilon)
        self.scale = float(fast.layers[0].scaling)
        plans: list[LinearPlan] = [p for L in fast.layers for p in (L.q, L.k, L.v, L.o, L.gate, L.up, L.down)]
        self.plans = plans
        # With few threads a 1-row Q4_1 matvec is bound by the cores' shuffle pipes, not DRAM:
        # there the blocks are re-laid with float32 scales (ops.q4_1_split: the same weights, 20 %
        # more bytes, fewer ops per block); with more threads per memory channel the bytes win
        split = split_q4_1 if split_q4_1 is not None else torch.get_num_threads() <= SPLIT_Q4_1_MAX_THREADS
        self.weights = [(ops.q4_1_split(p.qweight) if split and p.format == "q4_1" else p.qweight)
                        if p.qweight is not None else p.linear.weight.detach().contiguous()
                        for p in plans]
        self.formats = [(3 if split and p.format == "q4_1" else _FORMATS[p.format]) if p.qweight is not None
                        else 0 for p in plans]
        self.biases = [None if p.linear.bias is None else p.linear.bias.detach().float().contiguous()
                       for p in plans]
        self.norm_weights = [n.weight.detach() for L in fast.layers for n in (L.ln1, L.ln2)]
        self.norm_weights.append(fast.norm.weight.detach())
        self._packed: Optional[int] = None  # ops.decode_step_pack's handle (first adapter-free call)
        lora = [p.module if p.lora else None for p in plans]
        self.gates = {id(m.gate): m.gate for m in lora if m is not None}
        self.lora_a = [None if m is None else m.lora_A.detach() for m in lora]
        self.lora_b = [None if m is None else m.lora_B.detach() for m in lora]
        self.lora_scales = [0.0 if m is None else float(m.scale) for m in lora]
        self.gate_of = [None if m is None else m.gate for m in lora]
        # the LM head in the step's arithmetic (ops.decode_linear), so that every decoding call's
        # logits come from the same kernels; None: the head is not a plain float32 / GGUF linear
        head = fast.head
        self.head = None
        if head.linear is not None and head.linear.weight.device.type == "cpu":
            if head.qweight is not None:
                self.head = (head.qweight, _FORMATS[head.format], head.linear.bias)
            elif head.linear.weight.dtype == torch.float32:
                self.head = (head.linear.weight.detach().contiguous(), 0, head.linear.bias)
            if self.head is not None and self.head[2] is not None:
                self.head = (self.head[0], self.head[1], self.head[2].detach().float().contiguous())
        # the input embedding for ops.decode_logits_packed (None: not a plain float32 nn.Embedding)
        emb = fast.embed
        self.embed = (emb.weight.detach() if type(emb) is torch.nn.Embedding and emb.max_norm is None
                      and emb.weight.dtype == torch.float32 and emb.weight.device.type == "cpu"
                      and emb.weight.is_contiguous() else None)
        # the GGUF blocks the calls stream (layers and head) in one huge-page-advised mapping
        self._arena = None
        if huge_pages:
            idx = [i for i, f in enumerate(self.formats) if f != 0]
            blocks = [self.weights[i] for i in idx]
            if self.head is not None and self.head[1] != 0:
                blocks.append(self.head[0])
            self._arena, copies = huge_page_copies(blocks)
            if self._arena is not None:
                if len(copies) > len(idx):
                    self.head = (copies.pop(), self.head[1], self.head[2])
                for i, c in zip(idx, copies):
                    self.weights[i] = c

    def logits(self, hidden: torch.Tensor) -> Optional[torch.Tensor]:
        """The LM head over a decoding call's final hidden states (``ops.decode_linear``), or None
        when it must run as the fast path's plan."""
        if self.head is None or hidden.dtype != torch.float32 or hidden.device.type != "cpu":
            return None
        weight, fmt, bias = self.head
        return ops.decode_linear(hidden.contiguous(), weight, fmt, bias)

    def packed_handle(self) -> int:
        """The ``ops.decode_step_pack`` handle of this step's weights, biases and norms (packed on
        first use, released when the step is collected): its adapter-free calls pass it instead of
        ~500 list entries (~0.2-0.3 ms a SmolLM2 call on the 2-core dev VM)."""
        if self._packed is None:
            self._packed = ops.decode_step_pack(self.weights, self.formats, self.biases, self.norm_weights)
            weakref.finalize(self, _release, self._packed)
        return self._packed

    def rotary_at(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary ``cos, sin`` ``[B, T, head_dim]`` float32 at ``position_ids``: rows of a
        table of the model's own rotary over positions ``0 .. n - 1`` (grown by doubling) where
        its values cannot depend on the call (a static rope type, a head_dim whose cos / sin
        ATen computes without a scalar tail), else the rotary module itself. The table's rows
        equal the module's values bitwise (tests/test_decode_step.py); a decoding call indexes
        them instead of running the module's ~10 small ops (~30 us a call on 2 cores)."""
        if not self._static_rope:
            cos, sin = type(self.rotary).forward(self.rotary, h, position_ids)
            return cos.float().contiguous(), sin.float().contiguous()
        need = int(position_ids.max()) + 1 if position_ids.numel() else 1
        _, cos, sin = self._rope_tables(h, need)
        return cos[position_ids], sin[position_ids]

    def _rope_tables(self, h: torch.Tensor, need: int):
        """``(key, cos, sin)``: the static rotary's tables ``[n, head_dim]`` over positions
        ``0 .. n - 1``, ``n >= need`` (grown by doubling)."""
        inv = self.rotary.inv_freq
        key = (inv.data_ptr(), inv._version, float(getattr(self.rotary, "attention_scaling", 1.0)))
        if self._rope_table is None or self._rope_table[0] != key or self._rope_table[1].shape[0] < need:
            n = max(need, 2 * self._rope_table[1].shape[0] if self._rope_table is not None else 0, 256)
            cos, sin = [], []
            for p0 in range(0, n, 512):  # chunks of 512 x head_dim: one thread's worth each
                pos = torch.arange(p0, min(n, p0 + 512), device=h.device).view(1, -1)
                c, s_ = type(self.rotary).forward(self.rotary, h[:1, :1].float(), pos)
                cos.append(c[0].float())
                sin.append(s_[0].float())
            self._rope_table = (key, torch.cat(cos).contiguous(), torch.cat(sin).contiguous())
        return self._rope_table

    def call_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache,
                    cache_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], hidden: bool = False):
        """The logits ``[B, T, V]`` of a decoding call from its token ids in one op
        (``ops.decode_logits_packed``: embedding, rotary rows, the step and the LM head; bitwise
        :meth:`__call__` over the embeddings followed by :meth:`logits`), or None when the call
        needs the separate ops (an active adapter, a rope whose values depend on the call, a
        head or embedding the op does not take, or the cache not yet allocated). ``hidden``:
        ``(logits, final hidden states [B, T, H])`` (``ops.decode_logits_hidden_packed``)."""
        if self.head is None or self.embed is None or not self._static_rope:
            return None
        if any(g.index is not None for g in self.gates.values()):
            return None
        if input_ids.dtype != torch.long or input_ids.device.type != "cpu":
            return None
        layers = cache.layers
        if not all(layer.is_initialized for layer in layers):
            return None
        # every position of the call is below the buffers' length (RowCache.set_write_positions
        # reserved room for the call): tables of that many rows cover it without a device sync
        _, cos, sin = self._rope_tables(self.embed, layers[0].keys.shape[2])
        weight, fmt, bias = self.head
        op = ops.decode_logits_hidden_packed if hidden else ops.decode_logits_packed
        return op(
            input_ids.contiguous(), position_ids.contiguous(), [layer.keys for layer in layers],
            [layer.values for layer in layers], cache_lens,
            None if tree_mask is None else tree_mask.contiguous(), self.packed_handle(), self.embed,
            cos, sin, weight, fmt, bias, self.eps, self.scale)

    def _adapter(self, T: int):
        """(lora_a, lora_b, lora_scales, aux_start) for this call, or None if unsupported."""
        active = [g for g in self.gates.values() if g.index is not None]
        if not active:
            return [], [], [], T
        if any(g.suffix is None for g in active):
            return None
        starts = {g.suffix for g in active}
        if len(starts) != 1:
            return None
        on = [g is not None and g.index is not None for g in self.gate_of]
        a = [t if o else None for t, o in zip(self.lora_a, on)]
        b = [t if o else None for t, o in zip(self.lora_b, on)]
        return a, b, self.lora_scales, starts.pop()

    def __call__(self, h: torch.Tensor, position_ids: torch.Tensor, cache, cache_lens: torch.Tensor,
                 tree_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        B, T, _ = h.shape
        adapter = self._adapter(T)
        if adapter is None or h.dtype != torch.float32 or h.device.type != "cpu":
            return None
        if not all(layer.is_initialized for layer in cache.layers):
            return None
        cos, sin = self.rotary_at(h, position_ids)
        lora_a, lora_b, lora_scales, aux_start = adapter
        if not lora_a:  # no adapter rows: the weights handed over once
            return ops.decode_step_packed(
                h.contiguous(), cos, sin,
                [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                cache_lens, None if tree_mask is None else tree_mask.contiguous(), self.packed_handle(),
                aux_start, self.eps, self.scale)
        return ops.decode_step(
            h.contiguous(), cos, sin,
            [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
            cache_lens, None if tree_mask is None else tree_mask.contiguous(), self.weights,
            self.formats, self.biases, self.norm_weights, lora_a, lora_b, lora_scales, aux_start,
            self.eps, self.scale)


def _release(handle: int) -> None:
    try:
        ops.decode_step_release(handle)
    except Exception:  # interpreter shutdown: the op library may already be gone
        pass


def native_step_for(fast, required: bool = False) -> Optional[NativeStep]:
    """A :class:`NativeStep` for ``fast`` (a FastForward), or None when the model is not supported
    (``required``: raise ``ValueError`` saying why instead) or the tests route ``ptp_ext.ops`` to
    the pure-PyTorch references."""
    if getattr(ops.tree_attention, "__module__", "") != "ptp_ext.ops":
        if required:
            raise ValueError("native_step=True, but ptp_ext.ops.tree_attention is routed to a reference")
        return None
    reason = _unsupported(fast)
    if reason is not None:
        if required:
            raise ValueError(f"native_step=True, but decode_step cannot run this model: {reason}")
        return None
    # One packing per model and set of linears: the decoder builds a FastForward at every
    # generate and asks again, and the packed copies cost ~0.07 s for SmolLM2. Rebuilt when a
    # linear, its blocks or adapter changed, or the thread count crossed SPLIT_Q4_1_MAX_THREADS.
    # Weakly keyed by the model's embedding module: nothing of it is kept alive or deep-copied.
    plans = [p for L in fast.layers for p in (L.q, L.k, L.v, L.o, L.gate, L.up, L.down)] + [fast.head]
    key = (tuple((id(p.module), id(p.linear), id(p.qweight), p.format, p.lora) for p in plans),
           torch.get_num_threads() <= SPLIT_Q4_1_MAX_THREADS)
    cached = _PACKED.get(fast.embed)
    if cached is not None and cached[0] == key:
        return cached[1]
    step = NativeStep(fast)
    _PACKED[fast.embed] = (key, step)
    return step
