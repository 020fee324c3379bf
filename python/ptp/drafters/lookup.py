"""Prompt-lookup / n-gram drafter (model-free): drafts what followed earlier occurrences of the
row's last n tokens (n from ``lookup_max_ngram`` down to ``lookup_ngram``), as in HF's
``prompt_lookup_num_tokens`` and Saxena's prompt lookup decoding.

``lookup_branches == 1`` gives a chain: the continuation of the most recent longest match.
``lookup_branches > 1`` merges the continuations of several matches (most recent and longest
first) into a trie (:func:`ptp.drafters.trees.trie`), so alternatives after a divergence point
become siblings: a small tree. The other drafters draft by lookup through :meth:`continuations`.

Cost-aware draft length (``row_cost > 0``, the default on a CPU): every row of a target call
costs compute there (SmolLM2-135M on 2 cores: a 2-row call ~1.3x a 1-row call, 4 rows ~1.8x, 8
rows ~3.3x), so a draft that is rarely accepted slows decoding down. The drafter learns, per
matched n-gram length, how often a drafted token is accepted once the tokens before it were
(counted from the committed tokens it sees at the next step: a step that commits m tokens
accepted m - 1 drafts), and drafts the length L (0 = no draft: a plain step) that maximises the
expected tokens per cost, ``(1 + a + ... + a^L) / (1 + row_cost * L)``. It only changes which
rows ride on a call, never the output.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ptp.decode.draft import Draft, DraftRequest, Drafter
from ptp.drafters.base import register_drafter
from ptp.drafters.options import LookupDrafterOptions
from ptp.drafters.trees import pack_draft, trie

__all__ = ["LookupDrafter", "AcceptanceModel", "NgramIndex", "continuations", "matches", "CPU_ROW_COST"]

# A 1-row decoding call of SmolLM2-135M on the 2-core dev CPU costs ~6.0 ms at a 256-token
# context, 2 rows ~1.28x that, 4 rows ~1.77x, 8 rows ~3.3x (a further row is its 0.27 GFLOP at
# the FMA rate of 2 cores, ~1.1-1.7 ms). The value is the end-to-end optimum, not the raw ratio:
# over 26 dev prompts lookup with row_cost 0.12 / 0.18 / 0.24 / 0.35 ran at 1.08 / 1.04 / 1.00 /
# ~0.91 of each other (two runs, ~5 % noise), row_cost 0 (fixed 4-token chains) well below;
# after the faster 1-row calls of 2026-12-07 (third run) 0.12 / 0.18 / 0.26 / 0.35 ran at 1.00 /
# 1.00 / 1.02 / 1.01: within the noise, so 0.18 stays.
CPU_ROW_COST = 0.18


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
    found: list[list[int]] = []
    first_n = 0
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        for i in reversed(starts(n)):  # most recent first
            cont = history[i + n: i + n + depth]
            if cont and cont not in found and not any(f[:len(cont)] == cont for f in found):
                found.append(cont)
                first_n = first_n or n
                if len(found) == num:
                    return found, first_n
    return found, first_n


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

    def matches(self, depth: int, num: int) -> tuple[list[list[int]], int]:
        h = self.tokens
        return _pick(h, lambda n: self.starts.get(tuple(h[-n:]), ()), depth, self.min_n, self.max_n, num)


class AcceptanceModel:
    """Per matched n-gram length: how often a drafted token is accepted once the tokens before it
    were (``prior`` pseudo-counts at rate ``prior_rate``), and the draft length that maximises the
    expected committed tokens per unit of call cost ``1 + row_cost * L``."""

    def __init__(self, row_cost: float, prior_rate: float = 0.5, prior: float = 2.0) -> None:
        self.row_cost = row_cost
        self.prior_rate, self.prior = prior_rate, prior
        self.reached: dict[int, float] = {}
        self.accepted: dict[int, float] = {}

    def rate(self, n: int) -> float:
        return ((self.accepted.get(n, 0.0) + self.prior * self.prior_rate)
                / (self.reached.get(n, 0.0) + self.prior))

    def record(self, n: int, drafted: int, accepted: int) -> None:
        """A draft of ``drafted`` tokens (its first match of length ``n``) had ``accepted``."""
        accepted = min(accepted, drafted)
        self.reached[n] = self.reached.get(n, 0.0) + min(accepted + 1, drafted)
        self.accepted[n] = self.accepted.get(n, 0.0) + accepted

    def length(self, n: int, longest: int) -> int:
        """The best draft length in ``0..longest`` after a match of length ``n``."""
        a = self.rate(n)
        best, best_value, expected, p = 0, 1.0, 1.0, 1.0
        for L in range(1, longest + 1):
            p *= a
            expected += p
            value = expected / (1.0 + self.row_cost * L)
            if value > best_value:
                best, best_value = L, value
        return best


class LookupDrafter(Drafter):
    name = "lookup"

    def __init__(self, options: Optional[LookupDrafterOptions] = None, device=None, **kw) -> None:
        """``device``: the target's (``row_cost`` unset: 0.18 on the CPU or when unknown, else 0)."""
        self.options = o = LookupDrafterOptions.build(options, **kw)
        self.lookup_tokens = o.lookup_tokens  # depth of each continuation
        self.lookup_ngram, self.lookup_max_ngram = o.lookup_ngram, o.lookup_max_ngram
        self.lookup_branches = o.lookup_branches
        self.max_nodes = o.max_nodes if o.lookup_branches > 1 else o.lookup_tokens
        on_cpu = device is None or torch.device(device).type == "cpu"
        self.row_cost = o.row_cost if o.row_cost is not None else (CPU_ROW_COST if on_cpu else 0.0)
        self.model = AcceptanceModel(self.row_cost) if self.row_cost > 0 else None
        self._pending: dict[int, tuple[int, int, int]] = {}  # sequence id -> (history len, n, L)
        self._index: dict[int, NgramIndex] = {}  # sequence id -> its history's n-grams

    def reset(self) -> None:
        # the acceptance rates stay across generate calls (they describe the model and the kind
        # of text, and a short answer would not learn them): a new drafter, or forget(), starts
        # from the prior, so that a run repeats its target-call counts (the tokens never vary)
        self._pending.clear()
        self._index.clear()

    def forget(self) -> None:
        """Back to the prior acceptance rates."""
        self._pending.clear()
        self._index.clear()
        if self.model is not None:
            self.model = AcceptanceModel(self.row_cost)

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
        budget = min(self.max_nodes, request.max_nodes)
        if budget <= 0:
            return None
        depth = min(self.lookup_tokens, budget)
        if self.model is None:
            rows = [trie(self.continuations(h, depth), budget) for h in request.histories]
        else:
            rows = [self._costed(h, sid, depth, budget)
                    for h, sid in zip(request.histories, request.sequence_ids)]
        if max(len(t) for t, _ in rows) == 1:
            return None
        return pack_draft(rows)

    def _costed(self, history: list[int], sid: int, depth: int, budget: int):
        """One row's trie, its depth chosen by the acceptance model (the previous draft of this
        row scored first: the tokens committed since then accepted all but the last)."""
        pending = self._pending.pop(sid, None)
        if pending is not None and len(history) > pending[0]:
            self.model.record(pending[1], pending[2], len(history) - pending[0] - 1)
        index = self._index.get(sid)
        if index is None or index.done > len(history) or (
                index.done and index.tokens[index.done - 1] != history[index.done - 1]):
            index = self._index[sid] = NgramIndex(self.lookup_ngram, self.lookup_max_ngram)
        index.extend(history)
        found, n = index.matches(depth, self.lookup_branches)
        L = self.model.length(n, min(depth, max(map(len, found)))) if found else 0
        if L == 0:
            return [0], [-1]
        self._pending[sid] = (len(history), n, L)
        return trie([c[:L] for c in found], budget)


register_drafter("lookup", lambda model, tokenizer, path, options: LookupDrafter(
    options, device=None if model is None else next(model.parameters()).device), LookupDrafterOptions)
