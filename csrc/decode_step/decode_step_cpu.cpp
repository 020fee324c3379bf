// decode_step on the CPU: semantics in decode_step.h, reference ptp_ext.reference.decode_step_ref.
//
// The step body (decode_step_cpu_kernel.h) is compiled three times, like invariant_linear's
// kernel: baseline ISA, AVX2 + FMA + F16C, and the same 8-lane code with AVX-512VL's 32 registers
// (taller register tiles); each copy holds its own copies of invariant_linear's and
// tree_attention's inner kernels (static inline functions in headers), so the projections and
// the attention are computed by exactly the code of those ops, without a dispatcher call or a
// thread-pool fork/join per op.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <type_traits>
#include <vector>

#include "decode_step.h"
#include "../common/cpu_isa.h"

#pragma GCC diagnostic ignored "-Wpsabi"

namespace ptp {
namespace ds {

// The step's team (one thread when built without OpenMP: the pragmas are then ignored).
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}
inline int team_rank() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

#include "tree_attention/tree_attention_unit.h"

// One projection: float32 [M, K] (format 0) or GGUF blocks (1 q4_1, 2 q8_0; row_bytes per row).
struct LinearW {
  const void* w = nullptr;
  int64_t format = 0, M = 0, K = 0, row_bytes = 0;
  const float* bias = nullptr;
  const float* lora_a = nullptr;  // [rank, K] or null
  const float* lora_b = nullptr;  // [M, rank]
  int64_t rank = 0;
  float lora_scale = 0.f;
};

struct LayerW {
  LinearW lin[7];  // q, k, v, o, gate, up, down
  const float* ln1;
  const float* ln2;
  float* key_cache;    // [B, H_kv, S, D]
  float* value_cache;
};

struct StepArgs {
  int64_t B, T, H, Hq, Hkv, D, I, S, num_layers, aux_start;
  float eps;
  double scale;
  const float* cos;
  const float* sin;
  const int64_t* lens;
  const bool* mask;
  const LayerW* layers;
  const float* final_norm;
  float* h;    // [B * T, H] the residual stream (in place)
  float* out;  // [B * T, H]
  int num_threads;
};

namespace ds_base {
namespace il {
#include "../invariant_linear/invariant_linear_cpu_kernel.h"
}  // namespace il
namespace ta {
#include "../tree_attention/tree_attention_cpu_kernel.h"
}  // namespace ta
#include "decode_step_cpu_kernel.h"
}  // namespace ds_base

#ifdef PTP_HAVE_X86
PTP_AVX2_BEGIN
#define PTP_CPU_AVX2 1
namespace ds_avx2 {
namespace il {
#include "../invariant_linear/invariant_linear_cpu_kernel.h"
}  // namespace il
namespace ta {
#include "../tree_attention/tree_attention_cpu_kernel.h"
}  // namespace ta
#include "decode_step_cpu_kernel.h"
}  // namespace ds_avx2
#undef PTP_CPU_AVX2
PTP_AVX2_END

PTP_AVX512VL_BEGIN
#define PTP_CPU_AVX2 1
namespace ds_avx512 {
namespace il {
#define PTP_IL_MAX_TILE 6
#include "../invariant_linear/invariant_linear_cpu_kernel.h"
}  // namespace il
namespace ta {
#include "../tree_attention/tree_attention_cpu_kernel.h"
}  // namespace ta
#define PTP_DS_ZMM 1
#include "decode_step_cpu_kernel.h"
#undef PTP_DS_ZMM
}  // namespace ds_avx512
#undef PTP_CPU_AVX2
PTP_AVX512VL_END
#endif

}  // namespace ds

// decode_step's body after the checks (decode_step_cpu, decode_step_packed_cpu)
static at::Tensor run_decode_step(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                  at::TensorList key_caches, at::TensorList value_caches,
                                  const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                                  at::TensorList weights, at::IntArrayRef formats,
                                  const c10::List<std::optional<at::Tensor>>& biases,
                                  at::TensorList norm_weights,
                                  const c10::List<std::optional<at::Tensor>>& lora_a,
                                  const c10::List<std::optional<at::Tensor>>& lora_b,
                                  at::ArrayRef<double> lora_scales, int64_t aux_start, double eps,
                                  double scale) {
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  const int64_t L = static_cast<int64_t>(key_caches.size()), D = cos.size(2);
  at::Tensor out = at::empty_like(hidden);
  if (B == 0) return out;
  at::Tensor h = hidden.clone();  // the residual stream
  const at::Tensor lens_t = cache_lens.to(at::kLong).contiguous();
  const bool lora = lora_a.size() > 0;
  std::vector<ds::LayerW> layers(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    ds::LayerW& Lw = layers[l];
    for (int64_t j = 0; j < kDecodeStepLinears; ++j) {
      const int64_t i = l * kDecodeStepLinears + j;
      const at::Tensor& w = weights[i];
      ds::LinearW& lw = Lw.lin[j];
      lw.w = w.data_ptr();
      lw.format = formats[i];
      lw.M = w.size(0);
      lw.K = formats[i] == 0 ? w.size(1) : w.size(1) / decode_step_block_bytes(formats[i]) * 32;
      lw.row_bytes = w.size(1);
      const std::optional<at::Tensor> bias = biases[i];
      lw.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
      if (lora) {
        const std::optional<at::Tensor> a = lora_a[i], b = lora_b[i];
        if (a.has_value()) {
          lw.lora_a = a->data_ptr<float>();
          lw.lora_b = b->data_ptr<float>();
          lw.rank = a->size(0);
          lw.lora_scale = static_cast<float>(lora_scales[i]);
        }
      }
    }
    Lw.ln1 = norm_weights[2 * l].data_ptr<float>();
    Lw.ln2 = norm_weights[2 * l + 1].data_ptr<float>();
    Lw.key_cache = key_caches[l].data_ptr<float>();
    Lw.value_cache = value_caches[l].data_ptr<float>();
  }
  ds::StepArgs a;
  a.B = B;
  a.T = T;
  a.H = H;
  a.D = D;
  a.Hq = weights[0].size(0) / D;
  a.Hkv = key_caches[0].size(1);
  a.I = weights[4].size(0);
  a.S = key_caches[0].size(2);
  a.num_layers = L;
  a.aux_start = lora ? aux_start : T;
  a.eps = static_cast<float>(eps);
  a.scale = scale;
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.lens = lens_t.data_ptr<int64_t>();
  a.mask = tree_mask.has_value() ? tree_mask->data_ptr<bool>() : nullptr;
  a.layers = layers.data();
  a.final_norm = norm_weights[2 * L].data_ptr<float>();
  a.h = h.data_ptr<float>();
  a.out = out.data_ptr<float>();
  // nested in another parallel region (e.g. at::parallel_for): one thread
  a.num_threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
#ifdef PTP_HAVE_X86
  if (cpu_has_avx512vl()) {
    ds::ds_avx512::run_step(a);
    return out;
  }
  if (cpu_has_avx2()) {
    ds::ds_avx2::run_step(a);
    return out;
  }
#endif
  ds::ds_base::run_step(a);
  return out;
}

at::Tensor decode_step_cpu(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                           at::TensorList key_caches, at::TensorList value_caches,
                           const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                           at::TensorList weights, at::IntArrayRef formats,
                           const c10::List<std::optional<at::Tensor>>& biases,
                           at::TensorList norm_weights,
                           const c10::List<std::optional<at::Tensor>>& lora_a,
                           const c10::List<std::optional<at::Tensor>>& lora_b,
                           at::ArrayRef<double> lora_scales, int64_t aux_start, double eps,
                           double scale) {
  check_decode_step_inputs(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask,
                           weights, formats, biases, norm_weights, lora_a, lora_b, lora_scales,
                           aux_start);
  return run_decode_step(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask, weights,
                         formats, biases, norm_weights, lora_a, lora_b, lora_scales, aux_start, eps,
                         scale);
}

namespace {

// One packing of decode_step's static arguments (decode_step_pack).
struct DecodeStepPack {
  std::vector<at::Tensor> weights, norm_weights;
  std::vector<int64_t> formats;
  c10::List<std::optional<at::Tensor>> biases, lora_a, lora_b;
  std::vector<double> lora_scales;
  // the call shapes (H, D, L, H_kv) the weights were last checked against
  std::mutex mu;
  int64_t checked[4] = {-1, -1, -1, -1};
};

std::mutex g_packs_mu;
std::unordered_map<int64_t, std::shared_ptr<DecodeStepPack>> g_packs;
int64_t g_next_pack = 1;

std::shared_ptr<DecodeStepPack> find_pack(int64_t packed) {
  std::lock_guard<std::mutex> lock(g_packs_mu);
  const auto it = g_packs.find(packed);
  PTP_CHECK(it != g_packs.end(), "packed must be a handle returned by decode_step_pack and not yet "
            "released, got ", packed);
  return it->second;
}

}  // namespace

int64_t decode_step_pack_cpu(at::TensorList weights, at::IntArrayRef formats,
                             const c10::List<std::optional<at::Tensor>>& biases, at::TensorList norm_weights,
                             const c10::List<std::optional<at::Tensor>>& lora_a,
                             const c10::List<std::optional<at::Tensor>>& lora_b,
                             at::ArrayRef<double> lora_scales) {
  // the weights are checked against the first call's shapes (decode_step_packed); here only what
  // needs none
  const int64_t n = static_cast<int64_t>(weights.size());
  PTP_CHECK(n >= kDecodeStepLinears && n % kDecodeStepLinears == 0, "weights must hold 7 tensors per "
            "layer (q, k, v, o, gate, up, down), got ", n);
  PTP_CHECK(static_cast<int64_t>(formats.size()) == n, "formats must hold one code per weight (", n,
            "), got ", formats.size());
  auto pk = std::make_shared<DecodeStepPack>();
  pk->weights.assign(weights.begin(), weights.end());
  pk->norm_weights.assign(norm_weights.begin(), norm_weights.end());
  pk->formats.assign(formats.begin(), formats.end());
  pk->biases = biases.copy();
  pk->lora_a = lora_a.copy();
  pk->lora_b = lora_b.copy();
  pk->lora_scales.assign(lora_scales.begin(), lora_scales.end());
  std::lock_guard<std::mutex> lock(g_packs_mu);
  const int64_t handle = g_next_pack++;
  g_packs.emplace(handle, std::move(pk));
  return handle;
}

void decode_step_release_cpu(int64_t packed) {
  std::lock_guard<std::mutex> lock(g_packs_mu);
  PTP_CHECK(g_packs.erase(packed) == 1, "packed must be a handle returned by decode_step_pack and "
            "not yet released, got ", packed);
}

at::Tensor decode_step_packed_cpu(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                  at::TensorList key_caches, at::TensorList value_caches,
                                  const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                                  int64_t packed, int64_t aux_start, double eps, double scale) {
  const std::shared_ptr<DecodeStepPack> pk = find_pack(packed);
  check_decode_step_call(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask, aux_start);
  {
    const int64_t shapes[4] = {hidden.size(2), cos.size(2), static_cast<int64_t>(key_caches.size()),
                               key_caches[0].size(1)};
    std::lock_guard<std::mutex> lock(pk->mu);
    if (!std::equal(shapes, shapes + 4, pk->checked)) {
      check_decode_step_weights(hidden, cos, key_caches, pk->weights, pk->formats, pk->biases,
                                pk->norm_weights, pk->lora_a, pk->lora_b, pk->lora_scales);
      std::copy(shapes, shapes + 4, pk->checked);
    }
  }
  return run_decode_step(hidden, cos, sin, key_caches, value_caches, cache_lens, tree_mask, pk->weights,
                         pk->formats, pk->biases, pk->norm_weights, pk->lora_a, pk->lora_b,
                         pk->lora_scales, aux_start, eps, scale);
}

// decode_linear's body after the checks (decode_linear_cpu, decode_logits_packed_cpu)
static at::Tensor run_decode_linear(const at::Tensor& x, const at::Tensor& weight, int64_t format,
                                    const std::optional<at::Tensor>& bias) {
  const int64_t K = x.size(-1), M = weight.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = M;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t N = x.numel() / std::max<int64_t>(K, 1);
  if (N == 0 || M == 0) return y;
  if (K == 0) return bias.has_value() ? y.copy_(bias->expand_as(y)) : y.zero_();
  ds::LinearW w;
  w.w = weight.data_ptr();
  w.format = format;
  w.M = M;
  w.K = K;
  w.row_bytes = weight.size(1);
  w.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int P = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#ifdef PTP_HAVE_X86
  if (cpu_has_avx512vl()) {
    ds::ds_avx512::run_linear(w, xp, N, yp, P);
    return y;
  }
  if (cpu_has_avx2()) {
    ds::ds_avx2::run_linear(w, xp, N, yp, P);
    return y;
  }
#endif
  ds::ds_base::run_linear(w, xp, N, yp, P);
  return y;
}

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t format,
                             const std::optional<at::Tensor>& bias) {
  check_decode_linear_inputs(x, weight, format, bias);
  return run_decode_linear(x, weight, format, bias);
}

// decode_logits_packed's body: the logits and the step's output (the final-normed hidden states)
static std::tuple<at::Tensor, at::Tensor> decode_logits_impl(
    const at::Tensor& tokens, const at::Tensor& position_ids, at::TensorList key_caches,
    at::TensorList value_caches, const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
    int64_t packed, const at::Tensor& embed, const at::Tensor& cos_table, const at::Tensor& sin_table,
    const at::Tensor& head_weight, int64_t head_format, const std::optional<at::Tensor>& head_bias,
    double eps, double scale) {
  check_decode_logits_inputs(tokens, position_ids, embed, cos_table, sin_table);
  const int64_t B = tokens.size(0), T = tokens.size(1), V = embed.size(0), H = embed.size(1);
  const int64_t P = cos_table.size(0), D = cos_table.size(1);
  at::Tensor hidden = at::empty({B, T, H}, embed.options());
  at::Tensor cos = at::empty({B, T, D}, cos_table.options());
  at::Tensor sin = at::empty({B, T, D}, cos_table.options());
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* pos = position_ids.data_ptr<int64_t>();
  const float* ep = embed.data_ptr<float>();
  const float* ct = cos_table.data_ptr<float>();
  const float* st = sin_table.data_ptr<float>();
  float* hp = hidden.data_ptr<float>();
  float* cp = cos.data_ptr<float>();
  float* sp = sin.data_ptr<float>();
  for (int64_t i = 0; i < B * T; ++i) {
    PTP_CHECK(tok[i] >= 0 && tok[i] < V, "tokens must be ids in [0, ", V, ") (embed's rows), got ",
              tok[i], " at [", i / T, ", ", i % T, "]");
    PTP_CHECK(pos[i] >= 0 && pos[i] < P, "position_ids must be in [0, ", P, ") (the rotary tables' rows), got ",
              pos[i], " at [", i / T, ", ", i % T, "]");
    std::memcpy(hp + i * H, ep + tok[i] * H, static_cast<size_t>(H) * sizeof(float));
    std::memcpy(cp + i * D, ct + pos[i] * D, static_cast<size_t>(D) * sizeof(float));
    std::memcpy(sp + i * D, st + pos[i] * D, static_cast<size_t>(D) * sizeof(float));
  }
  // the head's arguments against its input ([B, T, H]) before the step writes the caches
  check_decode_linear_inputs(hidden, head_weight, head_format, head_bias);
  at::Tensor out = decode_step_packed_cpu(hidden, cos, sin, key_caches, value_caches, cache_lens,
                                          tree_mask, packed, T, eps, scale);
  at::Tensor logits = run_decode_linear(out, head_weight, head_format, head_bias);  // checked above
  return {std::move(logits), std::move(out)};
}

at::Tensor decode_logits_packed_cpu(const at::Tensor& tokens, const at::Tensor& position_ids,
                                    at::TensorList key_caches, at::TensorList value_caches,
                                    const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
                                    int64_t packed, const at::Tensor& embed, const at::Tensor& cos_table,
                                    const at::Tensor& sin_table, const at::Tensor& head_weight,
                                    int64_t head_format, const std::optional<at::Tensor>& head_bias,
                                    double eps, double scale) {
  return std::get<0>(decode_logits_impl(tokens, position_ids, key_caches, value_caches, cache_lens, tree_mask,
                                        packed, embed, cos_table, sin_table, head_weight, head_format,
                                        head_bias, eps, scale));
}

std::tuple<at::Tensor, at::Tensor> decode_logits_hidden_packed_cpu(
    const at::Tensor& tokens, const at::Tensor& position_ids, at::TensorList key_caches,
    at::TensorList value_caches, const at::Tensor& cache_lens, const std::optional<at::Tensor>& tree_mask,
    int64_t packed, const at::Tensor& embed, const at::Tensor& cos_table, const at::Tensor& sin_table,
    const at::Tensor& head_weight, int64_t head_format, const std::optional<at::Tensor>& head_bias,
    double eps, double scale) {
  return decode_logits_impl(tokens, position_ids, key_caches, value_caches, cache_lens, tree_mask, packed,
                            embed, cos_table, sin_table, head_weight, head_format, head_bias, eps, scale);
}

#ifdef PTP_WITH_CUDA
at::Tensor decode_linear_cuda(const at::Tensor& x, const at::Tensor&, int64_t,
                              const std::optional<at::Tensor>&) {
  PTP_CHECK(false, "decode_linear is CPU-only (it is decode_step's arithmetic), got x ", describe(x));
  return at::Tensor();
}

int64_t decode_step_pack_cuda(at::TensorList weights, at::IntArrayRef, const c10::List<std::optional<at::Tensor>>&,
                              at::TensorList, const c10::List<std::optional<at::Tensor>>&,
                              const c10::List<std::optional<at::Tensor>>&, at::ArrayRef<double>) {
  PTP_CHECK(false, "decode_step_pack is CPU-only (decode_step's weights), got weights[0] ", describe(weights[0]));
  return 0;
}

at::Tensor decode_step_packed_cuda(const at::Tensor& hidden, const at::Tensor&, const at::Tensor&,
                                   at::TensorList, at::TensorList, const at::Tensor&,
                                   const std::optional<at::Tensor>&, int64_t, int64_t, double, double) {
  PTP_CHECK(false, "decode_step_packed is CPU-only, got hidden ", describe(hidden));
  return at::Tensor();
}

at::Tensor decode_logits_packed_cuda(const at::Tensor& tokens, const at::Tensor&, at::TensorList,
                                     at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
                                     int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, int64_t, const std::optional<at::Tensor>&, double,
                                     double) {
  PTP_CHECK(false, "decode_logits_packed is CPU-only, got tokens ", describe(tokens));
  return at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> decode_logits_hidden_packed_cuda(
    const at::Tensor& tokens, const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
    const std::optional<at::Tensor>&, int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, int64_t, const std::optional<at::Tensor>&, double, double) {
  PTP_CHECK(false, "decode_logits_hidden_packed is CPU-only, got tokens ", describe(tokens));
  return {};
}

// Registered for CUDA only so that a CUDA tensor gets this message instead of the dispatcher's.
at::Tensor decode_step_cuda(const at::Tensor& hidden, const at::Tensor&, const at::Tensor&,
                            at::TensorList, at::TensorList, const at::Tensor&,
                            const std::optional<at::Tensor>&, at::TensorList, at::IntArrayRef,
                            const c10::List<std::optional<at::Tensor>>&, at::TensorList,
                            const c10::List<std::optional<at::Tensor>>&,
                            const c10::List<std::optional<at::Tensor>>&, at::ArrayRef<double>,
                            int64_t, double, double) {
  PTP_CHECK(false, "decode_step is CPU-only (GPU decoding calls take ptp.decode.fastpath with CUDA "
            "graphs), got hidden ", describe(hidden));
  return at::Tensor();
}
#endif

}  // namespace ptp
