"""The masked-input multi-token drafter (Samragh et al., "Your LLM Knows the Future", arXiv
2507.11851): the model (its losses are
:mod:`ptp.train.masked`).

**Masked-input** (:class:`MaskedModel`): k distinct learned mask embeddings ``m_1..m_k`` follow the
context; mask j (0-based) sits at position ``n + j`` (the context's last token has ``n - 1``),
sees the context and the earlier masks of its block, and predicts the token at index
``n + 1 + j`` (the normal output of the last context token predicts index n). The target's
linears carry a gated LoRA active on mask rows only (``python/ptp/lora.py``), so the target's
own outputs are bit-identical with or without the adapter. A **sampler head** turns a mask's final
hidden state ``z_j`` and the embedding of the previously chosen token into the prediction:
``logits_j = W_unemb (z_j + MLP([z_j ; E(y_{j-1})]))`` with the paper's two blocks
``Linear -> SiLU -> LayerNorm`` (2d -> d -> d); run sequentially over the k masks at inference
through the fused ``ptp_ext.ops.sampler_mlp`` op. (The residual ``z_j +`` is ours: the head starts
as the identity, so a short training budget does not first have to learn to copy ``z_j``.)

With ``copy_attn`` the sampler head also attends over the committed context, as the copy heads
(:mod:`ptp.drafters.heads_model`) do (same parameter-free matches, :func:`copy_matches`; :func:`copy_attention`): mask j
reads the token before its target (the verified token for mask 0, mask j-1's draft after it)
and the two path tokens before that, and ``h = z_j + MLP([z_j; E(prev)])`` becomes
``h + g_j * o + C o`` with ``o`` the attention over ``prev``'s earlier occurrences (values: the
embeddings of the tokens that followed) against a "no copy" logit ``a_j . h + c_j``; ``C`` (shared)
and ``g_j`` start at zero, so a copy sampler starts as the sampler it extends. Such a sampler can be
trained alone on a trained drafter (``MaskedModel.freeze_adapter``, ``ptp train masked --copy-attn
--init-from DIR --freeze-adapter``): the mask rows are then fixed features and a step runs the
target forward only. The sampler head and the copy attention live in :mod:`ptp.sampler_head`
(:class:`~ptp.drafters.sampler_head.SlotSampler`), shared with the PTP adapter's optional sampler head.

Losses (one packed forward per training sequence, windows as in PTP training): cross-entropy of
the mask rows' own LM-head output and of the sampler head (teacher forcing: the data token is the
previous token), plus the latent consistency loss: mean squared distance between each mask's
``z_j`` and the (stop-gradient) final hidden state of the real token that predicts the same target.

The MTP heads (the other drafter of that family) are :mod:`ptp.drafters.heads_model`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch
import torch.nn as nn

from ptp.decode.lora import LoRAConfig, LoRAGate, apply_gated_lora, load_lora_state_dict, lora_state_dict, config_dict
from ptp.drafters.ptp_model import packed_forward
from ptp.drafters.sampler_head import (CopyInputs, SamplerHead, SlotSampler, copy_attention, copy_matches,
                                       node_copy_inputs, path_tail, teacher_copy_matches)

__all__ = ["MaskedConfig", "SamplerHead", "MaskedModel", "CopyInputs", "copy_matches",
           "teacher_copy_matches", "copy_attention", "path_tail", "node_copy_inputs"]


@dataclass
class MaskedConfig:
    num_masks: int = 8
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sampler: bool = True
    lcm_weight: float = 1.0
    base_model: str = "smollm2-135m-instruct"
    # the sampler head also attends over the committed context's earlier occurrences of the token
    # it reads (the copy heads' parameter-free lookup, :func:`copy_attention`); needs the sampler
    copy_attn: bool = False
    copy_matches: int = 16

    def __post_init__(self) -> None:
        self.lora = LoRAConfig.coerce(self.lora)
        if self.num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {self.num_masks}")
        if self.copy_matches < 1:
            raise ValueError(f"copy_matches must be >= 1, got {self.copy_matches}")
        if self.copy_attn and not self.sampler:
            raise ValueError("copy_attn extends the sampler head: it needs sampler=True")

    def to_dict(self) -> dict:
        return config_dict(self)


class MaskedModel(SlotSampler, nn.Module):
    """A causal LM turned into a masked-input multi-token drafter (gated LoRA + masks + sampler)."""

    DRAFTER_TYPE = "masked"
    CONFIG_KEY = "masked"

    def __init__(self, base: nn.Module, config: MaskedConfig) -> None:
        super().__init__()
        self.base = base
        self.config = config
        self.gate: LoRAGate = apply_gated_lora(base, config.lora)
        emb = base.get_input_embeddings().weight
        hidden = emb.shape[1]
        std = float(emb.float().std())
        self.masks = nn.Parameter(torch.randn(config.num_masks, hidden, device=emb.device) * std)
        self.init_sampler(hidden, config.num_masks, emb.device, config.sampler, config.copy_attn)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def freeze_adapter(self) -> None:
        """Train only the sampler head (and its copy attention): the LoRA and the masks stay as
        loaded, so the mask rows' hidden states are fixed features (no backward through the target)."""
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.masks.requires_grad_(False)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = lora_state_dict(self.base)
        out["masks"] = self.masks.detach()
        out.update(self.sampler_state_dict())
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], missing_ok: bool = False) -> None:
        """Loads the drafter's tensors. ``missing_ok``: the copy tensors may be absent and then keep
        their init (``ptp train masked --copy-attn --init-from``: a sampler into a copy sampler)."""
        load_lora_state_dict(self.base, state)
        with torch.no_grad():
            if state["masks"].shape != self.masks.shape:
                raise ValueError(f"masks: expected {list(self.masks.shape)}, got {list(state['masks'].shape)}")
            self.masks.copy_(state["masks"])
        self.load_sampler_state_dict(state, missing_ok, "masked-input")

    def packed_forward(self, real_ids, slot_embeds, position_ids, visible, past_key_values=None,
                       use_cache: bool = False):
        return packed_forward(self.base, self.gate, real_ids, slot_embeds, position_ids, visible,
                              past_key_values, use_cache)

    def embedding(self) -> torch.Tensor:
        return self.base.get_input_embeddings().weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.lm_head(hidden)
