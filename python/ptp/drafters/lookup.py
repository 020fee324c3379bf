"""Prompt-lookup / n-gram drafter (model-free): drafts what followed earlier occurrences of the
row's last n tokens (n from ``lookup_max_ngram`` down to ``lookup_ngram``), as in HF's
``prompt_lookup_num_tokens`` and Saxena's prompt lookup decoding.

``lookup_branches == 1`` gives a chain: the continuation of the most recent longest match.
``lookup_branches > 1`` merges the continuations of several matches (most recent and longest
first) into a trie (:func:`ptp.drafters.trees.trie`), so alternatives after a divergence point
become siblings: a small tree. The other drafters draft by lookup through :meth:`continuations`.

Cost-aware draft length (the default on a CPU): every row of a target call costs compute there
(SmolLM2-135M on 2 cores: a 2-row step ~1.26x a 1-row step, 4 rows ~1.78x, 9 rows ~4.4x,
:data:`CPU_CALL_COSTS`), so a draft that is rarely accepted slows decoding down. The drafter learns
how often lookup's j-th token is accepted once the tokens before it were, per match class (how
long the match is once traced back, and whether the matched n-gram's earlier occurrences agree on
the next token) and depth, and drafts the length L (0 = no draft: a plain step) that maximises the
expected tokens per call cost, ``(1 + a_1 + a_1 a_2 + ...) / cost(1 + L rows)``. Every lookup is
scored against the tokens the target commits after it, drafted or not, so a class whose drafts
stopped paying keeps being measured. ``row_cost=c`` prices a call linearly (``1 + c L``) instead,
``row_cost=0`` drafts fixed ``lookup_tokens`` chains. ``measured_costs=true`` prices the rows by
this machine's own step times instead of the table (:class:`MeasuredCosts`). It only changes which
rows ride on a call, never the output.

MTP heads beside lookup (``heads=default`` or a heads checkpoint; what ``auto`` drafts with on a
CPU): where lookup drafts nothing (no match, or a match class that does not pay), the shipped
chain-input copy heads draft a greedy chain from the target's final hidden state of the last
accepted node (:class:`ptp.drafters.heads_chain.HeadChain`: up to ``heads_tokens`` tokens, cut
where the heads' path probability falls below ``heads_min_prob``). The decoder then asks for the
hidden states of every call (``wants_hidden``), which its one-op calls return at no extra cost
(``ops.decode_logits_hidden_packed``).
"""
from __future__ import annotations

import os
import statistics
import time
from collections import deque
from typing import Optional, Sequence

import numpy as np
import torch

from ptp.decode.draft import Draft, DraftRequest, Drafter, StepOutcome
from ptp.drafters.base import register_drafter
from ptp.drafters.heads_chain import HeadChain
from ptp.drafters.options import LookupDrafterOptions
from ptp.drafters.trees import pack_draft, trie

__all__ = ["LookupDrafter", "AcceptanceModel", "MeasuredCosts", "NgramIndex", "continuations", "matches",
           "CPU_CALL_COSTS", "PRIOR_RATES", "load_lookup_heads"]



def continuations(history: list[int], depth: int, min_ngram: int, max_ngram: int, num: int) -> list[list[int]]:
    """Up to ``num`` distinct continuations (at most ``depth`` tokens each) of the earlier
    occurrences of ``history``'s last n tokens, n from ``max_ngram`` down to ``min_ngram``, most
    recent first within each n; a continuation that is a prefix of one found before is skipped."""
    return matches(history, depth, min_ngram, max_ngram, num)[0]


def matches(history: list[int], depth: int, min_ngram: int, max_ngram: int, num: int
            ) -> tuple[list[list[int]], int]:
    """:func:`continuations` and the n-gram length of the first one (0: none found)."""
    h = np.asarray(history, dtype=np.int64)

    def starts(n: int):
        # windows starting at i with i + n < len(h): at least one token follows them
        windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
        return np.flatnonzero((windows == h[-n:]).all(axis=1)).tolist()
    return _pick(h.tolist(), starts, depth, min_ngram, max_ngram, num)


def _pick(history: list[int], starts, depth: int, min_ngram: int, max_ngram: int, num: int
          ) -> tuple[list[list[int]], int]:
    """The continuations of :func:`matches`, given ``starts(n)``: the start positions (ascending)
    of the earlier occurrences of the last n tokens that at least one token follows."""
    found, first_n, _ = _pick_at(history, starts, depth, min_ngram, max_ngram, num)
    return found, first_n


def _pick_at(history: list[int], starts, depth: int, min_ngram: int, max_ngram: int, num: int
             ) -> tuple[list[list[int]], int, int]:
    """:func:`_pick` and the start of the first continuation's match (-1: none)."""
    found: list[list[int]] = []
    first_n, first_i = 0, -1
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        for i in reversed(starts(n)):  # most recent first
            cont = history[i + n: i + n + depth]
            if cont and cont not in found and not any(f[:len(cont)] == cont for f in found):
                found.append(cont)
                if not first_n:
                    first_n, first_i = n, i
                if len(found) == num:
                    return found, first_n, first_i
    return found, first_n, first_i


# How far a match is traced back (its length is a feature of the acceptance model), and how many
# of the matched n-gram's occurrences are checked for agreeing on the next token.
MAX_MATCH_LENGTH = 32
AGREEMENT_WINDOW = 16


def match_features(history: list[int], n: int, i: int, starts) -> tuple[int, bool]:
    """What predicts that a lookup continuation will be accepted: the length of the match that
    ends at ``history``'s end and at ``i + n`` (its n-gram extended backwards, up to
    :data:`MAX_MATCH_LENGTH`), and whether the n-gram's recent occurrences (``starts(n)``, up to
    :data:`AGREEMENT_WINDOW` of them) are all followed by the same token."""
    L, length = len(history), n
    while length < MAX_MATCH_LENGTH and i - (length - n) - 1 >= 0 and \
            history[i - (length - n) - 1] == history[L - length - 1]:
        length += 1
    nxt = history[i + n]
    occ = starts(n)
    agree = all(history[s + n] == nxt for s in occ[-AGREEMENT_WINDOW:])
    return length, agree


class NgramIndex:
    """An append-only history's n-grams (n in ``min_n..max_n``) -> their start positions, kept
    up to date as the history grows, so that a lookup per step costs O(matches) instead of a scan
    of the whole history. :meth:`matches` returns exactly :func:`matches`'s result."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.starts: dict[tuple, list[int]] = {}
        self.done = 0  # n-grams followed by a token are indexed for start positions < done
        self.tokens: list[int] = []

    def extend(self, history: list[int]) -> None:
        """Index the n-grams of ``history`` (which extends the one seen before) that are followed
        by at least one token."""
        L = len(history)
        for i in range(self.done, L - 1):
            for n in range(self.min_n, self.max_n + 1):
                if i - n + 1 < 0:
                    break
                self.starts.setdefault(tuple(history[i - n + 1:i + 1]), []).append(i - n + 1)
        self.done = max(self.done, L - 1)
        self.tokens = history

    def continues(self, history: list[int]) -> bool:
        """Whether ``history`` extends the history indexed so far (else index a new one)."""
        return self.done <= len(history) and not (
            self.done and self.tokens[self.done - 1] != history[self.done - 1])

    def _starts(self, n: int):
        return self.starts.get(tuple(self.tokens[-n:]), ())

    def matches(self, depth: int, num: int) -> tuple[list[list[int]], int]:
        return _pick(self.tokens, self._starts, depth, self.min_n, self.max_n, num)

    def matches_with_features(self, depth: int, num: int) -> tuple[list[list[int]], int, int, bool]:
        """:meth:`matches` and the first continuation's :func:`match_features` (0, False: none)."""
        found, n, i = _pick_at(self.tokens, self._starts, depth, self.min_n, self.max_n, num)
        if not found:
            return found, 0, 0, False
        return (found, n) + match_features(self.tokens, n, i, self._starts)


def accepted_prefix(cont: list[int], committed: list[int]) -> Optional[int]:
    """How many of a lookup continuation's tokens the target accepted, given the tokens it
    committed after the lookup; None while undecided (every committed token agreed, but fewer
    than ``len(cont)`` are known yet)."""
    a, n = 0, min(len(cont), len(committed))
    while a < n and committed[a] == cont[a]:
        a += 1
    return a if a < n or n == len(cont) else None


# A decoding step of 1, 2, 3, ... rows against a 1-row step, in the decoding loop (draft, call,
# verify, commit): SmolLM2-135M-Instruct (Q4_1 GGUF), 2 threads of a 2-core Zen 4 CPU, the mean of
# prompts under and over 300 tokens (benchmarks/bench_step_costs.py,
# benchmarks/results/2026-12-07-cpu-step-costs.md; the calls alone at a 256-token context, in
# 2026-12-07-cpu-decode-step.md: 1.23 / 1.41 / 1.74 / 2.21 / 2.38 / 2.71 / 3.07 / 4.6). Extra rows
# cost their multiply-adds on a CPU, in steps where the kernels' register tiles change (5 and 9
# rows); beyond the table a row costs the table's mean row.
CPU_CALL_COSTS = (1.0, 1.26, 1.51, 1.78, 2.20, 2.56, 2.85, 3.15, 4.44)


# The acceptance model's prior: per match class (length bucket, agreement) the rate at depths
# 1-4 (deeper: depth 4's), replayed from SmolLM2-135M-Instruct's greedy answers to 96 prompts of
# the training set (ptp.train.prompts, disjoint from Spec-Bench; benchmarks/fit_lookup_prior.py).
# Weighted as 2 lookups, it sets where a new drafter starts (short matches whose occurrences
# disagree are rarely right: no draft; long agreeing ones: deep drafts) until its own counts lead.
PRIOR_RATES = {
    (0, False): (0.13, 0.50, 0.58, 0.66), (0, True): (0.26, 0.55, 0.62, 0.66),
    (1, False): (0.27, 0.58, 0.59, 0.46), (1, True): (0.58, 0.63, 0.73, 0.71),
    (2, False): (0.24, 0.82, 0.74, 0.70), (2, True): (0.68, 0.70, 0.71, 0.79),
    (3, False): (0.42, 0.80, 0.77, 0.78), (3, True): (0.77, 0.70, 0.80, 0.86),
    (4, False): (0.58, 0.88, 0.89, 0.87), (4, True): (0.84, 0.85, 0.89, 0.88),
    (5, False): (0.58, 0.89, 0.81, 0.69), (5, True): (0.91, 0.89, 0.89, 0.88),
    (6, False): (0.80, 1.00, 0.92, 0.89), (6, True): (0.96, 0.93, 0.95, 0.97),
}


def _length_bucket(length: int) -> int:
    """Match lengths 1, 2, 3, 4-5, 6-8, 9-16, 17+ -> 0..6."""
    for b, top in enumerate((1, 2, 3, 5, 8, 16)):
        if length <= top:
            return b
    return 6


class AcceptanceModel:
    """How often lookup's j-th drafted token is accepted once the tokens before it were, per
    match class (the match's length, :func:`_length_bucket`, and whether the n-gram's occurrences
    agree on the next token) and depth j, with ``prior`` pseudo-counts at the class's
    :data:`PRIOR_RATES` (or at ``prior_rate`` for every class); and the draft length that
    maximises the expected committed tokens per unit of call cost.

    The call cost of 1 + L rows is ``costs[L]`` (a table, :data:`CPU_CALL_COSTS`) or, given a
    ``row_cost``, ``1 + row_cost * L``. Every lookup is scored, drafted or not, from the tokens the
    target commits after it (:meth:`record`: the continuation against the committed tokens): the
    rates keep learning where drafting has stopped paying, and a class that starts paying again is
    drafted again."""

    def __init__(self, row_cost: Optional[float] = None, costs: Optional[Sequence[float]] = None,
                 prior_rate: Optional[float] = None, prior: float = 2.0) -> None:
        if (row_cost is None) == (costs is None):
            raise ValueError("AcceptanceModel: give either row_cost or costs")
        if costs is not None and (len(costs) < 2 or costs[0] != 1.0 or list(costs) != sorted(costs)):
            raise ValueError(f"costs must start at 1.0 (a 1-row call) and not decrease, got {list(costs)}")
        self.row_cost = row_cost
        self.costs = tuple(costs) if costs is not None else None
        self.prior_rate, self.prior = prior_rate, prior
        self.reached: dict[tuple, float] = {}
        self.accepted: dict[tuple, float] = {}

    @staticmethod
    def key(length: int, agree: bool) -> tuple[int, bool]:
        """The match class of a lookup whose match is ``length`` tokens long."""
        return _length_bucket(length), bool(agree)

    def cost(self, L: int) -> float:
        """A call of 1 + L rows against a 1-row call."""
        if self.costs is None:
            return 1.0 + self.row_cost * L
        c = self.costs
        if L < len(c):
            return c[L]
        return c[-1] + (L + 1 - len(c)) * (c[-1] - 1.0) / (len(c) - 1)

    def prior_of(self, key: tuple, depth: int) -> float:
        """The prior rate of depth ``depth`` in match class ``key``."""
        if self.prior_rate is not None:
            return self.prior_rate
        rates = PRIOR_RATES.get(key)
        return 0.5 if rates is None else rates[min(depth, len(rates)) - 1]

    def rate(self, key: tuple, depth: int) -> float:
        k = (key, depth)
        return ((self.accepted.get(k, 0.0) + self.prior * self.prior_of(key, depth))
                / (self.reached.get(k, 0.0) + self.prior))

    def record(self, key: tuple, drafted: int, accepted: int) -> None:
        """A continuation of ``drafted`` tokens (drafted or only looked up) of match class ``key``
        whose first ``accepted`` tokens the target then committed."""
        accepted = min(accepted, drafted)
        for j in range(1, min(accepted + 1, drafted) + 1):
            k = (key, j)
            self.reached[k] = self.reached.get(k, 0.0) + 1.0
            self.accepted[k] = self.accepted.get(k, 0.0) + (j <= accepted)

    def length(self, key: tuple, longest: int) -> int:
        """The best draft length in ``0..longest`` for a lookup of match class ``key``."""
        best, best_value, expected, p = 0, 1.0, 1.0, 1.0
        for L in range(1, longest + 1):
            p *= self.rate(key, L)
            expected += p
            value = expected / self.cost(L)
            if value > best_value:
                best, best_value = L, value
        return best


class MeasuredCosts:
    """A call cost table (:data:`CPU_CALL_COSTS`'s form: 1 + L rows against a 1-row step) from
    this machine's own steps: the seconds from the end of one draft to the start of the next (the
    target call, verification and commit of a 1 + L-row step), the last ``window`` of them per L.

    The table keeps the ``prior``'s shape and scales what its rows add:
    ``cost(L) = 1 + r * (prior[L] - 1)``, where each timed L (``min_samples`` or more, and as many
    1-row steps) measures ``r_L = (median(L) / median(0) - 1) / (prior[L] - 1)`` and ``r`` is
    their mean weighted by sample counts, with ``weight`` pseudo-samples at r = 1 (the prior).
    So the L drafted so far also price the L never drafted (a machine whose rows are cheap
    learns it from 1-row drafts and then drafts deeper), medians keep a shared machine's slow
    spells out, and the costs never decrease with L."""

    def __init__(self, prior: Sequence[float], window: int = 64, weight: float = 8.0,
                 min_samples: int = 4) -> None:
        self.prior = tuple(float(c) for c in prior)
        self.window, self.weight, self.min_samples = window, weight, min_samples
        self.samples: dict[int, deque] = {}

    def record(self, L: int, seconds: float) -> None:
        """A step with L draft rows (1 + L rows in the call) took ``seconds``."""
        if seconds > 0 and 0 <= L < len(self.prior):
            self.samples.setdefault(L, deque(maxlen=self.window)).append(float(seconds))

    def scale(self) -> float:
        """``r``: the measured extra cost of rows against the prior's (1: as the prior)."""
        base = self.samples.get(0)
        if base is None or len(base) < self.min_samples:
            return 1.0
        t0 = statistics.median(base)
        total, count = self.weight, self.weight
        for L in range(1, len(self.prior)):
            s = self.samples.get(L)
            if s is None or len(s) < self.min_samples or self.prior[L] <= 1.0:
                continue
            n = min(len(s), len(base))
            total += n * max(0.0, statistics.median(s) / t0 - 1.0) / (self.prior[L] - 1.0)
            count += n
        return total / count

    def costs(self) -> tuple[float, ...]:
        r = self.scale()
        if r == 1.0:
            return self.prior
        return tuple(1.0 + r * (c - 1.0) for c in self.prior)


class LookupDrafter(Drafter):
    name = "lookup"

    def __init__(self, options: Optional[LookupDrafterOptions] = None, device=None, heads=None, **kw) -> None:
        """``device``: the target's (``row_cost`` unset: the call costs of :data:`CPU_CALL_COSTS`
        on the CPU or when unknown, else 0: fixed ``lookup_tokens`` chains). ``heads``: a
        :class:`ptp.drafters.heads_chain.HeadChain` that drafts where lookup drafts nothing (the
        ``heads`` option; the factory builds it from the model)."""
        self.options = o = LookupDrafterOptions.build(options, **kw)
        self.heads = heads
        self.wants_hidden = heads is not None
        self.heads_drafts = 0  # statistics: rows drafted by the heads
        self._hidden: dict[int, tuple[int, torch.Tensor]] = {}  # sequence id -> (root index, h)
        self._unigram_index: dict[int, NgramIndex] = {}  # sequence id -> its 1-grams (heads, when lookup has none)
        self.lookup_tokens = o.lookup_tokens  # depth of each continuation
        self.lookup_ngram, self.lookup_max_ngram = o.lookup_ngram, o.lookup_max_ngram
        self.lookup_branches = o.lookup_branches
        self.max_nodes = o.max_nodes if o.lookup_branches > 1 else o.lookup_tokens
        on_cpu = device is None or torch.device(device).type == "cpu"
        self.call_costs = CPU_CALL_COSTS if o.row_cost is None and on_cpu else None
        # row_cost: what one more row adds to a call (a 2-row call's extra cost with the table)
        self.row_cost = (self.call_costs[1] - 1.0 if self.call_costs is not None
                         else o.row_cost if o.row_cost is not None else 0.0)
        # measured_costs: this machine's step times scale the table's extra-row costs
        self.measured = (MeasuredCosts(self.call_costs) if o.measured_costs and self.call_costs is not None
                         else None)
        self.clock = time.perf_counter  # the step timer (a test may replace it)
        self._step: Optional[tuple] = None  # the last batch-1 draft: (sequence id, history length, L, end)
        self._timed = 0  # steps timed
        self.model = self._new_model()
        # sequence id -> the lookups not yet scored: (history length, match class, continuation)
        self._pending: dict[int, list[tuple[int, tuple, list[int]]]] = {}
        self._index: dict[int, NgramIndex] = {}  # sequence id -> its history's n-grams

    def _new_model(self) -> Optional[AcceptanceModel]:
        if self.call_costs is not None:
            return AcceptanceModel(costs=self.call_costs)
        return AcceptanceModel(row_cost=self.row_cost) if self.row_cost > 0 else None

    def reset(self) -> None:
        # the acceptance rates stay across generate calls (they describe the model and the kind
        # of text, and a short answer would not learn them): a new drafter, or forget(), starts
        # from the prior, so that a run repeats its target-call counts (the tokens never vary)
        self._pending.clear()
        self._index.clear()
        self._hidden.clear()
        self._unigram_index.clear()
        self._step = None  # the prefill comes next, not a step

    def forget(self) -> None:
        """Back to the prior acceptance rates (and, with ``measured_costs``, the table's costs)."""
        self.reset()
        if self.measured is not None:
            self.measured = MeasuredCosts(self.call_costs)
        self.model = self._new_model()

    @classmethod
    def of(cls, options, depth: Optional[int] = None) -> "LookupDrafter":
        """The lookup of another drafter's :class:`~ptp.drafters.options.LookupOptions`
        (continuations ``depth`` tokens deep where ``lookup_tokens`` is unset)."""
        return cls(lookup_ngram=options.lookup_ngram, lookup_max_ngram=options.lookup_max_ngram,
                   lookup_tokens=options.lookup_tokens or depth, lookup_branches=options.lookup_branches)

    def continuations(self, history: list[int], depth: int) -> list[list[int]]:
        """Up to ``lookup_branches`` distinct continuations, best first (:func:`continuations`)."""
        return continuations(history, depth, self.lookup_ngram, self.lookup_max_ngram, self.lookup_branches)

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        if self.measured is not None:
            self._time_step(request)
        budget = min(self.max_nodes, request.max_nodes)
        rows = None
        if budget > 0:
            depth = min(self.lookup_tokens, budget)
            if self.model is None:
                rows = [trie(self.continuations(h, depth), budget) for h in request.histories]
            else:
                rows = [self._costed(h, sid, depth, budget)
                        for h, sid in zip(request.histories, request.sequence_ids)]
        if self.heads is not None and budget > 0:
            rows = self._heads_rows(request, rows, budget)
        if self.measured is not None and len(request.histories) == 1:
            L = len(rows[0][0]) - 1 if rows else 0
            self._step = (request.sequence_ids[0], len(request.histories[0]), L, self.clock())
        if rows is None or max(len(t) for t, _ in rows) == 1:
            return None
        return pack_draft(rows)

    def observe(self, outcome: StepOutcome) -> None:
        """With heads: keep each row's final hidden state of the last accepted node (whose output
        is the next root)."""
        if self.heads is None or outcome.hidden is None:
            return
        n_acc = outcome.num_accepted.tolist()
        lens = outcome.cache_lens.tolist()
        nodes = outcome.accepted_nodes
        for b, seq in enumerate(outcome.sequence_ids):
            n = n_acc[b]
            self._hidden[seq] = (lens[b] + n + 1, outcome.hidden[b, int(nodes[b, n])])

    def _heads_rows(self, request: DraftRequest, rows, budget: int):
        """The heads' greedy chains for the rows lookup drafted nothing for."""
        o = self.options
        rows = list(rows) if rows is not None else [([0], [-1]) for _ in request.histories]
        for b, (hist, sid) in enumerate(zip(request.histories, request.sequence_ids)):
            if len(rows[b][0]) > 1:
                continue
            st = self._hidden.get(sid)
            if st is None or st[0] != len(hist) - 1:
                continue  # no hidden state of this root (a new sequence, or a stale one)
            toks, _ = self.heads.chain(st[1], hist, self._unigrams(sid, hist), min(o.heads_tokens, budget),
                                       o.heads_min_prob)
            if toks:
                rows[b] = ([0] + toks, list(range(-1, len(toks))))
                self.heads_drafts += 1
        return rows

    def _unigrams(self, sid: int, hist: list[int]) -> NgramIndex:
        """An index of ``hist``'s 1-grams for the heads' copy attention: lookup's own when it
        indexes 1-grams and has just been brought up to ``hist`` (the cost-aware path), else one
        kept for the heads."""
        index = self._index.get(sid) if self.model is not None and self.lookup_ngram == 1 else None
        if index is not None and index.tokens is hist:
            return index
        index = self._unigram_index.get(sid)
        if index is None or not index.continues(hist):
            index = self._unigram_index[sid] = NgramIndex(1, 1)
        index.extend(hist)
        return index

    def _time_step(self, request: DraftRequest) -> None:
        """The step since the last batch-1 draft of this sequence (its call, verification and
        commit) -> :attr:`measured`, and the acceptance model's costs from it."""
        step, self._step = self._step, None
        if step is None or len(request.histories) != 1:
            return
        sid, length, L, end = step
        if request.sequence_ids[0] != sid or len(request.histories[0]) <= length:
            return
        self.measured.record(L, self.clock() - end)
        self._timed += 1
        if self._timed % 8 == 0:  # medians of up to 9 x 64 samples: not at every step
            self.model.costs = self.measured.costs()

    def _score(self, history: list[int], sid: int) -> None:
        """Score this row's earlier lookups against the tokens committed since
        (:func:`accepted_prefix`)."""
        keep = []
        for q, key, cont in self._pending.pop(sid, ()):
            if q > len(history):
                continue  # not this row's history any more
            a = accepted_prefix(cont, history[q:q + len(cont)])
            if a is not None:
                self.model.record(key, len(cont), a)
            else:
                keep.append((q, key, cont))
        if keep:
            self._pending[sid] = keep

    def _costed(self, history: list[int], sid: int, depth: int, budget: int):
        """One row's trie, its depth chosen by the acceptance model for the match's class (every
        lookup, drafted or not, is scored later from the committed tokens)."""
        index = self._index.get(sid)
        if index is None or not index.continues(history):
            # a new history for this sequence id: its earlier lookups are not scored against it
            index = self._index[sid] = NgramIndex(self.lookup_ngram, self.lookup_max_ngram)
            self._pending.pop(sid, None)
        self._score(history, sid)
        index.extend(history)
        found, _, length, agree = index.matches_with_features(depth, self.lookup_branches)
        if not found:
            return [0], [-1]
        key = self.model.key(length, agree)
        self._pending.setdefault(sid, []).append((len(history), key, found[0]))
        L = self.model.length(key, max(map(len, found)))
        if L == 0:
            return [0], [-1]
        return trie([c[:L] for c in found], budget)


def load_lookup_heads(model, path: Optional[str] = None):
    """``(heads, None)``: the MTP heads at ``path`` (default: the shipped ones) loaded on
    ``model`` to draft beside lookup, or ``(None, why)`` when they cannot (a model on another
    device than the CPU, no checkpoint, a checkpoint that does not fit the model, heads that are
    not chain-input heads)."""
    from ptp.drafters.checkpoint import load_heads
    from ptp.drafters.heads import DEFAULT_HEADS

    ckpt = path or DEFAULT_HEADS
    if next(model.parameters()).device.type != "cpu":
        return None, "the heads beside lookup run on the CPU"
    if not os.path.isfile(os.path.join(ckpt, "adapter.safetensors")):
        return None, f"no MTP heads at {ckpt}"
    try:
        heads = load_heads(model, ckpt)
    except ValueError as e:
        return None, str(e)
    if not heads.config.chain_input:
        return None, "the heads are not chain-input heads"
    return heads, None


def _lookup_factory(model, tokenizer, path, options: LookupDrafterOptions):
    device = None if model is None else next(model.parameters()).device
    chain = None
    if options.heads is not None:
        if model is None:
            raise ValueError("lookup's option heads drafts with MTP heads on the model: pass the model")
        ckpt = None if options.heads == "default" else options.heads
        heads, why = load_lookup_heads(model, ckpt)
        if heads is None and ckpt is not None:
            raise ValueError(f"lookup: option heads={options.heads!r}: {why}")
        if heads is not None:  # 'default' that does not fit the model: lookup alone
            chain = HeadChain(heads)
    return LookupDrafter(options, device=device, heads=chain)


register_drafter("lookup", _lookup_factory, LookupDrafterOptions)
