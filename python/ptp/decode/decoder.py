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
``ptp_ext.ops.invariant_linear`` (or ``quant_linear`` over its GGUF blocks; :mod:`ptp.decode.linear`
decides) in the decoding calls (each output row one fixed sequence of
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
import dataclasses
import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from ptp_ext import ops

from ptp.decode.attention import WindowPlan, register as register_attention
from ptp.decode.cache import RowCache
from ptp.decode import cuda_graphs
from ptp.decode.fastpath import FastForward, fast_forward_for
from ptp.decode.native import native_step_for
from ptp.decode.linear import LinearRouter
from ptp.models import cache_kw
from ptp.decode.draft import AuxRows, Draft, DraftRequest, Drafter, NoDrafter, StepOutcome
from ptp.decode.prompts import (Prompt, check_context, default_eos_token_ids, encode_text,
                                prompt_token_ids, split_prompts)
from ptp.decode.sampling import SamplingConfig, uniforms

__all__ = ["GenerationConfig", "SequenceResult", "Decoder", "tree_mask_and_depth",
           "aux_mask_and_positions"]

# The KV cache starts with room for this many new tokens (plus prompt and draft room) and doubles
# when a run goes further: a huge max_new_tokens does not allocate its worst case up front.
INITIAL_CACHE_NEW_TOKENS = 256


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # tokens that end a sequence; None: the model's (generation_config.eos_token_id and the
    # tokenizer's eos_token_id: default_eos_token_ids), (): none
    eos_token_ids: Optional[tuple[int, ...]] = None
    stop_strings: tuple[str, ...] = ()  # needs the Decoder's tokenizer
    # KV cache positions per row at most; default: longest prompt + max_new_tokens + draft room,
    # capped at the model's max_position_embeddings (the buffers grow on demand up to it)
    max_cache_len: Optional[int] = None
    max_draft_nodes: int = 64  # cap on draft nodes per step, whatever the drafter asks
    # decoding calls through ptp_ext.ops.invariant_linear, so a token's logits do not depend on
    # the draft size (bitwise); None: on for CPU models, off elsewhere
    row_invariant: Optional[bool] = None
    # decoding calls of Llama / Mistral / Qwen2 / Gemma 3 models through ptp.decode.fastpath's direct layer loop
    # (bitwise the HF forward's results, without its per-module overhead); None: wherever the
    # model's structure is supported, False: always the HF forward
    fast_path: Optional[bool] = None
    # text prompts: wrap them as a user message in the tokenizer's chat template (True), tokenize
    # them as they are (False), or None: the chat template when the tokenizer has one (instruct
    # models), else as they are. Token-id prompts are never changed.
    chat_template: Optional[bool] = None
    # decoding calls padded to fixed bucket sizes and replayed from CUDA graphs
    # (ptp.decode.cuda_graphs; the KV cache is then allocated at its full capacity up front and
    # kept for later generate calls of the same batch size); None: on for batch-size-1 calls of
    # CUDA models that the fast path supports and that have no sliding window, False: eager calls
    cuda_graphs: Optional[bool] = None
    # CPU decoding calls of Llama / Mistral / Qwen2 models through ptp_ext.ops.decode_step, the
    # whole layer stack in one op (ptp.decode.native; row-invariant, not bitwise the HF forward);
    # None: wherever the fast path runs row-invariant calls of a supported model, False: off
    native_step: Optional[bool] = None


@dataclass
class SequenceResult:
    sequence_id: int
    prompt_tokens: int
    new_token_ids: list[int]
    target_calls: int = 0
    seconds: float = 0.0
    finish_reason: str = ""  # "eos", "length", "stop"
    text: Optional[str] = None  # the new tokens decoded (special tokens skipped), with a tokenizer

    @property
    def tokens_per_call(self) -> float:
        return len(self.new_token_ids) / max(self.target_calls, 1)


def tree_mask_and_depth(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``parents [B, N+1]`` -> ancestor-or-self mask ``[B, N+1, N+1]`` bool and depth ``[B, N+1]``.

    A padding node (parent -1 beyond node 0) sees only itself and gets depth 0.
    """
    if parents.is_cuda:  # a handful of batched products instead of ~7 launches per node
        return cuda_graphs.tree_mask_and_depth_closure(parents)
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
        if drafter is not None and not isinstance(drafter, Drafter):
            raise TypeError(f"drafter must be a ptp.decode.draft.Drafter (subclass it and override "
                            f"propose), got {type(drafter).__name__}")
        self.drafter = drafter if drafter is not None else NoDrafter()
        self.impl = register_attention()
        cfg = model.config.get_text_config(decoder=True)
        self.num_layers = cfg.num_hidden_layers
        self.vocab_size = int(getattr(cfg, "vocab_size", None)
                              or model.get_input_embeddings().num_embeddings)
        # the context length the model was trained for; None: no limit known
        self.max_positions: Optional[int] = getattr(cfg, "max_position_embeddings", None)
        self.sliding_window = getattr(cfg, "sliding_window", None)
        if getattr(cfg, "use_sliding_window", True) is False:
            self.sliding_window = None
        self._fast: Optional[FastForward] = None  # set per generate() call (the drafter may wrap layers)
        self._linears: Optional[LinearRouter] = None
        # CUDA graphs: the runner of the current generate() call, and the (cache, runner) pair kept
        # across calls (the graphs write that cache; see _graph_cache)
        self._use_graphs = False
        self._graphs: Optional[cuda_graphs.GraphRunner] = None
        self._graph_state: Optional[tuple[RowCache, cuda_graphs.GraphRunner]] = None
        # with graphs, sampling: the token stream's uniforms U(seed, row, 0 .. S) [B, S + 1]
        self._u_table: Optional[torch.Tensor] = None

    # -- one target call ----------------------------------------------------------------------
    def _forward(self, cache: RowCache, input_ids, position_ids, cache_lens, host_lens,
                 tree_mask=None, prefill=False, logits_to_keep=0, aux: Optional[AuxRows] = None,
                 want_hidden: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits of the tree rows (``logits_to_keep`` as HF) and, when asked or when there are
        aux rows, the final hidden states of the tree and aux rows ``[B, N1 + A, hidden]``."""
        B, N1 = input_ids.shape
        A = aux.num_rows if aux is not None else 0
        T = N1 + A
        if self._graphs is not None and not prefill and not logits_to_keep:
            out = self._graphs.forward(input_ids, position_ids, cache_lens, tree_mask, aux, max(host_lens))
            if out is not None:  # else beyond the buckets: an eager call below
                return out[0], (out[1] if aux is not None or want_hidden else None)
        cache.set_write_positions(cache_lens, host_lens, T)
        fast = self._fast if not prefill else None
        # sliding-window layers: the positions of the call's tokens (ptp.decode.attention)
        window = (WindowPlan(position_ids, cache_lens, tree_mask, self.sliding_window)
                  if self.sliding_window is not None and not prefill else None)
        if (aux is not None or want_hidden) and getattr(self.model.config, "final_logit_softcapping", None):
            raise ValueError("drafters that read hidden states need a plain LM head (no logit softcapping)")
        if fast is not None and aux is None and not logits_to_keep:
            out = fast.call_logits(input_ids, position_ids, cache, cache_lens, tree_mask, self._linears,
                                   window, hidden=want_hidden)
            return out if want_hidden else (out, None)
        kw = dict(position_ids=position_ids, use_cache=True, **cache_kw(self.model, cache),
                  ptp_cache_lens=cache_lens, ptp_tree_mask=tree_mask, ptp_prefill=prefill,
                  ptp_window=window)
        if aux is None and not want_hidden:
            return self.model(input_ids=input_ids, logits_to_keep=logits_to_keep, **kw).logits, None
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
                hidden = fast(emb, position_ids, cache, cache_lens, tree_mask, self._linears, window)
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
            if self._u_table is not None:  # precomputed (CUDA graphs): one gather, not ~30 launches
                u = self._u_table.gather(1, (cache_lens + 1).view(-1, 1) + d)
            else:
                u = uniforms(sampling.seed, seq_ids.view(-1, 1), (cache_lens + 1).view(-1, 1) + d)
        return ops.verify_tree(tokens, parents, logits, draft_probs, u, mode,
                               sampling.temperature, sampling.top_k, sampling.top_p)

    # -- the loop -----------------------------------------------------------------------------
    def encode(self, text: str, chat_template: Optional[bool] = None) -> list[int]:
        """Token ids of a text prompt (:func:`ptp.decode.prompts.encode_text`)."""
        return encode_text(self.tokenizer, text, chat_template)

    def check_context(self, prompt_lengths: Sequence[int], config: GenerationConfig,
                      labels: Optional[Sequence[str]] = None) -> None:
        """``ValueError`` when a prompt plus ``max_new_tokens`` exceeds the model's
        ``max_position_embeddings`` (:func:`ptp.decode.prompts.check_context`)."""
        check_context(prompt_lengths, config.max_new_tokens, self.max_positions, labels)

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 config: Optional[GenerationConfig] = None,
                 sequence_ids: Optional[Sequence[int]] = None,
                 on_tokens: Optional[Callable[[int, list[int]], None]] = None
                 ) -> Union[SequenceResult, list[SequenceResult]]:
        """Decode one prompt, or a batch of prompts together.

        Parameters
        ----------
        prompts
            One prompt (a ``str``, a list of token ids or a 1-D tensor) or a list of them. Text is
            tokenized with the Decoder's tokenizer (see ``GenerationConfig.chat_template``); token
            ids must lie in ``[0, vocab_size)``.
        config
            Default ``GenerationConfig()`` (128 new tokens, greedy, the model's EOS tokens).
        sequence_ids
            Index the uniform stream (default ``0 .. B-1``).
        on_tokens
            ``on_tokens(i, new_ids)`` is called with each batch of committed tokens of prompt i
            (streaming).

        Returns
        -------
        One :class:`SequenceResult` for a single prompt, else a list, in prompt order; ``text`` is
        set when the Decoder has a tokenizer. Bad prompts and a prompt plus ``max_new_tokens``
        beyond the model's context raise ``ValueError`` before the model runs. The model's
        attention implementation is ``"ptp"`` during the call and restored afterwards.
        """
        config = config if config is not None else GenerationConfig()
        single, batch = split_prompts(prompts)
        ids = [self.encode(p, config.chat_template) if isinstance(p, str)
               else prompt_token_ids(i, p, self.vocab_size) for i, p in enumerate(batch)]
        self.check_context([len(p) for p in ids], config)
        if config.eos_token_ids is None:
            config = dataclasses.replace(config, eos_token_ids=default_eos_token_ids(self.model,
                                                                                     self.tokenizer))
        results = self._run(ids, config, sequence_ids, on_tokens)
        if self.tokenizer is not None:
            for r in results:
                r.text = self.tokenizer.decode(r.new_token_ids, skip_special_tokens=True)
        return results[0] if single else results

    def _run(self, prompts: list[list[int]], config: GenerationConfig, sequence_ids, on_tokens
             ) -> list[SequenceResult]:
        previous = self.model.config._attn_implementation
        invariant = config.row_invariant if config.row_invariant is not None else \
            self.model.device.type == "cpu"
        if invariant and self.model.device.type != "cpu":
            raise ValueError("row_invariant decoding is implemented for CPU models (the CUDA "
                             "attention and BLAS paths are not row-invariant)")
        self._fast = fast_forward_for(self.model) if config.fast_path is not False else None
        if config.fast_path and self._fast is None:
            raise ValueError(f"fast_path=True: {type(self.model).__name__} is not a structure "
                             f"ptp.decode.fastpath supports (Llama, Mistral, Qwen2, Gemma 3 causal LMs); use None "
                             f"or False")
        if config.native_step is not False:
            if config.native_step and (self._fast is None or not invariant):
                raise ValueError("native_step=True needs the fast path and row-invariant CPU calls "
                                 "(fast_path and row_invariant not False)")
            if self._fast is not None and invariant:
                self._fast.native = native_step_for(self._fast, required=bool(config.native_step))
        self._use_graphs = self._graphs_wanted(config, len(prompts))  # runner: with the cache (_generate)
        # no cyclic garbage collection inside the loop: its passes over the model's objects took
        # ~3 % of a CPU decoding step (reference counting still frees the loop's tensors)
        collecting = gc.isenabled()
        gc.disable()
        try:
            if not invariant:
                return self._generate(prompts, config, sequence_ids, on_tokens, None)
            with LinearRouter(self.model) as linears:
                return self._generate(prompts, config, sequence_ids, on_tokens, linears)
        finally:
            if collecting:
                gc.enable()
            self._fast = None
            self._linears = None
            self._use_graphs = False
            self._graphs = None
            self._u_table = None
            if previous and previous != self.impl:
                self.model.set_attn_implementation(previous)

    def graph_stats(self) -> Optional[dict]:
        """Counters of the CUDA-graph runner kept across generate() calls (None before a call with
        graphs): ``replays``, ``eager_calls``, ``captures``, real ``rows`` and ``bucket_rows``."""
        return None if self._graph_state is None else self._graph_state[1].stats()

    def _graphs_wanted(self, config: GenerationConfig, batch_size: int) -> bool:
        """Whether this generate() call replays its decoding calls from CUDA graphs."""
        why = None
        if self.model.device.type != "cuda":
            why = f"the model is on {self.model.device.type}, not CUDA"
        elif self._fast is None:
            why = "the model's decoding calls do not take ptp.decode.fastpath (fast_path)"
        elif self.sliding_window is not None:
            why = "the model has a sliding window (its per-call window plan is host work)"
        if config.cuda_graphs is None:
            # auto: batch size 1 only. A batch's rows leave it as they finish, which moves the KV
            # buffers and makes the graphs be captured again (batched teacher generation would
            # recapture at nearly every step); cuda_graphs=True forces them
            return why is None and batch_size == 1
        if config.cuda_graphs and why is not None:
            raise ValueError(f"cuda_graphs=True, but {why}; use None or False")
        return bool(config.cuda_graphs)

    def _graph_cache(self, B: int, S: int, max_nodes: int, aux_room: int, linears
                     ) -> tuple[RowCache, cuda_graphs.GraphRunner]:
        """The KV cache and graph runner of a generate() call with CUDA graphs: allocated at full
        capacity (S rounded up to a power of two, plus the largest bucket's padding) and kept for
        later calls with the same batch size and no more room needed, so their graphs replay."""
        slack = cuda_graphs.cache_slack(max_nodes + 1, aux_room)
        state = self._graph_state
        if state is not None:
            cache, runner = state
            keys = cache.layers[0].keys if cache.layers[0].is_initialized else None
            if (keys is not None and keys.shape[0] == B and cache.capacity >= S + slack
                    and keys.device == self.model.device and keys.dtype == self.model.dtype):
                runner.fast, runner.linears, runner.aux_context = self._fast, linears, self.drafter.aux_context
                return cache, runner
        self._graph_state = None  # free the old buffers first
        capacity = cuda_graphs.rounded_capacity(S) + slack
        cache = RowCache(self.num_layers, B, capacity, initial_len=capacity)
        runner = cuda_graphs.GraphRunner(self._fast, cache, self.drafter.aux_context,
                                         capture=self.model.device.type == "cuda", linears=linears)
        self._graph_state = (cache, runner)
        return cache, runner

    @torch.inference_mode()
    def _generate(self, prompts, config: GenerationConfig, sequence_ids, on_tokens,
                  linears: Optional[LinearRouter]) -> list[SequenceResult]:
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
        drafter.reset()
        want_hidden = bool(drafter.wants_hidden)
        aux_room = int(drafter.aux_room(config.max_draft_nodes))
        room = config.max_draft_nodes + 1 + aux_room  # a step's rows beyond the committed tokens
        S = config.max_cache_len or (max(lens) + config.max_new_tokens + room)
        if config.max_cache_len is None and self.max_positions is not None:
            # prompt + max_new_tokens fits (check_context); drafts near the end get less room
            S = min(S, max(self.max_positions, max(lens) + config.max_new_tokens))
        if max(lens) + 1 > S:
            raise ValueError(f"prompt of {max(lens)} tokens does not fit the KV cache "
                             f"(max_cache_len {S})")
        self.model.set_attn_implementation(self.impl)
        device = self.model.device
        sampling = config.sampling
        eos = set(config.eos_token_ids or ())
        seq_ids = torch.tensor(list(sequence_ids) if sequence_ids is not None else range(B),
                               dtype=torch.long, device=device)
        results = [SequenceResult(int(seq_ids[b]), lens[b], []) for b in range(B)]
        histories = [list(map(int, p)) for p in prompts]
        rows = list(range(B))  # active rows -> index into prompts/results
        # the buffers start small and double on demand (RowCache.reserve): exactness does not
        # depend on their length, and drafts are bounded by S, not by the current allocation
        if self._use_graphs:  # CUDA graphs: a fixed cache (they write it), reused
            cache, self._graphs = self._graph_cache(B, S, config.max_draft_nodes, aux_room, linears)
        else:
            cache = RowCache(self.num_layers, B, S,
                             initial_len=max(lens) + min(config.max_new_tokens, INITIAL_CACHE_NEW_TOKENS) + room)

        if self._graphs is not None and not sampling.greedy:
            # every position a verify can sample: roots < S, drafts within the S positions
            self._u_table = uniforms(sampling.seed, seq_ids.view(-1, 1), torch.arange(S + 1, device=device))

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
            # verify_tree's sentinel: -1 for a row whose logits (or uniforms) were invalid
            bad = [rows[i] for i, new in enumerate(new_tokens) if new and new[-1] < 0]
            if bad:
                raise FloatingPointError(
                    f"the target's logits are not finite (NaN or +inf) for prompt(s) {bad} after "
                    f"{[len(results[b].new_token_ids) for b in bad]} new tokens: the model's "
                    f"weights or activations overflow (try float32)")
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
                if self._u_table is not None:
                    self._u_table = self._u_table[keep_rows]
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
                    cache_lens=list(host_lens)))  # = cache_lens, without a device sync
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
            if self._graphs is not None:
                # one host sync: counts, next tokens and the accepted paths' tokens together;
                # the compaction needs no host value (a graph over all the tree's columns)
                if not is_chain:
                    self._graphs.compact(cache_lens, acc_nodes)
                packed = torch.cat([num_acc.view(-1, 1), nxt.view(-1, 1),
                                    tokens.gather(1, acc_nodes.clamp_min(0))[:, 1:]], dim=1).tolist()
                n_host = [r[0] for r in packed]
                new_tokens = [r[2:2 + r[0]] + [r[1]] for r in packed]
            else:
                n_host = num_acc.tolist()
                width = max(n_host) + 1
                if not is_chain and width > 1:
                    cache.compact(cache_lens, acc_nodes, width)
                if width > 1:
                    acc_tokens = tokens.gather(1, acc_nodes[:, :width].clamp_min(0))[:, 1:].tolist()
                    new_tokens = [acc_tokens[i][:n] + [t] for i, (n, t) in enumerate(zip(n_host, nxt.tolist()))]
                else:  # no draft token accepted (a plain step): the target's own tokens only
                    new_tokens = [[t] for t in nxt.tolist()]
            cache_lens = cache_lens + num_acc + 1
            host_lens = [h + n + 1 for h, n in zip(host_lens, n_host)]
            for b in rows:
                results[b].target_calls += 1
        return results

    def _hits_stop(self, ids: list[int], config: GenerationConfig) -> bool:
        # decode a short tail: a stop string ending at the newest token is inside it
        tail = self.tokenizer.decode(ids[-16:], skip_special_tokens=False)
        return any(s in tail for s in config.stop_strings)
