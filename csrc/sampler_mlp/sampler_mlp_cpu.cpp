// sampler_mlp on the CPU: x = cat(hidden, embedding[prev_tokens]) -> Linear -> SiLU [-> LayerNorm]
// -> Linear [-> SiLU] [-> LayerNorm]; semantics of ptp_ext.reference.sampler_mlp_ref.
//
// Everything after the gather runs in float32 (x, both Linear outputs, bias, SiLU and LayerNorm
// with ATen's vectorised float32 kernels, in place where possible); only the output is rounded
// to hidden's dtype. The GEMMs:
//   float32 weights   -> at::mm on the weights as they are (BLAS);
//   fp16/bf16 weights, several rows -> one GEMM in the weights' dtype, float32 accumulation;
//   fp16/bf16 weights, one row -> at::parallel_for over tiles of output features: each weight tile is
//                        converted to float32 into a per-thread buffer (it stays in cache) and
//                        multiplied by x with at::mm. The weights are read once, in their own
//                        dtype, and never materialised in float32 as a whole (the reference
//                        converts them entirely on every call).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>

#include <algorithm>

#include "sampler_mlp.h"

namespace ptp {
namespace {

// y [N, M] float32 = x [N, K] float32 @ w [M, K]^T.
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w) {
  if (w.scalar_type() == at::kFloat) return at::mm(x, w.t());
  // Several rows: one multi-threaded low-precision GEMM (oneDNN/BLAS, float32 accumulation)
  // on the weights as stored beats many per-tile GEMMs (nested in parallel_for they run
  // single-threaded): the activations are rounded to the weights' dtype for the product.
  if (x.size(0) >= 2) return at::mm(x.to(w.scalar_type()), w.t()).to(at::kFloat);
  const int64_t N = x.size(0), K = x.size(1), M = w.size(0);
  at::Tensor y = at::empty({N, M}, x.options());
  // Tiles: about two per thread, at least 16 rows, at most ~2 MB of float32 (stays in cache).
  const int64_t threads = at::get_num_threads();
  const int64_t cap = std::max<int64_t>(16, (int64_t{1} << 19) / K);
  const int64_t rows_per_tile =
      std::min(cap, std::max<int64_t>(16, (M + 2 * threads - 1) / (2 * threads)));
  const int64_t tiles = (M + rows_per_tile - 1) / rows_per_tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor buf = at::empty({std::min(rows_per_tile, M), K}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * rows_per_tile, rows = std::min(rows_per_tile, M - m0);
      at::Tensor wt = buf.narrow(0, 0, rows);
      wt.copy_(w.narrow(0, m0, rows));  // vectorised fp16/bf16 -> fp32 (runtime ISA dispatch)
      y.narrow(1, m0, rows).copy_(at::mm(x, wt.t()));
    }
  });
  return y;
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->to(at::kFloat);
}

}  // namespace

at::Tensor sampler_mlp_cpu(const at::Tensor& hidden, const at::Tensor& prev_tokens,
                           const at::Tensor& embedding, const at::Tensor& w1,
                           const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                           const std::optional<at::Tensor>& b2,
                           const std::optional<at::Tensor>& norm1_weight,
                           const std::optional<at::Tensor>& norm1_bias,
                           const std::optional<at::Tensor>& norm2_weight,
                           const std::optional<at::Tensor>& norm2_bias, bool silu_out,
                           double eps) {
  check_sampler_mlp_inputs(hidden, prev_tokens, embedding, w1, b1, w2, b2, norm1_weight,
                           norm1_bias, norm2_weight, norm2_bias);
  const int64_t N = hidden.size(0), dh = hidden.size(1), de = embedding.size(1);
  const int64_t dmid = w1.size(0), dout = w2.size(0);
  if (N == 0) return at::empty({0, dout}, hidden.options());

  // gather + concat, in float32
  at::Tensor x = at::empty({N, dh + de}, hidden.options().dtype(at::kFloat));
  x.narrow(1, 0, dh).copy_(hidden);
  x.narrow(1, dh, de).copy_(embedding.index_select(0, prev_tokens));

  at::Tensor h = linear_f32(x, w1);  // [N, d_mid]
  if (b1.has_value()) h.add_(b1->to(at::kFloat));
  at::silu_(h);
  if (norm1_weight.has_value())
    h = at::layer_norm(h, {dmid}, to_float(norm1_weight), to_float(norm1_bias), eps);

  at::Tensor y = linear_f32(h, w2);  // [N, d_out]
  if (b2.has_value()) y.add_(b2->to(at::kFloat));
  if (silu_out) at::silu_(y);
  if (norm2_weight.has_value())
    y = at::layer_norm(y, {dout}, to_float(norm2_weight), to_float(norm2_bias), eps);
  return y.to(hidden.scalar_type());
}

}  // namespace ptp
