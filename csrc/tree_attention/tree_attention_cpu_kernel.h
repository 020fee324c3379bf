// The inner kernel of tree_attention_cpu: one work unit = (batch row b, KV head h, a range of key
// positions), all G query heads of h and all T new tokens (R = G * T query rows) sharing every
// K/V tile read (GQA). Online softmax in base 2, float32 throughout.
//
// This file is included twice by tree_attention_cpu.cpp, inside two namespaces: once compiled for
// the baseline ISA and once under `#pragma GCC target("avx2,fma,f16c")` with PTP_CPU_AVX2 defined;
// the driver picks one at run time. It includes nothing but common/cpu_simd.inc.
//
// Per block of BK keys: K is converted to float and transposed to Kt [D][BK] (so the scores of a
// query row are an outer-product accumulation along contiguous keys, no horizontal sums) and V to
// Vt [BK][Dp]; then for each pair of query rows (one row for an odd last): scores (8 vector
// accumulators), mask, online softmax update, and P @ V accumulated in 32-float chunks of the head dim held in registers.

#include "../common/cpu_simd.inc"

typedef int32_t vi __attribute__((vector_size(32)));
constexpr int kBK = 32;  // keys per block

// Broadcast of *p (a single load on AVX2).
static inline vf vbcast(const float* p) {
#ifdef PTP_CPU_AVX2
  return _mm256_broadcast_ss(p);
#else
  return vset1(*p);
#endif
}
// Keeps a loaded vector in a register: without it GCC folds the load into every FMA that uses
// it, and the micro-kernels become load-bound (two loads per FMA instead of one per two).
#ifdef PTP_CPU_AVX2
#define PTP_IN_REG(x) asm("" : "+x"(x))
#else
#define PTP_IN_REG(x) (void)0
#endif
static inline float vhmax(vf v) {
  float r = v[0];
  for (int i = 1; i < kW; ++i) r = v[i] > r ? v[i] : r;
  return r;
}

// 2^x for x <= 0 (x = -inf allowed): exactly 0 below -126; relative error ~1e-7 (degree-6
// Taylor polynomial on [-0.5, 0.5] after rounding x to the nearest integer n).
static inline vf vexp2(vf x) {
  const vf lo = vset1(-126.f);
  vf xc = x < lo ? lo : x;
  const vf magic = vset1(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = xc + magic;
  vf f = xc - (t - magic);
  vf p = vset1(1.5403530e-4f);
  p = vfma(p, f, vset1(1.3333558e-3f));
  p = vfma(p, f, vset1(9.6181291e-3f));
  p = vfma(p, f, vset1(5.5504109e-2f));
  p = vfma(p, f, vset1(2.4022651e-1f));
  p = vfma(p, f, vset1(6.9314718e-1f));
  p = vfma(p, f, vset1(1.0f));
  vi n = (vi)t - 0x4B400000;
  vf scale = (vf)((n + 127) << 23);
  vf r = p * scale;
  return x < lo ? vf{} : r;
}

// n elements of src -> float dst.
template <typename scalar_t>
static inline void to_float(const scalar_t* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int i = 0; i < n; ++i) {
    uint32_t b = static_cast<uint32_t>(s[i]) << 16;
    __builtin_memcpy(dst + i, &b, 4);
  }
}
#ifdef PTP_CPU_AVX2
template <>
inline void to_float<c10::Half>(const c10::Half* src, float* dst, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
#endif


static inline int64_t work_floats(int R, int D, int Dp) {
  return static_cast<int64_t>(R) * D + 2 * static_cast<int64_t>(D) * kBK + kBK * Dp + 2 * kBK;
}

// Kt[d][j] = krows[j][d] for j < kBK, d < D (8 x 8 register transposes on AVX2).
static inline void transpose_keys(const float* krows, int D, float* Kt) {
  int d0 = 0;
#ifdef PTP_CPU_AVX2
  for (; d0 + 8 <= D; d0 += 8) {
    for (int j0 = 0; j0 < kBK; j0 += 8) {
      const float* src = krows + static_cast<int64_t>(j0) * D + d0;
      __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + D),
             r2 = _mm256_loadu_ps(src + 2 * D), r3 = _mm256_loadu_ps(src + 3 * D),
             r4 = _mm256_loadu_ps(src + 4 * D), r5 = _mm256_loadu_ps(src + 5 * D),
             r6 = _mm256_loadu_ps(src + 6 * D), r7 = _mm256_loadu_ps(src + 7 * D);
      __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1),
             t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
             t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
             t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
             u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
             u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
             u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* dst = Kt + static_cast<int64_t>(d0) * kBK + j0;
      _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(dst + kBK, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(dst + 2 * kBK, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(dst + 3 * kBK, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(dst + 4 * kBK, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(dst + 5 * kBK, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(dst + 6 * kBK, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(dst + 7 * kBK, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
#endif
  for (; d0 < D; ++d0)
    for (int j = 0; j < kBK; ++j) Kt[static_cast<int64_t>(d0) * kBK + j] = krows[static_cast<int64_t>(j) * D + d0];
}

// acc_r = acc_r * alpha_r + sum_j p_r[j] * Vt[j] for NR (1 or 2) rows, over the head dim in
// 32-float chunks (4 vectors per row held in registers), then an 8-float tail.
template <int NR>
static inline void pv_rows(float* acc, int64_t acc_stride, const float* alpha, const float* p,
                           const float* Vt, int n, int Dp) {
  vf al[NR];
  for (int r = 0; r < NR; ++r) al[r] = vset1(alpha[r]);
  int dc = 0;
  for (; dc + 4 * kW <= Dp; dc += 4 * kW) {
    vf x[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < 4; ++i) x[r][i] = vload(acc + r * acc_stride + dc + i * kW) * al[r];
    for (int j = 0; j < n; ++j) {
      vf b[NR];
      for (int r = 0; r < NR; ++r) b[r] = vbcast(p + r * kBK + j);
      const float* vr = Vt + j * Dp + dc;
      for (int i = 0; i < 4; ++i) {
        vf vv = vload(vr + i * kW);
        PTP_IN_REG(vv);
        for (int r = 0; r < NR; ++r) x[r][i] = vfma(b[r], vv, x[r][i]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < 4; ++i) vstore(acc + r * acc_stride + dc + i * kW, x[r][i]);
  }
  for (; dc < Dp; dc += kW) {
    vf x[NR];
    for (int r = 0; r < NR; ++r) x[r] = vload(acc + r * acc_stride + dc) * al[r];
    for (int j = 0; j < n; ++j) {
      vf vv = vload(Vt + j * Dp + dc);
      PTP_IN_REG(vv);
      for (int r = 0; r < NR; ++r) x[r] = vfma(vbcast(p + r * kBK + j), vv, x[r]);
    }
    for (int r = 0; r < NR; ++r) vstore(acc + r * acc_stride + dc, x[r]);
  }
}

// Raw scores of NR query rows (Qf rows, stride D) against the kBK keys of Kt into p[NR][kBK].
template <int NR>
static inline void qk_rows(const float* q, int D, const float* Kt, float* p) {
  vf s[NR][kBK / kW];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < kBK / kW; ++i) s[r][i] = vf{};
  for (int d = 0; d < D; ++d) {
    vf b[NR];
    for (int r = 0; r < NR; ++r) b[r] = vbcast(q + r * D + d);
    const float* kt = Kt + d * kBK;
    for (int i = 0; i < kBK / kW; ++i) {
      vf kk = vload(kt + i * kW);
      PTP_IN_REG(kk);
      for (int r = 0; r < NR; ++r) s[r][i] = vfma(b[r], kk, s[r][i]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < kBK / kW; ++i) vstore(p + r * kBK + i * kW, s[r][i]);
}

// Turns the raw scores s[kBK] of one row into probabilities in place and updates (m, l);
// returns alpha (the factor for the old accumulator), or 1 when the row sees nothing so far
// (p all zero, accumulator untouched).
// Non-finite scores (tree_attention.h): a NaN or +inf score makes p and l NaN from here on (the
// max ignores NaN, so a NaN score among -inf ones sets m = NaN explicitly: m stays NaN, which
// the split merge propagates); a -inf score is weight 0 like a masked one.
static inline float softmax_update(float* s, float& m, float& l) {
  vf v[kBK / kW];
  vf mx = vset1(-INFINITY);
  for (int i = 0; i < kBK / kW; ++i) {
    v[i] = vload(s + i * kW);
    mx = v[i] > mx ? v[i] : mx;
  }
  float m_new = std::max(m, vhmax(mx));
  if (m_new == -INFINITY) {
    bool nan = false;
    for (int i = 0; i < kBK; ++i) nan = nan || std::isnan(s[i]);
    if (!nan) {
      for (int i = 0; i < kBK / kW; ++i) vstore(s + i * kW, vf{});
      return 1.f;
    }
    m_new = NAN;
  }
  const float alpha = std::exp2(m - m_new);  // 0 when m = -inf
  const vf mb = vset1(m_new);
  vf sum = vf{};
  for (int i = 0; i < kBK / kW; ++i) {
    const vf p = vexp2(v[i] - mb);
    sum += p;
    vstore(s + i * kW, p);
  }
  l = l * alpha + vhsum(sum);
  m = m_new;
  return alpha;
}

// One block of keys for NR query rows starting at r: scores, masks, online softmax, P @ V.
template <int NR>
static inline void rows_step(const UnitArgs& a, int r, const float* Qf, const float* Kt, float* P,
                             const float* vrows, int64_t kb, int n, bool in_new) {
  qk_rows<NR>(Qf + static_cast<int64_t>(r) * a.D, a.D, Kt, P);
  float alpha[NR];
  for (int rr = 0; rr < NR; ++rr) {
    float* p = P + rr * kBK;
    for (int j = n; j < kBK; ++j) p[j] = -INFINITY;
    if (in_new) {
      const int t = (r + rr) / a.G;
      for (int j = static_cast<int>(std::max<int64_t>(0, a.L - kb)); j < n; ++j) {
        const int64_t jj = kb + j - a.L;  // index of the new token
        const bool vis = a.mask ? a.mask[static_cast<int64_t>(t) * a.T + jj] : jj <= t;
        if (!vis) p[j] = -INFINITY;
      }
    }
    alpha[rr] = softmax_update(p, a.m[r + rr], a.l[r + rr]);
  }
  pv_rows<NR>(a.acc + static_cast<int64_t>(r) * a.Dp, a.Dp, alpha, P, vrows, n, a.Dp);
}

// A block of keys that reaches the new tokens, with a tree mask: new token row t reads its
// visible new tokens at consecutive positions L, L + 1, ... (vis order), so a tree node's keys
// fall in the blocks and lanes of plain decoding's (row invariance for trees; the same attention
// mathematically for any mask). Keys are gathered per new token; its G query rows share them.
// The slots after the visible ones hold the invisible new tokens' values (keys zeroed, scores
// -inf, weight 0): every value below L + T enters the sum, as in the causal path and the
// reference, so a NaN/inf value there gives 0 * inf = NaN (IEEE semantics, tree_attention.h).
template <typename scalar_t>
static inline void tree_block(const UnitArgs& a, const float* Qf, const scalar_t* k,
                              const scalar_t* v, float* Kf, float* Kt, float* Vt, float* P,
                              int64_t kb, int n) {
  const int D = a.D, Dp = a.Dp, G = a.G;
  bool valid[kBK];
  for (int t = 0; t < a.T; ++t) {
    const int32_t* idx = a.vis + static_cast<int64_t>(t) * a.T;
    const int64_t cnt = a.vis_cnt[t];
    for (int j = 0; j < kBK; ++j) {
      const int64_t vpos = kb + j;
      int64_t src = -1;
      if (j < n) src = vpos < a.L ? vpos : a.L + idx[vpos - a.L];  // vpos < kend <= L + T
      valid[j] = src >= 0 && (vpos < a.L || vpos - a.L < cnt);
      float* kd = Kf + static_cast<int64_t>(j) * D;
      float* vd = Vt + static_cast<int64_t>(j) * Dp;
      if (valid[j])
        to_float(k + src * D, kd, D);
      else
        std::fill(kd, kd + D, 0.f);
      if (src >= 0)
        to_float(v + src * D, vd, D);
      else
        std::fill(vd, vd + D, 0.f);
    }
    transpose_keys(Kf, D, Kt);
    for (int r = t * G; r < (t + 1) * G; r += 2) {
      const int nr = r + 2 <= (t + 1) * G ? 2 : 1;
      if (nr == 2)
        qk_rows<2>(Qf + static_cast<int64_t>(r) * D, D, Kt, P);
      else
        qk_rows<1>(Qf + static_cast<int64_t>(r) * D, D, Kt, P);
      float alpha[2];
      for (int rr = 0; rr < nr; ++rr) {
        float* p = P + rr * kBK;
        for (int j = 0; j < kBK; ++j)
          if (!valid[j]) p[j] = -INFINITY;
        alpha[rr] = softmax_update(p, a.m[r + rr], a.l[r + rr]);
      }
      float* acc = a.acc + static_cast<int64_t>(r) * Dp;
      if (nr == 2)
        pv_rows<2>(acc, Dp, alpha, P, Vt, n, Dp);
      else
        pv_rows<1>(acc, Dp, alpha, P, Vt, n, Dp);
    }
  }
}

template <typename scalar_t>
void attend_unit(const scalar_t* q, const scalar_t* k, const scalar_t* v, const UnitArgs& a) {
  const int T = a.T, G = a.G, D = a.D, Dp = a.Dp;
  const int R = T * G;
  float* Qf = a.work;                          // [R, D], pre-scaled by scale * log2(e)
  float* Kt = Qf + static_cast<int64_t>(R) * D;  // [D, kBK]
  float* Vt = Kt + static_cast<int64_t>(D) * kBK; // [kBK, Dp]
  float* Kf = Vt + kBK * Dp;                   // [kBK, D]
  float* P = Kf + static_cast<int64_t>(kBK) * D;  // [2, kBK]

  // Query rows r = t * G + g (query head h * G + g of token t).
  for (int r = 0; r < R; ++r) {
    const int t = r / G, g = r % G;
    to_float(q + t * a.q_stride_t + static_cast<int64_t>(g) * D, Qf + static_cast<int64_t>(r) * D, D);
    for (int d = 0; d < D; ++d) Qf[static_cast<int64_t>(r) * D + d] *= a.scale2;
  }
  std::fill(a.acc, a.acc + static_cast<int64_t>(R) * Dp, 0.f);
  std::fill(a.m, a.m + R, -INFINITY);
  std::fill(a.l, a.l + R, 0.f);
  std::fill(Vt, Vt + kBK * Dp, 0.f);  // padding columns D..Dp stay zero

  // fp32 caches with D % 8 == 0 are read in place (full blocks); anything else goes through Kf
  // (converted keys, zero-padded to kBK rows) and Vt (converted values, padded to Dp columns).
  constexpr bool kIsFloat = std::is_same<scalar_t, float>::value;
  const bool direct = kIsFloat && D == Dp;
  for (int64_t kb = a.kbeg; kb < a.kend; kb += kBK) {
    const int n = static_cast<int>(std::min<int64_t>(kBK, a.kend - kb));
#ifdef PTP_CPU_AVX2
    // Prefetch the keys and values kPrefetchBlocks ahead (hides DRAM latency when the rows per
    // block are few and a block's compute is short).
    constexpr int kPrefetchBlocks = 2;
    if (kb + kPrefetchBlocks * kBK < a.kend) {
      const int64_t kp = kb + kPrefetchBlocks * kBK;
      const int n2 = static_cast<int>(std::min<int64_t>(kBK, a.kend - kp));
      const char* k2 = reinterpret_cast<const char*>(k + kp * D);
      const char* v2 = reinterpret_cast<const char*>(v + kp * D);
      const int64_t bytes = static_cast<int64_t>(n2) * D * sizeof(scalar_t);
      for (int64_t off = 0; off < bytes; off += 64) {
        _mm_prefetch(k2 + off, _MM_HINT_T0);
        _mm_prefetch(v2 + off, _MM_HINT_T0);
      }
    }
#endif
    if (a.vis && kb + n > a.L) {  // tree mask: per-row gathered keys (row invariance)
      tree_block<scalar_t>(a, Qf, k, v, Kf, Kt, Vt, P, kb, n);
      continue;
    }
    const float* krows;  // [kBK, D]
    const float* vrows;  // [>= n, Dp]
    if (direct && n == kBK) {
      krows = reinterpret_cast<const float*>(k + kb * D);
    } else {
      for (int j = 0; j < n; ++j) to_float(k + (kb + j) * D, Kf + static_cast<int64_t>(j) * D, D);
      std::fill(Kf + static_cast<int64_t>(n) * D, Kf + static_cast<int64_t>(kBK) * D, 0.f);
      krows = Kf;
    }
    if (direct) {
      vrows = reinterpret_cast<const float*>(v + kb * D);
    } else {
      for (int j = 0; j < n; ++j) to_float(v + (kb + j) * D, Vt + j * Dp, D);
      vrows = Vt;
    }
    transpose_keys(krows, D, Kt);
    const bool in_new = kb + n > a.L;  // the block reaches the new tokens (tree mask applies)
    int r = 0;
    for (; r + 2 <= R; r += 2) rows_step<2>(a, r, Qf, Kt, P, vrows, kb, n, in_new);
    if (r < R) rows_step<1>(a, r, Qf, Kt, P, vrows, kb, n, in_new);
  }
}

#undef PTP_IN_REG
