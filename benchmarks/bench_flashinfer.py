"""ptp_ext's CUDA kernels against FlashInfer on the same inputs (issue 5), where FlashInfer imports.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/bench_flashinfer.py [--quick] [--out FILE.md]

FlashInfer is not a dependency. On a lent GPU machine (no network) carry its wheels: here,
``bash benchmarks/fetch_flashinfer_wheels.sh`` saves flashinfer-python 0.5.3 and apache-tvm-ffi
(cp312, ~10 MB) into ``.whl/``; ``benchmarks/gpu_check.sh`` installs them into a scratch
directory when ``.whl/`` is carried. FlashInfer compiles its kernels on first use (JIT, nvcc); the
first shape of each kind therefore takes a while, and the timings exclude it (warm-up).

Tree attention: ours (``ptp_ext.ops.tree_attention`` over a ``[B, H_kv, S_max, D]`` static cache)
against ``BatchPrefillWithPagedKVCacheWrapper`` with a custom mask (the general tree case), the
same wrapper with ``causal=True`` (what FlashInfer does for a chain, its best case for T > 1) and,
for T = 1, ``BatchDecodeWithPagedKVCacheWrapper`` (tensor cores when the GQA group is > 1). The
cache is handed to FlashInfer without a copy: layout ``HND`` with one page per sequence
(page_size = S_max), so both read the same bytes. Planning (``plan``, mask packing) is outside the
timed region for FlashInfer; ours needs no planning. Every FlashInfer output is checked against
ours before timing (max abs difference printed), so the rows compare the same computation.

Verify: ours in rejection mode (chain of N drafts, logits in, temperature 1: the softmax is inside
the op) against ``flashinfer.sampling.chain_speculative_sampling`` (probabilities in), timed
alone and with the ``torch.softmax`` it needs to turn logits into probabilities.

Timing: CUDA-event medians after warm-up, rotating over input sets larger than the L2
(``benchmarks/_timing.py``). Without a GPU, or without FlashInfer, prints "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import _timing  # noqa: E402

SHAPES = [  # name, H_q, H_kv, D
    ("SmolLM2-135M (9/3, D 64)", 9, 3, 64),
    ("Llama-3-8B (32/8, D 128)", 32, 8, 128),
]


def _short(e: Exception) -> str:
    """First line of an error, short enough for a table cell."""
    text = str(e).strip()
    return (text.splitlines()[0][:80] if text else type(e).__name__).replace("|", "/")


def flashinfer_custom_mask(cache_lens: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor:
    """FlashInfer's flattened ``custom_mask`` for our semantics: for row b, the ``[T, kv_len]``
    block (kv_len = cache_lens[b] + T; every cached position visible, then the tree block)
    flattened row-major, the rows' blocks concatenated. ``tree_mask``: ``[B, T, T]`` bool."""
    B, T, _ = tree_mask.shape
    blocks = []
    for b in range(B):
        c = int(cache_lens[b])
        m = torch.ones(T, c + T, dtype=torch.bool, device=tree_mask.device)
        m[:, c:] = tree_mask[b]
        blocks.append(m.reshape(-1))
    return torch.cat(blocks)


class FlashInferAttention:
    """One planned FlashInfer call for a batch shape; ``run(x)`` on any input set of that shape."""

    def __init__(self, flashinfer, kind: str, B, T, Hq, Hkv, D, S, cache_lens, tree_mask, dtype):
        dev = "cuda"
        self.kind = kind
        ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
        indptr = torch.arange(B + 1, dtype=torch.int32, device=dev)
        indices = torch.arange(B, dtype=torch.int32, device=dev)
        last = (cache_lens.to(torch.int32) + T).to(dev)
        if kind == "decode":
            self.w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                ws, "HND", use_tensor_cores=Hq // Hkv > 1)
            self.w.plan(indptr, indices, last, Hq, Hkv, D, S, q_data_type=dtype,
                        kv_data_type=dtype)
        else:
            self.w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "HND")
            qo_indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * T
            kw = dict(causal=True) if kind == "causal" else dict(
                custom_mask=flashinfer_custom_mask(cache_lens.to(dev), tree_mask.to(dev)))
            self.w.plan(qo_indptr, indptr, indices, last, Hq, Hkv, D, S,
                        q_data_type=dtype, kv_data_type=dtype, **kw)
        self.shape = (B * T, Hq, D)

    def run(self, x):
        q = x["q"].reshape(self.shape)
        return self.w.run(q, (x["k"], x["v"]))


def attention_rows(flashinfer, quick: bool, dtype, copy_gbs, emit) -> None:
    from benchmarks.bench_tree_attention import make_inputs, ours_call

    contexts = [4096] if quick else [4096, 16384]
    batches = [1, 64] if quick else [1, 8, 64]
    Ts = [1, 8] if quick else [1, 8, 32, 64]
    elt = torch.tensor([], dtype=dtype).element_size()
    for name, Hq, Hkv, D in SHAPES:
        emit(f"\n## Tree attention, {name}, {dtype}\n")
        emit("| B | T | context | ours ms | of copy bw | FlashInfer kind | FlashInfer ms | "
             "FlashInfer / ours | max abs diff |")
        emit("|---|---|---|---|---|---|---|---|---|")
        for B in batches:
            for T in Ts:
                for ctx in contexts:
                    S = ctx + T
                    kv_bytes = 2 * B * Hkv * S * D * elt
                    must_move = kv_bytes + 2 * B * T * Hq * D * elt
                    sets = _timing.rotating_copies(
                        lambda i: make_inputs(B, T, Hq, Hkv, D, ctx, dtype, "cuda", i), kv_bytes)
                    ours = _timing.cuda_median_ms([lambda x=x: ours_call(x) for x in sets])
                    frac = must_move / (ours * 1e-3) / 1e9 / copy_gbs
                    ref = ours_call(sets[0]).float()
                    kinds = ["decode", "causal"] if T == 1 else ["mask", "causal"]
                    for kind in kinds:
                        x0 = sets[0]
                        if kind == "causal":  # equal to ours only for a chain: compare on one
                            x0 = dict(x0, mask=torch.ones(B, T, T, dtype=torch.bool,
                                                          device="cuda").tril())
                        try:
                            fi = FlashInferAttention(flashinfer, kind, B, T, Hq, Hkv, D, S,
                                                     x0["lens"], x0["mask"], dtype)
                            got = fi.run(x0).float().reshape(B, T, Hq, D)
                            want = ref if kind != "causal" else ours_call(x0).float()
                            diff = f"{(got - want).abs().max().item():.1e}"
                            ms = _timing.cuda_median_ms([lambda x=x: fi.run(x) for x in sets])
                            cells = f"{ms:.4f} | {ms / ours:.2f} | {diff}"
                        except Exception as e:  # unsupported shape / JIT failure: say so
                            cells = f"- | - | failed: {_short(e)}"
                        emit(f"| {B} | {T} | {ctx} | {ours:.4f} | {frac:.0%} | {kind} | {cells} |")
                    del sets
                    torch.cuda.empty_cache()


def verify_rows(flashinfer, quick: bool, emit) -> None:
    import ptp_ext
    from benchmarks.bench_verify import make_verify_inputs

    emit("\n## Verify, chain, rejection sampling (temperature 1)\n")
    emit("| B | drafts | vocab | ours ms (logits in) | FlashInfer ms (probs in) | "
         "FlashInfer + softmax ms | FlashInfer / ours | (FlashInfer + softmax) / ours |")
    emit("|---|---|---|---|---|---|---|---|")
    vocabs = [49152] if quick else [49152, 128256]
    for B in [1, 64]:
        for N in [8]:
            for V in vocabs:
                nbytes = B * (N + 1) * V * 4 * 2

                def make(i):
                    x = make_verify_inputs(B, N + 1, V, torch.float32, "rejection",
                                           kinds=("chain",), seed=i, device="cuda")
                    probs = torch.softmax(x.target_logits, dim=-1)
                    # FlashInfer's layout: [B, N, V] draft rows (our row 0 is the root) and int32
                    return x, probs, x.draft_probs[:, 1:].contiguous(), \
                        x.draft_tokens[:, 1:].to(torch.int32).contiguous()

                sets = _timing.rotating_copies(make, nbytes, max_copies=8)
                ours = _timing.cuda_median_ms(
                    [lambda s=s: ptp_ext.ops.verify_tree(*s[0].args()) for s in sets])

                def fi_call(s, softmax: bool):
                    x, probs, q, tokens = s
                    p = torch.softmax(x.target_logits, dim=-1) if softmax else probs
                    return flashinfer.sampling.chain_speculative_sampling(q, tokens, p)

                try:
                    fi = _timing.cuda_median_ms([lambda s=s: fi_call(s, False) for s in sets])
                    fis = _timing.cuda_median_ms([lambda s=s: fi_call(s, True) for s in sets])
                    cells = f"{fi:.4f} | {fis:.4f} | {fi / ours:.2f} | {fis / ours:.2f}"
                except Exception as e:
                    cells = f"failed: {_short(e)} | - | - | -"
                emit(f"| {B} | {N} | {V} | {ours:.4f} | {cells} |")
                del sets
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--out", default=None, help="also write the report to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    try:
        import flashinfer
        import flashinfer.sampling  # noqa: F401
    except Exception as e:  # ImportError, or a missing dependency of FlashInfer
        print(f"skipped: flashinfer does not import ({type(e).__name__}: {e})")
        return 0
    import ptp_ext

    if not ptp_ext.with_cuda():
        print("skipped: ptp_ext was built without CUDA")
        return 0
    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    copy_gbs = _timing.copy_bandwidth_gbs()
    emit(f"# ptp_ext vs FlashInfer {getattr(flashinfer, '__version__', '?')} "
         f"({datetime.date.today().isoformat()})\n")
    emit(f"`python benchmarks/bench_flashinfer.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    emit(_timing.machine_line())
    emit(f"\nmeasured copy bandwidth: {copy_gbs:.0f} GB/s")
    attention_rows(flashinfer, args.quick, torch.bfloat16, copy_gbs, emit)
    verify_rows(flashinfer, args.quick, emit)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
