"""The sampler head and the context ("copy") attention shared by the slot drafters and the heads.

* :class:`SamplerHead`: the masked-input paper's 2-layer MLP on a slot's final hidden state and the
  embedding of the previously chosen token (``z + MLP([z; E(prev)])``; inference through the fused
  ``ptp_ext.ops.sampler_mlp`` op).
* Copy attention (:func:`copy_matches`, :func:`copy_attention`): a learned prompt lookup. The keys
  are the earlier occurrences of the token a reader reads in the committed context (the
  ``copy_matches`` most recent ones; parameter-free, exact token matches), scored with bigram /
  trigram agreement with the path before it and recency, against a "no copy" logit; the values are
  the embeddings of the tokens that followed.
* :class:`SlotSampler`: the sampler head (and its copy attention) of a drafter whose slot rows
  ride on the verify call: the masked-input drafter's masks (:class:`ptp.drafters.masked_model.MaskedModel`) and the
  PTP model's u-slots (:class:`ptp.drafters.ptp_model.PTPModel`). Slot ``j``'s output is
  ``h = z_j + MLP([z_j; E(prev)])`` and, with copy attention, ``h + g_j * o + C o`` with ``o`` the
  attention over ``prev``'s earlier occurrences against the no-copy logit ``a_j . h + c_j``
  (``C`` shared; ``g``, ``C`` zero-init: a copy sampler starts as the sampler it extends).
* :class:`DraftVocabHost`: a drafter's token counts (how often each token occurs in its training
  answers, saved with the checkpoint) and its draft vocabulary, the most frequent of them: greedy
  drafting reads those rows of the LM head only (SmolLM2: 8,192 of 49,152). Drafts only:
  verification uses the target's full distribution, so the output is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptp_ext.reference import sampler_mlp_ref

__all__ = ["SamplerHead", "SlotSampler", "DraftVocab", "DraftVocabHost", "AUTO_DRAFT_VOCAB", "draft_vocab_ids", "CopyInputs",
           "copy_matches", "teacher_copy_matches", "window_copy_inputs", "copy_attention",
           "path_tail", "node_copy_inputs"]


def _load_named(module: nn.Module, names, state: dict[str, torch.Tensor], missing_ok: bool, what: str) -> None:
    """Copies ``state[name]`` into ``module.<name>`` for each name (same shape; ``missing_ok``: an
    absent name keeps its current value)."""
    for name in names:
        if name not in state:
            if missing_ok:
                continue
            raise ValueError(f"{what} checkpoint lacks {name!r}")
        dst = getattr(module, name)
        if state[name].shape != dst.shape:
            raise ValueError(f"{name}: expected shape {list(dst.shape)}, got {list(state[name].shape)}")
        with torch.no_grad():
            dst.copy_(state[name].to(dst.dtype))


class SamplerHead(nn.Module):
    """``z + [Linear(2d->d) -> SiLU -> LayerNorm -> Linear(d->d) -> SiLU -> LayerNorm]([z; E(prev)])``."""

    def __init__(self, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.eps = eps
        with torch.no_grad():
            nn.init.normal_(self.fc1.weight, std=(2 * hidden) ** -0.5)
            nn.init.zeros_(self.fc1.bias)
            nn.init.normal_(self.fc2.weight, std=hidden ** -0.5)
            nn.init.zeros_(self.fc2.bias)
            self.norm2.weight.mul_(0.1)  # start close to the identity (the residual)

    def _args(self):
        return (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.norm1.weight,
                self.norm1.bias, self.norm2.weight, self.norm2.bias, True, self.eps)

    def forward(self, z: torch.Tensor, prev_tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Differentiable (training): the pure-PyTorch reference of the fused op."""
        return z + sampler_mlp_ref(z, prev_tokens, embedding, *self._args())

    @torch.no_grad()
    def fused(self, z: torch.Tensor, prev_tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Inference through ``ptp_ext.ops.sampler_mlp`` (one fused kernel per call)."""
        from ptp_ext import ops

        w1, b1, w2, b2, n1w, n1b, n2w, n2b = [t.to(z.dtype) for t in self._args()[:8]]
        return z + ops.sampler_mlp(z, w1, w2, prev_tokens=prev_tokens, embedding=embedding.to(z.dtype),
                                   b1=b1, b2=b2, norm1_weight=n1w, norm1_bias=n1b, norm2_weight=n2w,
                                   norm2_bias=n2b, silu_out=True, eps=self.eps)


_NO_TOKEN = -2  # a path token before the sequence start (never equal to a token or the padding -1)


@dataclass
class CopyInputs:
    """What a copy head's context attention reads for each query (:func:`copy_matches`): ``values``
    ``[..., M]`` the token after each match (0 where invalid), ``feats [..., M, 3]`` (bigram
    agreement, trigram agreement, log distance) and ``valid [..., M]``."""
    values: torch.Tensor
    feats: torch.Tensor
    valid: torch.Tensor

    def index(self, i) -> "CopyInputs":
        """The queries ``[..., i, :]`` (one head of ``[..., n, M]`` inputs)."""
        return CopyInputs(self.values[..., i, :], self.feats[..., i, :, :], self.valid[..., i, :])


def copy_matches(ctx: torch.Tensor, ctx_len: torch.Tensor, y: torch.Tensor, y1: torch.Tensor,
                 y2: torch.Tensor, pos: torch.Tensor, max_matches: int) -> CopyInputs:
    """The ``max_matches`` most recent earlier occurrences of each query token in its context.

    ``ctx [Q, L]`` committed token ids (right-padded with -1), ``ctx_len [Q]`` their lengths; ``K``
    queries per context: ``y [Q, K]`` the token a head reads, ``y1``/``y2 [Q, K]`` the two tokens
    before it on its path (-2 before the sequence start), ``pos [Q, K]`` the position of ``y``. A
    key ``j`` is a committed pair: ``x_j == y`` with ``x_{j+1}`` committed (``j <= ctx_len - 2``).
    Returns :class:`CopyInputs` of shape ``[Q, K, M]`` (``M = min(max_matches, L)``)."""
    if ctx.dim() != 2 or y.dim() != 2 or y.shape[0] != ctx.shape[0]:
        raise ValueError(f"copy_matches: ctx [Q, L] and queries [Q, K], got {list(ctx.shape)} and {list(y.shape)}")
    Q, L = ctx.shape
    K = y.shape[1]
    M = max(1, min(int(max_matches), L))
    if L == 0:
        z = torch.zeros(Q, K, 1, dtype=torch.long, device=y.device)
        return CopyInputs(z, torch.zeros(Q, K, 1, 3, device=y.device), z.bool())
    j = torch.arange(L, device=ctx.device)
    keyok = j.unsqueeze(0) <= (ctx_len.to(ctx.device) - 2).unsqueeze(1)  # [Q, L]
    eq = (ctx.unsqueeze(1) == y.unsqueeze(2)) & keyok.unsqueeze(1)  # [Q, K, L]
    at = torch.where(eq, j, -1).topk(M, dim=-1).values  # most recent first; -1: no match
    valid = at >= 0
    jj = at.clamp(min=0)
    flat = jj.view(Q, K * M)

    def tok(off: int) -> torch.Tensor:
        return ctx.gather(1, (flat + off).clamp(0, L - 1)).view(Q, K, M)

    values = torch.where(valid, tok(1), 0)
    m2 = valid & (jj >= 1) & (tok(-1) == y1.unsqueeze(2))
    m3 = m2 & (jj >= 2) & (tok(-2) == y2.unsqueeze(2))
    logd = torch.log((pos.unsqueeze(2) - jj).clamp(min=1).float())
    return CopyInputs(values, torch.stack([m2.float(), m3.float(), logd], -1), valid)


def teacher_copy_matches(ids: torch.Tensor, t: torch.Tensor, n: int, max_matches: int) -> CopyInputs:
    """Teacher-forced copy inputs of ``n`` chained readers at anchors ``t [P]`` of the sequences
    ``ids [P, L]`` (each row the anchor's whole sequence; tokens after ``t + n`` are never read):
    reader i reads the data token ``t + 1 + i`` and the two tokens before it, over the context
    committed at the anchor (tokens ``0 .. t + 1``). Shared by the copy heads (head i) and the
    masked-input drafter's copy sampler (mask i of a window whose verified token is ``t + 1``)."""
    pos = t.unsqueeze(1) + 1 + torch.arange(n, device=t.device)  # [P, n]
    if pos.numel() and int(pos.max()) >= ids.shape[1]:
        raise ValueError("teacher copy inputs: an anchor's n input tokens must lie inside its sequence")

    def at(q: torch.Tensor) -> torch.Tensor:
        return torch.where(q >= 0, ids.gather(1, q.clamp(min=0)), _NO_TOKEN)

    return copy_matches(ids, t + 2, at(pos), at(pos - 1), at(pos - 2), pos, max_matches)


def window_copy_inputs(ids: torch.Tensor, anchors, n: int, max_matches: int) -> CopyInputs:
    """Teacher-forced copy inputs of the slot windows of a training batch, flattened to
    ``[B * W * n, M]`` (window by window, reader by reader): ``ids [B, L]`` the right-padded
    sequences, ``anchors`` ``[B][W]`` the windows' anchors ``a``; a window's reader i reads the data
    token ``a + i`` over the tokens ``0 .. a`` (:func:`teacher_copy_matches` at ``a - 1``: the
    context committed once verification picked token ``a``)."""
    a = torch.as_tensor(anchors, dtype=torch.long, device=ids.device)
    c = teacher_copy_matches(ids.repeat_interleave(a.shape[1], 0), a.reshape(-1) - 1, n, max_matches)
    M = c.values.shape[-1]
    return CopyInputs(c.values.reshape(-1, M), c.feats.reshape(-1, M, 3), c.valid.reshape(-1, M))


def path_tail(tokens) -> tuple[int, int, int]:
    """The last three tokens ``(y2, y1, y)`` of a path (``-2`` before its start): what a copy
    reader's query is made of."""
    pad = [_NO_TOKEN] * 3 + [int(x) for x in tokens[-3:]]
    return pad[-3], pad[-2], pad[-1]


def node_copy_inputs(ctx: torch.Tensor, ctx_len: torch.Tensor, tails, pos, max_matches: int) -> CopyInputs:
    """Copy inputs ``[F, M]`` of ``F`` drafted nodes, one per context row (``ctx [F, L]``,
    ``ctx_len [F]``): node f reads the token ``tails[f][2]`` at position ``pos`` (an int or ``[F]``)
    after the path tokens ``tails[f][:2]`` (:func:`copy_matches` with one query per row)."""
    dev = ctx.device
    t3 = torch.as_tensor(tails, dtype=torch.long, device=dev).view(-1, 3)
    p = torch.as_tensor(pos, dtype=torch.long, device=dev).expand(t3.shape[0]).reshape(-1, 1)
    return copy_matches(ctx, ctx_len, t3[:, 2:3], t3[:, 1:2], t3[:, 0:1], p, max_matches).index(0)


def copy_attention(copy: CopyInputs, score_w: torch.Tensor, null: torch.Tensor,
                   embedding: torch.Tensor) -> torch.Tensor:
    """The context attention's output ``o [..., d]``: softmax over a "no copy" logit ``null [...]``
    and one score per match, ``w0 + w2 bigram + w3 trigram - softplus(s) log distance`` (``score_w
    [..., 4]``, broadcast over the queries' leading dimensions), of the embeddings (``embedding
    [V, d]``) of the tokens that followed the matches; the no-copy share contributes zero."""
    f = copy.feats.to(null.dtype)
    w = score_w.to(null.dtype)
    score = (w[..., 0:1] + w[..., 1:2] * f[..., 0] + w[..., 2:3] * f[..., 1]
             - F.softplus(w[..., 3:4]) * f[..., 2])  # [..., M]
    score = score.masked_fill(~copy.valid, float("-inf"))
    att = torch.softmax(torch.cat([null.unsqueeze(-1), score], -1), -1)[..., 1:]
    e = F.embedding(copy.values, embedding).to(null.dtype)  # [..., M, d]
    return torch.einsum("...m,...md->...d", att, e)


AUTO_DRAFT_VOCAB = 8192  # drafters whose checkpoint has token counts draft over this many tokens


def draft_vocab_ids(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ids of the ``size`` tokens most frequent in ``counts [V]`` (ties by id), sorted by id:
    the draft vocabulary (drafting) and the heads' train vocabulary (training)."""
    order = torch.sort(-counts, stable=True).indices  # most frequent first, ties by id
    return order[:size].sort().values


class DraftVocab:
    """The rows of ``base``'s LM head for the draft vocabulary (:func:`draft_vocab_ids`):
    :meth:`logits` gives the logits over them, ``ids`` maps an index back to the token. On CPU a
    few rows go through ``ptp_ext.ops`` (the LM head's GGUF blocks, if attached, in
    ``decode_linear``: bitwise the decoding step's logits of those tokens)."""

    def __init__(self, base: nn.Module, counts: torch.Tensor, size: int) -> None:
        lm = base.lm_head
        self.ids = draft_vocab_ids(counts, size).to(lm.weight.device)
        self.id_list: list[int] = self.ids.tolist()
        self.weight = lm.weight.detach().index_select(0, self.ids).contiguous()
        bias = getattr(lm, "bias", None)
        self.bias = bias.detach().index_select(0, self.ids) if bias is not None else None
        from ptp.decode.quant import quantized_weights

        qw = quantized_weights(base).get(lm)
        self.q: Optional[tuple[torch.Tensor, str]] = None
        if qw is not None and qw.matches(lm.weight):
            self.q = (qw.qweight.index_select(0, self.ids).contiguous(), qw.format)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., d]`` -> ``[..., K]``."""
        w = self.weight
        b = None if self.bias is None else self.bias.to(w.dtype)
        z = z.to(w.dtype)
        if z.device.type == "cpu":
            # a few rows: the op reads the weights once (CPU BLAS's GEMM for 2-16 rows is 2-3x slower);
            # decode_linear, the decoding step's LM-head kernel (16-lane tiles where the CPU has
            # AVX-512; SmolLM2's 8,192 Q8_0 rows 0.20 -> 0.17 ms a row against quant_linear)
            from ptp_ext.ops import DECODE_STEP_FORMATS, decode_linear, invariant_linear

            z2 = z.reshape(-1, z.shape[-1]).contiguous()
            native = z.dtype == torch.float32 and not z.requires_grad  # decode_linear: inference only
            if native and self.q is not None and self.q[1] in DECODE_STEP_FORMATS:
                out = decode_linear(z2, self.q[0], DECODE_STEP_FORMATS[self.q[1]], b)
            elif native:  # the float32 rows in the same arithmetic as their blocks
                out = decode_linear(z2, w, 0, b)
            else:
                out = invariant_linear(z2, w, b)
            return out.view(*z.shape[:-1], w.shape[0])
        return F.linear(z, w, b)


class DraftVocabHost:
    """Mixin: token counts and a draft vocabulary for a drafter module over ``self.base`` (an HF
    causal LM). ``set_token_counts`` (training: the answers' counts, saved with the checkpoint as
    ``token_counts``), then ``set_draft_vocab(K)``; :meth:`vocab_logits` drafts over it."""

    token_counts: Optional[torch.Tensor] = None
    draft_vocab: Optional[DraftVocab] = None

    def set_token_counts(self, counts: torch.Tensor) -> None:
        V = self.base.get_input_embeddings().weight.shape[0]
        if counts.dim() != 1 or counts.shape[0] != V:
            raise ValueError(f"token_counts: expected shape [{V}] (the model's vocabulary), got {list(counts.shape)}")
        self.token_counts = counts.detach().float().cpu()

    def set_draft_vocab(self, size: int) -> None:
        """Draft over the ``size`` tokens most frequent in the training answers (0: the full
        vocabulary). Drafts only: verification always uses the target's full distribution, so
        the output is unchanged; a token outside the draft vocabulary is just never drafted."""
        size = int(size)
        V = self.base.get_input_embeddings().weight.shape[0]
        if size < 0:
            raise ValueError(f"draft_vocab must be >= 0, got {size}")
        if size == 0 or size >= V:
            self.draft_vocab = None
            return
        if self.token_counts is None:
            raise ValueError(f"draft_vocab needs the token counts of the drafter's training data, and this "
                             f"checkpoint has none (retrain with `ptp train {self.DRAFTER_TYPE}`, which saves "
                             f"them, or use draft_vocab=0)")
        self.draft_vocab = DraftVocab(self.base, self.token_counts, size)

    def auto_draft_vocab(self, size: Optional[int]) -> None:
        """``size`` (an int or its string, as a drafter option) or None: :data:`AUTO_DRAFT_VOCAB`
        tokens if the checkpoint has token counts, else the full vocabulary."""
        if size is None:
            size = AUTO_DRAFT_VOCAB if self.token_counts is not None else 0
        self.set_draft_vocab(int(size))

    @property
    def vocab_ids(self) -> Optional[torch.Tensor]:
        """The draft vocabulary's token ids ``[K]`` (None: the full vocabulary)."""
        return None if self.draft_vocab is None else self.draft_vocab.ids

    @property
    def vocab_id_list(self) -> Optional[list[int]]:
        return None if self.draft_vocab is None else self.draft_vocab.id_list

    @property
    def _vocab_q(self) -> Optional[tuple[torch.Tensor, str]]:
        return None if self.draft_vocab is None else self.draft_vocab.q

    def vocab_logits(self, z: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits of ``z [..., d]`` over the draft vocabulary ``[..., K]`` and its ids ``[K]``
        (without one: the LM head's ``[..., V]`` and None)."""
        if self.draft_vocab is None:
            return self.base.lm_head(z), None
        return self.draft_vocab.logits(z), self.draft_vocab.ids


class SlotSampler(DraftVocabHost):
    """Mixin of :class:`nn.Module` drafters with a sampler head over their slot rows.

    The host sets ``self.config`` (with ``copy_matches``) and provides ``embedding()`` and
    ``logits(hidden)``; :meth:`init_sampler` creates ``sampler`` and the copy tensors
    (:attr:`COPY_NAMES`, one row per slot)."""

    COPY_NAMES = ("copy_score", "copy_null", "copy_proj", "copy_gate")

    def init_sampler(self, hidden: int, num_slots: int, device, sampler: bool, copy_attn: bool) -> None:
        self.sampler = SamplerHead(hidden).to(device) if sampler else None
        self.copy_score = self.copy_null = self.copy_proj = self.copy_gate = None
        if copy_attn:
            k = num_slots
            # per slot: (w0, w_bigram, w_trigram, recency slope before softplus), the "no copy"
            # logit a . h + c and the gate g; one shared projection C (zero-init: starts as the sampler)
            self.copy_score = nn.Parameter(torch.tensor([[0.0, 1.0, 1.0, 0.0]] * k, device=device))
            self.copy_null = nn.Parameter(torch.zeros(k, hidden + 1, device=device))
            self.copy_proj = nn.Parameter(torch.zeros(hidden, hidden, device=device))
            self.copy_gate = nn.Parameter(torch.zeros(k, hidden, device=device))

    def sampler_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.sampler is not None:
            for k, v in self.sampler.state_dict().items():
                out[f"sampler.{k}"] = v.detach()
        if self.copy_score is not None:
            for name in self.COPY_NAMES:
                out[name] = getattr(self, name).detach()
        if self.token_counts is not None:
            out["token_counts"] = self.token_counts
        return out

    def load_sampler_state_dict(self, state: dict[str, torch.Tensor], missing_ok: bool, what: str) -> None:
        """Loads ``sampler.*`` and the copy tensors. ``missing_ok``: absent ones keep their init (a
        checkpoint without a sampler or without copy attention into one with them). Token counts
        (``token_counts``), if stored, are loaded too (they pick the draft vocabulary)."""
        if "token_counts" in state:
            self.set_token_counts(state["token_counts"])
        sampler_keys = {k[len("sampler."):]: v for k, v in state.items() if k.startswith("sampler.")}
        if self.sampler is None:
            if sampler_keys:
                raise ValueError(f"unexpected {what} sampler tensors (sampler=False in the config?)")
        elif sampler_keys:
            self.sampler.load_state_dict(sampler_keys)
        elif not missing_ok:
            raise ValueError(f"{what} checkpoint lacks the sampler head's tensors (sampler.*)")
        present = [n for n in self.COPY_NAMES if n in state]
        if self.copy_score is None:
            if present:
                raise ValueError(f"unexpected {what} tensors {present} (copy_attn=False in the config?)")
            return
        _load_named(self, self.COPY_NAMES, state, missing_ok, f"{what} (copy_attn)")

    def sampler_hidden(self, z: torch.Tensor, prev_tokens: torch.Tensor, slot_index,
                       copy: Optional[CopyInputs] = None, fused: bool = False) -> torch.Tensor:
        """The sampler head's output ``[R, d]`` for slot rows ``z [R, d]`` whose previous token is
        ``prev_tokens [R]``; ``slot_index`` (an int or ``[R]``) says which slot each row is. With
        ``copy_attn``, ``copy`` (``[R, M]``, :func:`copy_matches` of ``prev_tokens`` and the path
        before it) adds the context attention: ``h = z + MLP([z; E(prev)])``, then
        ``h + g_j * o + C o`` with ``o = copy_attention(copy, w_j, a_j . h + c_j)``."""
        emb = self.embedding()
        h = self.sampler.fused(z, prev_tokens, emb) if fused else self.sampler(z, prev_tokens, emb)
        if self.copy_score is None:
            return h
        if copy is None:
            raise ValueError("this drafter's sampler attends over the context (copy_attn): pass copy=CopyInputs")
        if list(copy.values.shape[:-1]) != list(h.shape[:-1]):
            raise ValueError(f"copy inputs: expected queries of shape {list(h.shape[:-1])}, "
                             f"got {list(copy.values.shape[:-1])}")
        nl = self.copy_null[slot_index].to(h.dtype)  # [(R,) d + 1]
        null = (h * nl[..., :-1]).sum(-1) + nl[..., -1]
        o = copy_attention(copy, self.copy_score[slot_index], null, emb)
        return h + self.copy_gate[slot_index].to(h.dtype) * o + o @ self.copy_proj.to(h.dtype).t()

    @torch.no_grad()
    def draft_chain(self, z: torch.Tensor, first_prev: int, pick=None,
                    context: Optional[list[int]] = None, first_slot: int = 0,
                    probs: Optional[list[float]] = None) -> list[int]:
        """Tokens of slots ``first_slot .. k-1`` of one slot block ``z [k, hidden]`` given the token
        before slot ``first_slot``.

        ``pick(j, logits [V]) -> int`` chooses slot j's token; without it (greedy) the argmax over
        the draft vocabulary (:meth:`set_draft_vocab`; the full one without). With the sampler
        head, slot j's prediction conditions on slot j-1's chosen token. ``context`` (required with
        ``copy_attn``): the committed tokens, ending with ``first_prev``. ``probs``: if a list, gets
        each chosen token's probability under the logits it was chosen from.
        """
        def choose(j: int, h: torch.Tensor) -> list[int]:
            if pick is not None:
                logits = self.logits(h).float()
                toks = [int(pick(j + r, logits[r])) for r in range(logits.shape[0])]
                ids = None
            else:
                logits, ids = self.vocab_logits(h)
                logits = logits.float()
                toks = logits.argmax(-1).tolist()
            if probs is not None:
                for r, t in enumerate(toks):
                    probs.append(float(torch.softmax(logits[r], -1)[t]))
            if ids is not None:
                toks = [self.draft_vocab.id_list[t] for t in toks]
            return toks

        if self.sampler is None:
            return choose(first_slot, z[first_slot:])
        out, prev = [], first_prev
        ctx = self.copy_context(context, first_prev, z.device)
        tail = path_tail(context) if ctx is not None else None
        for j in range(first_slot, z.shape[0]):
            prev_t = torch.tensor([prev], device=z.device)
            copy = None
            if ctx is not None:
                L = ctx.shape[1]
                copy = node_copy_inputs(ctx, torch.tensor([L], device=z.device), [tail], L - 1 + j - first_slot,
                                        self.config.copy_matches)
            prev = choose(j, self.sampler_hidden(z[j:j + 1], prev_t, j, copy=copy, fused=True))[0]
            out.append(prev)
            if tail is not None:
                tail = (tail[1], tail[2], prev)
        return out

    @torch.no_grad()
    def draft_tree(self, z: torch.Tensor, first_prev: int, context: Optional[list[int]], max_nodes: int,
                   top: int, min_prob: float = 0.0, first_slot: int = 0) -> tuple[list[int], list[int]]:
        """Greedy draft tree (nodes 1..n as tokens, parents; 0 = the root ``first_prev``) of one slot
        block ``z [k, d]``: :func:`ptp.drafters.trees.best_first_tree` with slot ``first_slot + d``'s
        sampler head expanding depth d on each node's own token (a copy sampler also on the node's
        path over ``context``, which ends with ``first_prev``), at most ``max_nodes`` nodes, ``top``
        candidates per node, none below path probability ``min_prob``, over the draft vocabulary
        (if set). Without a sampler head a depth's candidates do not depend on the node (each
        slot's own top)."""
        from ptp.drafters.trees import best_first_tree

        dev = z.device
        ctx = self.copy_context(context, first_prev, dev)

        def expand(d: int, rows: list[int], toks: list[int], tails) -> torch.Tensor:
            F_ = len(toks)
            j = first_slot + d
            zz = z[j:j + 1].expand(F_, -1).contiguous()
            if self.sampler is None:
                return self.vocab_logits(zz)[0].float()
            prev = torch.tensor(toks, dtype=torch.long, device=dev)
            copy = None
            if ctx is not None:
                L = ctx.shape[1]
                copy = node_copy_inputs(ctx.expand(F_, L), torch.full((F_,), L, device=dev), tails, L - 1 + d,
                                        self.config.copy_matches)
            return self.vocab_logits(self.sampler_hidden(zz, prev, j, copy=copy, fused=True))[0].float()

        tails = [path_tail(context)] if ctx is not None else None
        floor = math.log(min_prob) if min_prob > 0.0 else -math.inf
        tokens, parents = best_first_tree([int(first_prev)], z.shape[0] - first_slot, expand, max_nodes, top,
                                          floor, self.vocab_id_list, tails)[0]
        return tokens[1:], parents[1:]

    def copy_context(self, context: Optional[list[int]], first_prev: int, device) -> Optional[torch.Tensor]:
        """A copy sampler's committed tokens as ``[1, L]`` (``None`` without ``copy_attn``); they
        must end with ``first_prev``, the token before the first drafted slot."""
        if self.copy_score is None:
            return None
        if not context or int(context[-1]) != int(first_prev):
            raise ValueError("a copy sampler drafts from the committed tokens: pass context (ending "
                             "with the token before the first drafted slot)")
        return torch.as_tensor([list(context)], dtype=torch.long, device=device)
