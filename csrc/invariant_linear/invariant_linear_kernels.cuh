// The CUDA kernel of invariant_linear (torch-free: compiles alone with nvcc).
//
// One warp per output feature n; for every row m the lanes take k = lane, lane + 32, ... in
// order (a float32 FMA chain per lane), then a fixed butterfly (xor 16, 8, 4, 2, 1) sums the
// lanes. y[m, n] is therefore one fixed sequence of operations over x[m, :] and weight[n, :]:
// bitwise the same whatever the number of rows (cuBLAS picks other tilings and split-K for
// other row counts). The weight row stays in L1/L2 across the rows of a call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_utils.cuh"

namespace ptp {
namespace invariant_linear_kernels {

constexpr int kWarps = 8;  // output features per block (one warp each)

template <typename T>
__global__ void invariant_linear_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                        const T* __restrict__ bias, T* __restrict__ y,
                                        int64_t N, int64_t K, int64_t M) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= M) return;
  const T* wn = w + n * K;
  const float b = bias ? to_float(bias[n]) : 0.f;
  for (int64_t m = 0; m < N; ++m) {
    const T* xm = x + m * K;
    float acc = 0.f;
    for (int64_t k = lane; k < K; k += 32) acc = fmaf(to_float(xm[k]), to_float(wn[k]), acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) y[m * M + n] = from_float<T>(acc + b);
  }
}

// Launches the kernel on `stream`; returns the launch error (cudaSuccess when queued).
template <typename T>
cudaError_t launch(const T* x, const T* w, const T* bias, T* y, int64_t N, int64_t K, int64_t M,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((M + kWarps - 1) / kWarps));
  invariant_linear_kernel<T><<<grid, kWarps * 32, 0, stream>>>(x, w, bias, y, N, K, M);
  return cudaGetLastError();
}

// quant_linear: the same warp per output feature over GGUF blocks (32 weights: one per lane).
// Lane l takes element l of every block, i.e. k = l, l + 32, ... as above, and rebuilds the
// float32 weight exactly as the loader did (Q4_1: fmaf(d, q, m), d * q exact; Q8_0: d * q), so
// y is bitwise invariant_linear_kernel<float> on the dequantised weights.
__device__ __forceinline__ float half_bits_to_f(const uint8_t* p) {
  const uint16_t u = static_cast<uint16_t>(p[0]) | (static_cast<uint16_t>(p[1]) << 8);
  return __half2float(__ushort_as_half(u));
}

template <bool kQ41>
__global__ void quant_linear_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w,
                                    const float* __restrict__ bias, float* __restrict__ y,
                                    int64_t N, int64_t K, int64_t M, int64_t row_bytes) {
  constexpr int kBytes = kQ41 ? 20 : 34;
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= M) return;
  const uint8_t* wn = w + n * row_bytes;
  const float b = bias ? bias[n] : 0.f;
  const int64_t nblk = K / 32;
  for (int64_t m = 0; m < N; ++m) {
    const float* xm = x + m * K;
    float acc = 0.f;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const uint8_t* p = wn + blk * kBytes;
      const float d = half_bits_to_f(p);
      float wv;
      if constexpr (kQ41) {
        const uint8_t byte = p[4 + (lane & 15)];
        const float q = static_cast<float>(lane < 16 ? (byte & 0x0f) : (byte >> 4));
        wv = fmaf(d, q, half_bits_to_f(p + 2));
      } else {
        wv = d * static_cast<float>(static_cast<int8_t>(p[2 + lane]));
      }
      acc = fmaf(xm[blk * 32 + lane], wv, acc);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) y[m * M + n] = acc + b;
  }
}

template <bool kQ41>
cudaError_t launch_quant(const float* x, const uint8_t* w, const float* bias, float* y, int64_t N,
                         int64_t K, int64_t M, int64_t row_bytes, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((M + kWarps - 1) / kWarps));
  quant_linear_kernel<kQ41><<<grid, kWarps * 32, 0, stream>>>(x, w, bias, y, N, K, M, row_bytes);
  return cudaGetLastError();
}

}  // namespace invariant_linear_kernels
}  // namespace ptp
