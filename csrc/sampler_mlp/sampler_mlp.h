// sampler_mlp: the sampler head of the masked-input multi-token predictor (arXiv 2507.11851),
// fused: previous-token embedding gather + concat + Linear -> SiLU [-> LayerNorm] -> Linear
// [-> SiLU] [-> LayerNorm], one pass over the weights for a batch of rows.
//
//   hidden        [N, d_h]            float32 / float16 / bfloat16, contiguous
//   prev_tokens   [N] int64           previously sampled token of each row, in [0, V)
//   embedding     [V, d_e]            hidden's dtype (the model's input embedding table)
//   w1            [d_mid, d_h + d_e]  hidden's dtype; x = cat(hidden, embedding[prev_tokens])
//   b1            [d_mid] or None
//   w2            [d_out, d_mid]
//   b2            [d_out] or None
//   norm1_weight, norm1_bias  [d_mid] or None: LayerNorm after the first SiLU (bias needs weight)
//   norm2_weight, norm2_bias  [d_out] or None: LayerNorm at the end
//   silu_out      apply SiLU after the second Linear (the paper's form: True with both norms;
//                 the plain Linear -> SiLU -> Linear: False, no norms)
//   eps           LayerNorm epsilon
// returns [N, d_out] in hidden's dtype; all accumulation in float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../common/checks.h"

namespace ptp {

inline void check_optional_vector(const std::optional<at::Tensor>& t, const char* name,
                                  int64_t size, const at::Tensor& like) {
  if (!t.has_value()) return;
  check_shape(*t, name, "[d]", {size});
  check_dtype(*t, like.scalar_type(), name);
  check_same_device(*t, like, name, "hidden");
  check_contiguous(*t, name);
}

inline void check_sampler_mlp_inputs(
    const at::Tensor& hidden, const at::Tensor& prev_tokens, const at::Tensor& embedding,
    const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& norm1_weight,
    const std::optional<at::Tensor>& norm1_bias, const std::optional<at::Tensor>& norm2_weight,
    const std::optional<at::Tensor>& norm2_bias) {
  check_float(hidden, "hidden");
  PTP_CHECK(hidden.dim() == 2, "hidden must have shape [N, d_h], got ", describe(hidden));
  const int64_t N = hidden.size(0), dh = hidden.size(1);
  check_dtype(prev_tokens, at::kLong, "prev_tokens");
  check_shape(prev_tokens, "prev_tokens", "[N]", {N});
  PTP_CHECK(embedding.dim() == 2, "embedding must have shape [V, d_e], got ", describe(embedding));
  check_dtype(embedding, hidden.scalar_type(), "embedding");
  const int64_t V = embedding.size(0), de = embedding.size(1);
  PTP_CHECK(w1.dim() == 2 && w1.size(1) == dh + de,
            "w1 must have shape [d_mid, d_h + d_e] = [*, ", dh + de, "], got ", describe(w1));
  check_dtype(w1, hidden.scalar_type(), "w1");
  const int64_t dmid = w1.size(0);
  PTP_CHECK(w2.dim() == 2 && w2.size(1) == dmid,
            "w2 must have shape [d_out, d_mid] = [*, ", dmid, "], got ", describe(w2));
  check_dtype(w2, hidden.scalar_type(), "w2");
  const int64_t dout = w2.size(0);
  PTP_CHECK(dmid >= 1 && dout >= 1, "w1 and w2 must have at least one output row");
  check_same_device(prev_tokens, hidden, "prev_tokens", "hidden");
  check_same_device(embedding, hidden, "embedding", "hidden");
  check_same_device(w1, hidden, "w1", "hidden");
  check_same_device(w2, hidden, "w2", "hidden");
  check_contiguous(hidden, "hidden");
  check_contiguous(prev_tokens, "prev_tokens");
  check_contiguous(embedding, "embedding");
  check_contiguous(w1, "w1");
  check_contiguous(w2, "w2");
  check_optional_vector(b1, "b1", dmid, hidden);
  check_optional_vector(b2, "b2", dout, hidden);
  check_optional_vector(norm1_weight, "norm1_weight", dmid, hidden);
  check_optional_vector(norm1_bias, "norm1_bias", dmid, hidden);
  check_optional_vector(norm2_weight, "norm2_weight", dout, hidden);
  check_optional_vector(norm2_bias, "norm2_bias", dout, hidden);
  PTP_CHECK(!norm1_bias.has_value() || norm1_weight.has_value(),
            "norm1_bias needs norm1_weight");
  PTP_CHECK(!norm2_bias.has_value() || norm2_weight.has_value(),
            "norm2_bias needs norm2_weight");
  if (prev_tokens.device().is_cpu() && N > 0) {
    const int64_t lo = prev_tokens.min().item<int64_t>(), hi = prev_tokens.max().item<int64_t>();
    PTP_CHECK(lo >= 0 && hi < V, "prev_tokens must be in [0, V=", V, "), got min ", lo, ", max ",
              hi);
  }
}

at::Tensor sampler_mlp_cpu(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                           const at::Tensor& embedding, const at::Tensor& w1,
                           const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                           const std::optional<at::Tensor>& b2,
                           const std::optional<at::Tensor>& norm1_weight,
                           const std::optional<at::Tensor>& norm1_bias,
                           const std::optional<at::Tensor>& norm2_weight,
                           const std::optional<at::Tensor>& norm2_bias, bool silu_out, double eps);

#ifdef PTP_WITH_CUDA
at::Tensor sampler_mlp_cuda(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                            const at::Tensor& embedding, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                            const std::optional<at::Tensor>& b2,
                            const std::optional<at::Tensor>& norm1_weight,
                            const std::optional<at::Tensor>& norm1_bias,
                            const std::optional<at::Tensor>& norm2_weight,
                            const std::optional<at::Tensor>& norm2_bias, bool silu_out,
                            double eps);
#endif

}  // namespace ptp
