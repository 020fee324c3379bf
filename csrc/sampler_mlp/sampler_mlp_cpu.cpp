#include "sampler_mlp.h"
namespace ptp {
at::Tensor sampler_mlp_cpu(const at::Tensor& hidden, const at::Tensor& prev_tokens, const at::Tensor& embedding,
    const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& norm1_weight, const std::optional<at::Tensor>& norm1_bias,
    const std::optional<at::Tensor>& norm2_weight, const std::optional<at::Tensor>& norm2_bias, bool silu_out, double eps) {
  check_sampler_mlp_inputs(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight, norm1_bias, norm2_weight, norm2_bias);
  TORCH_CHECK(false, "sampler_mlp_cpu: not implemented yet");
}
}  // namespace ptp
