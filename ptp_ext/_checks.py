"""The argument checks of the C++ ops (``csrc/*/<op>.h``: ``check_<op>_inputs``), in Python, for
the fake (meta) implementations in :mod:`ptp_ext.ops`.

Under ``FakeTensorMode`` / ``torch.compile`` / the meta device the C++ checks never run, so each
fake calls its op's mirror here first: the same checks in the same order with the same
``ValueError`` messages (dtype names as C++ prints them: ``Float``, ``Long``...). Checks that
read tensor *values* (index ranges on the CPU) are the C++ side's only. Size comparisons go
through ``torch._check_value`` so that symbolic sizes become deferred runtime asserts, not
specialisations.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

# c10::toString(ScalarType), as the C++ messages print dtypes
_DTYPE_NAMES = {
    torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.float64: "Double", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
}
_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def describe(t: torch.Tensor) -> str:
    """``"Float [2, 8, 9] on cpu"``, like ``ptp::describe``."""
    return f"{dtype_name(t.dtype)} {list(t.shape)} on {t.device}"


def _g(x: float) -> str:  # C++ "%g"
    return f"{x:g}"


def check(cond, msg: Callable[[], str]) -> None:
    torch._check_value(cond, msg)


def check_shape(t: torch.Tensor, name: str, shape: str, sizes: Sequence[Optional[int]]) -> None:
    """``t.dim() == len(sizes)`` and every size that is not None matches."""
    exp = "[" + ", ".join("*" if s is None else str(s) for s in sizes) + "]"

    def msg() -> str:
        return f"{name} must have shape {shape} = {exp}, got {describe(t)}"

    check(t.dim() == len(sizes), msg)
    for i, s in enumerate(sizes):
        if s is not None:
            check(t.shape[i] == s, msg)


def check_float(t: torch.Tensor, name: str) -> None:
    check(t.dtype in _FLOAT_TYPES,
          lambda: f"{name} must be float32, float16 or bfloat16, got {describe(t)}")


def check_dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    check(t.dtype == dtype, lambda: f"{name} must be {dtype_name(dtype)}, got {describe(t)}")


def check_same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    check(t.device == ref.device,
          lambda: f"{name} must be on the same device as {ref_name} ({ref.device}), got "
                  f"{describe(t)}")


def check_contiguous(t: torch.Tensor, name: str) -> None:
    check(t.is_contiguous(),
          lambda: f"{name} must be contiguous, got strides {list(t.stride())} for {describe(t)}")


# ---------------------------------------------------------------------------------------------
# tree_attention (csrc/tree_attention/tree_attention.h)
# ---------------------------------------------------------------------------------------------
def tree_attention_inputs(query, key_cache, value_cache, cache_lens, tree_mask) -> None:
    check_float(query, "query")
    check(query.dim() == 4, lambda: f"query must have shape [B, T, H_q, D], got {describe(query)}")
    B, T, Hq, D = query.shape
    check(key_cache.dim() == 4,
          lambda: f"key_cache must have shape [B, H_kv, S_max, D], got {describe(key_cache)}")
    Hkv, S = key_cache.shape[1], key_cache.shape[2]
    check_shape(key_cache, "key_cache", "[B, H_kv, S_max, D]", (B, None, None, D))
    check_shape(value_cache, "value_cache", "[B, H_kv, S_max, D]", (B, Hkv, S, D))
    check_dtype(key_cache, query.dtype, "key_cache")
    check_dtype(value_cache, query.dtype, "value_cache")
    check(Hkv > 0 and Hq > 0 and Hq % Hkv == 0,
          lambda: f"query heads H_q={Hq} must be a positive multiple of key_cache heads H_kv={Hkv}")
    check(T >= 1, lambda: f"query must hold at least one new token (T >= 1), got {describe(query)}")
    check(T <= S, lambda: f"T={T} new tokens do not fit in the cache (S_max={S})")
    check(D >= 1 and D <= 256, lambda: f"head dim D must be in [1, 256], got {D}")
    check(cache_lens.dtype in (torch.int32, torch.int64),
          lambda: f"cache_lens must be int32 or int64 [B], got {describe(cache_lens)}")
    check_shape(cache_lens, "cache_lens", "[B]", (B,))
    check_same_device(key_cache, query, "key_cache", "query")
    check_same_device(value_cache, query, "value_cache", "query")
    check_same_device(cache_lens, query, "cache_lens", "query")
    check_contiguous(query, "query")
    check_contiguous(key_cache, "key_cache")
    check_contiguous(value_cache, "value_cache")
    if tree_mask is not None:
        m = tree_mask
        msg = lambda: f"tree_mask must be bool [B, T, T] = [{B}, {T}, {T}], got {describe(m)}"  # noqa: E731
        check(m.dtype == torch.bool and m.dim() == 3, msg)
        check(m.shape[0] == B and m.shape[1] == T and m.shape[2] == T, msg)
        check_same_device(m, query, "tree_mask", "query")
        check_contiguous(m, "tree_mask")


# ---------------------------------------------------------------------------------------------
# verify_tree (csrc/verify/verify.h)
# ---------------------------------------------------------------------------------------------
VERIFY_MODES = ("greedy", "coupled", "rejection")


def verify_inputs(draft_tokens, parents, target_logits, draft_probs, uniforms, mode,
                  temperature, top_k, top_p) -> None:
    check(mode in VERIFY_MODES,
          lambda: f"mode must be one of 'greedy', 'coupled', 'rejection', got '{mode}'")
    check(target_logits.dim() == 3,
          lambda: f"target_logits must have shape [B, N+1, V], got {describe(target_logits)}")
    check_float(target_logits, "target_logits")
    B, N1, V = target_logits.shape
    check(N1 >= 1 and V >= 1,
          lambda: f"target_logits must have N+1 >= 1 nodes and V >= 1, got "
                  f"{describe(target_logits)}")
    check_dtype(draft_tokens, torch.int64, "draft_tokens")
    check_shape(draft_tokens, "draft_tokens", "[B, N+1]", (B, N1))
    check_dtype(parents, torch.int64, "parents")
    check_shape(parents, "parents", "[B, N+1]", (B, N1))
    check_same_device(draft_tokens, target_logits, "draft_tokens", "target_logits")
    check_same_device(parents, target_logits, "parents", "target_logits")
    check_contiguous(draft_tokens, "draft_tokens")
    check_contiguous(parents, "parents")
    check_contiguous(target_logits, "target_logits")
    check(temperature >= 0.0, lambda: f"temperature must be >= 0, got {_g(temperature)}")
    check(0.0 < top_p <= 1.0, lambda: f"top_p must be in (0, 1], got {_g(top_p)}")
    check(top_k >= 0, lambda: f"top_k must be >= 0 (0 = disabled), got {top_k}")
    if mode == "rejection":
        check(draft_probs is not None, lambda: "mode 'rejection' needs draft_probs [B, N+1, V]")
        check_dtype(draft_probs, torch.float32, "draft_probs")
        check_shape(draft_probs, "draft_probs", "[B, N+1, V]", (B, N1, V))
        check_same_device(draft_probs, target_logits, "draft_probs", "target_logits")
        check_contiguous(draft_probs, "draft_probs")
    if mode != "greedy":
        check(uniforms is not None, lambda: f"mode '{mode}' needs uniforms [B, N+1]")
        u = uniforms
        check(u.dtype in (torch.float32, torch.float64),
              lambda: f"uniforms must be float32 or float64 [B, N+1], got {describe(u)}")
        check_shape(u, "uniforms", "[B, N+1]", (B, N1))
        check_same_device(u, target_logits, "uniforms", "target_logits")
        check_contiguous(u, "uniforms")


# ---------------------------------------------------------------------------------------------
# sampler_mlp (csrc/sampler_mlp/sampler_mlp.h)
# ---------------------------------------------------------------------------------------------
def _optional_vector(t, name, size, like) -> None:
    if t is None:
        return
    check_shape(t, name, "[d]", (size,))
    check_dtype(t, like.dtype, name)
    check_same_device(t, like, name, "hidden")
    check_contiguous(t, name)


def sampler_mlp_inputs(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight, norm1_bias,
                       norm2_weight, norm2_bias) -> None:
    check_float(hidden, "hidden")
    check(hidden.dim() == 2, lambda: f"hidden must have shape [N, d_h], got {describe(hidden)}")
    N, dh = hidden.shape
    check_dtype(prev_tokens, torch.int64, "prev_tokens")
    check_shape(prev_tokens, "prev_tokens", "[N]", (N,))
    check(embedding.dim() == 2,
          lambda: f"embedding must have shape [V, d_e], got {describe(embedding)}")
    check_dtype(embedding, hidden.dtype, "embedding")
    de = embedding.shape[1]
    check(w1.dim() == 2, lambda: f"w1 must have shape [d_mid, d_h + d_e] = [*, {dh + de}], got "
                                 f"{describe(w1)}")
    check(w1.shape[1] == dh + de, lambda: f"w1 must have shape [d_mid, d_h + d_e] = "
                                          f"[*, {dh + de}], got {describe(w1)}")
    check_dtype(w1, hidden.dtype, "w1")
    dmid = w1.shape[0]
    check(w2.dim() == 2,
          lambda: f"w2 must have shape [d_out, d_mid] = [*, {dmid}], got {describe(w2)}")
    check(w2.shape[1] == dmid,
          lambda: f"w2 must have shape [d_out, d_mid] = [*, {dmid}], got {describe(w2)}")
    check_dtype(w2, hidden.dtype, "w2")
    dout = w2.shape[0]
    check(dmid >= 1 and dout >= 1, lambda: "w1 and w2 must have at least one output row")
    check_same_device(prev_tokens, hidden, "prev_tokens", "hidden")
    check_same_device(embedding, hidden, "embedding", "hidden")
    check_same_device(w1, hidden, "w1", "hidden")
    check_same_device(w2, hidden, "w2", "hidden")
    for t, name in ((hidden, "hidden"), (prev_tokens, "prev_tokens"), (embedding, "embedding"),
                    (w1, "w1"), (w2, "w2")):
        check_contiguous(t, name)
    _optional_vector(b1, "b1", dmid, hidden)
    _optional_vector(b2, "b2", dout, hidden)
    _optional_vector(norm1_weight, "norm1_weight", dmid, hidden)
    _optional_vector(norm1_bias, "norm1_bias", dmid, hidden)
    _optional_vector(norm2_weight, "norm2_weight", dout, hidden)
    _optional_vector(norm2_bias, "norm2_bias", dout, hidden)
    check(norm1_bias is None or norm1_weight is not None, lambda: "norm1_bias needs norm1_weight")
    check(norm2_bias is None or norm2_weight is not None, lambda: "norm2_bias needs norm2_weight")


# ---------------------------------------------------------------------------------------------
# invariant_linear, gated_lora_linear, quant_linear, gated_lora_quant_linear
# (csrc/invariant_linear/*.h)
# ---------------------------------------------------------------------------------------------
QUANT_BLOCK_BYTES = {"q8_0": 34, "q4_1": 20}


def _weight_mk(weight, K) -> None:
    check(weight.dim() == 2,
          lambda: f"weight must have shape [M, K] = [*, {K}], got {describe(weight)}")
    check(weight.shape[1] == K,
          lambda: f"weight must have shape [M, K] = [*, {K}], got {describe(weight)}")


def invariant_linear_inputs(x, weight, bias) -> None:
    check_float(x, "x")
    check(x.dim() == 2, lambda: f"x must have shape [N, K], got {describe(x)}")
    _weight_mk(weight, x.shape[1])
    check_dtype(weight, x.dtype, "weight")
    check_same_device(weight, x, "weight", "x")
    check_contiguous(x, "x")
    check_contiguous(weight, "weight")
    if bias is not None:
        check_shape(bias, "bias", "[M]", (weight.shape[0],))
        check_dtype(bias, x.dtype, "bias")
        check_same_device(bias, x, "bias", "x")
        check_contiguous(bias, "bias")


def lora_inputs(x, M, lora_a, lora_b, aux_start) -> None:
    check(x.dim() == 3, lambda: f"x must have shape [B, S, K], got {describe(x)}")
    check_contiguous(x, "x")
    S, K = x.shape[1], x.shape[2]
    msg = lambda: f"lora_a must have shape [R, K] = [*, {K}], got {describe(lora_a)}"  # noqa: E731
    check(lora_a.dim() == 2, msg)
    check(lora_a.shape[1] == K, msg)
    check_shape(lora_b, "lora_b", "[M, R]", (M, lora_a.shape[0]))
    check_dtype(lora_a, torch.float32, "lora_a")
    check_dtype(lora_b, torch.float32, "lora_b")
    check_same_device(lora_a, x, "lora_a", "x")
    check_same_device(lora_b, x, "lora_b", "x")
    check_contiguous(lora_a, "lora_a")
    check_contiguous(lora_b, "lora_b")
    check(0 <= aux_start <= S, lambda: f"aux_start must be in [0, S] = [0, {S}], got {aux_start}")


def gated_lora_linear_inputs(x, weight, bias, lora_a, lora_b, aux_start) -> None:
    check_float(x, "x")
    check(x.dim() == 3, lambda: f"x must have shape [B, S, K], got {describe(x)}")
    K = x.shape[2]
    _weight_mk(weight, K)
    lora_inputs(x, weight.shape[0], lora_a, lora_b, aux_start)
    invariant_linear_inputs(x.view(x.shape[0] * x.shape[1], K), weight, bias)


def quant_linear_inputs(x, qweight, format, bias) -> None:
    check(format in QUANT_BLOCK_BYTES, lambda: f"format must be 'q8_0' or 'q4_1', got '{format}'")
    bb = QUANT_BLOCK_BYTES[format]
    check_dtype(x, torch.float32, "x")
    check(x.dim() == 2, lambda: f"x must have shape [N, K], got {describe(x)}")
    K = x.shape[1]
    check(K % 32 == 0, lambda: f"x's K must be a multiple of 32 (the block size), got {K}")
    check_dtype(qweight, torch.uint8, "qweight")
    width = K // 32 * bb
    msg = lambda: (f"qweight must have shape [M, K / 32 * {bb}] = [*, {width}] for {format}, "  # noqa: E731
                   f"got {describe(qweight)}")
    check(qweight.dim() == 2, msg)
    check(qweight.shape[1] == width, msg)
    check_same_device(qweight, x, "qweight", "x")
    check_contiguous(x, "x")
    check_contiguous(qweight, "qweight")
    if bias is not None:
        check_shape(bias, "bias", "[M]", (qweight.shape[0],))
        check_dtype(bias, torch.float32, "bias")
        check_same_device(bias, x, "bias", "x")
        check_contiguous(bias, "bias")


def gated_lora_quant_linear_inputs(x, qweight, format, bias, lora_a, lora_b, aux_start) -> None:
    check_dtype(x, torch.float32, "x")
    check(x.dim() == 3, lambda: f"x must have shape [B, S, K], got {describe(x)}")
    check_contiguous(x, "x")
    quant_linear_inputs(x.view(x.shape[0] * x.shape[1], x.shape[2]), qweight, format, bias)
    lora_inputs(x, qweight.shape[0], lora_a, lora_b, aux_start)
