// verify_tree, CUDA launcher: checks the arguments (the shared check_verify_inputs), sets the
// device guard, allocates the outputs and a workspace, zeroes the per-row counters
// (cudaMemsetAsync on the current stream: graph-capturable, no host sync) and launches the
// single kernel of verify_kernels.cuh for the whole batch.
#include "verify.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "verify_kernels.cuh"

namespace ptp {

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cuda(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& target_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniforms,
    c10::string_view mode, double temperature, int64_t top_k, double top_p) {
  const VerifyMode m = check_verify_inputs(draft_tokens, parents, target_logits, draft_probs,
                                           uniforms, mode, temperature, top_k, top_p);
  const c10::cuda::CUDAGuard guard(target_logits.device());
  const int64_t B = target_logits.size(0), N1 = target_logits.size(1), V = target_logits.size(2);
  const auto opts = draft_tokens.options();
  at::Tensor num_accepted = at::empty({B}, opts);
  at::Tensor accepted_nodes = at::empty({B, N1}, opts);
  at::Tensor next_token = at::empty({B}, opts);
  if (B == 0) return {num_accepted, accepted_nodes, next_token};
  // workspace: child [B*N1], token [B*N1], counters [B]
  at::Tensor ws = at::empty({2 * B * N1 + B}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  verify_cuda::Params prm{};
  prm.draft_tokens = draft_tokens.data_ptr<int64_t>();
  prm.parents = parents.data_ptr<int64_t>();
  prm.logits = target_logits.data_ptr();
  prm.draft_probs = m == VerifyMode::kRejection ? draft_probs->data_ptr<float>() : nullptr;
  prm.uniforms = m == VerifyMode::kGreedy ? nullptr : uniforms->data_ptr();
  prm.uniforms_f64 = m != VerifyMode::kGreedy && uniforms->scalar_type() == at::kDouble;
  prm.mode = static_cast<int>(m);
  prm.temperature = static_cast<float>(temperature);
  prm.top_k = top_k;
  prm.top_p = top_p;
  prm.B = B;
  prm.N1 = N1;
  prm.V = V;
  prm.ws_child = ws.data_ptr<int64_t>();
  prm.ws_token = prm.ws_child + B * N1;
  prm.counters = reinterpret_cast<unsigned long long*>(prm.ws_token + B * N1);
  prm.num_accepted = num_accepted.data_ptr<int64_t>();
  prm.accepted_nodes = accepted_nodes.data_ptr<int64_t>();
  prm.next_token = next_token.data_ptr<int64_t>();
  C10_CUDA_CHECK(cudaMemsetAsync(prm.counters, 0, B * sizeof(unsigned long long), stream));

  const bool aligned = reinterpret_cast<uintptr_t>(prm.logits) % 16 == 0;
  cudaError_t err = cudaSuccess;
  switch (target_logits.scalar_type()) {
    case at::kFloat:
      err = verify_cuda::launch_verify_tree<float>(prm, aligned, stream);
      break;
    case at::kHalf:
      err = verify_cuda::launch_verify_tree<__half>(prm, aligned, stream);
      break;
    case at::kBFloat16:
      err = verify_cuda::launch_verify_tree<__nv_bfloat16>(prm, aligned, stream);
      break;
    default:
      TORCH_CHECK(false, "verify_tree_cuda: unsupported dtype");
  }
  C10_CUDA_CHECK(err);
  return {num_accepted, accepted_nodes, next_token};
}

}  // namespace ptp
