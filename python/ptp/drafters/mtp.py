"""The masked-input drafter (``mtp``) and the independent MTP heads drafter (``heads``).

Both draft inside the verification call, so a decoding step costs one target call:

* ``mtp`` (:class:`MaskedInputDrafter`): k mask rows per group ride on the verify call
  (``python/ptp/drafters/slots.py``: ``quadratic`` = a group after every draft node, the
  paper's quadratic decoding; ``linear`` = after the last node only). The accepted node's group
  gives k drafts: the sampler head runs sequentially over the masks, starting from the token
  verification just picked. A copy sampler (``MTPConfig.copy_attn``) also reads the row's
  committed tokens (the history at ``propose`` plus the accepted drafts and the verified token).
  ``tree=True`` (greedy): the accepted group drafts a best-first tree instead
  (:func:`best_first_tree`: mask d's sampler run on each depth-d node's own token, ``max_nodes``,
  ``top`` candidates per node, ``min_prob``), and the next call hangs a group after each of its
  first nodes (all, or ``max_groups``); at T > 0 it drafts coupled chains as without ``tree``.
  Greedy drafting reads the LM head's rows of the draft vocabulary only (``draft_vocab``, as the
  heads' below; the checkpoint's ``token_counts`` pick it).
* ``heads`` (:class:`HeadsDrafter`): the heads read the final hidden state of the last accepted
  node (``observe``); head i proposes the token i places after the verified next token. Greedy:
  a chain of each head's argmax, or a tree of the best candidates by the product of the heads'
  probabilities (``tree=True``, ``max_nodes``). Chain-input heads (``HeadsConfig.chain_input``:
  head i reads the token drafted at depth i) draft one depth at a time: the chain feeds each
  argmax to the next head, and the tree expands each candidate node with the next head run on
  that node's own token (:meth:`HeadsDrafter.greedy_trees`). Copy heads (``HeadsConfig.copy_attn``)
  also attend over the row's committed tokens: each node's head reads the earlier occurrences of
  its token (and of the two path tokens before it) in ``request.histories``. Sampling: ``verify="coupled"`` (default) drafts
  ``Pick(U(seed, seq, index), q_i)`` with the decoder's uniform stream (token-identical to plain
  sampling); ``verify="rejection"`` samples the drafts from q_i with an independent stream and
  passes q to rejection sampling (the target's distribution, not the same tokens).
  ``lookup=n`` (n >= 1; 0 = off) adds prompt lookup's continuation (the most recent earlier
  occurrence of the row's last n..3 tokens, up to ``lookup_depth`` tokens) as one more branch of
  the draft tree, merged into it as a trie: the heads draft what the model writes, lookup what it
  copies (RAG, summaries, translation, code edits). Greedy and coupled verification (a tree of
  any shape is verified exactly); not with ``verify="rejection"``. Row savers (the drafts change,
  never the output): ``min_prob=P`` stops a chain, or the best-first tree, where the heads'
  path probability falls below P; ``draft_vocab=K`` drafts over the K tokens most frequent in
  the heads' training answers (default: 8,192 when the checkpoint stores their counts, else the
  full vocabulary; 0 = full), so the heads' LM-head pass reads K rows of the LM head, not V.

Temperature 0 verification is greedy for both: the output is plain greedy decoding's.
"""
from __future__ import annotations

import heapq
import math
import os
from typing import Optional

import torch

from ptp.mtp_model import MTPHeads, MTPModel, node_copy_inputs, path_tail
from ptp.ptp_model import vector_pick
from ptp.sampling import SamplingConfig, uniforms
from ptp_ext.reference import sampling_probs

from .base import Draft, DraftRequest, StepOutcome, register_drafter
from .lookup import merge_chain
from .slots import SlotGroupDrafter, tree_options, tree_room

__all__ = ["MaskedInputDrafter", "HeadsDrafter", "DEFAULT_MTP", "DEFAULT_HEADS", "sampler_tree", "best_first_tree"]

WEIGHTS = os.path.join(os.path.dirname(__file__), "weights")
DEFAULT_MTP = os.path.join(WEIGHTS, "mtp-smollm2-135m-instruct")
DEFAULT_HEADS = os.path.join(WEIGHTS, "heads-smollm2-135m-instruct")
_DRAFT_SALT = 7919  # the drafts' own stream under rejection verification (never salt 0..N)


def _pick(sampling: SamplingConfig, seq_id: int, index: int, logits: torch.Tensor, salt: int = 0) -> int:
    if sampling.greedy:
        return int(logits.argmax())
    u = uniforms(sampling.seed, torch.tensor(seq_id), torch.tensor(index), salt=salt)
    return int(vector_pick(u, sampling_probs(logits.float(), sampling.temperature, sampling.top_k,
                                             sampling.top_p)))


class MaskedInputDrafter(SlotGroupDrafter):
    name = "mtp"
    slot_offset = 1  # mask j sits one position after its anchor's next token

    def __init__(self, model: MTPModel, num_masks: Optional[int] = None, scheme: str = "quadratic",
                 max_groups: Optional[int] = None, lookup_ngram: int = 0, tree: bool = False,
                 max_nodes: int = 16, top: int = 4, min_prob: float = 0.0, draft_vocab: Optional[int] = None,
                 lookup_groups: Optional[int] = None,
                 lookup_tokens: Optional[int] = None, min_gain: float = 0.0, rest: int = 16,
                 lookup_branches: int = 1):
        k = int(num_masks or model.config.num_masks)
        if not 1 <= k <= model.config.num_masks:
            raise ValueError(f"num_masks must be in [1, {model.config.num_masks}], got {k}")
        self.tree, self.max_nodes, self.top, self.min_prob = tree_options(tree, scheme, max_nodes, top, min_prob)
        # a tree of max_nodes, plus room for lookup's continuations (k tokens each by default)
        room = tree_room(self.max_nodes, lookup_ngram, lookup_branches, lookup_tokens, k)
        super().__init__(model.gate, k, scheme, max_drafts=room if self.tree else k,
                         max_groups=max_groups, lookup_ngram=lookup_ngram, lookup_groups=lookup_groups,
                         lookup_tokens=lookup_tokens, min_gain=min_gain, rest=rest,
                         lookup_branches=lookup_branches)
        self.model = model.eval()
        # greedy drafts over the drafter's most frequent answer tokens (None: 8,192 if it has counts)
        model.auto_draft_vocab(draft_vocab)
        self.needs_context = bool(model.config.copy_attn)  # a copy sampler reads the committed tokens
        self._sampling = SamplingConfig()

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        self._sampling = request.sampling
        return super().propose(request)

    def group_embeds(self, request: DraftRequest, row: int, first_index: int) -> torch.Tensor:
        return self.model.masks[: self.num_slots].detach()

    @torch.no_grad()
    def group_drafts(self, hidden: torch.Tensor, next_token: int, seq_id: int, next_index: int,
                     outcome: StepOutcome, context: Optional[list[int]] = None):
        s = self._sampling
        if self.tree and s.greedy:
            return self.draft_tree(hidden, next_token, context)
        # mask j drafts the token at next_index + 1 + j (coupled: with that index's uniform)
        pick = None if s.greedy else (lambda j, lg: _pick(s, seq_id, next_index + 1 + j, lg))
        return self.model.draft_chain(hidden, next_token, pick, context=context)

    @torch.no_grad()
    def draft_tree(self, z: torch.Tensor, first_prev: int, context: Optional[list[int]] = None
                   ) -> tuple[list[int], list[int]]:
        """Greedy draft tree (nodes 1..n as tokens, parents) of one mask block ``z [k, d]``
        (:func:`sampler_tree`)."""
        return sampler_tree(self.model, z, first_prev, context, self.max_nodes, self.top, self.min_prob)


@torch.no_grad()
def sampler_tree(model, z: torch.Tensor, first_prev: int, context: Optional[list[int]], max_nodes: int,
                 top: int, min_prob: float = 0.0, first_slot: int = 0) -> tuple[list[int], list[int]]:
    """Greedy draft tree (nodes 1..n as tokens, parents; 0 = the root ``first_prev``) of one slot
    block ``z [k, d]`` of a :class:`ptp.sampler_head.SlotSampler` model: :func:`best_first_tree`
    with slot ``first_slot + d``'s sampler head expanding depth d on each node's own token (a copy
    sampler also on the node's path over ``context``, which ends with ``first_prev``), at most
    ``max_nodes`` nodes, ``top`` candidates per node, none below path probability ``min_prob``,
    over the model's draft vocabulary (if set). Without a sampler head a depth's candidates do not
    depend on the node (each slot's own top)."""
    m = model
    dev = z.device
    ctx = m.copy_context(context, first_prev, dev)

    def expand(d: int, rows: list[int], toks: list[int], tails) -> torch.Tensor:
        F_ = len(toks)
        j = first_slot + d
        zz = z[j:j + 1].expand(F_, -1).contiguous()
        if m.sampler is None:
            return m.vocab_logits(zz)[0].float()
        prev = torch.tensor(toks, dtype=torch.long, device=dev)
        copy = None
        if ctx is not None:
            L = ctx.shape[1]
            copy = node_copy_inputs(ctx.expand(F_, L), torch.full((F_,), L, device=dev), tails, L - 1 + d,
                                    m.config.copy_matches)
        return m.vocab_logits(m.sampler_hidden(zz, prev, j, copy=copy, fused=True))[0].float()

    tails = [path_tail(context)] if ctx is not None else None
    floor = math.log(min_prob) if min_prob > 0.0 else -math.inf
    tokens, parents = best_first_tree([int(first_prev)], z.shape[0] - first_slot, expand, max_nodes, top,
                                      floor, m.vocab_id_list, tails)[0]
    return tokens[1:], parents[1:]


class HeadsDrafter:
    name = "heads"
    wants_hidden = True

    def __init__(self, heads: MTPHeads, tree: bool = False, max_nodes: int = 16, top: int = 8,
                 verify: str = "coupled", lookup: int = 0, lookup_depth: int = 8,
                 min_prob: float = 0.0, draft_vocab: Optional[int] = None) -> None:
        if verify not in ("coupled", "rejection"):
            raise ValueError(f"verify must be 'coupled' or 'rejection', got {verify!r}")
        if int(lookup) < 0 or int(lookup_depth) < 1:
            raise ValueError(f"need lookup >= 0 and lookup_depth >= 1, got {lookup}, {lookup_depth}")
        if int(lookup) > 0 and verify == "rejection":
            raise ValueError("lookup branches need coupled verification (verify='coupled'): rejection "
                             "sampling here verifies one chain drafted from the heads' q")
        if not 0.0 <= float(min_prob) < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), got {min_prob}")
        if int(top) < 1 or int(max_nodes) < 1:
            raise ValueError(f"need top >= 1 and max_nodes >= 1, got top={top}, max_nodes={max_nodes}")
        self.min_prob = float(min_prob)
        self.lookup = None
        if int(lookup) > 0:
            from .lookup import LookupDrafter

            self.lookup = LookupDrafter(max_draft_tokens=int(lookup_depth), max_ngram=max(3, int(lookup)),
                                        min_ngram=int(lookup))
        self.lookup_used = 0  # statistics: rows whose draft got a lookup branch
        self.heads = heads.eval()
        self.vocab_size = heads.base.get_input_embeddings().weight.shape[0]
        heads.auto_draft_vocab(draft_vocab)  # None: the 8,192 most frequent answer tokens, if known
        self.tree = bool(tree)
        self.max_nodes = int(max_nodes)
        self.top = int(top)
        self.verify = verify
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
        if self.lookup is not None:
            for b, (t, p) in enumerate(rows):
                room = request.max_nodes - (len(t) - 1)
                if room <= 0:
                    continue
                conts = self.lookup.continuations(request.histories[b], min(self.lookup.max_draft_tokens, room))
                if conts and merge_chain(t, p, conts[0], room):
                    self.lookup_used += 1
        width = max(len(t) for t, _ in rows)
        B = len(rows)
        tokens = torch.zeros(B, width, dtype=torch.long)
        parents = torch.full((B, width), -1, dtype=torch.long)
        is_chain = True
        for b, (t, p) in enumerate(rows):
            tokens[b, :len(t)] = torch.tensor(t)
            parents[b, :len(p)] = torch.tensor(p)
            is_chain = is_chain and p == list(range(-1, len(p) - 1))
        if width == 1:
            return None
        draft_probs = None
        if not s.greedy and self.verify == "rejection":
            V = self.vocab_size
            draft_probs = torch.zeros(B, width, V, dtype=torch.float32, device=dev)
            for b, q in enumerate(probs_rows):
                if q is None:
                    # rows without a draft: one-hot on the padding token never gets tested
                    draft_probs[b, :, 0] = 1.0
                else:
                    draft_probs[b, 1:1 + q.shape[0]] = q
                    draft_probs[b, 0, 0] = 1.0
                    draft_probs[b, 1 + q.shape[0]:, 0] = 1.0
        return Draft(tokens=tokens, parents=parents, is_chain=is_chain, draft_probs=draft_probs)

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
        (:meth:`_tree`) for independent heads; for chain-input heads :meth:`_chain_tree` (copy
        heads also read ``histories``, each row's committed tokens ending with its root)."""
        if self.heads.config.chain_input:
            return self._chain_tree(H, roots, budget, histories)
        logits = self._independent_logits(H, roots)
        return [self._tree(logits[b], budget, self.heads.vocab_id_list) for b in range(H.shape[0])]

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

    def _tree(self, logits: torch.Tensor, budget: int, ids: Optional[list[int]] = None
              ) -> tuple[list[int], list[int]]:
        """Best-first tree: a node at depth d (head d) scores the product of its path's probs, and
        each head offers its ``top`` most likely tokens. A child never scores above its parent, so
        the ``budget`` nodes taken are the ``budget`` best paths of the candidate grid."""
        n = logits.shape[0]
        top = min(self.top, logits.shape[-1])
        logp = torch.log_softmax(logits, -1)
        top_lp, top_id = logp.topk(top, dim=-1)
        top_lp, top_id = top_lp.tolist(), top_id.tolist()
        if ids is not None:
            top_id = [[ids[c] for c in row] for row in top_id]
        tokens, parents = [0], [-1]
        heap = [(-top_lp[0][c], 0, c, 0) for c in range(top)]  # (-score, depth, cand, parent)
        heapq.heapify(heap)
        floor = math.log(self.min_prob) if self.min_prob > 0.0 else -math.inf
        while heap and len(tokens) - 1 < budget:
            neg, d, c, par = heapq.heappop(heap)
            if -neg < floor:  # best-first: every node left scores lower still
                break
            node = len(tokens)
            tokens.append(top_id[d][c])
            parents.append(par)
            if d + 1 < n:
                for c2 in range(top):
                    heapq.heappush(heap, (neg - top_lp[d + 1][c2], d + 1, c2, node))
        return tokens, parents


def best_first_tree(roots: list[int], depths: int, expand, budget: int, top: int, floor: float = -math.inf,
                    ids: Optional[list[int]] = None, root_tails: Optional[list] = None
                    ) -> list[tuple[list[int], list[int]]]:
    """Best-first draft trees (tokens, parents; node 0 the root) of at most ``budget`` nodes below
    each row's root, drafted one depth at a time for all rows at once by a chained predictor:
    ``expand(d, rows, tokens, tails) -> logits [F, V or K]`` gives depth d's distribution after each
    front node (its row, its token, the last three tokens of its path ``(y2, y1, y)`` when
    ``root_tails`` gives the roots' ones; ``ids`` maps a restricted vocabulary's index to the token).
    A node at depth d + 1 is one of the ``top`` tokens after its parent and scores its path's
    log-probability (the product of exact conditionals, each given the path). A node is expanded
    only while it can still be among the ``budget`` best (a child never scores above its parent
    and the cut-off only rises as candidates are added), so a depth costs at most ``budget`` rows
    per row, usually far fewer. The ``budget`` best candidates (parents before children; none below
    ``floor``) make the tree, in best-first order. Used by chain-input heads (head d) and the
    masked-input drafter's trees (mask d's sampler)."""
    B = len(roots)
    # per row: candidates (score, depth, token id, parent candidate or -1 for the root)
    cands: list[list[tuple[float, int, int, int]]] = [[] for _ in range(B)]
    front = [(b, -1, int(roots[b]), 0.0) for b in range(B)]  # (row, candidate, token read, score)
    # the last three tokens of each candidate's path (its own token last)
    tail: dict[tuple[int, int], tuple[int, int, int]] = {}
    if root_tails is not None:
        for b in range(B):
            tail[(b, -1)] = tuple(root_tails[b])
    for d in range(depths):
        if not front:
            break
        logits = expand(d, [f[0] for f in front], [f[2] for f in front],
                        [tail[(f[0], f[1])] for f in front] if root_tails is not None else None)
        k = min(top, logits.shape[-1])
        tlp, tid = torch.log_softmax(logits, -1).topk(k, dim=-1)
        tlp, tid = tlp.tolist(), tid.tolist()
        for f, (b, par, _, sc) in enumerate(front):
            for c in range(k):
                t = tid[f][c]
                t = ids[t] if ids is not None else t
                if root_tails is not None:
                    y2, y1, y = tail[(b, par)]
                    tail[(b, len(cands[b]))] = (y1, y, t)
                cands[b].append((sc + tlp[f][c], d, t, par))
        if d + 1 == depths:
            break
        front = []
        for b in range(B):
            scores = sorted((c[0] for c in cands[b]), reverse=True)
            cut = max(scores[budget - 1] if len(scores) >= budget else -math.inf, floor)
            deep = sorted((i for i, c in enumerate(cands[b]) if c[1] == d and c[0] >= cut),
                          key=lambda i: -cands[b][i][0])[:budget]
            front += [(b, i, cands[b][i][2], cands[b][i][0]) for i in deep]
    out = []
    for b in range(B):
        cs = cands[b]
        order = sorted(range(len(cs)), key=lambda i: (-cs[i][0], cs[i][1], i))
        tokens, parents, node_of = [0], [-1], {-1: 0}
        for i in order:
            if len(tokens) - 1 >= budget or cs[i][0] < floor:
                break
            par = node_of.get(cs[i][3])
            if par is None:  # parent not taken (cannot happen: it scores at least as high)
                continue
            node_of[i] = len(tokens)
            tokens.append(cs[i][2])
            parents.append(par)
        out.append((tokens, parents))
    return out


def _mtp_factory(model, tokenizer, path, num_masks=None, scheme: str = "quadratic", **kw):
    from ptp.train.checkpoint import load_mtp

    ckpt = path or DEFAULT_MTP
    if not os.path.isfile(os.path.join(ckpt, "adapter.safetensors")):
        raise FileNotFoundError(f"no masked-input drafter at {ckpt} (train one with `ptp train mtp --out DIR`)")
    return MaskedInputDrafter(load_mtp(model, ckpt), num_masks=int(num_masks) if num_masks else None,
                              scheme=scheme, **kw)


def _heads_factory(model, tokenizer, path, tree=False, max_nodes=16, top=8, verify="coupled", lookup=0,
                   lookup_depth=8, min_prob=0.0, draft_vocab=None, **kw):
    from ptp.train.checkpoint import load_heads

    ckpt = path or DEFAULT_HEADS
    if not os.path.isfile(os.path.join(ckpt, "adapter.safetensors")):
        raise FileNotFoundError(f"no MTP heads at {ckpt} (train them with `ptp train heads --out DIR`)")
    if isinstance(tree, str):
        tree = tree.lower() in ("1", "true", "yes", "tree")
    return HeadsDrafter(load_heads(model, ckpt), tree=tree, max_nodes=int(max_nodes), top=int(top),
                        verify=verify, lookup=int(lookup), lookup_depth=int(lookup_depth),
                        min_prob=float(min_prob),
                        draft_vocab=draft_vocab, **kw)


register_drafter("mtp", _mtp_factory)
register_drafter("heads", _heads_factory)
