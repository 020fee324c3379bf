"""Independent MTP heads (Gloeckle et al. 2024 / Medusa): the model (its losses are
:mod:`ptp.train.masked` / :mod:`ptp.train.heads`, the drafter :mod:`ptp.drafters.heads`).

**MTP heads** (:class:`MTPHeads`): n residual blocks on the target's final hidden state
``h_t`` (``h + SiLU(W_i h + b_i)``, ``W_i`` zero-initialised, Medusa's form) sharing the
target's LM head; head i (1-based) predicts the token at index ``t + 1 + i``. The target is
untouched (no adapter at all); the heads read the hidden states of the verify call.
With ``token_input`` each head also reads the embedding ``e`` of token ``t + 1`` (the token the
target has just committed, known when drafting): ``h + SiLU(W_i h + U_i e + b_i)``. At
temperature 0 that token is ``argmax(LM head(h_t))``, a function of ``h_t`` that a small head
cannot compute itself; at T > 0 it is the sampled token, information ``h_t`` does not hold.
With ``chain_input`` (Hydra's sequential heads, arXiv 2402.05109) head i instead reads the token
just before its own target: head 0 the committed token ``t + 1``, head i >= 1 the token ``t + 1 + i``
(in training the data's; in decoding the token drafted at the previous depth), so a chain or a
tree is drafted one depth at a time and each node's children condition on that node's token. On the
v6 data this lifts the teacher-forced (= greedy chain) accepted prefix from 0.859 to 0.989 at equal
steps (``benchmarks/results/archive/2026-12-03-cpu-heads-chain-input-pilot.md``).

With ``copy_attn`` (implies ``chain_input``) each head also attends over the committed context, a
learned prompt lookup inside the head: the keys are the earlier occurrences ``j`` of the token the
head reads (``x_j == y``, the ``copy_matches`` most recent ones, :func:`copy_matches`), each
scored ``w0 + w2 [x_{j-1} == y_{-1}] + w3 [.. and x_{j-2} == y_{-2}] - softplus(s) log(p - j)``
(bigram and trigram agreement with the path before ``y``, recency) against a "no copy" logit
``a . h + c``; the value is the embedding of the token that followed, ``e(x_{j+1})``. The
attention output ``o`` enters the block twice: ``h + SiLU(W_i h + U_i e + C_i o + b_i) + g_i * o``
(SmolLM2 ties its LM head to the embeddings, so ``g_i * o`` raises the copied token's logit
directly). ``C_i`` and ``g_i`` start at zero, so copy heads start as the chain heads they extend.
The context side has no parameters (exact token matches), so training needs only the token ids
beside the cached hidden states and drafting costs a comparison over the row's history.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptp.drafters.sampler_head import CopyInputs, DraftVocabHost, _load_named, copy_attention, teacher_copy_matches

__all__ = ["HeadsConfig", "MTPHeads"]


@dataclass
class HeadsConfig:
    num_heads: int = 4
    base_model: str = "smollm2-135m-instruct"
    token_input: bool = False  # heads also read the embedding of the committed token t + 1
    # head i reads the token t + 1 + i (the previous head's), not t + 1: drafting goes depth by depth
    chain_input: bool = False
    # heads also attend over the committed context's earlier occurrences of the token they read
    # (a learned prompt lookup; implies chain_input), keeping the copy_matches most recent ones
    copy_attn: bool = False
    copy_matches: int = 16

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.copy_matches < 1:
            raise ValueError(f"copy_matches must be >= 1, got {self.copy_matches}")
        if self.copy_attn:
            self.chain_input = True  # the copy query is the token the head reads and the path before it
        if self.chain_input:
            self.token_input = True  # a chain-input head reads a token embedding too

    def to_dict(self) -> dict:
        return asdict(self)


class MTPHeads(DraftVocabHost, nn.Module):
    """n residual heads on the target's final hidden state, sharing its LM head."""

    DRAFTER_TYPE = "heads"
    CONFIG_KEY = "heads"

    def __init__(self, base: nn.Module, config: HeadsConfig) -> None:
        super().__init__()
        self.base = base
        self.config = config
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.get_input_embeddings().weight
        hidden = w.shape[1]
        self.proj = nn.Parameter(torch.zeros(config.num_heads, hidden, hidden, device=w.device))
        self.bias = nn.Parameter(torch.zeros(config.num_heads, hidden, device=w.device))
        self.tok_proj = (nn.Parameter(torch.zeros(config.num_heads, hidden, hidden, device=w.device))
                         if config.token_input else None)
        n = config.num_heads
        self.copy_score = self.copy_null = self.copy_proj = self.copy_gate = None
        if config.copy_attn:
            # per head: (w0, w_bigram, w_trigram, recency slope before softplus)
            self.copy_score = nn.Parameter(torch.tensor([[0.0, 1.0, 1.0, 0.0]] * n, device=w.device))
            self.copy_null = nn.Parameter(torch.zeros(n, hidden + 1, device=w.device))  # "no copy": a . h + c
            self.copy_proj = nn.Parameter(torch.zeros(n, hidden, hidden, device=w.device))
            self.copy_gate = nn.Parameter(torch.zeros(n, hidden, device=w.device))
        # token_counts (how often each token occurs in the answers the heads were trained on;
        # saved with the checkpoint) and the draft vocabulary they pick: :class:`DraftVocabHost`

    def _names(self) -> tuple[str, ...]:
        names = ("proj", "bias", "tok_proj") if self.tok_proj is not None else ("proj", "bias")
        if self.copy_score is not None:
            names += ("copy_score", "copy_null", "copy_proj", "copy_gate")
        return names

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._names()]

    def trainable_names(self) -> tuple[str, ...]:
        return self._names()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n).detach() for n in self._names()}
        if self.token_counts is not None:
            out["token_counts"] = self.token_counts
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], missing_ok: bool = False) -> None:
        """Loads the heads' tensors (and token counts, if stored). ``missing_ok``: tensors the
        state lacks keep their current values (``ptp train heads --init-from``: chain heads into
        copy heads)."""
        state = dict(state)
        counts = state.pop("token_counts", None)
        if counts is not None:
            self.set_token_counts(counts)
        extra = set(state) - set(self._names())
        if extra:
            raise ValueError(f"unexpected MTP-heads tensors {sorted(extra)} (token_input="
                             f"{self.config.token_input}, copy_attn={self.config.copy_attn} in the config?)")
        _load_named(self, self._names(), state, missing_ok, "MTP-heads")

    def input_tokens(self, next_tokens: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """What :meth:`head_hidden` reads for all heads at once, given the committed tokens
        ``next_tokens [...]`` and the data's (or the drafted) following tokens ``targets [..., >= n-1]``
        (head i's target is ``targets[..., i]``): ``None`` without token input, ``next_tokens``
        with ``token_input``, ``[..., n]`` (``next_tokens`` then ``targets[..., :n-1]``) with
        ``chain_input``."""
        if not self.config.token_input:
            return None
        if not self.config.chain_input:
            return next_tokens
        n = self.config.num_heads
        return torch.cat([next_tokens.unsqueeze(-1), targets[..., :n - 1]], -1)

    def _token_term(self, tokens: Optional[torch.Tensor], like: torch.Tensor,
                    head: Optional[int]) -> Optional[torch.Tensor]:
        if self.tok_proj is None:
            return None
        what = "the previous head's token (chain_input)" if self.config.chain_input else \
            "the committed token (token_input)"
        if tokens is None:
            raise ValueError(f"these MTP heads read {what}: pass next_tokens")
        n = self.config.num_heads
        want = list(like.shape[:-1]) + ([n] if self.config.chain_input and head is None else [])
        if list(tokens.shape) != want:
            raise ValueError(f"next_tokens: expected shape {want} ({what}), got {list(tokens.shape)}")
        e = self.base.get_input_embeddings()(tokens).to(like.dtype)
        u = self.tok_proj.to(like.dtype)
        if head is not None:
            return e @ u[head].t()
        if self.config.chain_input:
            return torch.einsum("...nd,ned->...ne", e, u)
        return torch.einsum("...d,ned->...ne", e, u)

    def teacher_copy_inputs(self, ids: torch.Tensor, t: torch.Tensor) -> Optional[CopyInputs]:
        """Copy inputs of all n heads at anchors ``t [P]`` of the sequences ``ids [P, L]`` (each
        row the anchor's whole sequence; padding after it is never read), teacher-forced as
        :meth:`input_tokens`: head i reads the data token ``t + 1 + i`` and the path before it,
        over the context committed at the anchor (tokens ``0 .. t + 1``). ``None`` without copy_attn."""
        if not self.config.copy_attn:
            return None
        return teacher_copy_matches(ids, t, self.config.num_heads, self.config.copy_matches)

    def _copy_out(self, copy: Optional[CopyInputs], h: torch.Tensor, head: Optional[int]) -> Optional[torch.Tensor]:
        """The context attention's output ``o``: ``[..., n, d]`` (``[..., d]`` for one head)."""
        if self.copy_score is None:
            return None
        if copy is None:
            raise ValueError("these MTP heads attend over the context (copy_attn): pass copy=CopyInputs "
                             "(copy_matches / node_copy_inputs / MTPHeads.teacher_copy_inputs)")
        n = self.config.num_heads
        want = list(h.shape[:-1]) + ([] if head is not None else [n])
        if list(copy.values.shape[:-1]) != want:
            raise ValueError(f"copy inputs: expected queries of shape {want}, got {list(copy.values.shape[:-1])}")
        w = self.copy_score if head is None else self.copy_score[head]  # [(n,) 4]
        nl = self.copy_null if head is None else self.copy_null[head]  # [(n,) d + 1]
        if head is None:
            null = torch.einsum("...d,nd->...n", h, nl[:, :-1].to(h.dtype)) + nl[:, -1].to(h.dtype)
        else:
            null = h @ nl[:-1].to(h.dtype) + nl[-1].to(h.dtype)
        return copy_attention(copy, w, null, self.base.get_input_embeddings().weight)

    def head_hidden(self, h: torch.Tensor, head: Optional[int] = None,
                    next_tokens: Optional[torch.Tensor] = None, copy: Optional[CopyInputs] = None) -> torch.Tensor:
        """``h [..., d]`` -> ``[..., n, d]`` (or ``[..., d]`` for one head). ``next_tokens [...]``:
        the token each ``h`` was followed by (required with ``token_input``); with
        ``chain_input``, the token each head reads: ``[..., n]`` for all heads
        (:meth:`input_tokens`), ``[...]`` for one. ``copy`` (required with ``copy_attn``): the
        context matches of each head's query (:func:`copy_matches`), ``[..., n, M]`` or ``[..., M]``."""
        p, b = self.proj.to(h.dtype), self.bias.to(h.dtype)
        t = self._token_term(next_tokens, h, head)
        o = self._copy_out(copy, h, head)
        if head is not None:
            pre = h @ p[head].t() + b[head]
            pre = pre if t is None else pre + t
            if o is None:
                return h + F.silu(pre)
            return h + F.silu(pre + o @ self.copy_proj[head].to(h.dtype).t()) + self.copy_gate[head].to(h.dtype) * o
        pre = torch.einsum("...d,ned->...ne", h, p) + b
        pre = pre if t is None else pre + t
        if o is None:
            return h.unsqueeze(-2) + F.silu(pre)
        pre = pre + torch.einsum("...nd,ned->...ne", o, self.copy_proj.to(h.dtype))
        return h.unsqueeze(-2) + F.silu(pre) + self.copy_gate.to(h.dtype) * o

    def logits(self, h: torch.Tensor, next_tokens: Optional[torch.Tensor] = None,
               copy: Optional[CopyInputs] = None) -> torch.Tensor:
        """All heads' logits ``[..., n, V]`` from final hidden states ``[..., d]``."""
        return self.base.lm_head(self.head_hidden(h, next_tokens=next_tokens, copy=copy))

    def draft_logits(self, h: torch.Tensor, next_tokens: Optional[torch.Tensor] = None,
                     head: Optional[int] = None, copy: Optional[CopyInputs] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits over the draft vocabulary ``[..., n, K]`` (``[..., K]`` for one ``head``) and its
        token ids ``[K]`` (``None`` and the full ``[..., n, V]`` without one)."""
        return self.vocab_logits(self.head_hidden(h, head=head, next_tokens=next_tokens, copy=copy))
