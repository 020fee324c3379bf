"""Offline tree simulation for MTP heads: tokens per target call of the heads' best-first tree
(``HeadsDrafter._tree``, the code decoding runs) on the held-out sequences of a heads training
run, for a grid of tree sizes (``max_nodes``) and candidates per head (``top``).

The data is teacher-greedy text (``ptp train heads`` data), so at temperature 0 a drafted path is
accepted exactly when it matches the sequence's next tokens: tokens per call = 1 + the depth of
the deepest matching path. No target calls are made; the heads read the cached final hidden
states (``<data>-hidden.safetensors``, computed once if missing). The held-out split is the
trainer's (``--holdout``/``--seed`` as in the training command), so these sequences were never
trained on.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/heads_tree_sim.py --data /work/runs/data-v4 \\
        --holdout 64 --budgets 8,16,32 --tops 4,6,8
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def accepted_depth(tokens: list[int], parents: list[int], truth: list[int]) -> int:
    """Depth of the deepest node of the tree (tokens, parents; node 0 the root) whose path from
    the root equals ``truth[:depth]``."""
    depth = [0] * len(tokens)
    ok = [True] + [False] * (len(tokens) - 1)
    best = 0
    for i in range(1, len(tokens)):
        p = parents[i]
        depth[i] = depth[p] + 1
        ok[i] = ok[p] and depth[i] <= len(truth) and tokens[i] == truth[depth[i] - 1]
        if ok[i]:
            best = max(best, depth[i])
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default=None, help="heads checkpoint (default: the shipped `heads`)")
    ap.add_argument("--data", required=True, help="data path prefix of a `ptp train heads` run")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--holdout", type=int, default=64, help="as in the training command")
    ap.add_argument("--seed", type=int, default=0, help="as in the training command")
    ap.add_argument("--budgets", default="8,16,32", help="tree sizes (max_nodes)")
    ap.add_argument("--tops", default="4,6,8", help="candidates per head")
    ap.add_argument("--draft-vocab", type=int, default=None, help="as the drafter's option (default: auto)")
    ap.add_argument("--max-positions", type=int, default=0, help="0: every held-out position")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="markdown file (default: print only)")
    args = ap.parse_args(argv)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    from ptp.drafters.mtp import DEFAULT_HEADS, HeadsDrafter
    from ptp.models import load_target
    from ptp.train.checkpoint import load_heads
    from ptp.train.data import load_sequences
    from ptp.train.heads import head_positions, holdout_indices, load_or_compute_hidden

    torch.set_num_threads(args.threads)
    if not os.path.exists(args.data + ".safetensors"):
        raise FileNotFoundError(f"no data at {args.data}.safetensors (the --data of a `ptp train heads` run)")
    if args.holdout < 1:
        raise ValueError("--holdout must be >= 1: the simulation runs on held-out sequences only")
    base, _ = load_target(args.model)
    ckpt = args.heads or DEFAULT_HEADS
    heads = load_heads(base, ckpt)
    n = heads.config.num_heads
    seqs, _ = load_sequences(args.data)
    H, offsets = load_or_compute_hidden(base, seqs, args.data + "-hidden.safetensors", args.model)
    pos = head_positions(seqs, offsets, n, holdout_indices(len(seqs), args.holdout, args.seed))
    N = len(pos) if args.max_positions <= 0 else min(len(pos), args.max_positions)
    budgets, tops = _ints(args.budgets), _ints(args.tops)
    drafter = HeadsDrafter(heads, tree=True, draft_vocab=args.draft_vocab)
    ids = heads.vocab_id_list
    totals = {(b, t): 0 for b in budgets for t in tops}
    chain = 0
    t0 = time.time()
    with torch.no_grad():
        for s in range(0, N, 512):
            e = min(N, s + 512)
            h = H[pos.rows[s:e]].float()
            nxt = pos.next[s:e] if heads.config.token_input else None
            logits, _ = heads.draft_logits(h, next_tokens=nxt)
            logits = logits.float()
            am = logits.argmax(-1)
            for j in range(e - s):
                truth = pos.targets[s + j].tolist()
                guess = [ids[c] if ids is not None else c for c in am[j].tolist()]
                k = 0
                while k < n and guess[k] == truth[k]:
                    k += 1
                chain += k
                for t in tops:
                    drafter.top = t
                    for b in budgets:
                        tk, pr = drafter._tree(logits[j], b, ids)
                        totals[(b, t)] += accepted_depth(tk, pr, truth)
    secs = time.time() - t0
    lines = [f"# MTP heads tree simulation ({datetime.date.today().isoformat()})", "",
             f"Command: `PYTHONPATH=$PWD:$PWD/python python benchmarks/heads_tree_sim.py {' '.join(argv or sys.argv[1:])}`",
             "", f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{args.threads} threads; simulation {secs:.0f} s. Heads: `{os.path.relpath(ckpt, ROOT) if ckpt.startswith(ROOT) else ckpt}` "
             f"({n} heads). {N} held-out positions of {args.holdout} sequences. Tokens per target call "
             "at temperature 0 = 1 + the deepest drafted path that matches the teacher's next tokens.", "",
             f"Chain (each head's argmax): {1 + chain / N:.3f} tokens per call.", "",
             "| max_nodes \\ top | " + " | ".join(str(t) for t in tops) + " |",
             "|---|" + "---|" * len(tops)]
    for b in budgets:
        lines.append(f"| {b} | " + " | ".join(f"{1 + totals[(b, t)] / N:.3f}" for t in tops) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
