"""Pure-PyTorch references: the executable specification of every ptp_ext op.

Readable rather than fast: loops over batch rows and tree nodes, everything in float32 (the
compiled ops accumulate in float32 too). Tests compare the C++ and CUDA implementations against
these functions; the decoder and the drafters use :func:`sampling_probs` and :func:`pick` as the
one definition of the sampling distribution, so plain and speculative decoding sample from the
identical distribution.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "tree_attention_ref",
    "decode_step_ref",
    "sampling_probs",
    "pick",
    "verify_tree_ref",
    "sampler_mlp_ref",
    "invariant_linear_ref",
    "gated_lora_linear_ref",
    "dequantize_ref",
    "quantize_ref",
    "quant_linear_ref",
    "decode_linear_ref",
    "gated_lora_quant_linear_ref",
    "QUANT_BLOCK_BYTES",
    "chain_parents",
    "logits_valid",
    "uniforms_valid",
]


# ---------------------------------------------------------------------------------------------
# Tree attention
# ---------------------------------------------------------------------------------------------
def tree_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    tree_mask: Optional[torch.Tensor],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`ptp_ext.ops.tree_attention` (same arguments, same outputs).

    Non-finite inputs, the rule every backend follows: positions ``>= cache_lens[b] + T`` are
    never read; masked positions get score -inf (weight exactly 0) but their values still enter
    ``probs @ v`` (0 * inf = NaN); a query row with a NaN or +inf visible score gets NaN ``out``
    and ``lse``; a row whose visible scores are all -inf (or that sees nothing) gets 0 and -inf.
    """
    B, T, Hq, D = query.shape
    Hkv = key_cache.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, T, Hq, D, dtype=query.dtype, device=query.device)
    lse = torch.full((B, Hq, T), -math.inf, dtype=torch.float32, device=query.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    for b in range(B):
        L = int(cache_lens[b])
        k = key_cache[b, :, : L + T].float().repeat_interleave(G, dim=0)  # [Hq, L+T, D]
        v = value_cache[b, :, : L + T].float().repeat_interleave(G, dim=0)
        q = query[b].float().transpose(0, 1)  # [Hq, T, D]
        scores = (q @ k.transpose(1, 2)) * scale  # [Hq, T, L+T]
        visible = torch.ones(T, L + T, dtype=torch.bool, device=query.device)
        visible[:, L:] = tree_mask[b] if tree_mask is not None else causal
        scores = scores.masked_fill(~visible, -math.inf)
        bad = (scores.isnan() | scores.isposinf()).any(dim=-1)  # [Hq, T]: NaN rows
        seen = (scores > -math.inf).any(dim=-1) & ~bad  # [Hq, T]: some finite score
        row_lse = torch.logsumexp(scores, dim=-1)  # [Hq, T]
        safe_lse = torch.where(seen, row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # rows not seen: all 0
        o = probs @ v  # [Hq, T, D]
        o = torch.where(seen.unsqueeze(-1), o, torch.zeros_like(o))
        o = torch.where(bad.unsqueeze(-1), torch.full_like(o, math.nan), o)
        out[b] = o.transpose(0, 1).to(query.dtype)
        row_lse = torch.where(seen, row_lse, torch.full_like(row_lse, -math.inf))
        lse[b] = torch.where(bad, torch.full_like(row_lse, math.nan), row_lse)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Sampling distribution and inverse-CDF pick
# ---------------------------------------------------------------------------------------------
def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The sampling distribution of ptp: ``[..., V]`` logits -> ``[..., V]`` float32 probabilities.

    1. ``temperature == 0``: one-hot on the argmax (ties: the lowest id); nothing else applies.
    2. logits / temperature.
    3. top-k (``0 < top_k < V``): keep the ``top_k`` largest logits, ties broken by the lowest id.
    4. softmax over what is kept.
    5. top-p (``top_p < 1``): sort by probability (descending, ties by lowest id), keep the
       shortest prefix whose mass reaches ``top_p`` (a token is kept when the mass *before* it is
       < ``top_p``), renormalise.
    """
    x = logits.float()
    V = x.shape[-1]
    if temperature == 0:
        return F.one_hot(x.argmax(dim=-1), V).float()
    x = x / temperature
    if 0 < top_k < V:
        idx = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :top_k]
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
        x = x.masked_fill(~keep, -math.inf)
    p = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(p, dim=-1, descending=True, stable=True)
        before = sp.cumsum(dim=-1) - sp
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, si, before < top_p)
        p = p.masked_fill(~keep, 0.0)
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def pick(u: float, probs: torch.Tensor) -> int:
    """``Pick(u, P) = min{j : F(j) > u}`` over ids in order (F the CDF of ``probs [V]``).

    When rounding leaves ``F(V-1) <= u``, the last id with non-zero probability is returned.
    """
    cdf = probs.double().cumsum(dim=0)
    hit = torch.nonzero(cdf > u)
    if hit.numel():
        return int(hit[0, 0])
    return int(torch.nonzero(probs > 0)[-1, 0])


def chain_parents(batch: int, num_nodes: int, device=None) -> torch.Tensor:
    """Parents ``[batch, num_nodes]`` of a chain: ``-1, 0, 1, ..., num_nodes - 2``."""
    p = torch.arange(-1, num_nodes - 1, dtype=torch.long, device=device)
    return p.unsqueeze(0).expand(batch, num_nodes).contiguous()


# ---------------------------------------------------------------------------------------------
# Verify
# ---------------------------------------------------------------------------------------------
def logits_valid(logits: torch.Tensor, temperature: float) -> bool:
    """Can a token be drawn from this ``[V]`` logits row? ``x = logits / temperature``
    (``logits`` itself when ``temperature == 0``, i.e. argmax) must hold no NaN and no +inf and
    at least one entry above -inf; -inf entries are masks (probability 0)."""
    x = logits.float() if temperature == 0 else logits.float() / temperature
    return not bool(torch.isnan(x).any() or torch.isposinf(x).any()) and bool(torch.isfinite(x).any())


def uniforms_valid(uniforms: torch.Tensor) -> bool:
    """Every entry in ``[0, 1)`` (NaN fails)."""
    return bool(((uniforms >= 0) & (uniforms < 1)).all())


def verify_tree_ref(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    uniforms: Optional[torch.Tensor],
    mode: str,
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`ptp_ext.ops.verify_tree` (same arguments, same outputs).

    At the current node c (starting at the root, node 0) the children are the nodes j with
    ``parents[j] == c``, tried in index order.

    * ``greedy``: the target's token at c is the argmax of its logits; the first child holding
      that token is accepted, else the argmax is the next token and the walk stops.
    * ``coupled`` (PTP): the target's token at c is ``Pick(uniforms[depth(c)], P_c)`` with
      ``P_c = sampling_probs(logits_c, ...)``; accepted and stopped as for greedy.
    * ``rejection`` (SpecInfer / EAGLE recursive rejection sampling): p = P_c; child j with token
      x is accepted when ``uniforms[j] * q_j(x) < p(x)``; a rejected child turns p into
      ``norm(max(p - q_j, 0))`` (p unchanged if that is all zero); when every child is rejected
      (or c is a leaf) the next token is ``Pick(uniforms[0], p)``.

    Invalid rows: in modes ``coupled`` and ``rejection`` a row with a uniform outside [0, 1), and
    in every mode a row whose walk reaches a node whose logits fail :func:`logits_valid` (at the
    temperature the mode samples with), return ``num_accepted = 0``,
    ``accepted_nodes = [0, -1, ...]`` and ``next_token = -1``.
    """
    B, N1, V = target_logits.shape
    num_accepted = torch.zeros(B, dtype=torch.long)
    accepted = torch.full((B, N1), -1, dtype=torch.long)
    next_token = torch.zeros(B, dtype=torch.long)
    if mode not in ("greedy", "coupled", "rejection"):
        raise ValueError(f"mode must be one of 'greedy', 'coupled', 'rejection', got {mode!r}")
    t_eff = temperature if mode != "greedy" else 0.0
    for b in range(B):
        c, depth, path = 0, 0, [0]
        invalid = mode != "greedy" and not uniforms_valid(uniforms[b])
        while not invalid:
            if not logits_valid(target_logits[b, c], t_eff):
                invalid = True
                break
            children = [j for j in range(1, N1) if int(parents[b, j]) == c]
            P = sampling_probs(target_logits[b, c], t_eff, top_k, top_p)
            nxt = None
            if mode in ("greedy", "coupled"):
                u = float(uniforms[b, depth]) if mode == "coupled" else 0.0
                t = pick(u, P)
                for j in children:
                    if int(draft_tokens[b, j]) == t:
                        nxt = j
                        break
                if nxt is None:
                    next_token[b] = t
            elif mode == "rejection":
                p = P.double()
                for j in children:
                    x = int(draft_tokens[b, j])
                    q = draft_probs[b, j].double()
                    if float(uniforms[b, j]) * float(q[x]) < float(p[x]):
                        nxt = j
                        break
                    r = (p - q).clamp_min(0.0)
                    if float(r.sum()) > 0:
                        p = r / r.sum()
                if nxt is None:
                    next_token[b] = pick(float(uniforms[b, 0]), p)
            if nxt is None:
                break
            c, depth = nxt, depth + 1
            path.append(c)
        if invalid:
            path = [0]
            next_token[b] = -1
        num_accepted[b] = len(path) - 1
        accepted[b, : len(path)] = torch.tensor(path)
    dev = target_logits.device
    return num_accepted.to(dev), accepted.to(dev), next_token.to(dev)


# ---------------------------------------------------------------------------------------------
# Sampler-head MLP
# ---------------------------------------------------------------------------------------------
def sampler_mlp_ref(
    hidden: torch.Tensor,
    prev_tokens: torch.Tensor,
    embedding: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    norm1_weight: Optional[torch.Tensor],
    norm1_bias: Optional[torch.Tensor],
    norm2_weight: Optional[torch.Tensor],
    norm2_bias: Optional[torch.Tensor],
    silu_out: bool,
    eps: float,
) -> torch.Tensor:
    """Reference for :func:`ptp_ext.ops.sampler_mlp`; differentiable (training uses it)."""

    def f(t):
        return None if t is None else t.float()

    x = torch.cat([hidden.float(), embedding[prev_tokens].float()], dim=-1)
    h = F.silu(F.linear(x, w1.float(), f(b1)))
    if norm1_weight is not None:
        h = F.layer_norm(h, (h.shape[-1],), f(norm1_weight), f(norm1_bias), eps)
    y = F.linear(h, w2.float(), f(b2))
    if silu_out:
        y = F.silu(y)
    if norm2_weight is not None:
        y = F.layer_norm(y, (y.shape[-1],), f(norm2_weight), f(norm2_bias), eps)
    return y.to(hidden.dtype)


def invariant_linear_ref(x: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference for :func:`ptp_ext.ops.invariant_linear`: ``F.linear`` in float32 (equal up to
    rounding; it is not row-invariant itself)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def gated_lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                          aux_start: int) -> torch.Tensor:
    """Reference for :func:`ptp_ext.ops.gated_lora_linear`: the base linear on every row, the
    LoRA delta (float32) added on the rows ``x[:, aux_start:]``."""
    y = invariant_linear_ref(x, weight, bias)
    tail = x[:, aux_start:].float()
    delta = (tail @ lora_a.float().t()) @ lora_b.float().t() * scale
    out = y.float()
    out[:, aux_start:] = y[:, aux_start:].float() + delta
    return out.to(x.dtype)



# ---------------------------------------------------------------------------------------------
# GGUF block formats (quant_linear)
# ---------------------------------------------------------------------------------------------
QUANT_BLOCK_BYTES = {"q8_0": 34, "q4_1": 20}  # bytes per block of 32 weights


def dequantize_ref(qweight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``uint8 [M, K / 32 * bytes]`` GGUF blocks -> float32 ``[M, K]``, the formulas of the gguf
    package (which transformers uses to load a GGUF): Q8_0 ``d * q``; Q4_1 ``d * q + m`` with the
    low nibbles of the 16 bytes as weights 0-15 and the high nibbles as 16-31 of each block."""
    if fmt not in QUANT_BLOCK_BYTES:
        raise ValueError(f"format must be one of {sorted(QUANT_BLOCK_BYTES)}, got {fmt!r}")
    bb = QUANT_BLOCK_BYTES[fmt]
    M = qweight.shape[0]
    blocks = qweight.reshape(M, -1, bb)
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # [M, nb, 1]
    if fmt == "q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(M, -1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    qs = blocks[..., 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
    return (d * q + m).reshape(M, -1)


def quantize_ref(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """float ``[M, K]`` (K a multiple of 32) -> GGUF blocks ``uint8 [M, K / 32 * bytes]`` (for
    tests and benchmarks: round-to-nearest block quantisation, as llama.cpp's reference
    quantiser does it)."""
    if fmt not in QUANT_BLOCK_BYTES:
        raise ValueError(f"format must be one of {sorted(QUANT_BLOCK_BYTES)}, got {fmt!r}")
    M, K = weight.shape
    if K % 32:
        raise ValueError(f"K must be a multiple of 32, got {K}")
    w = weight.float().reshape(M, K // 32, 32)
    if fmt == "q8_0":
        amax = w.abs().amax(-1, keepdim=True)
        d = (amax / 127.0).to(torch.float16)
        inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(amax))
        q = (w * inv).round().clamp(-128, 127).to(torch.int8)
        return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=-1).reshape(M, -1)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    d = ((hi - lo) / 15.0).to(torch.float16)
    m = lo.to(torch.float16)
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros_like(lo))
    q = ((w - m.float()) * inv).round().clamp(0, 15).to(torch.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([d.view(torch.uint8), m.view(torch.uint8), qs], dim=-1).reshape(M, -1)


def quant_linear_ref(x: torch.Tensor, qweight: torch.Tensor, fmt: str,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference for :func:`ptp_ext.ops.quant_linear`: ``F.linear`` on the dequantised weights."""
    return invariant_linear_ref(x, dequantize_ref(qweight, fmt), bias)


def gated_lora_quant_linear_ref(x: torch.Tensor, qweight: torch.Tensor, fmt: str,
                                bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                                lora_b: torch.Tensor, scale: float, aux_start: int) -> torch.Tensor:
    """Reference for :func:`ptp_ext.ops.gated_lora_quant_linear`: :func:`gated_lora_linear_ref`
    over the dequantised weights."""
    return gated_lora_linear_ref(x, dequantize_ref(qweight, fmt), bias, lora_a, lora_b, scale, aux_start)


# ---------------------------------------------------------------------------------------------
# decode_step
# ---------------------------------------------------------------------------------------------
def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half_ref(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _decode_step_weight_ref(weight: torch.Tensor, format: int) -> torch.Tensor:
    """A decode_step weight as float32 ``[M, K]`` (format 0 float32, 1 q4_1, 2 q8_0, 3 q4_1 in
    ``ops.q4_1_split``'s layout: a row's (d, m) float32 pairs, then its nibble bytes)."""
    if format == 0:
        return weight
    if format == 3:
        M, nb = weight.shape[0], weight.shape[1] // 24
        dm = weight[:, :8 * nb].contiguous().view(torch.float32).reshape(M, nb, 2)
        qs = weight[:, 8 * nb:].reshape(M, nb, 16)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
        return (dm[..., :1] * q + dm[..., 1:]).reshape(M, -1)
    return dequantize_ref(weight, {1: "q4_1", 2: "q8_0"}[format])


def decode_linear_ref(x: torch.Tensor, weight: torch.Tensor, format: int,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference for :func:`ptp_ext.ops.decode_linear`: ``F.linear`` on the dequantised weights."""
    return torch.nn.functional.linear(x, _decode_step_weight_ref(weight, format), bias)


def decode_step_ref(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask, weights,
                    formats, biases, norm_weights, lora_a, lora_b, lora_scales, aux_start, eps,
                    scale) -> torch.Tensor:
    """Reference for :func:`ptp_ext.ops.decode_step`: the Llama decoder layer written out
    (``F.linear`` on the dequantised weights, :func:`tree_attention_ref`); writes the caches."""
    B, T, H = hidden.shape
    D = cos.shape[-1]
    L = len(key_caches)
    lens = cache_lens.long()

    def linear(i: int, x: torch.Tensor) -> torch.Tensor:
        w = _decode_step_weight_ref(weights[i], formats[i])
        y = F.linear(x, w, biases[i])
        if lora_a and lora_a[i] is not None and aux_start < T:
            tail = x[:, aux_start:]
            y = y.clone()
            y[:, aux_start:] = y[:, aux_start:] + lora_scales[i] * ((tail @ lora_a[i].t()) @ lora_b[i].t())
        return y

    h = hidden.float()
    for layer in range(L):
        i = 7 * layer
        x = _rms_norm_ref(h, norm_weights[2 * layer], eps)
        q = linear(i, x).view(B, T, -1, D)
        k = linear(i + 1, x).view(B, T, -1, D)
        v = linear(i + 2, x).view(B, T, -1, D)
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        q = q * c + _rotate_half_ref(q) * s
        k = k * c + _rotate_half_ref(k) * s
        for b in range(B):
            pos = int(lens[b])
            key_caches[layer][b, :, pos:pos + T] = k[b].transpose(0, 1)
            value_caches[layer][b, :, pos:pos + T] = v[b].transpose(0, 1)
        a, _ = tree_attention_ref(q.contiguous(), key_caches[layer], value_caches[layer], cache_lens,
                                  tree_mask, scale)
        h = h + linear(i + 3, a.reshape(B, T, -1))
        x = _rms_norm_ref(h, norm_weights[2 * layer + 1], eps)
        h = h + linear(i + 6, F.silu(linear(i + 4, x)) * linear(i + 5, x))
    return _rms_norm_ref(h, norm_weights[2 * L], eps)

