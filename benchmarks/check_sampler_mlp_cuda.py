"""Standalone GPU correctness sweep of sampler_mlp (CUDA) against the float32 reference.

    python benchmarks/check_sampler_mlp_cuda.py

Sweeps rows (1..16 per launch and multi-chunk 17/33/70), widths (odd, not multiples of 8 -> the
scalar weight-load path, d_mid != d_out), every optional part, both silu_out values, all three
dtypes, an unaligned weight view and out-of-range prev_tokens (clamped on the device: compared
with the clamped reference). Also checks CPU/CUDA agreement and that a CUDA graph replay gives the
eager result. Prints PASS/FAIL per case and exits 1 on any failure ("skipped", exit 0, without a
GPU).
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


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


def main() -> int:
    import ptp_ext
    from ptp_ext.reference import sampler_mlp_ref

    if not (torch.cuda.is_available() and ptp_ext.with_cuda()):
        print("skipped: needs a GPU and a CUDA build of ptp_ext")
        return 0
    failures = 0
    total = 0

    def compare(name, args, silu_out, ref_args=None):
        nonlocal failures, total
        total += 1
        dtype = args[0].dtype
        try:
            out = torch.ops.ptp_ext.sampler_mlp(*args, silu_out, 1e-5)
            torch.cuda.synchronize()
            ra = [None if a is None else (a.float().cpu() if a.is_floating_point() else a.cpu())
                  for a in (ref_args or args)]
            ref = sampler_mlp_ref(*ra, silu_out, 1e-5)
            atol, rtol = TOL[dtype]
            ok = (not out.isnan().any().item()) and torch.allclose(out.float().cpu(), ref,
                                                                   atol=atol, rtol=rtol)
            err = (out.float().cpu() - ref).abs().max().item()
            cpu = torch.ops.ptp_ext.sampler_mlp(*[None if a is None else a.cpu()
                                                  for a in (ref_args or args)], silu_out, 1e-5)
            ok = ok and torch.allclose(out.float().cpu(), cpu.float(), atol=2 * atol,
                                       rtol=2 * rtol)
        except Exception as e:  # report and go on
            ok, err = False, float("nan")
            print(f"  exception: {type(e).__name__}: {e}")
        if not ok:
            failures += 1
        print(f"{'PASS' if ok else 'FAIL'} {name} max_err={err:.3g}", flush=True)

    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    all_parts = [(False, False, False, False), (True, False, False, False),
                 (False, True, False, True), (False, False, True, False), (True, True, True, True)]
    # rows x widths x dtypes, paper form and plain form
    for dtype, n, (dh, de, dmid, dout) in itertools.product(
            dtypes, [1, 2, 3, 5, 8, 13, 16, 17, 33, 70],
            [(64, 64, 96, 48), (576, 576, 576, 576), (1024, 1024, 2048, 1024),
             (4096, 4096, 4096, 4096)]):
        for silu_out, parts in [(True, (True, True, True, True)), (False, all_parts[0])]:
            compare(f"N={n} d={dh}+{de}/{dmid}/{dout} {str(dtype)[6:]} silu_out={silu_out}",
                    make(n, dh, de, dmid, dout, dtype, parts, seed=n), silu_out)
    # optional parts, odd widths (scalar load path), d_mid != d_out
    for dtype, parts, silu_out, (dh, de, dmid, dout) in itertools.product(
            dtypes, all_parts, [False, True], [(77, 51, 131, 29), (200, 120, 136, 264)]):
        compare(f"parts={parts} d={dh}+{de}/{dmid}/{dout} {str(dtype)[6:]} silu_out={silu_out}",
                make(7, dh, de, dmid, dout, dtype, parts, seed=3), silu_out)
    # unaligned weight views (16-byte loads must be switched off)
    for dtype in dtypes:
        args = make(4, 64, 64, 64, 64, dtype, all_parts[-1], seed=5)
        w1 = torch.empty(args[3].numel() + 1, dtype=dtype, device="cuda")[1:].view_as(args[3])
        w1.copy_(args[3])
        args[3] = w1
        compare(f"unaligned w1 {str(dtype)[6:]}", args, True)
    # out-of-range prev_tokens are clamped on the device
    args = make(6, 64, 64, 64, 64, torch.float32, all_parts[-1], seed=6)
    ref_args = list(args)
    ref_args[1] = args[1].clamp(0, args[2].shape[0] - 1)
    total += 1
    bad = args[1].clone()
    bad[0], bad[1] = -5, 10 ** 6
    out = torch.ops.ptp_ext.sampler_mlp(*([args[0], bad] + args[2:]), True, 1e-5)
    clamped = bad.clamp(0, args[2].shape[0] - 1)
    ref = torch.ops.ptp_ext.sampler_mlp(*([args[0], clamped] + args[2:]), True, 1e-5)
    ok = torch.equal(out, ref)
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} out-of-range prev_tokens clamp")
    # CUDA graph replay == eager
    total += 1
    args = make(16, 576, 576, 576, 576, torch.bfloat16, all_parts[-1], seed=7)
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
    ok = torch.equal(static_out, eager)
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} CUDA graph replay equals eager")

    print(f"\n{total - failures}/{total} passed: {'PASS' if failures == 0 else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
