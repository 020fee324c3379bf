"""The Parallel Token Prediction model: a target LM plus a gated LoRA and a learned map of u.

After the context, k *auxiliary slots* carry the uniforms that an autoregressive sampler would use
for the next k tokens; one forward returns k dependent tokens (Draxler, Will et al., "Parallel
Token Prediction", arXiv 2512.21323).

* Slot input embedding: a learned function of u (:class:`UniformEmbedding`): ``interp`` (a few
  learned vectors interpolated piecewise-linearly in u, the paper's default) or ``bits`` (u's
  binary expansion followed by a linear layer, their ablation's winner).
* Variants. **O-PTP**: slot i reads u_i and outputs the token ``Pick(u_i, P_i)`` itself (its argmax).
  **C-PTP**: slot i reads u_{i-1} (slot 1 reads a learned start vector) and outputs the
  conditional P_i given u_1..u_{i-1}; the token is ``Pick(u_i, sampling_probs(P_i))``.
* Temperature 0 (greedy): Pick is the argmax for every u, so the drafter is defined to be
  u-free: every slot reads ``u = 0.5`` (:data:`GREEDY_U`), in training and in drafting. Drafts
  are then a function of the context alone, and the stream's uniforms never matter.
* Layout of one packed forward (:func:`packed_layout`): ``[past | real tokens | aux slots]``.
  A *window* with anchor ``a`` (it drafts tokens ``a, a+1, ...`` of the sequence) sees the real
  tokens ``< a``; its slot j (0-based) has position id ``a - 1 + j`` (slot 0 shares the last
  context token's position) and sees the earlier slots of its own window and itself.
* The adapter acts only on the auxiliary rows (``python/ptp/lora.py``), so the real rows of any
  forward are the target's own, bit for bit: verification can ride on the same call.
* ``sampler`` (optional, :class:`ptp.drafters.sampler_head.SlotSampler`): slot j >= 1's token comes from the
  masked-input drafter's sampler head on its final hidden state and the token before its target
  (slot j-1's; teacher-forced in training), and with ``copy_attn`` also from that head's attention
  over the committed context's earlier occurrences of that token. Slot 0 (whose token verification
  picks itself) keeps the plain LM head; the sampler tensors' row 0 is unused. At temperature 0 a
  slot otherwise reads the same u = 0.5 as every other, so the sampler is what tells slot j which
  token slot j-1 chose; at T > 0 the u's still select the tokens (Pick(u_j, P_j) on the sampler's
  conditional).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ptp_ext.reference import sampling_probs
from ptp.models import cache_kw
from ptp.decode.lora import LoRAConfig, LoRAGate, apply_gated_lora, lora_state_dict, load_lora_state_dict, config_dict
from ptp.drafters.sampler_head import SlotSampler

__all__ = [
    "GREEDY_U",
    "PTPConfig",
    "UniformEmbedding",
    "PTPModel",
    "packed_layout",
    "additive_mask",
    "vector_pick",
    "packed_forward",
    "crop_cache",
]

GREEDY_U = 0.5


@dataclass
class PTPConfig:
    """Everything that defines a PTP adapter (saved as JSON beside the safetensors)."""

    variant: str = "optp"  # "optp" | "cptp"
    num_slots: int = 8  # k used in training windows (drafting may use fewer or more)
    u_embedding: str = "interp"  # "interp" | "bits"
    num_knots: int = 16
    num_bits: int = 16
    temperature: float = 0.0  # the sampling setting the adapter is trained for
    top_k: int = 0
    top_p: float = 1.0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    base_model: str = "smollm2-135m-instruct"
    # slots 1.. through the sampler head (reads the previous slot's token), optionally with the
    # copy attention over the committed context (ptp.drafters.sampler_head)
    sampler: bool = False
    copy_attn: bool = False
    copy_matches: int = 16

    def __post_init__(self) -> None:
        self.lora = LoRAConfig.coerce(self.lora)
        if self.copy_attn and not self.sampler:
            raise ValueError("copy_attn extends the sampler head: it needs sampler=True")
        if self.copy_matches < 1:
            raise ValueError(f"copy_matches must be >= 1, got {self.copy_matches}")
        if self.sampler and self.num_slots < 2:
            raise ValueError("a PTP sampler head drafts slots 1..k-1: it needs num_slots >= 2")
        if self.variant not in ("optp", "cptp"):
            raise ValueError(f"variant must be 'optp' or 'cptp', got {self.variant!r}")
        if self.u_embedding not in ("interp", "bits"):
            raise ValueError(f"u_embedding must be 'interp' or 'bits', got {self.u_embedding!r}")

    def to_dict(self) -> dict:
        return config_dict(self)


class UniformEmbedding(nn.Module):
    """u in [0, 1) ``[...]`` -> ``[..., hidden]`` (float32)."""

    def __init__(self, hidden: int, kind: str = "interp", num_knots: int = 16, num_bits: int = 16,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.kind = kind
        if kind == "interp":
            self.knots = nn.Parameter(torch.randn(num_knots, hidden) * init_std)
        elif kind == "bits":
            self.num_bits = num_bits
            self.proj = nn.Linear(num_bits, hidden)
            with torch.no_grad():
                self.proj.weight.normal_(0.0, init_std / math.sqrt(num_bits))
                self.proj.bias.normal_(0.0, init_std)
        else:
            raise ValueError(f"kind must be 'interp' or 'bits', got {kind!r}")

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u = u.float().clamp(0.0, 1.0)
        if self.kind == "interp":
            K = self.knots.shape[0]
            x = u * (K - 1)
            i0 = x.floor().long().clamp(0, K - 2)
            w = (x - i0).unsqueeze(-1)
            return self.knots[i0] * (1 - w) + self.knots[i0 + 1] * w
        # bits: the first num_bits binary digits of u as +-1 (u == 1 clamps to all ones)
        q = (u * (1 << self.num_bits)).long().clamp(max=(1 << self.num_bits) - 1)
        shifts = torch.arange(self.num_bits - 1, -1, -1, device=u.device)
        bits = ((q.unsqueeze(-1) >> shifts) & 1).float() * 2 - 1
        return self.proj(bits)


def packed_layout(past_len: int, num_real: int, anchors: Sequence[int], num_slots: Sequence[int],
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and visibility of one packed forward ``[past | real | aux windows]``.

    Real token i has absolute index ``past_len + i`` and sees every key up to itself. Window w
    (anchor ``anchors[w]``, ``num_slots[w]`` slots) sees the keys with absolute index
    ``< anchors[w]`` and its own earlier slots; its slot j has position ``anchors[w] - 1 + j``.

    Returns ``position_ids [num_real + A]`` (long) and ``visible [num_real + A, past_len +
    num_real + A]`` (bool), A the total number of slots.
    """
    P, R = past_len, num_real
    anchors_t = torch.as_tensor(list(anchors), dtype=torch.long, device=device)
    slots_t = torch.as_tensor(list(num_slots), dtype=torch.long, device=device)
    if anchors_t.numel() and (int(anchors_t.min()) < 1 or int(anchors_t.max()) > P + R):
        raise ValueError(f"anchors must lie in [1, {P + R}], got {anchors_t.tolist()}")
    win = torch.repeat_interleave(torch.arange(len(anchors_t), device=device), slots_t)  # [A]
    A = int(win.numel())
    starts = torch.cumsum(slots_t, 0) - slots_t
    slot = torch.arange(A, device=device) - starts[win]  # [A]
    anchor = anchors_t[win]
    real_pos = torch.arange(P, P + R, device=device)
    position_ids = torch.cat([real_pos, anchor - 1 + slot])
    keys = torch.arange(P + R, device=device)
    visible = torch.zeros(R + A, P + R + A, dtype=torch.bool, device=device)
    visible[:R, : P + R] = keys.unsqueeze(0) <= real_pos.unsqueeze(1)
    visible[R:, : P + R] = keys.unsqueeze(0) < anchor.unsqueeze(1)
    visible[R:, P + R:] = (win.unsqueeze(0) == win.unsqueeze(1)) & (slot.unsqueeze(0) <= slot.unsqueeze(1))
    return position_ids, visible


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of an HF ``Cache`` (its ``crop`` takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool ``[Q, K]`` -> additive ``[1, 1, Q, K]``, or ``[B, Q, K]`` -> ``[B, 1, Q, K]`` (0
    visible, dtype's min hidden)."""
    m = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    m.masked_fill_(~visible, torch.finfo(dtype).min)
    return m[None, None] if visible.dim() == 2 else m[:, None]


def batched_slot_layout(lengths: Sequence[int], anchors: Sequence[Sequence[int]], num_slots: int,
                        device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`packed_layout` for B sequences at once (training): sequence b (``lengths[b]`` real
    tokens, cached, right-padded to ``Lmax = max(lengths)``) has the windows ``anchors[b]``, all
    with ``num_slots`` slots, and every sequence must have the same number of windows.

    Returns ``position_ids [B, A]`` and ``visible [B, A, Lmax + A]``: the keys are the padded
    cache, then the B x A slot rows; padding keys are never visible.
    """
    if len({len(a) for a in anchors}) > 1:
        raise ValueError("batched_slot_layout: every sequence needs the same number of windows")
    Lmax = max(lengths)
    A = len(anchors[0]) * num_slots
    pos = torch.empty(len(lengths), A, dtype=torch.long, device=device)
    vis = torch.zeros(len(lengths), A, Lmax + A, dtype=torch.bool, device=device)
    for b, (L, anc) in enumerate(zip(lengths, anchors)):
        p, v = packed_layout(L, 0, anc, [num_slots] * len(anc), device=device)
        pos[b] = p
        vis[b, :, :L] = v[:, :L]
        vis[b, :, Lmax:] = v[:, L:]
    return pos, vis


class PTPModel(SlotSampler, nn.Module):
    """A causal LM (HF ``*ForCausalLM``) turned into a PTP drafter by a gated LoRA + u-embedding.

    The base weights are frozen; only the LoRA and the u-embedding (and C-PTP's start vector, the
    optional sampler head) train.
    """

    DRAFTER_TYPE = "ptp"
    CONFIG_KEY = "ptp"

    def __init__(self, base: nn.Module, config: PTPConfig) -> None:
        super().__init__()
        self.base = base
        self.config = config
        self.gate: LoRAGate = apply_gated_lora(base, config.lora)
        hidden = base.get_input_embeddings().weight.shape[1]
        init_std = float(base.get_input_embeddings().weight.float().std())
        self.u_embed = UniformEmbedding(hidden, config.u_embedding, config.num_knots, config.num_bits,
                                        init_std)
        self.start = nn.Parameter(torch.randn(hidden) * init_std) if config.variant == "cptp" else None
        dev = base.get_input_embeddings().weight.device
        self.u_embed.to(dev)
        if self.start is not None:
            self.start.data = self.start.data.to(dev)
        self.init_sampler(hidden, config.num_slots, dev, config.sampler, config.copy_attn)

    # ------------------------------------------------------------------ parameters and I/O
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = lora_state_dict(self.base)
        for k, v in self.u_embed.state_dict().items():
            out[f"u_embed.{k}"] = v.detach()
        if self.start is not None:
            out["start"] = self.start.detach()
        out.update(self.sampler_state_dict())
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], missing_ok: bool = False) -> None:
        """Loads the adapter. ``missing_ok``: sampler / copy tensors the state lacks keep their init
        (``ptp train ptp --sampler --init-from``: a plain adapter into one with a sampler head)."""
        self.load_sampler_state_dict(state, missing_ok, "PTP")
        load_lora_state_dict(self.base, state)
        self.u_embed.load_state_dict({k[len("u_embed."):]: v for k, v in state.items()
                                      if k.startswith("u_embed.")})
        if self.start is not None:
            with torch.no_grad():
                self.start.copy_(state["start"])

    # ------------------------------------------------------------------ inputs
    def slot_uniforms(self, uniforms: torch.Tensor) -> torch.Tensor:
        """The u each slot reads, ``[..., k] -> [..., k]``: all :data:`GREEDY_U` at temperature 0."""
        if self.config.temperature == 0:
            return torch.full_like(uniforms, GREEDY_U, dtype=torch.float32)
        return uniforms.float()

    def slot_embeddings(self, uniforms: torch.Tensor) -> torch.Tensor:
        """Input embeddings of one window's slots: ``uniforms [..., k]`` -> ``[..., k, hidden]``.

        ``uniforms[..., j]`` is the uniform of the token slot j drafts. O-PTP slot j embeds u_j;
        C-PTP slot j embeds u_{j-1} (slot 0: the learned start vector).
        """
        e = self.u_embed(self.slot_uniforms(uniforms))
        if self.config.variant == "cptp":
            start = self.start.float().expand(*e.shape[:-2], 1, e.shape[-1])
            e = torch.cat([start, e[..., :-1, :]], dim=-2)
        return e

    # ------------------------------------------------------------------ forward
    def packed_forward(
        self,
        real_ids: Optional[torch.Tensor],
        slot_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        visible: torch.Tensor,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """One forward over ``[real_ids (1, R) ; slot_embeds (A, hidden)]`` (batch 1).

        ``position_ids [R + A]`` and ``visible [R + A, past + R + A]`` come from
        :func:`packed_layout`. The adapter is on exactly for the A slot rows. Returns the final
        hidden states ``[1, R + A, hidden]`` and the model output (for its cache).
        """
        return packed_forward(self.base, self.gate, real_ids, slot_embeds, position_ids, visible,
                              past_key_values, use_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.lm_head(hidden)

    def embedding(self) -> torch.Tensor:
        return self.base.get_input_embeddings().weight

    def slot_tokens(self, slot_logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Draft tokens from the slots' logits ``[..., k, V]`` and their uniforms ``[..., k]``.

        O-PTP (and any variant at temperature 0): the argmax (ties: lowest id). C-PTP:
        ``Pick(u_j, sampling_probs(logits_j))`` with the adapter's sampling settings.
        """
        c = self.config
        if c.variant == "optp" or c.temperature == 0:
            return slot_logits.argmax(dim=-1)
        return vector_pick(uniforms, sampling_probs(slot_logits, c.temperature, c.top_k, c.top_p))


def packed_forward(base, gate: LoRAGate, real_ids: Optional[torch.Tensor], slot_embeds: torch.Tensor,
                   position_ids: torch.Tensor, visible: torch.Tensor, past_key_values=None,
                   use_cache: bool = False):
    """:meth:`PTPModel.packed_forward` for any HF causal LM ``base`` wrapped by a gated LoRA."""
    emb = base.get_input_embeddings()
    dtype = emb.weight.dtype
    if slot_embeds.dim() == 3:  # a batch of slot sets, no real rows (training)
        if real_ids is not None and real_ids.numel():
            raise ValueError("packed_forward: batched slot_embeds [B, A, hidden] take no real_ids")
        B, A = slot_embeds.shape[:2]
        if position_ids.shape != (B, A) or visible.dim() != 3 or visible.shape[:2] != (B, A):
            raise ValueError(f"packed_forward: batched slots need position_ids [{B}, {A}] and visible "
                             f"[{B}, {A}, keys], got {list(position_ids.shape)} and {list(visible.shape)}")
        x = slot_embeds.to(dtype)
        mask_dtype = torch.get_autocast_dtype("cuda") if (x.is_cuda and torch.is_autocast_enabled()) else dtype
        with gate.rows(torch.ones(B, A, dtype=torch.bool, device=x.device)):
            out = base.model(inputs_embeds=x, attention_mask=additive_mask(visible, mask_dtype),
                             position_ids=position_ids, use_cache=use_cache,
                             **cache_kw(base.model, past_key_values))
        return out.last_hidden_state, out
    parts = []
    if real_ids is not None and real_ids.numel():
        parts.append(emb(real_ids.view(1, -1)))
    R = parts[0].shape[1] if parts else 0
    A = slot_embeds.shape[0]
    if A:
        parts.append(slot_embeds.to(dtype).unsqueeze(0))
    x = torch.cat(parts, dim=1)
    aux = torch.zeros(1, R + A, dtype=torch.bool, device=x.device)
    aux[:, R:] = True
    mask_dtype = torch.get_autocast_dtype("cuda") if (x.is_cuda and torch.is_autocast_enabled()) else dtype
    with gate.rows(aux):
        out = base.model(
            inputs_embeds=x,
            attention_mask=additive_mask(visible, mask_dtype),
            position_ids=position_ids.view(1, -1),
            use_cache=use_cache,
            **cache_kw(base.model, past_key_values),
        )
    return out.last_hidden_state, out


def vector_pick(uniforms: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Batched :func:`ptp_ext.reference.pick`: ``uniforms [...]``, ``probs [..., V]`` -> ``[...]``.

    The first index whose float64 CDF exceeds u (a binary search), clamped to the last token with
    non-zero probability (rounding: F(V-1) <= u).
    """
    cdf = probs.double().cumsum(dim=-1)
    u = uniforms.double().to(cdf.device).reshape(*cdf.shape[:-1], 1)
    idx = torch.searchsorted(cdf.contiguous(), u, right=True).squeeze(-1)
    V = probs.shape[-1]
    last_nonzero = (V - 1) - (probs > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(idx, last_nonzero)
