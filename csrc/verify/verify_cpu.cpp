#include "verify.h"
namespace ptp {
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& target_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniforms,
    c10::string_view mode, double temperature, int64_t top_k, double top_p) {
  check_verify_inputs(draft_tokens, parents, target_logits, draft_probs, uniforms, mode, temperature, top_k, top_p);
  TORCH_CHECK(false, "verify_tree_cpu: not implemented yet");
}
}  // namespace ptp
