"""tree_attention against its reference (ptp_ext.reference.tree_attention_ref).

Order (STYLE.md): reference grid, special rows, CPU/CUDA agreement, opcheck, errors, compile.
"""
from __future__ import annotations

import math

import pytest
import torch

import ptp_ext
from ptp_ext import _testing
from ptp_ext.reference import tree_attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not ptp_ext.with_cuda(),
                          reason="needs a GPU and a CUDA build of ptp_ext")


def _fp32(a: _testing.AttentionInputs) -> _testing.AttentionInputs:
    return _testing.AttentionInputs(a.query.float(), a.key_cache.float(), a.value_cache.float(),
                                    a.cache_lens, a.tree_mask, a.scale)


def _args(a: _testing.AttentionInputs):
    return (a.query, a.key_cache, a.value_cache, a.cache_lens, a.tree_mask, a.scale)


def _check(a: _testing.AttentionInputs, device: str = "cpu"):
    """Runs the op on `device` and compares out (flash-attention rule) and lse with the
    reference computed on the CPU."""
    a_cpu = _testing.AttentionInputs(*[x.cpu() if isinstance(x, torch.Tensor) else x
                                       for x in _args(a)])
    ref32, lse32 = tree_attention_ref(*_args(_fp32(a_cpu)))
    ref_lowp, _ = tree_attention_ref(*_args(a_cpu))
    out, lse = ptp_ext.ops.tree_attention(*_args(a), return_lse=True)
    assert out.dtype == a.query.dtype and out.shape == a.query.shape
    assert lse.dtype == torch.float32 and lse.shape == lse32.shape
    assert not out.isnan().any() and not lse.isnan().any()
    _testing.assert_attention_close(out.cpu(), ref32, ref_lowp)
    # lse is computed in fp32 from low-precision inputs converted exactly: tight tolerance (a bit
    # looser on the GPU: fast exp2 / log2 and tensor-core score accumulation)
    tol = 2e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(lse.cpu(), lse32, atol=tol, rtol=tol)
    return out, lse


# ---- against the reference -------------------------------------------------------------------
# The full grid runs in ~6 s on 2 cores (measured 2026-11-23): no trimming needed.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("num_new", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_matches_reference(dtype, head_dim, group, num_new, batch):
    num_kv = 2 if group < 4 else 1
    # lengths: row 0 gets 0 and the last row S_max - T (make_attention_inputs), others random
    a = _testing.make_attention_inputs(batch, num_new, group * num_kv, num_kv, head_dim,
                                       max_cache_len=num_new + 37, dtype=dtype,
                                       seed=head_dim + 7 * num_new + batch)
    _check(a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_new", [1, 8, 33])
def test_causal_and_long_context(dtype, num_new):
    """tree_mask None (causal among the new tokens), a context long enough to be split across
    threads, GQA 9/3 like SmolLM2."""
    a = _testing.make_attention_inputs(2, num_new, 9, 3, 64, max_cache_len=1500, dtype=dtype,
                                       tree=False, seed=num_new)
    _check(a)


def test_shared_2d_mask_and_default_scale():
    a = _testing.make_attention_inputs(3, 9, 4, 2, 64, 50, torch.float32, seed=3)
    mask2d = a.tree_mask[0]
    out = ptp_ext.ops.tree_attention(a.query, a.key_cache, a.value_cache, a.cache_lens, mask2d)
    ref, _ = tree_attention_ref(a.query, a.key_cache, a.value_cache, a.cache_lens,
                                mask2d.expand(3, 9, 9), 64 ** -0.5)
    torch.testing.assert_close(out, ref, **_testing.tolerance(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_that_sees_nothing(dtype):
    """cache_len 0 and a tree-mask row with no True: out 0 and lse -inf, other rows unaffected."""
    a = _testing.make_attention_inputs(2, 6, 4, 2, 64, 20, dtype, seed=5)
    a.cache_lens[0] = 0
    a.tree_mask[0, 2] = False
    out, lse = _check(a)
    assert (out[0, 2] == 0).all()
    assert (lse[0, :, 2] == -math.inf).all()
    assert torch.isfinite(lse[0, :, 3]).all() and torch.isfinite(lse[1]).all()


def test_int64_cache_lens_and_full_cache():
    a = _testing.make_attention_inputs(2, 4, 2, 2, 64, 30, torch.float32, seed=9)
    a.cache_lens = torch.tensor([26, 0], dtype=torch.int64)  # S_max - T and 0
    _check(a)


# ---- non-finite keys, values, queries ---------------------------------------------------------
# The rule (tree_attention.h, ops.tree_attention): IEEE softmax(mask(q k^T scale)) v over the
# first cache_lens[b] + T positions, as the reference computes it.
NAN, INF = math.nan, math.inf


def nonfinite_cases(dtype: torch.dtype, tree: bool, device: str = "cpu", head_dim: int = 32):
    """(name, inputs, check) over a base of B = 3, T = 6, H_q = 4, H_kv = 2, S_max = 40 with
    cache_lens [7, 12, 20]: each case poisons one spot; ``check(out, lse)`` asserts what the rule
    says for it, beyond the agreement with the reference."""
    base = _testing.make_attention_inputs(3, 6, 4, 2, head_dim, 40, dtype, tree=tree, seed=11)
    base.cache_lens = torch.tensor([7, 12, 20], dtype=torch.int32)
    L, T, last = 12, 6, 5  # row b = 1; node 5 is a leaf: only query row 5 sees it

    def case(name, poison, check):
        a = _testing.AttentionInputs(base.query.clone(), base.key_cache.clone(),
                                     base.value_cache.clone(), base.cache_lens.clone(),
                                     None if base.tree_mask is None else base.tree_mask.clone(),
                                     base.scale)
        poison(a)
        return name, _testing.AttentionInputs(*[x.to(device) if isinstance(x, torch.Tensor) else x
                                                for x in _args(a)]), check

    clean = tree_attention_ref(*_args(base))

    def past_end(a):
        for b in range(3):
            n = int(a.cache_lens[b]) + T
            a.key_cache[b, :, n:] = NAN
            a.value_cache[b, :, n:] = INF

    def set_(t, idx, v):
        return lambda a: getattr(a, t).__setitem__(idx, v)

    def rows_nan(b, heads):  # every query row of (b, heads) is NaN, lse NaN; the rest finite
        def check(out, lse):
            assert out[b, :, heads].isnan().all() and lse[b, heads].isnan().all()
            assert torch.isfinite(out[1 - b if b else 2]).all()
        return check

    def only_row_nan(b, head, t):
        def check(out, lse):
            assert out[b, t, head].isnan().all() and lse[b, head, t].isnan().all()
            assert torch.isfinite(out[b, :t]).all() and torch.isfinite(lse[b, head, :t]).all()
        return check

    def column(b, heads, d, what):
        def check(out, lse):
            assert what(out[b, :, heads, d]).all() and torch.isfinite(lse).all()
            others = torch.ones(head_dim, dtype=torch.bool)
            others[d] = False
            assert torch.isfinite(out[b][:, :, others]).all()
        return check

    def no_key(a):  # row b = 0: every visible score -inf (q > 0, k = -inf); values poisoned too
        a.query[0] = a.query[0].abs() + 0.1
        a.key_cache[0, :, :7 + T] = -INF
        a.value_cache[0, 1, 3] = INF

    def zeros(out, lse):
        assert (out[0] == 0).all() and lse[0].isneginf().all()
        assert torch.isfinite(out[1:]).all()

    def nan_among_neg_inf(a):  # row b = 0: a NaN score among -inf ones
        no_key(a)
        a.key_cache[0, 1, 2] = NAN

    return [
        case("past cache_lens + T", past_end,
             lambda out, lse: (torch.testing.assert_close(out.float(), clean[0].float(), **_tol(dtype)),
                               torch.testing.assert_close(lse, clean[1], **_tol(dtype)))),
        case("NaN key at a masked position", set_("key_cache", (1, 1, L + last), NAN),
             only_row_nan(1, slice(2, 4), last)),
        case("NaN key in the prefix", set_("key_cache", (1, 0, 3, 5), NAN), rows_nan(1, slice(0, 2))),
        case("+inf key in the prefix", lambda a: (set_("key_cache", (1, 0, 3), INF)(a),
                                                  a.query[1].abs_()), rows_nan(1, slice(0, 2))),
        case("NaN query", set_("query", (2, 1, 3, 0), NAN), only_row_nan(2, 3, 1)),
        case("inf value in the prefix", set_("value_cache", (1, 1, 2, 5), INF),
             column(1, slice(2, 4), 5, torch.isposinf)),
        case("NaN value at a masked position", set_("value_cache", (1, 0, L + last, 7), NAN),
             column(1, slice(0, 2), 7, torch.isnan)),
        case("all visible scores -inf", no_key, zeros),
        case("NaN score among -inf ones", nan_among_neg_inf, rows_nan(0, slice(2, 4))),
    ]


def _tol(dtype):
    atol, rtol = _testing.TOLERANCES[dtype]
    return {"atol": 4 * atol, "rtol": 4 * rtol}


def check_nonfinite(dtype: torch.dtype, tree: bool, device: str = "cpu", head_dim: int = 32) -> None:
    for name, a, check in nonfinite_cases(dtype, tree, device, head_dim):
        out, lse = ptp_ext.ops.tree_attention(*_args(a), return_lse=True)
        out, lse = out.cpu(), lse.cpu()
        ref, ref_lse = tree_attention_ref(*[x.cpu() if isinstance(x, torch.Tensor) else x
                                            for x in _args(a)])
        for got, want, what in ((out, ref, "out"), (lse, ref_lse, "lse")):
            assert torch.equal(got.isnan(), want.isnan()), f"{name}: {what} NaN pattern"
            assert torch.equal(got.isposinf(), want.isposinf()), f"{name}: {what} +inf pattern"
            assert torch.equal(got.isneginf(), want.isneginf()), f"{name}: {what} -inf pattern"
            fin = torch.isfinite(want)
            torch.testing.assert_close(got[fin].float(), want[fin].float(), **_tol(dtype),
                                       msg=lambda m: f"{name}: {what}: {m}")
        check(out, lse)


@pytest.mark.parametrize("tree", [True, False], ids=["tree", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_inputs_follow_the_reference(dtype, tree):
    check_nonfinite(dtype, tree)


def check_nonfinite_across_splits(dtype: torch.dtype, device: str = "cpu") -> None:
    """A long cache (several key splits, then the split merge): a NaN score in a later split when
    every other visible score is -inf (row b = 0), and a NaN key in a later split of a normal row
    (b = 1): both rows NaN, as the reference says; row b = 2 finite."""
    a = _testing.make_attention_inputs(3, 4, 2, 1, 64, 3000, dtype, tree=True, seed=4)
    a.cache_lens = torch.tensor([2900, 2500, 1000], dtype=torch.int32)
    a.query[0] = a.query[0].abs() + 0.1
    a.key_cache[0, :, :2904] = -INF
    a.key_cache[0, 0, 2700, 3] = NAN
    a.key_cache[1, 0, 2000, 9] = NAN
    args = [x.to(device) if isinstance(x, torch.Tensor) else x for x in _args(a)]
    out, lse = [t.cpu() for t in ptp_ext.ops.tree_attention(*args, return_lse=True)]
    ref, ref_lse = tree_attention_ref(*_args(a))
    assert ref[:2].isnan().all() and ref_lse[:2].isnan().all()
    assert out[:2].isnan().all() and lse[:2].isnan().all()
    torch.testing.assert_close(out[2].float(), ref[2].float(), **_tol(dtype))
    torch.testing.assert_close(lse[2], ref_lse[2], **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_across_key_splits(dtype):
    check_nonfinite_across_splits(dtype)


# ---- CPU / CUDA agreement --------------------------------------------------------------------
# (group, num_kv, num_new, batch, max_cache_len, tree): decode and verify sizes, a long cache
# (several key splits, the merge kernel), GQA 1/3/4, row tiles of 16..128 rows and more. The
# full product (540 cases) is what tests/test_tree_attention_cuda.py runs (~900 cases).
DEVICE_SIZES = [(1, 4, 1, 1, 4200, True), (3, 3, 1, 3, 300, False), (4, 8, 5, 3, 300, True),
                (3, 3, 16, 1, 4200, False), (4, 8, 33, 1, 4200, True), (1, 4, 64, 3, 300, True),
                (4, 8, 64, 1, 4200, False), (3, 3, 64, 3, 300, True)]


@CUDA
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group,num_kv,num_new,batch,max_cache_len,tree", DEVICE_SIZES)
def test_device_matches_cpu(device, dtype, head_dim, group, num_kv, num_new, batch,
                            max_cache_len, tree):
    a = _testing.make_attention_inputs(batch, num_new, group * num_kv, num_kv, head_dim,
                                       max_cache_len, dtype, device=device, tree=tree,
                                       seed=head_dim + num_new)
    out, lse = _check(a, device)
    a_cpu = [x.cpu() if isinstance(x, torch.Tensor) else x for x in _args(a)]
    out_cpu, lse_cpu = ptp_ext.ops.tree_attention(*a_cpu, return_lse=True)
    tol = 2 * _testing.TOLERANCES[dtype][0] if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(out.cpu().float(), out_cpu.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), lse_cpu, atol=1e-4, rtol=1e-4)


@CUDA
@pytest.mark.parametrize("device", ["cuda"])
def test_device_row_that_sees_nothing(device):
    a = _testing.make_attention_inputs(2, 6, 4, 2, 128, 20, torch.float16, device=device, seed=5)
    a.cache_lens[0] = 0
    a.tree_mask[0, 2] = False
    out, lse = _check(a, device)
    assert (out[0, 2] == 0).all() and (lse[0, :, 2] == -math.inf).all()


@CUDA
@pytest.mark.parametrize("device", ["cuda"])
def test_device_mismatch_errors(device):
    a = _testing.make_attention_inputs(2, 4, 4, 2, 64, 16, torch.float16, device=device)
    with pytest.raises(ValueError, match="key_cache must be on the same device"):
        ptp_ext.ops.tree_attention(a.query, a.key_cache.cpu(), a.value_cache, a.cache_lens)
    with pytest.raises(ValueError, match="value_cache must be on the same device"):
        ptp_ext.ops.tree_attention(a.query, a.key_cache, a.value_cache.cpu(), a.cache_lens)
    with pytest.raises(ValueError, match="cache_lens must be on the same device"):
        ptp_ext.ops.tree_attention(a.query, a.key_cache, a.value_cache, a.cache_lens.cpu())
    with pytest.raises(ValueError, match="tree_mask must be on the same device"):
        ptp_ext.ops.tree_attention(a.query, a.key_cache, a.value_cache, a.cache_lens,
                                   a.tree_mask.cpu())


# ---- opcheck ---------------------------------------------------------------------------------
OPCHECK_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ptp_ext.with_cuda()
                             else [])


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("dtype,tree,num_new", [(torch.float32, True, 5),
                                                (torch.float16, False, 1),
                                                (torch.bfloat16, True, 16)])
def test_opcheck(device, dtype, tree, num_new):
    a = _testing.make_attention_inputs(2, num_new, 6, 2, 64, 40, dtype, device=device, tree=tree)
    torch.library.opcheck(torch.ops.ptp_ext.tree_attention.default, _args(a))


# ---- errors ----------------------------------------------------------------------------------
def _good():
    return _testing.make_attention_inputs(2, 4, 4, 2, 64, 16, torch.float32, seed=1)


def _call(a, **over):
    args = dict(query=a.query, key_cache=a.key_cache, value_cache=a.value_cache,
                cache_lens=a.cache_lens, tree_mask=a.tree_mask, scale=a.scale)
    args.update(over)
    return torch.ops.ptp_ext.tree_attention(*args.values())


ERRORS = [
    ("query must be float32, float16 or bfloat16", lambda a: dict(query=a.query.double())),
    (r"query must have shape \[B, T, H_q, D\]", lambda a: dict(query=a.query[0])),
    (r"key_cache must have shape \[B, H_kv, S_max, D\]", lambda a: dict(key_cache=a.key_cache[0])),
    (r"key_cache must have shape \[B, H_kv, S_max, D\] = \[2, \*, \*, 64\]",
     lambda a: dict(key_cache=a.key_cache[:, :, :, :32].contiguous())),
    (r"value_cache must have shape \[B, H_kv, S_max, D\]",
     lambda a: dict(value_cache=a.value_cache[:, :, :8].contiguous())),
    ("key_cache must be", lambda a: dict(key_cache=a.key_cache.half())),
    ("value_cache must be", lambda a: dict(value_cache=a.value_cache.half())),
    ("must be a positive multiple of key_cache heads",
     lambda a: dict(query=torch.randn(2, 4, 3, 64))),
    (r"at least one new token \(T >= 1\)",
     lambda a: dict(query=torch.randn(2, 0, 4, 64), tree_mask=None)),
    ("do not fit in the cache",
     lambda a: dict(query=torch.randn(2, 17, 4, 64), tree_mask=None)),
    (r"head dim D must be in \[1, 256\]",
     lambda a: dict(query=torch.randn(2, 4, 4, 300), key_cache=torch.randn(2, 2, 16, 300),
                    value_cache=torch.randn(2, 2, 16, 300))),
    (r"head dim D must be in \[1, 256\], got 0",
     lambda a: dict(query=torch.randn(2, 4, 4, 0), key_cache=torch.randn(2, 2, 16, 0),
                    value_cache=torch.randn(2, 2, 16, 0))),
    ("must be a positive multiple of key_cache heads",
     lambda a: dict(query=torch.randn(2, 4, 0, 64))),
    ("cache_lens must be int32 or int64", lambda a: dict(cache_lens=a.cache_lens.float())),
    (r"cache_lens must have shape \[B\]", lambda a: dict(cache_lens=a.cache_lens[:1])),
    ("query must be contiguous", lambda a: dict(query=a.query.transpose(1, 2))),
    ("key_cache must be contiguous",
     lambda a: dict(key_cache=a.key_cache.transpose(0, 1).contiguous().transpose(0, 1))),
    ("value_cache must be contiguous",
     lambda a: dict(value_cache=a.value_cache.transpose(0, 1).contiguous().transpose(0, 1))),
    (r"tree_mask must be bool \[B, T, T\]", lambda a: dict(tree_mask=a.tree_mask.float())),
    (r"tree_mask must be bool \[B, T, T\] = \[2, 4, 4\]",
     lambda a: dict(tree_mask=a.tree_mask[:, :, :3].contiguous())),
    ("tree_mask must be contiguous", lambda a: dict(tree_mask=a.tree_mask.transpose(1, 2))),
    ("cache_lens must satisfy", lambda a: dict(cache_lens=torch.tensor([0, 13], dtype=torch.int32))),
    ("cache_lens must satisfy", lambda a: dict(cache_lens=torch.tensor([-1, 0], dtype=torch.int32))),
]


@pytest.mark.parametrize("match,change", ERRORS, ids=[e[0][:40] for e in ERRORS])
def test_errors(match, change):
    a = _good()
    with pytest.raises(ValueError, match=match):
        _call(a, **change(a))


def test_head_dim_zero_through_the_wrapper():
    """The default scale is D ** -0.5: D = 0 must reach the op's check, not divide by zero."""
    with pytest.raises(ValueError, match=r"head dim D must be in \[1, 256\], got 0"):
        ptp_ext.ops.tree_attention(torch.randn(1, 2, 2, 0), torch.randn(1, 2, 8, 0),
                                   torch.randn(1, 2, 8, 0), torch.zeros(1, dtype=torch.int32))


def test_inference_only():
    a = _good()
    q = a.query.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="ptp_ext.tree_attention is inference-only"):
        ptp_ext.ops.tree_attention(q, a.key_cache, a.value_cache, a.cache_lens, a.tree_mask)
    with torch.no_grad():
        ptp_ext.ops.tree_attention(q, a.key_cache, a.value_cache, a.cache_lens, a.tree_mask)


# ---- torch.compile ---------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    a = _testing.make_attention_inputs(2, 5, 6, 2, 64, 40, torch.float32, seed=2)

    def f(q, k, v, lens, mask):
        out, lse = ptp_ext.ops.tree_attention(q, k, v, lens, mask, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, lse = compiled(a.query, a.key_cache, a.value_cache, a.cache_lens, a.tree_mask)
    ref, ref_lse = f(a.query, a.key_cache, a.value_cache, a.cache_lens, a.tree_mask)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_flashinfer_custom_mask_matches_our_semantics():
    """The FlashInfer comparison (benchmarks/bench_flashinfer.py) hands FlashInfer a flattened
    custom mask; it must equal the mask our op applies (every cached position, then the tree
    block), row by row, with ragged cache lengths."""
    from benchmarks.bench_flashinfer import flashinfer_custom_mask
    from ptp_ext._testing import random_tree_parents, tree_mask_from_parents

    g = torch.Generator().manual_seed(3)
    B, T = 3, 6
    lens = torch.tensor([0, 5, 11])
    tree = torch.stack([tree_mask_from_parents(random_tree_parents(T, g)) for _ in range(B)])
    flat = flashinfer_custom_mask(lens, tree)
    assert flat.dtype == torch.bool and flat.numel() == sum(T * (int(c) + T) for c in lens)
    off = 0
    for b in range(B):
        c = int(lens[b])
        block = flat[off: off + T * (c + T)].reshape(T, c + T)
        off += T * (c + T)
        assert block[:, :c].all()
        assert torch.equal(block[:, c:], tree[b])
        # the same visibility the reference attention uses: query i sees key j iff ...
        for i in range(T):
            for j in range(c + T):
                assert bool(block[i, j]) == (j < c or bool(tree[b, i, j - c]))


def test_flashinfer_bench_skips_without_gpu(capsys):
    from benchmarks import bench_flashinfer

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the script would run the comparison")
    assert bench_flashinfer.main([]) == 0
    assert "skipped" in capsys.readouterr().out
