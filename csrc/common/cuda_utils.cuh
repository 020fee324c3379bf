// Small CUDA device helpers shared by every kernel header (torch-free: plain nvcc includes it).
//
//   to_float(x)        float / __half / __nv_bfloat16 -> float (exact)
//   from_float<T>(x)   float -> T, round to nearest even
//   warp_sum(v)        sum over the 32 lanes by a fixed xor butterfly (16, 8, 4, 2, 1): every
//                      lane gets the same, bitwise reproducible result (float or double)
//   warp_max(v)        max over the 32 lanes (fmaxf: a NaN lane is ignored unless all are NaN)
//
// All lanes of the warp must call the warp_* helpers together (full mask).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace ptp {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace ptp
