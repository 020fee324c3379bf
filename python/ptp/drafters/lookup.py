"""Prompt-lookup / n-gram drafter (model-free): drafts what followed earlier occurrences of the
row's last n tokens (n from ``max_ngram`` down to ``min_ngram``), as in HF's
``prompt_lookup_num_tokens`` and Saxena's prompt lookup decoding.

``num_branches == 1`` gives a chain: the continuation of the most recent longest match.
``num_branches > 1`` merges the continuations of several matches (most recent and longest first)
into a trie, so alternatives after a divergence point become siblings: a small tree.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .base import Draft, DraftRequest, register_drafter

__all__ = ["LookupDrafter", "merge_chain"]


class LookupDrafter:
    name = "lookup"

    # Defaults measured on CPU (SmolLM2-135M, 2 threads, 8 dev prompts): 4-token chains beat
    # 8-token ones (1.41 vs 1.47 tokens per call, but a cheaper target call): 17.3 vs 16.4 tok/s.
    def __init__(self, max_draft_tokens: int = 4, max_ngram: int = 3, min_ngram: int = 1,
                 num_branches: int = 1, max_nodes: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_draft_tokens = max_draft_tokens  # depth of each continuation
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.num_branches = num_branches
        self.max_nodes = max_nodes if num_branches > 1 else max_draft_tokens

    def continuations(self, history: list[int], depth: int) -> list[list[int]]:
        """Up to ``num_branches`` distinct continuations, best first."""
        h = np.asarray(history, dtype=np.int64)
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            # windows starting at i with i + n < len(h): at least one token follows them
            windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
            starts = np.flatnonzero((windows == h[-n:]).all(axis=1))
            for i in starts[::-1]:  # most recent first
                cont = h[i + n: i + n + depth].tolist()
                if cont and cont not in found and not any(f[:len(cont)] == cont for f in found):
                    found.append(cont)
                    if len(found) == self.num_branches:
                        return found
        return found

    def _trie(self, conts: list[list[int]], budget: int) -> tuple[list[int], list[int]]:
        tokens, parents = [0], [-1]
        children: dict[tuple[int, int], int] = {}
        for cont in conts:
            node = 0
            for t in cont:
                nxt = children.get((node, t))
                if nxt is None:
                    if len(tokens) > budget:
                        break
                    nxt = len(tokens)
                    tokens.append(t)
                    parents.append(node)
                    children[(node, t)] = nxt
                node = nxt
        return tokens, parents

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        budget = min(self.max_nodes, request.max_nodes)
        if budget <= 0:
            return None
        rows = []
        for history in request.histories:
            conts = self.continuations(history, min(self.max_draft_tokens, budget))
            rows.append(self._trie(conts, budget))
        width = max(len(t) for t, _ in rows)
        if width == 1:
            return None
        B = len(rows)
        tokens = torch.zeros(B, width, dtype=torch.long)
        parents = torch.full((B, width), -1, dtype=torch.long)
        is_chain = True
        for b, (tok, par) in enumerate(rows):
            tokens[b, :len(tok)] = torch.tensor(tok)
            parents[b, :len(par)] = torch.tensor(par)
            is_chain = is_chain and par == list(range(-1, len(par) - 1))
        return Draft(tokens=tokens, parents=parents, is_chain=is_chain)


def merge_chain(tokens: list[int], parents: list[int], cont: list[int], room: int) -> int:
    """Inserts the chain ``cont`` below the root of the tree (tokens, parents) as a trie path (in
    place, at most ``room`` new nodes); returns the number of nodes added."""
    children = {(par, tok): i for i, (tok, par) in enumerate(zip(tokens, parents)) if i}
    node, added = 0, 0
    for t in cont:
        nxt = children.get((node, t))
        if nxt is None:
            if added == room:
                break
            nxt = len(tokens)
            tokens.append(t)
            parents.append(node)
            children[(node, t)] = nxt
            added += 1
        node = nxt
    return added


register_drafter("lookup", lambda model, tokenizer, path, **kw: LookupDrafter(**kw))
