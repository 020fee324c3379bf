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

namespace ptp {

inline void check_gated_lora_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const at::Tensor& lora_a, const at::Tensor& lora_b,
                                           int64_t aux_start) {
  check_float(x, "x");
  PTP_CHECK(x.dim() == 3, "x must have shape [B, S, K], got ", describe(x));
  check_contiguous(x, "x");
  const int64_t S = x.size(1), K = x.size(2);
  PTP_CHECK(weight.dim() == 2 && weight.size(1) == K,
            "weight must have shape [M, K] = [*, ", K, "], got ", describe(weight));
  const int64_t M = weight.size(0);
  PTP_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K,
            "lora_a must have shape [R, K] = [*, ", K, "], got ", describe(lora_a));
  const int64_t R = lora_a.size(0);
  check_shape(lora_b, "lora_b", "[M, R]", {M, R});
  check_dtype(lora_a, at::kFloat, "lora_a");
  check_dtype(lora_b, at::kFloat, "lora_b");
  check_same_device(lora_a, x, "lora_a", "x");
  check_same_device(lora_b, x, "lora_b", "x");
  check_contiguous(lora_a, "lora_a");
  check_contiguous(lora_b, "lora_b");
  PTP_CHECK(aux_start >= 0 && aux_start <= S, "aux_start must be in [0, S] = [0, ", S, "], got ",
            aux_start);
  check_invariant_linear_inputs(x.view({x.size(0) * S, K}), weight, bias);
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
  const int64_t n = S - aux_start;
  if (n == 0 || B == 0 || M == 0) return y;
  at::Tensor xa = x.narrow(1, aux_start, n).reshape({B * n, K}).to(at::kFloat).contiguous();
  // the LoRA products through the same kernel (measured faster here than at::mm for these
  // shapes, and row-invariant too)
  at::Tensor t = linear(xa, lora_a, std::nullopt);     // [B * n, R]
  at::Tensor d = linear(t, lora_b, std::nullopt);      // [B * n, M], float32
  y.narrow(1, aux_start, n).add_(d.view({B, n, M}), scale);
  return y;
}

at::Tensor gated_lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, double scale, int64_t aux_start);
#ifdef PTP_WITH_CUDA
at::Tensor gated_lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, double scale, int64_t aux_start);
#endif

}  // namespace ptp
