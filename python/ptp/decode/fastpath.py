"""A direct layer loop for the decoding calls of Llama-family models (Llama, Mistral, Qwen2) and
Gemma 3.

A decoding call of a small model on a CPU spends almost half its time outside the kernels:
SmolLM2-135M's 30 layers go through ~400 ``nn.Module`` calls per forward (hooks, decorators,
keyword plumbing, config lookups), about 12 ms of a 28 ms step (2026-12-01 profile). This loop
calls the same tensor operations directly:

* the model's own norm and rotary code (``type(m).forward(m, ...)``: only the module dispatch is
  skipped), the model module's own ``apply_rotary_pos_emb``;
* the projections through their :class:`ptp.decode.linear.LinearPlan` (the one place that picks
  ``invariant_linear`` / ``quant_linear`` / the fused gated-LoRA ops / BLAS); any other wrapped
  projection is called as a module;
* the KV cache write and ``ptp_ext``'s ``tree_attention``, as the ``"ptp"`` attention does, with
  each layer's sliding window (:func:`ptp.decode.attention.tree_attention`).

So the hidden states are *bitwise* those of the HF forward with the ``"ptp"`` attention
(``tests/test_fastpath.py`` checks it on chains, trees and drafter aux rows, on tiny models of
each family and on SmolLM2). The prefill keeps the HF forward (SDPA).

Only models whose structure is known take this path (:func:`fast_forward_for` returns ``None``
otherwise, and the decoder keeps the HF forward): the causal-LM and decoder-layer classes of the
four families, no extra modules (Qwen3's q/k norms) or logit scaling / softcapping. Gemma 3's
layer adds q/k norms (before the rotary, as its attention applies them), norms after attention
and around the MLP, the rotary of the layer's type (local / global) and its sliding window; the
scaled embedding is the model's own module.
"""
from __future__ import annotations

import inspect
import sys
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptp.decode.attention import WindowPlan, layer_windows, tree_attention
from ptp.decode.linear import LinearPlan
from ptp.decode.quant import quantized_weights

__all__ = ["FastForward", "fast_forward_for", "SUPPORTED_MODELS"]

# causal LM class -> its decoder layer class (pre-norm attention and gated MLP; Gemma 3 with
# the extra norms below)
SUPPORTED_MODELS = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "MistralForCausalLM": "MistralDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
    "Gemma3ForCausalLM": "Gemma3DecoderLayer",
}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
# Gemma 3: q/k norms; post_attention_layernorm normalises the attention output, and the MLP sits
# between pre_ / post_feedforward_layernorm
_GEMMA_ATTN_CHILDREN = _ATTN_CHILDREN | {"q_norm", "k_norm"}
_GEMMA_LAYER_CHILDREN = _LAYER_CHILDREN | {"pre_feedforward_layernorm", "post_feedforward_layernorm"}


class _Layer:
    __slots__ = ("ln1", "ln2", "q", "k", "v", "o", "gate", "up", "down", "act", "head_dim", "scaling",
                 "norm_forward", "q_norm", "k_norm", "post_attn", "post_ff", "rope", "window")

    def __init__(self, layer: nn.Module, quant: dict, rope: Optional[str] = None,
                 window: Optional[int] = None):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1 = layer.input_layernorm
        self.norm_forward = type(self.ln1).forward
        self.q_norm = getattr(attn, "q_norm", None)  # Gemma 3 (None: Llama family)
        self.k_norm = getattr(attn, "k_norm", None)
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3: norms around both blocks
            self.post_attn, self.ln2 = layer.post_attention_layernorm, layer.pre_feedforward_layernorm
            self.post_ff = layer.post_feedforward_layernorm
        else:
            self.post_attn, self.ln2, self.post_ff = None, layer.post_attention_layernorm, None
        self.rope = rope  # the rotary's layer type (Gemma 3: local / global), None: one rotary
        self.window = window
        self.q, self.k, self.v, self.o = (LinearPlan(p, quant) for p in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                                     attn.o_proj))
        self.gate, self.up, self.down = (LinearPlan(p, quant) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        act = mlp.act_fn
        self.act = F.silu if type(act) is nn.SiLU else act
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)


def _structure_ok(model: nn.Module) -> bool:
    layer_cls = SUPPORTED_MODELS.get(type(model).__name__)
    inner = getattr(model, "model", None)
    if layer_cls is None or inner is None:
        return False
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, name):
            return False
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    if len(inner.layers) != cfg.num_hidden_layers:
        return False
    if any(type(layer).__name__ != layer_cls for layer in inner.layers):
        return False
    if layer_cls == "Gemma3DecoderLayer":
        return _gemma3_ok(model)
    for layer in inner.layers:
        if {n for n, _ in layer.named_children()} != _LAYER_CHILDREN:
            return False
        if {n for n, _ in layer.self_attn.named_children()} != _ATTN_CHILDREN:
            return False
        if {n for n, _ in layer.mlp.named_children()} != _MLP_CHILDREN:
            return False
        if type(layer.post_attention_layernorm) is not type(layer.input_layernorm):
            return False
    return True


def _gemma3_ok(model: nn.Module) -> bool:
    cfg, inner = model.config, model.model
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "use_bidirectional_attention", False):
        return False
    if len(getattr(cfg, "layer_types", None) or ()) != cfg.num_hidden_layers:
        return False
    if "layer_type" not in inspect.signature(type(inner.rotary_emb).forward).parameters:
        return False
    norm = type(inner.layers[0].input_layernorm)
    for layer in inner.layers:
        if {n for n, _ in layer.named_children()} != _GEMMA_LAYER_CHILDREN:
            return False
        if {n for n, _ in layer.self_attn.named_children()} != _GEMMA_ATTN_CHILDREN:
            return False
        if {n for n, _ in layer.mlp.named_children()} != _MLP_CHILDREN:
            return False
        norms = (layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                 layer.post_feedforward_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm)
        if any(type(n) is not norm for n in norms):
            return False
    return True


def fast_forward_for(model: nn.Module) -> Optional["FastForward"]:
    """The direct loop for ``model``, or ``None`` when its structure is not one this module knows."""
    if not _structure_ok(model):
        return None
    return FastForward(model)


class FastForward:
    """``hidden = ff(inputs_embeds, position_ids, cache, cache_lens, tree_mask, linears, window)``:
    the final (normed) hidden states of a decoding call, bitwise as ``model.model(...)`` with the
    ``"ptp"`` attention gives them (``window``: the call's :class:`WindowPlan` for the
    sliding-window layers, None when the model has none)."""

    def __init__(self, model: nn.Module):
        inner = model.model
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        quant = quantized_weights(model)
        self.head = LinearPlan(model.get_output_embeddings(), quant)
        cfg = model.config
        # Gemma 3's rotary takes the layer's type (its local and global layers rotate with
        # different bases); the Llama family's has one table
        typed = "layer_type" in inspect.signature(type(self.rotary).forward).parameters
        ropes = list(cfg.layer_types) if typed else [None] * len(inner.layers)
        self.layers = [_Layer(layer, quant, rope, w)
                       for layer, rope, w in zip(inner.layers, ropes, layer_windows(cfg))]
        self.num_quantized = sum(p.qweight is not None for L in self.layers
                                 for p in (L.q, L.k, L.v, L.o, L.gate, L.up, L.down)) + \
            (self.head.qweight is not None)
        mod = sys.modules[type(inner.layers[0].self_attn).__module__]
        self.apply_rotary: Callable = mod.apply_rotary_pos_emb
        # ptp.decode.native.NativeStep (the whole stack in one op), set by the decoder
        self.native = None

    def logits(self, hidden: torch.Tensor, linears=None) -> torch.Tensor:
        """The LM head over ``hidden``, as the decoding call's linears run (with the native step:
        in its arithmetic, ``ops.decode_linear``)."""
        invariant = linears is not None and linears.wants(hidden)
        if self.native is not None and invariant:
            out = self.native.logits(hidden)
            if out is not None:
                return out
        return self.head(hidden, invariant)

    def call_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache,
                    cache_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], linears=None,
                    window: Optional[WindowPlan] = None, hidden: bool = False):
        """The logits of a decoding call from its token ids: ``logits(self(embed(input_ids),
        ...))``, in one op where the native step takes the call (bitwise the same). ``hidden``:
        ``(logits, the final hidden states)``."""
        if self.native is not None and linears is not None and linears.wants_rows(input_ids.numel()):
            out = self.native.call_logits(input_ids, position_ids, cache, cache_lens, tree_mask, hidden)
            if out is not None:
                return out
        h = self(self.embed(input_ids), position_ids, cache, cache_lens, tree_mask, linears, window)
        return (self.logits(h, linears), h) if hidden else self.logits(h, linears)

    def __call__(self, h: torch.Tensor, position_ids: torch.Tensor, cache, cache_lens: torch.Tensor,
                 tree_mask: Optional[torch.Tensor], linears=None,
                 window: Optional[WindowPlan] = None) -> torch.Tensor:
        B, T, _ = h.shape
        invariant = linears is not None and linears.wants(h)
        if self.native is not None and invariant:
            out = self.native(h, position_ids, cache, cache_lens, tree_mask)
            if out is not None:
                return out
        rotary_forward = type(self.rotary).forward
        ropes: dict = {}
        norm = self.layers[0].norm_forward if self.layers else None
        for i, L in enumerate(self.layers):
            if L.rope not in ropes:
                ropes[L.rope] = (rotary_forward(self.rotary, h, position_ids) if L.rope is None else
                                 rotary_forward(self.rotary, h, position_ids, L.rope))
            cos, sin = ropes[L.rope]
            residual = h
            x = norm(L.ln1, h)
            D = L.head_dim
            q = L.q(x, invariant).view(B, T, -1, D).transpose(1, 2)
            k = L.k(x, invariant).view(B, T, -1, D).transpose(1, 2)
            v = L.v(x, invariant).view(B, T, -1, D).transpose(1, 2)
            if L.q_norm is not None:
                q, k = norm(L.q_norm, q), norm(L.k_norm, k)
            q, k = self.apply_rotary(q, k, cos, sin)
            keys, values = cache.update(k, v, i)
            # ops.tree_attention looked up per call there: tests may route it to the reference
            a = tree_attention(q.transpose(1, 2).contiguous(), keys, values, cache_lens, tree_mask,
                               L.scaling, L.window, window)
            a = L.o(a.reshape(B, T, -1).contiguous(), invariant)
            if L.post_attn is not None:
                a = norm(L.post_attn, a)
            h = residual + a
            residual = h
            x = norm(L.ln2, h)
            x = L.down(L.act(L.gate(x, invariant)) * L.up(x, invariant), invariant)
            if L.post_ff is not None:
                x = norm(L.post_ff, x)
            h = residual + x
        return type(self.norm).forward(self.norm, h)
