"""The op surface of ptp_ext: the six ops registered under torch.ops.ptp_ext with the contract's
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
}


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
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    assert has_cuda == ptp_ext.with_cuda(), (
        f"{qualname}: CUDA kernel registered={has_cuda} but ptp_ext.with_cuda()={ptp_ext.with_cuda()}")


def test_with_cuda_is_a_bool():
    assert isinstance(ptp_ext.with_cuda(), bool)


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
