"""The decoding loop: prefill, then repeat {draft -> one target call over the draft tree ->
verify -> commit the accepted tokens and the next token -> compact the KV cache}.

Plain decoding is the same loop with a drafter that proposes nothing (one root node per row):
the target's logits go through ``ptp_ext.ops.verify_tree`` with N = 0, so plain and speculative
decoding draw from the identical distribution with the identical uniforms.

Positions: the root of a step (the last committed token, not yet in the KV cache) sits at
``cache_lens[b]``; a draft node at depth d has position ``cache_lens[b] + d`` and the token it
predicts (sampled with ``U(seed, sequence, cache_lens[b] + 1 + d)``) position one more.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ptp_ext import ops

from .attention import register as register_attention
from .cache import RowCache
from .drafters.base import Draft, DraftRequest, Drafter, NoDrafter
from .sampling import SamplingConfig, uniforms

__all__ = ["GenerationConfig", "SequenceResult", "Decoder", "tree_mask_and_depth"]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # needs the Decoder's tokenizer
    max_cache_len: Optional[int] = None  # default: longest prompt + max_new_tokens + draft room
    max_draft_nodes: int = 64  # cap on draft nodes per step, whatever the drafter asks


@dataclass
class SequenceResult:
    sequence_id: int
    prompt_tokens: int
    new_token_ids: list[int]
    target_calls: int = 0
    seconds: float = 0.0
    finish_reason: str = ""  # "eos", "length", "stop"

    @property
    def tokens_per_call(self) -> float:
        return len(self.new_token_ids) / max(self.target_calls, 1)


def tree_mask_and_depth(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``parents [B, N+1]`` -> ancestor-or-self mask ``[B, N+1, N+1]`` bool and depth ``[B, N+1]``.

    A padding node (parent -1 beyond node 0) sees only itself and gets depth 0.
    """
    B, N1 = parents.shape
    mask = torch.eye(N1, dtype=torch.bool, device=parents.device).repeat(B, 1, 1)
    depth = torch.zeros(B, N1, dtype=torch.long, device=parents.device)
    rows = torch.arange(B, device=parents.device)
    for i in range(1, N1):  # parents precede children, so one pass suffices
        p = parents[:, i]
        valid = p >= 0
        pc = p.clamp_min(0)
        mask[:, i] |= mask[rows, pc] & valid.view(B, 1)
        depth[:, i] = torch.where(valid, depth[rows, pc] + 1, 0)
    return mask, depth


class Decoder:
    """Exact (speculative) decoding of a HF causal LM with ``ptp_ext`` attention and verify ops."""

    def __init__(self, model, tokenizer=None, drafter: Optional[Drafter] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter if drafter is not None else NoDrafter()
        self.impl = register_attention()
        cfg = model.config.get_text_config(decoder=True)
        self.num_layers = cfg.num_hidden_layers
        self.sliding_window = getattr(cfg, "sliding_window", None)
        if getattr(cfg, "use_sliding_window", True) is False:
            self.sliding_window = None

    # -- one target call ----------------------------------------------------------------------
    def _forward(self, cache: RowCache, input_ids, position_ids, cache_lens, host_lens,
                 tree_mask=None, prefill=False, logits_to_keep=0) -> torch.Tensor:
        cache.set_write_positions(cache_lens, host_lens, input_ids.shape[1])
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                         use_cache=True, logits_to_keep=logits_to_keep, ptp_cache_lens=cache_lens,
                         ptp_tree_mask=tree_mask, ptp_prefill=prefill)
        return out.logits

    def _verify(self, tokens, parents, logits, cache_lens, seq_ids, sampling: SamplingConfig,
                draft_probs=None):
        if sampling.greedy:
            mode, u = "greedy", None
        elif draft_probs is not None:
            mode = "rejection"
            # node i's acceptance test uses salt i; the residual/bonus pick (column 0) the token
            # stream itself; (position, salt) never repeats, since cache_lens only grow
            pos = (cache_lens + 1).view(-1, 1)
            u = torch.cat([uniforms(sampling.seed, seq_ids.view(-1, 1), pos, salt=i)
                           for i in range(tokens.shape[1])], dim=1)
        else:
            # coupled: the token after a node at depth d is sampled with U(seq, cache_len + 1 + d)
            mode = "coupled"
            d = torch.arange(tokens.shape[1], device=tokens.device)
            u = uniforms(sampling.seed, seq_ids.view(-1, 1), (cache_lens + 1).view(-1, 1) + d)
        return ops.verify_tree(tokens, parents, logits, draft_probs, u, mode,
                               sampling.temperature, sampling.top_k, sampling.top_p)

    # -- the loop -----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                 sequence_ids: Optional[Sequence[int]] = None,
                 on_tokens: Optional[Callable[[int, list[int]], None]] = None
                 ) -> list[SequenceResult]:
        """Decode a batch of token-id prompts together; returns one result per prompt, in order.

        ``sequence_ids`` index the uniform stream (default 0..B-1); ``on_tokens(i, new_ids)`` is
        called with each batch of committed tokens of prompt i (streaming).
        """
        t0 = time.perf_counter()
        B = len(prompts)
        if B == 0:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        if config.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
        if config.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the Decoder's tokenizer")
        lens = [len(p) for p in prompts]
        S = config.max_cache_len or (max(lens) + config.max_new_tokens + config.max_draft_nodes + 1)
        if max(lens) + 1 > S:
            raise ValueError(f"prompt of {max(lens)} tokens does not fit the KV cache "
                             f"(max_cache_len {S})")
        if self.sliding_window is not None and S > self.sliding_window:
            raise ValueError(f"sequences up to {S} tokens exceed the model's sliding window "
                             f"({self.sliding_window}), which the ptp attention does not apply")
        self.model.set_attn_implementation(self.impl)
        device = self.model.device
        sampling = config.sampling
        eos = set(config.eos_token_ids)
        seq_ids = torch.tensor(list(sequence_ids) if sequence_ids is not None else range(B),
                               dtype=torch.long, device=device)
        results = [SequenceResult(int(seq_ids[b]), lens[b], []) for b in range(B)]
        histories = [list(map(int, p)) for p in prompts]
        rows = list(range(B))  # active rows -> index into prompts/results
        cache = RowCache(self.num_layers, B, S)

        # prefill: right-padded prompts, SDPA (every row starts at 0); logits at each last token
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :lens[b]] = torch.as_tensor(p)
        ids = ids.to(device)
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        last = torch.tensor(lens, device=device) - 1
        keep = torch.unique(last)
        logits = self._forward(cache, ids, torch.arange(T, device=device).expand(B, T), zeros,
                               [0] * B, prefill=True, logits_to_keep=keep)
        logits = logits[torch.arange(B, device=device), torch.searchsorted(keep, last)]
        roots = ids[torch.arange(B, device=device), last].view(B, 1)
        cache_lens = last  # the prompts' last tokens become the roots of the first verify
        _, _, nxt = self._verify(roots, torch.full_like(roots, -1), logits.unsqueeze(1),
                                 cache_lens, seq_ids, sampling)
        cache_lens = torch.tensor(lens, device=device)
        host_lens = list(lens)
        for r in results:
            r.target_calls += 1
        new_tokens = [[t] for t in nxt.tolist()]

        while True:
            # commit: EOS, max tokens and stop strings end a row; finished rows leave the batch
            alive = []
            for i, b in enumerate(rows):
                res, new = results[b], new_tokens[i]
                taken = []
                for t in new:
                    taken.append(t)
                    res.new_token_ids.append(t)
                    if t in eos:
                        res.finish_reason = "eos"
                    elif len(res.new_token_ids) >= config.max_new_tokens:
                        res.finish_reason = "length"
                    elif config.stop_strings and self._hits_stop(res.new_token_ids, config):
                        res.finish_reason = "stop"
                    if res.finish_reason:
                        break
                histories[b].extend(taken)
                if on_tokens is not None:
                    on_tokens(b, taken)
                if res.finish_reason:
                    res.seconds = time.perf_counter() - t0
                else:
                    alive.append(i)
            if not alive:
                break
            if len(alive) < len(rows):
                keep_rows = torch.tensor(alive, device=device)
                cache.select_rows(keep_rows)
                rows = [rows[i] for i in alive]
                nxt, cache_lens, seq_ids = nxt[keep_rows], cache_lens[keep_rows], seq_ids[keep_rows]
                host_lens = [host_lens[i] for i in alive]
            Ba = len(rows)

            # draft
            room = min(config.max_draft_nodes, S - max(host_lens) - 1)
            draft: Optional[Draft] = None
            if room > 0:
                draft = self.drafter.propose(DraftRequest(
                    histories=[histories[b] for b in rows], sequence_ids=seq_ids.tolist(),
                    max_nodes=room, sampling=sampling))
            if draft is not None and draft.num_nodes - 1 > room:
                raise ValueError(f"drafter {self.drafter.name!r} proposed {draft.num_nodes - 1} "
                                 f"nodes, more than the {room} allowed")
            if draft is None:
                tokens = nxt.view(Ba, 1)
                parents = torch.full_like(tokens, -1)
                mask, positions, draft_probs, is_chain = None, cache_lens.view(Ba, 1), None, True
            else:
                tokens = draft.tokens.to(device).clone()
                tokens[:, 0] = nxt
                parents = draft.parents.to(device)
                draft_probs = draft.draft_probs
                is_chain = draft.is_chain
                if is_chain:
                    mask = None
                    positions = cache_lens.view(Ba, 1) + torch.arange(tokens.shape[1], device=device)
                else:
                    mask, depth = tree_mask_and_depth(parents)
                    positions = cache_lens.view(Ba, 1) + depth

            # one target call over the drafts, then verify
            logits = self._forward(cache, tokens, positions, cache_lens, host_lens, tree_mask=mask)
            num_acc, acc_nodes, nxt = self._verify(tokens, parents, logits, cache_lens, seq_ids,
                                                   sampling, draft_probs)
            n_host = num_acc.tolist()
            width = max(n_host) + 1
            if not is_chain and width > 1:
                cache.compact(cache_lens, acc_nodes, width)
            acc_tokens = tokens.gather(1, acc_nodes[:, :width].clamp_min(0))[:, 1:].tolist()
            new_tokens = [acc_tokens[i][:n] + [t] for i, (n, t) in enumerate(zip(n_host, nxt.tolist()))]
            cache_lens = cache_lens + num_acc + 1
            host_lens = [h + n + 1 for h, n in zip(host_lens, n_host)]
            for b in rows:
                results[b].target_calls += 1
        return results

    def _hits_stop(self, ids: list[int], config: GenerationConfig) -> bool:
        # decode a short tail: a stop string ending at the newest token is inside it
        tail = self.tokenizer.decode(ids[-16:], skip_special_tokens=False)
        return any(s in tail for s in config.stop_strings)
