// The work unit of the CPU tree-attention kernel (tree_attention_cpu_kernel.h reads its fields by
// name), shared by tree_attention_cpu.cpp and the fused decode step (decode_step_cpu.cpp).
// Include inside namespace ptp, after <cstdint>.
#pragma once


// One work unit of the kernel (see tree_attention_cpu_kernel.h).
struct UnitArgs {
  int64_t L;           // cache_len of the row: positions < L are visible to every query row
  int T, G, D, Dp;     // new tokens, query heads per KV head, head dim, D rounded up to kW
  int64_t kbeg, kend;  // key positions [kbeg, kend) of this unit (kend <= L + T)
  int64_t q_stride_t;  // elements between query tokens (H_q * D)
  const bool* mask;    // [T, T] or nullptr (causal)
  // With a mask: the new tokens row t sees, in index order (vis[t * T + i], i < vis_cnt[t]),
  // then the ones it does not see (i >= vis_cnt[t]: their values only, with weight 0).
  // Row t reads them as if they sat at positions L, L + 1, ... (see the kernel).
  const int32_t* vis;
  const int32_t* vis_cnt;
  float scale2;        // scale * log2(e)
  float* acc;          // [R, Dp] unnormalised output 
  float* m;            // [R] running max (base 2)
  float* l;            // [R] running sum
  float* work;         // scratch: work_floats() floats
};
