#include "tree_attention.h"
namespace ptp {
std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& query, const at::Tensor& key_cache,
    const at::Tensor& value_cache, const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask, double scale) {
  check_tree_attention_inputs(query, key_cache, value_cache, cache_lens, tree_mask);
  TORCH_CHECK(false, "tree_attention_cpu: not implemented yet");
}
}  // namespace ptp
