"""Prompt-lookup / n-gram drafter (model-free): drafts what followed earlier occurrences of the
row's last n tokens (n from ``lookup_max_ngram`` down to ``lookup_ngram``), as in HF's
``prompt_lookup_num_tokens`` and Saxena's prompt lookup decoding.

``lookup_branches == 1`` gives a chain: the continuation of the most recent longest match.
``lookup_branches > 1`` merges the continuations of several matches (most recent and longest
first) into a trie (:func:`ptp.drafters.trees.trie`), so alternatives after a divergence point
become siblings: a small tree. The other drafters draft by lookup through :meth:`continuations`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ptp.decode.draft import Draft, DraftRequest, Drafter
from ptp.drafters.base import register_drafter
from ptp.drafters.options import LookupDrafterOptions
from ptp.drafters.trees import pack_draft, trie

__all__ = ["LookupDrafter", "continuations"]


def continuations(history: list[int], depth: int, min_ngram: int, max_ngram: int, num: int) -> list[list[int]]:
    """Up to ``num`` distinct continuations (at most ``depth`` tokens each) of the earlier
    occurrences of ``history``'s last n tokens, n from ``max_ngram`` down to ``min_ngram``, most
    recent first within each n; a continuation that is a prefix of one found before is skipped."""
    h = np.asarray(history, dtype=np.int64)
    found: list[list[int]] = []
    for n in range(min(max_ngram, len(h) - 1), min_ngram - 1, -1):
        # windows starting at i with i + n < len(h): at least one token follows them
        windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
        starts = np.flatnonzero((windows == h[-n:]).all(axis=1))
        for i in starts[::-1]:  # most recent first
            cont = h[i + n: i + n + depth].tolist()
            if cont and cont not in found and not any(f[:len(cont)] == cont for f in found):
                found.append(cont)
                if len(found) == num:
                    return found
    return found


class LookupDrafter(Drafter):
    name = "lookup"

    def __init__(self, options: Optional[LookupDrafterOptions] = None, **kw) -> None:
        self.options = o = LookupDrafterOptions.build(options, **kw)
        self.lookup_tokens = o.lookup_tokens  # depth of each continuation
        self.lookup_ngram, self.lookup_max_ngram = o.lookup_ngram, o.lookup_max_ngram
        self.lookup_branches = o.lookup_branches
        self.max_nodes = o.max_nodes if o.lookup_branches > 1 else o.lookup_tokens

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
        rows = [trie(self.continuations(h, min(self.lookup_tokens, budget)), budget) for h in request.histories]
        if max(len(t) for t, _ in rows) == 1:
            return None
        return pack_draft(rows)


register_drafter("lookup", lambda model, tokenizer, path, options: LookupDrafter(options), LookupDrafterOptions)
