// gated_lora_linear: invariant_linear plus a LoRA delta on a suffix of every batch row's
// positions (the decoder's auxiliary rows: PTP u-slots, mask tokens), in one op call:
//
//   y[b, i] = x[b, i] @ weight^T (+ bias)                              for i <  aux_start
//   y[b, i] = x[b, i] @ weight^T (+ bias) + scale * (x[b, i] @ A^T) @ B^T   for i >= aux_start
//
// Rows before aux_start are bitwise invariant_linear's (so a self-speculative drafter's target
// rows are the target's own, whatever the adapter); every product runs through invariant_linear,
// so the LoRA rows are row-invariant too. It replaces ~10 small tensor ops per adapted layer
// (slice, two matmuls, transposes, scale, cast, add) by one call: 210 adapted layers of SmolLM2
// spent ~11 ms of a ~52 ms PTP decoding step in them on the 2-core dev CPU.
//
//   x          [B, S, K]  float32 / float16 / bfloat16, contiguous
//   weight     [M, K]     x's dtype, contiguous;  bias [M] or None, x's dtype
//   lora_a     [R, K]     float32, contiguous (PEFT's lora_A)
//   lora_b     [M, R]     float32, contiguous (PEFT's lora_B)
//   scale      float      (alpha / rank)
//   aux_start  int        0 <= aux_start <= S
// returns [B, S, M] in x's dtype. The delta is computed in float32 and added to the rounded base
// output (one more rounding for float16 / bfloat16 x).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../common/checks.h"
#include "invariant_linear.h"
#include "quant_linear.h"

namespace ptp {

// The LoRA half of either op's checks: x [B, S, K] (its dtype checked by the caller), lora_a
// [R, K] and lora_b [M, R] float32 on x's device, contiguous, 0 <= aux_start <= S.
inline void check_lora_inputs(const at::Tensor& x, int64_t M, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, int64_t aux_start) {
  PTP_CHECK(x.dim() == 3, "x must have shape [B, S, K], got ", describe(x));
  check_contiguous(x, "x");
  const int64_t S = x.size(1), K = x.size(2);
  PTP_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K,
            "lora_a must have shape [R, K] = [*, ", K, "], got ", describe(lora_a));
  check_shape(lora_b, "lora_b", "[M, R]", {M, lora_a.size(0)});
  check_dtype(lora_a, at::kFloat, "lora_a");
  check_dtype(lora_b, at::kFloat, "lora_b");
  check_same_device(lora_a, x, "lora_a", "x");
  check_same_device(lora_b, x, "lora_b", "x");
  check_contiguous(lora_a, "lora_a");
  check_contiguous(lora_b, "lora_b");
  PTP_CHECK(aux_start >= 0 && aux_start <= S, "aux_start must be in [0, S] = [0, ", S, "], got ",
            aux_start);
}

inline void check_gated_lora_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const at::Tensor& lora_a, const at::Tensor& lora_b,
                                           int64_t aux_start) {
  check_float(x, "x");
  PTP_CHECK(x.dim() == 3, "x must have shape [B, S, K], got ", describe(x));
  const int64_t K = x.size(2);
  PTP_CHECK(weight.dim() == 2 && weight.size(1) == K,
            "weight must have shape [M, K] = [*, ", K, "], got ", describe(weight));
  check_lora_inputs(x, weight.size(0), lora_a, lora_b, aux_start);
  check_invariant_linear_inputs(x.view({x.size(0) * x.size(1), K}), weight, bias);
}

// The LoRA delta of the auxiliary rows, added in place to the base output y [B, S, M]: two
// row-invariant products through `linear` (measured faster here than at::mm for these shapes).
template <typename Linear>
void add_lora_delta(at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                    const at::Tensor& lora_b, double scale, int64_t aux_start, Linear linear) {
  const int64_t B = x.size(0), S = x.size(1), K = x.size(2), M = y.size(2);
  const int64_t n = S - aux_start;
  if (n == 0 || B == 0 || M == 0) return;
  at::Tensor xa = x.narrow(1, aux_start, n).reshape({B * n, K}).to(at::kFloat).contiguous();
  at::Tensor t = linear(xa, lora_a, std::nullopt);  // [B * n, R]
  at::Tensor d = linear(t, lora_b, std::nullopt);   // [B * n, M], float32
  y.narrow(1, aux_start, n).add_(d.view({B, n, M}), scale);
}

// The op, for either device's invariant_linear (`linear`): three row-invariant products and one
// in-place add on the auxiliary rows.
template <typename Linear>
at::Tensor gated_lora_linear_impl(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, double scale, int64_t aux_start,
                                  Linear linear) {
  check_gated_lora_linear_inputs(x, weight, bias, lora_a, lora_b, aux_start);
  const int64_t B = x.size(0), S = x.size(1), K = x.size(2), M = weight.size(0);
  at::Tensor y = linear(x.view({B * S, K}), weight, bias).view({B, S, M});
  add_lora_delta(y, x, lora_a, lora_b, scale, aux_start, linear);
  return y;
}

// gated_lora_quant_linear: the same with the base weight in a GGUF block format (quant_linear.h):
// the base rows are bitwise quant_linear's, hence bitwise invariant_linear's over the dequantised
// weight, and the call streams 4.5 (Q4_1) / 8.5 (Q8_0) bits per base weight instead of 32. The
// self-speculative drafters' verify calls of a GGUF model (SmolLM2 ships as Q4_1) spend most of
// their time in these 210 layers on a CPU.
//
//   x          [B, S, K]  float32, contiguous, K a multiple of 32
//   qweight    [M, K / 32 * block_bytes]  uint8 (quant_linear's layout);  format "q8_0" | "q4_1"
//   bias       [M] or None, float32;  lora_a [R, K], lora_b [M, R] float32;  0 <= aux_start <= S
inline void check_gated_lora_quant_linear_inputs(const at::Tensor& x, const at::Tensor& qweight,
                                                 c10::string_view format,
                                                 const std::optional<at::Tensor>& bias,
                                                 const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                 int64_t aux_start) {
  check_dtype(x, at::kFloat, "x");
  PTP_CHECK(x.dim() == 3, "x must have shape [B, S, K], got ", describe(x));
  check_contiguous(x, "x");
  check_quant_linear_inputs(x.view({x.size(0) * x.size(1), x.size(2)}), qweight, format, bias);
  check_lora_inputs(x, qweight.size(0), lora_a, lora_b, aux_start);
}

// `quant`: the device's quant_linear; `linear`: its invariant_linear (the LoRA products)
template <typename Quant, typename Linear>
at::Tensor gated_lora_quant_linear_impl(const at::Tensor& x, const at::Tensor& qweight,
                                        c10::string_view format,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                        double scale, int64_t aux_start, Quant quant,
                                        Linear linear) {
  check_gated_lora_quant_linear_inputs(x, qweight, format, bias, lora_a, lora_b, aux_start);
  const int64_t B = x.size(0), S = x.size(1), K = x.size(2), M = qweight.size(0);
  at::Tensor y = quant(x.view({B * S, K}), qweight, format, bias).view({B, S, M});
  add_lora_delta(y, x, lora_a, lora_b, scale, aux_start, linear);
  return y;
}

at::Tensor gated_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, double scale, int64_t aux_start);
at::Tensor gated_lora_quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                       c10::string_view format,
                                       const std::optional<at::Tensor>& bias,
                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                       double scale, int64_t aux_start);
#ifdef PTP_WITH_CUDA
at::Tensor gated_lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, double scale, int64_t aux_start);
at::Tensor gated_lora_quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                                        c10::string_view format,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& lora_a, const at::Tensor& lora_b,
                                        double scale, int64_t aux_start);
#endif

}  // namespace ptp
