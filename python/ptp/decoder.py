"""The decoding loop: prefill, then repeat {draft -> one target call over the draft tree ->
verify -> commit the accepted tokens and the next token -> compact the KV cache}.

Plain decoding is the same loop with a drafter that proposes nothing (one root node per row):
the target's logits go through ``ptp_ext.ops.verify_tree`` with N = 0, so plain and speculative
decoding draw from the identical distribution with the identical uniforms.

Row invariance: a token's logits must not depend on how many rows the call that computed them
carried, or a sampled token whose uniform falls within float rounding of a CDF boundary (or a
greedy near-tie) could differ between plain and speculative decoding. BLAS is not row-invariant:
torch 2.13's CPU sgemm rounds a 1-3 row call and the last M mod 4 rows of a call of M < 12 rows
differently from the rest (1e-6 per layer, 4e-5 in SmolLM2's logits; measured). With
``GenerationConfig.row_invariant`` (default on CPU) every ``nn.Linear`` of the target runs through
``ptp_ext.ops.invariant_linear`` in the decoding calls (each output row one fixed sequence of
float32 operations; it also reads the weights once per call, faster than BLAS for these row
counts), and the CPU tree attention is row-invariant by construction: a chain node sums the same
keys in the same groups as a 1-token call, and a tree node reads its ancestors (not contiguous in
the call) at consecutive positions, as plain decoding sees them. Chain and tree drafts then give
bitwise the logits of plain decoding (``tests/test_decoder_exact.py``,
``tests/test_decoder_real.py``). The prefill is the same call in plain and speculative decoding
and keeps BLAS.

Positions: the root of a step (the last committed token, not yet in the KV cache) sits at
``cache_lens[b]``; a draft node at depth d has position ``cache_lens[b] + d`` and the token it
predicts (sampled with ``U(seed, sequence, cache_lens[b] + 1 + d)``) position one more.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ptp_ext import ops

from .attention import register as register_attention
from .cache import RowCache
from .fastpath import FastForward, fast_forward_for
from .lora import GatedLoRALinear
from .models import cache_kw
from .drafters.base import AuxRows, Draft, DraftRequest, Drafter, NoDrafter, StepOutcome
from .sampling import SamplingConfig, uniforms

__all__ = ["GenerationConfig", "SequenceResult", "Decoder", "InvariantLinears", "tree_mask_and_depth",
           "aux_mask_and_positions"]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # needs the Decoder's tokenizer
    max_cache_len: Optional[int] = None  # default: longest prompt + max_new_tokens + draft room
    max_draft_nodes: int = 64  # cap on draft nodes per step, whatever the drafter asks
    # decoding calls through ptp_ext.ops.invariant_linear, so a token's logits do not depend on
    # the draft size (bitwise); None: on for CPU models, off elsewhere
    row_invariant: Optional[bool] = None
    # decoding calls of Llama / Mistral / Qwen2 models through ptp.fastpath's direct layer loop
    # (bitwise the HF forward's results, without its per-module overhead); None: wherever the
    # model's structure is supported, False: always the HF forward
    fast_path: Optional[bool] = None


class InvariantLinears:
    """Routes every ``nn.Linear`` of ``model`` through :func:`ptp_ext.ops.invariant_linear` while
    ``active`` is true (the target's decoding calls, whatever their row count), and for calls of
    at most ``small_rows`` rows otherwise (drafters' calls: not needed for exactness, but it is
    faster than BLAS there); larger calls (the prefill) keep BLAS. Only inside the context;
    outside it the layers are untouched. Subclasses of ``nn.Linear`` (quantised layers and the
    like) keep their own forward."""

    def __init__(self, model: torch.nn.Module, small_rows: int = 32):
        self.active = False
        self.small_rows = int(small_rows)
        self.layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
        # gated-LoRA wrappers (self-speculative drafters) fuse base + adapter into one op call
        # (ptp_ext.ops.gated_lora_linear) whenever their base layer would take the op
        self.lora_layers = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]

    def wants(self, x: torch.Tensor) -> bool:
        """Whether a linear layer's call on ``x`` goes through the row-invariant op."""
        return self.active or (x.dim() > 0 and x.numel() <= self.small_rows * x.shape[-1])

    def _forward(self, layer: torch.nn.Linear):
        plain = torch.nn.Linear.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.wants(x):
                return plain(layer, x)
            w = layer.weight if layer.weight.is_contiguous() else layer.weight.contiguous()
            return ops.invariant_linear(x, w, layer.bias)
        return forward

    def __enter__(self) -> "InvariantLinears":
        for layer in self.layers:
            layer.forward = self._forward(layer)
        for layer in self.lora_layers:
            layer.invariant = self
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        for layer in self.lora_layers:
            layer.invariant = None
        self.active = False


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


def aux_mask_and_positions(parents: torch.Tensor, aux: AuxRows, cache_lens: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``[B, N+1+A, N+1+A]`` and position ids ``[B, N+1+A]`` of a tree plus aux rows."""
    node_mask, depth = tree_mask_and_depth(parents)
    B, N1 = parents.shape
    A = aux.anchor.shape[1]
    dev = parents.device
    anchor = aux.anchor.to(dev)
    valid = anchor >= 0
    anc = anchor.clamp_min(0)
    if bool((anc >= N1).any()):
        raise ValueError(f"aux rows hang after node {int(anc.max())}, but the tree has {N1} nodes")
    mask = torch.zeros(B, N1 + A, N1 + A, dtype=torch.bool, device=dev)
    mask[:, :N1, :N1] = node_mask
    mask[:, N1:, :N1] = node_mask.gather(1, anc.unsqueeze(-1).expand(B, A, N1)) & valid.unsqueeze(-1)
    group = aux.group.to(dev)
    idx = torch.arange(A, device=dev)
    same = (group.unsqueeze(2) == group.unsqueeze(1)) & (idx.view(1, 1, A) <= idx.view(1, A, 1))
    same &= valid.unsqueeze(2) & valid.unsqueeze(1)
    mask[:, N1:, N1:] = same | torch.eye(A, dtype=torch.bool, device=dev)
    aux_pos = depth.gather(1, anc) + aux.offset.to(dev)
    positions = cache_lens.view(B, 1) + torch.cat([depth, aux_pos], dim=1)
    return mask, positions


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
        self._fast: Optional[FastForward] = None  # set per generate() call (the drafter may wrap layers)
        self._linears: Optional[InvariantLinears] = None

    # -- one target call ----------------------------------------------------------------------
    def _forward(self, cache: RowCache, input_ids, position_ids, cache_lens, host_lens,
                 tree_mask=None, prefill=False, logits_to_keep=0, aux: Optional[AuxRows] = None,
                 want_hidden: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits of the tree rows (``logits_to_keep`` as HF) and, when asked or when there are
        aux rows, the final hidden states of the tree and aux rows ``[B, N1 + A, hidden]``."""
        B, N1 = input_ids.shape
        A = aux.num_rows if aux is not None else 0
        T = N1 + A
        cache.set_write_positions(cache_lens, host_lens, T)
        fast = self._fast if not prefill else None
        if fast is not None and aux is None and not want_hidden:
            hidden = fast(fast.embed(input_ids), position_ids, cache, cache_lens, tree_mask, self._linears)
            kept = hidden if not logits_to_keep else hidden[:, -logits_to_keep:]
            return fast.logits(kept, self._linears), None
        kw = dict(position_ids=position_ids, use_cache=True, **cache_kw(self.model, cache),
                  ptp_cache_lens=cache_lens, ptp_tree_mask=tree_mask, ptp_prefill=prefill)
        if aux is None and not want_hidden:
            return self.model(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw).logits, None
        if getattr(self.model.config, "final_logit_softcapping", None):
            raise ValueError("drafters that read hidden states need a plain LM head (no logit softcapping)")
        emb = self.model.get_input_embeddings()(input_ids)
        if aux is not None:
            emb = torch.cat([emb, aux.embeds.to(device=emb.device, dtype=emb.dtype)], dim=1)
        ctx = contextlib.nullcontext()
        if aux is not None:
            rows = torch.zeros(B, T, dtype=torch.bool, device=emb.device)
            rows[:, N1:] = True
            ctx = self.drafter.aux_context(rows)
        with ctx:
            if fast is not None:
                hidden = fast(emb, position_ids, cache, cache_lens, tree_mask, self._linears)
            else:
                hidden = self.model.get_decoder()(inputs_embeds=emb, **kw).last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            kept = hidden[:, logits_to_keep]
        else:
            kept = hidden[:, :N1] if not logits_to_keep else hidden[:, N1 - logits_to_keep:N1]
        if fast is not None:
            return fast.logits(kept, self._linears), hidden
        return self.model.get_output_embeddings()(kept), hidden

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
    def generate(self, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                 sequence_ids: Optional[Sequence[int]] = None,
                 on_tokens: Optional[Callable[[int, list[int]], None]] = None
                 ) -> list[SequenceResult]:
        """Decode a batch of token-id prompts together; returns one result per prompt, in order.

        ``sequence_ids`` index the uniform stream (default 0..B-1); ``on_tokens(i, new_ids)`` is
        called with each batch of committed tokens of prompt i (streaming). The model's attention
        implementation is ``"ptp"`` during the call and restored afterwards.
        """
        previous = self.model.config._attn_implementation
        invariant = config.row_invariant if config.row_invariant is not None else \
            self.model.device.type == "cpu"
        if invariant and self.model.device.type != "cpu":
            raise ValueError("row_invariant decoding is implemented for CPU models (the CUDA "
                             "attention and BLAS paths are not row-invariant)")
        self._fast = fast_forward_for(self.model) if config.fast_path is not False else None
        if config.fast_path and self._fast is None:
            raise ValueError(f"fast_path=True: {type(self.model).__name__} is not a structure "
                             f"ptp.fastpath supports (Llama, Mistral, Qwen2 causal LMs); use None "
                             f"or False")
        try:
            if not invariant:
                return self._generate(prompts, config, sequence_ids, on_tokens, None)
            with InvariantLinears(self.model) as linears:
                return self._generate(prompts, config, sequence_ids, on_tokens, linears)
        finally:
            self._fast = None
            self._linears = None
            if previous and previous != self.impl:
                self.model.set_attn_implementation(previous)

    @torch.inference_mode()
    def _generate(self, prompts, config: GenerationConfig, sequence_ids, on_tokens,
                  linears: Optional[InvariantLinears]) -> list[SequenceResult]:
        t0 = time.perf_counter()
        self._linears = linears
        B = len(prompts)
        if B == 0:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        if config.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {config.max_new_tokens}")
        if config.max_draft_nodes < 0:
            raise ValueError(f"max_draft_nodes must be >= 0, got {config.max_draft_nodes}")
        if config.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the Decoder's tokenizer")
        lens = [len(p) for p in prompts]
        drafter = self.drafter
        if hasattr(drafter, "reset"):
            drafter.reset()
        want_hidden = bool(getattr(drafter, "wants_hidden", False))
        aux_room = int(drafter.aux_room(config.max_draft_nodes)) if hasattr(drafter, "aux_room") else 0
        S = config.max_cache_len or (max(lens) + config.max_new_tokens + config.max_draft_nodes + 1
                                     + aux_room)
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
        logits, hidden = self._forward(cache, ids, torch.arange(T, device=device).expand(B, T), zeros,
                                       [0] * B, prefill=True, logits_to_keep=keep, want_hidden=want_hidden)
        logits = logits[torch.arange(B, device=device), torch.searchsorted(keep, last)]
        roots = ids[torch.arange(B, device=device), last].view(B, 1)
        cache_lens = last  # the prompts' last tokens become the roots of the first verify
        root_parents = torch.full_like(roots, -1)
        num_acc, acc_nodes, nxt = self._verify(roots, root_parents, logits.unsqueeze(1),
                                               cache_lens, seq_ids, sampling)
        if want_hidden:
            drafter.observe(StepOutcome(seq_ids.tolist(), cache_lens, roots, root_parents, num_acc,
                                        acc_nodes, nxt, hidden=hidden[torch.arange(B, device=device), last].unsqueeze(1)))
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
            max_rows = S - max(host_lens)
            room = min(config.max_draft_nodes, max_rows - 1)
            draft: Optional[Draft] = None
            if room >= 0:
                draft = drafter.propose(DraftRequest(
                    histories=[histories[b] for b in rows], sequence_ids=seq_ids.tolist(),
                    max_nodes=room, sampling=sampling, max_rows=max_rows,
                    cache_lens=cache_lens.tolist()))
            if draft is not None and draft.num_nodes - 1 > room:
                raise ValueError(f"drafter {drafter.name!r} proposed {draft.num_nodes - 1} "
                                 f"nodes, more than the {room} allowed")
            aux = draft.aux if draft is not None else None
            if aux is not None and draft.num_nodes + aux.num_rows > max_rows:
                raise ValueError(f"drafter {drafter.name!r} proposed {draft.num_nodes} nodes and "
                                 f"{aux.num_rows} aux rows, more than the {max_rows} rows left")
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
                if aux is not None:
                    mask, positions = aux_mask_and_positions(parents, aux, cache_lens)
                elif is_chain:
                    mask = None
                    positions = cache_lens.view(Ba, 1) + torch.arange(tokens.shape[1], device=device)
                else:
                    mask, depth = tree_mask_and_depth(parents)
                    positions = cache_lens.view(Ba, 1) + depth

            # one target call over the drafts (and the drafter's aux rows), then verify
            if linears is not None:
                linears.active = True
            try:
                logits, hidden = self._forward(cache, tokens, positions, cache_lens, host_lens,
                                               tree_mask=mask, aux=aux, want_hidden=want_hidden)
            finally:
                if linears is not None:
                    linears.active = False
            num_acc, acc_nodes, nxt = self._verify(tokens, parents, logits, cache_lens, seq_ids,
                                                   sampling, draft_probs)
            if want_hidden:
                N1 = tokens.shape[1]
                drafter.observe(StepOutcome(seq_ids.tolist(), cache_lens, tokens, parents, num_acc,
                                            acc_nodes, nxt, hidden=hidden[:, :N1],
                                            aux_hidden=hidden[:, N1:] if aux is not None else None,
                                            aux=aux))
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
