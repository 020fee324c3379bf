"""Drafters whose drafting rides on the verification call: groups of slot rows after tree nodes.

Each step's target call carries ``[root, d_1..d_n]`` (the tree rows: the target's own
computation, adapter off) and, appended by the decoder (:class:`ptp.decode.draft.AuxRows`),
groups of ``k`` slot rows with the drafter's adapter on. A group hangs after tree node ``h``: it
sees the root and ``d_1..d_h`` and drafts the tokens that follow *if* exactly ``h`` drafts are
accepted. After verification (``observe``) the group of the accepted node, if there is one, gives
the next step's drafts; no separate drafter call is ever made, so a step costs one target call.

Schemes (``scheme``):

* ``quadratic``: a group after every tree node (``(n + 1) * k`` slot rows): whatever is accepted,
  the next draft is ready (PTP's *partial quadratic* decoding, the masked-input paper's
  *quadratic* decoding).
* ``linear``: one group after the last draft node only: a full acceptance gives the next draft,
  a rejection leaves the next step without drafts (it then only drafts).

``max_groups`` (quadratic only) keeps the groups after the first ``max_groups`` nodes (root
included): on hardware where every extra row costs compute (CPUs), the groups after deep nodes,
which are rarely the last accepted one, cost more than they return. A step whose accepted node
has no group drafts nothing next (it then verifies only the root and drafts again).

``lookup_ngram=n`` (n >= 1; 0 = off) combines the slots with prompt lookup: when the row's last
n..``lookup_max_ngram`` tokens occurred earlier (prompt or output), the continuation of the most recent longest
match (if it has >= 2 tokens, or the slots drafted nothing) replaces the slots' draft
(copy-heavy text: summaries, extraction, translation, code edits), and the slot groups hang
after *its* nodes as usual (a tree merges the continuations of the ``lookup_branches`` most
recent longest matches as trie paths). ``lookup_tokens=L`` caps that continuation (default: as
the slots' drafts; in a tree, each merged continuation, default ``k`` tokens); ``lookup_groups=G``
caps the groups of a row that drafted by lookup (0: none; a step
whose rows all drafted by lookup then carries no slot rows and runs without the adapter: on a CPU
the cheap steps of copy-heavy text stay as cheap as plain prompt lookup's, and the next step
drafts by lookup again or, with no match, verifies the root with one group to draft from the
slots).

``min_gain=g`` (0 = off) weighs a row's slot groups against their cost: when the steps that carried
the row's groups commit fewer than ``g`` tokens each (an EMA over at least 4 such steps), the row
drafts without groups (lookup, or the drafts already made) for the next ``rest`` steps, then tries
them again. Meant for hardware where a call's slot rows cost compute: on the 2-core dev CPU, whose
verify call with 4 slot rows costs ~1.5-1.9 one-row calls, ``min_gain=1.5`` (in the PTP CPU
preset) measured +3% tokens/s greedy (three paired runs, 1.66 instead of 1.77 tokens per call)
and +15% at temperature 0.7, where adapters trained at T = 0 draft less well.
Each row's groups are its own: in a batch, rows without groups get padding slot rows while others
carry theirs.

A subclass may draft a *tree* from the accepted group (``group_drafts`` returning ``(tokens,
parents)``, nodes in best-first order): groups then hang after the tree's first nodes (every node,
or the first ``max_groups``), each seeing its anchor's ancestors, and lookup's continuation joins
the tree as a trie path instead of replacing it. A subclass with ``needs_context`` also gets the
row's committed tokens (copy samplers).

The options (:class:`ptp.drafters.options.SlotOptions`, every key in ``docs/drafter-options.md``)
are checked by their dataclass. Subclasses say what a group's input rows are (:meth:`group_embeds`), where their positions start
(:attr:`slot_offset`) and how its final hidden states become draft tokens (:meth:`group_drafts`).
Used by the PTP drafter (u-slots) and the masked-input MTP drafter (mask tokens).
"""
from __future__ import annotations

from typing import Optional

import torch

from ptp.decode.draft import AuxRows, Draft, DraftRequest, Drafter, StepOutcome  # noqa: F401
from ptp.drafters.lookup import LookupDrafter
from ptp.drafters.options import SlotOptions
from ptp.drafters.trees import is_chain, merge_chains, pack_draft

__all__ = ["SlotGroupDrafter"]


class SlotGroupDrafter(Drafter):
    name = "slots"
    wants_hidden = True
    slot_offset = 0  # position of slot j = position(anchor node) + slot_offset + j
    needs_context = False  # group_drafts also gets the row's committed tokens (copy samplers)

    def __init__(self, gate, options: SlotOptions, num_slots: int, depth: int) -> None:
        """``options`` (checked by their dataclass); ``num_slots`` k; ``depth``: the tokens a
        group's chain drafts (PTP: k - 1 after slot 0's, masked: k)."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        o = options
        self.options = o
        self.gate = gate
        self.num_slots = num_slots
        self.scheme = o.scheme
        self.tree, self.max_nodes, self.top, self.min_prob = o.tree, o.max_nodes, o.top, o.min_prob
        self.max_groups = o.max_groups
        self.max_drafts = depth
        if self.tree:  # a tree of max_nodes, plus room for lookup's continuations (depth tokens each by default)
            self.max_drafts = o.max_nodes + ((o.lookup_tokens or depth) * o.lookup_branches if o.lookup_ngram else 0)
        # longest chain a lookup step drafts (default: as the slots' drafts)
        self.lookup_tokens = o.lookup_tokens if o.lookup_tokens is not None else self.max_drafts
        # depth of each lookup continuation merged into a tree (default: as deep as the slots draft)
        self.tree_lookup_depth = o.lookup_tokens if o.lookup_tokens is not None else num_slots
        self.lookup = LookupDrafter.of(o, self.lookup_tokens) if o.lookup_ngram > 0 else None
        # slot groups of a row that drafted by lookup (None: as any row)
        self.lookup_groups = o.lookup_groups
        self.lookup_used = 0  # statistics: steps that drafted by lookup
        self.bare_steps = 0  # statistics: steps without slot rows (lookup_groups=0, min_gain)
        self.groupless_rows = 0  # statistics: row-steps that carried no group (lookup rows, paused rows)
        # pause a row's slot groups for `rest` steps when its slot steps commit < min_gain tokens
        self.min_gain, self.rest = o.min_gain, o.rest
        self._gain: dict[int, list] = {}  # sequence id -> [EMA of tokens per slot step, steps seen, rest left]
        self.rest_steps = 0  # statistics: row-steps whose groups were paused
        # sequence id -> (index of the root the drafts follow, draft tokens, their parents (0 = root))
        self._next: dict[int, tuple[int, list[int], list[int]]] = {}
        self.groups_used = 0  # statistics: groups whose drafts were taken
        self._hist: dict[int, list[int]] = {}  # needs_context: each row's history at propose

    # -- subclass hooks ---------------------------------------------------------------------------
    def group_embeds(self, request: DraftRequest, row: int, first_index: int) -> torch.Tensor:
        """``[k, hidden]`` input rows of a group whose slot 0 relates to token ``first_index``
        (the token right after the anchor node)."""
        raise NotImplementedError

    def group_drafts(self, hidden: torch.Tensor, next_token: int, seq_id: int, next_index: int,
                     outcome: StepOutcome, context: Optional[list[int]] = None):
        """Draft tokens following ``next_token`` (at absolute index ``next_index``) from the
        accepted group's final hidden states ``[k, hidden]``: a chain ``list[int]``, or a tree
        ``(tokens, parents)`` of nodes 1..n (parent 0 = the root, parents before children, in the
        order groups should follow: the first nodes get the quadratic scheme's groups).
        ``context`` (only for a subclass with ``needs_context``): the row's committed tokens,
        ``next_token`` last."""
        raise NotImplementedError

    # -- decoder hooks ----------------------------------------------------------------------------
    def reset(self) -> None:
        self._next.clear()
        self._hist.clear()
        self._gain.clear()

    def _num_groups(self, n: int, looked_up: bool = False) -> int:
        """Slot groups a row with ``n`` draft nodes carries (``looked_up``: its drafts came from
        prompt lookup)."""
        g = 1 if self.scheme != "quadratic" else (n + 1 if self.max_groups is None else min(n + 1, self.max_groups))
        if looked_up and self.lookup_groups is not None and n > 0:
            g = min(g, self.lookup_groups)
        return g

    def aux_room(self, max_nodes: int) -> int:
        longest = max(self.max_drafts, self.lookup_tokens) if self.lookup is not None else self.max_drafts
        return self.num_slots * self._num_groups(min(longest, max_nodes))

    def aux_context(self, mask: torch.Tensor):
        return self.gate.rows(mask)

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        k = self.num_slots
        budget = min(self.max_drafts, request.max_nodes)
        lookup_budget = min(self.lookup_tokens, request.max_nodes)
        # per row: draft nodes 1..n as (tokens, parents), parents before children (0 = the root)
        drafts: list[tuple[list[int], list[int]]] = []
        looked_up = True  # every row's drafts come from lookup (the row budget below)
        row_lookups: list[bool] = []  # the row drafted by lookup
        resting: list[bool] = []  # the row's groups are paused (min_gain)
        for b, seq in enumerate(request.sequence_ids):
            paused = False
            if self.min_gain > 0:
                st = self._gain.setdefault(seq, [self.min_gain, 0, 0])
                if st[2] > 0:
                    st[2] -= 1
                    paused = True
                    self.rest_steps += 1
            resting.append(paused)
            root_index = len(request.histories[b]) - 1
            if self.needs_context:
                self._hist[seq] = list(request.histories[b])
            entry = self._next.pop(seq, None)
            toks, pars = (entry[1], entry[2]) if entry is not None and entry[0] == root_index else ([], [])
            row_lookup = False
            if self.lookup is not None and budget > 0:
                conts = self.lookup.continuations(request.histories[b], max(budget, lookup_budget))
                chain = conts[0][:lookup_budget] if conts else []
                if chain and _is_chain(pars) and len(chain) >= min(len(toks), 2):
                    toks, pars = chain, list(range(len(chain)))
                    self.lookup_used += 1
                    row_lookup = True
                elif conts and not _is_chain(pars):  # a tree: lookup's continuations join it as trie paths
                    t, p = [0] + toks, [-1] + pars
                    if merge_chains(t, p, [c[:self.tree_lookup_depth] for c in conts], budget):
                        self.lookup_used += 1
                    toks, pars = t[1:], p[1:]
            looked_up = looked_up and row_lookup
            row_lookups.append(row_lookup)
            cap = lookup_budget if row_lookup else budget
            drafts.append((toks[:max(cap, 0)], pars[:max(cap, 0)]))

        # fit the row budget: n + 1 tree rows + the groups' slot rows
        def rows_needed(n: int) -> int:
            return n + 1 + k * self._num_groups(n, looked_up)

        if request.max_rows:
            while drafts and max(len(d[0]) for d in drafts) > 0 and \
                    rows_needed(max(len(d[0]) for d in drafts)) > request.max_rows:
                n = max(len(d[0]) for d in drafts) - 1
                drafts = [(t[:n], p[:n]) for t, p in drafts]
            if rows_needed(0) > request.max_rows:
                return None
        # each row's groups: none while paused, lookup_groups on a lookup row
        row_groups = [0 if resting[b] else self._num_groups(len(d[0]), row_lookups[b]) for b, d in enumerate(drafts)]
        G = max(row_groups)
        self.groupless_rows += sum(g == 0 for g in row_groups)
        rows = [([0] + d, [-1] + par) for d, par in drafts]
        if G == 0:  # no row carries a group (lookup rows, paused rows): a call without the adapter
            self.bare_steps += 1
            return pack_draft(rows)
        embeds, anchor, offset, group = [], [], [], []
        for b, (d, par) in enumerate(drafts):
            n = len(d)
            depth = [0]
            for q in par:
                depth.append(depth[q] + 1)
            root_index = len(request.histories[b]) - 1
            # quadratic: groups after the first nodes (best-first order: the likeliest ends first)
            g_b = row_groups[b]
            hyps = list(range(g_b)) if self.scheme == "quadratic" else ([n] if g_b else [])
            rows_e, rows_a, rows_g = [], [], []
            for g_i, h in enumerate(hyps):
                rows_e.append(self.group_embeds(request, b, root_index + depth[h] + 1))
                rows_a += [h] * k
                rows_g += [g_i] * k
            pad = G * k - len(rows_a)
            rows_a += [-1] * pad
            rows_g += [-1] * pad
            embeds.append((rows_e, pad))
            anchor.append(rows_a)
            offset.append([self.slot_offset + j for j in range(k)] * G)
            group.append(rows_g)
        ref = next(r[0] for r, _ in embeds if r)  # a row with a group: the slots' width, dtype, device
        embeds = [torch.cat(r + ([ref.new_zeros(pad, ref.shape[1])] if pad else []), 0) for r, pad in embeds]
        dev = ref.device
        aux = AuxRows(embeds=torch.stack(embeds), anchor=torch.tensor(anchor, device=dev),
                      offset=torch.tensor(offset, device=dev), group=torch.tensor(group, device=dev))
        return pack_draft(rows, aux=aux)

    def _update_gain(self, seq: int, committed: int) -> None:
        """A step that carried the row's slot groups committed ``committed`` tokens: after 4 such
        steps, an EMA under ``min_gain`` pauses the row's groups for ``rest`` steps."""
        st = self._gain.setdefault(seq, [self.min_gain, 0, 0])
        st[0] = 0.7 * st[0] + 0.3 * committed
        st[1] += 1
        if st[1] >= 4 and st[0] < self.min_gain:
            st[:] = [self.min_gain, 0, self.rest]

    def observe(self, outcome: StepOutcome) -> None:
        if outcome.aux is None or outcome.aux_hidden is None:
            return
        k = self.num_slots
        n_acc = outcome.num_accepted.tolist()
        nxt = outcome.next_tokens.tolist()
        cache_lens = outcome.cache_lens.tolist()
        anchors = outcome.aux.anchor.tolist()
        acc_nodes = outcome.accepted_nodes.tolist()
        for b, seq in enumerate(outcome.sequence_ids):
            if self.min_gain > 0 and any(a >= 0 for a in anchors[b]):
                self._update_gain(seq, n_acc[b] + 1)
            path = acc_nodes[b][1:n_acc[b] + 1]  # the accepted draft nodes, root excluded
            last = path[-1] if path else 0
            try:
                start = anchors[b].index(last)
            except ValueError:  # no group for this hypothesis (linear rejected, or past max_groups)
                continue
            next_index = cache_lens[b] + n_acc[b] + 1
            kw = {}
            if self.needs_context:  # history + the accepted drafts + the verified token
                hist = self._hist.pop(seq, None)
                if hist is None or len(hist) != cache_lens[b] + 1:
                    continue  # not proposed by this drafter: draft nothing
                row = outcome.tokens[b].tolist()
                kw["context"] = hist + [row[i] for i in path] + [nxt[b]]
            self.groups_used += 1
            d = self.group_drafts(outcome.aux_hidden[b, start:start + k], nxt[b], seq, next_index, outcome, **kw)
            toks, pars = d if isinstance(d, tuple) else (list(d), list(range(len(d))))
            self._next[seq] = (next_index, toks, pars)


def _is_chain(parents: list[int]) -> bool:
    """Parents ``[0, 1, 2, ...]`` of draft nodes 1..n (root excluded): a chain below the root."""
    return is_chain([-1] + list(parents))
