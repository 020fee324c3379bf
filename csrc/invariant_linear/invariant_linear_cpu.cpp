// invariant_linear on the CPU: semantics in invariant_linear.h, reference
// ptp_ext.reference.invariant_linear_ref (= F.linear up to rounding).
//
// Parallel over blocks of weight rows (output features): each block's weights are read once
// from memory for all x rows (x stays in cache), so a small-N call costs about one pass over
// the weights, like BLAS's GEMV, and no call packs the weight matrix (BLAS GEMMs for 2-16 rows
// did: 3.4x slower than GEMV for SmolLM2's LM head on this CPU). fp16 / bf16 weights are
// converted per block into a per-thread float32 buffer. The kernel is compiled three times
// (baseline ISA; AVX2 + FMA + F16C; the same 8-lane code with AVX-512VL's 32 registers, for taller
// register tiles) and chosen at run time, like tree_attention_cpu.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "invariant_linear.h"
#include "quant_linear.h"
#include "../common/cpu_isa.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace ptp {

namespace il_base {
#include "invariant_linear_cpu_kernel.h"
}  // namespace il_base

#ifdef PTP_HAVE_X86
PTP_AVX2_BEGIN
#define PTP_CPU_AVX2 1
namespace il_avx2 {
#include "invariant_linear_cpu_kernel.h"
}  // namespace il_avx2
#undef PTP_CPU_AVX2
PTP_AVX2_END

PTP_AVX512VL_BEGIN
#define PTP_CPU_AVX2 1
#define PTP_IL_MAX_TILE 6
namespace il_avx512 {
#include "invariant_linear_cpu_kernel.h"
}  // namespace il_avx512
#undef PTP_IL_MAX_TILE
#undef PTP_CPU_AVX2
PTP_AVX512VL_END
#endif

namespace {

constexpr int64_t kBlock = 64;  // weight rows per parallel task

template <typename scalar_t>
void run(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         at::Tensor& y) {
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  constexpr bool kF32 = std::is_same<scalar_t, float>::value;
  // x in float32 (small: N rows); y accumulated in float32.
  at::Tensor xf = kF32 ? x : x.to(at::kFloat);
  at::Tensor yf = kF32 ? y : at::empty({N, M}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const bool avx2 = cpu_has_avx2();
  const bool avx512 = cpu_has_avx512vl();
  const int64_t blocks = (M + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> wbuf(kF32 ? 0 : static_cast<size_t>(kBlock * K));
    // float32 weights are read in place: prefetch within this task's rows
    const float* pf_end = nullptr;
    if constexpr (kF32) pf_end = wp + std::min(M, b1 * kBlock) * K;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kBlock, n1 = std::min(M, n0 + kBlock);
      const float* w;
      if constexpr (kF32) {
        w = wp + n0 * K;
      } else {
        const scalar_t* src = wp + n0 * K;
        for (int64_t i = 0; i < (n1 - n0) * K; ++i) wbuf[i] = static_cast<float>(src[i]);
        w = wbuf.data();
      }
#ifdef PTP_HAVE_X86
      if (avx512) {
        il_avx512::rows_block(xp, N, K, w, n0, n1, yp, M, pf_end);
        continue;
      }
      if (avx2) {
        il_avx2::rows_block(xp, N, K, w, n0, n1, yp, M, pf_end);
        continue;
      }
#endif
      il_base::rows_block(xp, N, K, w, n0, n1, yp, M);
    }
  });
  if (bias.has_value()) yf.add_(bias->to(at::kFloat));  // elementwise: row invariant
  if (!kF32) y.copy_(yf);
}

// quant_linear: the blocks are dequantised in registers inside the register tiles (qtile), so
// the only memory stream is the blocks themselves; parallel over blocks of kQuantRows rows.
constexpr int64_t kQuantRows = 16;

template <bool kQ41>
void run_quant(const at::Tensor& x, const at::Tensor& qweight, at::Tensor& y) {
  const int64_t N = x.size(0), K = x.size(1), M = qweight.size(0), row_bytes = qweight.size(1);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const bool avx2 = cpu_has_avx2();
  const bool avx512 = cpu_has_avx512vl();
  const int64_t blocks = (M + kQuantRows - 1) / kQuantRows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kQuantRows, n1 = std::min(M, b1 * kQuantRows);
    std::vector<float> buf(static_cast<size_t>(4 * K));  // one dequantised weight tile
#ifdef PTP_HAVE_X86
    if (avx512) return il_avx512::qrows_block<kQ41>(xp, N, K, qp, row_bytes, n0, n1, yp, M, buf.data());
    if (avx2) return il_avx2::qrows_block<kQ41>(xp, N, K, qp, row_bytes, n0, n1, yp, M, buf.data());
#endif
    il_base::qrows_block<kQ41>(xp, N, K, qp, row_bytes, n0, n1, yp, M, buf.data());
  });
}

}  // namespace

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, c10::string_view format,
                            const std::optional<at::Tensor>& bias) {
  check_quant_linear_inputs(x, qweight, format, bias);
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  if (x.size(0) == 0 || qweight.size(0) == 0) return y;
  if (x.size(1) == 0) return bias.has_value() ? y.copy_(bias->unsqueeze(0).expand_as(y)) : y.zero_();
  if (format == "q4_1") {
    run_quant<true>(x, qweight, y);
  } else {
    run_quant<false>(x, qweight, y);
  }
  if (bias.has_value()) y.add_(*bias);  // elementwise: row invariant, as invariant_linear's
  return y;
}

at::Tensor invariant_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  check_invariant_linear_inputs(x, weight, bias);
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.size(0) == 0 || weight.size(0) == 0) return y;
  if (x.size(1) == 0) return bias.has_value() ? y.copy_(bias->unsqueeze(0).expand_as(y)) : y.zero_();
  switch (x.scalar_type()) {
    case at::kFloat:
      run<float>(x, weight, bias, y);
      break;
    case at::kHalf:
      run<c10::Half>(x, weight, bias, y);
      break;
    default:
      run<c10::BFloat16>(x, weight, bias, y);
  }
  return y;
}

}  // namespace ptp
