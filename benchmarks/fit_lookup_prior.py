"""Fits the lookup drafter's prior acceptance rates (``ptp.drafters.lookup.PRIOR_RATES``) on the
training prompt set (``ptp.train.prompts``: written for this project, disjoint from Spec-Bench).

    python benchmarks/fit_lookup_prior.py [--prompts 96] [--max-new-tokens 128] [--out table.md]

The target answers the prompts greedily (plain decoding); every position of every answer is then
replayed as the drafter sees it: its lookup (the continuation of the most recent longest match,
``lookup_tokens`` deep), the match class, and how many of the continuation's tokens the answer
goes on with. Printed: per match class and depth the acceptance rate once the tokens before it
were accepted, and the counts behind it, as the Python literal ``PRIOR_RATES`` holds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ptp.drafters.lookup import AcceptanceModel, NgramIndex, accepted_prefix  # noqa: E402


def replay(sequences: list[tuple[list[int], list[int]]], depth: int = 4, min_ngram: int = 1,
           max_ngram: int = 3) -> AcceptanceModel:
    """The acceptance counts of every lookup along ``(prompt, answer)`` token sequences (a model
    with a zero-weight prior: its counts are the data's)."""
    model = AcceptanceModel(row_cost=1.0, prior=0.0)
    for prompt, answer in sequences:
        index = NgramIndex(min_ngram, max_ngram)
        for k in range(1, len(answer)):
            history = prompt + answer[:k]
            index.extend(history)
            found, _, length, agree = index.matches_with_features(depth, 1)
            if not found:
                continue
            a = accepted_prefix(found[0], answer[k:])
            if a is not None:  # None: the answer ended first (not scored, as in decoding)
                model.record(model.key(length, agree), len(found[0]), a)
    return model


def table(model: AcceptanceModel, depth: int) -> dict:
    """``{(bucket, agree): (rate at depth 1, ..., depth)}`` for the classes seen at depth 1
    (a depth never reached takes the one before it)."""
    out = {}
    for key in sorted({k for k, _ in model.reached}):
        rates, last = [], 0.5
        for j in range(1, depth + 1):
            n = model.reached.get((key, j), 0.0)
            if n > 0:
                last = model.accepted.get((key, j), 0.0) / n
            rates.append(round(last, 2))
        out[key] = tuple(rates)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=96, help="training prompts answered")
    ap.add_argument("--seed", type=int, default=0, help="the training prompt set's seed")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4, help="lookup_tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.e2e import write_report
    from ptp.decode.decoder import Decoder, GenerationConfig
    from ptp.models import load_target
    from ptp.train.data import chat_ids
    from ptp.train.prompts import build_prompts

    model, tok = load_target("smollm2")
    prompts = [chat_ids(tok, p) for p in build_prompts(args.prompts, seed=args.seed)]
    dec = Decoder(model, tok)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    answers = []
    for i in range(0, len(prompts), 8):
        answers += [r.new_token_ids for r in dec.generate(prompts[i:i + 8], cfg)]
    model_ = replay(list(zip(prompts, answers)), args.depth)
    rates = table(model_, args.depth)
    lines = [f"# Lookup prior: SmolLM2-135M-Instruct, {len(prompts)} training prompts (seed "
             f"{args.seed}), {args.max_new_tokens} greedy tokens, lookup_tokens {args.depth}", "",
             "| match length bucket | agree | " + " | ".join(f"depth {j}" for j in range(1, args.depth + 1))
             + " | lookups |", "|---|---|" + "---|" * (args.depth + 1)]
    for (b, agree), r in rates.items():
        lines.append(f"| {b} | {agree} | " + " | ".join(f"{x:.2f}" for x in r)
                     + f" | {int(model_.reached.get(((b, agree), 1), 0))} |")
    lines += ["", "PRIOR_RATES = {" + ", ".join(f"{k!r}: {v!r}" for k, v in rates.items()) + "}"]
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
