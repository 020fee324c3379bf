// The whole op surface of ptp_ext in one place: every schema, then the CPU implementations,
// then (when built with CUDA) the CUDA implementations under the same names.
// Python-side fake (meta) implementations live in ptp_ext/ops.py next to each wrapper.
#include <torch/library.h>

#include "decode_step/decode_step.h"
#include "invariant_linear/gated_lora_linear.h"
#include "invariant_linear/invariant_linear.h"
#include "invariant_linear/quant_linear.h"
#include "sampler_mlp/sampler_mlp.h"
#include "tree_attention/tree_attention.h"
#include "verify/verify.h"

TORCH_LIBRARY(ptp_ext, m) {
  // ---- tree attention ------------------------------------------------------------------------
  m.def(
      "tree_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor cache_lens, "
      "Tensor? tree_mask, float scale) -> (Tensor out, Tensor lse)");
  // ---- verify (greedy / coupled / rejection; chains and trees) -------------------------------
  m.def(
      "verify_tree(Tensor draft_tokens, Tensor parents, Tensor target_logits, "
      "Tensor? draft_probs, Tensor? uniforms, str mode, float temperature, int top_k, "
      "float top_p) -> (Tensor num_accepted, Tensor accepted_nodes, Tensor next_token)");
  // ---- sampler-head MLP ----------------------------------------------------------------------
  m.def(
      "sampler_mlp(Tensor hidden, Tensor prev_tokens, Tensor embedding, Tensor w1, Tensor? b1, "
      "Tensor w2, Tensor? b2, Tensor? norm1_weight, Tensor? norm1_bias, Tensor? norm2_weight, "
      "Tensor? norm2_bias, bool silu_out, float eps) -> Tensor");
  // ---- batch-invariant linear (CPU: row-invariant target calls) -----------------------------
  m.def("invariant_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // ---- invariant linear + gated LoRA on a suffix of rows (self-speculative drafters) ---------
  m.def(
      "gated_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, int aux_start) -> Tensor");
  // ---- invariant linear over GGUF-quantised weights (bitwise that of the dequantised ones) --
  m.def("quant_linear(Tensor x, Tensor qweight, str format, Tensor? bias) -> Tensor");
  // ---- quant_linear + gated LoRA on a suffix of rows (drafters over a GGUF target) ----------
  m.def(
      "gated_lora_quant_linear(Tensor x, Tensor qweight, str format, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, float scale, int aux_start) -> Tensor");
  // ---- decode_step: a Llama-family decoding call's whole layer stack (CPU only) --------------
  m.def(
      "decode_step(Tensor hidden, Tensor cos, Tensor sin, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor cache_lens, Tensor? tree_mask, Tensor[] weights, "
      "int[] formats, Tensor?[] biases, Tensor[] norm_weights, Tensor?[] lora_a, Tensor?[] lora_b, "
      "float[] lora_scales, int aux_start, float eps, float scale) -> Tensor");
  // ---- decode_step with its weights handed over once (CPU) ----------------------------------
  m.def(
      "decode_step_pack(Tensor[] weights, int[] formats, Tensor?[] biases, Tensor[] norm_weights, "
      "Tensor?[] lora_a, Tensor?[] lora_b, float[] lora_scales) -> int");
  m.def(
      "decode_step_packed(Tensor hidden, Tensor cos, Tensor sin, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor cache_lens, Tensor? tree_mask, int packed, int aux_start, "
      "float eps, float scale) -> Tensor");
  m.def("decode_step_release(int packed) -> ()");
  m.def(
      "decode_logits_packed(Tensor tokens, Tensor position_ids, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor cache_lens, Tensor? tree_mask, int packed, Tensor embed, "
      "Tensor cos_table, Tensor sin_table, Tensor head_weight, int head_format, Tensor? head_bias, "
      "float eps, float scale) -> Tensor");
  m.def(
      "decode_logits_hidden_packed(Tensor tokens, Tensor position_ids, Tensor(a!)[] key_caches, "
      "Tensor(b!)[] value_caches, Tensor cache_lens, Tensor? tree_mask, int packed, Tensor embed, "
      "Tensor cos_table, Tensor sin_table, Tensor head_weight, int head_format, Tensor? head_bias, "
      "float eps, float scale) -> (Tensor, Tensor)");
  // ---- decode_linear: one linear in decode_step's arithmetic (the decoding LM head; CPU) ----
  m.def("decode_linear(Tensor x, Tensor weight, int format, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(ptp_ext, CPU, m) {
  m.impl("tree_attention", &ptp::tree_attention_cpu);
  m.impl("verify_tree", &ptp::verify_tree_cpu);
  m.impl("sampler_mlp", &ptp::sampler_mlp_cpu);
  m.impl("invariant_linear", &ptp::invariant_linear_cpu);
  m.impl("gated_lora_linear", &ptp::gated_lora_linear_cpu);
  m.impl("quant_linear", &ptp::quant_linear_cpu);
  m.impl("gated_lora_quant_linear", &ptp::gated_lora_quant_linear_cpu);
  m.impl("decode_step", &ptp::decode_step_cpu);  // CPU only (the CUDA entry raises)
  m.impl("decode_linear", &ptp::decode_linear_cpu);
  m.impl("decode_step_pack", &ptp::decode_step_pack_cpu);
  m.impl("decode_step_packed", &ptp::decode_step_packed_cpu);
  m.impl("decode_logits_packed", &ptp::decode_logits_packed_cpu);
  m.impl("decode_logits_hidden_packed", &ptp::decode_logits_hidden_packed_cpu);
}

#ifdef PTP_WITH_CUDA
TORCH_LIBRARY_IMPL(ptp_ext, CUDA, m) {
  m.impl("tree_attention", &ptp::tree_attention_cuda);
  m.impl("verify_tree", &ptp::verify_tree_cuda);
  m.impl("sampler_mlp", &ptp::sampler_mlp_cuda);
  m.impl("invariant_linear", &ptp::invariant_linear_cuda);
  m.impl("gated_lora_linear", &ptp::gated_lora_linear_cuda);
  m.impl("quant_linear", &ptp::quant_linear_cuda);
  m.impl("gated_lora_quant_linear", &ptp::gated_lora_quant_linear_cuda);
  m.impl("decode_step", &ptp::decode_step_cuda);  // a clear "CPU-only" error
  m.impl("decode_linear", &ptp::decode_linear_cuda);
  m.impl("decode_step_pack", &ptp::decode_step_pack_cuda);  // CPU-only: a clear error
  m.impl("decode_step_packed", &ptp::decode_step_packed_cuda);
  m.impl("decode_logits_packed", &ptp::decode_logits_packed_cuda);
  m.impl("decode_logits_hidden_packed", &ptp::decode_logits_hidden_packed_cuda);
}
#endif

// decode_step_release has no tensor argument to dispatch on: one kernel for every backend.
TORCH_LIBRARY_IMPL(ptp_ext, CompositeExplicitAutograd, m) {
  m.impl("decode_step_release", &ptp::decode_step_release_cpu);
}
