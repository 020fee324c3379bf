// CUDA launcher of tree_attention: checks the inputs (shared check function), picks the kernel
// (tensor-core path for fp16/bf16 with D in {64, 128, 256}, CUDA-core path otherwise), the number
// of key splits (whole waves of resident blocks, see choose_splits), and launches on the current
// stream. No host synchronisation: cache_lens is read (and clamped) on the device.
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

// Splits of the key range. `slots` = blocks resident at once on the whole GPU (SMs x occupancy),
// `base` = blocks per split (B * Hkv * row_tiles). A block costs about (keys / splits + kOverhead)
// key-times, and blocks run in waves of `slots`: pick the split count minimising
// waves(splits) * (S_max / splits + kOverhead), i.e. fill the last wave instead of spilling a few
// blocks into a second one (288 blocks on 264 slots ran ~1.6x slower than 256). The real lengths
// are on the device; S_max bounds them. At least `min_keys` keys per split, at most 256 splits.
int choose_splits(int64_t base, int64_t S_max, int64_t slots, int min_keys) {
  constexpr int64_t kOverhead = 192;  // keys-equivalent of a block's prologue / epilogue / merge
  const int64_t max_splits =
      std::max<int64_t>(1, std::min<int64_t>(k::kMaxSplits, (S_max + min_keys - 1) / min_keys));
  int64_t best = 1;
  double best_cost = 1e30;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t waves = (base * s + slots - 1) / slots;
    const double cost = static_cast<double>(waves) *
                        (static_cast<double>(S_max) / static_cast<double>(s) + kOverhead);
    if (cost < best_cost * 0.999) {  // ties: fewer splits (less merge work)
      best_cost = cost;
      best = s;
    }
  }
  return static_cast<int>(best);
}

// Resident blocks per SM of `kernel` (cached per kernel and device by the caller's statics).
int blocks_per_sm(const void* kernel, int threads, size_t smem) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return n > 0 ? n : 1;
}

template <typename scalar_t>
void launch_merge(const k::Params& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hkv * p.M;
  const int64_t blocks = (rows + k::kMergeWarps - 1) / k::kMergeWarps;  // one warp per row
  k::merge_splits_kernel<scalar_t>
      <<<static_cast<unsigned>(blocks), 32 * k::kMergeWarps, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the split count for `kernel` (rows_per_tile query rows per block, `threads`, `smem`
// bytes; `bps` = its resident blocks per SM), allocates the partials, launches the attention
// kernel and, with several splits, the merge.
template <typename scalar_t, typename Kernel, typename... Args>
void run_kernel(k::Params& p, Kernel kernel, int threads, size_t smem, int rows_per_tile, int bps,
                int device, const at::Tensor& query, cudaStream_t stream, Args... args) {
  p.row_tiles = (p.M + rows_per_tile - 1) / rows_per_tile;
  const int64_t base = static_cast<int64_t>(p.B) * p.Hkv * p.row_tiles;
  const int64_t slots = static_cast<int64_t>(sm_count(device)) * bps;
  p.num_splits = choose_splits(base, p.S_max, slots, 256);
  at::Tensor part_o, part_lse;
  if (p.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(p.num_splits) * p.B * p.Hkv * p.M;
    auto f32 = query.options().dtype(at::kFloat);
    part_o = at::empty({rows, p.D}, f32);
    part_lse = at::empty({rows}, f32);
    p.part_o = part_o.data_ptr<float>();
    p.part_lse = part_lse.data_ptr<float>();
  }
  dim3 grid(p.row_tiles * p.num_splits, p.Hkv, p.B);
  kernel<<<grid, threads, smem, stream>>>(p, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) launch_merge<scalar_t>(p, stream);
}

template <typename scalar_t, int D, int STAGES>
void run_mma(k::Params& p, int WM, int device, const at::Tensor& query, cudaStream_t stream) {
  constexpr size_t smem = k::mma_smem_bytes<D, STAGES>();
  auto kernel = k::attention_mma_kernel<scalar_t, D, STAGES>;
  static int bps[kMaxDevices] = {};  // attribute set + occupancy, per device
  if (bps[device] == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    bps[device] = blocks_per_sm(reinterpret_cast<const void*>(kernel), k::kMmaThreads, smem);
  }
  run_kernel<scalar_t>(p, kernel, k::kMmaThreads, smem, 16 * WM, bps[device], device, query,
                       stream, WM);
}

template <typename scalar_t>
void run_fma(k::Params& p, int device, const at::Tensor& query, cudaStream_t stream) {
  const size_t smem = k::fma_smem_bytes(p.D);
  auto kernel = k::attention_fma_kernel<scalar_t>;
  static bool configured[kMaxDevices] = {};
  if (!configured[device]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(k::fma_smem_bytes(k::kFmaMaxD))));
    configured[device] = true;
  }
  const int bps = blocks_per_sm(reinterpret_cast<const void*>(kernel), k::kFmaThreads, smem);
  run_kernel<scalar_t>(p, kernel, k::kFmaThreads, smem, k::kFmaRows, bps, device, query, stream);
}

template <typename scalar_t>
void run(k::Params& p, bool use_mma, int WM, int device, const at::Tensor& query,
         cudaStream_t stream) {
  if (use_mma) {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      switch (p.D) {
        case 64: run_mma<scalar_t, 64, 3>(p, WM, device, query, stream); break;
        case 128: run_mma<scalar_t, 128, 3>(p, WM, device, query, stream); break;
        default: run_mma<scalar_t, 256, 2>(p, WM, device, query, stream); break;
      }
    }
  } else {
    run_fma<scalar_t>(p, device, query, stream);
  }
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
              cat("tree_attention_cuda: sizes exceed the launch / 32-bit index range (B=", B,
              ", T=", T, ", H_q=", Hq, ", H_kv=", Hkv, ", S_max=", S, ")"));

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
  TORCH_CHECK(device >= 0 && device < kMaxDevices,
              cat("tree_attention_cuda: device index ", device));
  switch (dtype) {
    case at::kFloat: run<float>(p, false, WM, device, query, stream); break;
    case at::kHalf: run<__half>(p, use_mma, WM, device, query, stream); break;
    case at::kBFloat16: run<__nv_bfloat16>(p, use_mma, WM, device, query, stream); break;
    default: TORCH_CHECK(false, "unreachable dtype");
  }
  return {out, lse};
}

}  // namespace ptp
