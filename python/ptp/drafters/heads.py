"""The MTP heads drafter (``heads``): independent heads on the target's final hidden states.

The heads read the final hidden state of the last accepted node (``observe``), so drafting costs
no call of its own; head i proposes the token i places after the verified next token. Greedy: a
chain of each head's argmax, or a tree of the best candidates by the product of the heads'
probabilities (``tree=1``, ``max_nodes``, ``top``; :func:`ptp.drafters.trees.grid_tree`).
Chain-input heads (``HeadsConfig.chain_input``: head i reads the token drafted at depth i) draft
one depth at a time: the chain feeds each argmax to the next head, and the tree expands each
candidate node with the next head run on that node's own token
(:func:`ptp.drafters.trees.best_first_tree`). Copy heads (``HeadsConfig.copy_attn``) also attend
over the row's committed tokens: each node's head reads the earlier occurrences of its token (and
of the two path tokens before it) in ``request.histories``.

Sampling: ``verify=coupled`` (default) drafts ``Pick(U(seed, seq, index), q_i)`` with the
decoder's uniform stream (token-identical to plain sampling); ``verify=rejection`` samples the
drafts from q_i with an independent stream and passes q to rejection sampling (the target's
distribution, not the same tokens).

``lookup_ngram=n`` (n >= 1; 0 = off) merges prompt lookup's continuations (the most recent earlier
occurrences of the row's last n..``lookup_max_ngram`` tokens, ``lookup_branches`` of them, up to
``lookup_tokens`` tokens each) into the draft as trie branches: the heads draft what the model
writes, lookup what it copies (RAG, summaries, translation, code edits). Greedy and coupled
verification (a tree of any shape is verified exactly); not with ``verify=rejection``. Row savers
(the drafts change, never the output): ``min_prob=P`` stops a chain, or the best-first tree, where
the heads' path probability falls below P; ``draft_vocab=K`` drafts over the K tokens most
frequent in the heads' training answers (default: 8,192 when the checkpoint stores their counts,
else the full vocabulary; 0 = full), so the heads' LM-head pass reads K rows of the LM head, not V.
Options: :class:`ptp.drafters.options.HeadsOptions` (``docs/drafter-options.md``).

Temperature 0 verification is greedy: the output is plain greedy decoding's.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from ptp.decode.draft import Draft, DraftRequest, Drafter, StepOutcome
from ptp.decode.sampling import uniforms
from ptp.drafters.base import register_drafter
from ptp.drafters.heads_model import MTPHeads
from ptp.drafters.lookup import LookupDrafter
from ptp.drafters.options import HeadsOptions
from ptp.drafters.ptp_model import vector_pick
from ptp.drafters.sampler_head import node_copy_inputs, path_tail
from ptp.drafters.trees import best_first_tree, grid_tree, merge_chains, pack_draft
from ptp_ext.reference import sampling_probs

__all__ = ["HeadsDrafter", "DEFAULT_HEADS"]

DEFAULT_HEADS = os.path.join(os.path.dirname(__file__), "weights", "heads-smollm2-135m-instruct")
_DRAFT_SALT = 7919  # the drafts' own stream under rejection verification (never salt 0..N)


class HeadsDrafter(Drafter):
    name = "heads"
    wants_hidden = True

    def __init__(self, heads: MTPHeads, options: Optional[HeadsOptions] = None, **kw) -> None:
        self.options = o = HeadsOptions.build(options, **kw)
        self.min_prob = o.min_prob
        self.lookup = LookupDrafter.of(o) if o.lookup_ngram > 0 else None
        self.lookup_used = 0  # statistics: rows whose draft got a lookup branch
        self.heads = heads.eval()
        self.vocab_size = heads.base.get_input_embeddings().weight.shape[0]
        heads.auto_draft_vocab(o.draft_vocab)  # None: the 8,192 most frequent answer tokens, if known
        self.tree, self.max_nodes, self.top, self.verify = o.tree, o.max_nodes, o.top, o.verify
        # sequence id -> (root index, hidden state of the node before the root [d])
        self._state: dict[int, tuple[int, torch.Tensor]] = {}

    def reset(self) -> None:
        self._state.clear()

    def observe(self, outcome: StepOutcome) -> None:
        n_acc = outcome.num_accepted
        B = n_acc.shape[0]
        rows = torch.arange(B, device=n_acc.device)
        last = outcome.accepted_nodes[rows, n_acc]  # the last accepted node (whose output is nxt)
        h = outcome.hidden[rows, last]
        nxt_index = (outcome.cache_lens + n_acc + 1).tolist()
        for b, seq in enumerate(outcome.sequence_ids):
            self._state[seq] = (nxt_index[b], h[b])

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> Optional[Draft]:
        n = self.heads.config.num_heads
        budget = min(request.max_nodes, self.max_nodes if self.tree else n)
        if budget <= 0:
            return None
        s = request.sampling
        hs, ok = [], []
        for b, seq in enumerate(request.sequence_ids):
            st = self._state.get(seq)
            good = st is not None and st[0] == len(request.histories[b]) - 1
            ok.append(good)
            hs.append(st[1] if good else None)
        if not any(ok):
            return self.lookup.propose(request) if self.lookup is not None else None
        dev = next(h for h in hs if h is not None).device
        H = torch.stack([h if h is not None else torch.zeros_like(next(x for x in hs if x is not None))
                         for h in hs])
        # the root (the token the target committed after the node whose hidden state is H)
        roots = [hist[-1] if good else 0 for hist, good in zip(request.histories, ok)]
        if s.greedy and self.tree:
            trees = self.greedy_trees(H, roots, budget, request.histories)
            rows = [t if good else ([0], [-1]) for t, good in zip(trees, ok)]
            probs_rows: list[Optional[torch.Tensor]] = [None] * len(rows)
        else:
            rows, probs_rows = self.draft_chains(H, roots, ok, budget, request)
        if self.lookup is not None:  # lookup's continuations join each row's draft as trie paths
            for b, (t, p) in enumerate(rows):
                room = request.max_nodes - (len(t) - 1)
                if room <= 0:
                    continue
                conts = self.lookup.continuations(request.histories[b], min(self.lookup.lookup_tokens, room))
                if merge_chains(t, p, conts, request.max_nodes):
                    self.lookup_used += 1
        width = max(len(t) for t, _ in rows)
        if width == 1:
            return None
        draft_probs = None
        if not s.greedy and self.verify == "rejection":
            V = self.vocab_size
            B = len(rows)
            draft_probs = torch.zeros(B, width, V, dtype=torch.float32, device=dev)
            for b, q in enumerate(probs_rows):
                if q is None:
                    # rows without a draft: one-hot on the padding token never gets tested
                    draft_probs[b, :, 0] = 1.0
                else:
                    draft_probs[b, 1:1 + q.shape[0]] = q
                    draft_probs[b, 0, 0] = 1.0
                    draft_probs[b, 1 + q.shape[0]:, 0] = 1.0
        return pack_draft(rows, draft_probs=draft_probs)

    def _independent_logits(self, H: torch.Tensor, roots: list[int]) -> torch.Tensor:
        """All independent heads' float logits ``[B, n, V or K]`` in one pass (token-input heads
        read the committed tokens ``roots``)."""
        nxt = torch.tensor(roots, dtype=torch.long, device=H.device) if self.heads.config.token_input else None
        return self.heads.draft_logits(H, next_tokens=nxt)[0].float()

    def _contexts(self, histories: Optional[list], B: int, dev) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Copy heads: the rows' committed tokens ``[B, L]`` (zero-padded) and lengths ``[B]``."""
        if not self.heads.config.copy_attn:
            return None
        if histories is None or len(histories) != B:
            raise ValueError("copy heads (copy_attn) draft from the rows' committed tokens: pass histories")
        L = max(1, max(len(hh) for hh in histories))
        ctx = torch.zeros(B, L, dtype=torch.long)
        for b, hh in enumerate(histories):
            if len(hh):
                ctx[b, :len(hh)] = torch.as_tensor(hh, dtype=torch.long)
        return ctx.to(dev), torch.tensor([len(hh) for hh in histories], dtype=torch.long, device=dev)

    def _node_copy(self, ctxs, rows: list[int], last3: list[tuple[int, int, int]], depth: int):
        """Copy inputs ``[F, M]`` of nodes at ``depth`` (0: reading the root) of rows ``rows``
        whose path ends with the tokens ``last3`` (y2, y1, y)."""
        if ctxs is None:
            return None
        ctx, lens = ctxs
        r = torch.tensor(rows, dtype=torch.long, device=ctx.device)
        return node_copy_inputs(ctx[r], lens[r], last3, lens[r] - 1 + depth, self.heads.config.copy_matches)

    @torch.no_grad()
    def draft_chains(self, H: torch.Tensor, roots: list[int], ok: list[bool], budget: int, request: DraftRequest
                ) -> tuple[list[tuple[list[int], list[int]]], list[Optional[torch.Tensor]]]:
        """One chain per row, depth by depth: greedy (each head's argmax) or sampled (coupled or
        the drafts' own stream), each with its head's q (rejection). Independent heads run in one
        pass; chain-input heads (``chain_input``) one head per depth, reading the token just drafted."""
        s = request.sampling
        n = self.heads.config.num_heads
        cfg = self.heads.config
        ids = self.heads.vocab_id_list
        B, dev = H.shape[0], H.device
        vocab = self.heads.vocab_ids
        all_logits = None if cfg.chain_input else self._independent_logits(H, roots)  # [B, n, V or K]
        toks = [[0] for _ in range(B)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(B)]
        path_p = [1.0] * B
        live = list(ok)
        prev = list(roots)
        ctxs = self._contexts(request.histories, B, dev)
        last3 = ([path_tail(hh) if good else (-2, -2, 0) for hh, good in zip(request.histories, ok)]
                 if ctxs is not None else None)
        for i in range(min(n, budget)):
            if not any(live):
                break
            if all_logits is not None:
                logits = all_logits[:, i]
            else:
                copy = self._node_copy(ctxs, list(range(B)), last3, i) if ctxs is not None else None
                logits = self.heads.draft_logits(H, next_tokens=torch.tensor(prev, dtype=torch.long, device=dev),
                                                 head=i, copy=copy)[0].float()  # [B, V or K]
            top_p = (torch.softmax(logits, -1).amax(-1).tolist()
                     if s.greedy and self.min_prob > 0.0 else None)
            am = logits.argmax(-1).tolist() if s.greedy else None
            for b in range(B):
                if not live[b]:
                    continue
                idx = len(request.histories[b]) + i  # head i+1's token sits i+1 places after the root
                if s.greedy:
                    t = am[b]
                    if top_p is not None:
                        path_p[b] *= top_p[b]
                        if path_p[b] < self.min_prob:
                            live[b] = False
                            continue
                    t = ids[t] if ids is not None else t
                    toks[b].append(t)
                    prev[b] = t
                    if last3 is not None:
                        last3[b] = (last3[b][1], last3[b][2], t)
                    continue
                q = sampling_probs(logits[b], s.temperature, s.top_k, s.top_p)
                salt = 0 if self.verify == "coupled" else _DRAFT_SALT
                u = uniforms(s.seed, torch.tensor(request.sequence_ids[b]), torch.tensor(idx), salt=salt)
                t = int(vector_pick(u, q))
                path_p[b] *= float(q[t])
                if self.min_prob > 0.0 and path_p[b] < self.min_prob:
                    live[b] = False
                    continue
                if vocab is not None:  # q over the full vocabulary (rejection sampling reads it)
                    q = torch.zeros(self.vocab_size, dtype=q.dtype, device=q.device).index_copy_(0, vocab, q)
                    t = ids[t]
                toks[b].append(t)
                qs[b].append(q)
                prev[b] = t
                if last3 is not None:
                    last3[b] = (last3[b][1], last3[b][2], t)
        rows = [(t, list(range(-1, len(t) - 1))) if good else ([0], [-1]) for t, good in zip(toks, ok)]
        probs = [torch.stack(q) if q and good else None for q, good in zip(qs, ok)]
        return rows, probs

    @torch.no_grad()
    def greedy_trees(self, H: torch.Tensor, roots: list[int], budget: int, histories: Optional[list] = None
                     ) -> list[tuple[list[int], list[int]]]:
        """Greedy draft trees (tokens, parents; node 0 the root) of at most ``budget`` nodes below
        the root for hidden states ``H [B, d]`` and committed tokens ``roots``: the best-first tree
        (:func:`ptp.drafters.trees.grid_tree`) for independent heads; for chain-input heads :meth:`_chain_tree` (copy
        heads also read ``histories``, each row's committed tokens ending with its root)."""
        if self.heads.config.chain_input:
            return self._chain_tree(H, roots, budget, histories)
        logits = self._independent_logits(H, roots)
        floor = math.log(self.min_prob) if self.min_prob > 0.0 else -math.inf
        return [grid_tree(logits[b], budget, self.top, floor, self.heads.vocab_id_list) for b in range(H.shape[0])]

    def _chain_tree(self, H: torch.Tensor, roots: list[int], budget: int, histories: Optional[list] = None
                    ) -> list[tuple[list[int], list[int]]]:
        """Best-first tree of chain-input heads (:func:`best_first_tree`, head d expanding depth d
        on its parent's token; copy heads also read the rows' committed tokens ``histories``)."""
        n = self.heads.config.num_heads
        floor = math.log(self.min_prob) if self.min_prob > 0.0 else -math.inf
        B, dev = H.shape[0], H.device
        ctxs = self._contexts(histories, B, dev)

        def expand(d: int, rows: list[int], toks: list[int], tails) -> torch.Tensor:
            copy = self._node_copy(ctxs, rows, tails, d) if ctxs is not None else None
            r = torch.tensor(rows, device=dev)
            return self.heads.draft_logits(H[r], next_tokens=torch.tensor(toks, dtype=torch.long, device=dev),
                                           head=d, copy=copy)[0].float()

        tails = [path_tail(histories[b]) for b in range(B)] if ctxs is not None else None
        return best_first_tree(roots, n, expand, budget, self.top, floor, self.heads.vocab_id_list, tails)


def _heads_factory(model, tokenizer, path, options: HeadsOptions):
    from ptp.drafters.checkpoint import load_heads

    ckpt = path or DEFAULT_HEADS
    if not os.path.isfile(os.path.join(ckpt, "adapter.safetensors")):
        raise FileNotFoundError(f"no MTP heads at {ckpt} (train them with `ptp train heads --out DIR`)")
    return HeadsDrafter(load_heads(model, ckpt), options)


register_drafter("heads", _heads_factory, HeadsOptions)
