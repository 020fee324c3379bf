// CUDA launcher of tree_attention: checks the inputs (shared check function), picks the kernel
// (tensor-core path for fp16/bf16 with D in {64, 128, 256}, CUDA-core path otherwise), the number
// of key splits (enough blocks to fill the GPU twice), and launches on the current stream. No
// host synchronisation: cache_lens is read (and clamped) on the device.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "tree_attention.h"
#include "tree_attention_kernels.cuh"

namespace ptp {
namespace {

namespace k = tree_attention_kernels;

constexpr int kMaxDevices = 64;

int sm_count(int device) {
  static int cache[kMaxDevices] = {0};
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}

// Splits of the key range so that B * Hkv * row_tiles * splits blocks fill the GPU about twice;
// at least `min_keys` keys per split (the real lengths are on the device, S_max bounds them).
int choose_splits(int64_t base_blocks, int64_t S_max, int sms, int min_keys) {
  const int64_t target = 2 * static_cast<int64_t>(sms);
  int64_t splits = (target + base_blocks - 1) / base_blocks;
  const int64_t by_len = (S_max + min_keys - 1) / min_keys;
  splits = std::min<int64_t>(splits, std::max<int64_t>(by_len, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(splits, 256)));
}

template <typename scalar_t, int D, int STAGES>
void launch_mma(const k::Params& p, int WM, int device, cudaStream_t stream) {
  constexpr size_t smem = k::mma_smem_bytes<D, STAGES>();
  auto kernel = k::attention_mma_kernel<scalar_t, D, STAGES>;
  static bool configured[kMaxDevices] = {};  // the attribute is set per device
  if (!configured[device]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    configured[device] = true;
  }
  dim3 grid(p.row_tiles * p.num_splits, p.Hkv, p.B);
  kernel<<<grid, k::kMmaThreads, smem, stream>>>(p, WM);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_fma(const k::Params& p, int device, cudaStream_t stream) {
  const size_t smem = k::fma_smem_bytes(p.D);
  auto kernel = k::attention_fma_kernel<scalar_t>;
  static bool configured[kMaxDevices] = {};
  if (!configured[device]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(k::fma_smem_bytes(k::kFmaMaxD))));
    configured[device] = true;
  }
  dim3 grid(p.row_tiles * p.num_splits, p.Hkv, p.B);
  kernel<<<grid, k::kFmaThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_merge(const k::Params& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hkv * p.M;
  const int64_t blocks = (rows + 3) / 4;  // 4 warps per block, one row each
  k::merge_splits_kernel<scalar_t><<<static_cast<unsigned>(blocks), 128, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void run(k::Params& p, bool use_mma, int WM, int device, const at::Tensor& query,
         cudaStream_t stream) {
  const int rows_per_tile = use_mma ? 16 * WM : k::kFmaRows;
  p.row_tiles = (p.M + rows_per_tile - 1) / rows_per_tile;
  const int64_t base = static_cast<int64_t>(p.B) * p.Hkv * p.row_tiles;
  p.num_splits = choose_splits(base, p.S_max, sm_count(device), 256);
  at::Tensor part_o, part_lse;
  if (p.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(p.num_splits) * p.B * p.Hkv * p.M;
    auto f32 = query.options().dtype(at::kFloat);
    part_o = at::empty({rows, p.D}, f32);
    part_lse = at::empty({rows}, f32);
    p.part_o = part_o.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  if (use_mma) {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      switch (p.D) {
        case 64: launch_mma<scalar_t, 64, 3>(p, WM, device, stream); break;
        case 128: launch_mma<scalar_t, 128, 3>(p, WM, device, stream); break;
        default: launch_mma<scalar_t, 256, 2>(p, WM, device, stream); break;
      }
    }
  } else {
    launch_fma<scalar_t>(p, device, stream);
  }
  if (p.num_splits > 1) launch_merge<scalar_t>(p, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tree_attention_cuda(const at::Tensor& query,
                                                       const at::Tensor& key_cache,
                                                       const at::Tensor& value_cache,
                                                       const at::Tensor& cache_lens,
                                                       const std::optional<at::Tensor>& tree_mask,
                                                       double scale) {
  check_tree_attention_inputs(query, key_cache, value_cache, cache_lens, tree_mask);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t B = query.size(0), T = query.size(1), Hq = query.size(2), D = query.size(3);
  const int64_t Hkv = key_cache.size(1), S = key_cache.size(2);
  at::Tensor out = at::empty_like(query);
  at::Tensor lse = at::empty({B, Hq, T}, query.options().dtype(at::kFloat));
  if (B == 0 || Hq == 0) return {out, lse};
  TORCH_CHECK(S <= INT32_MAX && B * T * Hq <= INT32_MAX && B <= 65535 && Hkv <= 65535,
              "tree_attention_cuda: sizes exceed the launch / 32-bit index range (B=", B,
              ", T=", T, ", H_q=", Hq, ", H_kv=", Hkv, ", S_max=", S, ")");

  k::Params p{};
  p.query = query.data_ptr();
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.cache_lens = cache_lens.data_ptr();
  p.lens_int64 = cache_lens.scalar_type() == at::kLong;
  p.tree_mask = tree_mask.has_value() ? tree_mask->data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = static_cast<int>(B);
  p.T = static_cast<int>(T);
  p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv);
  p.G = static_cast<int>(Hq / Hkv);
  p.S_max = static_cast<int>(S);
  p.D = static_cast<int>(D);
  p.M = static_cast<int>(T * (Hq / Hkv));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const auto dtype = query.scalar_type();
  const bool half_type = dtype == at::kHalf || dtype == at::kBFloat16;
  // cp.async / ldmatrix need 16-byte aligned rows (a contiguous view can start anywhere).
  auto aligned16 = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  const bool use_mma = half_type && (D == 64 || D == 128 || D == 256) && aligned16(query) &&
                       aligned16(key_cache) && aligned16(value_cache);
  // Warps along rows: enough 16-row groups for M (at most 4); the rest split the keys.
  const int WM = p.M <= 16 ? 1 : (p.M <= 32 ? 2 : 4);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = query.get_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "tree_attention_cuda: device index ", device);
  switch (dtype) {
    case at::kFloat: run<float>(p, false, WM, device, query, stream); break;
    case at::kHalf: run<__half>(p, use_mma, WM, device, query, stream); break;
    case at::kBFloat16: run<__nv_bfloat16>(p, use_mma, WM, device, query, stream); break;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
  return {out, lse};
}

}  // namespace ptp
