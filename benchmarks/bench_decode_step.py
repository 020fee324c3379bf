"""Benchmark of ptp_ext.ops.decode_step (a decoding call's whole layer stack in one op) against the
Python fast path (ptp.decode.fastpath: ~40 op calls per layer) on SmolLM2-135M-Instruct (Q4_1
GGUF blocks, Q8_0 LM head, float32 activations).

    python benchmarks/bench_decode_step.py [--threads 2] [--quick] [--out results.md]

First correctness: greedy tokens of the native step equal the fast path's and HF's (and the
per-call hidden states agree to float rounding). Then:

* per decoding call (layers + LM head) for 1..16 chain rows at a 256-token context: the fast
  path and the native step, torch.utils.benchmark medians, and the blocks' bytes per second;
* plain decoding tok/s, the two paths interleaved over the same prompts (decode only: a
  1-token run, i.e. the prefill, is subtracted);
* rooflines (``--no-roofline`` skips them): this machine's read bandwidth (a streaming sum) and
  float32 multiply-add rate (an L2-resident sgemm), and ``decode_linear``'s achieved rate per
  weight format, with the weights in L2 (compute) and streamed from DRAM (bytes).

CPU only: with --device cuda it prints "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _timing  # noqa: E402

PROMPTS = ["Write a short story about a robot learning to paint.",
           "Explain how a refrigerator works in simple terms.",
           "List five tips for staying focused while studying."]
CONTEXT = 256
DIFFS: list = []  # (T, |native - fast path|, |BLAS - fast path| max over the logits, max |logit|)


def _load():
    from ptp.models import load_target

    model, tok = load_target("smollm2")
    return model.eval(), tok


def cpu_clock_ms(fn, min_run_time: float) -> float:
    """Median process CPU time of ``fn()`` in ms (batches of calls): on a shared, oversubscribed
    machine the CPU time a 1-thread run consumes is far steadier than its wall time."""
    fn()
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < 0.05:
        fn()
        n += 1
    samples = []
    end = time.process_time() + min_run_time
    while time.process_time() < end or len(samples) < 5:
        a = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - a) / n * 1e3)
    return statistics.median(samples)


def _clock(kind: str):
    return time.process_time if kind == "cpu" else time.perf_counter


def per_call(model, rows: list[int], min_run_time: float, clock: str) -> list[tuple[int, float, float]]:
    """[(T, fast path ms, native ms)] for one decoding call of T chain rows (layers + LM head)."""
    from ptp.decode.cache import RowCache
    from ptp.decode.fastpath import fast_forward_for
    from ptp.decode.linear import LinearRouter
    from ptp.decode.native import native_step_for

    fast = fast_forward_for(model)
    native = native_step_for(fast, required=True)
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = cfg.hidden_size // cfg.num_attention_heads
    S = CONTEXT + 64
    g = torch.Generator().manual_seed(0)
    cache = RowCache(L, 1, S)
    for layer in cache.layers:
        layer.lazy_initialization(torch.randn(1, Hkv, 1, D, generator=g), torch.randn(1, Hkv, 1, D))
        layer.keys.normal_(generator=g)
        layer.values.normal_(generator=g)
    lens = torch.tensor([CONTEXT])
    out = []
    with torch.inference_mode(), LinearRouter(model) as linears:
        linears.active = True
        for T in rows:
            ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
            pos = lens.view(1, 1) + torch.arange(T)
            h = fast.embed(ids)

            def call(use_native: bool, invariant: bool = True):
                cache.set_write_positions(lens, [CONTEXT], T)
                fast.native = native if use_native else None
                lin = linears if invariant else None  # None: F.linear (BLAS) everywhere
                return fast.logits(fast(h, pos, cache, lens, None, lin), lin)

            ref = call(False)
            diff = float((call(True) - ref).abs().max())
            blas = float((call(False, invariant=False) - ref).abs().max())
            DIFFS.append((T, diff, blas, float(ref.abs().max())))
            if diff > 0.1 * float(ref.abs().max()):
                raise SystemExit(f"FAIL: T={T}: native logits differ from the fast path's by {diff}")
            timer = cpu_clock_ms if clock == "cpu" else _timing.cpu_median_ms
            py = timer(lambda: call(False), min_run_time)
            nat = timer(lambda: call(True), min_run_time)
            out.append((T, py, nat))
    fast.native = None
    return out


def decode_rate(model, tok, new_tokens: int, repeats: int, clock: str) -> tuple[dict, bool]:
    """Plain decoding tok/s per path (median over prompts x repeats, interleaved) and whether the
    two paths gave the same tokens."""
    from ptp.decode.decoder import Decoder, GenerationConfig

    dec = Decoder(model, tok)
    times = {False: [], True: []}
    same = True
    for _ in range(repeats):
        for p in PROMPTS:
            toks = {}
            for native in (False, True):
                cfg = dict(eos_token_ids=(), native_step=native)
                now = _clock(clock)
                t0 = now()
                dec.generate(p, GenerationConfig(max_new_tokens=1, **cfg))
                t1 = now()
                r = dec.generate(p, GenerationConfig(max_new_tokens=new_tokens, **cfg))
                t2 = now()
                times[native].append((new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
                toks[native] = r.new_token_ids
            same &= toks[False] == toks[True]
    return {k: statistics.median(v) for k, v in times.items()}, same


def _median_s(fn, reps: int = 9) -> float:
    """Median seconds of ``reps`` calls after one warm-up (fixed counts: the roofline's figures
    are medians of these, not ``_timing``'s autoranged blocks)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _blocks(M: int, K: int, fmt: str, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Random weights of ``M x K`` in decode_linear's format ``fmt`` and its code."""
    from ptp_ext import ops
    from ptp_ext.reference import quantize_ref

    w = torch.randn(M, K, generator=g) * 0.05
    if fmt == "q4_1_split":
        w = ops.q4_1_split(quantize_ref(w, "q4_1"))
    elif fmt != "float32":
        w = quantize_ref(w, fmt)
    return w, ops.DECODE_STEP_FORMATS[fmt]


def roofline(threads: int) -> list[str]:
    """Markdown lines: machine limits and decode_linear's achieved rates against them."""
    from ptp_ext import ops

    g = torch.Generator().manual_seed(0)
    lines = ["", "## Rooflines", ""]
    limits = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        big = torch.ones(128 << 20)  # 512 MiB of float32
        bw = big.numel() * 4 / _median_s(lambda: big.sum(), 9) / 1e9
        a, b = torch.randn(256, 576, generator=g), torch.randn(576, 576, generator=g)
        flops = 2 * 256 * 576 * 576 / _median_s(lambda: torch.mm(a, b), 51) / 1e9
        limits[t] = (bw, flops)
        lines.append(f"* {t} thread{'s' if t > 1 else ''}: read bandwidth {bw:.1f} GB/s (a streaming "
                     f"`sum` over 512 MiB); float32 multiply-adds {flops:.0f} GFLOP/s (L2-resident "
                     "sgemm 256 x 576 x 576, torch's BLAS)")
        del big
    lines += ["", "`decode_linear`, one thread, a 1536 x 576 weight resident in L2 (compute): ns per "
              "32-weight block and row of x, GFLOP/s (2 flops per weight and row) and its share of the "
              "sgemm rate above:", "",
              "| format | bytes / block | 1 row | 2 rows | 4 rows | 8 rows |", "|---|---:|---:|---:|---:|---:|"]
    torch.set_num_threads(1)
    M, K = 1536, 576
    blocks = M * K // 32
    formats = ["q4_1", "q4_1_split", "q8_0", "float32"]
    for fmt in formats:
        w, code = _blocks(M, K, fmt, g)
        cells = []
        for n in (1, 2, 4, 8):
            x = torch.randn(n, K, generator=g)
            sec = _median_s(lambda: ops.decode_linear(x, w, code), 201)
            gf = 2 * M * K * n / sec / 1e9
            cells.append(f"{sec / blocks * 1e9:.2f} ns, {gf:.1f} GF/s ({gf / limits[1][1]:.0%})")
        lines.append(f"| {fmt} | {w.numel() * w.element_size() / blocks:.0f} | " + " | ".join(cells) + " |")
    torch.set_num_threads(threads)
    lines += ["", f"`decode_linear`, {threads} thread{'s' if threads > 1 else ''}, 1 row, the weights "
              "streamed from DRAM (a 49152 x 576 matrix, SmolLM2's LM head shape; 256 MiB read between "
              "calls to evict it): GB/s of weight bytes and the share of the read bandwidth:", "",
              "| format | MiB | ms | GB/s | of read bandwidth |", "|---|---:|---:|---:|---:|"]
    flush = torch.ones(64 << 20)
    M = 49152
    for fmt in formats:
        w, code = _blocks(M, K, fmt, g)
        x = torch.randn(1, K, generator=g)
        ts = []
        for _ in range(15):
            flush.add_(1.0)
            t0 = time.perf_counter()
            ops.decode_linear(x, w, code)
            ts.append(time.perf_counter() - t0)
        sec = statistics.median(ts)
        nbytes = w.numel() * w.element_size()
        gbs = nbytes / sec / 1e9
        lines.append(f"| {fmt} | {nbytes / 2**20:.1f} | {sec * 1e3:.2f} | {gbs:.1f} | "
                     f"{gbs / limits[threads][0]:.0%} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="wall: torch.utils.benchmark medians; cpu: process CPU time (steadier on a "
                         "shared machine; meaningful with --threads 1)")
    ap.add_argument("--no-roofline", action="store_true", help="skip the rooflines section")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device != "cpu":
        print("decode_step is CPU-only: skipped")
        return 0
    from ptp.train.models import smollm2_available

    if not smollm2_available():
        print("SmolLM2 not cached: skipped")
        return 0
    torch.set_num_threads(args.threads)
    model, tok = _load()
    from ptp.decode.quant import attached_bytes

    qbytes, _ = attached_bytes(model)
    rows = [1, 2, 4, 8, 16] if args.quick else list(range(1, 17))
    calls = per_call(model, rows, 0.3 if args.quick else 1.0, args.clock)
    rate, same = decode_rate(model, tok, 32 if args.quick else 64, 1 if args.quick else 3, args.clock)
    lines = [f"# decode_step vs the Python fast path, SmolLM2-135M-Instruct (Q4_1), {args.threads} threads",
             "", f"date: {datetime.date.today()}; machine: {platform.machine()} {platform.processor() or ''}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}",
             f"command: `python benchmarks/bench_decode_step.py --threads {args.threads} --clock {args.clock}"
             f"{' --quick' if args.quick else ''}`; times: {args.clock} clock", "",
             f"correctness: native greedy tokens == fast path's over {len(PROMPTS)} prompts: "
             f"{'PASS' if same else 'FAIL'}", "",
             f"plain decoding (decode only, median): fast path {rate[False]:.1f} tok/s, "
             f"native step {rate[True]:.1f} tok/s ({rate[True] / rate[False]:.2f}x)", "",
             f"one decoding call (layers + LM head, {CONTEXT}-token context; blocks read per call: "
             f"{qbytes / 2**20:.1f} MiB)"]
    lines += ["", "logits of the per-call inputs, max abs difference to the fast path (row-invariant "
              "ops), native step and BLAS (`F.linear`, the prefill's kernel) for scale:", "",
              "| rows | native | BLAS | max abs logit |", "|---:|---:|---:|---:|"]
    lines += [f"| {T} | {d:.2e} | {b:.2e} | {m:.1f} |" for T, d, b, m in DIFFS]
    lines += ["", "| rows | fast path ms | native ms | speed-up | native GB/s (blocks) |", "|---:|---:|---:|---:|---:|"]
    for T, py, nat in calls:
        lines.append(f"| {T} | {py:.2f} | {nat:.2f} | {py / nat:.2f}x | {qbytes / nat / 1e6:.1f} |")
    if not args.no_roofline:
        lines += roofline(args.threads)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
