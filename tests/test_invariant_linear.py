"""invariant_linear against its reference (F.linear in float32) and its one promise: every output
row is bitwise the same whatever the other rows of the call (row / batch invariance).

Order (STYLE.md): reference grid, invariance, CPU/CUDA agreement, opcheck, errors, compile.
"""
from __future__ import annotations

import pytest
import torch

import ptp_ext
from ptp_ext.ops import invariant_linear
from ptp_ext.reference import invariant_linear_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = pytest.mark.skipif(not torch.cuda.is_available() or not ptp_ext.with_cuda(),
                          reason="needs a GPU and a CUDA build of ptp_ext")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def make(n, k, m, dtype=torch.float32, bias=True, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).to(dtype=dtype, device=device)
    w = (torch.randn(m, k, generator=g) * k ** -0.5).to(dtype=dtype, device=device)
    b = (torch.randn(m, generator=g) * 0.1).to(dtype=dtype, device=device) if bias else None
    return x, w, b


# ---- reference grid ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,m", [(1, 576, 576), (3, 64, 200), (16, 576, 1536), (5, 13, 7),
                                   (2, 1536, 130), (33, 40, 65), (1, 8, 1), (7, 3, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(device, dtype, n, k, m, bias):
    x, w, b = make(n, k, m, dtype, bias, device)
    y = invariant_linear(x, w, b)
    assert y.dtype == dtype and y.shape == (n, m)
    torch.testing.assert_close(y.float(), invariant_linear_ref(x, w, b).float(), **TOL[dtype])


def test_leading_dims_and_empty():
    x, w, b = make(6, 24, 10)
    y = invariant_linear(x.view(2, 3, 24), w, b)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y.view(6, 10), invariant_linear_ref(x, w, b))
    assert invariant_linear(x[:0], w, b).shape == (0, 10)
    assert torch.equal(invariant_linear(torch.empty(4, 0), torch.empty(3, 0), b[:3]),
                       b[:3].expand(4, 3))


# ---- row invariance ----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,m", [(576, 576), (576, 1536), (1536, 576), (67, 129)])
def test_rows_are_bitwise_independent_of_the_call(device, dtype, k, m):
    """Row i of an N-row call == the same row in a 1-row call and in any other N (BLAS fails
    this: torch 2.13's CPU sgemm rounds 1-3-row calls and the tail rows of calls under 12
    rows differently)."""
    x, w, b = make(40, k, m, dtype, True, device)
    full = invariant_linear(x, w, b)
    for n in (1, 2, 3, 4, 5, 7, 8, 11, 12, 17, 39):
        assert torch.equal(invariant_linear(x[:n], w, b), full[:n]), n
    for i in (0, 9, 39):  # a row alone, taken from the middle of the batch
        assert torch.equal(invariant_linear(x[i:i + 1], w, b), full[i:i + 1]), i


_ISA_CHECK = """
import sys, torch
from ptp_ext.ops import invariant_linear
from ptp_ext.reference import invariant_linear_ref
g = torch.Generator().manual_seed(0)
outs = []
for k, m in ((576, 200), (67, 13)):
    x = torch.randn(16, k, generator=g)
    w = torch.randn(m, k, generator=g) * k ** -0.5
    b = torch.randn(m, generator=g)
    full = invariant_linear(x, w, b)
    torch.testing.assert_close(full, invariant_linear_ref(x, w, b), atol=1e-4, rtol=1e-4)
    for n in range(1, 16):  # every register-tile height and split
        assert torch.equal(invariant_linear(x[:n], w, b), full[:n]), (k, n)
    outs.append(full)
torch.save(outs, sys.argv[1])
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512vl"])
def test_every_cpu_kernel_copy(isa, tmp_path):
    """The CPU kernel is compiled once per ISA (baseline; AVX2; AVX2 code with AVX-512VL's 32
    registers and taller tiles) and picked at run time; ``PTP_CPU_ISA`` caps the pick, so each
    copy is checked on this machine (a copy the CPU lacks falls back to the next one down).
    The AVX2 and AVX-512VL copies run the same FMAs per row: bitwise equal results."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PTP_CPU_ISA=isa)
    out = tmp_path / f"{isa}.pt"
    subprocess.run([sys.executable, "-c", _ISA_CHECK, str(out)], env=env, check=True, timeout=300)
    if isa == "avx512vl":
        env["PTP_CPU_ISA"] = "avx2"
        ref = tmp_path / "avx2.pt"
        subprocess.run([sys.executable, "-c", _ISA_CHECK, str(ref)], env=env, check=True, timeout=300)
        for a, b in zip(torch.load(out), torch.load(ref)):
            assert torch.equal(a, b)


def test_bad_isa_cap_raises():
    import os
    import subprocess
    import sys

    env = dict(os.environ, PTP_CPU_ISA="sse9")
    r = subprocess.run([sys.executable, "-c", "import torch, ptp_ext.ops as o; "
                        "o.invariant_linear(torch.ones(1, 8), torch.ones(2, 8))"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "PTP_CPU_ISA must be baseline, avx2 or avx512vl" in r.stderr


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_agree(dtype):
    x, w, b = make(9, 300, 77, dtype)
    y = invariant_linear(x.cuda(), w.cuda(), b.cuda()).cpu()
    torch.testing.assert_close(y.float(), invariant_linear(x, w, b).float(), **TOL[dtype])


# ---- opcheck -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(device, bias):
    x, w, b = make(4, 32, 12, torch.float32, bias, device)
    torch.library.opcheck(torch.ops.ptp_ext.invariant_linear.default, (x, w, b))


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_with_grad(bias):
    x, w, b = make(4, 32, 12, torch.float32, bias)
    args = (x.requires_grad_(), w.requires_grad_(), None if b is None else b.requires_grad_())
    torch.library.opcheck(torch.ops.ptp_ext.invariant_linear.default, args)


# ---- autograd ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_backward_matches_f_linear(dtype, bias):
    """Gradients of x, weight and bias equal F.linear's (float64 autograd on the same values,
    rounded to the inputs' dtype), leading dims included."""
    x, w, b = make(6, 37, 23, dtype, bias, seed=2)
    x = x.view(2, 3, 37)
    g = torch.randn(2, 3, 23, generator=torch.Generator().manual_seed(5)).to(dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    invariant_linear(*leaves).backward(g)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    torch.nn.functional.linear(*refs).backward(g.double())
    for got, want, name in zip(leaves, refs, ("x", "weight", "bias")):
        assert got.grad is not None and got.grad.dtype == dtype, name
        torch.testing.assert_close(got.grad.double(), want.grad, **TOL[dtype], msg=name)


# the op takes float32 at most: finite differences in float32 with eps 1e-2 (the op is bilinear,
# so they are exact up to rounding)
@pytest.mark.filterwarnings("ignore:Input #\\d+ requires gradient and is not a double")
def test_gradcheck():
    x, w, b = make(3, 8, 5, seed=4)
    torch.autograd.gradcheck(invariant_linear, (x.requires_grad_(), w.requires_grad_(),
                                                b.requires_grad_()), eps=1e-2, atol=5e-3, rtol=5e-3)


def test_only_the_needed_gradients():
    x, w, b = make(3, 8, 5, seed=4)
    invariant_linear(x, w.requires_grad_(), b).sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None


# ---- errors ------------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    x, w, b = make(4, 32, 12)
    with pytest.raises(ValueError, match=r"weight must have shape \[M, K\] = \[\*, 32\]"):
        invariant_linear(x, w[:, :31].contiguous())
    with pytest.raises(ValueError, match="weight must be Float, got Double"):
        invariant_linear(x, w.double())
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        invariant_linear(x.long(), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        invariant_linear(x, w, b[:5])
    with pytest.raises(ValueError, match="bias must be"):
        invariant_linear(x, w, b.half())
    with pytest.raises(ValueError, match="weight must be contiguous"):
        invariant_linear(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="x must have shape"):
        invariant_linear(torch.tensor(1.0), w)


# ---- torch.compile -----------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    x, w, b = make(3, 32, 12)

    def f(x, w, b):
        return torch.relu(invariant_linear(x, w, b)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w, b), f(x, w, b))
