// verify_tree on the CPU: batched acceptance of draft trees (greedy / coupled / rejection).
//
// The outcome at a node (the target's token, or which child is accepted and the fallback token)
// depends only on that node's logits, its children and the uniforms, so nodes are independent.
// Two schedules, same results: with few rows, every reachable node is computed in parallel
// (at::parallel_for over (row, node)) and the rows are then walked from the root; with many rows,
// each row is walked lazily in parallel over rows, computing only the nodes on its path.
//
// Numerics follow ptp_ext.reference exactly: x = float(logits) / float(temperature); top-k by
// (value desc, id asc); softmax and the float32 sums are ATen's own CPU kernels called on the
// row (so the probabilities are bit-identical to sampling_probs); top-p uses the reference's
// float32 `cumsum - p` rule; the CDF of Pick is accumulated in float64; the rejection residual
// is float64, like verify_tree_ref.
//
// Invalid rows (the sentinel rule of verify.h): a node whose logits (divided by the temperature
// when sampling) hold a NaN or +inf or are all -inf yields the outcome {child -1, token -1}; the
// walk that reaches it, or a row with a uniform outside [0, 1), writes num_accepted 0,
// accepted_nodes [0, -1, ...] and next_token -1 for that row.
#include "verify.h"

#include "../common/cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_softmax_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum_cpu_dispatch.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace ptp {
namespace {

struct Config {
  VerifyMode mode;
  double temperature;
  int64_t top_k;
  double top_p;
};

// Per-thread buffers, reused across the nodes a thread computes; sized on first use, so that
// greedy verification (an argmax per node) allocates and zeroes none of the vocabulary-sized
// rows it never reads.
struct Scratch {
  std::vector<float> x, p;
  std::vector<double> pd, pd2;
  std::vector<int32_t> idx;
  std::vector<uint8_t> keep;
};

// Node result: the accepted child (-1: none) and, when none, the next token (-1: the node's
// logits are invalid).
struct Outcome {
  int64_t child = -1;
  int64_t token = 0;
};

#ifdef PTP_HAVE_X86
}  // namespace
PTP_AVX2_BEGIN
namespace {
// argmax_row over float32 logits, 8 lanes: lane l keeps the first maximum of the elements
// l, l + 8, ... (strict >), the lanes' maxima are then reduced to the lowest index holding the
// overall maximum, and the tail continues with strict > as the scalar loop: the same index. A
// greedy verify reads a 49,152-entry row per node: ~6 us instead of ~50.
int64_t argmax_row_avx2(const float* row, int64_t V) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256i best_i = _mm256_set1_epi32(-1);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  __m256 bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(row + i);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q), _mm256_cmp_ps(v, inf, _CMP_EQ_OQ)));
    const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, gt);
    best_i = _mm256_blendv_epi8(best_i, idx, _mm256_castps_si256(gt));
    idx = _mm256_add_epi32(idx, step);
  }
  if (_mm256_movemask_ps(bad)) return -1;
  float lane_v[8];
  int32_t lane_i[8];
  _mm256_storeu_ps(lane_v, best);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane_i), best_i);
  float bv = -std::numeric_limits<float>::infinity();
  int64_t bi = -1;
  for (int l = 0; l < 8; ++l)
    if (lane_i[l] >= 0 && (lane_v[l] > bv || (lane_v[l] == bv && lane_i[l] < bi))) {
      bv = lane_v[l];
      bi = lane_i[l];
    }
  for (; i < V; ++i) {
    const float v = row[i];
    if (std::isnan(v) || v == std::numeric_limits<float>::infinity()) return -1;
    if (v > bv) {
      bv = v;
      bi = i;
    }
  }
  return bi;
}
}  // namespace
PTP_AVX2_END
namespace {
#endif

// Lowest index of the maximum, or -1 when the row is invalid (a NaN or +inf, or all -inf).
template <typename T>
int64_t argmax_row(const T* row, int64_t V) {
#ifdef PTP_HAVE_X86
  if constexpr (std::is_same<T, float>::value)
    if (cpu_has_avx2()) return argmax_row_avx2(row, V);
#endif
  int64_t best = -1;
  float bv = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < V; ++i) {
    const float v = static_cast<float>(row[i]);
    if (std::isnan(v) || v == std::numeric_limits<float>::infinity()) return -1;
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  return best;  // -1 when every logit is -inf
}

// Pick(u, P) = min{j : F(j) > u}, F accumulated in float64; the last id with p > 0 when rounding
// leaves F(V-1) <= u.
template <typename P>
int64_t pick_row(double u, const P* p, int64_t V) {
  double cdf = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    cdf += static_cast<double>(p[i]);
    if (cdf > u) return i;
  }
  for (int64_t i = V - 1; i >= 0; --i)
    if (p[i] > 0) return i;
  return V - 1;
}

at::Tensor blob(void* data, int64_t V, at::ScalarType dtype) {
  return at::from_blob(data, {V}, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

// sampling_probs(row, temperature > 0, top_k, top_p) into s.p (float32, bit-identical to the
// reference: same element-wise formulas, ATen's softmax and sum kernels). Returns false, leaving
// s.p unset, when x = logits / temperature holds a NaN or +inf or is all -inf.
template <typename T>
bool target_probs(const T* row, int64_t V, const Config& cfg, Scratch& s) {
  s.x.resize(V);
  s.p.resize(V);
  float* x = s.x.data();
  float* p = s.p.data();
  const float tf = static_cast<float>(cfg.temperature);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  bool live = false;
  for (int64_t i = 0; i < V; ++i) {
    x[i] = static_cast<float>(row[i]) / tf;
    if (std::isnan(x[i]) || x[i] == kInf) return false;
    live = live || x[i] > -kInf;
  }
  if (!live) return false;
  if (cfg.top_k > 0 && cfg.top_k < V) {
    // k-th largest value tau; keep x > tau, and the lowest ids among x == tau until k are kept
    // (the stable descending sort of the reference).
    std::copy(x, x + V, p);
    std::nth_element(p, p + cfg.top_k - 1, p + V, std::greater<float>());
    const float tau = p[cfg.top_k - 1];
    int64_t greater = 0;
    for (int64_t i = 0; i < V; ++i) greater += x[i] > tau;
    int64_t ties = cfg.top_k - greater;
    for (int64_t i = 0; i < V; ++i) {
      if (x[i] > tau) continue;
      if (x[i] == tau && ties > 0) {
        --ties;
        continue;
      }
      x[i] = -std::numeric_limits<float>::infinity();
    }
  }
  at::Tensor xt = blob(x, V, at::kFloat), pt = blob(p, V, at::kFloat);
  at::cpu::_softmax_out(pt, xt, 0, false);
  if (cfg.top_p < 1.0) {
    // Sort the positive probabilities by (p desc, id asc) a chunk at a time (nth_element, then
    // sort the chunk) until the mass before the current token is safely past top_p. A token is
    // kept when float32(cumsum) - p < top_p, the reference's rule evaluated in its own precision.
    s.idx.resize(V);
    s.keep.assign(V, 0);
    int32_t* idx = s.idx.data();
    int64_t n = 0;
    for (int64_t i = 0; i < V; ++i)
      if (p[i] > 0) idx[n++] = static_cast<int32_t>(i);
    auto cmp = [p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); };
    double cum = 0.0;
    bool done = false;
    for (int64_t lo = 0, chunk = 256; lo < n && !done; lo += chunk, chunk *= 2) {
      const int64_t hi = std::min(n, lo + chunk);
      if (hi < n) std::nth_element(idx + lo, idx + hi - 1, idx + n, cmp);
      std::sort(idx + lo, idx + hi, cmp);
      for (int64_t i = lo; i < hi; ++i) {
        const float sp = p[idx[i]];
        // Past this margin no later token can have float32 "before" < top_p.
        if (cum > cfg.top_p + 1e-4) {
          done = true;
          break;
        }
        cum += sp;
        const float before = static_cast<float>(cum) - sp;
        if (static_cast<double>(before) < cfg.top_p) s.keep[idx[i]] = 1;
      }
    }
    for (int64_t i = 0; i < V; ++i)
      if (!s.keep[i]) p[i] = 0.0f;
    const float total = at::cpu::sum(pt, at::IntArrayRef{0}, true).item<float>();
    for (int64_t i = 0; i < V; ++i) p[i] = p[i] / total;
  }
  return true;
}

// The outcome at node c of row b.
template <typename T>
Outcome node_outcome(const T* logits, const float* draft_probs, const int64_t* tokens,
                     const std::vector<int64_t>& children, const double* u, int64_t depth,
                     int64_t V, const Config& cfg, Scratch& s) {
  Outcome out;
  const Outcome invalid{-1, -1};
  const bool argmax_only = cfg.mode == VerifyMode::kGreedy || cfg.temperature == 0.0;
  if (cfg.mode != VerifyMode::kRejection) {
    if (argmax_only) {
      out.token = argmax_row(logits, V);
      if (out.token < 0) return invalid;
    } else {
      if (!target_probs(logits, V, cfg, s)) return invalid;
      out.token = pick_row(u[depth], s.p.data(), V);
    }
    for (int64_t j : children)
      if (tokens[j] == out.token) {
        out.child = j;
        break;
      }
    return out;
  }
  // Rejection: p = P (float64); child j with token x is accepted when u_j * q_j(x) < p(x); a
  // rejected child turns p into norm(max(p - q_j, 0)) (unchanged if all zero).
  s.pd.resize(V);
  s.pd2.resize(V);
  double* pd = s.pd.data();
  double* r = s.pd2.data();
  if (argmax_only) {
    const int64_t a = argmax_row(logits, V);
    if (a < 0) return invalid;
    std::fill(pd, pd + V, 0.0);
    pd[a] = 1.0;
  } else {
    if (!target_probs(logits, V, cfg, s)) return invalid;
    for (int64_t i = 0; i < V; ++i) pd[i] = static_cast<double>(s.p[i]);
  }
  for (int64_t j : children) {
    const int64_t x = tokens[j];
    const float* q = draft_probs + j * V;
    if (u[j] * static_cast<double>(q[x]) < pd[x]) {
      out.child = j;
      return out;
    }
    for (int64_t i = 0; i < V; ++i) r[i] = std::max(pd[i] - static_cast<double>(q[i]), 0.0);
    const double total = at::cpu::sum(blob(r, V, at::kDouble), at::IntArrayRef{0}, false)
                             .item<double>();
    if (total > 0) {
      for (int64_t i = 0; i < V; ++i) r[i] = r[i] / total;
      std::swap(pd, r);
    }
  }
  out.token = pick_row(u[0], pd, V);
  return out;
}

// The tree of one row: children lists (index order) and depth; nodes not reachable from the root
// (padding, or under padding) get depth -1.
struct RowTree {
  std::vector<std::vector<int64_t>> children;
  std::vector<int64_t> depth;
};

RowTree build_tree(const int64_t* parents, int64_t N1) {
  RowTree t;
  t.children.resize(N1);
  t.depth.assign(N1, -1);
  t.depth[0] = 0;
  for (int64_t i = 1; i < N1; ++i) {
    const int64_t pi = parents[i];
    if (pi < 0 || pi >= i || t.depth[pi] < 0) continue;
    t.depth[i] = t.depth[pi] + 1;
    t.children[pi].push_back(i);
  }
  return t;
}

template <typename T>
void verify_impl(const at::Tensor& draft_tokens, const at::Tensor& parents,
                 const at::Tensor& target_logits, const float* draft_probs,
                 const std::vector<double>& uniforms, const Config& cfg, at::Tensor& num_accepted,
                 at::Tensor& accepted_nodes, at::Tensor& next_token) {
  const int64_t B = target_logits.size(0), N1 = target_logits.size(1), V = target_logits.size(2);
  const T* logits = target_logits.data_ptr<T>();
  const int64_t* tokens = draft_tokens.data_ptr<int64_t>();
  const int64_t* par = parents.data_ptr<int64_t>();
  int64_t* out_num = num_accepted.data_ptr<int64_t>();
  int64_t* out_nodes = accepted_nodes.data_ptr<int64_t>();
  int64_t* out_next = next_token.data_ptr<int64_t>();
  const double* u = uniforms.empty() ? nullptr : uniforms.data();
  static const double kZero[1] = {0.0};

  std::vector<RowTree> trees(B);
  for (int64_t b = 0; b < B; ++b) trees[b] = build_tree(par + b * N1, N1);
  // Rows whose uniforms are all in [0, 1) (NaN fails the test); the others are invalid.
  std::vector<uint8_t> u_ok(B, 1);
  for (int64_t b = 0; u && b < B; ++b)
    for (int64_t i = 0; i < N1; ++i)
      if (!(u[b * N1 + i] >= 0.0 && u[b * N1 + i] < 1.0)) u_ok[b] = 0;

  auto compute = [&](int64_t b, int64_t c, Scratch& s) {
    return node_outcome<T>(logits + (b * N1 + c) * V,
                           draft_probs ? draft_probs + b * N1 * V : nullptr, tokens + b * N1,
                           trees[b].children[c], u ? u + b * N1 : kZero, trees[b].depth[c], V,
                           cfg, s);
  };
  auto walk = [&](int64_t b, auto&& outcome_of) {
    int64_t c = 0, n = 0;
    int64_t* path = out_nodes + b * N1;
    path[0] = 0;
    bool invalid = !u_ok[b];
    while (!invalid) {
      const Outcome o = outcome_of(c);
      if (o.child < 0) {
        invalid = o.token < 0;
        out_next[b] = o.token;
        break;
      }
      c = o.child;
      path[++n] = c;
    }
    if (invalid) {  // the sentinel row: nothing accepted, next_token -1
      for (int64_t i = 1; i <= n; ++i) path[i] = -1;
      n = 0;
      out_next[b] = -1;
    }
    out_num[b] = n;
  };

  if (B >= 2 * at::get_num_threads()) {
    // Many rows: walk each row lazily, computing only the nodes on its path.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch s;
      for (int64_t b = begin; b < end; ++b) walk(b, [&](int64_t c) { return compute(b, c, s); });
    });
    return;
  }
  // Few rows: every reachable node in parallel, then the walks.
  std::vector<int64_t> work;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < N1 && u_ok[b]; ++c)
      if (trees[b].depth[c] >= 0) work.push_back(b * N1 + c);
  std::vector<Outcome> results(B * N1);
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t w = begin; w < end; ++w)
      results[work[w]] = compute(work[w] / N1, work[w] % N1, s);
  });
  for (int64_t b = 0; b < B; ++b) walk(b, [&](int64_t c) { return results[b * N1 + c]; });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_tree_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& target_logits,
    const std::optional<at::Tensor>& draft_probs, const std::optional<at::Tensor>& uniforms,
    c10::string_view mode, double temperature, int64_t top_k, double top_p) {
  const VerifyMode m = check_verify_inputs(draft_tokens, parents, target_logits, draft_probs,
                                           uniforms, mode, temperature, top_k, top_p);
  const int64_t B = target_logits.size(0), N1 = target_logits.size(1);
  const auto opts = draft_tokens.options();
  at::Tensor num_accepted = at::zeros({B}, opts);
  at::Tensor accepted_nodes = at::full({B, N1}, -1, opts);
  at::Tensor next_token = at::zeros({B}, opts);
  // Uniforms as float64 (the reference reads them with float()).
  std::vector<double> u;
  if (m != VerifyMode::kGreedy) {
    const at::Tensor ud = uniforms->to(at::kDouble).contiguous();
    u.assign(ud.data_ptr<double>(), ud.data_ptr<double>() + ud.numel());
  }
  const float* q = m == VerifyMode::kRejection ? draft_probs->data_ptr<float>() : nullptr;
  const Config cfg{m, temperature, top_k, top_p};
  if (B == 0) return {num_accepted, accepted_nodes, next_token};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, target_logits.scalar_type(),
                                  "verify_tree_cpu", [&] {
                                    verify_impl<scalar_t>(draft_tokens, parents, target_logits, q,
                                                          u, cfg, num_accepted, accepted_nodes,
                                                          next_token);
                                  });
  return {num_accepted, accepted_nodes, next_token};
}

}  // namespace ptp
