"""Benchmark of ``ptp_ext.ops.tree_attention`` against SDPA with an explicit boolean mask.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_tree_attention.py --device cpu [--quick]
    PYTHONPATH=$PWD python benchmarks/bench_tree_attention.py --device cuda [--quick] [--graph]
        [--save]

First a correctness check (the op against ``tree_attention_ref``), then one markdown table per
model shape: SmolLM2-135M (H_q 9, H_kv 3, D 64), Llama-7B (32/32, D 128) and a GQA variant (32/8,
D 128); contexts 512 .. 8192 (GPU: up to 32768), batch 1/8/64 on the GPU (1/8 on the CPU),
T = 1/8/32/64 new tokens forming a random tree. Every row has cache_lens = context and the cache
holds exactly context + T positions (S_max), as in a StaticCache sized for the request.

Columns: reference = ``F.scaled_dot_product_attention`` with the boolean mask built from
cache_lens and the tree mask (GPU: ``enable_gqa=True``, or repeat_interleave where unsupported);
ours; speedup = reference / ours. GPU also: achieved GB/s = bytes that must move (K and V up to
cache_len + T for every row and kv head, plus q and out) / time, and its fraction of the measured
device-to-device copy bandwidth. GPU times are CUDA-event medians rotating over enough input sets
to exceed the L2 (``benchmarks/_timing.py``); ``--graph`` replays CUDA graphs instead of eager
calls (removes launch overhead). Without a GPU, ``--device cuda`` prints "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _timing  # noqa: E402

SHAPES = [  # name, H_q, H_kv, D
    ("SmolLM2-135M (9/3, D 64)", 9, 3, 64),
    ("Llama-7B (32/32, D 128)", 32, 32, 128),
    ("Llama-7B GQA (32/8, D 128)", 32, 8, 128),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tree_mask(T: int, seed: int) -> torch.Tensor:
    from ptp_ext._testing import random_tree_parents, tree_mask_from_parents

    g = torch.Generator().manual_seed(seed)
    return tree_mask_from_parents(random_tree_parents(T, g))


def make_inputs(B, T, Hq, Hkv, D, ctx, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    S = ctx + T
    q = torch.randn(B, T, Hq, D, generator=g, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, device=device, dtype=dtype)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    m = tree_mask(T, seed).to(device).unsqueeze(0).expand(B, T, T).contiguous()
    # The reference's explicit mask [B, 1, T, S]: every cached position, then the tree block.
    full = torch.ones(B, T, S, dtype=torch.bool, device=device)
    full[:, :, ctx:] = m
    return dict(q=q, k=k, v=v, lens=lens, mask=m, sdpa_mask=full.unsqueeze(1), scale=D ** -0.5)


def sdpa_call(x, gqa_mode):
    q = x["q"].transpose(1, 2)  # [B, Hq, T, D]
    k, v = x["k"], x["v"]
    if gqa_mode == "enable_gqa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=x["sdpa_mask"], scale=x["scale"],
                                              enable_gqa=True)
    G = q.shape[1] // k.shape[1]
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=x["sdpa_mask"], scale=x["scale"])


def ours_call(x):
    import ptp_ext

    return ptp_ext.ops.tree_attention(x["q"], x["k"], x["v"], x["lens"], x["mask"], x["scale"])


def correctness(device, dtype) -> None:
    """The op against the reference on a few awkward shapes (tree masks, GQA, ragged lengths)."""
    from ptp_ext._testing import assert_attention_close, make_attention_inputs
    from ptp_ext.reference import tree_attention_ref

    import ptp_ext

    for i, (B, T, Hq, Hkv, D, S) in enumerate([(3, 5, 9, 3, 64, 700), (2, 33, 32, 8, 128, 1200),
                                                (1, 1, 32, 32, 128, 3000), (2, 64, 8, 2, 256, 300)]):
        a = make_attention_inputs(B, T, Hq, Hkv, D, S, dtype, device=device, tree=True, seed=i)
        out, lse = ptp_ext.ops.tree_attention(a.query, a.key_cache, a.value_cache, a.cache_lens,
                                              a.tree_mask, a.scale, return_lse=True)
        ref32, lse32 = tree_attention_ref(a.query.float(), a.key_cache.float(),
                                          a.value_cache.float(), a.cache_lens, a.tree_mask,
                                          a.scale)
        low, _ = tree_attention_ref(a.query, a.key_cache, a.value_cache, a.cache_lens,
                                    a.tree_mask, a.scale)
        assert_attention_close(out, ref32, low)
        torch.testing.assert_close(lse, lse32, atol=1e-3, rtol=1e-3)
    print(f"correctness: OK ({device}, {dtype})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--graph", action="store_true", help="GPU: time CUDA-graph replays")
    ap.add_argument("--save", action="store_true",
                    help="also write benchmarks/results/<date>-<device>-tree_attention.md")
    ap.add_argument("--max-cache-gb", type=float, default=6.0,
                    help="skip shapes whose K+V cache (one copy) exceeds this")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    import ptp_ext

    if cuda and not ptp_ext.with_cuda():
        print("skipped: ptp_ext was built without CUDA")
        return 0

    lines = [f"# tree_attention benchmark ({args.device}, {dtype})", "",
             f"`{' '.join(['python'] + sys.argv)}`", "", _timing.machine_line(), ""]

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    correctness(args.device, dtype)
    copy_gbs = _timing.copy_bandwidth_gbs() if cuda else None
    if cuda:
        emit(f"measured copy bandwidth: {copy_gbs:.0f} GB/s")
    contexts = [512, 1024, 2048, 4096, 8192] + ([16384, 32768] if cuda else [])
    batches = [1, 8, 64] if cuda else [1, 8]
    Ts = [1, 8, 32, 64]
    if args.quick:
        contexts = [1024, 8192] if cuda else [512, 2048]
        batches = [1, 64] if cuda else [1]
        Ts = [1, 32]
    gqa_mode = "enable_gqa"
    elt = torch.tensor([], dtype=dtype).element_size()

    for name, Hq, Hkv, D in SHAPES:
        emit(f"\n## {name}\n")
        head = "| B | T | context | reference ms | ours ms | speedup |"
        sep = "|---|---|---|---|---|---|"
        if cuda:
            head += " GB/s | of copy bw |"
            sep += "---|---|"
        emit(head)
        emit(sep)
        for B in batches:
            for T in Ts:
                for ctx in contexts:
                    kv_bytes = 2 * B * Hkv * (ctx + T) * D * elt
                    if kv_bytes > args.max_cache_gb * 2**30:
                        continue
                    must_move = kv_bytes + 2 * B * T * Hq * D * elt  # K/V read + q read + out write
                    if cuda:
                        sets = _timing.rotating_copies(
                            lambda i: make_inputs(B, T, Hq, Hkv, D, ctx, dtype, "cuda", i),
                            kv_bytes)
                        ours = _timing.cuda_median_ms([lambda x=x: ours_call(x) for x in sets],
                                                      graph=args.graph)
                        try:
                            try:
                                sdpa_call(sets[0], gqa_mode)
                            except (TypeError, RuntimeError):
                                gqa_mode = "repeat_interleave"
                            ref = _timing.cuda_median_ms(
                                [lambda x=x: sdpa_call(x, gqa_mode) for x in sets],
                                graph=args.graph)
                            ref_s, ratio = f"{ref:.4f}", f"{ref / ours:.2f}"
                        except torch.cuda.OutOfMemoryError:
                            ref_s, ratio = "oom", "-"
                        del sets
                        torch.cuda.empty_cache()
                        gbs = must_move / (ours * 1e-3) / 1e9
                        emit(f"| {B} | {T} | {ctx} | {ref_s} | {ours:.4f} | {ratio} | "
                             f"{gbs:.0f} | {gbs / copy_gbs:.0%} |")
                    else:
                        x = make_inputs(B, T, Hq, Hkv, D, ctx, dtype, "cpu", 0)
                        t_min = 0.1 if args.quick else 0.3
                        ref = _timing.cpu_median_ms(lambda: sdpa_call(x, "repeat_interleave"),
                                                    t_min)
                        ours = _timing.cpu_median_ms(lambda: ours_call(x), t_min)
                        emit(f"| {B} | {T} | {ctx} | {ref:.3f} | {ours:.3f} | {ref / ours:.2f} |")
    if cuda:
        emit(f"\nreference GQA handling: {gqa_mode}; graph replay: {args.graph}")
    if args.save:
        dev = (torch.cuda.get_device_name().replace(" ", "_") if cuda else "cpu")
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            f"{datetime.date.today():%Y-%m-%d}-{dev}-tree_attention.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
