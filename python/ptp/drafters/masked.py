"""The masked-input drafter (``masked``): k mask rows per group ride on the verify call.

Drafting rides on the verification call, so a decoding step costs one target call
(:mod:`ptp.drafters.slots`: ``scheme=quadratic`` = a group after every draft node, the paper's
quadratic decoding; ``linear`` = after the last node only). The accepted node's group gives k
drafts: the sampler head runs sequentially over the masks, starting from the token verification
just picked. A copy sampler (``MaskedConfig.copy_attn``) also reads the row's committed tokens
(the history at ``propose`` plus the accepted drafts and the verified token). ``tree=1``
(greedy): the accepted group drafts a best-first tree instead
(:meth:`ptp.drafters.sampler_head.SlotSampler.draft_tree`: mask d's sampler run on each depth-d
node's own token, ``max_nodes``, ``top`` candidates per node, ``min_prob``), and the next call
hangs a group after each of its first nodes (all, or ``max_groups``); at T > 0 it drafts coupled
chains as without ``tree``. Greedy drafting reads the LM head's rows of the draft vocabulary only
(``draft_vocab``; the checkpoint's ``token_counts`` pick it). Options:
:class:`ptp.drafters.options.MaskedOptions` (``docs/drafter-options.md``).

Temperature 0 verification is greedy: the output is plain greedy decoding's.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ptp.decode.draft import Draft, DraftRequest, StepOutcome
from ptp.decode.sampling import SamplingConfig, uniforms
from ptp.drafters.base import register_drafter
from ptp.drafters.masked_model import MaskedModel
from ptp.drafters.options import MaskedOptions
from ptp.drafters.ptp_model import vector_pick
from ptp.drafters.slots import SlotGroupDrafter
from ptp_ext.reference import sampling_probs

__all__ = ["MaskedInputDrafter", "DEFAULT_MASKED", "coupled_pick"]

DEFAULT_MASKED = os.path.join(os.path.dirname(__file__), "weights", "masked-smollm2-135m-instruct")


def coupled_pick(sampling: SamplingConfig, seq_id: int, index: int, logits: torch.Tensor, salt: int = 0) -> int:
    """The token at absolute ``index`` of sequence ``seq_id``: the argmax (greedy), else
    ``Pick(U(seed, seq_id, index), sampling_probs(logits))`` with the decoder's uniform stream."""
    if sampling.greedy:
        return int(logits.argmax())
    u = uniforms(sampling.seed, torch.tensor(seq_id), torch.tensor(index), salt=salt)
    return int(vector_pick(u, sampling_probs(logits.float(), sampling.temperature, sampling.top_k,
                                             sampling.top_p)))


class MaskedInputDrafter(SlotGroupDrafter):
    name = "masked"
    slot_offset = 1  # mask j sits one position after its anchor's next token

    def __init__(self, model: MaskedModel, options: Optional[MaskedOptions] = None, **kw):
        o = MaskedOptions.build(options, **kw)
        k = o.num_slots or model.config.num_masks
        if not 1 <= k <= model.config.num_masks:
            raise ValueError(f"option num_slots must be in [1, {model.config.num_masks}] (the checkpoint's "
                             f"masks), got {k}")
        super().__init__(model.gate, o, k, depth=k)
        self.model = model.eval()
        # greedy drafts over the drafter's most frequent answer tokens (None: 8,192 if it has counts)
        model.auto_draft_vocab(o.draft_vocab)
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
        pick = None if s.greedy else (lambda j, lg: coupled_pick(s, seq_id, next_index + 1 + j, lg))
        return self.model.draft_chain(hidden, next_token, pick, context=context)

    @torch.no_grad()
    def draft_tree(self, z: torch.Tensor, first_prev: int, context: Optional[list[int]] = None
                   ) -> tuple[list[int], list[int]]:
        """Greedy draft tree (nodes 1..n as tokens, parents) of one mask block ``z [k, d]``."""
        return self.model.draft_tree(z, first_prev, context, self.max_nodes, self.top, self.min_prob)


def _masked_factory(model, tokenizer, path, options: MaskedOptions):
    from ptp.drafters.checkpoint import load_masked

    ckpt = path or DEFAULT_MASKED
    if not os.path.isfile(os.path.join(ckpt, "adapter.safetensors")):
        raise FileNotFoundError(f"no masked-input drafter at {ckpt} (train one with `ptp train masked --out DIR`)")
    return MaskedInputDrafter(load_masked(model, ckpt), options)


register_drafter("masked", _masked_factory, MaskedOptions)
