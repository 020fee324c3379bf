// CUDA launcher of sampler_mlp: shared argument check, device guard, current stream, float32
// scratch from the caching allocator (CUDA-graph safe), no host synchronisation (prev_tokens are
// clamped on the device). Rows are processed in chunks of kMaxRows; each chunk reads the weights
// once (see sampler_mlp_kernels.cuh for the launch sequence and the thread mapping).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/ops/empty.h>

#include "sampler_mlp.h"
#include "sampler_mlp_kernels.cuh"

namespace ptp {
namespace {

namespace k = sampler_mlp_kernels;

int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {0};
  if (device < 0 || device >= kMaxDevices) return 132;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

template <typename T>
void run(const at::Tensor& hidden, const at::Tensor& prev_tokens, const at::Tensor& embedding,
         const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
         const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& norm1_weight,
         const std::optional<at::Tensor>& norm1_bias,
         const std::optional<at::Tensor>& norm2_weight,
         const std::optional<at::Tensor>& norm2_bias, bool silu_out, float eps, at::Tensor& out,
         cudaStream_t stream, int sms) {
  const int64_t N = hidden.size(0), dh = hidden.size(1), de = embedding.size(1);
  const int64_t dmid = w1.size(0), dout = w2.size(0), K1 = dh + de;
  const auto fopts = hidden.options().dtype(at::kFloat);
  const int64_t chunk = std::min<int64_t>(N, k::kMaxRows);
  at::Tensor h = at::empty({chunk, dmid}, fopts);
  at::Tensor y = norm2_weight.has_value() ? at::empty({chunk, dout}, fopts) : at::Tensor();
  at::Tensor stats = norm1_weight.has_value() ? at::empty({2, chunk}, fopts) : at::Tensor();
  const size_t es = hidden.element_size();
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };

  for (int64_t n0 = 0; n0 < N; n0 += k::kMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(k::kMaxRows, N - n0));
    k::LinearParams p1{};
    p1.gather = true;
    p1.hidden = static_cast<const char*>(hidden.data_ptr()) + n0 * dh * es;
    p1.prev_tokens = prev_tokens.data_ptr<int64_t>() + n0;
    p1.embedding = embedding.data_ptr();
    p1.dh = static_cast<int>(dh);
    p1.de = static_cast<int>(de);
    p1.vocab = embedding.size(0);
    p1.w = w1.data_ptr();
    p1.bias = ptr_or_null(b1);
    p1.N = rows;
    p1.K = static_cast<int>(K1);
    p1.M = static_cast<int>(dmid);
    p1.vec = K1 % 8 == 0 && aligned(p1.w);
    p1.silu = true;
    p1.out_f = h.data_ptr<float>();
    C10_CUDA_CHECK(k::launch_linear<T>(p1, sms, stream));

    float* mean = nullptr;
    float* rstd = nullptr;
    if (norm1_weight.has_value()) {
      mean = stats.data_ptr<float>();
      rstd = mean + chunk;
      C10_CUDA_CHECK(k::launch_layer_norm_rows<T>(h.data_ptr<float>(), rows,
                                                  static_cast<int>(dmid), eps, mean, rstd,
                                                  nullptr, nullptr, nullptr, stream));
    }

    T* out_rows = reinterpret_cast<T*>(static_cast<char*>(out.data_ptr()) + n0 * dout * es);
    k::LinearParams p2{};
    p2.gather = false;
    p2.xf = h.data_ptr<float>();
    p2.norm_mean = mean;
    p2.norm_rstd = rstd;
    p2.norm_weight = ptr_or_null(norm1_weight);
    p2.norm_bias = ptr_or_null(norm1_bias);
    p2.w = w2.data_ptr();
    p2.bias = ptr_or_null(b2);
    p2.N = rows;
    p2.K = static_cast<int>(dmid);
    p2.M = static_cast<int>(dout);
    p2.vec = dmid % 8 == 0 && aligned(p2.w);
    p2.silu = silu_out;
    p2.out_f = norm2_weight.has_value() ? y.data_ptr<float>() : nullptr;
    p2.out = out_rows;
    C10_CUDA_CHECK(k::launch_linear<T>(p2, sms, stream));

    if (norm2_weight.has_value()) {
      C10_CUDA_CHECK(k::launch_layer_norm_rows<T>(
          y.data_ptr<float>(), rows, static_cast<int>(dout), eps, nullptr, nullptr,
          static_cast<const T*>(norm2_weight->data_ptr()),
          static_cast<const T*>(ptr_or_null(norm2_bias)), out_rows, stream));
    }
  }
}

}  // namespace

at::Tensor sampler_mlp_cuda(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                            const at::Tensor& embedding, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                            const std::optional<at::Tensor>& b2,
                            const std::optional<at::Tensor>& norm1_weight,
                            const std::optional<at::Tensor>& norm1_bias,
                            const std::optional<at::Tensor>& norm2_weight,
                            const std::optional<at::Tensor>& norm2_bias, bool silu_out,
                            double eps) {
  check_sampler_mlp_inputs(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight,
                           norm1_bias, norm2_weight, norm2_bias);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out = at::empty({hidden.size(0), w2.size(0)}, hidden.options());
  if (hidden.size(0) == 0) return out;
  PTP_CHECK(hidden.size(1) + embedding.size(1) < (int64_t{1} << 31) &&
                w1.size(0) < (int64_t{1} << 31) && w2.size(0) < (int64_t{1} << 31),
            "sampler_mlp: dimensions must fit in int32");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream();
  const int sms = sm_count(hidden.get_device());
  const float e = static_cast<float>(eps);
  switch (hidden.scalar_type()) {
    case at::kFloat:
      run<float>(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight, norm1_bias,
                 norm2_weight, norm2_bias, silu_out, e, out, stream, sms);
      break;
    case at::kHalf:
      run<__half>(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight, norm1_bias,
                  norm2_weight, norm2_bias, silu_out, e, out, stream, sms);
      break;
    default:  // kBFloat16 (the check admits only these three)
      run<__nv_bfloat16>(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight,
                         norm1_bias, norm2_weight, norm2_bias, silu_out, e, out, stream, sms);
  }
  return out;
}

}  // namespace ptp
