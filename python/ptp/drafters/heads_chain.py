"""A lean greedy chain of chain-input MTP heads, for drafting beside prompt lookup on a CPU.

:class:`ptp.drafters.heads.HeadsDrafter` runs the heads through :class:`MTPHeads`' torch modules:
~25 small ops and ~1 ms a depth on a 2-core CPU (float32 weights read cache-cold after every
target call), as much as a fifth of SmolLM2's decoding call. :class:`HeadChain` drafts the same
greedy chain with each head's three input projections and the draft vocabulary's LM-head rows
kept as Q8_0 blocks (``ops.decode_linear``: ~1 MB and ~1.3 MB a depth at the default 2,048-token
draft vocabulary, instead of ~4 MB and ~19 MB of float32) and the copy attention over an
incremental 1-gram index (lookup's ``NgramIndex``) instead of a scan of the history. The
drafts differ from the float32 heads' only where rounding the weights flips a near tie; they
are verified like any draft, so the output never changes.

The heads read the target's final hidden state ``h`` of the node before the root and the tokens
of the path (``ptp.drafters.heads_model``): head i reads the token at depth i (the root for head
0), ``h + SiLU(W_i h + U_i e(y) + C_i o + b_i) + g_i * o`` with ``o`` the copy attention over the
earlier occurrences of ``y`` in the committed tokens, then the LM head's rows of the draft
vocabulary; the chain stops where its path probability (the product of each depth's softmax
maximum) falls below ``min_prob``.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ptp.drafters.heads_model import MTPHeads
from ptp.drafters.sampler_head import path_tail
from ptp_ext import ops
from ptp_ext.reference import quantize_ref

__all__ = ["HeadChain"]

_FORMATS = {"q4_1": 1, "q8_0": 2}  # ops.decode_linear's format codes


class HeadChain:
    """Greedy chains of chain-input MTP heads (``heads.config.chain_input``; the copy attention
    when ``copy_attn``) over quantised copies of their weights. ``draft_vocab``: as
    :class:`ptp.drafters.options.HeadsOptions`' (None: 8,192 when the checkpoint stores token
    counts; 0, or a checkpoint without token counts: the full vocabulary). ``w_format`` /
    ``head_format``: the blocks of the input projections and of the draft vocabulary's LM-head
    rows, ``q8_0`` or ``q4_1`` (measured on SmolLM2, 2 cores: Q4_1 drafts as many tokens per call
    and decodes no faster)."""

    def __init__(self, heads: MTPHeads, draft_vocab: Optional[int] = 2048, w_format: str = "q8_0",
                 head_format: str = "q8_0") -> None:
        cfg = heads.config
        if w_format not in _FORMATS or head_format not in _FORMATS:
            raise ValueError(f"HeadChain: formats must be one of {sorted(_FORMATS)}, "
                             f"got {w_format!r}, {head_format!r}")
        if not cfg.chain_input:
            raise ValueError("HeadChain drafts with chain-input MTP heads (HeadsConfig.chain_input)")
        base = heads.base
        emb = base.get_input_embeddings().weight.detach()
        if emb.device.type != "cpu":
            raise ValueError(f"HeadChain runs on the CPU (ops.decode_linear), got the model on {emb.device}")
        d = emb.shape[1]
        if d % 32:
            raise ValueError(f"HeadChain keeps Q8_0 blocks: the hidden size must be a multiple of 32, got {d}")
        self.num_heads, self.copy_matches = cfg.num_heads, cfg.copy_matches
        self.embed_np = emb.float().contiguous().numpy()
        if draft_vocab and heads.token_counts is None:
            draft_vocab = 0  # no token counts to pick a draft vocabulary from: the full one
        heads.auto_draft_vocab(draft_vocab)
        ids = heads.vocab_ids
        head_w = base.get_output_embeddings().weight.detach().float()
        rows = head_w if ids is None else head_w[ids.to(head_w.device)]
        self.vocab_ids = None if ids is None else ids.tolist()
        self.head_q8 = quantize_ref(rows.contiguous(), head_format).contiguous()
        self.head_fmt = _FORMATS[head_format]
        self.w_fmt = _FORMATS[w_format]
        copy = heads.copy_score is not None
        self.copy = copy
        self.layers = []
        with torch.no_grad():
            for i in range(cfg.num_heads):
                parts = [heads.proj[i], heads.tok_proj[i]] + ([heads.copy_proj[i]] if copy else [])
                w = torch.cat([p.detach().float() for p in parts], dim=1).contiguous()  # [d, 2d or 3d]
                layer = {"w": quantize_ref(w, w_format).contiguous(),
                         "b": heads.bias[i].detach().float().numpy().copy()}
                if copy:
                    s = heads.copy_score[i].detach().float()
                    layer["score"] = (float(s[0]), float(s[1]), float(s[2]), float(F.softplus(s[3])))
                    null = heads.copy_null[i].detach().float()
                    layer["null"] = (null[:-1].numpy().copy(), float(null[-1]))
                    layer["gate"] = heads.copy_gate[i].detach().float().numpy().copy()
                self.layers.append(layer)
        self._xt = torch.zeros((3 if copy else 2) * d)  # the input projections' input, reused
        self._x = self._xt.numpy()

    def _copy_out(self, layer: dict, h: np.ndarray, hist: list[int], index,
                  tail: tuple[int, int, int], pos: int) -> Optional[np.ndarray]:
        """The copy attention's output ``o [d]`` of a node reading ``tail[2]`` at ``pos`` (None:
        no earlier occurrence, o = 0)."""
        y2, y1, y = tail
        js = index.starts.get((y,), ())[-self.copy_matches:]
        if not js:
            return None  # only the "no copy" logit
        w0, w2, w3, slope = layer["score"]
        a, c = layer["null"]
        null = float(h @ a) + c
        scores = []
        for j in js:
            m2 = j >= 1 and hist[j - 1] == y1
            m3 = m2 and j >= 2 and hist[j - 2] == y2
            scores.append(w0 + w2 * m2 + w3 * m3 - slope * math.log(max(pos - j, 1)))
        top = max(null, max(scores))
        ex = np.exp(np.asarray(scores, dtype=np.float32) - top)
        att = ex / (math.exp(null - top) + float(ex.sum()))
        return att @ self.embed_np[[hist[j + 1] for j in js]]

    def depth_logits(self, i: int, h: np.ndarray, hist: list[int], index,
                     tail: tuple[int, int, int], pos: int) -> np.ndarray:
        """Head ``i``'s logits over the draft vocabulary for a node reading ``tail[2]`` (after the
        path tokens ``tail[:2]``) at position ``pos``, from the root's hidden state ``h [d]``."""
        d = h.shape[0]
        layer = self.layers[i]
        x = self._x  # [h, e(y), o]: the input projections' input
        x[:d] = h
        x[d:2 * d] = self.embed_np[tail[2]]
        o = None
        if self.copy:
            o = self._copy_out(layer, h, hist, index, tail, pos)
            x[2 * d:] = 0.0 if o is None else o
        pre = ops.decode_linear(self._xt, layer["w"], self.w_fmt).numpy() + layer["b"]
        g = h + pre / (1.0 + np.exp(-pre))  # h + SiLU(pre)
        if o is not None:
            g += layer["gate"] * o
        return ops.decode_linear(torch.from_numpy(g), self.head_q8, self.head_fmt).numpy()

    @torch.no_grad()
    def chain(self, h: torch.Tensor, hist: list[int], index, max_tokens: int,
              min_prob: float) -> tuple[list[int], float]:
        """The greedy chain (at most ``max_tokens`` tokens, at most one per head) after the root
        ``hist[-1]`` from the final hidden state ``h [d]`` of the node before it, cut where the path
        probability falls below ``min_prob``; and that path probability. ``index``:
        a :class:`ptp.drafters.lookup.NgramIndex` of ``hist``'s 1-grams (the copy attention's keys:
        the earlier positions of a token that another token follows)."""
        hn = h.detach().float().cpu().numpy()
        tail = path_tail(hist)
        L = len(hist)
        out: list[int] = []
        path_p = 1.0
        for i in range(min(max_tokens, self.num_heads)):
            z = self.depth_logits(i, hn, hist, index, tail, L - 1 + i)
            t = int(z.argmax())
            p = 1.0 / float(np.exp(z - z[t]).sum())  # the softmax's maximum
            if path_p * p < min_prob:
                break
            path_p *= p
            tok = self.vocab_ids[t] if self.vocab_ids is not None else t
            out.append(tok)
            tail = (tail[1], tail[2], tok)
        return out, path_p
