"""The op surface of ptp_ext: the ops registered under torch.ops.ptp_ext with the contract's
schemas (csrc/registration.cpp), a kernel per dispatch key consistent with ptp_ext.with_cuda(),
fake implementations that trace under FakeTensorMode, and a documented public wrapper per op."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ptp_ext

SCHEMAS = {
    "tree_attention": (
        "ptp_ext::tree_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
        "Tensor cache_lens, Tensor? tree_mask, float scale) -> (Tensor out, Tensor lse)"
    ),
    "verify_tree": (
        "ptp_ext::verify_tree(Tensor draft_tokens, Tensor parents, Tensor target_logits, "
        "Tensor? draft_probs, Tensor? uniforms, str mode, float temperature, int top_k, "
        "float top_p) -> (Tensor num_accepted, Tensor accepted_nodes, Tensor next_token)"
    ),
    "sampler_mlp": (
        "ptp_ext::sampler_mlp(Tensor hidden, Tensor prev_tokens, Tensor embedding, Tensor w1, "
        "Tensor? b1, Tensor w2, Tensor? b2, Tensor? norm1_weight, Tensor? norm1_bias, "
        "Tensor? norm2_weight, Tensor? norm2_bias, bool silu_out, float eps) -> Tensor"
    ),
    "invariant_linear": "ptp_ext::invariant_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "gated_lora_linear": (
        "ptp_ext::gated_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "Tensor lora_b, float scale, int aux_start) -> Tensor"
    ),
    "quant_linear": "ptp_ext::quant_linear(Tensor x, Tensor qweight, str format, Tensor? bias) -> Tensor",
    "gated_lora_quant_linear": (
        "ptp_ext::gated_lora_quant_linear(Tensor x, Tensor qweight, str format, Tensor? bias, "
        "Tensor lora_a, Tensor lora_b, float scale, int aux_start) -> Tensor"
    ),
    "decode_step": (
        "ptp_ext::decode_step(Tensor hidden, Tensor cos, Tensor sin, Tensor(a!)[] key_caches, "
        "Tensor(b!)[] value_caches, Tensor cache_lens, Tensor? tree_mask, Tensor[] weights, "
        "int[] formats, Tensor?[] biases, Tensor[] norm_weights, Tensor?[] lora_a, Tensor?[] lora_b, "
        "float[] lora_scales, int aux_start, float eps, float scale) -> Tensor"
    ),
    "decode_linear": "ptp_ext::decode_linear(Tensor x, Tensor weight, int format, Tensor? bias) -> Tensor",
    "decode_step_pack": (
        "ptp_ext::decode_step_pack(Tensor[] weights, int[] formats, Tensor?[] biases, Tensor[] norm_weights, "
        "Tensor?[] lora_a, Tensor?[] lora_b, float[] lora_scales) -> int"
    ),
    "decode_step_packed": (
        "ptp_ext::decode_step_packed(Tensor hidden, Tensor cos, Tensor sin, Tensor(a!)[] key_caches, "
        "Tensor(b!)[] value_caches, Tensor cache_lens, Tensor? tree_mask, int packed, int aux_start, "
        "float eps, float scale) -> Tensor"
    ),
    "decode_step_release": "ptp_ext::decode_step_release(int packed) -> ()",
    "decode_logits_packed": (
        "ptp_ext::decode_logits_packed(Tensor tokens, Tensor position_ids, Tensor(a!)[] key_caches, "
        "Tensor(b!)[] value_caches, Tensor cache_lens, Tensor? tree_mask, int packed, Tensor embed, "
        "Tensor cos_table, Tensor sin_table, Tensor head_weight, int head_format, Tensor? head_bias, "
        "float eps, float scale) -> Tensor"
    ),
}
# ops without a tensor argument: one CompositeExplicitAutograd kernel for every backend
NO_TENSOR_ARGS = {"decode_step_release"}


def _registered_ops() -> list[str]:
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("ptp_ext::"))


def test_the_ops_are_registered():
    ops = _registered_ops()
    missing = sorted(set(SCHEMAS) - set(ops))
    assert not missing, f"ops missing from torch.ops.ptp_ext: {missing} (registered: {ops})"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema(name: str):
    assert str(getattr(torch.ops.ptp_ext, name).default._schema) == SCHEMAS[name]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_dispatch_keys_match_the_build(name: str):
    qualname = f"ptp_ext::{name}"
    if name in NO_TENSOR_ARGS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
        return
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    assert has_cuda == ptp_ext.with_cuda(), (
        f"{qualname}: CUDA kernel registered={has_cuda} but ptp_ext.with_cuda()={ptp_ext.with_cuda()}")


def test_with_cuda_is_a_bool():
    assert isinstance(ptp_ext.with_cuda(), bool)


def test_public_api():
    """Every op has its wrapper at the package level and in __all__; the docstring lists them."""
    for name in ("tree_attention", "verify_tree", "sampler_mlp", "invariant_linear",
                 "gated_lora_linear", "quant_linear", "gated_lora_quant_linear", "decode_step",
                 "decode_linear"):
        assert name in ptp_ext.__all__ and getattr(ptp_ext, name) is getattr(ptp_ext.ops, name)
        assert f":func:`{name}`" in ptp_ext.__doc__
    assert {"ops", "reference", "with_cuda"} <= set(ptp_ext.__all__)


def test_ptp_ext_never_imports_transformers():
    import subprocess
    import sys

    code = "import sys, ptp_ext, ptp_ext.ops, ptp_ext.reference; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", _registered_ops())
def test_every_op_has_a_documented_wrapper_and_a_fake(name: str):
    wrapper = getattr(ptp_ext.ops, name, None)
    assert callable(wrapper), f"ptp_ext.ops.{name} (public wrapper) is missing"
    assert wrapper.__doc__ and "Parameters" in wrapper.__doc__ and "Returns" in wrapper.__doc__, (
        f"ptp_ext.ops.{name} needs a numpy-style docstring (Parameters / Returns)")
    from torch._library.simple_registry import singleton

    assert singleton.find(f"ptp_ext::{name}").fake_impl.kernel is not None, (
        f"no torch.library.register_fake for ptp_ext::{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_tree_attention(dtype):
    B, T, Hq, Hkv, S, D = 2, 5, 6, 2, 64, 32
    with FakeTensorMode():
        q = torch.empty(B, T, Hq, D, dtype=dtype)
        k = torch.empty(B, Hkv, S, D, dtype=dtype)
        lens = torch.empty(B, dtype=torch.int32)
        mask = torch.empty(B, T, T, dtype=torch.bool)
        out, lse = torch.ops.ptp_ext.tree_attention(q, k, k, lens, mask, 0.125)
    assert out.shape == (B, T, Hq, D) and out.dtype == dtype
    assert lse.shape == (B, Hq, T) and lse.dtype == torch.float32


def test_fake_verify_tree():
    B, N1, V = 3, 7, 101
    with FakeTensorMode():
        tokens = torch.empty(B, N1, dtype=torch.long)
        parents = torch.empty(B, N1, dtype=torch.long)
        logits = torch.empty(B, N1, V, dtype=torch.float16)
        num, nodes, nxt = torch.ops.ptp_ext.verify_tree(tokens, parents, logits, None, None,
                                                        "greedy", 0.0, 0, 1.0)
    assert num.shape == (B,) and nodes.shape == (B, N1) and nxt.shape == (B,)
    assert num.dtype == nodes.dtype == nxt.dtype == torch.long


def test_fake_sampler_mlp():
    N, d_h, d_e, d_mid, d_out, V = 4, 24, 16, 40, 24, 50
    with FakeTensorMode():
        hidden = torch.empty(N, d_h)
        prev = torch.empty(N, dtype=torch.long)
        emb = torch.empty(V, d_e)
        w1 = torch.empty(d_mid, d_h + d_e)
        w2 = torch.empty(d_out, d_mid)
        y = torch.ops.ptp_ext.sampler_mlp(hidden, prev, emb, w1, None, w2, None, None, None,
                                          None, None, False, 1e-5)
    assert y.shape == (N, d_out) and y.dtype == torch.float32


def test_fake_invariant_linear():
    with FakeTensorMode():
        y = torch.ops.ptp_ext.invariant_linear(torch.empty(5, 24), torch.empty(40, 24), None)
    assert y.shape == (5, 40) and y.dtype == torch.float32


def test_fake_gated_lora_linear():
    with FakeTensorMode():
        y = torch.ops.ptp_ext.gated_lora_linear(torch.empty(2, 5, 24), torch.empty(40, 24), None,
                                                torch.empty(4, 24), torch.empty(40, 4), 2.0, 3)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32



def test_fake_quant_linear():
    with FakeTensorMode():
        y = torch.ops.ptp_ext.quant_linear(torch.empty(5, 64), torch.empty(40, 40, dtype=torch.uint8),
                                           "q4_1", None)
    assert y.shape == (5, 40) and y.dtype == torch.float32


# ---- the fakes check their arguments like the C++ ops (same ValueError, same message) ------------
def _bad_calls():
    r, i32, u8 = torch.randn, torch.int32, torch.uint8
    ops = torch.ops.ptp_ext
    lens = torch.zeros(2, dtype=i32)
    tok, par = torch.zeros(2, 4, dtype=torch.long), torch.tensor([[-1, 0, 1, 2]] * 2)
    lg, u = r(2, 4, 16), torch.rand(2, 4)
    x2, w = r(4, 32), r(12, 32)
    x3, la, lb = r(2, 5, 32), r(4, 32), r(12, 4)
    q = torch.zeros(12, 20, dtype=u8)
    smlp = lambda **o: [o.get(k, v) for k, v in dict(  # noqa: E731
        hidden=r(3, 8), prev=torch.zeros(3, dtype=torch.long), emb=r(10, 8), w1=r(6, 16), b1=None,
        w2=r(5, 6), b2=None, n1w=None, n1b=None, n2w=None, n2b=None).items()] + [True, 1e-5]
    return [
        ("tree_attention: key_cache D", ops.tree_attention,
         (r(2, 4, 4, 64), r(2, 2, 16, 32), r(2, 2, 16, 32), lens, None, 0.1)),
        ("tree_attention: head dim 0", ops.tree_attention,
         (r(2, 4, 4, 0), r(2, 2, 16, 0), r(2, 2, 16, 0), lens, None, 0.1)),
        ("tree_attention: tree_mask", ops.tree_attention,
         (r(2, 4, 4, 64), r(2, 2, 16, 64), r(2, 2, 16, 64), lens,
          torch.ones(2, 4, 3, dtype=torch.bool), 0.1)),
        ("tree_attention: cache_lens dtype", ops.tree_attention,
         (r(2, 4, 4, 64), r(2, 2, 16, 64), r(2, 2, 16, 64), lens.float(), None, 0.1)),
        ("tree_attention: GQA heads", ops.tree_attention,
         (r(2, 4, 3, 64), r(2, 2, 16, 64), r(2, 2, 16, 64), lens, None, 0.1)),
        ("verify_tree: draft_tokens", ops.verify_tree,
         (tok[:, :3].contiguous(), par, lg, None, u, "coupled", 1.0, 0, 1.0)),
        ("verify_tree: uniforms dtype", ops.verify_tree,
         (tok, par, lg, None, u.half(), "coupled", 1.0, 0, 1.0)),
        ("verify_tree: mode", ops.verify_tree, (tok, par, lg, None, u, "beam", 1.0, 0, 1.0)),
        ("verify_tree: top_p", ops.verify_tree, (tok, par, lg, None, u, "coupled", 1.0, 0, 0.0)),
        ("verify_tree: draft_probs", ops.verify_tree,
         (tok, par, lg, torch.rand(2, 4, 15), u, "rejection", 1.0, 0, 1.0)),
        ("sampler_mlp: w1", ops.sampler_mlp, tuple(smlp(w1=r(6, 15)))),
        ("sampler_mlp: b1", ops.sampler_mlp, tuple(smlp(b1=r(5)))),
        ("sampler_mlp: prev_tokens", ops.sampler_mlp,
         tuple(smlp(prev=torch.zeros(3, dtype=i32)))),
        ("invariant_linear: weight", ops.invariant_linear, (x2, r(12, 31), None)),
        ("invariant_linear: bias", ops.invariant_linear, (x2, w, r(11))),
        ("invariant_linear: x dtype", ops.invariant_linear, (x2.double(), w, None)),
        ("gated_lora_linear: lora_a", ops.gated_lora_linear, (x3, w, None, r(4, 31), lb, 2.0, 1)),
        ("gated_lora_linear: lora_b", ops.gated_lora_linear, (x3, w, None, la, r(12, 3), 2.0, 1)),
        ("gated_lora_linear: aux_start", ops.gated_lora_linear, (x3, w, None, la, lb, 2.0, 6)),
        ("quant_linear: K", ops.quant_linear, (r(4, 40), q, "q4_1", None)),
        ("quant_linear: qweight", ops.quant_linear, (x2, q, "q8_0", None)),
        ("quant_linear: format", ops.quant_linear, (x2, q, "q4_0", None)),
        ("gated_lora_quant_linear: qweight", ops.gated_lora_quant_linear,
         (x3, q[:, :19].contiguous(), "q4_1", None, la, lb, 2.0, 1)),
        ("gated_lora_quant_linear: lora_b", ops.gated_lora_quant_linear,
         (x3, q, "q4_1", None, la, r(11, 4), 2.0, 1)),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("name,op,args", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_fakes_check_shapes_like_the_real_ops(name, op, args):
    with pytest.raises(ValueError) as real:
        op(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError) as fake:
            op(*fake_args)
    assert str(fake.value) == str(real.value)
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(ValueError) as meta:
        op(*meta_args)
    assert str(meta.value) == str(real.value).replace(" on cpu", " on meta")


def test_fakes_trace_dynamic_shapes():
    """The fakes' size checks are deferred asserts under dynamic shapes, not errors or
    specialisations: one compiled graph serves two row counts."""
    w = torch.randn(12, 32)

    @torch.compile(fullgraph=True, dynamic=True, backend="eager")
    def f(x):
        return ptp_ext.ops.invariant_linear(x, w) + 1

    for n in (3, 7):
        x = torch.randn(n, 32)
        torch.testing.assert_close(f(x), ptp_ext.ops.invariant_linear(x, w) + 1)
