// decode_step: the whole layer stack of a Llama-family decoding call (Llama, Mistral, Qwen2) in one
// op: for every layer, RMSNorm -> q/k/v projections -> rotary -> KV-cache write -> tree attention
// over the row's cache and the call's tree -> o projection + residual -> RMSNorm -> SiLU-gated MLP
// + residual; then the final RMSNorm. The projections read GGUF blocks (Q4_1 / Q8_0, quant_linear's
// kernels) or float32 weights (invariant_linear's), with an optional gated-LoRA delta on a suffix
// of every batch row (the drafters' aux rows); the attention is tree_attention's CPU kernel.
//
// Why: a decoding call of a 135M model on a CPU is mostly per-op overhead (~40 op dispatches and
// thread-pool fork/joins per layer, Python between them); here one OpenMP parallel region runs
// the whole step, threads meeting at barriers between the phases of a layer.
//
// Row invariance: every output element is one fixed sequence of float32 operations over its own
// row (norms, projections through the same register tiles as invariant_linear, attention in fixed
// key chunks as tree_attention), whatever the call's row count, tree shape or thread split.
//
//   hidden        [B, T, H]  float32 (the call's input embeddings; aux rows included)
//   cos, sin      [B, T, D]  float32 (the model's rotary tables at the rows' positions)
//   key_caches    L x [B, H_kv, S, D] float32, written at cache_lens[b] + t (in place)
//   value_caches  L x [B, H_kv, S, D] float32
//   cache_lens    [B] int32 / int64, tree_mask [B, T, T] bool or None (causal)
//   weights       7L tensors, per layer q, k, v, o, gate, up, down: float32 [M, K] or uint8 GGUF
//                 blocks [M, K / 32 * bytes] (formats: 0 float32, 1 q4_1, 2 q8_0, 3 q4_1 split:
//                 each row's K / 32 (d, m) scale pairs as float32, then its K / 32 x 16 nibble
//                 bytes, 24 bytes per block; ops.q4_1_split)
//   biases        7L optional float32 [M];  norm_weights 2L + 1 float32 [H] (ln1, ln2 per layer,
//                 then the final norm)
//   lora_a/lora_b empty, or 7L optional float32 [R, K] / [M, R]; lora_scales 7L (or empty);
//                 the delta applies to rows t >= aux_start of every batch row
// returns the final normed hidden states [B, T, H] float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common/checks.h"

namespace ptp {

constexpr int64_t kDecodeStepLinears = 7;  // q, k, v, o, gate, up, down
constexpr const char* kDecodeStepNames[kDecodeStepLinears] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"};

inline int64_t decode_step_block_bytes(int64_t format) {
  return format == 1 ? 20 : format == 3 ? 24 : format == 2 ? 34 : 0;
}
#define PTP_DECODE_STEP_FORMATS "0 (float32), 1 (q4_1), 2 (q8_0) or 3 (q4_1 split)"

// The checks of a call's own arguments (everything but the weights).
inline void check_decode_step_call(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                   at::TensorList key_caches, at::TensorList value_caches,
                                   const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                                   int64_t aux_start) {
  check_dtype(hidden, at::kFloat, "hidden");
  PTP_CHECK(hidden.dim() == 3, "hidden must have shape [B, T, H], got ", describe(hidden));
  PTP_CHECK(hidden.device().is_cpu(), "decode_step is CPU-only, got hidden ", describe(hidden));
  check_contiguous(hidden, "hidden");
  const int64_t B = hidden.size(0), T = hidden.size(1);
  PTP_CHECK(T >= 1, "hidden must hold at least one token (T >= 1), got ", describe(hidden));
  PTP_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T,
            "cos must have shape [B, T, D] = [", B, ", ", T, ", *], got ", describe(cos));
  const int64_t D = cos.size(2);
  PTP_CHECK(D >= 2 && D <= 256 && D % 2 == 0, "head dim D (cos.size(2)) must be even in [2, 256], got ", D);
  check_shape(sin, "sin", "[B, T, D]", {B, T, D});
  for (const auto* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    check_dtype(*t, at::kFloat, name);
    check_same_device(*t, hidden, name, "hidden");
    check_contiguous(*t, name);
  }
  const int64_t L = static_cast<int64_t>(key_caches.size());
  PTP_CHECK(L >= 1, "key_caches must hold one tensor per layer (at least one), got none");
  PTP_CHECK(static_cast<int64_t>(value_caches.size()) == L, "value_caches must hold ", L,
            " tensors (one per layer, as key_caches), got ", value_caches.size());
  PTP_CHECK(key_caches[0].dim() == 4, "key_caches[0] must have shape [B, H_kv, S, D], got ",
            describe(key_caches[0]));
  const int64_t Hkv = key_caches[0].size(1), S = key_caches[0].size(2);
  // Per-tensor checks test cheaply first and name the tensor only to report a failure (the
  // names of ~330 tensors built at every call cost ~0.2 ms of a ~6 ms SmolLM2 decoding call).
  const auto fits = [&](const at::Tensor& t, at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
    if (t.scalar_type() != dtype || t.dim() != static_cast<int64_t>(sizes.size()) ||
        t.device() != hidden.device() || !t.is_contiguous())
      return false;
    int64_t i = 0;
    for (int64_t s : sizes)
      if (t.size(i++) != s) return false;
    return true;
  };
  for (int64_t l = 0; l < L; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      const at::Tensor& c = kv ? value_caches[l] : key_caches[l];
      if (fits(c, at::kFloat, {B, Hkv, S, D})) continue;
      const std::string name = cat(kv ? "value_caches[" : "key_caches[", l, "]");
      check_shape(c, name.c_str(), "[B, H_kv, S, D]", {B, Hkv, S, D});
      check_dtype(c, at::kFloat, name.c_str());
      check_same_device(c, hidden, name.c_str(), "hidden");
      check_contiguous(c, name.c_str());
    }
  }
  PTP_CHECK(T <= S, "T=", T, " new tokens do not fit in the cache (S=", S, ")");
  PTP_CHECK(cache_lens.scalar_type() == at::kInt || cache_lens.scalar_type() == at::kLong,
            "cache_lens must be int32 or int64 [B], got ", describe(cache_lens));
  check_shape(cache_lens, "cache_lens", "[B]", {B});
  check_same_device(cache_lens, hidden, "cache_lens", "hidden");
  if (B > 0) {
    const at::Tensor lens = cache_lens.to(at::kLong).contiguous();  // no copy when it already is
    const int64_t* lp = lens.const_data_ptr<int64_t>();
    const int64_t lo = *std::min_element(lp, lp + B), hi = *std::max_element(lp, lp + B);
    PTP_CHECK(lo >= 0 && hi + T <= S, "cache_lens must satisfy 0 <= cache_lens[b] and "
              "cache_lens[b] + T <= S (T=", T, ", S=", S, "), got min ", lo, ", max ", hi);
  }
  if (tree_mask.has_value()) {
    const at::Tensor& m = *tree_mask;
    PTP_CHECK(m.scalar_type() == at::kBool && m.dim() == 3 && m.size(0) == B && m.size(1) == T &&
                  m.size(2) == T,
              "tree_mask must be bool [B, T, T] = [", B, ", ", T, ", ", T, "], got ", describe(m));
    check_same_device(m, hidden, "tree_mask", "hidden");
    check_contiguous(m, "tree_mask");
  }
  PTP_CHECK(aux_start >= 0 && aux_start <= T, "aux_start must be in [0, T] = [0, ", T, "], got ",
            aux_start);
}

// The weights' checks against a call's shapes (hidden's H, cos's D, the caches' L and H_kv).
inline void check_decode_step_weights(const at::Tensor& hidden, const at::Tensor& cos,
                                      at::TensorList key_caches, at::TensorList weights,
                                      at::IntArrayRef formats,
                                      const c10::List<std::optional<at::Tensor>>& biases,
                                      at::TensorList norm_weights,
                                      const c10::List<std::optional<at::Tensor>>& lora_a,
                                      const c10::List<std::optional<at::Tensor>>& lora_b,
                                      at::ArrayRef<double> lora_scales) {
  const int64_t H = hidden.size(2), D = cos.size(2), L = static_cast<int64_t>(key_caches.size());
  const int64_t Hkv = key_caches[0].size(1);
  const auto fits = [&](const at::Tensor& t, at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
    if (t.scalar_type() != dtype || t.dim() != static_cast<int64_t>(sizes.size()) ||
        t.device() != hidden.device() || !t.is_contiguous())
      return false;
    int64_t i = 0;
    for (int64_t s : sizes)
      if (t.size(i++) != s) return false;
    return true;
  };
  const int64_t n = kDecodeStepLinears * L;
  PTP_CHECK(static_cast<int64_t>(weights.size()) == n, "weights must hold 7 tensors per layer (q, k, v, "
            "o, gate, up, down) = ", n, " for ", L, " layers, got ", weights.size());
  PTP_CHECK(static_cast<int64_t>(formats.size()) == n, "formats must hold one code per weight (",
            n, "), got ", formats.size());
  PTP_CHECK(static_cast<int64_t>(biases.size()) == n, "biases must hold one entry per weight (", n,
            ", None for no bias), got ", biases.size());
  PTP_CHECK(static_cast<int64_t>(norm_weights.size()) == 2 * L + 1, "norm_weights must hold 2 per "
            "layer + the final norm = ", 2 * L + 1, " tensors, got ", norm_weights.size());
  const bool lora = lora_a.size() > 0;
  PTP_CHECK(!lora || (static_cast<int64_t>(lora_a.size()) == n &&
                      static_cast<int64_t>(lora_b.size()) == n &&
                      static_cast<int64_t>(lora_scales.size()) == n),
            "lora_a, lora_b and lora_scales must be empty or hold one entry per weight (", n,
            "), got ", lora_a.size(), ", ", lora_b.size(), ", ", lora_scales.size());
  PTP_CHECK(lora || lora_b.size() == 0, "lora_b must be empty when lora_a is, got ", lora_b.size(),
            " entries");
  // q's rows fix H_q; the others follow from H, H_kv, D and gate's rows (I).
  const int64_t Mq = weights[0].size(0), I = weights[4].size(0);
  PTP_CHECK(Mq % D == 0 && Mq / D >= Hkv && (Mq / D) % Hkv == 0, "weights[0] (q_proj) must have H_q * D "
            "rows with H_q a multiple of H_kv=", Hkv, " (D=", D, "), got ", describe(weights[0]));
  const int64_t Hq = Mq / D;
  const int64_t rows[kDecodeStepLinears] = {Hq * D, Hkv * D, Hkv * D, H, I, I, H};
  const int64_t cols[kDecodeStepLinears] = {H, H, H, Hq * D, H, H, I};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = i % kDecodeStepLinears, M = rows[j], K = cols[j];
    const at::Tensor& w = weights[i];
    const int64_t f = formats[i];
    const bool weight_ok =
        f == 0 ? fits(w, at::kFloat, {M, K})
               : f >= 1 && f <= 3 && K % 32 == 0 && fits(w, at::kByte, {M, K / 32 * decode_step_block_bytes(f)});
    const bool bias_ok = !biases[i].has_value() || fits(*biases[i], at::kFloat, {M});
    bool lora_ok = true;
    if (lora) {
      const std::optional<at::Tensor> a = lora_a[i], b = lora_b[i];
      lora_ok = a.has_value() == b.has_value() &&
                (!a.has_value() || (a->dim() == 2 && fits(*a, at::kFloat, {a->size(0), K}) &&
                                    fits(*b, at::kFloat, {M, a->size(0)})));
    }
    if (weight_ok && bias_ok && lora_ok) continue;
    const std::string name = cat("weights[", i, "] (layer ", i / kDecodeStepLinears, " ",
                                 kDecodeStepNames[j], ")");
    check_same_device(w, hidden, name.c_str(), "hidden");
    check_contiguous(w, name.c_str());
    PTP_CHECK(f >= 0 && f <= 3, "formats[", i, "] must be " PTP_DECODE_STEP_FORMATS ", got ", f);
    if (f == 0) {
      check_dtype(w, at::kFloat, name.c_str());
      check_shape(w, name.c_str(), "[M, K]", {M, K});
    } else {
      check_dtype(w, at::kByte, name.c_str());
      PTP_CHECK(K % 32 == 0, name, ": GGUF blocks need K a multiple of 32, got K=", K);
      check_shape(w, name.c_str(), "[M, K / 32 * block_bytes]", {M, K / 32 * decode_step_block_bytes(f)});
    }
    if (biases[i].has_value()) {
      const std::string bn = cat("biases[", i, "]");
      check_shape(*biases[i], bn.c_str(), "[M]", {M});
      check_dtype(*biases[i], at::kFloat, bn.c_str());
      check_contiguous(*biases[i], bn.c_str());
      check_same_device(*biases[i], hidden, bn.c_str(), "hidden");
    }
    if (lora) {
      const std::optional<at::Tensor> a = lora_a[i], b = lora_b[i];
      PTP_CHECK(a.has_value() == b.has_value(), "lora_a[", i, "] and lora_b[", i,
                "] must both be tensors or both None");
      if (a.has_value()) {
        const std::string an = cat("lora_a[", i, "]"), bn = cat("lora_b[", i, "]");
        PTP_CHECK(a->dim() == 2 && a->size(1) == K, an, " must have shape [R, K] = [*, ", K, "], got ",
                  describe(*a));
        check_shape(*b, bn.c_str(), "[M, R]", {M, a->size(0)});
        for (const auto& [t, nm] : {std::pair<const at::Tensor*, const std::string*>{&*a, &an},
                                    std::pair<const at::Tensor*, const std::string*>{&*b, &bn}}) {
          check_dtype(*t, at::kFloat, nm->c_str());
          check_contiguous(*t, nm->c_str());
          check_same_device(*t, hidden, nm->c_str(), "hidden");
        }
      }
    }
  }
  for (int64_t i = 0; i < 2 * L + 1; ++i) {
    if (fits(norm_weights[i], at::kFloat, {H})) continue;
    const std::string name = cat("norm_weights[", i, "]");
    check_shape(norm_weights[i], name.c_str(), "[H]", {H});
    check_dtype(norm_weights[i], at::kFloat, name.c_str());
    check_contiguous(norm_weights[i], name.c_str());
    check_same_device(norm_weights[i], hidden, name.c_str(), "hidden");
  }
}

inline void check_decode_step_inputs(
    const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
    at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& cache_lens,
    const std::optional<at::Tensor>& tree_mask, at::TensorList weights, at::IntArrayRef formats,
    const c10::List<std::optional<at::Tensor>>& biases, at::TensorList norm_weights,
    const c10::List<std::optional<at::Tensor>>& lora_a,
    const c10::List<std::optional<at::Tensor>>& lora_b, at::ArrayRef<double> lora_scales,
    int64_t aux_start) {
  check_decode_step_call(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask, aux_start);
  check_decode_step_weights(hidden, cos, key_caches, weights, formats, biases, norm_weights, lora_a,
                            lora_b, lora_scales);
}

// decode_linear: one linear in decode_step's arithmetic (the decoding call's LM head, so that the
// logits of every decoding call come from the same kernels as its hidden states).
//   x       [..., K] float32, contiguous, CPU
//   weight  float32 [M, K] (format 0) or uint8 GGUF blocks [M, K / 32 * bytes] (1 q4_1, 2 q8_0,
//           3 q4_1 split: float32 scales, then nibbles)
//   bias    [M] float32 or None
// returns [..., M] float32; every row bitwise independent of the others.
inline void check_decode_linear_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t format,
                                       const std::optional<at::Tensor>& bias) {
  check_dtype(x, at::kFloat, "x");
  PTP_CHECK(x.dim() >= 1, "x must have shape [..., K], got ", describe(x));
  PTP_CHECK(x.device().is_cpu(), "decode_linear is CPU-only, got x ", describe(x));
  check_contiguous(x, "x");
  const int64_t K = x.size(-1);
  PTP_CHECK(format >= 0 && format <= 3, "format must be " PTP_DECODE_STEP_FORMATS ", got ", format);
  check_same_device(weight, x, "weight", "x");
  check_contiguous(weight, "weight");
  PTP_CHECK(weight.dim() == 2, "weight must be 2-D, got ", describe(weight));
  if (format == 0) {
    check_dtype(weight, at::kFloat, "weight");
    PTP_CHECK(weight.size(1) == K, "weight must have shape [M, K] = [*, ", K, "], got ", describe(weight));
  } else {
    check_dtype(weight, at::kByte, "weight");
    PTP_CHECK(K % 32 == 0, "GGUF blocks need K a multiple of 32, got K=", K);
    PTP_CHECK(weight.size(1) == K / 32 * decode_step_block_bytes(format),
              "weight must have shape [M, K / 32 * ", decode_step_block_bytes(format), "] = [*, ",
              K / 32 * decode_step_block_bytes(format), "] for format ", format, ", got ", describe(weight));
  }
  if (bias.has_value()) {
    check_shape(*bias, "bias", "[M]", {weight.size(0)});
    check_dtype(*bias, at::kFloat, "bias");
    check_same_device(*bias, x, "bias", "x");
    check_contiguous(*bias, "bias");
  }
}

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t format,
                             const std::optional<at::Tensor>& bias);
#ifdef PTP_WITH_CUDA
at::Tensor decode_linear_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t format,
                              const std::optional<at::Tensor>& bias);
#endif

at::Tensor decode_step_cpu(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                           at::TensorList key_caches, at::TensorList value_caches,
                           const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                           at::TensorList weights, at::IntArrayRef formats,
                           const c10::List<std::optional<at::Tensor>>& biases,
                           at::TensorList norm_weights,
                           const c10::List<std::optional<at::Tensor>>& lora_a,
                           const c10::List<std::optional<at::Tensor>>& lora_b,
                           at::ArrayRef<double> lora_scales, int64_t aux_start, double eps,
                           double scale);

// decode_step_pack / decode_step_packed / decode_step_release: decode_step with its static
// arguments (weights, formats, biases, norm weights, LoRA) handed over once. decode_step_pack
// keeps them on the C++ side (a reference to each tensor) and returns a handle;
// decode_step_packed(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask, handle,
// aux_start, eps, scale) is decode_step over them (bitwise), checking the weights against a
// call's shapes only when those change; decode_step_release drops them. Why: converting ~500
// Python objects into the dispatcher's argument lists at every call cost ~0.2-0.3 ms of a
// ~6.7 ms SmolLM2 decoding step (measured in the decoding loop, 2-core EPYC VM: the objects are
// cold after the step streamed ~96 MB of weights).
int64_t decode_step_pack_cpu(at::TensorList weights, at::IntArrayRef formats,
                             const c10::List<std::optional<at::Tensor>>& biases, at::TensorList norm_weights,
                             const c10::List<std::optional<at::Tensor>>& lora_a,
                             const c10::List<std::optional<at::Tensor>>& lora_b,
                             at::ArrayRef<double> lora_scales);
at::Tensor decode_step_packed_cpu(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                  at::TensorList key_caches, at::TensorList value_caches,
                                  const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                                  int64_t packed, int64_t aux_start, double eps, double scale);
void decode_step_release_cpu(int64_t packed);
#ifdef PTP_WITH_CUDA
int64_t decode_step_pack_cuda(at::TensorList weights, at::IntArrayRef formats,
                              const c10::List<std::optional<at::Tensor>>& biases, at::TensorList norm_weights,
                              const c10::List<std::optional<at::Tensor>>& lora_a,
                              const c10::List<std::optional<at::Tensor>>& lora_b,
                              at::ArrayRef<double> lora_scales);
at::Tensor decode_step_packed_cuda(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                   at::TensorList key_caches, at::TensorList value_caches,
                                   const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                                   int64_t packed, int64_t aux_start, double eps, double scale);
#endif
// decode_logits_packed: a whole decoding call from token ids to logits in one op: the embedding
// rows of `tokens`, the rotary rows of `position_ids` from the model's tables, decode_step_packed
// over them, then decode_linear (the LM head). Bitwise decode_step_packed(embed[tokens],
// cos_table[position_ids], sin_table[position_ids], ...) followed by decode_linear. Why: after a
// step's ~96 MB weight stream every op the decoding loop dispatches runs cache-cold; the
// embedding, the two rotary gathers and the head as separate ops took ~0.2 ms of a ~7.5 ms
// SmolLM2 call on the 2-core EPYC VM.
//   tokens, position_ids  [B, T] int64 (token ids < V, positions < the tables' rows)
//   embed                 [V, H] float32 (the input embedding)
//   cos_table, sin_table  [P, D] float32 (the rotary's values at positions 0 .. P - 1)
//   head_weight, head_format, head_bias: decode_linear's weight, format and bias ([V_out, H])
// returns the logits [B, T, V_out] float32.
inline void check_decode_logits_inputs(const at::Tensor& tokens, const at::Tensor& position_ids,
                                       const at::Tensor& embed, const at::Tensor& cos_table,
                                       const at::Tensor& sin_table) {
  check_dtype(tokens, at::kLong, "tokens");
  PTP_CHECK(tokens.dim() == 2, "tokens must have shape [B, T], got ", describe(tokens));
  PTP_CHECK(tokens.device().is_cpu(), "decode_logits_packed is CPU-only, got tokens ", describe(tokens));
  check_contiguous(tokens, "tokens");
  const int64_t B = tokens.size(0), T = tokens.size(1);
  check_shape(position_ids, "position_ids", "[B, T]", {B, T});
  check_dtype(position_ids, at::kLong, "position_ids");
  check_same_device(position_ids, tokens, "position_ids", "tokens");
  check_contiguous(position_ids, "position_ids");
  check_dtype(embed, at::kFloat, "embed");
  PTP_CHECK(embed.dim() == 2, "embed must have shape [V, H], got ", describe(embed));
  check_same_device(embed, tokens, "embed", "tokens");
  check_contiguous(embed, "embed");
  PTP_CHECK(cos_table.dim() == 2, "cos_table must have shape [P, D], got ", describe(cos_table));
  check_shape(sin_table, "sin_table", "[P, D]", {cos_table.size(0), cos_table.size(1)});
  for (const auto* t : {&cos_table, &sin_table}) {
    const char* name = t == &cos_table ? "cos_table" : "sin_table";
    check_dtype(*t, at::kFloat, name);
    check_same_device(*t, tokens, name, "tokens");
    check_contiguous(*t, name);
  }
}

at::Tensor decode_logits_packed_cpu(const at::Tensor& tokens, const at::Tensor& position_ids,
                                    at::TensorList key_caches, at::TensorList value_caches,
                                    const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                                    int64_t packed, const at::Tensor& embed, const at::Tensor& cos_table,
                                    const at::Tensor& sin_table, const at::Tensor& head_weight,
                                    int64_t head_format, const std::optional<at::Tensor>& head_bias,
                                    double eps, double scale);
// decode_logits_hidden_packed: decode_logits_packed that also returns the step's output [B, T, H]
// (the final-normed hidden states the LM head read), for drafters that read hidden states.
std::tuple<at::Tensor, at::Tensor> decode_logits_hidden_packed_cpu(
    const at::Tensor& tokens, const at::Tensor& position_ids, at::TensorList key_caches,
    at::TensorList value_caches, const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
    int64_t packed, const at::Tensor& embed, const at::Tensor& cos_table, const at::Tensor& sin_table,
    const at::Tensor& head_weight, int64_t head_format, const std::optional<at::Tensor>& head_bias,
    double eps, double scale);
#ifdef PTP_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> decode_logits_hidden_packed_cuda(
    const at::Tensor& tokens, const at::Tensor& position_ids, at::TensorList key_caches,
    at::TensorList value_caches, const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
    int64_t packed, const at::Tensor& embed, const at::Tensor& cos_table, const at::Tensor& sin_table,
    const at::Tensor& head_weight, int64_t head_format, const std::optional<at::Tensor>& head_bias,
    double eps, double scale);
at::Tensor decode_logits_packed_cuda(const at::Tensor& tokens, const at::Tensor& position_ids,
                                     at::TensorList key_caches, at::TensorList value_caches,
                                     const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                                     int64_t packed, const at::Tensor& embed, const at::Tensor& cos_table,
                                     const at::Tensor& sin_table, const at::Tensor& head_weight,
                                     int64_t head_format, const std::optional<at::Tensor>& head_bias,
                                     double eps, double scale);
#endif

#ifdef PTP_WITH_CUDA
at::Tensor decode_step_cuda(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                            at::TensorList key_caches, at::TensorList value_caches,
                            const at::Tensor& cache_lens,
                            const std::optional<at::Tensor>& tree_mask, at::TensorList weights,
                            at::IntArrayRef formats,
                            const c10::List<std::optional<at::Tensor>>& biases,
                            at::TensorList norm_weights,
                            const c10::List<std::optional<at::Tensor>>& lora_a,
                            const c10::List<std::optional<at::Tensor>>& lora_b,
                            at::ArrayRef<double> lora_scales, int64_t aux_start, double eps,
                            double scale);
#endif

}  // namespace ptp
