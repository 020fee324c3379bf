"""Teacher data generation speed: ``ptp train``'s two backends on the same training prompts.

Each backend answers the first ``--num`` stage-1 prompts of the v2 training set
(``ptp.train.prompts.build_prompt_plan``) greedily, ``--max-new-tokens`` each, through
``ptp.train.data._answer`` (the code ``ptp train`` runs): ``hf`` (transformers' batched, left-padded
``generate``) and ``ptp`` (this project's decoder with no drafter: plain decoding, row-invariant
calls on the CPU, finished answers leave the batch). Prints seconds per answer, new tokens/s, the
ratio to ``hf`` at ``--hf-batch`` (measured in this run) and how many answers equal ``hf``'s.
``--record-hidden`` adds, at each batch size, the ptp backend recording the target's hidden states
as it decodes (what ``ptp train heads`` does, instead of a second pass over the data), and the
seconds per answer that second pass (``ptp.train.heads.answer_hidden_states``) takes.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/teacher_gen.py --num 32 --batches 8,16,32
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch


class _Bar:
    def update(self, k):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--batches", default="8,16,32", help="ptp backend batch sizes")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--record-hidden", action="store_true",
                    help="also time the ptp backend recording hidden states, and the separate hidden pass")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ptp.models import load_target
    from ptp.train.data import DataConfig, _answer
    from ptp.train.prompts import build_prompt_plan

    model, tok = load_target(args.model)
    # stage 1 is a quarter of the plan, passage writers first (the same first ones for any plan size)
    stage1, _ = build_prompt_plan(6 * args.num, 0)
    prompts = [p for p, _ in stage1][: args.num]
    if len(prompts) < args.num:
        raise SystemExit(f"the plan has {len(prompts)} stage-1 prompts, fewer than --num {args.num}")

    def run(backend: str, batch: int, record: bool = False):
        cfg = DataConfig(num_prompts=args.num, max_new_tokens=args.max_new_tokens, batch_size=batch,
                         backend=backend)
        t = time.perf_counter()
        seqs = _answer(model, tok, prompts, cfg, torch.Generator().manual_seed(0), _Bar(), record_hidden=record)
        return seqs, time.perf_counter() - t

    print(f"# teacher generation, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, {args.num} prompts x "
          f"{args.max_new_tokens} new tokens max, greedy")
    print("| backend | batch | s per answer | new tokens/s | vs hf | answers == hf |")
    print("|---|---|---|---|---|---|")
    ref, t_ref = run("hf", args.hf_batch)
    n_ref = sum(len(s.ids) - s.prompt_len for s in ref)
    print(f"| hf | {args.hf_batch} | {t_ref / args.num:.2f} | {n_ref / t_ref:.1f} | 1.00x | {args.num}/{args.num} |",
          flush=True)
    for b in [int(x) for x in args.batches.split(",") if x]:
        for record in (False, True) if args.record_hidden else (False,):
            seqs, t = run("ptp", b, record)
            n = sum(len(s.ids) - s.prompt_len for s in seqs)
            same = sum(a.ids.tolist() == r.ids.tolist() for a, r in zip(seqs, ref))
            name = "ptp + recorded hidden states" if record else "ptp"
            print(f"| {name} | {b} | {t / args.num:.2f} | {n / t:.1f} | {t_ref / t:.2f}x | {same}/{args.num} |",
                  flush=True)
    if args.record_hidden:
        from ptp.train.heads import answer_hidden_states

        t = time.perf_counter()
        answer_hidden_states(model, ref, progress=False)
        t = time.perf_counter() - t
        print(f"\nseparate hidden-state pass over the hf answers (answer_hidden_states): {t / args.num:.2f} s "
              f"per answer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
