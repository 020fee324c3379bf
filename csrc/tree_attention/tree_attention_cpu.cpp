// tree_attention on the CPU: T new tokens per sequence attend to a StaticCache-layout KV cache
// (prefix < cache_lens[b] visible, tree mask among the new tokens); semantics of
// ptp_ext.reference.tree_attention_ref.
//
// Work split (flash-decoding on the CPU): units = (batch row, KV head, key-range split); a unit
// runs all G * T query rows of its KV head over its key range with an online softmax (the kernel
// in tree_attention_cpu_kernel.h), writing unnormalised partials (acc, max, sum). Key ranges are
// split in fixed 512-position chunks (row invariance, see below).
// A second pass over (batch row, KV head) merges the splits in log-sum-exp fashion and writes
// out [B, T, H_q, D] and lse [B, H_q, T]. The kernel is compiled twice (baseline ISA and
// AVX2 + FMA + F16C) and chosen at run time.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tree_attention.h"
#include "../common/cpu_isa.h"

// The baseline copy of the kernel passes 32-byte vectors between inline helpers only: no ABI
// concern.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ptp {

#include "tree_attention/tree_attention_unit.h"

namespace ta_base {
#include "tree_attention_cpu_kernel.h"
}  // namespace ta_base

#ifdef PTP_HAVE_X86
PTP_AVX2_BEGIN
#define PTP_CPU_AVX2 1
namespace ta_avx2 {
#include "tree_attention_cpu_kernel.h"
}  // namespace ta_avx2
#undef PTP_CPU_AVX2
PTP_AVX2_END
#endif

namespace {

template <typename scalar_t>
void tree_attention_impl(const at::Tensor& query, const at::Tensor& key_cache,
                         const at::Tensor& value_cache, const std::vector<int64_t>& lens,
                         const bool* mask, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = query.size(0), T = query.size(1), Hq = query.size(2), D = query.size(3);
  const int64_t Hkv = key_cache.size(1), S = key_cache.size(2), G = Hq / Hkv;
  const int64_t R = T * G;
  const int64_t Dp = (D + ta_base::kW - 1) / ta_base::kW * ta_base::kW;

  // Splits of the key range per (b, h): fixed chunks of kSplitKeys positions, so a key's split
  // and block depend on its position only, never on T or on the other rows of the batch. A
  // query row then sums the same keys in the same groups whether it came in a 1-token call or
  // as node i of a chain (row invariance: plain and speculative decoding get bitwise the same
  // output for a chain node, whatever the batch). Splits past a row's keys are empty units.
  constexpr int64_t chunk = 512;
  static_assert(chunk % ta_base::kBK == 0, "splits hold whole key blocks");
  int64_t max_keys = 0;
  for (int64_t L : lens) max_keys = std::max(max_keys, L + T);
  const int64_t nsplit = std::max<int64_t>(1, (max_keys + chunk - 1) / chunk);
  const int64_t units = B * Hkv * nsplit;

  std::vector<float> part_acc(static_cast<size_t>(units * R * Dp));
  std::vector<float> part_m(static_cast<size_t>(units * R)), part_l(part_m.size());
  const float scale2 = static_cast<float>(scale * M_LOG2E);
  const scalar_t* qp = query.data_ptr<scalar_t>();
  const scalar_t* kp = key_cache.data_ptr<scalar_t>();
  const scalar_t* vp = value_cache.data_ptr<scalar_t>();
  const bool avx2 = cpu_has_avx2();
  // Each row's visible new tokens, in index order (with a mask). A tree node in topological order
  // sees its ancestors and itself: read at positions L, L + 1, ..., they are exactly the keys
  // plain decoding gives the token at position L + depth, in the same blocks and lanes, so tree
  // nodes get bitwise plain decoding's attention too (not only chain nodes).
  std::vector<int32_t> vis, vis_cnt;
  if (mask) {
    vis.assign(static_cast<size_t>(B * T * T), 0);
    vis_cnt.assign(static_cast<size_t>(B * T), 0);
    for (int64_t bt = 0; bt < B * T; ++bt) {
      int32_t c = 0;
      for (int64_t j = 0; j < T; ++j)
        if (mask[bt * T + j]) vis[bt * T + c++] = static_cast<int32_t>(j);
      vis_cnt[bt] = c;
      for (int64_t j = 0; j < T; ++j)
        if (!mask[bt * T + j]) vis[bt * T + c++] = static_cast<int32_t>(j);
    }
  }

  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> work(static_cast<size_t>(
        ta_base::work_floats(static_cast<int>(R), static_cast<int>(D), static_cast<int>(Dp))));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / nsplit, sp = u % nsplit, b = bh / Hkv, h = bh % Hkv;
      const int64_t n_keys = lens[b] + T;
      UnitArgs a;
      a.L = lens[b];
      a.T = static_cast<int>(T);
      a.G = static_cast<int>(G);
      a.D = static_cast<int>(D);
      a.Dp = static_cast<int>(Dp);
      a.kbeg = std::min(n_keys, sp * chunk);
      a.kend = std::min(n_keys, (sp + 1) * chunk);
      a.q_stride_t = Hq * D;
      a.mask = mask ? mask + b * T * T : nullptr;
      a.vis = mask ? vis.data() + b * T * T : nullptr;
      a.vis_cnt = mask ? vis_cnt.data() + b * T : nullptr;
      a.scale2 = scale2;
      a.acc = part_acc.data() + u * R * Dp;
      a.m = part_m.data() + u * R;
      a.l = part_l.data() + u * R;
      a.work = work.data();
      const scalar_t* q = qp + b * T * Hq * D + h * G * D;
      const scalar_t* k = kp + (b * Hkv + h) * S * D;
      const scalar_t* v = vp + (b * Hkv + h) * S * D;
#ifdef PTP_HAVE_X86
      if (avx2) {
        ta_avx2::attend_unit<scalar_t>(q, k, v, a);
        continue;
      }
#endif
      ta_base::attend_unit<scalar_t>(q, k, v, a);
    }
  });

  // Merge the splits of each (b, h) and write the outputs.
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t bh0, int64_t bh1) {
    std::vector<float> o(static_cast<size_t>(Dp));
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = r / G, hq = h * G + r % G;
        float M = -INFINITY;  // NaN when a split's running max is NaN (a NaN score, see the kernel)
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const float m = part_m[(bh * nsplit + sp) * R + r];
          if (m > M || std::isnan(m)) M = m;
          if (std::isnan(M)) break;
        }
        scalar_t* dst = op + ((b * T + t) * Hq + hq) * D;
        float* lse_dst = lp + (b * Hq + hq) * T + t;
        if (M == -INFINITY) {  // the row sees no key
          std::fill(dst, dst + D, scalar_t(0.f));
          *lse_dst = -INFINITY;
          continue;
        }
        std::fill(o.begin(), o.end(), 0.f);
        float l = 0.f;
        for (int64_t sp = 0; sp < nsplit; ++sp) {
          const int64_t u = bh * nsplit + sp;
          const float m = part_m[u * R + r];
          if (m == -INFINITY) continue;
          const float w = std::exp2(m - M);
          l += w * part_l[u * R + r];
          const float* acc = part_acc.data() + (u * R + r) * Dp;
          for (int64_t d = 0; d < D; ++d) o[d] += w * acc[d];
        }
        const float inv = 1.f / l;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
        *lse_dst = static_cast<float>((M + std::log2(l)) * M_LN2);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& query,
                                                      const at::Tensor& key_cache,
                                                      const at::Tensor& value_cache,
                                                      const at::Tensor& cache_lens,
                                                      const std::optional<at::Tensor>& tree_mask,
                                                      double scale) {
  check_tree_attention_inputs(query, key_cache, value_cache, cache_lens, tree_mask);
  const int64_t B = query.size(0), T = query.size(1), Hq = query.size(2);
  at::Tensor out = at::empty(query.sizes(), query.options());
  at::Tensor lse = at::empty({B, Hq, T}, query.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};
  const at::Tensor lens_t = cache_lens.to(at::kLong).contiguous();
  const std::vector<int64_t> lens(lens_t.data_ptr<int64_t>(), lens_t.data_ptr<int64_t>() + B);
  const bool* mask = tree_mask.has_value() ? tree_mask->data_ptr<bool>() : nullptr;
  switch (query.scalar_type()) {
    case at::kFloat:
      tree_attention_impl<float>(query, key_cache, value_cache, lens, mask, scale, out, lse);
      break;
    case at::kHalf:
      tree_attention_impl<c10::Half>(query, key_cache, value_cache, lens, mask, scale, out, lse);
      break;
    default:  // kBFloat16 (the check admits only these three)
      tree_attention_impl<c10::BFloat16>(query, key_cache, value_cache, lens, mask, scale, out,
                                         lse);
  }
  return {out, lse};
}

}  // namespace ptp
