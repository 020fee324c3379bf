"""``ptp_ext.ops.decode_step`` (a Llama-family decoding call's whole layer stack in one op) and the
decoder's use of it (``ptp.decode.native``).

Against ``decode_step_ref`` (float tolerance; float32, Q4_1 and Q8_0 weights, biases, GQA, trees,
a gated LoRA on aux rows, batch rows of different lengths); bitwise row invariance (a row's
output in calls of 1, 3 and 9 rows, tree nodes against plain decoding along their path, batch
rows against calls of their own, base rows with and without aux rows); decoding exactness through
the Decoder (plain == lookup chains == random trees == HF greedy; coupled sampling plain == spec,
the PTP drafter's aux rows); each CPU kernel copy (baseline, AVX2, AVX-512); argument checks;
opcheck; SmolLM2 (slow).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ptp_ext import ops
from ptp_ext.reference import decode_linear_ref, decode_step_ref, quantize_ref

from ptp_testing import assert_same_logits, hf_greedy, record_sampling_logits
from test_decoder_exact import RandomTreeDrafter
from ptp.decode.decoder import Decoder, GenerationConfig, tree_mask_and_depth
from ptp.decode.fastpath import fast_forward_for
from ptp.decode.lora import GatedLoRALinear, LoRAConfig
from ptp.decode.native import NativeStep, native_step_for
from ptp.decode.sampling import SamplingConfig
from ptp.drafters import LookupDrafter
from ptp.models import tiny_model

FORMATS = ops.DECODE_STEP_FORMATS


def quantize(w, fmt):
    """float32 weights in decode_step format `fmt` (q4_1_split: q4_1 in ops.q4_1_split's layout)."""
    if fmt == "float32":
        return w
    if fmt == "q4_1_split":
        return ops.q4_1_split(quantize_ref(w, "q4_1"))
    return quantize_ref(w, fmt)
VOCAB = 97


# ---------------------------------------------------------------------------------------------
# Input builder: random tiny Llama weights (every value random: no zeros)
# ---------------------------------------------------------------------------------------------
def make_step(B=2, T=5, H=64, Hq=4, Hkv=2, D=16, I=96, L=2, S=48, fmt="q4_1", bias=False,
              lora=False, lens=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    weights, formats, biases, la, lb, ls = [], [], [], [], [], []
    for _ in range(L):
        for j, (M, K) in enumerate([(Hq * D, H), (Hkv * D, H), (Hkv * D, H), (H, Hq * D), (I, H),
                                    (I, H), (H, I)]):
            w = rnd(M, K, s=K ** -0.5)
            weights.append(quantize(w, fmt))
            formats.append(FORMATS[fmt])
            biases.append(rnd(M, s=0.1) if bias and j < 3 else None)
            if lora:
                la.append(rnd(4, K, s=0.1))
                lb.append(rnd(M, 4, s=0.1))
                ls.append(2.0)
    norms = [1 + 0.1 * rnd(H) for _ in range(2 * L + 1)]
    ang = rnd(B, T, D // 2, s=3.0)
    ang = torch.cat([ang, ang], dim=-1)
    lens = torch.tensor(lens if lens is not None else [7 + 5 * b for b in range(B)])
    keys = [rnd(B, Hkv, S, D) for _ in range(L)]
    values = [rnd(B, Hkv, S, D) for _ in range(L)]
    return dict(hidden=rnd(B, T, H), cos=ang.cos(), sin=ang.sin(), key_caches=keys,
                value_caches=values, cache_lens=lens, tree_mask=None, weights=weights,
                formats=formats, biases=biases, norm_weights=norms, lora_a=la, lora_b=lb,
                lora_scales=ls, aux_start=T, eps=1e-5, scale=D ** -0.5)


def clone_caches(kw):
    out = dict(kw)
    out["key_caches"] = [k.clone() for k in kw["key_caches"]]
    out["value_caches"] = [v.clone() for v in kw["value_caches"]]
    return out


def random_tree_mask(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((B, T), -1, dtype=torch.long)
    for i in range(1, T):
        parents[:, i] = torch.randint(0, i, (B,), generator=g)
    return parents, tree_mask_and_depth(parents)[0]


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["float32", "q4_1", "q8_0", "q4_1_split"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 5), (3, 9)])
@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_matches_reference(fmt, B, T, tree, lora):
    kw = make_step(B=B, T=T, fmt=fmt, bias=fmt == "float32", lora=lora, seed=B * 10 + T)
    if tree:
        kw["tree_mask"] = random_tree_mask(B, T, seed=T)[1]
    if lora:
        kw["aux_start"] = T // 2
    ref_kw = clone_caches(kw)
    out = ops.decode_step(**kw)
    ref = decode_step_ref(**ref_kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for got, exp in zip(kw["key_caches"] + kw["value_caches"], ref_kw["key_caches"] + ref_kw["value_caches"]):
        torch.testing.assert_close(got, exp, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("shape", [dict(H=96, Hq=6, Hkv=6, D=16, I=64),   # MHA, I < H
                                   dict(H=64, Hq=8, Hkv=1, D=8, I=160),   # MQA, small head dim
                                   dict(H=128, Hq=2, Hkv=2, D=64, I=256),
                                   dict(H=160, Hq=4, Hkv=2, D=80, I=96),  # head dim > 64
                                   dict(H=96, Hq=4, Hkv=1, D=40, I=64)])  # D % 16 != 0
def test_matches_reference_over_shapes(shape):
    kw = make_step(B=2, T=4, fmt="q8_0", L=1, S=600, lens=[530, 3], **shape)  # 2 key chunks
    ref_kw = clone_caches(kw)
    torch.testing.assert_close(ops.decode_step(**kw), decode_step_ref(**ref_kw), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tree", [False, True])
def test_many_query_rows_per_kv_head(tree):
    """9 tokens x 8 query heads per KV head = 72 query rows in one attention unit."""
    kw = make_step(B=1, T=9, H=64, Hq=8, Hkv=1, D=8, I=64, fmt="q8_0", seed=9)
    if tree:
        kw["tree_mask"] = random_tree_mask(1, 9, seed=9)[1]
    ref_kw = clone_caches(kw)
    torch.testing.assert_close(ops.decode_step(**kw), decode_step_ref(**ref_kw), atol=2e-5, rtol=2e-5)


def test_blocks_equal_their_float32_weights():
    """A layer gives bitwise the same outputs from its GGUF blocks as from the dequantised float32
    weights (a model copy whose blocks no longer match falls back to float32 without changing a
    token)."""
    from ptp_ext.reference import dequantize_ref

    for fmt in ("q4_1", "q8_0"):
        kw = make_step(B=2, T=6, fmt=fmt, seed=11)
        flat = dict(kw, weights=[dequantize_ref(w, fmt) for w in kw["weights"]],
                    formats=[0] * len(kw["formats"]))
        out = ops.decode_step(**clone_caches(kw))
        assert torch.equal(out, ops.decode_step(**clone_caches(flat))), fmt
        if fmt == "q4_1":  # the same weights with float32 scales split from the nibbles
            split = dict(kw, weights=[ops.q4_1_split(w) for w in kw["weights"]],
                         formats=[FORMATS["q4_1_split"]] * len(kw["formats"]))
            assert torch.equal(out, ops.decode_step(**clone_caches(split)))


def test_q4_1_split_layout_and_errors():
    w = quantize_ref(torch.randn(5, 96, generator=torch.Generator().manual_seed(2)), "q4_1")
    s = ops.q4_1_split(w)
    assert s.shape == (5, 72) and s.dtype == torch.uint8 and s.is_contiguous()
    blocks = w.view(5, 3, 20)
    scales = blocks[..., :4].contiguous().view(torch.float16).float().reshape(5, 6)
    assert torch.equal(s[:, :24].contiguous().view(torch.float32), scales)  # (d, m) of blocks 0-2
    assert torch.equal(s[:, 24:], blocks[..., 4:].reshape(5, 48))  # then their nibble bytes
    for bad in (torch.zeros(5, 41, dtype=torch.uint8), torch.zeros(5, 40), torch.zeros(40, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="Q4_1 blocks"):
            ops.q4_1_split(bad)


_ISA_CHECK = """
import sys
sys.path[:0] = sys.argv[1:]
import test_decode_step as t
for fmt in ("float32", "q4_1", "q8_0", "q4_1_split"):
    t.test_matches_reference(fmt, 3, 9, True, True)
    t.test_matches_reference(fmt, 2, 5, False, False)
t.test_blocks_equal_their_float32_weights()
for fmt in ("float32", "q4_1", "q4_1_split"):
    t.test_chain_rows_equal_plain_decoding(fmt)
t.test_tree_nodes_equal_plain_decoding_along_their_path()
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512vl"])
def test_every_cpu_kernel_copy(isa):
    """Each ISA copy of the step (8-lane kernels, or the 16-lane tiles and attention units; the
    split Q4_1 dequantised per 4-row tile for the 8-lane ones): against the reference, GGUF
    blocks == their float32 weights == the split Q4_1, chains and tree nodes == plain decoding."""
    env = dict(os.environ, PTP_CPU_ISA=isa)
    here = Path(__file__).resolve().parent
    subprocess.run([sys.executable, "-c", _ISA_CHECK, str(here), *sys.path], env=env, check=True,
                   timeout=300)


# ---------------------------------------------------------------------------------------------
# Row invariance (bitwise)
# ---------------------------------------------------------------------------------------------
def _rows(kw, b, t0, t1):
    """kw restricted to batch row b and tokens [t0, t1) (cos / sin / hidden sliced)."""
    out = dict(kw)
    for k in ("hidden", "cos", "sin"):
        out[k] = kw[k][b:b + 1, t0:t1].contiguous()
    out["key_caches"] = [c[b:b + 1].clone() for c in kw["key_caches"]]
    out["value_caches"] = [c[b:b + 1].clone() for c in kw["value_caches"]]
    out["cache_lens"] = kw["cache_lens"][b:b + 1] + t0
    out["tree_mask"] = None
    out["aux_start"] = t1 - t0
    return out


@pytest.mark.parametrize("fmt", ["float32", "q4_1", "q4_1_split"])
def test_chain_rows_equal_plain_decoding(fmt):
    """Node t of a 9-row chain == the t-th of nine 1-row calls, and of three 3-row calls."""
    kw = make_step(B=1, T=9, fmt=fmt, seed=3)
    chain = ops.decode_step(**clone_caches(kw))
    for step in (1, 3):
        state = clone_caches(kw)
        outs = []
        for t0 in range(0, 9, step):
            part = _rows(state, 0, t0, t0 + step)
            part["key_caches"], part["value_caches"] = state["key_caches"], state["value_caches"]
            outs.append(ops.decode_step(**part))
        assert torch.equal(torch.cat(outs, dim=1), chain), step


def test_tree_nodes_equal_plain_decoding_along_their_path():
    kw = make_step(B=1, T=8, fmt="q4_1", seed=4)
    parents, mask = random_tree_mask(1, 8, seed=5)
    kw["tree_mask"] = mask
    tree = ops.decode_step(**clone_caches(kw))
    for node in range(8):
        path = [node]
        while parents[0, path[-1]] >= 0:
            path.append(int(parents[0, path[-1]]))
        path.reverse()
        state = clone_caches(kw)
        for d, n in enumerate(path):  # plain decoding: one call per token of the path
            part = _rows(state, 0, n, n + 1)
            part["key_caches"], part["value_caches"] = state["key_caches"], state["value_caches"]
            part["cache_lens"] = kw["cache_lens"] + d
            out = ops.decode_step(**part)
        assert torch.equal(out[0, 0], tree[0, node]), node


def test_batch_rows_equal_their_own_calls():
    kw = make_step(B=3, T=4, fmt="q8_0", lens=[3, 20, 11], seed=6)
    kw["tree_mask"] = random_tree_mask(3, 4, seed=6)[1]
    full = ops.decode_step(**clone_caches(kw))
    for b in range(3):
        one = _rows(kw, b, 0, 4)
        one["cache_lens"] = kw["cache_lens"][b:b + 1]
        one["tree_mask"] = kw["tree_mask"][b:b + 1].contiguous()
        assert torch.equal(ops.decode_step(**one)[0], full[b]), b


def test_aux_rows_leave_the_base_rows_bitwise():
    """A call with 3 adapter rows after 4 tree rows: the tree rows are bitwise the call without
    them (the aux rows see the tree, the tree rows never see the aux rows)."""
    T, A = 4, 3
    kw = make_step(B=2, T=T + A, fmt="q4_1", lora=True, seed=7)
    _, node_mask = random_tree_mask(2, T, seed=8)
    mask = torch.zeros(2, T + A, T + A, dtype=torch.bool)
    mask[:, :T, :T] = node_mask
    mask[:, T:, :T] = node_mask[:, -1:, :]
    mask[:, T:, T:] = torch.ones(A, A, dtype=torch.bool).tril()
    kw["tree_mask"], kw["aux_start"] = mask, T
    with_aux = ops.decode_step(**clone_caches(kw))
    base = dict(kw)
    for k in ("hidden", "cos", "sin"):
        base[k] = kw[k][:, :T].contiguous()
    base["tree_mask"], base["aux_start"] = node_mask, T
    base["lora_a"], base["lora_b"], base["lora_scales"] = [], [], []
    assert torch.equal(ops.decode_step(**clone_caches(base)), with_aux[:, :T])
    # and the adapter does change the aux rows (vs the same call without it)
    no_lora = dict(kw, lora_a=[], lora_b=[], lora_scales=[])
    assert not torch.equal(ops.decode_step(**clone_caches(no_lora))[:, T:], with_aux[:, T:])


# ---------------------------------------------------------------------------------------------
# Through the decoder
# ---------------------------------------------------------------------------------------------
FAMILIES = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    extra = {"sliding_window": None} if request.param == "mistral" else {}
    return tiny_model(request.param, vocab_size=VOCAB, seed=FAMILIES.index(request.param), **extra)


def _prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in [5, 12, 9][:n]]


def _count_calls(monkeypatch):
    """The (B, T) of the decoding calls through decode_step or its packed forms."""
    calls = []
    for name in ("decode_step", "decode_step_packed", "decode_logits_packed"):
        real = getattr(ops, name)

        def spy(*args, _real=real, **kwargs):
            calls.append(tuple(args[0].shape[:2]))  # (B, T)
            return _real(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    return calls


def test_supported_models_take_the_native_step(model, monkeypatch):
    assert native_step_for(fast_forward_for(model)) is not None
    calls = _count_calls(monkeypatch)
    Decoder(model).generate(_prompts(1), GenerationConfig(max_new_tokens=6))
    assert len(calls) == 5  # every decoding call after the prefill's
    calls.clear()
    Decoder(model).generate(_prompts(1), GenerationConfig(max_new_tokens=6, native_step=False))
    assert calls == []


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_plain_equals_speculative_and_hf(model, batch):
    prompts = _prompts(batch)
    cfg = GenerationConfig(max_new_tokens=32)
    plain_dec = Decoder(model)
    plain_rec = record_sampling_logits(plain_dec)
    plain = [r.new_token_ids for r in plain_dec.generate(prompts, cfg)]
    for drafter in (LookupDrafter(lookup_tokens=6), RandomTreeDrafter(6, seed=1),
                    RandomTreeDrafter(5, seed=2, chain=True)):
        dec = Decoder(model, drafter=drafter)
        rec = record_sampling_logits(dec)
        assert [r.new_token_ids for r in dec.generate(prompts, cfg)] == plain, drafter.name
        assert_same_logits(plain_rec, rec)
    eos = model.generation_config.eos_token_id
    for p, got in zip(prompts, plain):
        assert got == hf_greedy(model, p, 32, eos_token_id=eos)[:len(got)]


def test_sampled_plain_equals_speculative(model):
    prompts = _prompts(2)
    cfg = GenerationConfig(max_new_tokens=32, sampling=SamplingConfig(temperature=0.9, seed=3))
    plain = [r.new_token_ids for r in Decoder(model).generate(prompts, cfg)]
    for drafter in (RandomTreeDrafter(6, seed=4), LookupDrafter(lookup_tokens=4)):
        got = [r.new_token_ids for r in Decoder(model, drafter=drafter).generate(prompts, cfg)]
        assert got == plain, drafter.name


def test_rotary_table_equals_the_rotary_module():
    """NativeStep's rotary table (head_dim a multiple of 32, a static rope type): the rows at any
    positions, table grown or not, equal the model's rotary module bitwise; a dynamic rope type
    runs the module itself; and decoding through the table stays exact (plain == speculative)."""
    model = tiny_model("llama", vocab_size=VOCAB, seed=5, num_attention_heads=2, num_key_value_heads=1)
    fast = fast_forward_for(model)
    step = NativeStep(fast)
    assert fast.layers[0].head_dim == 32 and step._static_rope
    h = torch.zeros(3, 4, 64)
    g = torch.Generator().manual_seed(0)
    for top in (100, 300, 1000, 50):  # the table starts at 256 positions and doubles
        pos = torch.randint(0, top, (3, 4), generator=g)
        cos, sin = step.rotary_at(h, pos)
        want_cos, want_sin = type(fast.rotary).forward(fast.rotary, h, pos)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        assert cos.is_contiguous() and cos.shape == (3, 4, 32)
    assert step._rope_table[1].shape[0] > 512  # grown twice
    fast.rotary.rope_type = "dynamic"
    try:
        assert not NativeStep(fast)._static_rope
    finally:
        fast.rotary.rope_type = "default"
    prompts = _prompts(2)
    cfg = GenerationConfig(max_new_tokens=24)
    plain = [r.new_token_ids for r in Decoder(model).generate(prompts, cfg)]
    for drafter in (LookupDrafter(lookup_tokens=4, row_cost=0), RandomTreeDrafter(5, seed=3)):
        assert [r.new_token_ids for r in Decoder(model, drafter=drafter).generate(prompts, cfg)] == plain


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_ptp_drafter_aux_rows_are_exact(temperature, monkeypatch):
    """The PTP drafter's slot rows run the gated LoRA inside decode_step; its tokens equal plain
    decoding's, with bitwise the same logits behind every token."""
    from ptp.drafters.ptp_drafter import PTPSlotDrafter
    from ptp.drafters.ptp_model import PTPConfig, PTPModel

    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    m = PTPModel(base, PTPConfig(num_slots=3, temperature=temperature, lora=LoRAConfig(rank=4, alpha=8)))
    g = torch.Generator().manual_seed(2)
    for mod in m.modules():
        if isinstance(mod, GatedLoRALinear):
            with torch.no_grad():
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
    m.eval()
    cfg = GenerationConfig(max_new_tokens=32, sampling=SamplingConfig(temperature=temperature, seed=5))
    plain_dec = Decoder(base)
    plain_rec = record_sampling_logits(plain_dec)
    plain = [r.new_token_ids for r in plain_dec.generate(_prompts(2), cfg)]
    calls = _count_calls(monkeypatch)
    dec = Decoder(base, drafter=PTPSlotDrafter(m, num_slots=3))
    rec = record_sampling_logits(dec)
    assert [r.new_token_ids for r in dec.generate(_prompts(2), cfg)] == plain
    assert_same_logits(plain_rec, rec)
    assert calls and all(shape[1] > 1 for shape in calls)  # the slot calls took the op


def test_native_step_switch_errors(model):
    with pytest.raises(ValueError, match="native_step=True needs the fast path"):
        Decoder(model).generate(_prompts(1), GenerationConfig(max_new_tokens=2, native_step=True,
                                                              fast_path=False))
    fast = fast_forward_for(model)
    fast.layers[0].act = torch.tanh
    with pytest.raises(ValueError, match="activation .* is not SiLU"):
        NativeStep(fast)
    assert native_step_for(fast) is None


# ---------------------------------------------------------------------------------------------
# Argument checks, opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (lambda kw: kw.update(hidden=kw["hidden"].double()), "hidden must be Float"),
    (lambda kw: kw.update(hidden=kw["hidden"][:, :, :32].contiguous()), r"weights\[0\] \(layer 0 q_proj\) must have shape"),
    (lambda kw: kw.update(cos=kw["cos"][:, :3].contiguous()), "cos must have shape"),
    (lambda kw: kw.update(weights=kw["weights"][:-1]), "weights must hold 7 tensors per layer"),
    (lambda kw: kw.update(formats=[4] * len(kw["formats"])), r"formats\[0\] must be 0"),
    (lambda kw: kw.update(formats=[3] * len(kw["formats"])),  # q4_1 bytes labelled q4_1_split
     r"weights\[0\] \(layer 0 q_proj\) must have shape \[M, K / 32 \* block_bytes\]"),
    (lambda kw: kw["weights"].__setitem__(3, kw["weights"][3][:, :20].contiguous()),
     r"weights\[3\] \(layer 0 o_proj\) must have shape"),
    (lambda kw: kw.update(cache_lens=torch.tensor([7, 45])), "cache_lens must satisfy"),
    (lambda kw: kw.update(tree_mask=torch.ones(2, 5, 4, dtype=torch.bool)), "tree_mask must be bool"),
    (lambda kw: kw.update(value_caches=kw["value_caches"][:1]), "value_caches must hold 2"),
    (lambda kw: kw.update(lora_a=[None] * 14), "lora_a, lora_b and lora_scales must be empty"),
    (lambda kw: kw.update(aux_start=6), r"aux_start must be in \[0, T\]"),
])
def test_argument_errors(change, match):
    kw = make_step()
    change(kw)
    with pytest.raises(ValueError, match=match):
        ops.decode_step(**kw)


# ---------------------------------------------------------------------------------------------
# decode_step_pack / decode_step_packed / decode_step_release: the weights handed over once
# ---------------------------------------------------------------------------------------------
_STATIC = ("weights", "formats", "biases", "norm_weights", "lora_a", "lora_b", "lora_scales")


def _packed_call(kw, handle):
    return ops.decode_step_packed(kw["hidden"], kw["cos"], kw["sin"], kw["key_caches"], kw["value_caches"],
                                  kw["cache_lens"], kw["tree_mask"], handle, kw["aux_start"], kw["eps"],
                                  kw["scale"])


@pytest.mark.parametrize("fmt", ["float32", "q4_1", "q8_0", "q4_1_split"])
@pytest.mark.parametrize("lora", [False, True])
def test_packed_equals_decode_step(fmt, lora):
    """Bitwise decode_step's output and cache writes, over calls of changing shape (rows, tree,
    cache lengths) with one handle."""
    static = make_step(fmt=fmt, bias=fmt == "float32", lora=lora, seed=99)
    handle = ops.decode_step_pack(*[static[k] for k in _STATIC])
    try:
        for i, (B, T) in enumerate([(1, 1), (2, 5), (3, 9), (1, 1)]):
            kw = make_step(B=B, T=T, fmt=fmt, bias=fmt == "float32", lora=lora, seed=B * 10 + T)
            kw.update({k: static[k] for k in _STATIC})
            if i == 1:
                kw["tree_mask"] = random_tree_mask(B, T, seed=T)[1]
            if lora:
                kw["aux_start"] = T // 2
            ref_kw = clone_caches(kw)
            out = _packed_call(kw, handle)
            assert torch.equal(out, ops.decode_step(**ref_kw)), (B, T)
            for got, exp in zip(kw["key_caches"] + kw["value_caches"], ref_kw["key_caches"] + ref_kw["value_caches"]):
                assert torch.equal(got, exp)
    finally:
        ops.decode_step_release(handle)


def test_packed_checks_and_handles():
    kw = make_step()
    handle = ops.decode_step_pack(*[kw[k] for k in _STATIC])
    # the weights are checked against the call's shapes: a hidden size they do not have
    bad = dict(kw, hidden=kw["hidden"][:, :, :32].contiguous())
    with pytest.raises(ValueError, match=r"weights\[0\] \(layer 0 q_proj\) must have shape"):
        _packed_call(bad, handle)
    # the call's own arguments, at every call (after a successful one too)
    _packed_call(clone_caches(kw), handle)
    with pytest.raises(ValueError, match="cache_lens must satisfy"):
        _packed_call(dict(kw, cache_lens=torch.tensor([7, 45])), handle)
    with pytest.raises(ValueError, match="value_caches must hold 2"):
        _packed_call(dict(kw, value_caches=kw["value_caches"][:1]), handle)
    # a layer count the weights do not have: checked again when the shapes change
    with pytest.raises(ValueError, match="weights must hold 7 tensors per layer"):
        _packed_call(dict(kw, key_caches=kw["key_caches"][:1], value_caches=kw["value_caches"][:1]), handle)
    ops.decode_step_release(handle)
    for call in (lambda: _packed_call(kw, handle), lambda: ops.decode_step_release(handle)):
        with pytest.raises(ValueError, match="handle returned by decode_step_pack and not yet released"):
            call()
    with pytest.raises(ValueError, match="weights must hold 7 tensors per layer"):
        ops.decode_step_pack(kw["weights"][:-1], kw["formats"][:-1], kw["biases"][:-1], kw["norm_weights"])
    with pytest.raises(ValueError, match="formats must hold one code per weight"):
        ops.decode_step_pack(kw["weights"], kw["formats"][:-1], kw["biases"], kw["norm_weights"])


# decode_logits_packed: token ids -> logits in one op (embedding, rotary rows, step, head)
def _logits_inputs(B, T, V=61, P=40, seed=0, tree=False):
    g = torch.Generator().manual_seed(seed)
    kw = make_step(B=B, T=T, seed=seed)
    H, D = kw["hidden"].shape[2], kw["cos"].shape[2]
    ang = torch.randn(P, D // 2, generator=g) * 3
    ang = torch.cat([ang, ang], dim=-1)
    lens = kw["cache_lens"]
    return dict(tokens=torch.randint(0, V, (B, T), generator=g),
                position_ids=lens.view(B, 1) + torch.arange(T), key_caches=kw["key_caches"],
                value_caches=kw["value_caches"], cache_lens=lens,
                tree_mask=random_tree_mask(B, T, seed=seed)[1] if tree else None,
                embed=torch.randn(V, H, generator=g), cos_table=ang.cos(), sin_table=ang.sin(),
                eps=kw["eps"], scale=kw["scale"])


def _logits_call(c, handle, head):
    return ops.decode_logits_packed(c["tokens"], c["position_ids"], c["key_caches"], c["value_caches"],
                                    c["cache_lens"], c["tree_mask"], handle, c["embed"], c["cos_table"],
                                    c["sin_table"], head[0], head[1], head[2], c["eps"], c["scale"])


@pytest.mark.parametrize("fmt", ["float32", "q4_1", "q8_0", "q4_1_split"])
def test_logits_packed_equals_the_separate_ops(fmt):
    """Bitwise decode_linear(decode_step_packed(embed[tokens], cos_table[positions],
    sin_table[positions], ...)) and the same cache writes, over calls of changing shape (rows,
    a tree, batch rows of different lengths) on one handle."""
    static = make_step(fmt=fmt, bias=fmt == "float32", seed=7)
    handle = ops.decode_step_pack(*[static[k] for k in _STATIC])
    w, f, b = _head("q8_0" if fmt == "q4_1_split" else fmt, M=61, K=64, bias=fmt == "float32", seed=3)
    try:
        for i, (B, T) in enumerate([(1, 1), (2, 5), (3, 4)]):
            c = _logits_inputs(B, T, seed=i, tree=i == 1)
            ref = dict(c, key_caches=[k.clone() for k in c["key_caches"]],
                       value_caches=[v.clone() for v in c["value_caches"]])
            got = _logits_call(c, handle, (w, f, b))
            pos = ref["position_ids"]
            hidden = ops.decode_step_packed(ref["embed"][ref["tokens"]], ref["cos_table"][pos],
                                            ref["sin_table"][pos], ref["key_caches"], ref["value_caches"],
                                            ref["cache_lens"], ref["tree_mask"], handle, T, ref["eps"],
                                            ref["scale"])
            assert got.shape == (B, T, 61)
            assert torch.equal(got, ops.decode_linear(hidden, w, f, b)), (B, T)
            for x, y in zip(c["key_caches"] + c["value_caches"], ref["key_caches"] + ref["value_caches"]):
                assert torch.equal(x, y)
    finally:
        ops.decode_step_release(handle)


def test_logits_packed_argument_errors():
    static = make_step(seed=7)
    handle = ops.decode_step_pack(*[static[k] for k in _STATIC])
    head = _head("q8_0", M=61, K=64, seed=3)[:3]
    c = _logits_inputs(2, 3)
    bad_tok = c["tokens"].clone()
    bad_tok[1, 2] = 61
    neg_tok = c["tokens"].clone()
    neg_tok[0, 0] = -1
    far = c["position_ids"].clone()
    far[1, 0] = 40
    cases = [
        (dict(tokens=bad_tok), r"tokens must be ids in \[0, 61\).*got 61 at \[1, 2\]"),
        (dict(tokens=neg_tok), r"tokens must be ids in \[0, 61\).*got -1 at \[0, 0\]"),
        (dict(position_ids=far), r"position_ids must be in \[0, 40\).*got 40 at \[1, 0\]"),
        (dict(tokens=c["tokens"].int()), "tokens must be Long"),
        (dict(position_ids=c["position_ids"][:, :2].contiguous()), "position_ids must have shape"),
        (dict(embed=c["embed"].double()), "embed must be Float"),
        (dict(sin_table=c["sin_table"][:20]), "sin_table must have shape"),
        (dict(embed=c["embed"][:, :32].contiguous()), r"weight must have shape \[M, K / 32 \* 34\] = \[\*, 34\]"),
        (dict(cache_lens=torch.tensor([7, 46])), "cache_lens must satisfy"),
    ]
    before = [k.clone() for k in c["key_caches"]]
    try:
        for change, match in cases:
            with pytest.raises(ValueError, match=match):
                _logits_call(dict(c, **change), handle, head)
        with pytest.raises(ValueError, match="weight must have shape"):
            _logits_call(c, handle, (head[0][:, :-1].contiguous(), head[1], head[2]))
        # every check comes before the step writes the caches
        assert all(torch.equal(x, y) for x, y in zip(c["key_caches"], before))
    finally:
        ops.decode_step_release(handle)
    with pytest.raises(ValueError, match="handle returned by decode_step_pack and not yet released"):
        _logits_call(c, handle, head)


def test_logits_packed_opcheck():
    static = make_step(seed=7)
    handle = ops.decode_step_pack(*[static[k] for k in _STATIC])
    w, f, b = _head("q4_1", M=61, K=64, seed=3)[:3]
    c = _logits_inputs(2, 3)
    args = [c["tokens"], c["position_ids"], c["key_caches"], c["value_caches"], c["cache_lens"], None, handle,
            c["embed"], c["cos_table"], c["sin_table"], w, f, b, c["eps"], c["scale"]]
    try:
        torch.library.opcheck(torch.ops.ptp_ext.decode_logits_packed.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    finally:
        ops.decode_step_release(handle)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_calls_take_one_op_with_the_same_logits(family, monkeypatch):
    """The decoder's adapter-free native calls go from token ids to logits in one op
    (NativeStep.call_logits; head_dim 32: a static rotary table) and record bitwise the logits of
    the separate ops (embedding, decode_step_packed, decode_linear), greedy and sampled, plain and
    speculative."""
    extra = {"sliding_window": None} if family == "mistral" else {}
    model = tiny_model(family, vocab_size=VOCAB, seed=5, num_attention_heads=2, num_key_value_heads=1, **extra)
    used = []
    real = ops.decode_logits_packed
    monkeypatch.setattr(ops, "decode_logits_packed", lambda *a: used.append(1) or real(*a))
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8, seed=4)):
        for drafter in (None, RandomTreeDrafter(5, seed=3)):
            recs = []
            for fused in (True, False):
                if not fused:
                    monkeypatch.setattr(NativeStep, "call_logits", lambda self, *a: None)
                used.clear()
                dec = Decoder(model, drafter=drafter)
                rec = record_sampling_logits(dec)
                out = dec.generate(_prompts(2), GenerationConfig(max_new_tokens=8, sampling=sampling))
                assert bool(used) == fused
                recs.append((rec, [r.new_token_ids for r in out]))
            monkeypatch.undo()
            monkeypatch.setattr(ops, "decode_logits_packed", lambda *a: used.append(1) or real(*a))
            assert recs[0][1] == recs[1][1]
            assert recs[0][0].keys() == recs[1][0].keys()
            for k in recs[0][0]:
                assert torch.equal(recs[0][0][k], recs[1][0][k]), k


def test_native_step_packs_its_weights_once(monkeypatch):
    """A model's adapter-free decoding calls pass one decode_step_pack handle, packed on first use
    and released when its NativeStep is collected."""
    import gc

    model = tiny_model("llama", vocab_size=VOCAB, seed=3)
    packs, released = [], []
    real_pack, real_release = ops.decode_step_pack, ops.decode_step_release
    monkeypatch.setattr(ops, "decode_step_pack", lambda *a: packs.append(real_pack(*a)) or packs[-1])
    monkeypatch.setattr(ops, "decode_step_release", lambda h: released.append(h) or real_release(h))
    calls = _count_calls(monkeypatch)
    for _ in range(2):
        Decoder(model).generate(_prompts(1), GenerationConfig(max_new_tokens=6))
    assert len(packs) == 1 and len(calls) == 10  # one packing for both generations' calls
    step = NativeStep(fast_forward_for(model))
    handle = step.packed_handle()
    assert step.packed_handle() == handle and handle not in packs[:1]
    del step
    gc.collect()
    assert handle in released  # (others: NativeSteps of earlier tests, collected now)
    with pytest.raises(ValueError, match="not yet released"):
        real_release(handle)


def test_opcheck():
    kw = make_step(B=2, T=3, fmt="q4_1", lora=True)
    kw["aux_start"] = 2
    args = [kw[k] for k in ("hidden", "cos", "sin", "key_caches", "value_caches", "cache_lens",
                            "tree_mask", "weights", "formats", "biases", "norm_weights", "lora_a",
                            "lora_b", "lora_scales", "aux_start", "eps", "scale")]
    torch.library.opcheck(torch.ops.ptp_ext.decode_step.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# decode_linear: one linear in the step's arithmetic (the decoding LM head)
# ---------------------------------------------------------------------------------------------
def _head(fmt, M=77, K=96, bias=False, seed=0):  # M odd: 1-feature tiles at a range end
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, K, generator=g) * K ** -0.5
    b = torch.randn(M, generator=g) if bias else None
    return quantize(w, fmt), FORMATS[fmt], b


@pytest.mark.parametrize("fmt", ["float32", "q4_1", "q8_0", "q4_1_split"])
@pytest.mark.parametrize("N", [1, 3, 4, 5, 7, 8, 9, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_matches_reference_and_is_row_invariant(fmt, N, bias):
    w, f, b = _head(fmt, bias=bias, seed=N)
    x = torch.randn(N, 96, generator=torch.Generator().manual_seed(N + 1))
    y = ops.decode_linear(x, w, f, b)
    torch.testing.assert_close(y, decode_linear_ref(x, w, f, b), rtol=1e-4, atol=1e-4)
    for i in range(N):  # each row bitwise its own 1-row call
        assert torch.equal(y[i], ops.decode_linear(x[i:i + 1], w, f, b)[0]), i
    # leading dims are kept; a [B, T, K] input gives the same rows
    y3 = ops.decode_linear(x.view(1, N, 96), w, f, b)
    assert y3.shape == (1, N, w.shape[0]) and torch.equal(y3[0], y)


def test_decode_linear_threads_do_not_change_values():
    w, f, b = _head("q4_1", M=200, K=64)
    x = torch.randn(6, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.decode_linear(x, w, f, b)
        torch.set_num_threads(2)
        assert torch.equal(one, ops.decode_linear(x, w, f, b))
    finally:
        torch.set_num_threads(before)


def test_decode_linear_is_the_native_steps_head(model):
    fast = fast_forward_for(model)
    step = NativeStep(fast)
    h = torch.randn(2, 3, model.config.hidden_size)
    weight, fmt, bias = step.head
    assert torch.equal(step.logits(h), ops.decode_linear(h, weight, fmt, bias))
    torch.testing.assert_close(step.logits(h), model.get_output_embeddings()(h), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 64).double(), torch.randn(5, 64), 0), "x must be Float"),
    ((torch.randn(2, 64), torch.randn(5, 63), 0), r"weight must have shape \[M, K\]"),
    ((torch.randn(2, 64), torch.zeros(5, 41, dtype=torch.uint8), 1), r"must have shape \[M, K / 32 \* 20\]"),
    ((torch.randn(2, 48), torch.zeros(5, 30, dtype=torch.uint8), 1), "K a multiple of 32"),
    ((torch.randn(2, 64), torch.randn(5, 64), 4), "format must be 0"),
    ((torch.randn(2, 64), torch.zeros(5, 40, dtype=torch.uint8), 3), r"must have shape \[M, K / 32 \* 24\]"),
    ((torch.randn(2, 64), torch.randn(5, 64), 1), "weight must be Byte"),
])
def test_decode_linear_argument_errors(args, match):
    with pytest.raises(ValueError, match=match):
        ops.decode_linear(*args)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.decode_linear(torch.randn(2, 64), torch.randn(5, 64), 0, torch.randn(4))


def test_decode_linear_opcheck():
    w, f, b = _head("q8_0", bias=True)
    torch.library.opcheck(torch.ops.ptp_ext.decode_linear.default, (torch.randn(3, 96), w, f, b),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# SmolLM2 (slow)
# ---------------------------------------------------------------------------------------------
def test_huge_page_copies():
    from ptp.decode.native import huge_page_copies

    ts = [torch.randint(0, 255, (1000, 40), dtype=torch.uint8), torch.randn(7, 5), torch.randn(3)]
    mapping, copies = huge_page_copies(ts)
    for t, c in zip(ts, copies):
        assert torch.equal(t, c) and c.dtype == t.dtype and c.data_ptr() % 64 == 0
    if mapping is not None:
        assert copies[0].data_ptr() % (2 << 20) == 0
        assert len({c.data_ptr() for c in copies}) == 3
    assert huge_page_copies([]) == (None, [])


def test_native_step_is_packed_once(model, monkeypatch):
    """The decoder builds a FastForward and asks for the native step at every generate: one
    packing per model (the same object), rebuilt when the thread count crosses the split
    policy's bound."""
    import ptp.decode.native as native

    fast = fast_forward_for(model)
    step = native_step_for(fast)
    assert native_step_for(fast) is step and native_step_for(fast_forward_for(model)) is step
    monkeypatch.setattr(native, "SPLIT_Q4_1_MAX_THREADS", torch.get_num_threads() - 1)
    assert native_step_for(fast) is not step


@pytest.mark.slow
def test_smollm2_native_packings_agree(monkeypatch):
    """Q4_1 re-laid with float32 scales (few threads) or kept as GGUF blocks, in huge-page copies
    or not: bitwise the same logits, the same tokens."""
    from ptp.train.models import smollm2_available

    if not smollm2_available():
        pytest.skip("SmolLM2 not cached")
    import ptp.decode.native as native
    from ptp.decode.cache import RowCache
    from ptp.models import load_target

    model, tok = load_target("smollm2")
    fast = fast_forward_for(model)
    packings = [NativeStep(fast, split_q4_1=True), NativeStep(fast, split_q4_1=False, huge_pages=False)]
    assert 3 in packings[0].formats and 3 not in packings[1].formats and 1 in packings[1].formats
    cfg = model.config
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(0)
    logits = []
    for step in packings:
        cache = RowCache(L, 1, 64)
        for layer in cache.layers:
            layer.lazy_initialization(torch.zeros(1, Hkv, 1, D), torch.zeros(1, Hkv, 1, D))
            layer.keys.normal_(generator=torch.Generator().manual_seed(1))
            layer.values.normal_(generator=torch.Generator().manual_seed(2))
        lens = torch.tensor([40])
        ids = torch.randint(0, cfg.vocab_size, (1, 3), generator=torch.Generator().manual_seed(3))
        cache.set_write_positions(lens, [40], 3)
        with torch.inference_mode():
            h = step(fast.embed(ids), lens.view(1, 1) + torch.arange(3), cache, lens, None)
            logits.append(step.logits(h))
    assert torch.equal(logits[0], logits[1])
    prompt = Decoder(model, tok).encode("Name three rivers in Europe.")
    gen = GenerationConfig(max_new_tokens=24, eos_token_ids=())
    split = Decoder(model, drafter=LookupDrafter()).generate(prompt, gen).new_token_ids
    monkeypatch.setattr(native, "SPLIT_Q4_1_MAX_THREADS", 0)
    assert Decoder(model, drafter=LookupDrafter()).generate(prompt, gen).new_token_ids == split


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_and_speculative():
    from ptp.train.models import smollm2_available

    if not smollm2_available():
        pytest.skip("SmolLM2 not cached")
    from ptp.models import load_target
    from ptp.decode.quant import quantized_weights

    model, tok = load_target("smollm2")
    assert len(quantized_weights(model)) > 0  # the GGUF blocks are attached: decode_step reads them
    prompt = Decoder(model, tok).encode("Name three rivers in Europe.")  # chat template
    cfg = GenerationConfig(max_new_tokens=40, eos_token_ids=())
    plain = Decoder(model).generate(prompt, cfg).new_token_ids
    assert plain == hf_greedy(model, prompt, 40)
    spec = Decoder(model, drafter=LookupDrafter()).generate(prompt, cfg).new_token_ids
    tree = Decoder(model, drafter=RandomTreeDrafter(6, seed=1)).generate(prompt, cfg).new_token_ids
    assert spec == plain and tree == plain
