// The inner kernel of tree_attention_cpu: one work unit = (batch row b, KV head h, a range of key
// positions), all G query heads of h and all T new tokens (R = G * T query rows) sharing every
// K/V tile read (GQA). Online softmax in base 2, float32 throughout.
//
// This file is included twice by tree_attention_cpu.cpp, inside two namespaces: once compiled for
// the baseline ISA and once under `#pragma GCC target("avx2,fma,f16c")` with PTP_TA_AVX2 defined;
// the driver picks one at run time. It must not include anything itself.
//
// Per block of BK keys: K is converted to float and transposed to Kt [D][BK] (so the scores of a
// query row are an outer-product accumulation along contiguous keys, no horizontal sums) and V to
// Vt [BK][Dp]; then for each pair of query rows: scores (8 vector accumulators), mask, online
// softmax update, and P @ V accumulated in 32-float chunks of the head dim held in registers.

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int kW = 8;    // floats per vector
constexpr int kBK = 32;  // keys per block

static inline vf vload(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
static inline void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }
static inline vf vset1(float a) { return vf{} + a; }
static inline vf vfma(vf a, vf b, vf c) {
#ifdef PTP_TA_AVX2
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
static inline float vhmax(vf v) {
  float r = v[0];
  for (int i = 1; i < kW; ++i) r = v[i] > r ? v[i] : r;
  return r;
}
static inline float vhsum(vf v) {
  float r = 0.f;
  for (int i = 0; i < kW; ++i) r += v[i];
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
#ifdef PTP_TA_AVX2
template <>
inline void to_float<c10::Half>(const c10::Half* src, float* dst, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
#endif


static inline int64_t work_floats(int R2, int D, int Dp) {
  return static_cast<int64_t>(R2) * D + static_cast<int64_t>(D) * kBK + kBK * Dp + 2 * kBK;
}

// acc_r = acc_r * alpha + sum_j p[j] * Vt[j] for a pair of rows, over the head dim in 32-float
// chunks (4 vectors per row held in registers), then an 8-float tail.
static inline void pv_pair(float* acc0, float* acc1, float a0s, float a1s, const float* p0,
                           const float* p1, const float* Vt, int n, int Dp) {
  const vf al0 = vset1(a0s), al1 = vset1(a1s);
  int dc = 0;
  for (; dc + 4 * kW <= Dp; dc += 4 * kW) {
    vf x0[4], x1[4];
    for (int i = 0; i < 4; ++i) {
      x0[i] = vload(acc0 + dc + i * kW) * al0;
      x1[i] = vload(acc1 + dc + i * kW) * al1;
    }
    for (int j = 0; j < n; ++j) {
      const vf b0 = vset1(p0[j]), b1 = vset1(p1[j]);
      const float* vr = Vt + j * Dp + dc;
      for (int i = 0; i < 4; ++i) {
        const vf vv = vload(vr + i * kW);
        x0[i] = vfma(b0, vv, x0[i]);
        x1[i] = vfma(b1, vv, x1[i]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      vstore(acc0 + dc + i * kW, x0[i]);
      vstore(acc1 + dc + i * kW, x1[i]);
    }
  }
  for (; dc < Dp; dc += kW) {
    vf x0 = vload(acc0 + dc) * al0, x1 = vload(acc1 + dc) * al1;
    for (int j = 0; j < n; ++j) {
      const vf vv = vload(Vt + j * Dp + dc);
      x0 = vfma(vset1(p0[j]), vv, x0);
      x1 = vfma(vset1(p1[j]), vv, x1);
    }
    vstore(acc0 + dc, x0);
    vstore(acc1 + dc, x1);
  }
}

// Turns the raw scores s[kBK] of one row into probabilities in place and updates (m, l);
// returns alpha (the factor for the old accumulator), or -1 when the row sees nothing so far
// (p all zero, accumulator untouched).
static inline float softmax_update(float* s, float& m, float& l) {
  vf v[kBK / kW];
  vf mx = vset1(-INFINITY);
  for (int i = 0; i < kBK / kW; ++i) {
    v[i] = vload(s + i * kW);
    mx = v[i] > mx ? v[i] : mx;
  }
  const float m_new = std::max(m, vhmax(mx));
  if (m_new == -INFINITY) {
    for (int i = 0; i < kBK / kW; ++i) vstore(s + i * kW, vf{});
    return 1.f;
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

template <typename scalar_t>
void attend_unit(const scalar_t* q, const scalar_t* k, const scalar_t* v, const UnitArgs& a) {
  const int T = a.T, G = a.G, D = a.D, Dp = a.Dp;
  const int R = T * G, R2 = R + (R & 1);
  float* Qf = a.work;                          // [R2, D], pre-scaled by scale * log2(e)
  float* Kt = Qf + static_cast<int64_t>(R2) * D;  // [D, kBK]
  float* Vt = Kt + static_cast<int64_t>(D) * kBK; // [kBK, Dp]
  float* P = Vt + kBK * Dp;                    // [2, kBK]

  // Query rows r = t * G + g (query head h * G + g of token t).
  for (int r = 0; r < R; ++r) {
    const int t = r / G, g = r % G;
    to_float(q + t * a.q_stride_t + static_cast<int64_t>(g) * D, Qf + static_cast<int64_t>(r) * D, D);
    for (int d = 0; d < D; ++d) Qf[static_cast<int64_t>(r) * D + d] *= a.scale2;
  }
  if (R2 != R) std::fill(Qf + static_cast<int64_t>(R) * D, Qf + static_cast<int64_t>(R2) * D, 0.f);
  std::fill(a.acc, a.acc + static_cast<int64_t>(R2) * Dp, 0.f);
  std::fill(a.m, a.m + R2, -INFINITY);
  std::fill(a.l, a.l + R2, 0.f);
  std::fill(Vt, Vt + kBK * Dp, 0.f);  // zero padding columns D..Dp and tail rows stay zero
  std::fill(Kt, Kt + static_cast<int64_t>(D) * kBK, 0.f);

  float tmp[256];
  for (int64_t kb = a.kbeg; kb < a.kend; kb += kBK) {
    const int n = static_cast<int>(std::min<int64_t>(kBK, a.kend - kb));
    for (int j = 0; j < n; ++j) {
      to_float(k + (kb + j) * D, tmp, D);
      for (int d = 0; d < D; ++d) Kt[d * kBK + j] = tmp[d];
      to_float(v + (kb + j) * D, Vt + j * Dp, D);
    }
    if (n < kBK) {  // stale keys of the previous block: zero them (p = 0 must not meet inf/NaN)
      for (int d = 0; d < D; ++d) std::fill(Kt + d * kBK + n, Kt + (d + 1) * kBK, 0.f);
      std::fill(Vt + n * Dp, Vt + kBK * Dp, 0.f);
    }
    const bool in_new = kb + n > a.L;  // the block reaches the new tokens (tree mask applies)
    for (int r = 0; r < R2; r += 2) {
      // scores of rows r, r + 1 against the kBK keys
      vf s0[kBK / kW], s1[kBK / kW];
      for (int i = 0; i < kBK / kW; ++i) s0[i] = s1[i] = vf{};
      const float* q0 = Qf + static_cast<int64_t>(r) * D;
      const float* q1 = q0 + D;
      for (int d = 0; d < D; ++d) {
        const vf b0 = vset1(q0[d]), b1 = vset1(q1[d]);
        const float* kt = Kt + d * kBK;
        for (int i = 0; i < kBK / kW; ++i) {
          const vf kk = vload(kt + i * kW);
          s0[i] = vfma(b0, kk, s0[i]);
          s1[i] = vfma(b1, kk, s1[i]);
        }
      }
      float* p0 = P;
      float* p1 = P + kBK;
      for (int i = 0; i < kBK / kW; ++i) {
        vstore(p0 + i * kW, s0[i]);
        vstore(p1 + i * kW, s1[i]);
      }
      for (int j = n; j < kBK; ++j) p0[j] = p1[j] = -INFINITY;
      if (r + 1 >= R) std::fill(p1, p1 + kBK, -INFINITY);  // padding row
      if (in_new) {
        for (int rr = 0; rr < 2 && r + rr < R; ++rr) {
          const int t = (r + rr) / G;
          float* p = rr ? p1 : p0;
          for (int j = static_cast<int>(std::max<int64_t>(0, a.L - kb)); j < n; ++j) {
            const int64_t jj = kb + j - a.L;  // index of the new token
            const bool vis = a.mask ? a.mask[static_cast<int64_t>(t) * T + jj] : jj <= t;
            if (!vis) p[j] = -INFINITY;
          }
        }
      }
      const float al0 = softmax_update(p0, a.m[r], a.l[r]);
      const float al1 = softmax_update(p1, a.m[r + 1], a.l[r + 1]);
      pv_pair(a.acc + static_cast<int64_t>(r) * Dp, a.acc + static_cast<int64_t>(r + 1) * Dp, al0,
              al1, p0, p1, Vt, n, Dp);
    }
  }
}
