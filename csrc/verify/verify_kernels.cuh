// verify_tree CUDA kernel (torch-free: raw pointers + cudaStream_t; includable by plain nvcc).
//
// One launch for the whole batch. Grid: one block of kThreads per (row b, node c), blockIdx.x =
// b * N1 + c. Each block computes its node's outcome from that node's logits row alone (the
// target's token for greedy/coupled; the accepted child or the fallback token for rejection)
// into a workspace, then increments the row's counter (after __threadfence); the last block of
// a row to finish walks the row from the root and writes the outputs.
//
// Inside a block the row [0, V) is cut into kWarps contiguous segments, one per warp; a warp's
// lanes read its segment coalesced (16-byte vectors when the row is aligned). Every reduction
// has a fixed order (per-lane sequential, warp xor tree, then warps in order on one thread), so
// a logits row always gives the same token, whatever B, N and the rest of the batch are (plain
// sampling is the N = 0 case). Histograms for top-k/top-p use integer atomics only (fixed-point
// mass), which are order-independent, aggregated per warp over lanes with the same bin.
//
// Distribution (ptp_ext.reference.sampling_probs): x = float(logit) / temperature (IEEE div);
// top-k: the k-th largest key by a 4 x 8-bit radix select over order-preserving float bits, ties
// at the threshold kept by lowest id; softmax with max subtraction; top-p: radix select over the
// probability bits with fixed-point mass, a token kept when the mass before it in (p desc, id
// asc) order is < top_p; renormalise. Pick(u, P): segment masses locate the crossing, one warp
// scans that segment in float64 in id order. Nothing is sorted and nothing is materialised: the
// probabilities are recomputed from the logits (L2-resident after the first pass).
//
// Invalid rows (verify.h): the first pass over a node's row (block_argmax or softmax_stats) also
// flags a NaN or +inf or an all -inf x (__syncthreads_or); such a node publishes token -1. The
// walking block writes the sentinel row (0 accepted, next_token -1) when the walk reaches such a
// node or, in the sampling modes, when a uniform of the row is outside [0, 1).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "../common/cuda_utils.cuh"

namespace ptp {
namespace verify_cuda {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr double kFixed = 1099511627776.0;  // 2^40: fixed-point scale of the top-p mass

enum Mode : int { kGreedy = 0, kCoupled = 1, kRejection = 2 };

struct Params {
  const int64_t* draft_tokens;  // [B, N1]
  const int64_t* parents;       // [B, N1]
  const void* logits;           // [B, N1, V]
  const float* draft_probs;     // [B, N1, V] or null
  const void* uniforms;         // [B, N1] float32 / float64, or null
  bool uniforms_f64;
  int mode;
  float temperature;
  int64_t top_k;
  double top_p;
  int64_t B, N1, V;
  int64_t seg;                   // segment length per warp (multiple of 32 * vector width)
  int64_t* ws_child;            // [B * N1] workspace
  int64_t* ws_token;            // [B * N1] workspace
  unsigned long long* counters; // [B], zero before the launch
  int64_t* num_accepted;        // [B]
  int64_t* accepted_nodes;      // [B, N1]
  int64_t* next_token;          // [B]
};

__device__ __forceinline__ uint32_t order_key(float x) {  // larger float -> larger key
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct Shared {
  float seg_m[kWarps];
  float seg_s[kWarps];
  double seg_d[kWarps];
  int64_t seg_i[kWarps];
  unsigned int hist[256];
  unsigned long long hist_mass[256];
  float M, Z, Z2;
  uint32_t tk_key, tp_key;
  int64_t tk_cut, tp_cut;
  int64_t result;
  unsigned int sel;
  int64_t rem;
  unsigned long long acc;
  bool topk, topp, last;
  bool invalid;  // the node's x holds a NaN or +inf or is all -inf
  int64_t depth;
  int reach;
};

// The filtered, normalised target distribution of one row, evaluated element-wise.
template <typename T>
struct RowProbs {
  const T* row;
  float temperature;
  const Shared* sh;
  __device__ __forceinline__ float x(int64_t i) const { return to_float(row[i]) / temperature; }
  __device__ __forceinline__ bool kept_k(float xi, int64_t i) const {
    if (!sh->topk) return true;
    const uint32_t k = order_key(xi);
    return k > sh->tk_key || (k == sh->tk_key && i <= sh->tk_cut);
  }
  // softmax over the top-k set, before top-p (p0_of: from x(i) already loaded)
  __device__ __forceinline__ float p0_of(float xi, int64_t i) const {
    return kept_k(xi, i) ? __expf(xi - sh->M) / sh->Z : 0.0f;
  }
  __device__ __forceinline__ float p0(int64_t i) const { return p0_of(x(i), i); }
  __device__ __forceinline__ float operator()(int64_t i) const {
    float p = p0(i);
    if (sh->topp) {
      const uint32_t k = __float_as_uint(p);
      if (!(k > sh->tp_key || (k == sh->tp_key && i <= sh->tp_cut))) return 0.0f;
      p = p / sh->Z2;
    }
    return p;
  }
};

// Per-warp sums (fixed order) of f(i) over the warp's segment into sh.seg_d; returns nothing.
template <typename F>
__device__ void segment_sums(const F& f, int64_t V, int64_t seg, Shared& sh) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t lo = w * seg, hi = min(V, lo + seg);
  double s = 0.0;
  for (int64_t i = lo + lane; i < hi; i += 32) s += static_cast<double>(f(i));
  s = warp_sum(s);
  if (lane == 0) sh.seg_d[w] = s;
  __syncthreads();
}

// Index of the n-th (1-based) i in id order with pred(i); -1 if fewer. All threads call it.
template <typename F>
__device__ int64_t block_find_nth(const F& pred, int64_t n, int64_t V, int64_t seg, Shared& sh) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t lo = w * seg, hi = min(V, lo + seg);
  int64_t c = 0;
  for (int64_t base = lo; base < hi; base += 32) {
    const int64_t i = base + lane;
    c += __popc(__ballot_sync(0xffffffffu, i < hi && pred(i)));
  }
  if (lane == 0) sh.seg_i[w] = c;
  __syncthreads();
  if (threadIdx.x < 32) {
    int64_t res = -1, before = 0;
    for (int s = 0; s < kWarps && res < 0; ++s) {  // uniform across the warp
      if (before + sh.seg_i[s] < n) {
        before += sh.seg_i[s];
        continue;
      }
      const int64_t slo = s * seg, shi = min(V, slo + seg);
      for (int64_t base = slo; base < shi; base += 32) {
        const int64_t i = base + lane;
        const unsigned int b = __ballot_sync(0xffffffffu, i < shi && pred(i));
        const int64_t cnt = __popc(b);
        if (before + cnt >= n) {
          unsigned int bb = b;
          for (int64_t k = before + 1; k < n; ++k) bb &= bb - 1;  // drop lowest set bits
          res = base + __ffs(bb) - 1;
          break;
        }
        before += cnt;
      }
    }
    if (lane == 0) sh.result = res;
  }
  __syncthreads();
  return sh.result;
}

// Pick(u, f) = min{i : sum_{j<=i} f(j) > u} in float64, given per-warp segment masses in
// sh.seg_d; the last i with f(i) > 0 when nothing crosses. All threads call it.
template <typename F>
__device__ int64_t block_pick(double u, const F& f, int64_t V, int64_t seg, Shared& sh) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    double start = 0.0;
    int s0 = 0;
    while (s0 < kWarps - 1 && start + sh.seg_d[s0] <= u) start += sh.seg_d[s0++];
    int64_t res = -1;
    for (int64_t base = s0 * seg; base < V; base += 32) {
      const int64_t i = base + lane;
      const double v = i < V ? static_cast<double>(f(i)) : 0.0;
      double incl = v;  // inclusive warp scan, fixed order
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      const unsigned int hit = __ballot_sync(0xffffffffu, i < V && start + incl > u);
      if (hit) {
        res = base + __ffs(hit) - 1;
        break;
      }
      start += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (res < 0) {  // rounding left F(V-1) <= u: the last id with f > 0
      for (int64_t base = ((V - 1) / 32) * 32; base >= 0 && res < 0; base -= 32) {
        const int64_t i = base + lane;
        const unsigned int nz = __ballot_sync(0xffffffffu, i < V && f(i) > 0);
        if (nz) res = base + 31 - __clz(nz);
      }
      if (res < 0) res = V - 1;
    }
    if (lane == 0) sh.result = res;
  }
  __syncthreads();
  return sh.result;
}

// Block argmax of float(row[i]), lowest id on ties (vectorised loads).
template <typename T, int VEC>
__device__ int64_t block_argmax(const T* __restrict__ row, int64_t V, int64_t seg, Shared& sh) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t lo = w * seg, hi = min(V, lo + seg);
  float best = -INFINITY;
  int64_t bi = INT64_MAX;
  bool bad = false;  // a NaN or +inf
  struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
  for (int64_t i = lo + lane * VEC; i < hi; i += 32 * VEC) {
    const Pack pk = *reinterpret_cast<const Pack*>(row + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = to_float(pk.v[k]);
      bad = bad || v != v || v == INFINITY;
      if (v > best) { best = v; bi = i + k; }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
  }
  if (lane == 0) { sh.seg_m[w] = best; sh.seg_i[w] = bi; }
  const int any_bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    float b = sh.seg_m[0];
    int64_t r = sh.seg_i[0];
    for (int s = 1; s < kWarps; ++s)
      if (sh.seg_m[s] > b || (sh.seg_m[s] == b && sh.seg_i[s] < r)) { b = sh.seg_m[s]; r = sh.seg_i[s]; }
    sh.invalid = any_bad || r == INT64_MAX;  // r == INT64_MAX: every logit is -inf
    sh.result = r == INT64_MAX ? 0 : r;
  }
  __syncthreads();
  return sh.result;
}

// Unfiltered softmax statistics in one vectorised pass: per-warp (max, sum exp(x - max)) ->
// sh.M, sh.Z and the segment masses sh.seg_d (in probability units) for block_pick.
template <typename T, int VEC>
__device__ void softmax_stats(const T* __restrict__ row, float temperature, int64_t V, int64_t seg,
                              Shared& sh) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t lo = w * seg, hi = min(V, lo + seg);
  float m = -INFINITY, s = 0.0f;
  bool bad = false;  // a NaN or +inf x
  struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
  for (int64_t i = lo + lane * VEC; i < hi; i += 32 * VEC) {
    const Pack pk = *reinterpret_cast<const Pack*>(row + i);
    float x[VEC];
    float cm = m;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      x[k] = to_float(pk.v[k]) / temperature;
      bad = bad || x[k] != x[k] || x[k] == INFINITY;
      cm = fmaxf(cm, x[k]);
    }
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < VEC; ++k) add += __expf(x[k] - cm);
    s = (m == -INFINITY ? 0.0f : s * __expf(m - cm)) + add;
    m = cm;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, o);
    const float os = __shfl_xor_sync(0xffffffffu, s, o);
    const float nm = fmaxf(m, om);
    s = (m == -INFINITY ? 0.0f : s * __expf(m - nm)) + (om == -INFINITY ? 0.0f : os * __expf(om - nm));
    m = nm;
  }
  if (lane == 0) { sh.seg_m[w] = m; sh.seg_s[w] = s; }
  const int any_bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    float M = -INFINITY;
    for (int k = 0; k < kWarps; ++k) M = fmaxf(M, sh.seg_m[k]);
    sh.invalid = any_bad || M == -INFINITY;  // M == -inf: every x is -inf
    float Z = 0.0f;
    for (int k = 0; k < kWarps; ++k)
      if (sh.seg_m[k] != -INFINITY) Z += sh.seg_s[k] * __expf(sh.seg_m[k] - M);
    sh.M = M;
    sh.Z = Z;
    for (int k = 0; k < kWarps; ++k)
      sh.seg_d[k] = sh.seg_m[k] == -INFINITY ? 0.0 : double(sh.seg_s[k] * __expf(sh.seg_m[k] - M)) / Z;
  }
  __syncthreads();
}

// Histogram update of one radix pass. All 32 lanes of a warp call it together (warp-uniform
// loop); lane's element goes to bin (with its fixed-point mass when hist_mass is given) if take.
// Lanes with the same bin are aggregated first, so each warp issues one shared atomic per
// distinct bin rather than one per element: the leading radix digits put almost the whole
// vocabulary into a handful of bins, where per-element atomics on one address serialise (that
// made top-k/top-p 20-50x slower than plain sampling on an H100, 2026-11-23). The sums are
// integers, so the histogram is the same whatever the aggregation.
__device__ __forceinline__ void hist_add(unsigned int* hist, unsigned long long* hist_mass,
                                         bool take, unsigned int bin, unsigned long long mass) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  const int lane = threadIdx.x & 31;
  const unsigned int peers = __match_any_sync(0xffffffffu, take ? bin : 0xffffffffu);
  const bool leader = take && __ffs(peers) - 1 == lane;
  if (hist_mass != nullptr) {
    if (!take) mass = 0;
#if __CUDA_ARCH__ >= 800
    // mass <= 2^40 (p <= 1 in 2^-40 units): its two 20-bit halves sum over <= 32 peers in 32 bits.
    const unsigned int lo = __reduce_add_sync(peers, static_cast<unsigned int>(mass & 0xfffffu));
    const unsigned int hi = __reduce_add_sync(peers, static_cast<unsigned int>(mass >> 20));
    const unsigned long long total = (static_cast<unsigned long long>(hi) << 20) + lo;
#else
    unsigned long long total = 0;
    for (int j = 0; j < 32; ++j) {
      const unsigned long long m = __shfl_sync(0xffffffffu, mass, j);
      if ((peers >> j) & 1u) total += m;
    }
#endif
    if (leader) atomicAdd(&hist_mass[bin], total);
  }
  if (leader) atomicAdd(&hist[bin], static_cast<unsigned int>(__popc(peers)));
#else
  if (take) {
    atomicAdd(&hist[bin], 1u);
    if (hist_mass != nullptr) atomicAdd(&hist_mass[bin], mass);
  }
#endif
}

// The radix passes read the row kStage elements per thread at a time: every load is issued before
// the histogram updates that use them, so a thread keeps kStage global loads in flight instead of
// one (a pass cost about V / 256 memory latencies: H200, 2026-11-30). Element i = chunk +
// j * kThreads + threadIdx.x: each element once, every lane of a warp in the same (chunk, j), so
// hist_add stays warp-uniform; the histograms are integer sums, the same in any order.
constexpr int kStage = 8;

// One staged pass over the row: body(i, x) for every i < V of this thread, x = P.x(i), the
// kStage loads of a chunk issued before any body runs. Every thread runs every chunk
// (warp-uniform), so bodies may use warp-collective operations (hist_add).
template <typename T, typename Body>
__device__ __forceinline__ void staged_pass(const RowProbs<T>& P, int64_t V, Body&& body) {
  for (int64_t chunk = 0; chunk < V; chunk += int64_t(kStage) * kThreads) {
    float xs[kStage];
#pragma unroll
    for (int j = 0; j < kStage; ++j) {  // the loads first
      const int64_t i = chunk + int64_t(j) * kThreads + threadIdx.x;
      xs[j] = i < V ? P.x(i) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kStage; ++j) body(chunk + int64_t(j) * kThreads + threadIdx.x, xs[j]);
  }
}

// Radix select of the k-th largest order_key(x) -> sh.tk_key, and the id cutoff among ties.
template <typename T>
__device__ void topk_threshold(const RowProbs<T>& P, int64_t k, int64_t V, int64_t seg, Shared& sh) {
  uint32_t prefix = 0, mask = 0;
  int64_t rem = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    staged_pass(P, V, [&](int64_t i, float x) {
      bool take = false;
      unsigned int bin = 0;
      if (i < V) {
        const uint32_t key = order_key(x);
        take = (key & mask) == prefix;
        bin = (key >> shift) & 255u;
      }
      hist_add(sh.hist, nullptr, take, bin, 0);
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t cum = 0;
      unsigned int sel = 0;
      for (int bin = 255; bin >= 0; --bin) {
        if (cum + sh.hist[bin] >= rem) { sel = bin; break; }
        cum += sh.hist[bin];
      }
      sh.sel = sel;
      sh.rem = rem - cum;
    }
    __syncthreads();
    prefix |= sh.sel << shift;
    mask |= 255u << shift;
    rem = sh.rem;
    __syncthreads();
  }
  const uint32_t key = prefix;
  const int64_t cut = block_find_nth([&](int64_t i) { return order_key(P.x(i)) == key; }, rem, V, seg, sh);
  if (threadIdx.x == 0) { sh.tk_key = key; sh.tk_cut = cut; }
  __syncthreads();
}

// Top-p threshold over the probabilities p0 (after top-k): radix select on the float bits with
// fixed-point mass; then Z2 = the kept mass. Sets sh.topp = false when everything is kept.
template <typename T>
__device__ void topp_threshold(const RowProbs<T>& P, double top_p, int64_t V, int64_t seg, Shared& sh) {
  const unsigned long long target = static_cast<unsigned long long>(top_p * kFixed);
  uint32_t prefix = 0, mask = 0;
  unsigned long long above = 0;  // fixed-point mass of tokens above the current prefix
  bool all = false;
  for (int shift = 24; shift >= 0 && !all; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) { sh.hist[i] = 0; sh.hist_mass[i] = 0; }
    __syncthreads();
    staged_pass(P, V, [&](int64_t i, float x) {
      bool take = false;
      unsigned int bin = 0;
      unsigned long long mass = 0;
      if (i < V) {
        const float p = P.p0_of(x, i);
        const uint32_t key = __float_as_uint(p);
        take = (key & mask) == prefix;
        bin = (key >> shift) & 255u;
        mass = static_cast<unsigned long long>(double(p) * kFixed);
      }
      hist_add(sh.hist, sh.hist_mass, take, bin, mass);
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      int sel = -1;
      unsigned long long a = above;
      for (int bin = 255; bin >= 0; --bin) {
        if (a + sh.hist_mass[bin] >= target) { sel = bin; break; }
        a += sh.hist_mass[bin];
      }
      sh.sel = sel < 0 ? 0xffffffffu : static_cast<unsigned int>(sel);
      sh.acc = a;
      sh.rem = sel < 0 ? 0 : sh.hist[sel];
    }
    __syncthreads();
    if (sh.sel == 0xffffffffu) {
      all = true;
    } else {
      prefix |= sh.sel << shift;
      mask |= 255u << shift;
      above = sh.acc;
    }
    __syncthreads();
  }
  const float pi = __uint_as_float(prefix);
  if (all || pi == 0.0f) {
    if (threadIdx.x == 0) sh.topp = false;
    __syncthreads();
  } else {
    const int64_t count = sh.rem;
    // Ties at pi in id order: the t-th (0-based) has mass before it = above + t * pi.
    const double d = (top_p - double(above) / kFixed) / double(pi);
    int64_t r = static_cast<int64_t>(ceil(d));
    r = r < 1 ? 1 : (r > count ? count : r);
    const int64_t cut = block_find_nth([&](int64_t i) { return __float_as_uint(P.p0(i)) == prefix; }, r, V, seg, sh);
    if (threadIdx.x == 0) { sh.tp_key = prefix; sh.tp_cut = cut; sh.Z2 = 1.0f; sh.topp = true; }
    __syncthreads();
  }
  if (sh.topp) {  // Z2: the kept mass (p0 of the kept tokens), fixed order
    segment_sums([&](int64_t i) {
      const float p = P.p0(i);
      const uint32_t k = __float_as_uint(p);
      return (k > sh.tp_key || (k == sh.tp_key && i <= sh.tp_cut)) ? p : 0.0f;
    }, V, seg, sh);
    if (threadIdx.x == 0) {
      double z = 0.0;
      for (int k = 0; k < kWarps; ++k) z += sh.seg_d[k];
      sh.Z2 = static_cast<float>(z);
    }
    __syncthreads();
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) verify_tree_kernel(Params prm) {
  extern __shared__ double dyn[];  // rejection: sums of the residuals of the children, [N1]
  __shared__ Shared sh;
  const int64_t node = blockIdx.x;
  const int64_t b = node / prm.N1, c = node % prm.N1, N1 = prm.N1, V = prm.V, seg = prm.seg;
  const int64_t* par = prm.parents + b * N1;
  const int64_t* tok = prm.draft_tokens + b * N1;
  const T* row = static_cast<const T*>(prm.logits) + node * V;
  auto uniform = [&](int64_t i) -> double {
    return prm.uniforms_f64 ? static_cast<const double*>(prm.uniforms)[b * N1 + i]
                            : static_cast<double>(static_cast<const float*>(prm.uniforms)[b * N1 + i]);
  };
  if (threadIdx.x == 0) {  // reachable from the root? (out-of-range parents count as padding)
    int64_t d = 0, x = c;
    bool ok = true;
    while (x > 0) {
      const int64_t p = par[x];
      if (p < 0 || p >= x) { ok = false; break; }
      x = p;
      ++d;
    }
    sh.reach = ok;
    sh.depth = d;
    sh.topk = false;
    sh.topp = false;
    sh.invalid = false;
  }
  __syncthreads();
  int64_t child = -1, token = 0;
  if (sh.reach) {
    auto is_child = [&](int64_t j) { return par[j] == c; };  // j > c
    const bool argmax_only = prm.mode == kGreedy || prm.temperature == 0.0f;
    if (argmax_only) {
      token = block_argmax<T, VEC>(row, V, seg, sh);
      for (int64_t j = c + 1; j < N1; ++j) {
        if (!is_child(j)) continue;
        if (prm.mode == kRejection) {
          // P is one-hot on the argmax a: only a draft a can pass (u * q(a) < 1); a rejection
          // leaves p one-hot on a, so the fallback is a.
          const int64_t x = tok[j];
          if (x == token && uniform(j) * double(prm.draft_probs[(b * N1 + j) * V + x]) < 1.0) { child = j; break; }
        } else if (tok[j] == token) { child = j; break; }
      }
    } else {
      RowProbs<T> P{row, prm.temperature, &sh};
      const bool topk = prm.top_k > 0 && prm.top_k < V, topp = prm.top_p < 1.0;
      if (!topk && !topp) {
        softmax_stats<T, VEC>(row, prm.temperature, V, seg, sh);
      } else {
        // max and sum over the top-k set (the max is always kept)
        if (topk) topk_threshold(P, prm.top_k, V, seg, sh);
        if (threadIdx.x == 0) sh.topk = topk;
        softmax_stats<T, VEC>(row, prm.temperature, V, seg, sh);  // M (global max)
        if (topk) {
          if (threadIdx.x == 0) sh.Z = 1.0f;
          __syncthreads();
          segment_sums([&](int64_t i) { const float xi = P.x(i); return P.kept_k(xi, i) ? __expf(xi - sh.M) : 0.0f; }, V, seg, sh);
          if (threadIdx.x == 0) { double z = 0; for (int k = 0; k < kWarps; ++k) z += sh.seg_d[k]; sh.Z = float(z); }
          __syncthreads();
        }
        if (topp) topp_threshold(P, prm.top_p, V, seg, sh);
        segment_sums(P, V, seg, sh);
      }
      if (prm.mode == kCoupled) {
        token = block_pick(uniform(sh.depth), P, V, seg, sh);
        for (int64_t j = c + 1; j < N1; ++j)
          if (is_child(j) && tok[j] == token) { child = j; break; }
      } else {
        // Rejection over the children in index order; dyn[l] = residual sum after the l-th
        // rejected child (0: that child left p unchanged). p_k(i) is recomputed on the fly.
        const float* q_row = prm.draft_probs + b * N1 * V;
        int64_t nrej = 0;
        int64_t* rej = reinterpret_cast<int64_t*>(dyn + N1);  // rejected child ids
        auto resid = [&](int64_t i) -> double {
          double v = P(i);
          for (int64_t l = 0; l < nrej; ++l)
            if (dyn[l] > 0) v = fmax(v - double(q_row[rej[l] * V + i]), 0.0) / dyn[l];
          return v;
        };
        for (int64_t j = c + 1; j < N1 && child < 0; ++j) {
          if (!is_child(j)) continue;
          const int64_t x = tok[j];
          if (x >= 0 && x < V && uniform(j) * double(q_row[j * V + x]) < resid(x)) { child = j; break; }
          // residual sum with child j appended
          const float* qj = q_row + j * V;
          segment_sums([&](int64_t i) { return fmax(resid(i) - double(qj[i]), 0.0); }, V, seg, sh);
          if (threadIdx.x == 0) {
            double z = 0;
            for (int k = 0; k < kWarps; ++k) z += sh.seg_d[k];
            dyn[nrej] = z;
            rej[nrej] = j;
          }
          __syncthreads();
          ++nrej;
        }
        if (child < 0) {
          if (nrej > 0) segment_sums(resid, V, seg, sh);  // else: seg_d already holds P's masses
          token = block_pick(uniform(0), resid, V, seg, sh);
        }
      }
    }
  }
  if (sh.invalid) {  // set (and followed by a barrier) in block_argmax / softmax_stats
    child = -1;
    token = -1;
  }
  // Publish, then the last block of the row walks it.
  if (threadIdx.x == 0) {
    prm.ws_child[node] = child;
    prm.ws_token[node] = token;
    __threadfence();
    const unsigned long long prev = atomicAdd(&prm.counters[b], 1ull);
    sh.last = prev == static_cast<unsigned long long>(N1 - 1);
  }
  __syncthreads();
  if (sh.last && threadIdx.x == 0) {
    __threadfence();
    const volatile int64_t* wc = prm.ws_child + b * N1;
    const volatile int64_t* wt = prm.ws_token + b * N1;
    int64_t* path = prm.accepted_nodes + b * N1;
    bool invalid = false;
    if (prm.mode != kGreedy) {
      for (int64_t i = 0; i < N1 && !invalid; ++i) {
        const double u = uniform(i);
        invalid = !(u >= 0.0 && u < 1.0);  // NaN fails too
      }
    }
    int64_t cur = 0, n = 0;
    path[0] = 0;
    while (!invalid) {
      const int64_t ch = wc[cur];
      if (ch < 0) {
        invalid = wt[cur] < 0;
        prm.next_token[b] = wt[cur];
        break;
      }
      cur = ch;
      path[++n] = cur;
    }
    if (invalid) {  // the sentinel row
      n = 0;
      prm.next_token[b] = -1;
    }
    for (int64_t i = n + 1; i < N1; ++i) path[i] = -1;
    prm.num_accepted[b] = n;
  }
}

// Segment length: rows split into kWarps segments, each a multiple of 32 * vec elements.
inline int64_t segment_length(int64_t V, int vec) {
  const int64_t unit = 32 * vec;
  const int64_t per = (V + kWarps - 1) / kWarps;
  return ((per + unit - 1) / unit) * unit;
}

template <typename T>
cudaError_t launch_verify_tree(Params prm, bool aligned, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = aligned && prm.V % kVec == 0;
  prm.seg = segment_length(prm.V, vec ? kVec : 1);
  const size_t smem = prm.mode == kRejection ? static_cast<size_t>(prm.N1) * 16 : 0;
  const dim3 grid(static_cast<unsigned int>(prm.B * prm.N1));
  if (vec) {
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(verify_tree_kernel<T, kVec>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    verify_tree_kernel<T, kVec><<<grid, kThreads, smem, stream>>>(prm);
  } else {
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(verify_tree_kernel<T, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    verify_tree_kernel<T, 1><<<grid, kThreads, smem, stream>>>(prm);
  }
  return cudaGetLastError();
}

}  // namespace verify_cuda
}  // namespace ptp
