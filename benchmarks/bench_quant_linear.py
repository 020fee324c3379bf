"""Microbenchmark of ptp_ext.ops.quant_linear (GGUF blocks) against invariant_linear and F.linear
on the same weights in float32.

    python benchmarks/bench_quant_linear.py --device cpu [--quick] [--out results.md]
    python benchmarks/bench_quant_linear.py --device cuda [--quick] [--out results.md]

First correctness: quant_linear bitwise equal to invariant_linear on the dequantised weights, and
row-invariant. Then a table per row count N: one *whole decoding step's linear layers* of
SmolLM2-135M as the GGUF ships them (210 Q4_1 matrices + the Q8_0 49152 x 576 LM head, 93 MiB of
blocks standing for 540 MB of float32): F.linear and invariant_linear on the float32 weights, and
quant_linear on the blocks. CPU: torch.utils.benchmark medians. GPU: CUDA-event medians. Without
a GPU, --device cuda prints "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _timing  # noqa: E402
from benchmarks.bench_invariant_linear import LAYER, LM_HEAD  # noqa: E402


def blocks(device, layers=30):
    """[(qweight, format, float32 weight)] for one step of SmolLM2-135M's linears."""
    from ptp_ext.reference import dequantize_ref, quantize_ref

    g = torch.Generator().manual_seed(0)
    out = []
    for (n, k), fmt in [(s, "q4_1") for _ in range(layers) for s in LAYER] + [(LM_HEAD, "q8_0")]:
        q = quantize_ref(torch.randn(n, k, generator=g) * k ** -0.5, fmt)
        out.append((q.to(device), fmt, dequantize_ref(q, fmt).to(device)))
    return out


def check(device: str) -> bool:
    from ptp_ext.ops import invariant_linear, quant_linear
    from ptp_ext.reference import dequantize_ref, quantize_ref

    ok = True
    g = torch.Generator().manual_seed(1)
    for fmt in ("q4_1", "q8_0"):
        for n, k, m in [(1, 576, 576), (7, 576, 1536), (33, 1536, 576)]:
            x = torch.randn(n, k, generator=g).to(device)
            q = quantize_ref(torch.randn(m, k, generator=g) * k ** -0.5, fmt)
            w = dequantize_ref(q, fmt).to(device)
            q = q.to(device)
            y = quant_linear(x, q, fmt)
            same = torch.equal(y, invariant_linear(x, w))
            rows = all(torch.equal(quant_linear(x[i:i + 1], q, fmt), y[i:i + 1]) for i in range(n))
            if not (same and rows):
                ok = False
                print(f"FAIL {fmt} N={n} K={k} M={m}: bitwise invariant_linear {same}, row-invariant {rows}")
    print("correctness (bitwise invariant_linear of the dequantised weights, row-invariant):",
          "PASS" if ok else "FAIL")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    a = ap.parse_args()
    import ptp_ext
    from ptp_ext.ops import invariant_linear, quant_linear

    if a.device == "cuda" and not (torch.cuda.is_available() and ptp_ext.with_cuda()):
        print("skipped: needs a GPU and a CUDA build of ptp_ext")
        return 0
    if not check(a.device):
        return 1
    bs = blocks(a.device)
    qmb = sum(q.numel() for q, _, _ in bs) / 2**20
    fmb = sum(w.numel() for _, _, w in bs) * 4 / 2**20
    lines = [f"# quant_linear benchmark ({a.device})", "", _timing.machine_line(), "",
             f"command: python benchmarks/bench_quant_linear.py --device {a.device}"
             + (" --quick" if a.quick else ""), "",
             f"One decoding step's linear layers of SmolLM2-135M ({len(bs)} matrices: {qmb:.0f} MiB "
             f"of Q4_1 / Q8_0 blocks, {fmb:.0f} MiB as float32), N rows per call.", "",
             "| N | F.linear ms (fp32) | invariant_linear ms (fp32) | quant_linear ms (blocks) "
             "| quant vs invariant | quant vs F.linear |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)

    def run(kind, xs):
        for q, fmt, w in bs:
            x = xs[w.shape[1]]
            if kind == 0:
                F.linear(x, w)
            elif kind == 1:
                invariant_linear(x, w)
            else:
                quant_linear(x, q, fmt)

    for n in ([1, 4, 16] if a.quick else [1, 2, 4, 8, 16, 32]):
        g = torch.Generator().manual_seed(n)
        xs = {k: torch.randn(n, k, generator=g).to(a.device) for k in (576, 1536)}
        if a.device == "cpu":
            t = [_timing.cpu_median_ms(lambda kind=kind: run(kind, xs), 1.0) for kind in range(3)]
        else:
            t = [_timing.cuda_median_ms([lambda kind=kind: run(kind, xs)], iters=20) for kind in range(3)]
        line = f"| {n} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {t[1] / t[2]:.2f}x | {t[0] / t[2]:.2f}x |"
        print(line, flush=True)
        lines.append(line)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
