// tree_attention: attention of T new tokens per sequence (a chain or a tree of draft tokens)
// over a static KV cache laid out like transformers' StaticCache.
//
//   query        [B, T, H_q, D]     float32 / float16 / bfloat16, contiguous
//   key_cache    [B, H_kv, S_max, D] same dtype, contiguous; H_q % H_kv == 0 (GQA)
//   value_cache  [B, H_kv, S_max, D] same dtype, contiguous
//   cache_lens   [B]                int32 or int64: tokens committed before the new ones; the new
//                                   tokens' keys/values are already written at
//                                   cache_lens[b] .. cache_lens[b] + T - 1
//   tree_mask    [B, T, T] bool or None: tree_mask[b, i, j] = new token i sees new token j
//                                   (None = causal among the new tokens)
//   scale        softmax scale
// returns
//   out          [B, T, H_q, D]     query's dtype
//   lse          [B, H_q, T]        float32, natural-log log-sum-exp of the scaled scores
//                                   (-inf and out = 0 for a row that sees no key)
//
// Non-finite keys / values: IEEE softmax(mask(q k^T scale)) v over the first cache_lens[b] + T
// positions, like SDPA with a boolean mask and like ptp_ext.reference.tree_attention_ref:
// positions >= cache_lens[b] + T are never read; a masked position's key is never used (score
// -inf, weight 0) but its value enters the sum (0 * inf = NaN); a NaN or +inf visible score makes
// the query row's out and lse NaN; a row whose visible scores are all -inf, or that sees nothing,
// gets out = 0 and lse = -inf.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../common/checks.h"

namespace ptp {

inline void check_tree_attention_inputs(const at::Tensor& query, const at::Tensor& key_cache,
                                        const at::Tensor& value_cache,
                                        const at::Tensor& cache_lens,
                                        const std::optional<at::Tensor>& tree_mask) {
  check_float(query, "query");
  PTP_CHECK(query.dim() == 4, "query must have shape [B, T, H_q, D], got ", describe(query));
  const int64_t B = query.size(0), T = query.size(1), Hq = query.size(2), D = query.size(3);
  PTP_CHECK(key_cache.dim() == 4, "key_cache must have shape [B, H_kv, S_max, D], got ",
            describe(key_cache));
  const int64_t Hkv = key_cache.size(1), S = key_cache.size(2);
  check_shape(key_cache, "key_cache", "[B, H_kv, S_max, D]", {B, -1, -1, D});
  check_shape(value_cache, "value_cache", "[B, H_kv, S_max, D]", {B, Hkv, S, D});
  check_dtype(key_cache, query.scalar_type(), "key_cache");
  check_dtype(value_cache, query.scalar_type(), "value_cache");
  PTP_CHECK(Hkv > 0 && Hq > 0 && Hq % Hkv == 0, "query heads H_q=", Hq,
            " must be a positive multiple of key_cache heads H_kv=", Hkv);
  PTP_CHECK(T >= 1, "query must hold at least one new token (T >= 1), got ", describe(query));
  PTP_CHECK(T <= S, "T=", T, " new tokens do not fit in the cache (S_max=", S, ")");
  PTP_CHECK(D >= 1 && D <= 256, "head dim D must be in [1, 256], got ", D);
  PTP_CHECK(cache_lens.scalar_type() == at::kInt || cache_lens.scalar_type() == at::kLong,
            "cache_lens must be int32 or int64 [B], got ", describe(cache_lens));
  check_shape(cache_lens, "cache_lens", "[B]", {B});
  check_same_device(key_cache, query, "key_cache", "query");
  check_same_device(value_cache, query, "value_cache", "query");
  check_same_device(cache_lens, query, "cache_lens", "query");
  check_contiguous(query, "query");
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
  if (tree_mask.has_value()) {
    const at::Tensor& m = *tree_mask;
    PTP_CHECK(m.scalar_type() == at::kBool && m.dim() == 3 && m.size(0) == B && m.size(1) == T &&
                  m.size(2) == T,
              "tree_mask must be bool [B, T, T] = [", B, ", ", T, ", ", T, "], got ", describe(m));
    check_same_device(m, query, "tree_mask", "query");
    check_contiguous(m, "tree_mask");
  }
  // Values can only be checked without a device sync on the CPU; CUDA kernels clamp instead.
  if (cache_lens.device().is_cpu() && B > 0) {
    const auto lens = cache_lens.to(at::kLong);
    const int64_t lo = lens.min().item<int64_t>(), hi = lens.max().item<int64_t>();
    PTP_CHECK(lo >= 0 && hi + T <= S, "cache_lens must satisfy 0 <= cache_lens[b] and "
              "cache_lens[b] + T <= S_max (T=", T, ", S_max=", S, "), got min ", lo, ", max ", hi);
  }
}

std::tuple<at::Tensor, at::Tensor> tree_attention_cpu(const at::Tensor& query,
                                                      const at::Tensor& key_cache,
                                                      const at::Tensor& value_cache,
                                                      const at::Tensor& cache_lens,
                                                      const std::optional<at::Tensor>& tree_mask,
                                                      double scale);

#ifdef PTP_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> tree_attention_cuda(const at::Tensor& query,
                                                       const at::Tensor& key_cache,
                                                       const at::Tensor& value_cache,
                                                       const at::Tensor& cache_lens,
                                                       const std::optional<at::Tensor>& tree_mask,
                                                       double scale);
#endif

}  // namespace ptp
