// invariant_linear: y = x @ weight^T (+ bias) where every output row is bitwise independent of
// how many rows the call has (batch invariance). BLAS GEMMs pick other kernels, blockings and
// reduction orders for other row counts, so a token's logits in a 1-row decoding call and in a
// 16-row speculative call differ by rounding; here y[m, n] is always one fixed sequence of
// float32 operations over x[m, :] and weight[n, :], whatever the other rows.
//
//   x       [N, K]       float32 / float16 / bfloat16, contiguous
//   weight  [M, K]       x's dtype, contiguous
//   bias    [M] or None  x's dtype
// returns [N, M] in x's dtype (float32 accumulation).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../common/checks.h"

namespace ptp {

inline void check_invariant_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias) {
  check_float(x, "x");
  PTP_CHECK(x.dim() == 2, "x must have shape [N, K], got ", describe(x));
  const int64_t K = x.size(1);
  PTP_CHECK(weight.dim() == 2 && weight.size(1) == K,
            "weight must have shape [M, K] = [*, ", K, "], got ", describe(weight));
  check_dtype(weight, x.scalar_type(), "weight");
  check_same_device(weight, x, "weight", "x");
  check_contiguous(x, "x");
  check_contiguous(weight, "weight");
  if (bias.has_value()) {
    check_shape(*bias, "bias", "[M]", {weight.size(0)});
    check_dtype(*bias, x.scalar_type(), "bias");
    check_same_device(*bias, x, "bias", "x");
    check_contiguous(*bias, "bias");
  }
}

at::Tensor invariant_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias);
#ifdef PTP_WITH_CUDA
at::Tensor invariant_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias);
#endif

}  // namespace ptp
