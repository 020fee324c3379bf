// quant_linear: invariant_linear over weights kept in a GGUF block format, dequantised on the
// fly (per thread, a few weight rows at a time, into cache-resident float32).
//
// A quantised checkpoint (SmolLM2-135M-Instruct ships as Q4_1 + a Q8_0 embedding) is what the
// model *is*: transformers dequantises it to float32 on load, and each float32 weight is
// exactly one block formula. Reading the blocks instead of the float32 copy streams 4.5 (Q4_1)
// or 8.5 (Q8_0) bits per weight from memory instead of 32, and the float32 values rebuilt are
// bitwise the loaded ones, so y is bitwise invariant_linear(x, dequantize(qweight), bias):
//
//   q8_0 (34-byte blocks): fp16 d, 32 x int8 q          w[i] = d * q[i]          (exact product)
//   q4_1 (20-byte blocks): fp16 d, fp16 m, 16 bytes qs  w[i] = d * q[i] + m, q[i] = qs[i] & 15,
//                          q[i + 16] = qs[i] >> 4        (d * q exact: one rounding, as numpy's)
//
//   x        [N, K]                 float32, contiguous, K a multiple of 32
//   qweight  [M, K / 32 * bytes]    uint8, contiguous (each row: its K / 32 blocks in order)
//   format   "q8_0" | "q4_1"
//   bias     [M] or None            float32
// returns [N, M] float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

#include "../common/checks.h"

namespace ptp {

constexpr int64_t kQuantBlock = 32;  // weights per block (both formats)

// bytes per 32-weight block of `format`, or 0 if the format is unknown
inline int64_t quant_block_bytes(c10::string_view format) {
  if (format == "q8_0") return 34;
  if (format == "q4_1") return 20;
  return 0;
}

inline void check_quant_linear_inputs(const at::Tensor& x, const at::Tensor& qweight,
                                      c10::string_view format,
                                      const std::optional<at::Tensor>& bias) {
  const int64_t bb = quant_block_bytes(format);
  PTP_CHECK(bb > 0, "format must be 'q8_0' or 'q4_1', got '", std::string(format), "'");
  check_dtype(x, at::kFloat, "x");
  PTP_CHECK(x.dim() == 2, "x must have shape [N, K], got ", describe(x));
  const int64_t K = x.size(1);
  PTP_CHECK(K % kQuantBlock == 0, "x's K must be a multiple of 32 (the block size), got ", K);
  check_dtype(qweight, at::kByte, "qweight");
  PTP_CHECK(qweight.dim() == 2 && qweight.size(1) == K / kQuantBlock * bb,
            "qweight must have shape [M, K / 32 * ", bb, "] = [*, ", K / kQuantBlock * bb,
            "] for ", std::string(format), ", got ", describe(qweight));
  check_same_device(qweight, x, "qweight", "x");
  check_contiguous(x, "x");
  check_contiguous(qweight, "qweight");
  if (bias.has_value()) {
    check_shape(*bias, "bias", "[M]", {qweight.size(0)});
    check_dtype(*bias, at::kFloat, "bias");
    check_same_device(*bias, x, "bias", "x");
    check_contiguous(*bias, "bias");
  }
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, c10::string_view format,
                            const std::optional<at::Tensor>& bias);
#ifdef PTP_WITH_CUDA
at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                             c10::string_view format, const std::optional<at::Tensor>& bias);
#endif

}  // namespace ptp
