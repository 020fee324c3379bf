"""Partial quadratic PTP decoding: one target call per step both verifies and drafts (batch 1).

Each call carries ``[root, d_1..d_n]`` (adapter off: the verification rows, the target's own
logits) and, for every hypothesis ``h = 0..n`` ("h drafts will be accepted"), a group of k slots
anchored after ``d_h`` (they see the root and ``d_1..d_h``; their positions start at ``d_h``'s;
slot j drafts the token at absolute index ``anchor + j`` with that index's stream uniform).
After verification accepts ``n_acc`` drafts and picks the next token t, group ``n_acc``'s slots
are the next draft: slot 0 drafted t itself (known exactly now, dropped), slots 1..k-1 follow it.
The KV cache keeps the root and the accepted drafts; every slot entry is cropped away.

Verification is ``ptp_ext.ops.verify_tree`` (greedy / coupled) with the decoder's uniform stream,
so the output is token-for-token plain decoding's. A self-contained loop over an HF
``DynamicCache`` and SDPA; wiring it into ``ptp.decoder`` needs a hook that lets a drafter add
slot rows to the target call (see the PTP report).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptp.drafters.ptp_drafter import sdpa_attention
from ptp.models import cache_kw
from ptp.drafters.ptp_model import GREEDY_U, PTPModel, crop_cache, packed_layout, vector_pick
from ptp.decode.sampling import SamplingConfig, uniforms
from ptp_ext import ops
from ptp_ext.reference import sampling_probs

__all__ = ["QuadraticResult", "ptp_generate_quadratic"]


@dataclass
class QuadraticResult:
    new_token_ids: list[int]
    target_calls: int

    @property
    def tokens_per_call(self) -> float:
        return len(self.new_token_ids) / max(self.target_calls, 1)


@torch.inference_mode()
def ptp_generate_quadratic(model: PTPModel, prompt: list[int], max_new_tokens: int,
                           sampling: SamplingConfig = SamplingConfig(), num_slots: int | None = None,
                           sequence_id: int = 0, eos_token_ids: tuple[int, ...] = ()) -> QuadraticResult:
    from transformers import DynamicCache

    m = model.eval()
    k = num_slots or m.config.num_slots
    dev = m.base.get_input_embeddings().weight.device
    seq = torch.tensor(sequence_id)
    cache = DynamicCache(config=m.base.config)
    hist = list(prompt)
    new: list[int] = []
    drafts: list[int] = []
    calls = 0
    greedy = sampling.greedy
    with sdpa_attention(m.base):
        if len(hist) > 1:  # prefill all but the root (not a counted step: plain decoding does it too)
            m.base.model(input_ids=torch.tensor([hist[:-1]], device=dev), use_cache=True,
                         **cache_kw(m.base.model, cache))
        while len(new) < max_new_tokens:
            r = len(hist) - 1  # the root's index (= the cache length)
            n_d = len(drafts)
            anchors = [r + 1 + h for h in range(n_d + 1)]
            if greedy or m.config.temperature == 0:
                u = torch.full((n_d + 1, k), GREEDY_U)
            else:
                u = uniforms(sampling.seed, seq, torch.tensor(anchors).view(-1, 1) + torch.arange(k)).float()
            real = torch.tensor([hist[-1]] + drafts, device=dev)
            pos, vis = packed_layout(r, 1 + n_d, anchors, [k] * (n_d + 1), device=dev)
            emb = m.slot_embeddings(u.to(dev)).reshape((n_d + 1) * k, -1)
            hidden, _ = m.packed_forward(real, emb, pos, vis, past_key_values=cache, use_cache=True)
            calls += 1
            logits = m.logits(hidden[0]).float()
            tokens = real.view(1, -1)
            parents = torch.arange(-1, n_d, device=dev).view(1, -1)
            vu = None if greedy else uniforms(sampling.seed, seq, r + 1 + torch.arange(n_d + 1)).view(1, -1).to(dev)
            num_acc, _, nxt = ops.verify_tree(tokens, parents, logits[: n_d + 1].unsqueeze(0), None, vu,
                                              "greedy" if greedy else "coupled", sampling.temperature,
                                              sampling.top_k, sampling.top_p)
            n_acc, t = int(num_acc[0]), int(nxt[0])
            accepted = drafts[:n_acc] + [t]
            crop_cache(cache, r + 1 + n_acc)
            # group n_acc's slots 1..k-1 draft the tokens after t
            g = logits[n_d + 1 + n_acc * k: n_d + 1 + (n_acc + 1) * k]
            if m.config.variant == "optp" or greedy:
                cand = g.argmax(-1)
            else:
                cand = vector_pick(u[n_acc].double().to(dev), sampling_probs(
                    g, sampling.temperature, sampling.top_k, sampling.top_p))
            drafts = cand[1:].tolist()
            stop = False
            for tok in accepted:
                new.append(tok)
                hist.append(tok)
                if tok in eos_token_ids or len(new) >= max_new_tokens:
                    stop = True
                    break
            if stop:
                break
    return QuadraticResult(new, calls)
