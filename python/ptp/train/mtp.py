"""Losses of the masked-input drafter and of the MTP heads; they plug into the shared training loop
(:func:`ptp.train.trainer.train`), data (:mod:`ptp.train.data`) and checkpoints.

Masked-input (per sequence, like PTP's packed windows):

1. *Real pass* (no grad, adapter off): the target over the sequence: its KV cache and the final
   hidden state ``h_t`` of every token.
2. *Mask pass* (grad): ``windows_per_seq`` windows at once against the cache. A window anchored at
   ``a`` (its context is tokens ``< a``) has k masks at positions ``a .. a+k-1``; mask j predicts
   token ``a+1+j`` (the real token ``a-1``'s own output predicts ``a``).
3. Loss: CE of the masks' LM-head output + CE of the sampler head (previous token = the data token
   ``a+j``, teacher forcing) + ``lcm_weight`` * mean ``||z_j - sg(h_{a+j})||^2 / d`` (the real
   token ``a+j`` predicts the same target ``a+1+j``: latent consistency).

Heads: the real pass's ``h_t`` (no grad) feeds each head; head i's CE against token ``t+1+i``, over
``windows_per_seq * k`` positions sampled from the answer.
"""
from __future__ import annotations

import random
from typing import Optional

import torch
import torch.nn.functional as F

from ptp.models import output_cache
from ptp.mtp_model import MTPHeads, MTPModel
from ptp.ptp_model import crop_cache, packed_layout
from ptp.train.data import Sequence
from ptp.train.trainer import TrainConfig

__all__ = ["mtp_sequence_loss", "heads_sequence_loss"]


def _real_pass(base, ids, cfg: TrainConfig, use_cache: bool):
    dev = ids.device
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    with torch.no_grad(), amp:
        out = base.model(input_ids=ids, use_cache=use_cache)
    return out.last_hidden_state[0].float(), (output_cache(out) if use_cache else None), amp


def mtp_sequence_loss(model: MTPModel, seq: Sequence, cfg: TrainConfig, gen: torch.Generator,
                      rng: random.Random) -> Optional[tuple[torch.Tensor, dict]]:
    k, dev = model.config.num_masks, torch.device(cfg.device)
    ids = seq.ids.to(dev).view(1, -1)
    L = ids.shape[1]
    lo, hi = seq.prompt_len, L - 1 - k
    if hi < lo:
        return None
    anchors = sorted(rng.sample(range(lo, hi + 1), min(cfg.windows_per_seq, hi - lo + 1)))
    W = len(anchors)
    with model.gate.off():
        real_h, cache, amp = _real_pass(model.base, ids, cfg, use_cache=True)
    pos, vis = packed_layout(L, 0, anchors, [k] * W, device=dev)
    pos = pos + 1  # mask j sits one position after PTP's slot j
    prev_idx = torch.tensor(anchors, device=dev).unsqueeze(1) + torch.arange(k, device=dev)  # [W, k]
    targets = ids[0, prev_idx + 1]
    with amp:
        z, _ = model.packed_forward(ids[:, :0], model.masks.repeat(W, 1), pos, vis,
                                    past_key_values=cache, use_cache=True)
    crop_cache(cache, L)
    z = z[0].float()  # [W*k, d]
    flat_t = targets.reshape(-1)
    with amp:
        base_logits = model.logits(z.to(model.embedding().dtype)).float()
    loss_base = F.cross_entropy(base_logits, flat_t)
    loss = loss_base
    metrics = {}
    if model.sampler is not None:
        h2 = model.sampler(z, ids[0, prev_idx].reshape(-1), model.embedding())
        with amp:
            s_logits = model.logits(h2.to(model.embedding().dtype)).float()
        loss_s = F.cross_entropy(s_logits, flat_t)
        loss = loss + loss_s
        metrics["ce_sampler"] = float(loss_s.detach())
        pred = s_logits.argmax(-1)
    else:
        pred = base_logits.argmax(-1)
    if model.config.lcm_weight:
        ref = real_h[prev_idx.reshape(-1)]
        lcm = (z - ref).pow(2).mean()
        loss = loss + model.config.lcm_weight * lcm
        metrics["lcm"] = float(lcm.detach())
    with torch.no_grad():
        hit = (pred.view(W, k) == targets).float()
        metrics["acc"] = hit.mean(0).tolist()
        metrics["prefix"] = float(hit.cumprod(1).sum(1).mean())
        metrics["ce_base"] = float(loss_base.detach())
    return loss, metrics


def heads_sequence_loss(model: MTPHeads, seq: Sequence, cfg: TrainConfig, gen: torch.Generator,
                        rng: random.Random) -> Optional[tuple[torch.Tensor, dict]]:
    n, dev = model.config.num_heads, torch.device(cfg.device)
    ids = seq.ids.to(dev).view(1, -1)
    L = ids.shape[1]
    lo, hi = max(seq.prompt_len - 1, 0), L - 2 - n  # position t's head i predicts t+1+i <= L-1
    if hi < lo:
        return None
    count = min(cfg.windows_per_seq * 8, hi - lo + 1)
    ts = torch.tensor(sorted(rng.sample(range(lo, hi + 1), count)), device=dev)
    real_h, _, amp = _real_pass(model.base, ids, cfg, use_cache=False)
    h = real_h[ts]  # [P, d]
    targets = ids[0, ts.view(-1, 1) + 1 + torch.arange(1, n + 1, device=dev)]  # [P, n]
    losses, hits = [], []
    for i in range(n):  # one head at a time: memory O(P * V), not O(P * n * V)
        with amp:
            logits = model.base.lm_head(model.head_hidden(h, i).to(model.base.lm_head.weight.dtype)).float()
        losses.append(F.cross_entropy(logits, targets[:, i]))
        hits.append((logits.argmax(-1) == targets[:, i]).float().detach())
    hit = torch.stack(hits, 1)
    return sum(losses) / n, {"acc": hit.mean(0).tolist(), "prefix": float(hit.cumprod(1).sum(1).mean())}
