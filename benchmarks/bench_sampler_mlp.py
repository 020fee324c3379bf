"""Microbenchmark of ptp_ext.ops.sampler_mlp against eager PyTorch (two F.linear + ops).

    python benchmarks/bench_sampler_mlp.py --device cpu [--quick]
    python benchmarks/bench_sampler_mlp.py --device cuda [--quick] [--out results.md]

Correctness first (every shape against ptp_ext.reference.sampler_mlp_ref, float32), then a table:
N, d_h, d_mid, d_out, dtype, reference time (eager, in the dtype: cat + two F.linear + SiLU +
LayerNorm), ours, ratio. CPU: torch.utils.benchmark medians. GPU: CUDA-event medians over rotating
weight copies (cold L2), eager and CUDA-graph replay; GB/s counts the weight bytes (w1 + w2, the
bytes that must move) over the graph time, and its fraction of the measured device-to-device copy
bandwidth (benchmarks/_timing.copy_bandwidth_gbs). Without a GPU, --device cuda prints "skipped"
and exits 0. The shapes use the paper's head (biases, both LayerNorms, silu_out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _timing  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_inputs(num_rows: int, d_h: int, d_mid: int, d_out: int, dtype: torch.dtype,
                device: str, seed: int = 0, vocab: int = 4096) -> list:
    """Arguments of torch.ops.ptp_ext.sampler_mlp (minus silu_out, eps), paper form."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    d_e = d_h
    return [r(num_rows, d_h), torch.randint(0, vocab, (num_rows,), generator=g).to(device),
            r(vocab, d_e), r(d_mid, d_h + d_e, scale=(d_h + d_e) ** -0.5), r(d_mid, scale=0.1),
            r(d_out, d_mid, scale=d_mid ** -0.5), r(d_out, scale=0.1), 1 + r(d_mid, scale=0.1),
            r(d_mid, scale=0.1), 1 + r(d_out, scale=0.1), r(d_out, scale=0.1)]


def eager(args, silu_out=True, eps=1e-5):
    """The PyTorch baseline in the inputs' dtype."""
    hidden, prev, emb, w1, b1, w2, b2, n1w, n1b, n2w, n2b = args
    x = torch.cat([hidden, emb[prev]], dim=-1)
    h = F.layer_norm(F.silu(F.linear(x, w1, b1)), (w1.shape[0],), n1w, n1b, eps)
    y = F.linear(h, w2, b2)
    if silu_out:
        y = F.silu(y)
    return F.layer_norm(y, (w2.shape[0],), n2w, n2b, eps)


def ours(args, silu_out=True, eps=1e-5):
    return torch.ops.ptp_ext.sampler_mlp(*args, silu_out, eps)


def shapes(quick: bool, device: str):
    rows = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 33]
    dims = [(576, 576, 576), (2048, 2048, 2048)] if quick else [
        (576, 576, 576), (576, 1536, 576), (1024, 1024, 1024), (2048, 2048, 2048),
        (2048, 4096, 2048), (4096, 4096, 4096)]
    if device == "cpu" and not quick:
        dims = dims[:4]
    dtypes = [torch.bfloat16] if quick else (
        [torch.float32, torch.bfloat16] if device == "cpu" else
        [torch.bfloat16, torch.float16, torch.float32])
    return [(n, *d, dt) for dt in dtypes for d in dims for n in rows]


def check(device: str, quick: bool) -> bool:
    from ptp_ext.reference import sampler_mlp_ref
    ok = True
    for n, dh, dmid, dout, dtype in shapes(quick, device):
        args = make_inputs(n, dh, dmid, dout, dtype, device, seed=n)
        out = ours(args).float().cpu()
        ref = sampler_mlp_ref(*[a.float().cpu() if a.is_floating_point() else a.cpu()
                                for a in args], True, 1e-5)
        err = (out - ref).abs().max().item()
        tol = TOL[dtype] * (1 + ref.abs().max().item())
        if not err <= tol:
            ok = False
            print(f"FAIL N={n} d={dh}/{dmid}/{dout} {dtype}: max err {err:.3g} > {tol:.3g}")
    print("correctness:", "PASS" if ok else "FAIL")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    a = ap.parse_args()
    import ptp_ext

    if a.device == "cuda" and not (torch.cuda.is_available() and ptp_ext.with_cuda()):
        print("skipped: needs a GPU and a CUDA build of ptp_ext")
        return 0
    if not check(a.device, a.quick):
        return 1
    lines = [f"# sampler_mlp benchmark ({a.device})", "", _timing.machine_line(), "",
             f"command: python benchmarks/bench_sampler_mlp.py --device {a.device}"
             + (" --quick" if a.quick else ""), ""]
    if a.device == "cpu":
        lines += ["| N | d_h | d_mid | d_out | dtype | eager ms | ours ms | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
    else:
        copy_bw = _timing.copy_bandwidth_gbs()
        lines += [f"device-to-device copy bandwidth: {copy_bw:.0f} GB/s", "",
                  "| N | d_h | d_mid | d_out | dtype | eager us | ours us | ours graph us | "
                  "ratio (eager/graph) | weight GB/s | of copy bw |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for n, dh, dmid, dout, dtype in shapes(a.quick, a.device):
        if a.device == "cpu":
            args = make_inputs(n, dh, dmid, dout, dtype, "cpu")
            t_ref = _timing.cpu_median_ms(lambda: eager(args), 0.3)
            t_ours = _timing.cpu_median_ms(lambda: ours(args), 0.3)
            line = (f"| {n} | {dh} | {dmid} | {dout} | {str(dtype)[6:]} | {t_ref:.3f} | "
                    f"{t_ours:.3f} | {t_ref / t_ours:.2f} |")
        else:
            es = torch.finfo(dtype).bits // 8
            wbytes = (dmid * 2 * dh + dout * dmid) * es
            sets = _timing.rotating_copies(
                lambda i: make_inputs(n, dh, dmid, dout, dtype, "cuda", seed=i), wbytes)
            t_ref = _timing.cuda_median_ms([lambda s=s: eager(s) for s in sets]) * 1e3
            t_ours = _timing.cuda_median_ms([lambda s=s: ours(s) for s in sets]) * 1e3
            t_graph = _timing.cuda_median_ms([lambda s=s: ours(s) for s in sets],
                                             graph=True) * 1e3
            gbs = wbytes / (t_graph * 1e-6) / 1e9
            line = (f"| {n} | {dh} | {dmid} | {dout} | {str(dtype)[6:]} | {t_ref:.1f} | "
                    f"{t_ours:.1f} | {t_graph:.1f} | {t_ref / t_graph:.2f} | {gbs:.0f} | "
                    f"{gbs / copy_bw:.0%} |")
            del sets
        print(line, flush=True)
        lines.append(line)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
