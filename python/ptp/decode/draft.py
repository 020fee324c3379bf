"""The Draft contract between the decoder and the drafters.

A drafter proposes, for every active row, a draft tree over the row's committed tokens: node 0 is
the root (the last committed token, filled in by the decoder), nodes 1..N are draft tokens with
``parents`` (``-1`` for padding nodes, so rows may have ragged trees). A chain is the tree
``parents = [-1, 0, 1, ...]``. Drafters that sample their tokens from a distribution q and want
rejection-sampling verification return ``draft_probs`` (q per node); deterministic drafters
(lookup, PTP with the position-indexed uniforms) return none and are verified by exact match
(greedy, or coupled with the same uniforms), which is token-for-token identical to plain decoding.

Drafting that rides on the verification call (PTP partial quadratic, the masked-input drafter)
uses two optional hooks:

* ``Draft.aux`` (:class:`AuxRows`): extra input rows (embeddings) the decoder appends to the
  target call after the draft tree. Each hangs after one tree node (it sees that node's
  ancestors-or-self and the earlier rows of its group). The drafter's ``aux_context(mask)`` turns
  its adapter on for exactly those rows, so the tree rows stay the target's own computation.
* ``observe(StepOutcome)``: after verification the decoder hands the drafter the final hidden
  states of the tree and aux rows and what was accepted; the next draft is built from them (MTP
  heads read the accepted node's hidden state; no drafter call at all).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from ptp.decode.sampling import SamplingConfig

__all__ = ["AuxRows", "StepOutcome", "Draft", "DraftRequest", "Drafter", "NoDrafter"]


@dataclass
class DraftRequest:
    """What a drafter sees at each step (rows = the active batch rows, in order)."""

    histories: list[list[int]]  # committed tokens per row (prompt + generated); last = the root
    sequence_ids: list[int]  # the uniform stream's sequence index per row
    max_nodes: int  # at most this many draft nodes per row (root excluded)
    sampling: SamplingConfig
    max_rows: int = 0  # at most this many rows in the target call (root + nodes + aux rows)
    cache_lens: Optional[list[int]] = None  # each row's root index (= committed tokens - 1)


@dataclass
class AuxRows:
    """Extra rows of the target call, after the ``N + 1`` tree nodes; ``A`` per batch row.

    Row ``a`` of batch row ``b`` hangs after tree node ``anchor[b, a]`` (``-1``: padding, sees
    only itself); its position id is ``position(anchor node) + offset[b, a]``; it sees the anchor
    node's ancestors-or-self and the aux rows ``a' <= a`` with ``group[b, a'] == group[b, a]``.
    """

    embeds: torch.Tensor  # [B, A, hidden] input embeddings (model dtype)
    anchor: torch.Tensor  # [B, A] int64
    offset: torch.Tensor  # [B, A] int64
    group: torch.Tensor  # [B, A] int64

    @property
    def num_rows(self) -> int:
        return self.embeds.shape[1]


@dataclass
class StepOutcome:
    """What one verification step produced (rows = the request's rows, in order)."""

    sequence_ids: list[int]
    cache_lens: torch.Tensor  # [B] committed tokens before the step (the root's index)
    tokens: torch.Tensor  # [B, N+1] the verified tree (node 0 = root)
    parents: torch.Tensor  # [B, N+1]
    num_accepted: torch.Tensor  # [B]
    accepted_nodes: torch.Tensor  # [B, N+1] (-1 padded)
    next_tokens: torch.Tensor  # [B] the target's token after the accepted path
    hidden: Optional[torch.Tensor] = None  # [B, N+1, hidden] final (normed) hidden states
    aux_hidden: Optional[torch.Tensor] = None  # [B, A, hidden] of the aux rows
    aux: Optional[AuxRows] = None


@dataclass
class Draft:
    """A batch of draft trees; ``N + 1`` nodes per row, node 0 the root."""

    tokens: torch.Tensor  # [B, N+1] int64; column 0 is overwritten with the roots
    parents: torch.Tensor  # [B, N+1] int64; parents[:, 0] = -1; -1 also marks padding nodes
    is_chain: bool = False  # every row's real nodes are 0 <- 1 <- 2 ... (pads only at the end)
    draft_probs: Optional[torch.Tensor] = None  # [B, N+1, V] float32: q of each node's token
    uniforms: Optional[torch.Tensor] = None  # [B, N+1] the uniforms a PTP-style drafter used
    aux: Optional[AuxRows] = None  # rows that draft the *next* step inside this target call

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]


class Drafter:
    """The hooks the decoder calls on a drafter; subclasses override what they need.

    Only :meth:`propose` is required. The defaults describe a drafter that keeps no state across
    steps, reads no hidden states and adds no aux rows.
    """

    name: str = "drafter"
    #: the decoder passes the tree's (and aux rows') final hidden states to :meth:`observe`
    wants_hidden: bool = False

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        """A draft for every row of the request, or None to decode one plain token."""
        raise NotImplementedError

    def reset(self) -> None:
        """Called at the start of every ``generate``."""

    def observe(self, outcome: StepOutcome) -> None:
        """Called after every verification (the prefill's included, with an empty tree) when
        :attr:`wants_hidden` is set."""

    def aux_room(self, max_nodes: int) -> int:
        """The most aux rows one step adds (the decoder sizes the KV cache with it)."""
        return 0

    def aux_context(self, mask: torch.Tensor) -> contextlib.AbstractContextManager:
        """A context manager that enables the drafter's adapter on the rows where ``mask [B, T]``
        is True, for the target call that carries this drafter's aux rows."""
        return contextlib.nullcontext()


class NoDrafter(Drafter):
    """Plain autoregressive decoding through the same machinery."""

    name = "none"

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        return None
