// Torch-free CUDA kernels of tree_attention (see tree_attention.h for the semantics).
//
// Work decomposition (flash-decoding + GQA packing):
//   * One kv head of one batch row is one "problem": its M = T * G query rows (T new tokens x the
//     G query heads sharing that kv head; row r = t * G + g) all read the same K/V, so every K/V
//     tile is loaded once per block and used by all M rows.
//   * The key range of row b, [0, cache_lens[b] + T), is split into `num_splits` chunks (a multiple
//     of the key tile each), one block per chunk, so a single sequence still fills the GPU. Each
//     block writes its normalised partial output and its log2-sum-exp; `merge_splits_kernel`
//     combines them (log-sum-exp weights). With one split the block writes the final output.
//   * Grid: x = row_tile + row_tiles * split, y = kv head, z = batch row. The row tiles of one
//     (split, head) are adjacent in x, so the K/V they all read is reused from L2.
//
// Two compute paths:
//   * `attention_mma_kernel` (fp16/bf16, D in {64, 128, 256}): 4 warps, FlashAttention-2 style
//     with mma.sync m16n8k16 (fp32 accumulation) for both Q K^T and P V. Warp w owns 16 query rows
//     (row group w % WM) and 16-key slices (key group w / WM) of each 64-key tile, so for small M
//     the four warps split the keys (WM = 1, WN = 4) and for large M the rows (WM = 4, WN = 1).
//     K/V tiles are copied with 16-byte cp.async into an XOR-swizzled shared buffer (conflict-free
//     ldmatrix), STAGES-deep pipeline. The warps' online-softmax states are merged through shared
//     memory at the end.
//   * `attention_fma_kernel` (any dtype, any D <= 256; used for fp32 and unusual head dims): plain
//     CUDA cores. 4 warps x 4 rows; 32-key tiles in shared memory as fp32; lane j scores key j,
//     then each lane accumulates the output columns d = lane + 32 i.
//
// Masking: key position p (absolute cache index) is visible to new token t of row b iff
// p < end of the block's chunk and (p < L or tree_mask[b, t, p - L]) (causal when no mask), with
// L = cache_lens[b] clamped to [0, S_max - T] on the device (no host sync is allowed).
// Softmax runs in the log2 domain (scores pre-multiplied by scale * log2(e)); a row that sees no
// key keeps m = -inf, which is guarded so no NaN is produced, and ends with out = 0, lse = -inf.
//
// Non-finite inputs (tree_attention.h): a NaN or +inf visible score makes p, hence the running
// sum l, NaN. fmaxf ignores NaN, so a row whose only non -inf scores are NaN keeps m = -inf with
// l = NaN: "seen" is therefore m != -inf || l is NaN, and such a row ends NaN (not 0). The split
// merge propagates a NaN partial log-sum-exp. Masked positions get weight 0 and still multiply
// their value (0 * inf = NaN), like the reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_utils.cuh"

namespace ptp {
namespace tree_attention_kernels {

struct Params {
  const void* query;        // [B, T, Hq, D]
  const void* key_cache;    // [B, Hkv, S_max, D]
  const void* value_cache;  // [B, Hkv, S_max, D]
  const void* cache_lens;   // [B] int32 or int64
  bool lens_int64;
  const bool* tree_mask;    // [B, T, T] or nullptr (causal)
  void* out;                // [B, T, Hq, D], query dtype
  float* lse;               // [B, Hq, T], natural log
  float* part_o;            // [num_splits, B, Hkv, M, D] normalised partial outputs (splits > 1)
  float* part_lse;          // [num_splits, B, Hkv, M] log2-sum-exp of each partial (splits > 1)
  int B, T, Hq, Hkv, G, S_max, D, M;
  int num_splits, row_tiles;
  float scale_log2;         // scale * log2(e)
};

constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ int cache_len(const Params& p, int b) {
  long long L = p.lens_int64 ? static_cast<const long long*>(p.cache_lens)[b]
                             : static_cast<long long>(static_cast<const int*>(p.cache_lens)[b]);
  const long long hi = p.S_max - p.T;
  return static_cast<int>(L < 0 ? 0 : (L > hi ? hi : L));
}

// Chunk [start, end) of the n_keys keys handled by `split`; chunks are multiples of `tile` so
// only the chunk holding the last key has a partial tile. Splits past the end get start >= end.
__device__ __forceinline__ void split_range(int n_keys, int split, int num_splits, int tile,
                                            int& start, int& end) {
  int per = (n_keys + num_splits - 1) / num_splits;
  per = (per + tile - 1) / tile * tile;
  start = split * per;
  end = min(start + per, n_keys);
}

// Is key position `pos` visible to new token `t`? (pos >= chunk start is given.)
__device__ __forceinline__ bool key_visible(int pos, int t, int L, int end, int T,
                                            const bool* mask_row) {
  if (pos >= end) return false;
  if (pos < L) return true;
  const int j = pos - L;  // < T since end <= L + T
  return mask_row ? mask_row[j] : (j <= t);
}

// Writes one finished row (already normalised by its sum; `lse2` in log2 units, -inf for a row
// that saw nothing) either as the final output or as split `split`'s partial.
template <typename scalar_t>
__device__ __forceinline__ void store_row_values(const Params& p, int b, int kvh, int r, int split,
                                                 int d0, const float* vals, int n) {
  if (p.num_splits == 1) {
    const int t = r / p.G, h = kvh * p.G + r % p.G;
    scalar_t* o = static_cast<scalar_t*>(p.out) + ((static_cast<size_t>(b) * p.T + t) * p.Hq + h) *
                                                      static_cast<size_t>(p.D);
    for (int i = 0; i < n; ++i) o[d0 + i] = from_float<scalar_t>(vals[i]);
  } else {
    float* o = p.part_o +
               (((static_cast<size_t>(split) * p.B + b) * p.Hkv + kvh) * p.M + r) *
                   static_cast<size_t>(p.D);
    for (int i = 0; i < n; ++i) o[d0 + i] = vals[i];
  }
}

__device__ __forceinline__ void store_row_lse(const Params& p, int b, int kvh, int r, int split,
                                              float lse2) {
  if (p.num_splits == 1) {
    const int t = r / p.G, h = kvh * p.G + r % p.G;
    p.lse[(static_cast<size_t>(b) * p.Hq + h) * p.T + t] = lse2 * kLn2;  // -inf stays -inf
  } else {
    p.part_lse[((static_cast<size_t>(split) * p.B + b) * p.Hkv + kvh) * p.M + r] = lse2;
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path (fp16 / bf16)
// ---------------------------------------------------------------------------------------------
constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kMmaTileN = 64;  // keys per shared-memory tile

template <int D, int STAGES>
constexpr size_t mma_smem_bytes() {
  // STAGES x (K + V) tiles of 64 x D halves, plus 64 Q rows when D > 128 (see kQInSmem); the
  // end-of-kernel warp merge reuses the K/V space for 4 warps x 16 rows x (D + 8) floats, which
  // always fits (checked in the kernel).
  return static_cast<size_t>(STAGES) * 2 * kMmaTileN * D * 2 +
         (D > 128 ? static_cast<size_t>(16 * kMmaWarps) * D * 2 : 0);
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // src-size 0: zero-fill (keys outside the chunk)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3,
                                            const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2,
                                                  unsigned& r3, const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(s));
}

// c += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float* c, const unsigned* a, unsigned b0,
                                                  unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* c, const unsigned* a, unsigned b0,
                                                         unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename scalar_t>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// Element offset (in halves) of 16-byte chunk `chunk` of key row `row` in a [64][D] tile.
// XOR swizzle: the 8 rows an ldmatrix phase reads land in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Grid: (row_tiles * num_splits, Hkv, B); block: 128 threads (4 warps); WM warps along rows.
template <typename scalar_t, int D, int STAGES>
__global__ void __launch_bounds__(kMmaThreads)
    attention_mma_kernel(const Params p, const int WM) {
  static_assert(D % 64 == 0 && D <= 256, "head dim");
  static_assert(kMmaWarps * 16 * (D + 8) * 4 <= STAGES * 2 * kMmaTileN * D * 2,
                "warp-merge buffer must fit in the K/V tile space");
  constexpr int CHUNKS = D / 8;  // 16-byte chunks per key row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* smem = reinterpret_cast<scalar_t*>(smem_raw);
  __shared__ float sm_m[kMmaWarps][16];
  __shared__ float sm_l[kMmaWarps][16];

  const int WN = kMmaWarps / WM;
  const int b = blockIdx.z, kvh = blockIdx.y;
  const int row_tile = blockIdx.x % p.row_tiles, split = blockIdx.x / p.row_tiles;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int rg = warp % WM, kg = warp / WM;
  const int g = lane >> 2, c = lane & 3;  // mma fragment coordinates

  const int L = cache_len(p, b);
  const int n_keys = L + p.T;
  int start, end;
  split_range(n_keys, split, p.num_splits, kMmaTileN, start, end);
  const int n_tiles = end > start ? (end - start + kMmaTileN - 1) / kMmaTileN : 0;

  // This warp's 16 rows: r0 = row of fragment row g, r0 + 8 of fragment row g + 8.
  const int row_base = row_tile * 16 * WM + rg * 16;
  const int r_lo = row_base + g, r_hi = row_base + g + 8;
  const int t_lo = min(r_lo / p.G, p.T - 1), t_hi = min(r_hi / p.G, p.T - 1);  // clamp padding
  const bool* mask_lo = p.tree_mask ? p.tree_mask + (static_cast<size_t>(b) * p.T + t_lo) * p.T
                                    : nullptr;
  const bool* mask_hi = p.tree_mask ? p.tree_mask + (static_cast<size_t>(b) * p.T + t_hi) * p.T
                                    : nullptr;

  // Q as the A operand (row-major 16 x D), zero for padding rows. D <= 128: fragments held in
  // registers, read once from global memory. D = 256: registers would spill (acc alone is 128
  // floats), so the block's Q rows go to shared memory and fragments are re-read by ldmatrix.
  constexpr bool kQInSmem = D > 128;
  unsigned qf[kQInSmem ? 1 : D / 16][4];
  scalar_t* qs = smem + static_cast<size_t>(STAGES) * 2 * kMmaTileN * D;  // [16 * WM][D]
  {
    const scalar_t* q = static_cast<const scalar_t*>(p.query);
    if constexpr (kQInSmem) {
      for (int i = tid; i < 16 * WM * CHUNKS; i += kMmaThreads) {
        const int rl = i / CHUNKS, ch = i % CHUNKS, r = row_tile * 16 * WM + rl;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < p.M) {
          v = *reinterpret_cast<const uint4*>(
              q + ((static_cast<size_t>(b) * p.T + r / p.G) * p.Hq + kvh * p.G + r % p.G) * D +
              ch * 8);
        }
        *reinterpret_cast<uint4*>(qs + swz<D>(rl, ch)) = v;  // visible after the loop's barrier
      }
    } else {
      const scalar_t* q_lo =
          r_lo < p.M ? q + ((static_cast<size_t>(b) * p.T + r_lo / p.G) * p.Hq + kvh * p.G +
                            r_lo % p.G) * D
                     : nullptr;
      const scalar_t* q_hi =
          r_hi < p.M ? q + ((static_cast<size_t>(b) * p.T + r_hi / p.G) * p.Hq + kvh * p.G +
                            r_hi % p.G) * D
                     : nullptr;
#pragma unroll
      for (int kk = 0; kk < (kQInSmem ? 0 : D / 16); ++kk) {
        const int d = kk * 16 + 2 * c;
        qf[kk][0] = q_lo ? *reinterpret_cast<const unsigned*>(q_lo + d) : 0u;
        qf[kk][1] = q_hi ? *reinterpret_cast<const unsigned*>(q_hi + d) : 0u;
        qf[kk][2] = q_lo ? *reinterpret_cast<const unsigned*>(q_lo + d + 8) : 0u;
        qf[kk][3] = q_hi ? *reinterpret_cast<const unsigned*>(q_hi + d + 8) : 0u;
      }
    }
  }

  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;  // l: this thread's share

  const size_t head_off = (static_cast<size_t>(b) * p.Hkv + kvh) * p.S_max;
  const scalar_t* kbase = static_cast<const scalar_t*>(p.key_cache) + head_off * D;
  const scalar_t* vbase = static_cast<const scalar_t*>(p.value_cache) + head_off * D;

  auto load_tile = [&](int tile, int stage) {
    scalar_t* ks = smem + static_cast<size_t>(stage) * 2 * kMmaTileN * D;
    scalar_t* vs = ks + kMmaTileN * D;
    const int t0 = start + tile * kMmaTileN;
#pragma unroll
    for (int i = tid; i < kMmaTileN * CHUNKS; i += kMmaThreads) {
      const int row = i / CHUNKS, ch = i % CHUNKS;
      const int pos = t0 + row;
      const bool valid = pos < end;
      const size_t src = static_cast<size_t>(valid ? pos : 0) * D + ch * 8;
      cp_async_16(ks + swz<D>(row, ch), kbase + src, valid);
      cp_async_16(vs + swz<D>(row, ch), vbase + src, valid);
    }
  };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_tiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int tile = 0; tile < n_tiles; ++tile) {
    {
      const int next = tile + STAGES - 1;
      if (next < n_tiles) load_tile(next, next % STAGES);  // stage freed by the last barrier
      cp_async_commit();
    }
    cp_async_wait<STAGES - 1>();  // this thread's copies of `tile` have landed
    __syncthreads();              // ... and everyone else's

    const scalar_t* ks = smem + static_cast<size_t>(tile % STAGES) * 2 * kMmaTileN * D;
    const scalar_t* vs = ks + kMmaTileN * D;
    const int t0 = start + tile * kMmaTileN;
    const bool needs_mask = t0 + kMmaTileN > L;  // touches new tokens or the chunk end

    for (int ks16 = kg; ks16 < kMmaTileN / 16; ks16 += WN) {
      const int key0 = ks16 * 16;  // first key of this warp's 16-key slice (within the tile)
      // S = Q K^T for 16 rows x 16 keys: two n8 tiles.
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        // matrices: (keys 0-7, d lo), (keys 0-7, d hi), (keys 8-15, d lo), (keys 8-15, d hi)
        const int krow = key0 + (lane & 7) + ((lane >> 4) << 3);
        const int kch = kk * 2 + ((lane >> 3) & 1);
        unsigned b0, b1, b2, b3;
        ldmatrix_x4(b0, b1, b2, b3, ks + swz<D>(krow, kch));
        const unsigned* a = qf[kQInSmem ? 0 : kk];
        if constexpr (kQInSmem) {
          // matrices: (rows 0-7, d lo), (rows 8-15, d lo), (rows 0-7, d hi), (rows 8-15, d hi)
          const int qrow = rg * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
          ldmatrix_x4(qf[0][0], qf[0][1], qf[0][2], qf[0][3],
                      qs + swz<D>(qrow, kk * 2 + (lane >> 4)));
        }
        mma_16816<scalar_t>(s[0], a, b0, b1);
        mma_16816<scalar_t>(s[1], a, b2, b3);
      }
      // Scale, mask, online softmax (rows g and g + 8; a row's 4 threads form a quad).
      float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v_lo = s[nt][e] * p.scale_log2, v_hi = s[nt][2 + e] * p.scale_log2;
          if (needs_mask) {
            const int pos = t0 + key0 + nt * 8 + 2 * c + e;
            if (!key_visible(pos, t_lo, L, end, p.T, mask_lo)) v_lo = -INFINITY;
            if (!key_visible(pos, t_hi, L, end, p.T, mask_hi)) v_hi = -INFINITY;
          }
          s[nt][e] = v_lo;
          s[nt][2 + e] = v_hi;
          mx_lo = fmaxf(mx_lo, v_lo);
          mx_hi = fmaxf(mx_hi, v_hi);
        }
      }
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, o));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, o));
      }
      const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
      // -inf guards: a row that has seen nothing yet keeps m = -inf and must not make NaNs.
      const float mu_lo = mn_lo == -INFINITY ? 0.f : mn_lo;
      const float mu_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
      const float al_lo = exp2f(m_lo - mu_lo), al_hi = exp2f(m_hi - mu_hi);
      m_lo = mn_lo;
      m_hi = mn_hi;
      unsigned pa[4];
      {
        const float p00 = exp2f(s[0][0] - mu_lo), p01 = exp2f(s[0][1] - mu_lo);
        const float p02 = exp2f(s[0][2] - mu_hi), p03 = exp2f(s[0][3] - mu_hi);
        const float p10 = exp2f(s[1][0] - mu_lo), p11 = exp2f(s[1][1] - mu_lo);
        const float p12 = exp2f(s[1][2] - mu_hi), p13 = exp2f(s[1][3] - mu_hi);
        l_lo = l_lo * al_lo + (p00 + p01 + p10 + p11);
        l_hi = l_hi * al_hi + (p02 + p03 + p12 + p13);
        // C fragments of the two n8 tiles = the A fragment of P for the k16 step of P V.
        pa[0] = pack2<scalar_t>(p00, p01);
        pa[1] = pack2<scalar_t>(p02, p03);
        pa[2] = pack2<scalar_t>(p10, p11);
        pa[3] = pack2<scalar_t>(p12, p13);
      }
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[j][0] *= al_lo;
        acc[j][1] *= al_lo;
        acc[j][2] *= al_hi;
        acc[j][3] *= al_hi;
      }
      // O += P V: V tile is [key][d] = k x n row-major, so B fragments come from ldmatrix.trans.
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        // matrices: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15)
        const int vrow = key0 + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int vch = dn * 2 + (lane >> 4);
        unsigned b0, b1, b2, b3;
        ldmatrix_x4_trans(b0, b1, b2, b3, vs + swz<D>(vrow, vch));
        mma_16816<scalar_t>(acc[2 * dn], pa, b0, b1);
        mma_16816<scalar_t>(acc[2 * dn + 1], pa, b2, b3);
      }
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // only empty groups can be pending here; keep the invariant explicit
  __syncthreads();

  // ---- merge the WN key-group warps of each row group through shared memory -----------------
#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, o);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, o);
  }
  constexpr int OS = D + 8;  // padded row stride (floats) of the merge buffer
  float* sm_o = reinterpret_cast<float*>(smem_raw) + warp * 16 * OS;
  if (c == 0) {
    sm_m[warp][g] = m_lo;
    sm_m[warp][g + 8] = m_hi;
    sm_l[warp][g] = l_lo;
    sm_l[warp][g + 8] = l_hi;
  }
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    *reinterpret_cast<float2*>(sm_o + g * OS + j * 8 + 2 * c) = make_float2(acc[j][0], acc[j][1]);
    *reinterpret_cast<float2*>(sm_o + (g + 8) * OS + j * 8 + 2 * c) =
        make_float2(acc[j][2], acc[j][3]);
  }
  __syncthreads();

  const int rows_block = 16 * WM;
  for (int i = tid; i < rows_block * (D / 4); i += kMmaThreads) {
    const int rl = i / (D / 4), d0 = (i % (D / 4)) * 4;
    const int r = row_tile * rows_block + rl;
    if (r >= p.M) continue;
    const int rgi = rl / 16, rr = rl % 16;
    float m = -INFINITY;
    bool nan_l = false;  // a NaN score in a warp that saw no other (its m stayed -inf)
    for (int k = 0; k < WN; ++k) {
      m = fmaxf(m, sm_m[k * WM + rgi][rr]);
      nan_l = nan_l || isnan(sm_l[k * WM + rgi][rr]);
    }
    float vals[4] = {0.f, 0.f, 0.f, 0.f};
    float lse2 = -INFINITY;
    if (m != -INFINITY || nan_l) {  // m = -inf here: weights NaN, so vals and lse2 end NaN
      float l = 0.f;
      for (int k = 0; k < WN; ++k) {
        const int w = k * WM + rgi;
        const float wt = exp2f(sm_m[w][rr] - m);  // 0 for a warp that saw nothing
        l += sm_l[w][rr] * wt;
        const float4 o = *reinterpret_cast<const float4*>(
            reinterpret_cast<const float*>(smem_raw) + (w * 16 + rr) * OS + d0);
        vals[0] += o.x * wt;
        vals[1] += o.y * wt;
        vals[2] += o.z * wt;
        vals[3] += o.w * wt;
      }
      const float inv = 1.f / l;
#pragma unroll
      for (int e = 0; e < 4; ++e) vals[e] *= inv;
      lse2 = m + log2f(l);
    }
    store_row_values<scalar_t>(p, b, kvh, r, split, d0, vals, 4);
    if (d0 == 0) store_row_lse(p, b, kvh, r, split, lse2);
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA-core path (fp32 and head dims the tensor-core path does not cover)
// ---------------------------------------------------------------------------------------------
constexpr int kFmaWarps = 4;
constexpr int kFmaThreads = 32 * kFmaWarps;
constexpr int kFmaRowsPerWarp = 4;
constexpr int kFmaRows = kFmaWarps * kFmaRowsPerWarp;  // rows per block
constexpr int kFmaTileN = 32;                           // keys per tile (= lanes)
constexpr int kFmaMaxD = 256;

inline size_t fma_smem_bytes(int D) {
  // K and V tiles [32][D + 1] (padded: lane j reads row j) + Q rows [16][D], all fp32.
  return (2 * kFmaTileN * (D + 1) + kFmaRows * D) * sizeof(float);
}

// Grid: (row_tiles * num_splits, Hkv, B) with 16 rows per row tile; block: 128 threads.
template <typename scalar_t>
__global__ void __launch_bounds__(kFmaThreads) attention_fma_kernel(const Params p) {
  extern __shared__ float fsm[];
  const int D = p.D, DS = D + 1;
  float* ks = fsm;
  float* vs = ks + kFmaTileN * DS;
  float* qs = vs + kFmaTileN * DS;

  const int b = blockIdx.z, kvh = blockIdx.y;
  const int row_tile = blockIdx.x % p.row_tiles, split = blockIdx.x / p.row_tiles;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int L = cache_len(p, b);
  int start, end;
  split_range(L + p.T, split, p.num_splits, kFmaTileN, start, end);

  const scalar_t* q = static_cast<const scalar_t*>(p.query);
  for (int i = tid; i < kFmaRows * D; i += kFmaThreads) {
    const int rl = i / D, d = i % D, r = row_tile * kFmaRows + rl;
    float v = 0.f;
    if (r < p.M) {
      v = to_float(q[((static_cast<size_t>(b) * p.T + r / p.G) * p.Hq + kvh * p.G + r % p.G) * D +
                     d]);
    }
    qs[i] = v;
  }

  float m[kFmaRowsPerWarp], l[kFmaRowsPerWarp], acc[kFmaRowsPerWarp][kFmaMaxD / 32];
#pragma unroll
  for (int rr = 0; rr < kFmaRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int i = 0; i < kFmaMaxD / 32; ++i) acc[rr][i] = 0.f;
  }

  const size_t head_off = (static_cast<size_t>(b) * p.Hkv + kvh) * p.S_max;
  const scalar_t* kbase = static_cast<const scalar_t*>(p.key_cache) + head_off * D;
  const scalar_t* vbase = static_cast<const scalar_t*>(p.value_cache) + head_off * D;

  for (int t0 = start; t0 < end; t0 += kFmaTileN) {
    __syncthreads();  // previous tile fully consumed (and qs written, on the first pass)
    for (int i = tid; i < kFmaTileN * D; i += kFmaThreads) {
      const int j = i / D, d = i % D, pos = t0 + j;
      const bool valid = pos < end;  // zero outside the chunk: no garbage (NaN) times 0
      const size_t src = static_cast<size_t>(valid ? pos : 0) * D + d;
      ks[j * DS + d] = valid ? to_float(kbase[src]) : 0.f;
      vs[j * DS + d] = valid ? to_float(vbase[src]) : 0.f;
    }
    __syncthreads();

#pragma unroll
    for (int rr = 0; rr < kFmaRowsPerWarp; ++rr) {
      const int rl = warp * kFmaRowsPerWarp + rr, r = row_tile * kFmaRows + rl;
      if (r >= p.M) continue;  // warp-uniform
      const int t = r / p.G;
      const float* qr = qs + rl * D;
      const float* kr = ks + lane * DS;
      float sdot = 0.f;
      for (int d = 0; d < D; ++d) sdot += qr[d] * kr[d];
      const bool* mrow = p.tree_mask ? p.tree_mask + (static_cast<size_t>(b) * p.T + t) * p.T
                                     : nullptr;
      const float sv = key_visible(t0 + lane, t, L, end, p.T, mrow) ? sdot * p.scale_log2
                                                                    : -INFINITY;
      const float mn = fmaxf(m[rr], warp_max(sv));
      const float mu = mn == -INFINITY ? 0.f : mn;
      const float alpha = exp2f(m[rr] - mu);
      const float pj = exp2f(sv - mu);
      l[rr] = l[rr] * alpha + warp_sum(pj);
      m[rr] = mn;
#pragma unroll
      for (int i = 0; i < kFmaMaxD / 32; ++i) acc[rr][i] *= alpha;
      for (int j = 0; j < kFmaTileN; ++j) {
        const float pb = __shfl_sync(0xffffffffu, pj, j);
        const float* vr = vs + j * DS;
#pragma unroll
        for (int i = 0; i < kFmaMaxD / 32; ++i) {
          const int d = lane + 32 * i;
          if (d < D) acc[rr][i] += pb * vr[d];
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kFmaRowsPerWarp; ++rr) {
    const int r = row_tile * kFmaRows + warp * kFmaRowsPerWarp + rr;
    if (r >= p.M) continue;
    const bool seen = m[rr] != -INFINITY || isnan(l[rr]);  // l NaN: a NaN score (see the top)
    const float inv = seen ? 1.f / l[rr] : 0.f;
#pragma unroll
    for (int i = 0; i < kFmaMaxD / 32; ++i) {
      const int d = lane + 32 * i;
      if (d < D) {
        const float v = seen ? acc[rr][i] * inv : 0.f;  // not acc * 0: acc may hold 0 * inf
        store_row_values<scalar_t>(p, b, kvh, r, split, d, &v, 1);
      }
    }
    if (lane == 0) store_row_lse(p, b, kvh, r, split, seen ? m[rr] + log2f(l[rr]) : -INFINITY);
  }
}

// ---------------------------------------------------------------------------------------------
// Split merge: one warp per (b, kv head, row). The lanes turn the splits' log2-sum-exps into
// weights (kept in shared memory); then, when D % 4 == 0, groups of 32 / NG lanes own 4
// consecutive columns each (float4) and the NG groups (1, 2, 4 or 8: as many as the columns leave
// lanes for) take interleaved splits, loads unrolled so their latencies overlap (the first
// version looped over splits serially: ~40 us for 33 splits at B = 1); a shuffle sums the groups.
// ---------------------------------------------------------------------------------------------
constexpr int kMergeWarps = 4;
constexpr int kMaxSplits = 256;  // the launcher never picks more

template <typename scalar_t>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_splits_kernel(const Params p) {
  __shared__ float sw[kMergeWarps][kMaxSplits];
  const int wid = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long row = static_cast<long long>(blockIdx.x) * kMergeWarps + wid;
  const long long rows = static_cast<long long>(p.B) * p.Hkv * p.M;
  if (row >= rows) return;  // warp-uniform; only warp-level sync below
  const int r = static_cast<int>(row % p.M);
  const int kvh = static_cast<int>((row / p.M) % p.Hkv);
  const int b = static_cast<int>(row / (static_cast<long long>(p.M) * p.Hkv));
  const size_t split_stride = static_cast<size_t>(p.B) * p.Hkv * p.M;  // rows per split
  const int S = p.num_splits;
  float* w_s = sw[wid];

  float mx = -INFINITY;
  bool nan = false;  // a split saw a NaN or +inf score: the row is NaN
  for (int s = lane; s < S; s += 32) {
    const float v = p.part_lse[s * split_stride + row];
    nan = nan || isnan(v);
    mx = fmaxf(mx, v);
  }
  mx = warp_max(mx);
  const int t = r / p.G, h = kvh * p.G + r % p.G;
  scalar_t* o = static_cast<scalar_t*>(p.out) +
                ((static_cast<size_t>(b) * p.T + t) * p.Hq + h) * static_cast<size_t>(p.D);
  if (__any_sync(0xffffffffu, nan)) {
    for (int d = lane; d < p.D; d += 32) o[d] = from_float<scalar_t>(NAN);
    if (lane == 0) p.lse[(static_cast<size_t>(b) * p.Hq + h) * p.T + t] = NAN;
    return;
  }
  if (mx == -INFINITY) {  // the row sees no key at all
    for (int d = lane; d < p.D; d += 32) o[d] = from_float<scalar_t>(0.f);
    if (lane == 0) p.lse[(static_cast<size_t>(b) * p.Hq + h) * p.T + t] = -INFINITY;
    return;
  }
  float wsum = 0.f;
  for (int s = lane; s < S; s += 32) {
    const float w = exp2f(p.part_lse[s * split_stride + row] - mx);  // 0 for an empty split
    w_s[s] = w;
    wsum += w;
  }
  wsum = warp_sum(wsum);
  __syncwarp();
  const float inv = 1.f / wsum;
  const float* po = p.part_o + row * static_cast<size_t>(p.D);  // split s: + s * split_stride * D
  const size_t s_step = split_stride * static_cast<size_t>(p.D);

  if (p.D % 4 == 0) {
    const int chunks = p.D / 4;
    const int NG = chunks <= 4 ? 8 : (chunks <= 8 ? 4 : (chunks <= 16 ? 2 : 1));
    const int LPG = 32 / NG;  // lanes per group
    const int grp = lane / LPG, li = lane % LPG;
    for (int c0 = 0; c0 < chunks; c0 += LPG) {  // uniform trip count across the warp
      const int ch = c0 + li;
      const bool active = ch < chunks;
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
      for (int s = grp; s < S; s += NG) {
        const float w = w_s[s];
        if (active && w != 0.f) {
          const float4 v = *reinterpret_cast<const float4*>(po + s * s_step + 4 * ch);
          acc.x += w * v.x;
          acc.y += w * v.y;
          acc.z += w * v.z;
          acc.w += w * v.w;
        }
      }
      for (int off = LPG; off < 32; off <<= 1) {
        acc.x += __shfl_xor_sync(0xffffffffu, acc.x, off);
        acc.y += __shfl_xor_sync(0xffffffffu, acc.y, off);
        acc.z += __shfl_xor_sync(0xffffffffu, acc.z, off);
        acc.w += __shfl_xor_sync(0xffffffffu, acc.w, off);
      }
      if (grp == 0 && active) {
        o[4 * ch + 0] = from_float<scalar_t>(acc.x * inv);
        o[4 * ch + 1] = from_float<scalar_t>(acc.y * inv);
        o[4 * ch + 2] = from_float<scalar_t>(acc.z * inv);
        o[4 * ch + 3] = from_float<scalar_t>(acc.w * inv);
      }
    }
  } else {  // odd head dims (CUDA-core path only): lanes own columns
    for (int d = lane; d < p.D; d += 32) {
      float a = 0.f;
#pragma unroll 4
      for (int s = 0; s < S; ++s) {
        const float w = w_s[s];
        if (w != 0.f) a += w * po[s * s_step + d];
      }
      o[d] = from_float<scalar_t>(a * inv);
    }
  }
  if (lane == 0) p.lse[(static_cast<size_t>(b) * p.Hq + h) * p.T + t] = (mx + log2f(wsum)) * kLn2;
}

}  // namespace tree_attention_kernels
}  // namespace ptp
