"""Losses of the masked-input drafter and of the MTP heads; they plug into the shared training loop
(:func:`ptp.train.trainer.train`), data (:mod:`ptp.train.data`) and checkpoints.

Masked-input (per sequence, like PTP's packed windows):

1. *Real pass* (no grad, adapter off): the target over the sequence: its KV cache and the final
   hidden state ``h_t`` of every token.
2. *Mask pass* (grad): ``windows_per_seq`` windows at once against the cache. A window anchored at
   ``a`` (its context is tokens ``< a``) has k masks at positions ``a .. a+k-1``; mask j predicts
   token ``a+1+j`` (the real token ``a-1``'s own output predicts ``a``).
3. Loss: CE of the masks' LM-head output + CE of the sampler head (previous token = the data token
   ``a+j``, teacher forcing; a copy sampler also reads that token's earlier occurrences in tokens
   ``0..a``, the context committed when token ``a`` is the verified one) + ``lcm_weight`` * mean
   ``||z_j - sg(h_{a+j})||^2 / d`` (the real token ``a+j`` predicts the same target ``a+1+j``:
   latent consistency). With a frozen adapter (``--freeze-adapter``) the mask pass runs without
   gradient and only the sampler head's CE remains.

Heads: the real pass's ``h_t`` (no grad) feeds each head (with ``token_input``, also the data token
``t+1``); head i's CE against token ``t+1+i``, over ``windows_per_seq * 8`` positions sampled from
the answer. This per-sequence loop reruns the target every step; ``ptp train heads`` now trains on
cached hidden states instead (:mod:`ptp.train.heads`; ``--no-cached-hidden`` selects this loop).
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from ptp.models import output_cache
from ptp.drafters.heads_model import MTPHeads
from ptp.drafters.masked_model import MaskedModel
from ptp.drafters.sampler_head import window_copy_inputs
from ptp.drafters.ptp_model import batched_slot_layout, crop_cache
from ptp.train.data import Sequence
from ptp.train.trainer import TrainConfig, window_batch

__all__ = ["masked_batch_loss", "masked_sequence_loss", "heads_batch_loss", "heads_sequence_loss"]


def _real_pass(base, ids, cfg: TrainConfig, use_cache: bool):
    """The target over ``ids [B, L]`` (no grad): final hidden states ``[B, L, d]`` (float32), its
    cache (or ``None``) and the autocast context."""
    dev = ids.device
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    with torch.no_grad(), amp:
        out = base.model(input_ids=ids, use_cache=use_cache)
    return out.last_hidden_state.float(), (output_cache(out) if use_cache else None), amp


def masked_batch_loss(model: MaskedModel, seqs: list[Sequence], cfg: TrainConfig, gen: torch.Generator,
                   rng: random.Random) -> list[Optional[tuple[torch.Tensor, dict]]]:
    """Per-sequence masked-input losses of a micro-batch (one padded real pass, one mask pass);
    each equals what the sequence alone gives, up to float rounding."""
    k, dev = model.config.num_masks, torch.device(cfg.device)
    results: list[Optional[tuple[torch.Tensor, dict]]] = [None] * len(seqs)
    wb = window_batch(seqs, lambda s: (s.prompt_len, s.ids.numel() - 1 - k), cfg.windows_per_seq, rng, dev)
    if wb is None:
        return results
    ids, lengths, counts, anchors, live = wb.ids, wb.lengths, wb.counts, wb.anchors, wb.live
    B, W, Lmax = len(live), len(anchors[0]), ids.shape[1]
    with model.gate.off():
        real_h, cache, amp = _real_pass(model.base, ids, cfg, use_cache=True)
    pos, vis = batched_slot_layout(lengths, anchors, k, device=dev)
    pos = pos + 1  # mask j sits one position after PTP's slot j
    prev_idx = torch.tensor(anchors, device=dev).unsqueeze(-1) + torch.arange(k, device=dev)  # [B, W, k]
    prev_tok = torch.gather(ids, 1, prev_idx.view(B, -1)).view(B, W, k)
    targets = torch.gather(ids, 1, (prev_idx + 1).view(B, -1)).view(B, W, k)
    # frozen adapter (MaskedModel.freeze_adapter): the mask rows are fixed features, only the sampler
    # head trains, and the masks' own CE and the LCM term (no gradient then) are left out
    frozen = not model.masks.requires_grad
    if frozen and model.sampler is None:
        raise ValueError("a frozen adapter without a sampler head has nothing to train")
    with (torch.no_grad() if frozen else nullcontext()), amp:
        z, _ = model.packed_forward(None, model.masks.repeat(W, 1).unsqueeze(0).expand(B, -1, -1),
                                    pos, vis, past_key_values=cache, use_cache=True)
    crop_cache(cache, Lmax)
    z = z.float()  # [B, W*k, d]
    base_logits = None
    if not frozen:
        with amp:
            base_logits = model.logits(z.to(model.embedding().dtype)).float().view(B, W, k, -1)
    s_logits = None
    if model.sampler is not None:
        copy = None
        if model.config.copy_attn:  # mask j reads the data token a + j over the tokens 0 .. a
            copy = window_copy_inputs(ids, anchors, k, model.config.copy_matches)
        mask_index = torch.arange(k, device=dev).repeat(B * W)
        h2 = model.sampler_hidden(z.reshape(B * W * k, -1), prev_tok.reshape(-1), mask_index, copy=copy)
        with amp:
            s_logits = model.logits(h2.to(model.embedding().dtype)).float().view(B, W, k, -1)
    ref = real_h[torch.arange(B, device=dev).view(B, 1, 1), prev_idx].view(B, W * k, -1)
    for b, n in enumerate(counts):
        t = targets[b, :n].reshape(-1)
        loss, metrics = 0.0, {}
        if base_logits is not None:
            loss_base = F.cross_entropy(base_logits[b, :n].reshape(n * k, -1), t)
            loss = loss_base
            metrics["ce_base"] = float(loss_base.detach())
        if s_logits is not None:
            loss_s = F.cross_entropy(s_logits[b, :n].reshape(n * k, -1), t)
            loss = loss + loss_s
            metrics["ce_sampler"] = float(loss_s.detach())
            pred = s_logits[b, :n].argmax(-1)
        else:
            pred = base_logits[b, :n].argmax(-1)
        if model.config.lcm_weight and not frozen:
            lcm = (z[b, :n * k] - ref[b, :n * k]).pow(2).mean()
            loss = loss + model.config.lcm_weight * lcm
            metrics["lcm"] = float(lcm.detach())
        with torch.no_grad():
            hit = (pred == targets[b, :n]).float()
            metrics["acc"] = hit.mean(0).tolist()
            metrics["prefix"] = float(hit.cumprod(1).sum(1).mean())
        results[live[b]] = (loss, metrics)
    return results


def masked_sequence_loss(model: MaskedModel, seq: Sequence, cfg: TrainConfig, gen: torch.Generator,
                      rng: random.Random) -> Optional[tuple[torch.Tensor, dict]]:
    """:func:`masked_batch_loss` of one sequence."""
    return masked_batch_loss(model, [seq], cfg, gen, rng)[0]


def heads_batch_loss(model: MTPHeads, seqs: list[Sequence], cfg: TrainConfig, gen: torch.Generator,
                     rng: random.Random) -> list[Optional[tuple[torch.Tensor, dict]]]:
    """Per-sequence MTP-heads losses of a micro-batch (one padded real pass, then every head over
    all the sequences' sampled positions at once)."""
    n, dev = model.config.num_heads, torch.device(cfg.device)
    results: list[Optional[tuple[torch.Tensor, dict]]] = [None] * len(seqs)
    # position t's head i predicts t+1+i <= L-1
    wb = window_batch(seqs, lambda s: (max(s.prompt_len - 1, 0), s.ids.numel() - 2 - n),
                      cfg.windows_per_seq * 8, rng, dev)
    if wb is None:
        return results
    ids = wb.ids
    real_h, _, amp = _real_pass(model.base, ids, cfg, use_cache=False)
    rows = torch.cat([torch.full((m,), i, device=dev) for i, m in enumerate(wb.counts)])
    ts = torch.cat([torch.tensor(a[:m], device=dev) for a, m in zip(wb.anchors, wb.counts)])
    h = real_h[rows, ts]  # [P, d]
    targets = ids[rows.unsqueeze(1), ts.unsqueeze(1) + 1 + torch.arange(1, n + 1, device=dev)]  # [P, n]
    # the token(s) the heads read: the committed token t + 1 (chain_input: head i reads t + 1 + i)
    tok = model.input_tokens(ids[rows, ts + 1], targets)
    copy = model.teacher_copy_inputs(ids[rows], ts)  # copy_attn: each head's context matches
    ces, hits = [], []
    for i in range(n):  # one head at a time: memory O(P * V), not O(P * n * V)
        with amp:
            hh = model.head_hidden(h, i, next_tokens=tok[:, i] if model.config.chain_input else tok,
                                   copy=None if copy is None else copy.index(i))
            logits = model.base.lm_head(hh.to(model.base.lm_head.weight.dtype)).float()
        ces.append(F.cross_entropy(logits, targets[:, i], reduction="none"))
        hits.append((logits.argmax(-1) == targets[:, i]).float().detach())
    ce, hit = torch.stack(ces, 1), torch.stack(hits, 1)  # [P, n]
    start = 0
    for b, m in zip(wb.live, wb.counts):
        hb = hit[start:start + m]
        loss = sum(ce[start:start + m, j].mean() for j in range(n)) / n
        results[b] = (loss, {"acc": hb.mean(0).tolist(), "prefix": float(hb.cumprod(1).sum(1).mean())})
        start += m
    return results


def heads_sequence_loss(model: MTPHeads, seq: Sequence, cfg: TrainConfig, gen: torch.Generator,
                        rng: random.Random) -> Optional[tuple[torch.Tensor, dict]]:
    """:func:`heads_batch_loss` of one sequence."""
    return heads_batch_loss(model, [seq], cfg, gen, rng)[0]
