"""Pilot (not a shipped feature yet): MTP heads whose head i reads the token just before its own
target, Hydra-style, instead of every head reading the committed token.

The shipped heads compute ``z_i = h_t + SiLU(W_i h_t + U_i e(x_{t+1}) + b_i)`` for every head i
(x_{t+1} the committed token, head i predicting x_{t+2+i}). Here head i reads ``e(x_{t+1+i})``:
the previous head's token (in training the data's, teacher-forced; in decoding the drafted one,
so a chain or tree would run the heads one depth at a time). Everything else is
``ptp.train.heads``' recipe: cached hidden states of a ``ptp train heads`` data set, 256
anchors per step, the 8,192-token train vocabulary, ``--soft-weight 0.5`` with the target's top 32,
AdamW, cosine schedule, the same batches and held-out sequences.

On the held-out sequences the teacher-forced accuracy of the chain form is the greedy chain's:
head i's input is the data token exactly when heads 0..i-1 were right, so the reported prefix
is the chain's mean accepted prefix.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/experiments/heads_chain_pilot.py --data DATA --mode chain --steps 2000
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="data prefix of a `ptp train heads` run (with its hidden cache)")
    ap.add_argument("--mode", choices=["chain", "commit"], default="chain",
                    help="chain: head i reads token t+1+i; commit: every head reads t+1 (the shipped form)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    from ptp.drafters.heads_model import HeadsConfig, MTPHeads
    from ptp.train.data import answer_token_counts, load_sequences
    from ptp.train.heads import (HeadsTrainConfig, _batch, _Vocab, head_positions, holdout_indices,
                                 load_or_compute_hidden, teacher_topk)
    from ptp.train.models import load_target
    from ptp.train.trainer import lr_scheduler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, _ = load_target(args.model)
    seqs, _ = load_sequences(args.data)
    H, off = load_or_compute_hidden(base, seqs, args.data + "-hidden.safetensors", args.model)
    n = args.heads
    m = MTPHeads(base, HeadsConfig(num_heads=n, token_input=True))
    m.set_token_counts(answer_token_counts(seqs, base.get_input_embeddings().weight.shape[0]))
    cfg = HeadsTrainConfig(steps=args.steps, lr=1e-3, positions_per_step=256, train_vocab=8192, holdout=64,
                           soft_weight=0.5, lr_schedule="cosine")
    held = holdout_indices(len(seqs), cfg.holdout, cfg.seed)
    train = head_positions(seqs, off, n, sorted(set(range(len(seqs))) - set(held)))
    test = head_positions(seqs, off, n, held)
    vocab = _Vocab(m, cfg.train_vocab, "cpu")
    emb = base.get_input_embeddings()

    def heads_hidden(pos, b):
        h = H[pos.rows[b]].float()
        nxt = pos.next[b][:, None]
        prev = torch.cat([nxt, pos.targets[b][:, :-1]], 1) if args.mode == "chain" else nxt.expand(-1, n)
        pre = (torch.einsum("pd,ned->pne", h, m.proj) + m.bias
               + torch.einsum("pnd,ned->pne", emb(prev), m.tok_proj))
        return h.unsqueeze(1) + F.silu(pre)  # [P, n, d]

    @torch.no_grad()
    def evaluate():
        hits = torch.cat([(vocab.logits(heads_hidden(test, torch.arange(s, min(s + 512, len(test))))).argmax(-1)
                           == vocab.index[test.targets[s:s + 512]]).float() for s in range(0, len(test), 512)])
        return [round(float(x), 4) for x in hits.mean(0)], round(float(hits.cumprod(1).sum(1).mean()), 4)

    topk = teacher_topk(vocab, H, 32, progress=False)
    params = m.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = lr_scheduler(opt, cfg.lr_schedule, cfg.warmup, cfg.steps)
    t0 = time.time()
    for step in range(args.steps):
        b = _batch(cfg, len(train), step)
        logp = torch.log_softmax(vocab.logits(heads_hidden(train, b)), -1)  # [P, n, K]
        r = train.rows[b].unsqueeze(1) + 1 + torch.arange(n)
        soft = -(topk[1][r] * logp.gather(-1, topk[0][r].long())).sum(-1).mean(0)  # [n]
        tk = vocab.index[train.targets[b]]
        hard = torch.stack([F.nll_loss(logp[:, i], tk[:, i], ignore_index=-100) for i in range(n)])
        loss = (cfg.soft_weight * soft + (1 - cfg.soft_weight) * hard).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc, prefix = evaluate()
            print(f"{args.mode} step {step + 1} {(time.time() - t0) / 60:.1f} min held-out acc {acc} "
                  f"prefix {prefix}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
