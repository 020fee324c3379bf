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

namespace ptp {
namespace invariant_linear_kernels {

constexpr int kWarps = 8;  // output features per block (one warp each)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__global__ void invariant_linear_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                        const T* __restrict__ bias, T* __restrict__ y,
                                        int64_t N, int64_t K, int64_t M) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (n >= M) return;
  const T* wn = w + n * K;
  const float b = bias ? to_f(bias[n]) : 0.f;
  for (int64_t m = 0; m < N; ++m) {
    const T* xm = x + m * K;
    float acc = 0.f;
    for (int64_t k = lane; k < K; k += 32) acc = fmaf(to_f(xm[k]), to_f(wn[k]), acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) y[m * M + n] = from_f<T>(acc + b);
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

}  // namespace invariant_linear_kernels
}  // namespace ptp
