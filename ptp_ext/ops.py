"""Public wrappers of the ptp_ext ops, each followed by its fake (meta) implementation.

The wrappers are thin: they normalise convenience arguments and call ``torch.ops.ptp_ext.<op>``,
which checks every argument (shape, dtype, device, contiguity, index ranges on the CPU) and raises
``ValueError`` naming the argument. The fakes state output shapes for ``torch.compile`` and
``torch.library.opcheck``.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["tree_attention", "verify_tree", "sampler_mlp", "invariant_linear", "gated_lora_linear",
           "quant_linear", "gated_lora_quant_linear"]

_ops = torch.ops.ptp_ext


# ---------------------------------------------------------------------------------------------
# Tree attention
# ---------------------------------------------------------------------------------------------
def tree_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Attention of T new (draft) tokens per sequence over a static KV cache.

    The layout is transformers' ``StaticCache``: the new tokens' keys and values are already
    written into the cache at positions ``cache_lens[b] .. cache_lens[b] + T - 1``. Query token i
    of row b sees every cached position ``< cache_lens[b]`` and the new token j iff
    ``tree_mask[b, i, j]`` (causal among the new tokens when ``tree_mask`` is None).

    Parameters
    ----------
    query : torch.Tensor
        ``(batch_size, num_new_tokens, num_q_heads, head_dim)``, float32/float16/bfloat16,
        contiguous.
    key_cache, value_cache : torch.Tensor
        ``(batch_size, num_kv_heads, max_cache_len, head_dim)``, query's dtype, contiguous;
        ``num_q_heads`` must be a multiple of ``num_kv_heads`` (grouped-query attention).
    cache_lens : torch.Tensor
        ``(batch_size,)`` int32 or int64: committed tokens before the new ones in each row.
    tree_mask : torch.Tensor, optional
        ``(batch_size, num_new_tokens, num_new_tokens)`` bool, or ``(T, T)`` shared by all rows.
    scale : float, optional
        Softmax scale; default ``head_dim ** -0.5``.
    return_lse : bool
        Also return the log-sum-exp of the scaled scores.

    Returns
    -------
    out : torch.Tensor
        ``(batch_size, num_new_tokens, num_q_heads, head_dim)`` in query's dtype (zeros for a row
        that sees no key).
    lse : torch.Tensor
        ``(batch_size, num_q_heads, num_new_tokens)`` float32 (natural log; ``-inf`` for a row
        that sees no key). Only when ``return_lse``.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if tree_mask is not None and tree_mask.dim() == 2:
        tree_mask = tree_mask.unsqueeze(0).expand(query.shape[0], -1, -1).contiguous()
    out, lse = _ops.tree_attention(query, key_cache, value_cache, cache_lens, tree_mask,
                                   float(scale))
    return (out, lse) if return_lse else out


@torch.library.register_fake("ptp_ext::tree_attention")
def _tree_attention_fake(query, key_cache, value_cache, cache_lens, tree_mask, scale):
    torch._check(query.dim() == 4, lambda: "query must be [B, T, H_q, D]")
    torch._check(key_cache.dim() == 4, lambda: "key_cache must be [B, H_kv, S_max, D]")
    B, T, Hq, _ = query.shape
    out = torch.empty_like(query)
    lse = query.new_empty((B, Hq, T), dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------
def verify_tree(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    uniforms: Optional[torch.Tensor] = None,
    mode: str = "greedy",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accept or reject draft trees (or chains) for a batch, on the device, with no host sync.

    Node 0 of each row is the root (the last committed token); nodes 1..N are draft tokens.
    The target's logits at node i are the distribution of the token after node i. A chain is the
    tree with ``parents = [-1, 0, 1, ..., N-1]`` (:func:`ptp_ext.reference.chain_parents`).
    Plain (non-speculative) sampling is this op with ``N = 0``: the same code path, so plain and
    speculative decoding draw from the identical distribution.

    Parameters
    ----------
    draft_tokens : torch.Tensor
        ``(batch_size, num_nodes)`` int64 with ``num_nodes = N + 1``; entry 0 is not verified.
    parents : torch.Tensor
        ``(batch_size, num_nodes)`` int64: ``parents[b, 0] = -1``; for ``i >= 1`` the parent in
        ``[0, i-1]``, or ``-1`` for a padding node (ragged trees per row). Children of a node are
        tried in index order.
    target_logits : torch.Tensor
        ``(batch_size, num_nodes, vocab_size)`` float32/float16/bfloat16.
    draft_probs : torch.Tensor, optional
        ``(batch_size, num_nodes, vocab_size)`` float32, mode ``"rejection"`` only: the draft
        distribution node i's token was drawn from (row 0 unused).
    uniforms : torch.Tensor, optional
        ``(batch_size, num_nodes)`` float32/float64 in [0, 1). ``"coupled"``: ``uniforms[b, d]`` is
        the uniform of the token after a node at depth d (the position-indexed stream).
        ``"rejection"``: ``uniforms[b, i]`` is node i's acceptance test and ``uniforms[b, 0]``
        draws the final residual/bonus token.
    mode : str
        ``"greedy"`` (argmax match), ``"coupled"`` (PTP: ``Pick(u, P)`` match, exact-match
        acceptance) or ``"rejection"`` (speculative rejection sampling, recursive over siblings).
    temperature, top_k, top_p : float, int, float
        Applied to the target logits exactly as :func:`ptp_ext.reference.sampling_probs`
        describes (temperature 0 = argmax; top_k 0 and top_p 1 disable).

    Returns
    -------
    num_accepted : torch.Tensor
        ``(batch_size,)`` int64: accepted draft nodes (root not counted).
    accepted_nodes : torch.Tensor
        ``(batch_size, num_nodes)`` int64: node ids of the accepted path starting with 0, padded
        with -1.
    next_token : torch.Tensor
        ``(batch_size,)`` int64: the bonus (all accepted) or correction token.

    References
    ----------
    Leviathan et al. 2023 (speculative sampling); Miao et al. 2024 (SpecInfer, trees);
    Draxler et al. 2025, arXiv:2512.21323 (PTP, coupled verification).
    """
    return _ops.verify_tree(draft_tokens, parents, target_logits, draft_probs, uniforms, mode,
                            float(temperature), int(top_k), float(top_p))


@torch.library.register_fake("ptp_ext::verify_tree")
def _verify_tree_fake(draft_tokens, parents, target_logits, draft_probs, uniforms, mode,
                      temperature, top_k, top_p):
    torch._check(target_logits.dim() == 3, lambda: "target_logits must be [B, N+1, V]")
    B, N1, _ = target_logits.shape
    num_accepted = draft_tokens.new_empty((B,), dtype=torch.long)
    accepted_nodes = draft_tokens.new_empty((B, N1), dtype=torch.long)
    next_token = draft_tokens.new_empty((B,), dtype=torch.long)
    return num_accepted, accepted_nodes, next_token


# ---------------------------------------------------------------------------------------------
# Sampler-head MLP
# ---------------------------------------------------------------------------------------------
def sampler_mlp(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    prev_tokens: Optional[torch.Tensor] = None,
    embedding: Optional[torch.Tensor] = None,
    prev_embed: Optional[torch.Tensor] = None,
    b1: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
    norm1_weight: Optional[torch.Tensor] = None,
    norm1_bias: Optional[torch.Tensor] = None,
    norm2_weight: Optional[torch.Tensor] = None,
    norm2_bias: Optional[torch.Tensor] = None,
    silu_out: bool = False,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Fused sampler head of the masked-input predictor (arXiv:2507.11851).

    ``x = cat(hidden, embedding[prev_tokens])``; ``h = silu(x @ w1.T + b1)``, then
    ``LayerNorm(h)`` if ``norm1_weight``; ``y = h @ w2.T + b2``, then ``silu(y)`` if ``silu_out``
    and ``LayerNorm(y)`` if ``norm2_weight``. The paper's head is ``silu_out=True`` with both
    norms; the plain Linear-SiLU-Linear is the default. Inference only (no autograd): training
    uses :func:`ptp_ext.reference.sampler_mlp_ref`.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(num_rows, hidden_dim)`` float32/float16/bfloat16: the mask positions' final hidden states.
    w1 : torch.Tensor
        ``(mid_dim, hidden_dim + embed_dim)``, hidden's dtype.
    w2 : torch.Tensor
        ``(out_dim, mid_dim)``, hidden's dtype.
    prev_tokens, embedding : torch.Tensor
        ``(num_rows,)`` int64 and ``(vocab_size, embed_dim)``: the gather is fused into the op.
    prev_embed : torch.Tensor
        ``(num_rows, embed_dim)``: already-gathered embeddings, instead of the pair above.
    b1, b2, norm1_weight, norm1_bias, norm2_weight, norm2_bias : torch.Tensor, optional
        ``(mid_dim,)`` / ``(out_dim,)`` in hidden's dtype.

    Returns
    -------
    torch.Tensor
        ``(num_rows, out_dim)`` in hidden's dtype (float32 accumulation).
    """
    if prev_embed is not None:
        if prev_tokens is not None or embedding is not None:
            raise ValueError("give either prev_embed or (prev_tokens, embedding), not both")
        embedding = prev_embed
        prev_tokens = torch.arange(prev_embed.shape[0], device=prev_embed.device)
    elif prev_tokens is None or embedding is None:
        raise ValueError("sampler_mlp needs prev_tokens and embedding (or prev_embed)")
    return _ops.sampler_mlp(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight,
                            norm1_bias, norm2_weight, norm2_bias, bool(silu_out), float(eps))


@torch.library.register_fake("ptp_ext::sampler_mlp")
def _sampler_mlp_fake(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight, norm1_bias,
                      norm2_weight, norm2_bias, silu_out, eps):
    torch._check(hidden.dim() == 2, lambda: "hidden must be [N, d_h]")
    torch._check(w2.dim() == 2, lambda: "w2 must be [d_out, d_mid]")
    return hidden.new_empty((hidden.shape[0], w2.shape[0]))


# ---------------------------------------------------------------------------------------------
# Batch-invariant linear
# ---------------------------------------------------------------------------------------------
def invariant_linear(x: torch.Tensor, weight: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` where every output row is bitwise independent of the other rows
    of the call (batch / row invariance; CPU).

    BLAS picks other kernels for other row counts, so a token's logits from a 1-row decoding
    call and from a 16-row speculative call differ by rounding (SmolLM2: ~4e-5), enough to flip
    a sampled token on a CDF near-tie. Here each output element is one fixed sequence of float32
    operations over its own row of ``x`` and row of ``weight``. The weights are read once per
    call for all rows and never packed: for a few rows it runs at GEMV speed, where BLAS's
    GEMM was 3.4x slower (SmolLM2's LM head on the dev CPU; ``benchmarks/kernel_report.py``).

    Parameters
    ----------
    x : torch.Tensor
        ``(..., K)`` float32 / float16 / bfloat16 (leading dims are flattened).
    weight : torch.Tensor
        ``(M, K)``, x's dtype, contiguous.
    bias : torch.Tensor, optional
        ``(M,)``, x's dtype.

    Returns
    -------
    torch.Tensor
        ``(..., M)`` in x's dtype (float32 accumulation).
    """
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., K], got a {x.dim()}-d tensor")
    lead = x.shape[:-1]
    y = _ops.invariant_linear(x.reshape(lead.numel(), x.shape[-1]).contiguous(), weight, bias)
    return y.view(*lead, y.shape[-1])


@torch.library.register_fake("ptp_ext::invariant_linear")
def _invariant_linear_fake(x, weight, bias):
    torch._check(x.dim() == 2, lambda: "x must be [N, K]")
    torch._check(weight.dim() == 2, lambda: "weight must be [M, K]")
    return x.new_empty((x.shape[0], weight.shape[0]))


# ---------------------------------------------------------------------------------------------
# Batch-invariant linear + gated LoRA on a suffix of rows
# ---------------------------------------------------------------------------------------------
def gated_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                      aux_start: int) -> torch.Tensor:
    """:func:`invariant_linear` on every row plus ``scale * (x @ lora_a.T) @ lora_b.T`` on the
    rows ``x[:, aux_start:]`` only, in one call.

    This is the gated LoRA of a self-speculative drafter (``ptp.lora.GatedLoRALinear``: the
    adapter acts on the auxiliary rows, u-slots or mask tokens, appended after the real tokens of
    every batch row). Rows before ``aux_start`` are bitwise ``invariant_linear(x, weight, bias)``,
    so the target's own rows never depend on the adapter. All products go through the
    row-invariant kernel. One op call replaces about ten small tensor ops per adapted layer.

    Parameters
    ----------
    x : torch.Tensor
        ``(batch_size, seq_len, K)`` float32 / float16 / bfloat16, contiguous.
    weight : torch.Tensor
        ``(M, K)``, x's dtype, contiguous.
    bias : torch.Tensor, optional
        ``(M,)``, x's dtype.
    lora_a : torch.Tensor
        ``(R, K)`` float32 (PEFT's ``lora_A``).
    lora_b : torch.Tensor
        ``(M, R)`` float32 (PEFT's ``lora_B``).
    scale : float
        LoRA scaling (``alpha / rank``).
    aux_start : int
        First auxiliary position, ``0 <= aux_start <= seq_len``.

    Returns
    -------
    torch.Tensor
        ``(batch_size, seq_len, M)`` in x's dtype; the delta is computed in float32.
    """
    return _ops.gated_lora_linear(x, weight, bias, lora_a, lora_b, float(scale), int(aux_start))


@torch.library.register_fake("ptp_ext::gated_lora_linear")
def _gated_lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, aux_start):
    torch._check(x.dim() == 3, lambda: "x must be [B, S, K]")
    torch._check(weight.dim() == 2, lambda: "weight must be [M, K]")
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))



# ---------------------------------------------------------------------------------------------
# Batch-invariant linear over GGUF-quantised weights
# ---------------------------------------------------------------------------------------------
def quant_linear(x: torch.Tensor, qweight: torch.Tensor, format: str,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`invariant_linear` with the weights in a GGUF block format, dequantised on the fly;
    bitwise ``invariant_linear(x, dequantize(qweight), bias)`` (CPU).

    A quantised checkpoint's float32 weights are each exactly one block formula, so reading the
    blocks (Q4_1: 4.5 bits per weight, Q8_0: 8.5) instead of the float32 copy (32 bits) gives the
    same outputs from a fraction of the memory traffic: the weight stream is what bounds a
    decoding call on a CPU. ``ptp.quant`` builds the blocks of a model loaded from a GGUF and
    checks them against the loaded weights.

    Parameters
    ----------
    x : torch.Tensor
        ``(..., K)`` float32, K a multiple of 32 (leading dims are flattened).
    qweight : torch.Tensor
        ``(M, K / 32 * block_bytes)`` uint8, contiguous: each row's K / 32 blocks in order.
    format : str
        ``"q8_0"`` (34-byte blocks: fp16 d, 32 int8; ``w = d * q``) or ``"q4_1"`` (20-byte
        blocks: fp16 d, fp16 m, 16 bytes of nibbles, low nibbles first; ``w = d * q + m``).
    bias : torch.Tensor, optional
        ``(M,)`` float32.

    Returns
    -------
    torch.Tensor
        ``(..., M)`` float32.
    """
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., K], got a {x.dim()}-d tensor")
    lead = x.shape[:-1]
    y = _ops.quant_linear(x.reshape(lead.numel(), x.shape[-1]).contiguous(), qweight, str(format), bias)
    return y.view(*lead, y.shape[-1])


@torch.library.register_fake("ptp_ext::quant_linear")
def _quant_linear_fake(x, qweight, format, bias):
    torch._check(x.dim() == 2, lambda: "x must be [N, K]")
    torch._check(qweight.dim() == 2, lambda: "qweight must be [M, K / 32 * block_bytes]")
    return x.new_empty((x.shape[0], qweight.shape[0]))


def gated_lora_quant_linear(x: torch.Tensor, qweight: torch.Tensor, format: str,
                            bias: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                            scale: float, aux_start: int) -> torch.Tensor:
    """:func:`gated_lora_linear` with the base weight in a GGUF block format (:func:`quant_linear`):
    :func:`quant_linear` on every row plus ``scale * (x @ lora_a.T) @ lora_b.T`` on the rows
    ``x[:, aux_start:]``, in one call.

    Rows before ``aux_start`` are bitwise ``quant_linear(x, qweight, format, bias)``, which is
    bitwise ``invariant_linear`` over the dequantised weight: a self-speculative drafter's adapter
    over a GGUF target (SmolLM2's Q4_1) leaves the target's rows exactly the target's while the
    call streams the blocks instead of the float32 weights.

    Parameters
    ----------
    x : torch.Tensor
        ``(batch_size, seq_len, K)`` float32, contiguous, K a multiple of 32.
    qweight : torch.Tensor
        ``(M, K / 32 * block_bytes)`` uint8 blocks (see :func:`quant_linear`).
    format : str
        ``"q8_0"`` or ``"q4_1"``.
    bias : torch.Tensor, optional
        ``(M,)`` float32.
    lora_a, lora_b, scale, aux_start
        As for :func:`gated_lora_linear`.

    Returns
    -------
    torch.Tensor
        ``(batch_size, seq_len, M)`` float32.
    """
    return _ops.gated_lora_quant_linear(x, qweight, str(format), bias, lora_a, lora_b, float(scale),
                                        int(aux_start))


@torch.library.register_fake("ptp_ext::gated_lora_quant_linear")
def _gated_lora_quant_linear_fake(x, qweight, format, bias, lora_a, lora_b, scale, aux_start):
    torch._check(x.dim() == 3, lambda: "x must be [B, S, K]")
    torch._check(qweight.dim() == 2, lambda: "qweight must be [M, K / 32 * block_bytes]")
    return x.new_empty((x.shape[0], x.shape[1], qweight.shape[0]))
