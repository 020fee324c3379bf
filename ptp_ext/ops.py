"""Public wrappers of the ptp_ext ops, each followed by its fake (meta) implementation and its
autograd registration.

The wrappers are thin: they normalise convenience arguments and call ``torch.ops.ptp_ext.<op>``,
which checks every argument (shape, dtype, device, contiguity, index ranges on the CPU) and raises
``ValueError`` naming the argument. The fakes run the same checks (:mod:`ptp_ext._checks`, the
Python mirror of the C++ ones, same messages) and state output shapes for ``torch.compile`` and
``torch.library.opcheck``.

Autograd: :func:`invariant_linear` and :func:`gated_lora_linear` have a backward (plain float32
products: the gradients are not row-invariant, only the forward is). The other ops are
inference-only: calling one with grad enabled on an input that requires grad raises
``RuntimeError`` instead of returning an output whose gradient would silently be dropped.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from .reference import logits_valid, uniforms_valid

__all__ = ["tree_attention", "verify_tree", "sampler_mlp", "invariant_linear", "gated_lora_linear",
           "quant_linear", "gated_lora_quant_linear", "decode_step", "decode_linear", "q4_1_split",
           "decode_step_pack", "decode_step_packed", "decode_step_release", "decode_logits_packed",
           "decode_logits_hidden_packed"]

_ops = torch.ops.ptp_ext


def _register_inference_only(name: str, hint: str) -> None:
    """Autograd for an op without a backward: a clear error when the forward is asked to record
    a graph (grad mode on and an input requiring grad), rather than an output that looks
    differentiable and silently drops the gradient."""

    def setup_context(ctx, inputs, output):
        raise RuntimeError(
            f"ptp_ext.{name} is inference-only (no backward), but an input requires grad: call it "
            f"under torch.no_grad() / torch.inference_mode() or detach the inputs{hint}")

    def backward(ctx, *grads):  # never reached: setup_context raises first
        raise RuntimeError(f"ptp_ext.{name} has no backward")

    torch.library.register_autograd(f"ptp_ext::{name}", backward, setup_context=setup_context)


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

    Non-finite keys and values follow the IEEE arithmetic of ``softmax(mask(q k^T scale)) v``
    over the row's first ``cache_lens[b] + T`` positions, as torch's SDPA does with a boolean
    mask (and :func:`ptp_ext.reference.tree_attention_ref` does, on every backend):

    * positions ``>= cache_lens[b] + T`` are never read (garbage, NaN, there is harmless);
    * a masked position's key is never used (its score is -inf, weight exactly 0), but its value
      still enters the weighted sum: a NaN/inf value makes those output columns non-finite (0 *
      inf = NaN), for every query row of its KV head;
    * a NaN or +inf visible score (NaN/inf in ``query`` or a visible key) makes that query row's
      ``out`` and ``lse`` NaN; a -inf score is weight 0;
    * a row whose visible scores are all -inf (or that sees nothing) gets ``out = 0``,
      ``lse = -inf``, whatever the values.

    Inference-only: inputs that require grad raise (use SDPA for training).

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
        D = query.shape[-1] if query.dim() else 0
        scale = D ** -0.5 if D > 0 else 1.0  # D = 0 (or no head dim): the op's check rejects it
    if tree_mask is not None and tree_mask.dim() == 2 and query.dim() >= 1:
        tree_mask = tree_mask.unsqueeze(0).expand(query.shape[0], -1, -1).contiguous()
    out, lse = _ops.tree_attention(query, key_cache, value_cache, cache_lens, tree_mask,
                                   float(scale))
    return (out, lse) if return_lse else out


@torch.library.register_fake("ptp_ext::tree_attention")
def _tree_attention_fake(query, key_cache, value_cache, cache_lens, tree_mask, scale):
    _checks.tree_attention_inputs(query, key_cache, value_cache, cache_lens, tree_mask)
    B, T, Hq, _ = query.shape
    out = torch.empty_like(query)
    lse = query.new_empty((B, Hq, T), dtype=torch.float32)
    return out, lse


_register_inference_only("tree_attention", " (training: F.scaled_dot_product_attention)")


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
    *,
    raise_on_invalid: bool = False,
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
    raise_on_invalid : bool
        Raise ``ValueError`` (naming the rows and the cause) when a row is invalid, instead of
        returning its sentinel. Reads ``next_token`` on the host: a device sync on CUDA.

    Invalid rows
    ------------
    NaN or +inf logits and uniforms outside [0, 1) never become a token. A row is *invalid* when
    the mode samples (``"coupled"``, ``"rejection"``) and one of its ``uniforms`` is not in
    [0, 1) (NaN included), or when its walk reaches a node whose logits ``x`` (divided by the
    temperature when sampling, :func:`ptp_ext.reference.logits_valid`) hold a NaN or +inf, or are
    all -inf (no token can be drawn). Its outputs are the sentinel ``num_accepted = 0``,
    ``accepted_nodes = [0, -1, ...]``, ``next_token = -1``; the other rows are unaffected. This is
    a rule rather than an error so that the op never synchronises and one broken sequence does
    not fail the batch: a serving loop checks ``next_token < 0`` when it reads the tokens anyway
    and ends those sequences. -inf logits are masks (probability 0) and are valid. The CPU, CUDA
    and reference implementations follow the same rule.

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
    out = _ops.verify_tree(draft_tokens, parents, target_logits, draft_probs, uniforms, mode,
                           float(temperature), int(top_k), float(top_p))
    if raise_on_invalid:
        _raise_invalid_rows(out[2], target_logits, uniforms, mode, float(temperature))
    return out


def _raise_invalid_rows(next_token: torch.Tensor, target_logits: torch.Tensor,
                        uniforms: Optional[torch.Tensor], mode: str, temperature: float) -> None:
    """ValueError naming the rows of verify_tree's sentinel (next_token -1) and the first one's
    cause; nothing when there is none."""
    bad = (next_token < 0).nonzero().flatten().tolist()
    if not bad:
        return
    b = bad[0]
    if mode != "greedy" and not uniforms_valid(uniforms[b]):
        u = uniforms[b].tolist()
        cause = f"uniforms[{b}] must be in [0, 1), got {[x for x in u if not 0 <= x < 1][:4]}"
    else:
        t = temperature if mode != "greedy" else 0.0
        nodes = [c for c in range(target_logits.shape[1]) if not logits_valid(target_logits[b, c], t)]
        cause = (f"target_logits[{b}, c] for nodes c in {nodes[:8]} hold a NaN or +inf or are all "
                 f"-inf (temperature {t:g})")
    raise ValueError(f"verify_tree: {len(bad)} invalid row(s) {bad[:8]} (next_token -1): {cause}")


@torch.library.register_fake("ptp_ext::verify_tree")
def _verify_tree_fake(draft_tokens, parents, target_logits, draft_probs, uniforms, mode,
                      temperature, top_k, top_p):
    _checks.verify_inputs(draft_tokens, parents, target_logits, draft_probs, uniforms, mode,
                          temperature, top_k, top_p)
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
    norms; the plain Linear-SiLU-Linear is the default. Inference-only (an input that requires
    grad raises): training uses :func:`ptp_ext.reference.sampler_mlp_ref`.

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
    _checks.sampler_mlp_inputs(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight,
                               norm1_bias, norm2_weight, norm2_bias)
    return hidden.new_empty((hidden.shape[0], w2.shape[0]))


_register_inference_only("sampler_mlp", " (training: ptp_ext.reference.sampler_mlp_ref)")


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

    Differentiable: the backward is ``F.linear``'s (float32 products cast to the inputs' dtypes;
    the gradients are not row-invariant, only the forward is).
    """
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., K], got a {x.dim()}-d tensor")
    lead = x.shape[:-1]
    y = _ops.invariant_linear(x.reshape(lead.numel(), x.shape[-1]).contiguous(), weight, bias)
    return y.view(*lead, y.shape[-1])


@torch.library.register_fake("ptp_ext::invariant_linear")
def _invariant_linear_fake(x, weight, bias):
    _checks.invariant_linear_inputs(x, weight, bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


def _invariant_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _invariant_linear_backward(ctx, grad):
    # y [N, M] = x [N, K] @ weight.T + bias, in float32: dx = g @ W, dW = g.T @ x, db = sum_n g
    x, weight = ctx.saved_tensors
    g = grad.float()
    dx = (g @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
    dw = (g.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = g.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db


torch.library.register_autograd("ptp_ext::invariant_linear", _invariant_linear_backward,
                                setup_context=_invariant_linear_setup)


# ---------------------------------------------------------------------------------------------
# Batch-invariant linear + gated LoRA on a suffix of rows
# ---------------------------------------------------------------------------------------------
def gated_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                      aux_start: int) -> torch.Tensor:
    """:func:`invariant_linear` on every row plus ``scale * (x @ lora_a.T) @ lora_b.T`` on the
    rows ``x[:, aux_start:]`` only, in one call.

    This is the gated LoRA of a self-speculative drafter (``ptp.decode.lora.GatedLoRALinear``: the
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

    Differentiable in ``x``, ``weight``, ``bias``, ``lora_a`` and ``lora_b`` (float32 products,
    like :func:`invariant_linear`'s backward).
    """
    return _ops.gated_lora_linear(x, weight, bias, lora_a, lora_b, float(scale), int(aux_start))


@torch.library.register_fake("ptp_ext::gated_lora_linear")
def _gated_lora_linear_fake(x, weight, bias, lora_a, lora_b, scale, aux_start):
    _checks.gated_lora_linear_inputs(x, weight, bias, lora_a, lora_b, aux_start)
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))


def _gated_lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, aux_start = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.scale, ctx.aux_start = scale, aux_start


def _gated_lora_linear_backward(ctx, grad):
    # y = x W^T + b on every row, + scale * (x_a A^T) B^T on the rows x_a = x[:, aux_start:]:
    # with t = x_a A^T and g_t = scale * g_a B: dB = scale * g_a^T t, dA = g_t^T x_a, and the
    # auxiliary rows of dx gain g_t A.
    x, weight, lora_a, lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    M, K, R = weight.shape[0], weight.shape[1], lora_a.shape[0]
    g, xf = grad.float(), x.float()
    g_a, x_a = g[:, ctx.aux_start:], xf[:, ctx.aux_start:]
    g_t = ctx.scale * (g_a @ lora_b)  # [B, n, R]
    dx = dw = db = da = dbl = None
    if need[0]:
        dx = g @ weight.float()
        dx[:, ctx.aux_start:] += g_t @ lora_a
        dx = dx.to(x.dtype)
    if need[1]:
        dw = (g.reshape(-1, M).t() @ xf.reshape(-1, K)).to(weight.dtype)
    if ctx.bias_dtype is not None and need[2]:
        db = g.sum((0, 1)).to(ctx.bias_dtype)
    if need[3]:
        da = g_t.reshape(-1, R).t() @ x_a.reshape(-1, K)
    if need[4]:
        dbl = ctx.scale * (g_a.reshape(-1, M).t() @ (x_a @ lora_a.t()).reshape(-1, R))
    return dx, dw, db, da, dbl, None, None


torch.library.register_autograd("ptp_ext::gated_lora_linear", _gated_lora_linear_backward,
                                setup_context=_gated_lora_linear_setup)



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
    decoding call on a CPU. ``ptp.decode.quant`` builds the blocks of a model loaded from a GGUF and
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

    Inference-only: an input that requires grad raises (train on the dequantised weight).
    """
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., K], got a {x.dim()}-d tensor")
    lead = x.shape[:-1]
    y = _ops.quant_linear(x.reshape(lead.numel(), x.shape[-1]).contiguous(), qweight, str(format), bias)
    return y.view(*lead, y.shape[-1])


@torch.library.register_fake("ptp_ext::quant_linear")
def _quant_linear_fake(x, qweight, format, bias):
    _checks.quant_linear_inputs(x, qweight, format, bias)
    return x.new_empty((x.shape[0], qweight.shape[0]))


_register_inference_only("quant_linear", " (training: invariant_linear on the dequantised weight, "
                         "ptp_ext.reference.dequantize_ref)")


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
        ``(batch_size, seq_len, M)`` float32. Inference-only, like :func:`quant_linear`.
    """
    return _ops.gated_lora_quant_linear(x, qweight, str(format), bias, lora_a, lora_b, float(scale),
                                        int(aux_start))


@torch.library.register_fake("ptp_ext::gated_lora_quant_linear")
def _gated_lora_quant_linear_fake(x, qweight, format, bias, lora_a, lora_b, scale, aux_start):
    _checks.gated_lora_quant_linear_inputs(x, qweight, format, bias, lora_a, lora_b, aux_start)
    return x.new_empty((x.shape[0], x.shape[1], qweight.shape[0]))


_register_inference_only("gated_lora_quant_linear",
                         " (training: gated_lora_linear on the dequantised weight)")


# ---------------------------------------------------------------------------------------------
# decode_step: a Llama-family decoding call's whole layer stack in one op (CPU only)
# ---------------------------------------------------------------------------------------------
# weight format codes of decode_step / decode_linear ("q4_1_split": q4_1_split's layout)
DECODE_STEP_FORMATS = {"float32": 0, "q4_1": 1, "q8_0": 2, "q4_1_split": 3}


def q4_1_split(qweight: torch.Tensor) -> torch.Tensor:
    """Q4_1 GGUF blocks ``uint8 (M, K / 32 * 20)`` -> ``uint8 (M, K / 32 * 24)`` in the layout
    :func:`decode_step` reads fastest (format 3, ``"q4_1_split"``): each row's ``K / 32``
    ``(d, m)`` scale pairs as float32 (exact: every fp16 is a float32), then its ``K / 32`` x 16
    nibble bytes. The weights ``d * q + m`` stay bitwise the same.

    A block's scales then arrive as float32 broadcast loads instead of an fp16 load, convert and
    two broadcasts on the shuffle pipes, the bottleneck of a 1-row Q4_1 matvec on Zen 4. 20 % more
    bytes; SmolLM2's 1- and 2-row calls on the 2-core EPYC dev VM ~2 % faster (interleaved A/B,
    ``ptp.decode.native.SPLIT_Q4_1_MAX_THREADS``). A new tensor.
    """
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] % 20:
        raise ValueError("qweight must be uint8 Q4_1 blocks of shape (M, K / 32 * 20), got "
                         f"{tuple(qweight.shape)} {qweight.dtype}")
    M = qweight.shape[0]
    blocks = qweight.reshape(M, -1, 20)
    dm = blocks[..., :4].contiguous().view(torch.float16).float().reshape(M, -1)  # [M, 2 nb]
    return torch.cat([dm.view(torch.uint8), blocks[..., 4:].reshape(M, -1)], dim=1).contiguous()


def decode_step(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                cache_lens: torch.Tensor, tree_mask: Optional[torch.Tensor],
                weights: list[torch.Tensor], formats: list[int], biases: list[Optional[torch.Tensor]],
                norm_weights: list[torch.Tensor], lora_a: list[Optional[torch.Tensor]],
                lora_b: list[Optional[torch.Tensor]], lora_scales: list[float], aux_start: int,
                eps: float, scale: float) -> torch.Tensor:
    """The layer stack of one decoding call of a Llama / Mistral / Qwen2 model, in one op.

    For each of the L layers: RMSNorm, q / k / v projections, rotary, writing the new K / V at
    ``cache_lens[b] + t``, attention over the row's cache plus the call's tree
    (:func:`tree_attention`'s semantics; its kernel, or on AVX-512 CPUs a 16-lane form that
    needs no key transposes), o projection + residual, RMSNorm, SiLU-gated
    MLP + residual; then the final RMSNorm. Projections read GGUF blocks (:func:`quant_linear`'s
    kernel) or float32 weights (:func:`invariant_linear`'s), optionally with a gated-LoRA delta on
    the rows ``t >= aux_start`` of every batch row (:func:`gated_lora_linear`). One parallel region
    per call instead of ~40 op dispatches per layer. Every row's output is bitwise independent of
    the call's other rows (chains, trees, aux rows, batch). ``ptp.decode.native`` packs a model's
    weights for it.

    Parameters
    ----------
    hidden : torch.Tensor
        ``(batch_size, num_tokens, hidden_size)`` float32: the call's input embeddings.
    cos, sin : torch.Tensor
        ``(batch_size, num_tokens, head_dim)`` float32: the rotary tables at the rows' positions
        (the model's ``rotary_emb`` output).
    key_caches, value_caches : list of torch.Tensor
        One per layer, ``(batch_size, num_kv_heads, max_cache_len, head_dim)`` float32; written in
        place at ``cache_lens[b] .. cache_lens[b] + num_tokens - 1``.
    cache_lens : torch.Tensor
        ``(batch_size,)`` int32 / int64.
    tree_mask : torch.Tensor, optional
        ``(batch_size, num_tokens, num_tokens)`` bool (None: causal).
    weights : list of torch.Tensor
        ``7 * L``: per layer q, k, v, o, gate, up, down, each float32 ``(M, K)`` or uint8 GGUF
        blocks ``(M, K / 32 * block_bytes)``.
    formats : list of int
        Per weight: 0 float32, 1 q4_1, 2 q8_0, 3 q4_1 in :func:`q4_1_split`'s layout
        (:data:`DECODE_STEP_FORMATS`).
    biases : list of torch.Tensor or None
        Per weight, ``(M,)`` float32 or None.
    norm_weights : list of torch.Tensor
        ``2 * L + 1`` float32 ``(hidden_size,)``: input and post-attention norms per layer, then
        the final norm.
    lora_a, lora_b, lora_scales : list
        Empty (no adapter) or one entry per weight: ``(R, K)`` / ``(M, R)`` float32 or None, and
        the scale (alpha / rank).
    aux_start : int
        ``0 <= aux_start <= num_tokens``: the adapter's rows are ``t >= aux_start``.
    eps : float
        RMSNorm epsilon.
    scale : float
        Softmax scale.

    Returns
    -------
    torch.Tensor
        ``(batch_size, num_tokens, hidden_size)`` float32: the final normed hidden states.
    """
    if hidden.device.type != "cpu":
        raise ValueError(f"decode_step is CPU-only, got hidden on {hidden.device}")
    # formats as given (the op's int[] takes any integers; a per-element int() cost ~20 us a call
    # for SmolLM2's 210 weights)
    return _ops.decode_step(hidden, cos, sin, list(key_caches), list(value_caches), cache_lens,
                            tree_mask, list(weights), list(formats), list(biases),
                            list(norm_weights), list(lora_a), list(lora_b),
                            [float(s) for s in lora_scales], int(aux_start), float(eps), float(scale))


@torch.library.register_fake("ptp_ext::decode_step")
def _decode_step_fake(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask, weights,
                      formats, biases, norm_weights, lora_a, lora_b, lora_scales, aux_start, eps,
                      scale):
    torch._check(hidden.dim() == 3, lambda: "hidden must be [B, T, H]")
    torch._check(len(weights) == 7 * len(key_caches), lambda: "weights must hold 7 per layer")
    return hidden.new_empty(hidden.shape)



def decode_step_pack(weights: list[torch.Tensor], formats: list[int],
                     biases: list[Optional[torch.Tensor]], norm_weights: list[torch.Tensor],
                     lora_a: Optional[list[Optional[torch.Tensor]]] = None,
                     lora_b: Optional[list[Optional[torch.Tensor]]] = None,
                     lora_scales: Optional[list[float]] = None) -> int:
    """Hand :func:`decode_step`'s static arguments over once (CPU): a handle for
    :func:`decode_step_packed`, which then runs the step without converting the ~500 weight,
    bias and norm entries into the dispatcher's argument lists at every call (SmolLM2 on a
    2-core CPU: ~0.2-0.3 ms of a ~6.7 ms decoding step, measured in the decoding loop, where
    those objects are cold after the step's weight stream).

    The C++ side keeps a reference to every tensor until :func:`decode_step_release`; change
    none of them in place meanwhile (they are what the step reads). The weights are checked
    against the first call's shapes (and again whenever those change), with
    :func:`decode_step`'s messages.

    Parameters
    ----------
    weights, formats, biases, norm_weights, lora_a, lora_b, lora_scales
        As :func:`decode_step` (LoRA lists empty or None: no adapter).

    Returns
    -------
    int
        The handle.
    """
    return _ops.decode_step_pack(list(weights), [int(f) for f in formats], list(biases), list(norm_weights),
                                 list(lora_a or []), list(lora_b or []), [float(x) for x in (lora_scales or [])])


@torch.library.register_fake("ptp_ext::decode_step_pack")
def _decode_step_pack_fake(weights, formats, biases, norm_weights, lora_a, lora_b, lora_scales):
    return 0


def decode_step_packed(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                       cache_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], packed: int,
                       aux_start: int, eps: float, scale: float) -> torch.Tensor:
    """:func:`decode_step` over the static arguments of :func:`decode_step_pack`'s handle
    ``packed``: bitwise its result for the same arguments (CPU only; writes the caches).

    Parameters
    ----------
    hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask, aux_start, eps, scale
        As :func:`decode_step`.
    packed : int
        A handle of :func:`decode_step_pack`, not yet released (else ``ValueError``).

    Returns
    -------
    torch.Tensor
        ``(B, T, H)`` float32, as :func:`decode_step`.
    """
    if hidden.device.type != "cpu":
        raise ValueError(f"decode_step_packed is CPU-only, got hidden on {hidden.device}")
    return _ops.decode_step_packed(hidden, cos, sin, list(key_caches), list(value_caches), cache_lens,
                                   tree_mask, int(packed), int(aux_start), float(eps), float(scale))


@torch.library.register_fake("ptp_ext::decode_step_packed")
def _decode_step_packed_fake(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask,
                             packed, aux_start, eps, scale):
    torch._check(hidden.dim() == 3, lambda: "hidden must have shape [B, T, H]")
    return torch.empty_like(hidden)




def decode_logits_packed(tokens: torch.Tensor, position_ids: torch.Tensor,
                         key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                         cache_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], packed: int,
                         embed: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                         head_weight: torch.Tensor, head_format: int, head_bias: Optional[torch.Tensor],
                         eps: float, scale: float) -> torch.Tensor:
    """A whole decoding call from token ids to logits in one op (CPU only; writes the caches):
    bitwise ``decode_linear(decode_step_packed(embed[tokens], cos_table[position_ids],
    sin_table[position_ids], ...), head_weight, head_format, head_bias)``. After a step's weight
    stream every op of the decoding loop runs cache-cold; the embedding, the two rotary gathers
    and the head as separate ops took ~0.2 ms of a ~7.5 ms SmolLM2 call on a 2-core CPU.

    Parameters
    ----------
    tokens, position_ids : torch.Tensor
        ``(B, T)`` int64: the call's token ids (``< V``) and positions (``< P``).
    key_caches, value_caches, cache_lens, tree_mask, eps, scale
        As :func:`decode_step`.
    packed : int
        A handle of :func:`decode_step_pack` (no adapter rows), not yet released.
    embed : torch.Tensor
        ``(V, H)`` float32: the input embedding.
    cos_table, sin_table : torch.Tensor
        ``(P, D)`` float32: the model's rotary values at positions ``0 .. P - 1``.
    head_weight, head_format, head_bias
        The LM head, as :func:`decode_linear`'s ``weight``, ``format`` and ``bias``.

    Returns
    -------
    torch.Tensor
        ``(B, T, V_out)`` float32 logits.
    """
    if tokens.device.type != "cpu":
        raise ValueError(f"decode_logits_packed is CPU-only, got tokens on {tokens.device}")
    return _ops.decode_logits_packed(tokens, position_ids, list(key_caches), list(value_caches), cache_lens,
                                     tree_mask, int(packed), embed, cos_table, sin_table, head_weight,
                                     int(head_format), head_bias, float(eps), float(scale))


@torch.library.register_fake("ptp_ext::decode_logits_packed")
def _decode_logits_packed_fake(tokens, position_ids, key_caches, value_caches, cache_lens, tree_mask,
                               packed, embed, cos_table, sin_table, head_weight, head_format, head_bias,
                               eps, scale):
    torch._check(tokens.dim() == 2, lambda: "tokens must have shape [B, T]")
    return embed.new_empty((tokens.shape[0], tokens.shape[1], head_weight.shape[0]))


def decode_logits_hidden_packed(tokens: torch.Tensor, position_ids: torch.Tensor,
                                key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                                cache_lens: torch.Tensor, tree_mask: Optional[torch.Tensor], packed: int,
                                embed: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                                head_weight: torch.Tensor, head_format: int, head_bias: Optional[torch.Tensor],
                                eps: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_logits_packed` that also returns the step's output, for drafters that read
    the target's hidden states (the MTP heads beside prompt lookup). CPU only; writes the caches.

    Parameters
    ----------
    tokens, position_ids, key_caches, value_caches, cache_lens, tree_mask, packed, embed,
    cos_table, sin_table, head_weight, head_format, head_bias, eps, scale
        As :func:`decode_logits_packed`.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(logits, hidden)``: the ``(B, T, V_out)`` float32 logits (bitwise
        :func:`decode_logits_packed`'s) and the ``(B, T, H)`` float32 final-normed hidden states
        the LM head read (bitwise :func:`decode_step_packed`'s result).
    """
    if tokens.device.type != "cpu":
        raise ValueError(f"decode_logits_hidden_packed is CPU-only, got tokens on {tokens.device}")
    return _ops.decode_logits_hidden_packed(tokens, position_ids, list(key_caches), list(value_caches),
                                            cache_lens, tree_mask, int(packed), embed, cos_table, sin_table,
                                            head_weight, int(head_format), head_bias, float(eps), float(scale))


@torch.library.register_fake("ptp_ext::decode_logits_hidden_packed")
def _decode_logits_hidden_packed_fake(tokens, position_ids, key_caches, value_caches, cache_lens, tree_mask,
                                      packed, embed, cos_table, sin_table, head_weight, head_format, head_bias,
                                      eps, scale):
    torch._check(tokens.dim() == 2, lambda: "tokens must have shape [B, T]")
    B, T = tokens.shape
    return (embed.new_empty((B, T, head_weight.shape[0])), embed.new_empty((B, T, embed.shape[1])))


def decode_step_release(packed: int) -> None:
    """Drop :func:`decode_step_pack`'s references for the handle ``packed`` (``ValueError`` for an
    unknown or already released handle).

    Parameters
    ----------
    packed : int
        The handle.

    Returns
    -------
    None
    """
    _ops.decode_step_release(int(packed))


@torch.library.register_fake("ptp_ext::decode_step_release")
def _decode_step_release_fake(packed):
    return None


def decode_linear(x: torch.Tensor, weight: torch.Tensor, format: int,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One linear layer in :func:`decode_step`'s arithmetic (CPU only): the decoding call's LM head.

    The same register tiles as the step's projections (16-lane AVX-512 tiles where the CPU has
    them, else :func:`quant_linear` / :func:`invariant_linear`'s kernels), one OpenMP region, the
    output features split over the threads. Every row is bitwise independent of the call's other
    rows; it is not bitwise :func:`quant_linear` (another summation order). The decoder computes the
    logits of every native decoding call with it, so one run's logits all come from one arithmetic.

    Parameters
    ----------
    x : torch.Tensor
        ``(..., K)`` float32 on the CPU (contiguous).
    weight : torch.Tensor
        float32 ``(M, K)`` (``format`` 0) or uint8 GGUF blocks ``(M, K / 32 * block_bytes)``
        (``format`` 1: q4_1, 2: q8_0, 3: :func:`q4_1_split`'s q4_1; :data:`DECODE_STEP_FORMATS`),
        contiguous.
    format : int
        0, 1, 2 or 3.
    bias : torch.Tensor, optional
        ``(M,)`` float32.

    Returns
    -------
    torch.Tensor
        ``(..., M)`` float32. Inference-only.
    """
    if x.device.type != "cpu":
        raise ValueError(f"decode_linear is CPU-only, got x on {x.device}")
    return _ops.decode_linear(x, weight, int(format), bias)


@torch.library.register_fake("ptp_ext::decode_linear")
def _decode_linear_fake(x, weight, format, bias):
    torch._check(x.dim() >= 1, lambda: "x must have shape [..., K]")
    torch._check(weight.dim() == 2, lambda: "weight must be 2-D")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_register_inference_only("decode_linear", " (training: F.linear on the dequantised weight)")
