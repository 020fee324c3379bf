// verify_tree: batched acceptance of draft trees (a chain is the tree with parents[i] = i - 1).
//
// Node 0 of every row is the root: the last committed token, whose target logits give the
// distribution of the first draft token. Nodes 1..N are draft tokens.
//
//   draft_tokens  [B, N+1] int64      draft token of each node (node 0's entry is not verified)
//   parents       [B, N+1] int64      parents[b, 0] = -1; for i >= 1 a parent in [0, i-1], or -1
//                                     for a padding node that is not part of the tree
//   target_logits [B, N+1, V] float   target logits at each node (the next-token distribution)
//   draft_probs   [B, N+1, V] float32 mode "rejection" only: the (filtered) draft distribution
//                                     node i's token was drawn from (row 0 unused)
//   uniforms      [B, N+1] float32/64 "coupled": uniforms[b, d] is the uniform of the token that
//                                     follows a node at depth d (root depth 0);
//                                     "rejection": uniforms[b, i] (i >= 1) is node i's acceptance
//                                     test, uniforms[b, 0] draws the final (residual/bonus) token
//   mode          "greedy" | "coupled" | "rejection"
//   temperature, top_k, top_p         applied to the target logits (and nothing else) before
//                                     coupled picks or rejection tests; temperature 0 = argmax
// returns
//   num_accepted   [B] int64          accepted draft nodes (the root not counted)
//   accepted_nodes [B, N+1] int64     the accepted path: 0, then accepted node ids; -1 padded
//   next_token     [B] int64          the bonus / correction token after the accepted path
//
// Invalid rows (a sentinel, not an error: values are never read on the host for CUDA inputs, and
// one bad row must not fail the batch): a row is invalid when mode is "coupled" or "rejection"
// and one of its uniforms is not in [0, 1) (NaN included), or when its walk reaches a node whose
// logits x (divided by the temperature when sampling) hold a NaN or +inf, or are all -inf (no
// token can be drawn). An invalid row gets num_accepted 0, accepted_nodes [0, -1, ...] and
// next_token -1, on every backend and in ptp_ext.reference.verify_tree_ref; the other rows are
// unaffected. -inf logits are masks (probability 0). ptp_ext.ops.verify_tree(...,
// raise_on_invalid=True) turns a sentinel into a ValueError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "../common/checks.h"

namespace ptp {

enum class VerifyMode : int { kGreedy = 0, kCoupled = 1, kRejection = 2 };

inline VerifyMode parse_verify_mode(c10::string_view mode) {
  if (mode == "greedy") return VerifyMode::kGreedy;
  if (mode == "coupled") return VerifyMode::kCoupled;
  if (mode == "rejection") return VerifyMode::kRejection;
  PTP_CHECK(false, "mode must be one of 'greedy', 'coupled', 'rejection', got '",
            std::string(mode.data(), mode.size()), "'");
  return VerifyMode::kGreedy;
}

inline VerifyMode check_verify_inputs(const at::Tensor& draft_tokens, const at::Tensor& parents,
                                      const at::Tensor& target_logits,
                                      const std::optional<at::Tensor>& draft_probs,
                                      const std::optional<at::Tensor>& uniforms,
                                      c10::string_view mode_name, double temperature,
                                      int64_t top_k, double top_p) {
  const VerifyMode mode = parse_verify_mode(mode_name);
  PTP_CHECK(target_logits.dim() == 3, "target_logits must have shape [B, N+1, V], got ",
            describe(target_logits));
  check_float(target_logits, "target_logits");
  const int64_t B = target_logits.size(0), N1 = target_logits.size(1), V = target_logits.size(2);
  PTP_CHECK(N1 >= 1 && V >= 1, "target_logits must have N+1 >= 1 nodes and V >= 1, got ",
            describe(target_logits));
  check_dtype(draft_tokens, at::kLong, "draft_tokens");
  check_shape(draft_tokens, "draft_tokens", "[B, N+1]", {B, N1});
  check_dtype(parents, at::kLong, "parents");
  check_shape(parents, "parents", "[B, N+1]", {B, N1});
  check_same_device(draft_tokens, target_logits, "draft_tokens", "target_logits");
  check_same_device(parents, target_logits, "parents", "target_logits");
  check_contiguous(draft_tokens, "draft_tokens");
  check_contiguous(parents, "parents");
  check_contiguous(target_logits, "target_logits");
  PTP_CHECK(temperature >= 0.0, "temperature must be >= 0, got ", temperature);
  PTP_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1], got ", top_p);
  PTP_CHECK(top_k >= 0, "top_k must be >= 0 (0 = disabled), got ", top_k);
  if (mode == VerifyMode::kRejection) {
    PTP_CHECK(draft_probs.has_value(), "mode 'rejection' needs draft_probs [B, N+1, V]");
    check_dtype(*draft_probs, at::kFloat, "draft_probs");
    check_shape(*draft_probs, "draft_probs", "[B, N+1, V]", {B, N1, V});
    check_same_device(*draft_probs, target_logits, "draft_probs", "target_logits");
    check_contiguous(*draft_probs, "draft_probs");
  }
  if (mode != VerifyMode::kGreedy) {
    PTP_CHECK(uniforms.has_value(), "mode '", std::string(mode_name.data(), mode_name.size()),
              "' needs uniforms [B, N+1]");
    const at::Tensor& u = *uniforms;
    PTP_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "uniforms must be float32 or float64 [B, N+1], got ", describe(u));
    check_shape(u, "uniforms", "[B, N+1]", {B, N1});
    check_same_device(u, target_logits, "uniforms", "target_logits");
    check_contiguous(u, "uniforms");
  }
  // Index ranges can only be checked without a device sync on the CPU. CUDA kernels treat an
  // out-of-range parent as padding and an out-of-range draft token as never matching.
  if (parents.device().is_cpu() && B > 0) {
    const auto* p = parents.data_ptr<int64_t>();
    const auto* t = draft_tokens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      PTP_CHECK(p[b * N1] == -1, "parents[", b, ", 0] must be -1 (node 0 is the root), got ",
                p[b * N1]);
      for (int64_t i = 1; i < N1; ++i) {
        const int64_t pi = p[b * N1 + i];
        PTP_CHECK(pi >= -1 && pi < i, "parents[", b, ", ", i, "] must be in [-1, ", i - 1,
                  "] (parents come before children; -1 = padding), got ", pi);
        if (pi >= 0) {
          PTP_CHECK(t[b * N1 + i] >= 0 && t[b * N1 + i] < V, "draft_tokens[", b, ", ", i,
                    "] must be in [0, V=", V, "), got ", t[b * N1 + i]);
        }
      }
    }
  }
  return mode;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& target_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniforms,
    c10::string_view mode, double temperature, int64_t top_k, double top_p);

#ifdef PTP_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cuda(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& target_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniforms,
    c10::string_view mode, double temperature, int64_t top_k, double top_p);
#endif

}  // namespace ptp
