"""Draft trees shared by the drafters: tries of lookup continuations, best-first trees, packing.

A row's tree is ``(tokens, parents)`` with node 0 the root (token 0: the decoder fills in the
row's last committed token) and parents before children.

* :func:`merge_chain`, :func:`merge_chains`, :func:`trie`: continuations as trie paths below the root (prompt
  lookup's branches; lookup's continuations joining a drafter's own tree).
* :func:`best_first_tree`: the ``budget`` likeliest paths of a chained predictor, drafted one
  depth at a time for all rows at once (chain-input heads, the slot samplers' trees);
  :func:`grid_tree` is its case for predictors whose depth-d distribution does not depend on the
  node (independent heads).
* :func:`pack_draft`: rows of ragged trees -> :class:`ptp.decode.draft.Draft`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ptp.decode.draft import Draft

__all__ = ["merge_chain", "merge_chains", "trie", "best_first_tree", "grid_tree", "pack_draft", "is_chain"]

Tree = tuple[list[int], list[int]]


def merge_chain(tokens: list[int], parents: list[int], cont: Sequence[int], room: int) -> int:
    """Inserts the chain ``cont`` below the root of the tree (tokens, parents) as a trie path (in
    place, at most ``room`` new nodes); returns the number of nodes added."""
    children = {(par, tok): i for i, (tok, par) in enumerate(zip(tokens, parents)) if i}
    node, added = 0, 0
    for t in cont:
        nxt = children.get((node, t))
        if nxt is None:
            if added >= room:
                break
            nxt = len(tokens)
            tokens.append(t)
            parents.append(node)
            children[(node, t)] = nxt
            added += 1
        node = nxt
    return added


def merge_chains(tokens: list[int], parents: list[int], conts: Sequence[Sequence[int]], budget: int) -> int:
    """:func:`merge_chain` of each of ``conts`` in order, the tree staying within ``budget`` nodes
    below the root; returns the number of nodes added."""
    added = 0
    for cont in conts:
        added += merge_chain(tokens, parents, cont, budget - (len(tokens) - 1))
    return added


def trie(conts: Sequence[Sequence[int]], budget: int) -> Tree:
    """The trie of the continuations ``conts`` (in order) below a root, at most ``budget`` nodes."""
    tokens, parents = [0], [-1]
    merge_chains(tokens, parents, conts, budget)
    return tokens, parents


def best_first_tree(roots: list[int], depths: int, expand: Callable, budget: int, top: int,
                    floor: float = -math.inf, ids: Optional[list[int]] = None,
                    root_tails: Optional[list] = None) -> list[Tree]:
    """Best-first draft trees (tokens, parents; node 0 the root) of at most ``budget`` nodes below
    each row's root, drafted one depth at a time for all rows at once by a chained predictor:
    ``expand(d, rows, tokens, tails)`` gives depth d's distribution after each front node (its
    row, its token, the last three tokens of its path ``(y2, y1, y)`` when ``root_tails`` gives the
    roots' ones): logits ``[F, V or K]``, or already its top log-probabilities and their indices
    ``([F, k], [F, k])``; ``ids`` maps a restricted vocabulary's index to the token.
    A node at depth d + 1 is one of the ``top`` tokens after its parent and scores its path's
    log-probability (the product of exact conditionals, each given the path). A node is expanded
    only while it can still be among the ``budget`` best (a child never scores above its parent
    and the cut-off only rises as candidates are added), so a depth costs at most ``budget`` rows
    per row, usually far fewer. The ``budget`` best candidates (parents before children; none below
    ``floor``) make the tree, in best-first order."""
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
        out = expand(d, [f[0] for f in front], [f[2] for f in front],
                     [tail[(f[0], f[1])] for f in front] if root_tails is not None else None)
        if isinstance(out, tuple):
            tlp, tid = out
        else:
            tlp, tid = torch.log_softmax(out, -1).topk(min(top, out.shape[-1]), dim=-1)
        k = tlp.shape[-1]
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
    out_trees = []
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
        out_trees.append((tokens, parents))
    return out_trees


def grid_tree(logits: torch.Tensor, budget: int, top: int, floor: float = -math.inf,
              ids: Optional[list[int]] = None) -> Tree:
    """:func:`best_first_tree` of a predictor whose depth-d distribution ``logits[d]`` (``[n, V or
    K]``) does not depend on the node: the ``budget`` best paths through each depth's ``top``
    candidates (a path scores the sum of its nodes' log-probabilities)."""
    tlp, tid = torch.log_softmax(logits.float(), -1).topk(min(top, logits.shape[-1]), dim=-1)

    def expand(d: int, rows: list[int], toks: list[int], tails) -> tuple[torch.Tensor, torch.Tensor]:
        return tlp[d].expand(len(rows), -1), tid[d].expand(len(rows), -1)

    return best_first_tree([0], logits.shape[0], expand, budget, top, floor, ids)[0]


def is_chain(parents: Sequence[int]) -> bool:
    """Parents ``[-1, 0, 1, ...]`` (root included): a chain."""
    return all(p == i - 1 for i, p in enumerate(parents))


def pack_draft(rows: Sequence[Tree], **extra) -> Draft:
    """The :class:`Draft` of per-row trees (root included; ragged rows padded with token 0 and
    parent -1); ``extra``: the other Draft fields (``aux``, ``draft_probs``)."""
    B = len(rows)
    width = max(len(t) for t, _ in rows)
    tokens = torch.zeros(B, width, dtype=torch.long)
    parents = torch.full((B, width), -1, dtype=torch.long)
    for b, (tok, par) in enumerate(rows):
        tokens[b, :len(tok)] = torch.tensor(tok, dtype=torch.long)
        parents[b, :len(par)] = torch.tensor(par, dtype=torch.long)
    return Draft(tokens=tokens, parents=parents, is_chain=all(is_chain(p) for _, p in rows), **extra)
