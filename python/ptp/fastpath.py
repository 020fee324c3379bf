"""A direct layer loop for the decoding calls of Llama-family models (Llama, Mistral, Qwen2).

A decoding call of a small model on a CPU spends almost half its time outside the kernels:
SmolLM2-135M's 30 layers go through ~400 ``nn.Module`` calls per forward (hooks, decorators,
keyword plumbing, config lookups), about 12 ms of a 28 ms step (2026-12-01 profile). This loop
calls the same tensor operations directly:

* the model's own norm and rotary code (``type(m).forward(m, ...)``: only the module dispatch is
  skipped), the model module's own ``apply_rotary_pos_emb``;
* the projections: ``ptp_ext``'s ``invariant_linear`` op when the decoder routes linears through
  it (:class:`ptp.decoder.InvariantLinears`), or ``quant_linear`` over the layer's GGUF blocks
  when :mod:`ptp.quant` attached them (bitwise the same results from a quarter to an eighth of
  the weight bytes), else ``F.linear``; the gated LoRA of a self-speculative drafter with its
  gate on runs as one op (``gated_lora_quant_linear`` over the blocks, ``gated_lora_linear``
  over float32 weights), any other wrapped projection is called as a module;
* the KV cache write and ``ptp_ext``'s ``tree_attention``, as the ``"ptp"`` attention does.

So the hidden states are *bitwise* those of the HF forward with the ``"ptp"`` attention
(``tests/test_fastpath.py`` checks it on chains, trees and drafter aux rows, on tiny models of
each family and on SmolLM2). The prefill keeps the HF forward (SDPA).

Only models whose structure is known take this path (:func:`fast_forward_for` returns ``None``
otherwise, and the decoder keeps the HF forward): the causal-LM and decoder-layer classes of the
three families, no extra modules (Qwen3's q/k norms) or logit scaling. A sliding window is no
concern here: the decoder refuses sequences longer than the window on either path.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptp_ext import ops

from .lora import GatedLoRALinear
from .quant import quantized_weights

__all__ = ["FastForward", "fast_forward_for", "SUPPORTED_MODELS"]

# causal LM class -> its decoder layer class (same structure: pre-norm attention and gated MLP)
SUPPORTED_MODELS = {
    "LlamaForCausalLM": "LlamaDecoderLayer",
    "MistralForCausalLM": "MistralDecoderLayer",
    "Qwen2ForCausalLM": "Qwen2DecoderLayer",
}
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


class _Proj:
    """One projection: ``invariant_linear`` / ``quant_linear`` (the layer's attached GGUF blocks,
    :mod:`ptp.quant`) in row-invariant calls, ``F.linear`` otherwise; a wrapped layer runs its own
    forward (a gated LoRA with its gate off is its base layer)."""

    __slots__ = ("m", "linear", "lora", "qweight", "format")

    def __init__(self, m: nn.Module, quant: dict):
        self.m = m
        self.lora = isinstance(m, GatedLoRALinear) and type(m.base) is nn.Linear
        self.linear = m.base if self.lora else (m if type(m) is nn.Linear else None)
        qw = quant.get(self.linear) if self.linear is not None else None
        if qw is not None and not qw.matches(self.linear.weight):
            qw = None  # the weight changed since its blocks were checked: float32 path
        self.qweight = qw.qweight if qw is not None else None
        self.format = qw.format if qw is not None else None

    def __call__(self, x: torch.Tensor, invariant: bool) -> torch.Tensor:
        lin = self.linear
        if lin is None:
            return self.m(x)
        if self.lora and self.m.gate.index is not None:
            m = self.m
            if (invariant and m.gate.suffix is not None and x.dim() == 3 and x.is_contiguous()
                    and not torch.is_grad_enabled()):
                # gate on, auxiliary rows a suffix of every batch row: one op, the base rows bitwise
                # those of the gate-off call (GGUF blocks: gated_lora_quant_linear streams them, a
                # third of the float32 path's time at a drafter call's 5-8 rows on the dev CPU)
                if self.qweight is not None:
                    return ops.gated_lora_quant_linear(x, self.qweight, self.format, lin.bias, m.lora_A,
                                                       m.lora_B, m.scale, m.gate.suffix)
                w = lin.weight if lin.weight.is_contiguous() else lin.weight.contiguous()
                return ops.gated_lora_linear(x, w, lin.bias, m.lora_A, m.lora_B, m.scale, m.gate.suffix)
            return m(x)
        if not invariant:
            return F.linear(x, lin.weight, lin.bias)
        if self.qweight is not None:
            return ops.quant_linear(x, self.qweight, self.format, lin.bias)
        w = lin.weight if lin.weight.is_contiguous() else lin.weight.contiguous()
        return ops.invariant_linear(x, w, lin.bias)


class _Layer:
    __slots__ = ("ln1", "ln2", "q", "k", "v", "o", "gate", "up", "down", "act", "head_dim", "scaling",
                 "norm_forward")

    def __init__(self, layer: nn.Module, quant: dict):
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        self.norm_forward = type(self.ln1).forward
        self.q, self.k, self.v, self.o = (_Proj(p, quant) for p in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                                     attn.o_proj))
        self.gate, self.up, self.down = (_Proj(p, quant) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
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
    for layer in inner.layers:
        if type(layer).__name__ != layer_cls:
            return False
        if {n for n, _ in layer.named_children()} != _LAYER_CHILDREN:
            return False
        if {n for n, _ in layer.self_attn.named_children()} != _ATTN_CHILDREN:
            return False
        if {n for n, _ in layer.mlp.named_children()} != _MLP_CHILDREN:
            return False
        if type(layer.post_attention_layernorm) is not type(layer.input_layernorm):
            return False
    return True


def fast_forward_for(model: nn.Module) -> Optional["FastForward"]:
    """The direct loop for ``model``, or ``None`` when its structure is not one this module knows."""
    if not _structure_ok(model):
        return None
    return FastForward(model)


class FastForward:
    """``hidden = ff(inputs_embeds, position_ids, cache, cache_lens, tree_mask, linears)``: the
    final (normed) hidden states of a decoding call, bitwise as ``model.model(...)`` with the
    ``"ptp"`` attention gives them."""

    def __init__(self, model: nn.Module):
        inner = model.model
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        quant = quantized_weights(model)
        self.head = _Proj(model.get_output_embeddings(), quant)
        self.layers = [_Layer(layer, quant) for layer in inner.layers]
        self.num_quantized = sum(p.qweight is not None for L in self.layers
                                 for p in (L.q, L.k, L.v, L.o, L.gate, L.up, L.down)) + \
            (self.head.qweight is not None)
        mod = sys.modules[type(inner.layers[0].self_attn).__module__]
        self.apply_rotary: Callable = mod.apply_rotary_pos_emb

    def logits(self, hidden: torch.Tensor, linears=None) -> torch.Tensor:
        """The LM head over ``hidden``, as the decoding call's linears run."""
        return self.head(hidden, linears is not None and linears.wants(hidden))

    def __call__(self, h: torch.Tensor, position_ids: torch.Tensor, cache, cache_lens: torch.Tensor,
                 tree_mask: Optional[torch.Tensor], linears=None) -> torch.Tensor:
        B, T, _ = h.shape
        invariant = linears is not None and linears.wants(h)
        cos, sin = type(self.rotary).forward(self.rotary, h, position_ids)
        for i, L in enumerate(self.layers):
            residual = h
            x = L.norm_forward(L.ln1, h)
            D = L.head_dim
            q = L.q(x, invariant).view(B, T, -1, D).transpose(1, 2)
            k = L.k(x, invariant).view(B, T, -1, D).transpose(1, 2)
            v = L.v(x, invariant).view(B, T, -1, D).transpose(1, 2)
            q, k = self.apply_rotary(q, k, cos, sin)
            keys, values = cache.update(k, v, i)
            # ops.* looked up per call: tests may route them to the references
            a = ops.tree_attention(q.transpose(1, 2).contiguous(), keys, values, cache_lens, tree_mask,
                                   scale=L.scaling)
            a = L.o(a.reshape(B, T, -1).contiguous(), invariant)
            h = residual + a
            residual = h
            x = L.norm_forward(L.ln2, h)
            x = L.down(L.act(L.gate(x, invariant)) * L.up(x, invariant), invariant)
            h = residual + x
        return type(self.norm).forward(self.norm, h)
