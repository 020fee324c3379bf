"""sampler_mlp against its reference (ptp_ext.reference.sampler_mlp_ref).

Order (STYLE.md): reference grid, CPU/CUDA agreement, opcheck, errors, compile.
"""
from __future__ import annotations

import pytest
import torch

import ptp_ext
from ptp_ext import _testing
from ptp_ext.reference import sampler_mlp_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not ptp_ext.with_cuda(),
                          reason="needs a GPU and a CUDA build of ptp_ext")
# Output tolerances vs the float32 reference (inputs rounded to the dtype first, so only the
# op's own rounding differs): one rounding of the output plus float32 accumulation-order noise.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make_inputs(num_rows, d_h, d_mid, d_out, dtype, *, biases=True, norm1=True, norm2=True,
                norm_bias=True, d_e=None, vocab=97, device="cpu", seed=0):
    """Random inputs in the op's argument order (minus silu_out, eps); weights scaled like
    nn.Linear's init so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    d_e = d_h if d_e is None else d_e

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    hidden = r(num_rows, d_h)
    prev = torch.randint(0, vocab, (num_rows,), generator=g).to(device)
    emb = r(vocab, d_e)
    w1 = r(d_mid, d_h + d_e, scale=(d_h + d_e) ** -0.5)
    b1 = r(d_mid, scale=0.1) if biases else None
    w2 = r(d_out, d_mid, scale=d_mid ** -0.5)
    b2 = r(d_out, scale=0.1) if biases else None
    n1w = (1 + r(d_mid, scale=0.1)) if norm1 else None
    n1b = r(d_mid, scale=0.1) if norm1 and norm_bias else None
    n2w = (1 + r(d_out, scale=0.1)) if norm2 else None
    n2b = r(d_out, scale=0.1) if norm2 and norm_bias else None
    return [hidden, prev, emb, w1, b1, w2, b2, n1w, n1b, n2w, n2b]


def _ref32(args, silu_out, eps):
    f = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return sampler_mlp_ref(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in f],
                           silu_out, eps)


def _check(args, silu_out, eps=1e-5):
    out = torch.ops.ptp_ext.sampler_mlp(*args, silu_out, eps)
    ref = _ref32(args, silu_out, eps)
    assert out.dtype == args[0].dtype and out.shape == ref.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu().float(), ref, **TOL[args[0].dtype])
    return out


# ---- against the reference -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 3, 16, 33])
@pytest.mark.parametrize("d_h,d_mid,d_out", [(64, 64, 64), (64, 96, 48), (576, 576, 576),
                                             (576, 1024, 576), (1024, 1024, 1024)])
@pytest.mark.parametrize("silu_out", [False, True])
def test_matches_reference(dtype, num_rows, d_h, d_mid, d_out, silu_out):
    args = make_inputs(num_rows, d_h, d_mid, d_out, dtype, biases=silu_out, norm1=silu_out,
                       norm2=silu_out, seed=num_rows + d_h)
    _check(args, silu_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("biases,norm1,norm2,norm_bias",
                         [(False, False, False, False), (True, False, False, False),
                          (False, True, False, True), (False, False, True, False),
                          (True, True, True, False), (True, True, True, True)])
@pytest.mark.parametrize("silu_out", [False, True])
def test_optional_parts(dtype, biases, norm1, norm2, norm_bias, silu_out):
    args = make_inputs(5, 80, 112, 72, dtype, biases=biases, norm1=norm1, norm2=norm2,
                       norm_bias=norm_bias, d_e=48, seed=11)
    _check(args, silu_out, eps=1e-6)


def test_wrapper_prev_embed_form():
    args = make_inputs(7, 64, 96, 64, torch.float32, seed=3)
    hidden, prev, emb, w1, b1, w2, b2, n1w, n1b, n2w, n2b = args
    kw = dict(b1=b1, b2=b2, norm1_weight=n1w, norm1_bias=n1b, norm2_weight=n2w, norm2_bias=n2b,
              silu_out=True)
    a = ptp_ext.ops.sampler_mlp(hidden, w1, w2, prev_tokens=prev, embedding=emb, **kw)
    b = ptp_ext.ops.sampler_mlp(hidden, w1, w2, prev_embed=emb[prev], **kw)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a, _ref32(args, True, 1e-5), **TOL[torch.float32])
    with pytest.raises(ValueError, match="either prev_embed or"):
        ptp_ext.ops.sampler_mlp(hidden, w1, w2, prev_embed=emb[prev], prev_tokens=prev)
    with pytest.raises(ValueError, match="needs prev_tokens and embedding"):
        ptp_ext.ops.sampler_mlp(hidden, w1, w2, prev_tokens=prev)


def test_zero_rows():
    args = make_inputs(1, 64, 64, 32, torch.float32)
    args[0], args[1] = args[0][:0], args[1][:0]
    out = torch.ops.ptp_ext.sampler_mlp(*args, False, 1e-5)
    assert out.shape == (0, 32)


# ---- CPU / CUDA agreement --------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 3, 16, 33])
@pytest.mark.parametrize("d_h,d_mid,d_out", [(64, 96, 48), (576, 576, 576), (1024, 1024, 1024),
                                             (2048, 4096, 2048), (4096, 4096, 4096)])
@pytest.mark.parametrize("paper_form", [False, True])
def test_device_matches_reference_and_cpu(device, dtype, num_rows, d_h, d_mid, d_out,
                                          paper_form):
    args = make_inputs(num_rows, d_h, d_mid, d_out, dtype, biases=paper_form, norm1=paper_form,
                       norm2=paper_form, device=device, seed=num_rows)
    out = _check(args, paper_form)
    out_cpu = torch.ops.ptp_ext.sampler_mlp(*[a.cpu() if a is not None else None for a in args],
                                            paper_form, 1e-5)
    torch.testing.assert_close(out.cpu().float(), out_cpu.float(), **TOL[dtype])


@CUDA
@pytest.mark.parametrize("device", ["cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("biases,norm1,norm2,norm_bias",
                         [(True, False, False, False), (False, True, False, False),
                          (False, False, True, True), (True, True, True, True)])
def test_device_optional_parts(device, dtype, biases, norm1, norm2, norm_bias):
    args = make_inputs(9, 200, 136, 264, dtype, biases=biases, norm1=norm1, norm2=norm2,
                       norm_bias=norm_bias, d_e=120, device=device, seed=4)
    _check(args, True)


@CUDA
@pytest.mark.parametrize("device", ["cuda"])
def test_device_mismatch_error(device):
    args = make_inputs(3, 64, 64, 64, torch.float16, device=device)
    args[3] = args[3].cpu()
    with pytest.raises(ValueError, match="w1 must be on the same device"):
        torch.ops.ptp_ext.sampler_mlp(*args, False, 1e-5)


# ---- opcheck ---------------------------------------------------------------------------------
OPCHECK_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ptp_ext.with_cuda()
                             else [])


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
@pytest.mark.parametrize("dtype,paper_form", [(torch.float32, True), (torch.float16, False),
                                              (torch.bfloat16, True)])
def test_opcheck(device, dtype, paper_form):
    args = make_inputs(3, 64, 96, 48, dtype, biases=paper_form, norm1=paper_form,
                       norm2=paper_form, device=device)
    torch.library.opcheck(torch.ops.ptp_ext.sampler_mlp.default, (*args, paper_form, 1e-5))


# ---- errors ----------------------------------------------------------------------------------
def _bad(i, value):
    def f(a):
        a = list(a)
        a[i] = value(a) if callable(value) else value
        return a
    return f


ERRORS = [
    ("hidden must be float32, float16 or bfloat16", _bad(0, lambda a: a[0].double())),
    (r"hidden must have shape \[N, d_h\]", _bad(0, lambda a: a[0][None])),
    ("prev_tokens must be", _bad(1, lambda a: a[1].int())),
    (r"prev_tokens must have shape \[N\]", _bad(1, lambda a: a[1][:2])),
    (r"embedding must have shape \[V, d_e\]", _bad(2, lambda a: a[2][0])),
    ("embedding must be", _bad(2, lambda a: a[2].half())),
    (r"w1 must have shape \[d_mid, d_h \+ d_e\]", _bad(3, lambda a: a[3][:, :-1].contiguous())),
    ("w1 must be", _bad(3, lambda a: a[3].half())),
    (r"w2 must have shape \[d_out, d_mid\]", _bad(5, lambda a: a[5][:, :-1].contiguous())),
    ("w2 must be", _bad(5, lambda a: a[5].half())),
    ("w1 and w2 must have at least one output row",
     lambda a: [a[0], a[1], a[2], a[3][:0], None, a[5][:, :0], a[6], None, None, a[9], a[10]]),
    ("hidden must be contiguous", _bad(0, lambda a: a[0].t().contiguous().t())),
    ("prev_tokens must be contiguous",
     _bad(1, lambda a: torch.stack([a[1], a[1]], 1)[:, 0])),
    ("embedding must be contiguous", _bad(2, lambda a: a[2].t().contiguous().t())),
    ("w1 must be contiguous", _bad(3, lambda a: a[3].t().contiguous().t())),
    ("w2 must be contiguous", _bad(5, lambda a: a[5].t().contiguous().t())),
    (r"b1 must have shape \[d\]", _bad(4, lambda a: a[4][:-1])),
    ("b1 must be", _bad(4, lambda a: a[4].half())),
    (r"b2 must have shape \[d\]", _bad(6, lambda a: a[6][:-1])),
    (r"norm1_weight must have shape \[d\]", _bad(7, lambda a: a[7][:-1])),
    (r"norm1_bias must have shape \[d\]", _bad(8, lambda a: a[8][:-1])),
    (r"norm2_weight must have shape \[d\]", _bad(9, lambda a: a[9][:-1])),
    (r"norm2_bias must have shape \[d\]", _bad(10, lambda a: a[10][:-1])),
    ("norm2_bias must be contiguous",
     _bad(10, lambda a: torch.stack([a[10], a[10]], 1)[:, 0])),
    ("norm1_bias needs norm1_weight", _bad(7, None)),
    ("norm2_bias needs norm2_weight", _bad(9, None)),
    (r"prev_tokens must be in \[0, V=", _bad(1, lambda a: a[1] + 1000)),
    (r"prev_tokens must be in \[0, V=", _bad(1, lambda a: a[1] - 1000)),
]


@pytest.mark.parametrize("match,change", ERRORS, ids=[e[0][:40] for e in ERRORS])
def test_errors(match, change):
    args = make_inputs(3, 64, 96, 48, torch.float32)
    with pytest.raises(ValueError, match=match):
        torch.ops.ptp_ext.sampler_mlp(*change(args), True, 1e-5)


def test_inference_only():
    args = make_inputs(3, 64, 96, 48, torch.float32)
    args[3].requires_grad_()  # w1
    with pytest.raises(RuntimeError, match="ptp_ext.sampler_mlp is inference-only"):
        torch.ops.ptp_ext.sampler_mlp(*args, True, 1e-5)
    with torch.inference_mode():
        torch.ops.ptp_ext.sampler_mlp(*args, True, 1e-5)


# ---- torch.compile ---------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    hidden, prev, emb, w1, b1, w2, b2, n1w, n1b, n2w, n2b = make_inputs(4, 64, 96, 64,
                                                                        torch.float32)

    def f(hidden, prev):
        y = ptp_ext.ops.sampler_mlp(hidden, w1, w2, prev_tokens=prev, embedding=emb, b1=b1,
                                    b2=b2, norm1_weight=n1w, norm1_bias=n1b, norm2_weight=n2w,
                                    norm2_bias=n2b, silu_out=True)
        return y + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(hidden, prev), f(hidden, prev))
