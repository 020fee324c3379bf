"""The CUDA sampler_mlp sweep (was benchmarks/check_sampler_mlp_cuda.py): every test is marked
``cuda`` and skipped without a GPU; on a GPU with a CPU-only build of ptp_ext it fails.

    pytest -m cuda tests/test_sampler_mlp_cuda.py

Sweeps rows (1..16 per launch and multi-chunk 17/33/70), widths (odd, not multiples of 8 -> the
scalar weight-load path, d_mid != d_out), every optional part, both silu_out values, all three
dtypes, an unaligned weight view and out-of-range prev_tokens (clamped on the device: compared
with the clamped call). Every case is checked against the float32 reference and the CPU op; a
CUDA graph replay must give the eager result.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import ptp_ext
from ptp_ext.reference import sampler_mlp_ref

pytestmark = pytest.mark.cuda
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_PARTS = [(False, False, False, False), (True, False, False, False),
             (False, True, False, True), (False, False, True, False), (True, True, True, True)]


@pytest.fixture(autouse=True)
def _cuda_build():
    assert ptp_ext.with_cuda(), "a GPU is present but ptp_ext was built without CUDA"


def make(num_rows, d_h, d_e, d_mid, d_out, dtype, parts, seed, vocab=131):
    biases, norm1, norm2, norm_bias = parts
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device="cuda")

    return [r(num_rows, d_h), torch.randint(0, vocab, (num_rows,), generator=g).cuda(),
            r(vocab, d_e), r(d_mid, d_h + d_e, scale=(d_h + d_e) ** -0.5),
            r(d_mid, scale=0.1) if biases else None, r(d_out, d_mid, scale=d_mid ** -0.5),
            r(d_out, scale=0.1) if biases else None, (1 + r(d_mid, scale=0.1)) if norm1 else None,
            r(d_mid, scale=0.1) if norm1 and norm_bias else None,
            (1 + r(d_out, scale=0.1)) if norm2 else None,
            r(d_out, scale=0.1) if norm2 and norm_bias else None]


def compare(args, silu_out):
    """CUDA op vs the float32 reference and vs the CPU op (twice the tolerance)."""
    dtype = args[0].dtype
    out = torch.ops.ptp_ext.sampler_mlp(*args, silu_out, 1e-5)
    torch.cuda.synchronize()
    ra = [None if a is None else (a.float().cpu() if a.is_floating_point() else a.cpu())
          for a in args]
    ref = sampler_mlp_ref(*ra, silu_out, 1e-5)
    atol, rtol = TOL[dtype]
    assert not out.isnan().any()
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=rtol)
    cpu = torch.ops.ptp_ext.sampler_mlp(*[None if a is None else a.cpu() for a in args],
                                        silu_out, 1e-5)
    torch.testing.assert_close(out.float().cpu(), cpu.float(), atol=2 * atol, rtol=2 * rtol)


WIDTHS = [(64, 64, 96, 48), (576, 576, 576, 576), (1024, 1024, 2048, 1024),
          (4096, 4096, 4096, 4096)]


@pytest.mark.parametrize("form", ["paper", "plain"])
@pytest.mark.parametrize("widths", WIDTHS, ids=["d={}+{}/{}/{}".format(*w) for w in WIDTHS])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 5, 8, 13, 16, 17, 33, 70])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_and_widths(dtype, num_rows, widths, form):
    """rows x widths x dtypes, the paper's form (silu_out, both norms) and the plain MLP."""
    silu_out, parts = (True, ALL_PARTS[-1]) if form == "paper" else (False, ALL_PARTS[0])
    compare(make(num_rows, *widths, dtype, parts, seed=num_rows), silu_out)


ODD = [(77, 51, 131, 29), (200, 120, 136, 264)]


@pytest.mark.parametrize("widths", ODD, ids=["d={}+{}/{}/{}".format(*w) for w in ODD])
@pytest.mark.parametrize("silu_out", [False, True])
@pytest.mark.parametrize("parts", ALL_PARTS, ids=[str(p) for p in ALL_PARTS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_optional_parts_and_odd_widths(dtype, parts, silu_out, widths):
    """Every optional part; odd widths (the scalar load path), d_mid != d_out."""
    compare(make(7, *widths, dtype, parts, seed=3), silu_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_weight_view(dtype):
    """16-byte weight loads must be switched off for a view that is not 16-byte aligned."""
    args = make(4, 64, 64, 64, 64, dtype, ALL_PARTS[-1], seed=5)
    w1 = torch.empty(args[3].numel() + 1, dtype=dtype, device="cuda")[1:].view_as(args[3])
    w1.copy_(args[3])
    args[3] = w1
    compare(args, True)


def test_out_of_range_prev_tokens_are_clamped():
    args = make(6, 64, 64, 64, 64, torch.float32, ALL_PARTS[-1], seed=6)
    bad = args[1].clone()
    bad[0], bad[1] = -5, 10 ** 6
    out = torch.ops.ptp_ext.sampler_mlp(*([args[0], bad] + args[2:]), True, 1e-5)
    clamped = bad.clamp(0, args[2].shape[0] - 1)
    want = torch.ops.ptp_ext.sampler_mlp(*([args[0], clamped] + args[2:]), True, 1e-5)
    assert torch.equal(out, want)


def test_cuda_graph_replay_equals_eager():
    args = make(16, 576, 576, 576, 576, torch.bfloat16, ALL_PARTS[-1], seed=7)
    eager = torch.ops.ptp_ext.sampler_mlp(*args, True, 1e-5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.ptp_ext.sampler_mlp(*args, True, 1e-5)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = torch.ops.ptp_ext.sampler_mlp(*args, True, 1e-5)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
