"""Offline tree simulation for MTP heads: tokens per target call of the heads' chain and
best-first tree (``HeadsDrafter.draft_chains`` / ``greedy_trees``, the code decoding runs; chain-input
heads draft one depth at a time) for a grid of tree sizes
(``max_nodes``) and candidates per head (``top``), on greedy text of the target:

- ``--data``: the held-out sequences of a heads training run (``--holdout``/``--seed`` as in the
  training command, so these sequences were never trained on; ``--holdout 0`` takes every
  sequence, for a set saved with ``--save-data`` that no drafter was trained on);
- ``--prompts``: an evaluation file (Spec-Bench jsonl); the target answers ``--limit`` of its
  prompts greedily, one at a time (evaluation only; ``--save-data`` keeps the answers).

At temperature 0 a drafted path is accepted exactly when it matches the text's next tokens. Two
figures per setting: *decoding* walks each sequence as greedy decoding does (a step anchored at j
commits 1 + its accepted depth, the next step starts after them), which is what ``e2e.py``
measures (on the 13 dev prompts: 1.390 chain / 1.677 tree vs 1.39 / 1.67 decoded); *all
positions* averages 1 + the accepted depth over every position, which counts a run of k accepted
tokens k + 1 times and so overstates decoding. No target calls are made for the heads; they read
the final hidden states (cached beside ``--data`` as ``<data>-hidden.safetensors``).

    PYTHONPATH=$PWD:$PWD/python python benchmarks/experiments/heads_tree_sim.py --data RUNS/data-v4 \\
        --holdout 64 --budgets 8,16,32 --tops 4,6,8
    PYTHONPATH=$PWD:$PWD/python python benchmarks/experiments/heads_tree_sim.py \\
        --prompts DATA/specbench_dev.jsonl --limit 13 --save-data RUNS/dev13
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


def decode_walk(acc: list[int], segments: list[int]) -> tuple[int, int]:
    """Tokens and target calls of greedy decoding over consecutive anchors: ``acc[j]`` is the
    accepted depth of a step anchored at position j, ``segments`` the number of anchors of each
    sequence (``acc`` holds them back to back). A step at j commits 1 + acc[j] tokens and the
    next step is anchored at j + 1 + acc[j], so positions inside an accepted run never start a
    step: tokens / calls is what decoding measures, while the mean of 1 + acc over all
    positions overweights the predictable runs (a run of k accepted tokens counts k + 1 times)."""
    tokens = calls = start = 0
    for n in segments:
        j = 0
        while j < n:
            step = 1 + acc[start + j]
            calls += 1
            tokens += min(step, n - j)
            j += step
        start += n
    return tokens, calls


def _eval_sequences(base, tok, path: str, limit: int, max_new: int):
    """Greedy answers of the target to the first turns of an evaluation file (Spec-Bench
    format), one prompt at a time, as :class:`ptp.train.data.Sequence` s."""
    from benchmarks.e2e import select_questions
    from ptp.cli import chat_prompt_ids, eos_ids, read_specbench
    from ptp.train.data import Sequence

    qs = select_questions(read_specbench(path), limit)
    eos = list(eos_ids(base, tok))
    out = []
    for q in qs:
        ids = torch.tensor([chat_prompt_ids(tok, q["turns"][0])])
        with torch.no_grad():
            res = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos[0])
        out.append(Sequence(res[0].cpu(), ids.shape[1]))
    return out, qs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", default=None, help="heads checkpoint (default: the shipped `heads`)")
    ap.add_argument("--data", default=None, help="data path prefix of a `ptp train heads` run")
    ap.add_argument("--prompts", default=None,
                    help="instead of --data: an evaluation file (Spec-Bench jsonl); the target "
                         "answers --limit of its prompts greedily (evaluation only)")
    ap.add_argument("--limit", type=int, default=13, help="with --prompts: questions, spread over the categories")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="with --prompts")
    ap.add_argument("--save-data", default=None,
                    help="with --prompts: save the answers as a data set (PREFIX.safetensors/.json) "
                         "to reuse with --data PREFIX --holdout 0")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--holdout", type=int, default=64, help="as in the training command")
    ap.add_argument("--seed", type=int, default=0, help="as in the training command")
    ap.add_argument("--budgets", default="8,16,32", help="tree sizes (max_nodes)")
    ap.add_argument("--tops", default="4,6,8", help="candidates per head")
    ap.add_argument("--draft-vocab", type=int, default=None, help="as the drafter's option (default: auto)")
    ap.add_argument("--max-positions", type=int, default=0, help="0: every held-out position")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="markdown file (default: print only)")
    ap.add_argument("--per-sequence", action="store_true",
                    help="also a table per sequence: chain tokens per call, first-head accuracy, the "
                         "share of the heads' tokens inside the draft vocabulary (where the heads fail)")
    args = ap.parse_args(argv)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    from ptp.drafters.heads import DEFAULT_HEADS, HeadsDrafter
    from ptp.models import load_target
    from ptp.train.checkpoint import load_heads
    from ptp.train.data import load_sequences
    from ptp.train.heads import answer_hidden_states, head_positions, holdout_indices, load_or_compute_hidden

    torch.set_num_threads(args.threads)
    if (args.data is None) == (args.prompts is None):
        raise ValueError("give exactly one of --data (held-out training data) and --prompts (an evaluation file)")
    if args.data is not None and not os.path.exists(args.data + ".safetensors"):
        raise FileNotFoundError(f"no data at {args.data}.safetensors (the --data of a `ptp train heads` run)")
    if args.holdout < 0:
        raise ValueError("--holdout must be >= 0")
    if args.save_data and args.prompts is None:
        raise ValueError("--save-data goes with --prompts")
    if args.prompts is not None and not os.path.exists(args.prompts):
        raise FileNotFoundError(f"no prompt file at {args.prompts}")
    base, tok = load_target(args.model)
    ckpt = args.heads or DEFAULT_HEADS
    heads = load_heads(base, ckpt)
    n = heads.config.num_heads
    if args.data is not None:
        seqs, data_meta = load_sequences(args.data)
        labels = [str(p) for p in data_meta.get("prompts", [])]
        H, offsets = load_or_compute_hidden(base, seqs, args.data + "-hidden.safetensors", args.model)
        if args.holdout:
            which = holdout_indices(len(seqs), args.holdout, args.seed)
            what = f"held-out positions of {args.holdout} sequences of `{args.data}`"
        else:  # an evaluation set (--save-data): every sequence
            which = list(range(len(seqs)))
            what = f"positions of all {len(seqs)} sequences of `{args.data}`"
    else:
        seqs, qs = _eval_sequences(base, tok, args.prompts, args.limit, args.max_new_tokens)
        labels = [f"[{q.get('category', '?')}] {q['turns'][0]}" for q in qs]
        if args.save_data:
            from ptp.train.data import DataConfig, save_sequences

            save_sequences(args.save_data, seqs, DataConfig(num_prompts=len(seqs), max_new_tokens=args.max_new_tokens,
                                                            batch_size=1, model=args.model, prompt_set="eval"),
                           [q["turns"][0] for q in qs])
        if args.save_data:  # cached where `--data PREFIX --holdout 0` looks for it
            H, offsets = load_or_compute_hidden(base, seqs, args.save_data + "-hidden.safetensors", args.model,
                                                progress=False)
        else:
            H, offsets = answer_hidden_states(base, seqs, progress=False)
        which = list(range(len(seqs)))
        what = (f"positions of the target's greedy answers ({args.max_new_tokens} new tokens max) to "
                f"{len(seqs)} prompts of `{os.path.basename(args.prompts)}`")
    pos = head_positions(seqs, offsets, n, which)
    # anchors per sequence, in order (sequence s owns rows offsets[s] .. offsets[s+1]-1)
    owner = torch.searchsorted(offsets, pos.rows, right=True) - 1
    segments = torch.bincount(owner, minlength=len(seqs))[which].tolist()
    if args.max_positions > 0 and args.max_positions < len(pos):  # whole sequences only
        keep, total = [], 0
        for m in segments:
            if total + m > args.max_positions:
                break
            keep.append(m)
            total += m
        segments = keep
    N = sum(segments)
    budgets, tops = _ints(args.budgets), _ints(args.tops)
    drafter = HeadsDrafter(heads, tree=True, draft_vocab=args.draft_vocab)
    ids = heads.vocab_id_list
    accs = {(b, t): [] for b in budgets for t in tops}
    chain, first, in_vocab = [], [], []
    vocab_set = None if ids is None else set(ids)
    t0 = time.time()
    from ptp.decode.draft import DraftRequest
    from ptp.decode.sampling import SamplingConfig

    with torch.no_grad():
        for s in range(0, N, 512):
            e = min(N, s + 512)
            h = H[pos.rows[s:e]].float()
            roots = pos.next[s:e].tolist()
            # the drafter's own greedy chain and trees (chain-input heads: one depth at a time)
            # copy heads read each anchor's committed tokens (0 .. t+1); the others only the root
            hists = ([seqs[int(q)].ids[:int(t) + 2].tolist() for q, t in zip(pos.seq[s:e], pos.t[s:e])]
                     if heads.config.copy_attn else [[0]] * (e - s))
            req = DraftRequest(histories=hists, sequence_ids=list(range(e - s)), max_nodes=n,
                               sampling=SamplingConfig())
            chains, _ = drafter.draft_chains(h, roots, [True] * (e - s), n, req)
            for j in range(e - s):
                truth = pos.targets[s + j].tolist()
                guess = chains[j][0][1:]
                k = 0
                while k < len(guess) and guess[k] == truth[k]:
                    k += 1
                chain.append(k)
                first.append(guess[0] == truth[0])
                in_vocab.append(1.0 if vocab_set is None else sum(x in vocab_set for x in truth) / n)
            for t in tops:
                drafter.top = t
                for b in budgets:
                    for j, (tk, pr) in enumerate(drafter.greedy_trees(h, roots, b, hists)):
                        accs[(b, t)].append(accepted_depth(tk, pr, pos.targets[s + j].tolist()))
    secs = time.time() - t0
    def walk(acc):
        t, c = decode_walk(acc, segments)
        return t / max(c, 1)

    lines = [f"# MTP heads tree simulation ({datetime.date.today().isoformat()})", "",
             f"Command: `PYTHONPATH=$PWD:$PWD/python python benchmarks/experiments/heads_tree_sim.py {' '.join(argv or sys.argv[1:])}`",
             "", f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{args.threads} threads; simulation {secs:.0f} s. Heads: `{os.path.relpath(ckpt, ROOT) if ckpt.startswith(ROOT) else ckpt}` "
             f"({n} heads). {N} {what}. At temperature 0 a step accepts the deepest drafted "
             "path that matches the greedy text.", "",
             "- *decoding*: tokens per target call of greedy decoding that walks each sequence "
             "(a step anchored at j commits 1 + its accepted depth and the next step starts "
             "after them), what `e2e.py` measures;",
             "- *all positions*: 1 + the mean accepted depth over every position, which weighs "
             "each accepted run once per token in it and so overstates decoding.", "",
             f"Chain (each head's argmax): decoding {walk(chain):.3f}, all positions "
             f"{1 + sum(chain) / max(N, 1):.3f} tokens per call.", "",
             "| max_nodes \\ top | " + " | ".join(f"{t}: decoding | {t}: all positions" for t in tops) + " |",
             "|---|" + "---|---|" * len(tops)]
    for b in budgets:
        lines.append(f"| {b} | " + " | ".join(f"{walk(accs[(b, t)]):.3f} | {1 + sum(accs[(b, t)]) / max(N, 1):.3f}"
                                            for t in tops) + " |")
    if args.per_sequence:
        lines += ["", "Per sequence (chain): tokens per call decoded, first-head accuracy, share of the "
                  "heads' tokens inside the draft vocabulary (a token outside it is never drafted).", "",
                  "| sequence | anchors | chain tokens/call | head-1 acc | in draft vocab | prompt |",
                  "|---|---|---|---|---|---|"]
        lo = 0
        for s_idx, m in zip(which, segments):
            if m:
                t, c = decode_walk(chain[lo:lo + m], [m])
                label = labels[s_idx] if s_idx < len(labels) else ""
                label = " ".join(label.split())[:70].replace("|", "/")
                lines.append(f"| {s_idx} | {m} | {t / max(c, 1):.2f} | {sum(first[lo:lo + m]) / m:.2f} | "
                             f"{sum(in_vocab[lo:lo + m]) / m:.2f} | {label} |")
            lo += m
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
