"""Microbenchmark of ptp_ext.ops.invariant_linear against F.linear (BLAS / cuBLAS).

    python benchmarks/bench_invariant_linear.py --device cpu [--quick] [--out results.md]
    python benchmarks/bench_invariant_linear.py --device cuda [--quick] [--out results.md]

First correctness (against ptp_ext.reference.invariant_linear_ref) and the op's promise: every
row of an N-row call bitwise equal to the same row in a 1-row call (printed for F.linear too,
which fails it on CPUs). Then a table per row count N: the time of one *whole decoding step's
linear layers* of SmolLM2-135M (30 layers x q/k/v/o/gate/up/down + the 49152 x 576 LM head,
float32, ~540 MB of weights, so weights stream from DRAM as in decoding), F.linear vs ours,
and the ratio. CPU: torch.utils.benchmark medians. GPU: CUDA-event medians of the same pass in
the model's bf16. Without a GPU, --device cuda prints "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _timing  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocabulary 49152, 30 layers
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LM_HEAD = (49152, 576)


def weights(device, dtype, layers=30):
    g = torch.Generator().manual_seed(0)

    def r(n, k):
        return (torch.randn(n, k, generator=g) * k ** -0.5).to(device=device, dtype=dtype)

    return [r(n, k) for _ in range(layers) for n, k in LAYER] + [r(*LM_HEAD)]


def step(fn, ws, xs):
    for w in ws:
        fn(xs[w.shape[1]], w)


def check(device: str) -> bool:
    from ptp_ext.ops import invariant_linear
    from ptp_ext.reference import invariant_linear_ref

    ok = True
    g = torch.Generator().manual_seed(1)
    for n, k, m in [(1, 576, 576), (7, 576, 1536), (33, 1536, 576), (5, 67, 129)]:
        x = torch.randn(n, k, generator=g).to(device)
        w = (torch.randn(m, k, generator=g) * k ** -0.5).to(device)
        b = torch.randn(m, generator=g).to(device)
        err = (invariant_linear(x, w, b) - invariant_linear_ref(x, w, b)).abs().max().item()
        if not err <= 1e-4:
            ok = False
            print(f"FAIL N={n} K={k} M={m}: max err {err:.3g}")
    x = torch.randn(40, 576, generator=g).to(device)
    w = (torch.randn(1536, 576, generator=g) * 576 ** -0.5).to(device)
    for name, fn in (("F.linear", F.linear), ("invariant_linear", invariant_linear)):
        full = fn(x, w)
        bad = [n for n in range(1, 40) if not torch.equal(fn(x[:n], w), full[:n])]
        print(f"{name}: rows bitwise independent of the row count (N = 1..39): "
              + ("yes" if not bad else f"NO (differs at N = {bad[:8]}{' ...' if len(bad) > 8 else ''})"))
        if name == "invariant_linear" and bad:
            ok = False
    print("correctness:", "PASS" if ok else "FAIL")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    a = ap.parse_args()
    import ptp_ext
    from ptp_ext.ops import invariant_linear

    if a.device == "cuda" and not (torch.cuda.is_available() and ptp_ext.with_cuda()):
        print("skipped: needs a GPU and a CUDA build of ptp_ext")
        return 0
    if not check(a.device):
        return 1
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    ws = weights(a.device, dtype)
    mb = sum(w.numel() for w in ws) * w_bytes(dtype) / 2**20
    lines = [f"# invariant_linear benchmark ({a.device})", "", _timing.machine_line(), "",
             f"command: python benchmarks/bench_invariant_linear.py --device {a.device}"
             + (" --quick" if a.quick else ""), "",
             f"One decoding step's linear layers of SmolLM2-135M ({len(ws)} matrices, "
             f"{mb:.0f} MiB of {str(dtype)[6:]} weights), N rows per call.", "",
             "| N | F.linear ms | invariant_linear ms | ratio (F.linear / ours) |",
             "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for n in ([1, 4, 16] if a.quick else [1, 2, 4, 8, 16, 32, 64]):
        g = torch.Generator().manual_seed(n)
        xs = {k: torch.randn(n, k, generator=g).to(device=a.device, dtype=dtype) for k in (576, 1536)}
        if a.device == "cpu":
            t_ref = _timing.cpu_median_ms(lambda: step(F.linear, ws, xs), 1.0)
            t_ours = _timing.cpu_median_ms(lambda: step(invariant_linear, ws, xs), 1.0)
        else:
            t_ref = _timing.cuda_median_ms([lambda: step(F.linear, ws, xs)], iters=20)
            t_ours = _timing.cuda_median_ms([lambda: step(invariant_linear, ws, xs)], iters=20)
        line = f"| {n} | {t_ref:.2f} | {t_ours:.2f} | {t_ref / t_ours:.2f} |"
        print(line, flush=True)
        lines.append(line)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


def w_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


if __name__ == "__main__":
    sys.exit(main())
