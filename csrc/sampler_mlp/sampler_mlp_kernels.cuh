// CUDA kernels of sampler_mlp (torch-free: raw pointers, cudaStream_t; plain nvcc can compile it).
//
// The op is memory-bound for the few rows it sees (N <= 16 per launch): the time is the time to
// read w1 and w2 once. Launch sequence for a chunk of at most kMaxRows rows:
//   1. linear_rows_kernel (gather): h = silu(cat(hidden, embedding[prev]) @ w1^T + b1), float32;
//   2. layer_norm_rows_kernel (stats only), when norm1: per-row mean / rstd of h;
//   3. linear_rows_kernel: y = h' @ w2^T + b2 [silu], h' = LayerNorm1(h) applied while staging;
//      writes the output directly when there is no norm2, else float32 y;
//   4. layer_norm_rows_kernel (write), when norm2: out = LayerNorm2(y) in the output dtype.
//
// linear_rows_kernel: kThreads = 256 threads = 8 warps per block; each warp owns FPW consecutive
// output features (rows of W) and the block 8 * FPW features, so every weight row is read by
// exactly one warp, once. The inputs x [NR, K] are staged in float32 in shared memory in chunks
// of kc columns (kc * NR * 4 bytes <= 32 KB), shared by the 8 warps; each thread issues
// kStageUnroll independent loads before its first store (staging used to cost one memory latency
// per element per thread, which made the time grow linearly with the rows: measured on an H100,
// 2026-11-23), and the columns are swizzled within 8-column groups so the 16-byte reads below are
// free of bank conflicts. Within a chunk lane l reads
// 8 consecutive weights per 256-column segment with 16-byte loads (two for float32), converts
// them to float32 and accumulates FPW x NR dot-product partials in registers; each 8-float slice
// of x read from shared memory serves FPW features. Before staging a chunk the warp issues L2
// prefetches for its weights of that chunk (first chunk) and of the next one, so weight traffic
// overlaps the staging. At the end the partials are reduced with
// warp shuffles and the epilogue (bias, SiLU) is applied in float32. Rows n >= N are staged as
// zeros and never written.
//
// layer_norm_rows_kernel: one block per row, two-pass mean / variance in float32 with warp-shuffle
// + shared-memory block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_utils.cuh"

namespace sampler_mlp_kernels {

using ptp::from_float;
using ptp::to_float;
using ptp::warp_sum;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 16;          // rows per launch (the host loops over chunks)
constexpr int kSmemFloats = 8192;     // 32 KB of staged x per block
constexpr int kSegment = 32 * 8;      // columns one warp covers per step (8 per lane)
constexpr int kStageUnroll = 8;       // independent x loads in flight per thread while staging

struct LinearParams {
  // Inputs, staged as float32. gather: x[n] = cat(hidden[n], embedding[prev_tokens[n]]);
  // otherwise x = xf [N, K], optionally LayerNorm-ed with (norm_mean, norm_rstd) per row and
  // (norm_weight, norm_bias) per column.
  bool gather;
  const void* hidden;           // [N, dh]
  const int64_t* prev_tokens;   // [N] (clamped to [0, vocab))
  const void* embedding;        // [vocab, de]
  int dh, de;
  int64_t vocab;
  const float* xf;              // [N, K]
  const float* norm_mean;       // [N] or nullptr
  const float* norm_rstd;       // [N]
  const void* norm_weight;      // [K] or nullptr
  const void* norm_bias;        // [K] or nullptr
  // Weights and outputs.
  const void* w;                // [M, K]
  const void* bias;             // [M] or nullptr
  int N, K, M, kc;              // kc: staged columns per chunk, multiple of kSegment
  bool vec;                     // 16-byte weight loads allowed (K % 8 == 0, w 16-byte aligned)
  bool silu;
  float* out_f;                 // [N, M] float32, or nullptr:
  void* out;                    // [N, M] in the input dtype
};

// 8 consecutive weights p[0..8) as float32 with 16-byte read-only loads (p 16-byte aligned).
template <typename T> __device__ __forceinline__ void load8_vec(const T* p, float (&w)[8]);
template <> __device__ __forceinline__ void load8_vec<float>(const float* p, float (&w)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
  w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}
template <> __device__ __forceinline__ void load8_vec<__half>(const __half* p, float (&w)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8_vec<__nv_bfloat16>(const __nv_bfloat16* p, float (&w)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    w[2 * i] = f.x;
    w[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Shared-memory position of staged column kk (within a row of kc columns, kc % 256 == 0): the
// two 4-column halves of every 8-column group g are swapped when bit 2 of g is set. Lane l of a
// warp reads group 32 * seg + l, so in each quarter-warp phase of a 16-byte load lanes 0-3 hit
// banks {0-3, 8-11, 16-19, 24-27} and lanes 4-7 banks {4-7, 12-15, 20-23, 28-31}: no conflicts
// (unswizzled, lanes l and l + 4 collide). A permutation within each 8-column group, so staging
// writes of consecutive columns stay conflict-free too.
__device__ __forceinline__ int swizzle_col(int kk) { return kk ^ (((kk >> 5) & 1) << 2); }

// x[n][k] as float32: the gathered cat(hidden, embedding[prev]) row, or the float32 input with
// the optional per-row LayerNorm applied.
template <typename T>
__device__ __forceinline__ float stage_value(const LinearParams& p, int n, int k) {
  if (p.gather) {
    if (k < p.dh) return to_float(static_cast<const T*>(p.hidden)[static_cast<int64_t>(n) * p.dh + k]);
    int64_t t = p.prev_tokens[n];
    t = t < 0 ? 0 : (t >= p.vocab ? p.vocab - 1 : t);
    return to_float(static_cast<const T*>(p.embedding)[t * p.de + (k - p.dh)]);
  }
  float v = p.xf[static_cast<int64_t>(n) * p.K + k];
  if (p.norm_mean != nullptr) {
    v = (v - p.norm_mean[n]) * p.norm_rstd[n] * to_float(static_cast<const T*>(p.norm_weight)[k]);
    if (p.norm_bias != nullptr) v += to_float(static_cast<const T*>(p.norm_bias)[k]);
  }
  return v;
}

// L2 prefetch of this warp's weight rows m0 .. m0+FPW-1 over the chunk of columns starting at
// k_start (lane l: every 256-column segment's 8 weights at l * 8).
template <typename T, int FPW>
__device__ __forceinline__ void prefetch_chunk(const T* W, const LinearParams& p, int m0, int lane,
                                               int k_start) {
  const int kn = min(p.kc, p.K - k_start);
#pragma unroll
  for (int f = 0; f < FPW; ++f) {
    if (m0 + f >= p.M) break;
    const T* row = W + static_cast<int64_t>(m0 + f) * p.K + k_start;
    for (int kk = lane * 8; kk < kn; kk += kSegment) prefetch_l2(row + kk);
  }
}

template <typename T, int NR, int FPW>
__global__ void __launch_bounds__(kThreads) linear_rows_kernel(const LinearParams p) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);  // [NR, kc]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = (blockIdx.x * kWarps + warp) * FPW;
  const T* W = static_cast<const T*>(p.w);

  float acc[FPW][NR];
#pragma unroll
  for (int f = 0; f < FPW; ++f)
#pragma unroll
    for (int n = 0; n < NR; ++n) acc[f][n] = 0.f;

  // Pull this warp's weights of the first chunk into L2 before staging it, so HBM is busy while
  // the block stages x (no registers needed).
  prefetch_chunk<T, FPW>(W, p, m0, lane, 0);
  // Lanes 4-7 of every 8 read the two halves of their 8-column group in swapped order (see
  // swizzle_col): conflict-free 16-byte shared-memory reads.
  const int sw = ((lane >> 2) & 1) << 2;

  for (int k0 = 0; k0 < p.K; k0 += p.kc) {
    const int kn = min(p.kc, p.K - k0);
    // Same for the next chunk: its weights stream into L2 while this one is staged and used.
    if (k0 + p.kc < p.K) prefetch_chunk<T, FPW>(W, p, m0, lane, k0 + p.kc);
    __syncthreads();  // every warp is done with the previous chunk
    // Stage x[:, k0:k0+kn] in batches of kStageUnroll independent loads per thread, all issued
    // before the first shared-memory store, so staging costs a few memory latencies, not one
    // per element.
    const int total = NR * p.kc;
    for (int base = threadIdx.x; base < total; base += kThreads * kStageUnroll) {
      float v[kStageUnroll];
      int dst[kStageUnroll];  // shared-memory position, -1 past the end
#pragma unroll
      for (int u = 0; u < kStageUnroll; ++u) {
        const int i = base + u * kThreads;
        v[u] = 0.f;
        dst[u] = -1;
        if (i < total) {
          const int n = i / p.kc, kk = i - n * p.kc;
          dst[u] = n * p.kc + swizzle_col(kk);
          if (n < p.N && kk < kn) v[u] = stage_value<T>(p, n, k0 + kk);
        }
      }
#pragma unroll
      for (int u = 0; u < kStageUnroll; ++u)
        if (dst[u] >= 0) xs[dst[u]] = v[u];
    }
    __syncthreads();

#pragma unroll 2
    for (int kk = lane * 8; kk < kn; kk += kSegment) {
      float w[FPW][8];
#pragma unroll
      for (int f = 0; f < FPW; ++f) {
        const int m = m0 + f;
        const T* src = W + static_cast<int64_t>(m) * p.K + k0 + kk;
        if (m < p.M && p.vec) {
          load8_vec<T>(src, w[f]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e)
            w[f][e] = (m < p.M && kk + e < kn) ? to_float(src[e]) : 0.f;
        }
      }
#pragma unroll
      for (int n = 0; n < NR; ++n) {
        // Logical columns kk..kk+3 (a) and kk+4..kk+7 (b) of row n.
        const float4 a = *reinterpret_cast<const float4*>(xs + n * p.kc + kk + sw);
        const float4 b = *reinterpret_cast<const float4*>(xs + n * p.kc + kk + (4 ^ sw));
#pragma unroll
        for (int f = 0; f < FPW; ++f) {
          float s = acc[f][n];
          s = fmaf(w[f][0], a.x, s);
          s = fmaf(w[f][1], a.y, s);
          s = fmaf(w[f][2], a.z, s);
          s = fmaf(w[f][3], a.w, s);
          s = fmaf(w[f][4], b.x, s);
          s = fmaf(w[f][5], b.y, s);
          s = fmaf(w[f][6], b.z, s);
          s = fmaf(w[f][7], b.w, s);
          acc[f][n] = s;
        }
      }
    }
  }

  // Reduce across the warp (every lane gets every sum), then lane (f * NR + n) % 32 writes one.
#pragma unroll
  for (int f = 0; f < FPW; ++f) {
    const int m = m0 + f;
#pragma unroll
    for (int n = 0; n < NR; ++n) {
      const float s = warp_sum(acc[f][n]);
      if (lane == (f * NR + n) % 32 && m < p.M && n < p.N) {
        float v = s;
        if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[m]);
        if (p.silu) v = v / (1.f + __expf(-v));
        const int64_t o = static_cast<int64_t>(n) * p.M + m;
        if (p.out_f != nullptr) p.out_f[o] = v;
        else static_cast<T*>(p.out)[o] = from_float<T>(v);
      }
    }
  }
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red is reused between calls
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < kWarps ? red[lane] : 0.f;
  return warp_sum(t);
}

// One block per row of y [rows, M]: mean / rstd (stats mode: written to mean[row], rstd[row]) or
// out[row] = (y - mean) * rstd * weight + bias in T (write mode, out != nullptr).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    layer_norm_rows_kernel(const float* y, int M, float eps, float* mean, float* rstd,
                           const T* weight, const T* bias, T* out) {
  __shared__ float red[kWarps];
  const float* row = y + static_cast<int64_t>(blockIdx.x) * M;
  float s = 0.f;
  for (int i = threadIdx.x; i < M; i += kThreads) s += row[i];
  const float mu = block_sum(s, red) / M;
  float q = 0.f;
  for (int i = threadIdx.x; i < M; i += kThreads) {
    const float d = row[i] - mu;
    q += d * d;
  }
  const float r = rsqrtf(block_sum(q, red) / M + eps);
  if (out == nullptr) {
    if (threadIdx.x == 0) {
      mean[blockIdx.x] = mu;
      rstd[blockIdx.x] = r;
    }
    return;
  }
  T* dst = out + static_cast<int64_t>(blockIdx.x) * M;
  for (int i = threadIdx.x; i < M; i += kThreads) {
    float v = (row[i] - mu) * r * to_float(weight[i]);
    if (bias != nullptr) v += to_float(bias[i]);
    dst[i] = from_float<T>(v);
  }
}

// Host side ---------------------------------------------------------------------------------

// Staged columns per chunk for NR rows: as many as fit in kSmemFloats, a multiple of kSegment.
inline int chunk_columns(int NR, int K) {
  int kc = (kSmemFloats / NR) / kSegment * kSegment;
  const int k_round = (K + kSegment - 1) / kSegment * kSegment;
  return kc < k_round ? kc : k_round;
}

template <typename T, int NR, int FPW>
cudaError_t launch_linear_nr(const LinearParams& p, cudaStream_t stream) {
  const int per_block = kWarps * FPW;
  const dim3 grid((p.M + per_block - 1) / per_block);
  const size_t smem = static_cast<size_t>(NR) * p.kc * sizeof(float);
  linear_rows_kernel<T, NR, FPW><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int FPW>
cudaError_t launch_linear_fpw(LinearParams p, cudaStream_t stream) {
  if (p.N <= 1) { p.kc = chunk_columns(1, p.K); return launch_linear_nr<T, 1, FPW>(p, stream); }
  if (p.N <= 2) { p.kc = chunk_columns(2, p.K); return launch_linear_nr<T, 2, FPW>(p, stream); }
  if (p.N <= 4) { p.kc = chunk_columns(4, p.K); return launch_linear_nr<T, 4, FPW>(p, stream); }
  if (p.N <= 8) { p.kc = chunk_columns(8, p.K); return launch_linear_nr<T, 8, FPW>(p, stream); }
  p.kc = chunk_columns(16, p.K);
  return launch_linear_nr<T, 16, FPW>(p, stream);
}

// y = act(x @ w^T + b) for p.N <= kMaxRows rows; FPW chosen so the grid covers the GPU.
template <typename T>
cudaError_t launch_linear(const LinearParams& p, int num_sms, cudaStream_t stream) {
  // FPW = 2 halves the shared-memory reads per weight. From 4 rows on those reads (NR float4
  // pairs per 8 weights) bound the kernel, so take it as soon as the grid still covers every SM;
  // with 1-2 rows only once there are >= 2 blocks per SM.
  const int fpw2_min_m = (p.N >= 4 ? 1 : 2) * 2 * kWarps * num_sms;
  if (p.M >= fpw2_min_m) return launch_linear_fpw<T, 2>(p, stream);
  return launch_linear_fpw<T, 1>(p, stream);
}

template <typename T>
cudaError_t launch_layer_norm_rows(const float* y, int rows, int M, float eps, float* mean,
                                   float* rstd, const T* weight, const T* bias, T* out,
                                   cudaStream_t stream) {
  layer_norm_rows_kernel<T><<<rows, kThreads, 0, stream>>>(y, M, eps, mean, rstd, weight, bias,
                                                           out);
  return cudaGetLastError();
}

}  // namespace sampler_mlp_kernels
