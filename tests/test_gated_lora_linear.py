"""gated_lora_linear against its reference, and its promises: the rows before ``aux_start`` are
bitwise ``invariant_linear``'s (the adapter never touches the target's rows), every row is
bitwise independent of the other rows of the call, and the decoder's gated-LoRA layers give the
same result through it as through their unfused path.

Order (STYLE.md): reference grid, invariance, CPU/CUDA agreement, opcheck, errors, compile.
"""
from __future__ import annotations

import pytest
import torch

import ptp_ext
from ptp_ext.ops import gated_lora_linear, invariant_linear
from ptp_ext.reference import gated_lora_linear_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not ptp_ext.with_cuda(),
                          reason="needs a GPU and a CUDA build of ptp_ext")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


def make(b, s, k, m, r, dtype=torch.float32, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, k, generator=g).to(dtype=dtype, device=device)
    w = (torch.randn(m, k, generator=g) * k ** -0.5).to(dtype=dtype, device=device)
    bb = (torch.randn(m, generator=g) * 0.1).to(dtype=dtype, device=device) if bias else None
    a = (torch.randn(r, k, generator=g) * k ** -0.5).to(device)
    lb = (torch.randn(m, r, generator=g) * 0.2).to(device)
    return x, w, bb, a, lb


# ---- reference grid ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,s,k,m,r,start", [(1, 13, 576, 576, 16, 5), (2, 9, 64, 200, 8, 0),
                                             (3, 4, 40, 24, 4, 4), (1, 1, 8, 3, 2, 0),
                                             (2, 7, 13, 9, 3, 6)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(device, dtype, b, s, k, m, r, start, bias):
    x, w, bb, a, lb = make(b, s, k, m, r, dtype, bias, device)
    y = gated_lora_linear(x, w, bb, a, lb, 2.0, start)
    assert y.dtype == dtype and y.shape == (b, s, m)
    torch.testing.assert_close(y.float(), gated_lora_linear_ref(x, w, bb, a, lb, 2.0, start).float(),
                               **TOL[dtype])


# ---- invariance --------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_base_rows_are_invariant_linears_and_rows_do_not_depend_on_the_call(device, dtype):
    x, w, bb, a, lb = make(2, 12, 576, 192, 16, dtype, True, device)
    y = gated_lora_linear(x, w, bb, a, lb, 2.0, 7)
    base = invariant_linear(x, w, bb)
    assert torch.equal(y[:, :7], base[:, :7])  # the target's rows: bitwise, adapter or not
    assert not torch.equal(y[:, 7:], base[:, 7:])
    # a row's value is the same in a call with fewer rows / another batch
    for b in range(2):
        for keep in (8, 10, 12):
            y2 = gated_lora_linear(x[b:b + 1, :keep].contiguous(), w, bb, a, lb, 2.0, 7)
            assert torch.equal(y2[0], y[b, :keep]), (b, keep)


def test_gated_lora_layer_fused_equals_unfused():
    """``GatedLoRALinear`` under ``LinearRouter`` takes the op; its output equals the unfused
    path (base rows bitwise, adapter rows to rounding)."""
    from ptp.decode.linear import LinearRouter
    from ptp.decode.lora import LoRAConfig, LoRAGate, GatedLoRALinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40)
    gate = LoRAGate()
    layer = GatedLoRALinear(lin, rank=4, scale=2.0, gate=gate)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    model = torch.nn.Sequential(layer)
    x = torch.randn(2, 9, 48)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 6:] = True
    calls = []
    real = ptp_ext.ops.gated_lora_linear

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    with torch.no_grad(), gate.rows(mask):
        unfused = layer(x)
        with LinearRouter(model) as lins:
            lins.active = True
            ptp_ext.ops.gated_lora_linear = spy
            try:
                fused = layer(x)
            finally:
                ptp_ext.ops.gated_lora_linear = real
    assert calls, "the fused op was not used"
    assert layer.router is None  # restored on exit
    assert torch.equal(fused[:, :6], invariant_linear(x, lin.weight, lin.bias)[:, :6])
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_agree(dtype):
    x, w, bb, a, lb = make(2, 10, 576, 300, 16, dtype)
    cpu = gated_lora_linear(x, w, bb, a, lb, 2.0, 4)
    gpu = gated_lora_linear(x.cuda(), w.cuda(), bb.cuda(), a.cuda(), lb.cuda(), 2.0, 4).cpu()
    torch.testing.assert_close(gpu.float(), cpu.float(), **TOL[dtype])


# ---- opcheck -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(device, bias):
    x, w, bb, a, lb = make(2, 5, 24, 16, 4, torch.float32, bias, device)
    torch.library.opcheck(torch.ops.ptp_ext.gated_lora_linear.default, (x, w, bb, a, lb, 2.0, 3))


def test_opcheck_with_grad():
    x, w, bb, a, lb = make(2, 5, 24, 16, 4)
    args = tuple(t.requires_grad_() for t in (x, w, bb, a, lb)) + (2.0, 3)
    torch.library.opcheck(torch.ops.ptp_ext.gated_lora_linear.default, args)


# ---- autograd ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start", [0, 3, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_backward_matches_the_reference(dtype, start, bias):
    """Gradients of x, weight, bias, lora_a and lora_b equal float64 autograd through
    gated_lora_linear_ref (aux_start 0: every row adapted; 5 = S: none)."""
    ins = make(2, 5, 24, 16, 4, dtype, bias, seed=3)
    g = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    gated_lora_linear(*leaves, 1.5, start).backward(g)
    refs = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    gated_lora_linear_ref(*refs, 1.5, start).backward(g.double())
    for got, want, name in zip(leaves, refs, ("x", "weight", "bias", "lora_a", "lora_b")):
        if got is None:
            continue
        assert got.grad is not None and got.grad.dtype == got.dtype, name
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL[dtype], msg=name)


# the op takes float32 at most: finite differences in float32 with eps 1e-2 (the op is bilinear,
# so they are exact up to rounding)
@pytest.mark.filterwarnings("ignore:Input #\\d+ requires gradient and is not a double")
def test_gradcheck():
    x, w, bb, a, lb = make(1, 4, 8, 6, 3, seed=7)
    torch.autograd.gradcheck(lambda *t: gated_lora_linear(*t, 0.7, 2),
                             tuple(t.requires_grad_() for t in (x, w, bb, a, lb)),
                             eps=1e-2, atol=5e-3, rtol=5e-3)


# ---- errors ------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    x, w, bb, a, lb = make(2, 5, 24, 16, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, S, K\]"):
        gated_lora_linear(x[0], w, bb, a, lb, 2.0, 1)
    with pytest.raises(ValueError, match="lora_a must have shape"):
        gated_lora_linear(x, w, bb, a[:, :5], lb, 2.0, 1)
    with pytest.raises(ValueError, match="lora_b must have shape"):
        gated_lora_linear(x, w, bb, a, lb[:, :3], 2.0, 1)
    with pytest.raises(ValueError, match="lora_a must be Float"):
        gated_lora_linear(x, w, bb, a.double(), lb, 2.0, 1)
    with pytest.raises(ValueError, match="aux_start must be in"):
        gated_lora_linear(x, w, bb, a, lb, 2.0, 6)
    with pytest.raises(ValueError, match="weight must have shape"):
        gated_lora_linear(x, w[:, :7], bb, a, lb, 2.0, 1)
    with pytest.raises(ValueError, match="x must be contiguous"):
        gated_lora_linear(x.transpose(0, 1), w, bb, a, lb, 2.0, 1)


# ---- compile -----------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    x, w, bb, a, lb = make(1, 6, 32, 20, 4)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return gated_lora_linear(x, w, bb, a, lb, 2.0, 2) * 2

    torch.testing.assert_close(f(x), gated_lora_linear(x, w, bb, a, lb, 2.0, 2) * 2)
