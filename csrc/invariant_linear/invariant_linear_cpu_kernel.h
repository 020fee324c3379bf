// The inner kernel of invariant_linear_cpu, included twice (baseline ISA and AVX2 + FMA + F16C,
// see invariant_linear_cpu.cpp); it includes nothing but common/cpu_simd.inc.
//
// y[m, n] = hsum(acc) + tail (+ bias[n]), acc an 8-lane float32 accumulator over the full
// 8-float chunks of k in order, tail the scalar sum of the last K % 8 products in order, hsum a
// fixed left-to-right lane sum. That sequence depends on (m, n) only: the register tiles (4
// weight rows x 3, 2 or 1 x rows) share loads, never partial sums.

#include "../common/cpu_simd.inc"

static inline float sfma(float a, float b, float c) {
#ifdef PTP_CPU_AVX2
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// NR x rows (stride K) against NW weight rows (stride K): out[r * ldo + w]. `pf` (or null): the
// next tile's NW weight rows, prefetched a cache line per row every 16 floats of k, so the
// weight stream keeps flowing while this tile computes (prefetches never change the sums).
template <int NR, int NW>
static inline void tile(const float* x, const float* w, int64_t K, float* out, int64_t ldo,
                        const float* pf = nullptr) {
  vf acc[NR][NW];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) acc[r][j] = vf{};
  const int64_t K8 = K / kW * kW;
  for (int64_t k = 0; k < K8; k += kW) {
#ifdef PTP_CPU_AVX2
    if (pf && (k & 15) == 0)
      for (int j = 0; j < NW; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(pf + j * K + k), _MM_HINT_T0);
#endif
    vf xv[NR];
    for (int r = 0; r < NR; ++r) xv[r] = vload(x + r * K + k);
    for (int j = 0; j < NW; ++j) {
      const vf wv = vload(w + j * K + k);
      for (int r = 0; r < NR; ++r) acc[r][j] = vfma(xv[r], wv, acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NW; ++j) {
      float t = 0.f;
      for (int64_t k = K8; k < K; ++k) t = sfma(x[r * K + k], w[j * K + k], t);
      out[r * ldo + j] = vhsum(acc[r][j]) + t;
    }
}

// Weight rows [n0, n1) (float32, already converted) against all N x rows; y is [N, ldy].
static inline void rows_block(const float* x, int64_t N, int64_t K, const float* w, int64_t n0,
                              int64_t n1, float* y, int64_t ldy) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const float* wn = w + (n - n0) * K;
    // the next 4 rows, with the first x tile; one row streams well without (measured: slower)
    const float* pf = N >= 2 && n + 8 <= n1 ? wn + 4 * K : nullptr;
    int64_t m = 0;
    // 3-row tiles (12 accumulators, 7 loads per 12 FMAs) pay off from ~9 rows; the tiling never
    // changes a row's arithmetic, so the choice may depend on N.
    if (N >= 9)
      for (; m + 3 <= N; m += 3, pf = nullptr) tile<3, 4>(x + m * K, wn, K, y + m * ldy + n, ldy, pf);
    for (; m + 2 <= N; m += 2, pf = nullptr) tile<2, 4>(x + m * K, wn, K, y + m * ldy + n, ldy, pf);
    if (m < N) tile<1, 4>(x + m * K, wn, K, y + m * ldy + n, ldy, pf);
  }
  for (; n < n1; ++n) {
    const float* wn = w + (n - n0) * K;
    int64_t m = 0;
    for (; m + 2 <= N; m += 2) tile<2, 1>(x + m * K, wn, K, y + m * ldy + n, ldy);
    if (m < N) tile<1, 1>(x + m * K, wn, K, y + m * ldy + n, ldy);
  }
}
