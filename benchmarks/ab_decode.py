"""Interleaved A/B of decoding methods in one process: decode tok/s and tokens per call.

Every prompt is decoded by every method in turn (the order alternating prompt by prompt), so a
shared machine's slow spells hit the methods alike; the ratios are against the first method.
Each method's tokens are checked against the first's, prompt by prompt (greedy, or coupled
sampling with the same uniforms: every exact method gives the same tokens).

    PYTHONPATH=$PWD:$PWD/python python benchmarks/ab_decode.py --per-category 1 --reps 2 \\
        lookup 'lookup:heads=default'

A method is a drafter name with options, ``name[:key=value;...]`` (``none``: plain decoding).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("methods", nargs="+", help="name[:key=value;...], the first is the reference")
    ap.add_argument("--prompts", default=None, help="Spec-Bench JSONL (default: the dev file)")
    ap.add_argument("--per-category", type=int, default=1, help="prompts per Spec-Bench category")
    ap.add_argument("--reps", type=int, default=2, help="passes over the prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else coupled sampling, seed 0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if min(args.per_category, args.reps, args.max_new_tokens, args.threads) < 1 or args.temperature < 0:
        raise SystemExit("--per-category, --reps, --max-new-tokens and --threads must be >= 1, "
                         "--temperature >= 0")

    sys.path.insert(0, os.path.join(ROOT, "python"))
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks.e2e import _default_prompts, parse_method, run_ptp
    from benchmarks.vs_llamacpp import per_category
    from ptp.cli import chat_prompt_ids, eos_ids, read_specbench
    from ptp.decode.decoder import Decoder
    from ptp.drafters import make_drafter
    from ptp.models import load_target

    torch.set_num_threads(args.threads)
    questions = per_category(read_specbench(args.prompts or _default_prompts()), args.per_category)
    model, tokenizer = load_target("smollm2")
    eos = eos_ids(model, tokenizer)
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in questions]
    drafters, decoders = {}, {}
    for spec in args.methods:
        name, opts = parse_method(spec.replace(";", ","))
        drafters[spec] = make_drafter(name, model, tokenizer, **opts)
        decoders[spec] = Decoder(model, tokenizer, drafters[spec])
        run_ptp(model, tokenizer, drafters[spec], prompts[:1], 16, eos, temperature=args.temperature,
                decoder=decoders[spec])  # warm-up
    total = {s: [0, 0.0, 0] for s in args.methods}  # decode tokens, seconds, target calls
    per_cat: dict = defaultdict(lambda: [0, 0.0])
    for rep in range(args.reps):
        for i, p in enumerate(prompts):
            order = args.methods if (i + rep) % 2 == 0 else args.methods[::-1]
            tokens = {}
            for s in order:
                ids, calls, _, dec_s, dec_n = run_ptp(model, tokenizer, drafters[s], [p], args.max_new_tokens,
                                                      eos, temperature=args.temperature, decoder=decoders[s],
                                                      first_id=i)[0]
                tokens[s] = ids
                total[s][0] += dec_n
                total[s][1] += dec_s
                total[s][2] += calls
                c = per_cat[(questions[i].get("category", "?"), s)]
                c[0] += dec_n
                c[1] += dec_s
            bad = [s for s in args.methods if tokens[s] != tokens[args.methods[0]]]
            if bad:
                raise SystemExit(f"prompt {i}: {bad} gave other tokens than {args.methods[0]!r}")
    ref = total[args.methods[0]][0] / total[args.methods[0]][1]
    mode = "greedy" if args.temperature == 0 else f"T = {args.temperature:g}"
    print(f"{len(prompts)} prompts x {args.reps}, {mode}, decode tok/s (ratio to {args.methods[0]!r}), "
          f"tokens per call; every method's tokens equal the first's")
    for s in args.methods:
        n, t, c = total[s]
        print(f"  {s:48s} {n / t:7.1f}  {n / t / ref:.3f}x  {n / max(c, 1):.3f}")
    cats = list(dict.fromkeys(q.get("category", "?") for q in questions))
    print("per category:", " | ".join(args.methods))
    for c in cats:
        print(f"  {c:16s} " + " ".join(f"{per_cat[(c, s)][0] / max(per_cat[(c, s)][1], 1e-9):7.1f}"
                                       for s in args.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
