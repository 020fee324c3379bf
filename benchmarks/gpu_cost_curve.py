"""Per-call cost of a Llama-3-8B-shaped target on one GPU, and each drafter's projected speedup.

The target: ``LlamaForCausalLM`` with Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 layers, 32
query / 8 KV heads of 128, vocabulary 128256, untied head: 8.03 B parameters) and random bf16
weights, built layer for layer on the GPU (nothing downloaded; ``--layers`` builds fewer for a
smoke run and reports them as measured, not scaled). One decoding call of R rows (a chain: causal
among the rows) over a KV cache holding ``context`` random tokens runs through ptp's decode path
(``ptp.decode.fastpath`` + ``ptp_ext.tree_attention``) captured in a CUDA graph by
:class:`ptp.decode.cuda_graphs.GraphRunner`, with logits for every row. Timed: the graph replay
alone (CUDA events, median) and the runner's whole call (host padding and copies + replay, synced),
and the same call eagerly (no graph). Floors: the bytes a call must read (weights + the cached
K/V) over the measured copy bandwidth, and its FLOPs over the measured bf16 matrix rate.

Projection: a drafter setting that commits ``tau`` tokens per target call with ``R`` rows per call
(computed rows: the bucket's) runs at ``tau * c(1) / c(R)`` times plain decoding's speed on this
target, where ``c`` is the measured call cost (linear between measured row counts, extrapolated
past the last) -- counting target calls only: the drafter's host work and verify are left out, and
the aux rows' logits (which the decoder does not compute) are counted. A projection, not a
measurement. ``tau`` and ``R`` come from ``--e2e-stats`` (the JSON of ``benchmarks/e2e.py
--stats-json`` on a GPU: SmolLM2, the same drafters) or from the defaults below (CPU results files).

    PYTHONPATH=$PWD:$PWD/python python benchmarks/gpu_cost_curve.py --out cost.md [--e2e-stats e2e.json]

Without a GPU it prints "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
ROWS = (1, 8, 32, 64, 128, 256, 512, 1024)
CONTEXTS = (512, 4096)

# tokens per target call and rows per call on SmolLM2 when no --e2e-stats is given (greedy, 13
# Spec-Bench dev prompts x 128 tokens). Rows are estimates where the results files give none.
DEFAULT_SETTINGS = {
    # benchmarks/results/2026-12-06-cpu-cptp-v4-trees.md: 3.70 tokens/call, "~1,450 rows a call"
    "cptp tree 64 nodes + lookup 3x32": (3.70, 1450.0),
    # the same file: 48 nodes, top 6, lookup 24: 3.54 tokens/call (rows ~ 48 x 7 + 48)
    "cptp tree 48 nodes + lookup 3x24": (3.54, 1100.0),
}


def gpu_ceilings(device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured here."""
    src = torch.empty(1 << 29, dtype=torch.uint8, device=device).random_()  # 512 MiB
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

    def timed(fn, n):
        for _ in range(3):
            fn()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(n):
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return statistics.median(times)

    bw = 2 * src.numel() / timed(lambda: dst.copy_(src), 10)
    flops = 2 * 8192 ** 3 / timed(lambda: a @ b, 10)
    return bw, flops


def build_target(layers: int, device, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and initialised) in bf16 on the GPU
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # explicit random values (never time on zeros or uninitialised memory)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.requires_grad_(False).eval()


@torch.inference_mode()
def call_costs(model, context: int, rows: tuple[int, ...], reps: int, eager_reps: int) -> dict:
    """{R: (replay ms, whole call ms, eager call ms)} at ``context`` cached tokens."""
    from ptp.decode.cache import RowCache
    from ptp.decode.cuda_graphs import GraphRunner
    from ptp.decode.fastpath import fast_forward_for

    dev = model.device
    cfg = model.config
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    cap = context + max(rows)
    cache = RowCache(L, 1, cap, initial_len=cap)
    proto = torch.empty(1, Hkv, 1, D, dtype=model.dtype, device=dev)
    for layer in cache.layers:  # random K/V for the context (no prefill needed to time a call)
        layer.lazy_initialization(proto, proto)
        layer.keys.normal_()
        layer.values.normal_()
    fast = fast_forward_for(model)
    graphs = GraphRunner(fast, cache, None, capture=True, node_buckets=rows, aux_buckets=(0,))
    eager = GraphRunner(fast, cache, None, capture=False, node_buckets=rows, aux_buckets=(0,))
    lens = torch.tensor([context], device=dev)
    out = {}
    for R in rows:
        ids = torch.randint(0, cfg.vocab_size, (1, R), device=dev)
        pos = context + torch.arange(R, device=dev).view(1, R)

        def call(runner):
            return runner.forward(ids, pos, lens, None, None, context)

        call(graphs)  # capture
        graph = graphs.graph_for(1, R, 0)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replay, whole, eag = [], [], []
        for _ in range(3):
            graph.replay()
        for _ in range(reps):
            s.record()
            graph.replay()
            e.record()
            e.synchronize()
            replay.append(s.elapsed_time(e))
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(graphs)
            torch.cuda.synchronize()
            whole.append((time.perf_counter() - t0) * 1e3)
        call(eager)
        for _ in range(eager_reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(eager)
            torch.cuda.synchronize()
            eag.append((time.perf_counter() - t0) * 1e3)
        out[R] = (statistics.median(replay), statistics.median(whole), statistics.median(eag))
        print(f"context {context} rows {R}: replay {out[R][0]:.3f} ms, call {out[R][1]:.3f} ms, "
              f"eager {out[R][2]:.3f} ms", file=sys.stderr)
    del graphs, eager, cache
    torch.cuda.empty_cache()
    return out


def interpolate(curve: dict, r: float) -> tuple[float, bool]:
    """Cost at ``r`` rows, linear between measured points; (value, extrapolated)."""
    xs = sorted(curve)
    if r <= xs[0]:
        return curve[xs[0]], False
    for a, b in zip(xs, xs[1:]):
        if r <= b:
            return curve[a] + (curve[b] - curve[a]) * (r - a) / (b - a), False
    a, b = xs[-2], xs[-1]
    return curve[b] + (curve[b] - curve[a]) * (r - b) / (b - a), True


def settings_from(path) -> dict:
    """{name: (tokens per call, rows per call)} from an e2e --stats-json file (ptp methods with
    CUDA-graph row counts), else the defaults."""
    if not path:
        return dict(DEFAULT_SETTINGS)
    with open(path) as f:
        stats = json.load(f)
    out = {}
    for name, s in stats.items():
        if "bucket_rows_per_call" in s:
            out[name] = (s["tokens_per_call"], s["bucket_rows_per_call"])
    return out


def measure(layers: int, rows: tuple[int, ...], contexts: tuple[int, ...], reps: int, eager_reps: int
            ) -> dict:
    """Everything the report needs, as JSON-ready data (``--save-curve`` writes it)."""
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    bw, peak = gpu_ceilings(dev)
    model = build_target(layers, dev)
    cfg = model.config
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, layers=layers,
                params=sum(p.numel() for p in model.parameters()), build_s=time.perf_counter() - t0,
                copy_bytes_per_s=bw, matmul_flops=peak, vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, kv_heads=cfg.num_key_value_heads,
                heads=cfg.num_attention_heads, head_dim=cfg.head_dim, reps=reps, eager_reps=eager_reps)
    curves = {str(ctx): {str(R): v for R, v in call_costs(model, ctx, rows, reps, eager_reps).items()}
              for ctx in contexts}
    return {"meta": meta, "curves": curves}


def report(data: dict, settings: dict, stats_name, command: str) -> str:
    m = data["meta"]
    curves = {int(c): {int(R): tuple(v) for R, v in cv.items()} for c, cv in data["curves"].items()}
    contexts = sorted(curves)
    bw, peak, L = m["copy_bytes_per_s"], m["matmul_flops"], m["layers"]
    date = datetime.date.today().isoformat()
    lines = [f"# Per-call cost of a Llama-3-8B-shaped target, {m['device']} ({date})\n",
             f"Command: `{command}`\n",
             f"Target: LlamaForCausalLM, Llama-3-8B shapes with {L} of its 32 layers "
             f"({'measured at full depth' if L == 32 else 'NOT scaled to 32 layers'}), "
             f"{m['params'] / 1e9:.2f} B parameters, random bf16 weights built on the GPU "
             f"({m['build_s']:.0f} s "
             f"with the ceilings). torch {m['torch']}. Measured here: copy {bw / 1e12:.2f} TB/s "
             f"(read + write), bf16 matmul {peak / 1e12:.0f} TFLOP/s.\n",
             "One decoding call of R rows (causal among them), logits for every row, batch 1, through "
             "ptp's fast path and tree attention. *replay*: the captured graph alone (CUDA events, "
             f"median of {m['reps']}); *call*: GraphRunner.forward (padding, copies into the static "
             f"buffers, replay; synced, median of {m['reps']}); *eager*: the same call without a graph "
             f"(median of {m['eager_reps']}). *floor*: max(bytes / copy bandwidth, FLOPs / matmul rate), "
             "bytes = weights + cached K/V read once.\n"]
    weight_bytes = m["params"] * 2
    body = m["params"] - m["vocab_size"] * m["hidden_size"]  # the embedding is a gather, not a matmul
    for ctx in contexts:
        kv_bytes = ctx * L * 2 * m["kv_heads"] * m["head_dim"] * 2
        lines.append(f"\n## Context {ctx}\n")
        lines.append("| rows | replay ms | call ms | eager ms | floor ms | replay / floor | ms per row |")
        lines.append("|---|---|---|---|---|---|---|")
        for R in sorted(curves[ctx]):
            rp, wh, eg = curves[ctx][R]
            attn = 4 * R * (ctx + R) * m["heads"] * m["head_dim"] * L
            floor = max((weight_bytes + kv_bytes) / bw, (2 * body * R + attn) / peak) * 1e3
            lines.append(f"| {R} | {rp:.3f} | {wh:.3f} | {eg:.3f} | {floor:.3f} | {rp / floor:.2f} | "
                         f"{wh / R:.4f} |")
    if settings:
        lines.append("\n## Projected speedup on this target (a projection, not a measurement)\n")
        lines.append("speedup = tokens per call x c(1) / c(rows per call), c = the *call* column; target "
                     "calls only (no drafter host work, no verify). Tokens and rows per call: "
                     + (f"`{os.path.basename(stats_name)}` (SmolLM2 on this GPU, rows = the "
                        "buckets' computed rows)" if stats_name else
                        "the CPU results files (rows estimated)")
                     + ". `*`: rows past the curve, extrapolated.\n")
        head = "| setting | tokens per call | rows per call | " + " | ".join(
            f"c(rows) ms @{c} | speedup @{c}" for c in contexts) + " |"
        lines.append(head)
        lines.append("|---|---|---|" + "---|---|" * len(contexts))
        for sname, (tau, r) in settings.items():
            cells = []
            for ctx in contexts:
                curve = {R: v[1] for R, v in curves[ctx].items()}
                c, extra = interpolate(curve, r)
                cells.append(f"{c:.2f}{'*' if extra else ''} | {tau * curve[min(curve)] / c:.2f}x")
            lines.append(f"| {sname} | {tau:.2f} | {r:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers built (32: Llama-3-8B's)")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--eager-reps", type=int, default=5)
    ap.add_argument("--e2e-stats", default=None, help="benchmarks/e2e.py --stats-json output")
    ap.add_argument("--save-curve", default=None, help="also write the measurements as JSON")
    ap.add_argument("--from-curve", default=None,
                    help="report from a --save-curve file (no GPU needed), e.g. with new --e2e-stats")
    ap.add_argument("--out", default=None, help="markdown report (default: stdout only)")
    args = ap.parse_args(argv)
    command = "PYTHONPATH=$PWD:$PWD/python python benchmarks/gpu_cost_curve.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    if args.from_curve:
        with open(args.from_curve) as f:
            data = json.load(f)
    else:
        if not torch.cuda.is_available():
            print("skipped: no CUDA GPU (torch.cuda.is_available() is False)")
            return 0
        sys.path.insert(0, os.path.join(ROOT, "python"))
        sys.path.insert(0, ROOT)
        data = measure(args.layers, tuple(int(r) for r in args.rows.split(",")),
                       tuple(int(c) for c in args.contexts.split(",")), args.reps, args.eager_reps)
        if args.save_curve:
            with open(args.save_curve, "w") as f:
                json.dump(data, f, indent=1)
    text = report(data, settings_from(args.e2e_stats), args.e2e_stats, command)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
