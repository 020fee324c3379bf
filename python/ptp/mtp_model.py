"""The masked-input multi-token drafter (Samragh et al., "Your LLM Knows the Future", arXiv
2507.11851; notes in ``../shared/PAPERS.md`` section 2) and independent MTP heads (Gloeckle et
al. 2024 / Medusa): the models, their losses and checkpoint I/O.

**Masked-input** (:class:`MTPModel`): k distinct learned mask embeddings ``m_1..m_k`` follow the
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
below do (same parameter-free matches, :func:`copy_matches`; :func:`copy_attention`): mask j
reads the token before its target (the verified token for mask 0, mask j-1's draft after it)
and the two path tokens before that, and ``h = z_j + MLP([z_j; E(prev)])`` becomes
``h + g_j * o + C o`` with ``o`` the attention over ``prev``'s earlier occurrences (values: the
embeddings of the tokens that followed) against a "no copy" logit ``a_j . h + c_j``; ``C`` (shared)
and ``g_j`` start at zero, so a copy sampler starts as the sampler it extends. Such a sampler can be
trained alone on a trained drafter (``MTPModel.freeze_adapter``, ``ptp train mtp --copy-attn
--init-from DIR --freeze-adapter``): the mask rows are then fixed features and a step runs the
target forward only.

Losses (one packed forward per training sequence, windows as in PTP training): cross-entropy of
the mask rows' own LM-head output and of the sampler head (teacher forcing: the data token is the
previous token), plus the latent consistency loss: mean squared distance between each mask's
``z_j`` and the (stop-gradient) final hidden state of the real token that predicts the same target.

**MTP heads** (:class:`MTPHeads`): n residual blocks on the target's final hidden state
``h_t`` (``h + SiLU(W_i h + b_i)``, ``W_i`` zero-initialised, Medusa's form) sharing the
target's LM head; head i (1-based) predicts the token at index ``t + 1 + i``. The target is
untouched (no adapter at all); the heads read the hidden states of the verify call.
With ``token_input`` each head also reads the embedding ``e`` of token ``t + 1`` (the token the
target has just committed, known when drafting): ``h + SiLU(W_i h + U_i e + b_i)``. At
temperature 0 that token is ``argmax(LM head(h_t))``, a function of ``h_t`` that a small head
cannot compute itself; at T > 0 it is the sampled token, information ``h_t`` does not hold.
With ``chain_input`` (Hydra's sequential heads, arXiv 2402.05109) head i instead reads the token
just before its own target: head 0 the committed token ``t + 1``, head i >= 1 the token ``t + 1 + i``
(in training the data's; in decoding the token drafted at the previous depth), so a chain or a
tree is drafted one depth at a time and each node's children condition on that node's token. On the
v6 data this lifts the teacher-forced (= greedy chain) accepted prefix from 0.859 to 0.989 at equal
steps (``benchmarks/results/2026-12-03-cpu-heads-chain-input-pilot.md``).

With ``copy_attn`` (implies ``chain_input``) each head also attends over the committed context, a
learned prompt lookup inside the head: the keys are the earlier occurrences ``j`` of the token the
head reads (``x_j == y``, the ``copy_matches`` most recent ones, :func:`copy_matches`), each
scored ``w0 + w2 [x_{j-1} == y_{-1}] + w3 [.. and x_{j-2} == y_{-2}] - softplus(s) log(p - j)``
(bigram and trigram agreement with the path before ``y``, recency) against a "no copy" logit
``a . h + c``; the value is the embedding of the token that followed, ``e(x_{j+1})``. The
attention output ``o`` enters the block twice: ``h + SiLU(W_i h + U_i e + C_i o + b_i) + g_i * o``
(SmolLM2 ties its LM head to the embeddings, so ``g_i * o`` raises the copied token's logit
directly). ``C_i`` and ``g_i`` start at zero, so copy heads start as the chain heads they extend.
The context side has no parameters (exact token matches), so training needs only the token ids
beside the cached hidden states and drafting costs a comparison over the row's history.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ptp.lora import LoRAConfig, LoRAGate, apply_gated_lora, load_lora_state_dict, lora_state_dict, config_dict
from ptp.ptp_model import packed_forward
from ptp_ext.reference import sampler_mlp_ref

__all__ = ["MTPConfig", "SamplerHead", "MTPModel", "HeadsConfig", "MTPHeads", "CopyInputs", "copy_matches",
           "teacher_copy_matches", "copy_attention", "path_tail", "node_copy_inputs"]


@dataclass
class MTPConfig:
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


def _load_named(module: nn.Module, names, state: dict[str, torch.Tensor], missing_ok: bool, what: str) -> None:
    """Copies ``state[name]`` into ``module.<name>`` for each name (same shape; ``missing_ok``: an
    absent name keeps its current value)."""
    for name in names:
        if name not in state:
            if missing_ok:
                continue
            raise ValueError(f"{what} checkpoint lacks {name!r}")
        dst = getattr(module, name)
        if state[name].shape != dst.shape:
            raise ValueError(f"{name}: expected shape {list(dst.shape)}, got {list(state[name].shape)}")
        with torch.no_grad():
            dst.copy_(state[name].to(dst.dtype))


class SamplerHead(nn.Module):
    """``z + [Linear(2d->d) -> SiLU -> LayerNorm -> Linear(d->d) -> SiLU -> LayerNorm]([z; E(prev)])``."""

    def __init__(self, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.eps = eps
        with torch.no_grad():
            nn.init.normal_(self.fc1.weight, std=(2 * hidden) ** -0.5)
            nn.init.zeros_(self.fc1.bias)
            nn.init.normal_(self.fc2.weight, std=hidden ** -0.5)
            nn.init.zeros_(self.fc2.bias)
            self.norm2.weight.mul_(0.1)  # start close to the identity (the residual)

    def _args(self):
        return (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.norm1.weight,
                self.norm1.bias, self.norm2.weight, self.norm2.bias, True, self.eps)

    def forward(self, z: torch.Tensor, prev_tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Differentiable (training): the pure-PyTorch reference of the fused op."""
        return z + sampler_mlp_ref(z, prev_tokens, embedding, *self._args())

    @torch.no_grad()
    def fused(self, z: torch.Tensor, prev_tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Inference through ``ptp_ext.ops.sampler_mlp`` (one fused kernel per call)."""
        from ptp_ext import ops

        w1, b1, w2, b2, n1w, n1b, n2w, n2b = [t.to(z.dtype) for t in self._args()[:8]]
        return z + ops.sampler_mlp(z, w1, w2, prev_tokens=prev_tokens, embedding=embedding.to(z.dtype),
                                   b1=b1, b2=b2, norm1_weight=n1w, norm1_bias=n1b, norm2_weight=n2w,
                                   norm2_bias=n2b, silu_out=True, eps=self.eps)


class MTPModel(nn.Module):
    """A causal LM turned into a masked-input multi-token drafter (gated LoRA + masks + sampler)."""

    DRAFTER_TYPE = "mtp"
    CONFIG_KEY = "mtp"

    def __init__(self, base: nn.Module, config: MTPConfig) -> None:
        super().__init__()
        self.base = base
        self.config = config
        self.gate: LoRAGate = apply_gated_lora(base, config.lora)
        emb = base.get_input_embeddings().weight
        hidden = emb.shape[1]
        std = float(emb.float().std())
        self.masks = nn.Parameter(torch.randn(config.num_masks, hidden, device=emb.device) * std)
        self.sampler = SamplerHead(hidden).to(emb.device) if config.sampler else None
        self.copy_score = self.copy_null = self.copy_proj = self.copy_gate = None
        if config.copy_attn:
            k, dev = config.num_masks, emb.device
            # per mask: (w0, w_bigram, w_trigram, recency slope before softplus), the "no copy"
            # logit a . h + c and the gate g; one shared projection C (zero-init: starts as the sampler)
            self.copy_score = nn.Parameter(torch.tensor([[0.0, 1.0, 1.0, 0.0]] * k, device=dev))
            self.copy_null = nn.Parameter(torch.zeros(k, hidden + 1, device=dev))
            self.copy_proj = nn.Parameter(torch.zeros(hidden, hidden, device=dev))
            self.copy_gate = nn.Parameter(torch.zeros(k, hidden, device=dev))

    COPY_NAMES = ("copy_score", "copy_null", "copy_proj", "copy_gate")

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
        if self.sampler is not None:
            for k, v in self.sampler.state_dict().items():
                out[f"sampler.{k}"] = v.detach()
        if self.copy_score is not None:
            for name in self.COPY_NAMES:
                out[name] = getattr(self, name).detach()
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], missing_ok: bool = False) -> None:
        """Loads the drafter's tensors. ``missing_ok``: the copy tensors may be absent and then keep
        their init (``ptp train mtp --copy-attn --init-from``: a sampler into a copy sampler)."""
        load_lora_state_dict(self.base, state)
        with torch.no_grad():
            if state["masks"].shape != self.masks.shape:
                raise ValueError(f"masks: expected {list(self.masks.shape)}, got {list(state['masks'].shape)}")
            self.masks.copy_(state["masks"])
        if self.sampler is not None:
            self.sampler.load_state_dict({k[len("sampler."):]: v for k, v in state.items()
                                          if k.startswith("sampler.")})
        present = [n for n in self.COPY_NAMES if n in state]
        if self.copy_score is None:
            if present:
                raise ValueError(f"unexpected masked-input tensors {present} (copy_attn=False in the config?)")
            return
        _load_named(self, self.COPY_NAMES, state, missing_ok, "masked-input (copy_attn)")

    def sampler_hidden(self, z: torch.Tensor, prev_tokens: torch.Tensor, mask_index,
                       copy: Optional[CopyInputs] = None, fused: bool = False) -> torch.Tensor:
        """The sampler head's output ``[R, d]`` for mask rows ``z [R, d]`` whose previous token is
        ``prev_tokens [R]``; ``mask_index`` (an int or ``[R]``) says which mask each row is. With
        ``copy_attn``, ``copy`` (``[R, M]``, :func:`copy_matches` of ``prev_tokens`` and the path
        before it) adds the context attention: ``h = z + MLP([z; E(prev)])``, then
        ``h + g_j * o + C o`` with ``o = copy_attention(copy, w_j, a_j . h + c_j)``."""
        emb = self.embedding()
        h = self.sampler.fused(z, prev_tokens, emb) if fused else self.sampler(z, prev_tokens, emb)
        if self.copy_score is None:
            return h
        if copy is None:
            raise ValueError("this masked-input drafter attends over the context (copy_attn): pass copy=CopyInputs")
        if list(copy.values.shape[:-1]) != list(h.shape[:-1]):
            raise ValueError(f"copy inputs: expected queries of shape {list(h.shape[:-1])}, "
                             f"got {list(copy.values.shape[:-1])}")
        nl = self.copy_null[mask_index].to(h.dtype)  # [(R,) d + 1]
        null = (h * nl[..., :-1]).sum(-1) + nl[..., -1]
        o = copy_attention(copy, self.copy_score[mask_index], null, emb)
        return h + self.copy_gate[mask_index].to(h.dtype) * o + o @ self.copy_proj.to(h.dtype).t()

    def packed_forward(self, real_ids, slot_embeds, position_ids, visible, past_key_values=None,
                       use_cache: bool = False):
        return packed_forward(self.base, self.gate, real_ids, slot_embeds, position_ids, visible,
                              past_key_values, use_cache)

    def embedding(self) -> torch.Tensor:
        return self.base.get_input_embeddings().weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.lm_head(hidden)

    @torch.no_grad()
    def draft_chain(self, z: torch.Tensor, first_prev: int, pick=None,
                    context: Optional[list[int]] = None) -> list[int]:
        """Tokens of one mask block ``z [k, hidden]`` given the token before mask 0.

        ``pick(j, logits [V]) -> int`` chooses mask j's token (default argmax); with the sampler
        head, mask j's prediction conditions on mask j-1's chosen token. ``context`` (required with
        ``copy_attn``): the committed tokens, ending with ``first_prev``.
        """
        emb = self.embedding()
        out, prev = [], first_prev
        if self.sampler is None:
            logits = self.logits(z).float()
            return [int(pick(j, logits[j])) if pick else int(logits[j].argmax()) for j in range(z.shape[0])]
        ctx = self.copy_context(context, first_prev, z.device)
        tail = path_tail(context) if ctx is not None else None
        for j in range(z.shape[0]):
            prev_t = torch.tensor([prev], device=z.device)
            copy = None
            if ctx is not None:
                L = ctx.shape[1]
                copy = node_copy_inputs(ctx, torch.tensor([L], device=z.device), [tail], L - 1 + j,
                                        self.config.copy_matches)
            h = self.sampler_hidden(z[j:j + 1], prev_t, j, copy=copy, fused=True)
            logits = self.logits(h)[0].float()
            prev = int(pick(j, logits)) if pick else int(logits.argmax())
            out.append(prev)
            if tail is not None:
                tail = (tail[1], tail[2], prev)
        return out

    def copy_context(self, context: Optional[list[int]], first_prev: int, device) -> Optional[torch.Tensor]:
        """A copy sampler's committed tokens as ``[1, L]`` (``None`` without ``copy_attn``); they
        must end with ``first_prev``, the token before mask 0."""
        if self.copy_score is None:
            return None
        if not context or int(context[-1]) != int(first_prev):
            raise ValueError("a copy sampler drafts from the committed tokens: pass context (ending "
                             "with the token before mask 0)")
        return torch.as_tensor([list(context)], dtype=torch.long, device=device)


@dataclass
class HeadsConfig:
    num_heads: int = 4
    base_model: str = "smollm2-135m-instruct"
    token_input: bool = False  # heads also read the embedding of the committed token t + 1
    # head i reads the token t + 1 + i (the previous head's), not t + 1: drafting goes depth by depth
    chain_input: bool = False
    # heads also attend over the committed context's earlier occurrences of the token they read
    # (a learned prompt lookup; implies chain_input), keeping the copy_matches most recent ones
    copy_attn: bool = False
    copy_matches: int = 16

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.copy_matches < 1:
            raise ValueError(f"copy_matches must be >= 1, got {self.copy_matches}")
        if self.copy_attn:
            self.chain_input = True  # the copy query is the token the head reads and the path before it
        if self.chain_input:
            self.token_input = True  # a chain-input head reads a token embedding too

    def to_dict(self) -> dict:
        return asdict(self)


_NO_TOKEN = -2  # a path token before the sequence start (never equal to a token or the padding -1)


@dataclass
class CopyInputs:
    """What a copy head's context attention reads for each query (:func:`copy_matches`): ``values``
    ``[..., M]`` the token after each match (0 where invalid), ``feats [..., M, 3]`` (bigram
    agreement, trigram agreement, log distance) and ``valid [..., M]``."""
    values: torch.Tensor
    feats: torch.Tensor
    valid: torch.Tensor

    def index(self, i) -> "CopyInputs":
        """The queries ``[..., i, :]`` (one head of ``[..., n, M]`` inputs)."""
        return CopyInputs(self.values[..., i, :], self.feats[..., i, :, :], self.valid[..., i, :])


def copy_matches(ctx: torch.Tensor, ctx_len: torch.Tensor, y: torch.Tensor, y1: torch.Tensor,
                 y2: torch.Tensor, pos: torch.Tensor, max_matches: int) -> CopyInputs:
    """The ``max_matches`` most recent earlier occurrences of each query token in its context.

    ``ctx [Q, L]`` committed token ids (right-padded with -1), ``ctx_len [Q]`` their lengths; ``K``
    queries per context: ``y [Q, K]`` the token a head reads, ``y1``/``y2 [Q, K]`` the two tokens
    before it on its path (-2 before the sequence start), ``pos [Q, K]`` the position of ``y``. A
    key ``j`` is a committed pair: ``x_j == y`` with ``x_{j+1}`` committed (``j <= ctx_len - 2``).
    Returns :class:`CopyInputs` of shape ``[Q, K, M]`` (``M = min(max_matches, L)``)."""
    if ctx.dim() != 2 or y.dim() != 2 or y.shape[0] != ctx.shape[0]:
        raise ValueError(f"copy_matches: ctx [Q, L] and queries [Q, K], got {list(ctx.shape)} and {list(y.shape)}")
    Q, L = ctx.shape
    K = y.shape[1]
    M = max(1, min(int(max_matches), L))
    if L == 0:
        z = torch.zeros(Q, K, 1, dtype=torch.long, device=y.device)
        return CopyInputs(z, torch.zeros(Q, K, 1, 3, device=y.device), z.bool())
    j = torch.arange(L, device=ctx.device)
    keyok = j.unsqueeze(0) <= (ctx_len.to(ctx.device) - 2).unsqueeze(1)  # [Q, L]
    eq = (ctx.unsqueeze(1) == y.unsqueeze(2)) & keyok.unsqueeze(1)  # [Q, K, L]
    at = torch.where(eq, j, -1).topk(M, dim=-1).values  # most recent first; -1: no match
    valid = at >= 0
    jj = at.clamp(min=0)
    flat = jj.view(Q, K * M)

    def tok(off: int) -> torch.Tensor:
        return ctx.gather(1, (flat + off).clamp(0, L - 1)).view(Q, K, M)

    values = torch.where(valid, tok(1), 0)
    m2 = valid & (jj >= 1) & (tok(-1) == y1.unsqueeze(2))
    m3 = m2 & (jj >= 2) & (tok(-2) == y2.unsqueeze(2))
    logd = torch.log((pos.unsqueeze(2) - jj).clamp(min=1).float())
    return CopyInputs(values, torch.stack([m2.float(), m3.float(), logd], -1), valid)


def teacher_copy_matches(ids: torch.Tensor, t: torch.Tensor, n: int, max_matches: int) -> CopyInputs:
    """Teacher-forced copy inputs of ``n`` chained readers at anchors ``t [P]`` of the sequences
    ``ids [P, L]`` (each row the anchor's whole sequence; tokens after ``t + n`` are never read):
    reader i reads the data token ``t + 1 + i`` and the two tokens before it, over the context
    committed at the anchor (tokens ``0 .. t + 1``). Shared by the copy heads (head i) and the
    masked-input drafter's copy sampler (mask i of a window whose verified token is ``t + 1``)."""
    pos = t.unsqueeze(1) + 1 + torch.arange(n, device=t.device)  # [P, n]
    if pos.numel() and int(pos.max()) >= ids.shape[1]:
        raise ValueError("teacher copy inputs: an anchor's n input tokens must lie inside its sequence")

    def at(q: torch.Tensor) -> torch.Tensor:
        return torch.where(q >= 0, ids.gather(1, q.clamp(min=0)), _NO_TOKEN)

    return copy_matches(ids, t + 2, at(pos), at(pos - 1), at(pos - 2), pos, max_matches)


def path_tail(tokens) -> tuple[int, int, int]:
    """The last three tokens ``(y2, y1, y)`` of a path (``-2`` before its start): what a copy
    reader's query is made of."""
    pad = [_NO_TOKEN] * 3 + [int(x) for x in tokens[-3:]]
    return pad[-3], pad[-2], pad[-1]


def node_copy_inputs(ctx: torch.Tensor, ctx_len: torch.Tensor, tails, pos, max_matches: int) -> CopyInputs:
    """Copy inputs ``[F, M]`` of ``F`` drafted nodes, one per context row (``ctx [F, L]``,
    ``ctx_len [F]``): node f reads the token ``tails[f][2]`` at position ``pos`` (an int or ``[F]``)
    after the path tokens ``tails[f][:2]`` (:func:`copy_matches` with one query per row)."""
    dev = ctx.device
    t3 = torch.as_tensor(tails, dtype=torch.long, device=dev).view(-1, 3)
    p = torch.as_tensor(pos, dtype=torch.long, device=dev).expand(t3.shape[0]).reshape(-1, 1)
    return copy_matches(ctx, ctx_len, t3[:, 2:3], t3[:, 1:2], t3[:, 0:1], p, max_matches).index(0)


def copy_attention(copy: CopyInputs, score_w: torch.Tensor, null: torch.Tensor,
                   embedding: torch.Tensor) -> torch.Tensor:
    """The context attention's output ``o [..., d]``: softmax over a "no copy" logit ``null [...]``
    and one score per match, ``w0 + w2 bigram + w3 trigram - softplus(s) log distance`` (``score_w
    [..., 4]``, broadcast over the queries' leading dimensions), of the embeddings (``embedding
    [V, d]``) of the tokens that followed the matches; the no-copy share contributes zero."""
    f = copy.feats.to(null.dtype)
    w = score_w.to(null.dtype)
    score = (w[..., 0:1] + w[..., 1:2] * f[..., 0] + w[..., 2:3] * f[..., 1]
             - F.softplus(w[..., 3:4]) * f[..., 2])  # [..., M]
    score = score.masked_fill(~copy.valid, float("-inf"))
    att = torch.softmax(torch.cat([null.unsqueeze(-1), score], -1), -1)[..., 1:]
    e = F.embedding(copy.values, embedding).to(null.dtype)  # [..., M, d]
    return torch.einsum("...m,...md->...d", att, e)


class MTPHeads(nn.Module):
    """n residual heads on the target's final hidden state, sharing its LM head."""

    DRAFTER_TYPE = "heads"
    CONFIG_KEY = "heads"

    def __init__(self, base: nn.Module, config: HeadsConfig) -> None:
        super().__init__()
        self.base = base
        self.config = config
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.get_input_embeddings().weight
        hidden = w.shape[1]
        self.proj = nn.Parameter(torch.zeros(config.num_heads, hidden, hidden, device=w.device))
        self.bias = nn.Parameter(torch.zeros(config.num_heads, hidden, device=w.device))
        self.tok_proj = (nn.Parameter(torch.zeros(config.num_heads, hidden, hidden, device=w.device))
                         if config.token_input else None)
        n = config.num_heads
        self.copy_score = self.copy_null = self.copy_proj = self.copy_gate = None
        if config.copy_attn:
            # per head: (w0, w_bigram, w_trigram, recency slope before softplus)
            self.copy_score = nn.Parameter(torch.tensor([[0.0, 1.0, 1.0, 0.0]] * n, device=w.device))
            self.copy_null = nn.Parameter(torch.zeros(n, hidden + 1, device=w.device))  # "no copy": a . h + c
            self.copy_proj = nn.Parameter(torch.zeros(n, hidden, hidden, device=w.device))
            self.copy_gate = nn.Parameter(torch.zeros(n, hidden, device=w.device))
        # How often each token occurs in the answers the heads were trained on (optional; saved
        # with the checkpoint): it picks the draft vocabulary (:meth:`set_draft_vocab`).
        self.token_counts: Optional[torch.Tensor] = None
        self.vocab_ids: Optional[torch.Tensor] = None  # draft vocabulary (None: the full one)
        self.vocab_id_list: Optional[list[int]] = None  # the same as a list (index -> token id)
        self._vocab_weight: Optional[torch.Tensor] = None
        self._vocab_bias: Optional[torch.Tensor] = None
        self._vocab_q: Optional[tuple[torch.Tensor, str]] = None  # the same rows as GGUF blocks

    def set_token_counts(self, counts: torch.Tensor) -> None:
        V = self.base.get_input_embeddings().weight.shape[0]
        if counts.dim() != 1 or counts.shape[0] != V:
            raise ValueError(f"token_counts: expected shape [{V}] (the model's vocabulary), got {list(counts.shape)}")
        self.token_counts = counts.detach().float().cpu()

    def set_draft_vocab(self, size: int) -> None:
        """Draft over the ``size`` tokens most frequent in the training answers (0: the full
        vocabulary). The heads' LM-head pass then reads ``size`` rows of the LM head instead of all
        V (SmolLM2: 8,192 of 49,152 rows, 19 of 113 MB per step). Drafts only: verification always
        uses the target's full distribution, so the output is unchanged; a token outside the
        draft vocabulary is just never drafted by the heads."""
        size = int(size)
        V = self.base.get_input_embeddings().weight.shape[0]
        if size < 0:
            raise ValueError(f"draft_vocab must be >= 0, got {size}")
        if size == 0 or size >= V:
            self.vocab_ids = self.vocab_id_list = self._vocab_weight = self._vocab_bias = None
            self._vocab_q = None
            return
        if self.token_counts is None:
            raise ValueError("draft_vocab needs the token counts of the heads' training data, and this "
                             "checkpoint has none (retrain with `ptp train heads`, which saves them, or "
                             "use draft_vocab=0)")
        order = torch.sort(-self.token_counts, stable=True).indices  # most frequent first, ties by id
        lm = self.base.lm_head
        ids = order[:size].sort().values.to(lm.weight.device)
        self.vocab_ids = ids
        self.vocab_id_list = ids.tolist()
        self._vocab_weight = lm.weight.detach().index_select(0, ids).contiguous()
        bias = getattr(lm, "bias", None)
        self._vocab_bias = bias.detach().index_select(0, ids) if bias is not None else None
        # the LM head's GGUF blocks (ptp.quant), if attached: the same rows as blocks (Q8_0: a
        # quarter of the bytes), bitwise the same logits through quant_linear
        from ptp.quant import quantized_weights

        qw = quantized_weights(self.base).get(lm)
        self._vocab_q = None
        if qw is not None and qw.matches(lm.weight):
            self._vocab_q = (qw.qweight.index_select(0, ids).contiguous(), qw.format)

    def _names(self) -> tuple[str, ...]:
        names = ("proj", "bias", "tok_proj") if self.tok_proj is not None else ("proj", "bias")
        if self.copy_score is not None:
            names += ("copy_score", "copy_null", "copy_proj", "copy_gate")
        return names

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._names()]

    def trainable_names(self) -> tuple[str, ...]:
        return self._names()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n).detach() for n in self._names()}
        if self.token_counts is not None:
            out["token_counts"] = self.token_counts
        return out

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], missing_ok: bool = False) -> None:
        """Loads the heads' tensors (and token counts, if stored). ``missing_ok``: tensors the
        state lacks keep their current values (``ptp train heads --init-from``: chain heads into
        copy heads)."""
        state = dict(state)
        counts = state.pop("token_counts", None)
        if counts is not None:
            self.set_token_counts(counts)
        extra = set(state) - set(self._names())
        if extra:
            raise ValueError(f"unexpected MTP-heads tensors {sorted(extra)} (token_input="
                             f"{self.config.token_input}, copy_attn={self.config.copy_attn} in the config?)")
        _load_named(self, self._names(), state, missing_ok, "MTP-heads")

    def input_tokens(self, next_tokens: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
        """What :meth:`head_hidden` reads for all heads at once, given the committed tokens
        ``next_tokens [...]`` and the data's (or the drafted) following tokens ``targets [..., >= n-1]``
        (head i's target is ``targets[..., i]``): ``None`` without token input, ``next_tokens``
        with ``token_input``, ``[..., n]`` (``next_tokens`` then ``targets[..., :n-1]``) with
        ``chain_input``."""
        if not self.config.token_input:
            return None
        if not self.config.chain_input:
            return next_tokens
        n = self.config.num_heads
        return torch.cat([next_tokens.unsqueeze(-1), targets[..., :n - 1]], -1)

    def _token_term(self, tokens: Optional[torch.Tensor], like: torch.Tensor,
                    head: Optional[int]) -> Optional[torch.Tensor]:
        if self.tok_proj is None:
            return None
        what = "the previous head's token (chain_input)" if self.config.chain_input else \
            "the committed token (token_input)"
        if tokens is None:
            raise ValueError(f"these MTP heads read {what}: pass next_tokens")
        n = self.config.num_heads
        want = list(like.shape[:-1]) + ([n] if self.config.chain_input and head is None else [])
        if list(tokens.shape) != want:
            raise ValueError(f"next_tokens: expected shape {want} ({what}), got {list(tokens.shape)}")
        e = self.base.get_input_embeddings()(tokens).to(like.dtype)
        u = self.tok_proj.to(like.dtype)
        if head is not None:
            return e @ u[head].t()
        if self.config.chain_input:
            return torch.einsum("...nd,ned->...ne", e, u)
        return torch.einsum("...d,ned->...ne", e, u)

    def teacher_copy_inputs(self, ids: torch.Tensor, t: torch.Tensor) -> Optional[CopyInputs]:
        """Copy inputs of all n heads at anchors ``t [P]`` of the sequences ``ids [P, L]`` (each
        row the anchor's whole sequence; padding after it is never read), teacher-forced as
        :meth:`input_tokens`: head i reads the data token ``t + 1 + i`` and the path before it,
        over the context committed at the anchor (tokens ``0 .. t + 1``). ``None`` without copy_attn."""
        if not self.config.copy_attn:
            return None
        return teacher_copy_matches(ids, t, self.config.num_heads, self.config.copy_matches)

    def _copy_out(self, copy: Optional[CopyInputs], h: torch.Tensor, head: Optional[int]) -> Optional[torch.Tensor]:
        """The context attention's output ``o``: ``[..., n, d]`` (``[..., d]`` for one head)."""
        if self.copy_score is None:
            return None
        if copy is None:
            raise ValueError("these MTP heads attend over the context (copy_attn): pass copy=CopyInputs "
                             "(copy_matches / node_copy_inputs / MTPHeads.teacher_copy_inputs)")
        n = self.config.num_heads
        want = list(h.shape[:-1]) + ([] if head is not None else [n])
        if list(copy.values.shape[:-1]) != want:
            raise ValueError(f"copy inputs: expected queries of shape {want}, got {list(copy.values.shape[:-1])}")
        w = self.copy_score if head is None else self.copy_score[head]  # [(n,) 4]
        nl = self.copy_null if head is None else self.copy_null[head]  # [(n,) d + 1]
        if head is None:
            null = torch.einsum("...d,nd->...n", h, nl[:, :-1].to(h.dtype)) + nl[:, -1].to(h.dtype)
        else:
            null = h @ nl[:-1].to(h.dtype) + nl[-1].to(h.dtype)
        return copy_attention(copy, w, null, self.base.get_input_embeddings().weight)

    def head_hidden(self, h: torch.Tensor, head: Optional[int] = None,
                    next_tokens: Optional[torch.Tensor] = None, copy: Optional[CopyInputs] = None) -> torch.Tensor:
        """``h [..., d]`` -> ``[..., n, d]`` (or ``[..., d]`` for one head). ``next_tokens [...]``:
        the token each ``h`` was followed by (required with ``token_input``); with
        ``chain_input``, the token each head reads: ``[..., n]`` for all heads
        (:meth:`input_tokens`), ``[...]`` for one. ``copy`` (required with ``copy_attn``): the
        context matches of each head's query (:func:`copy_matches`), ``[..., n, M]`` or ``[..., M]``."""
        p, b = self.proj.to(h.dtype), self.bias.to(h.dtype)
        t = self._token_term(next_tokens, h, head)
        o = self._copy_out(copy, h, head)
        if head is not None:
            pre = h @ p[head].t() + b[head]
            pre = pre if t is None else pre + t
            if o is None:
                return h + F.silu(pre)
            return h + F.silu(pre + o @ self.copy_proj[head].to(h.dtype).t()) + self.copy_gate[head].to(h.dtype) * o
        pre = torch.einsum("...d,ned->...ne", h, p) + b
        pre = pre if t is None else pre + t
        if o is None:
            return h.unsqueeze(-2) + F.silu(pre)
        pre = pre + torch.einsum("...nd,ned->...ne", o, self.copy_proj.to(h.dtype))
        return h.unsqueeze(-2) + F.silu(pre) + self.copy_gate.to(h.dtype) * o

    def logits(self, h: torch.Tensor, next_tokens: Optional[torch.Tensor] = None,
               copy: Optional[CopyInputs] = None) -> torch.Tensor:
        """All heads' logits ``[..., n, V]`` from final hidden states ``[..., d]``."""
        return self.base.lm_head(self.head_hidden(h, next_tokens=next_tokens, copy=copy))

    def draft_logits(self, h: torch.Tensor, next_tokens: Optional[torch.Tensor] = None,
                     head: Optional[int] = None, copy: Optional[CopyInputs] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits over the draft vocabulary ``[..., n, K]`` (``[..., K]`` for one ``head``) and its
        token ids ``[K]`` (``None`` and the full ``[..., n, V]`` without one)."""
        z = self.head_hidden(h, head=head, next_tokens=next_tokens, copy=copy)
        if self.vocab_ids is None:
            return self.base.lm_head(z), None
        w = self._vocab_weight
        b = None if self._vocab_bias is None else self._vocab_bias.to(w.dtype)
        z = z.to(w.dtype)
        if z.device.type == "cpu":
            # a few rows: the op reads the weights once (CPU BLAS's GEMM for 2-16 rows is 2-3x slower)
            from ptp_ext.ops import invariant_linear, quant_linear

            q = self._vocab_q
            if q is not None and z.dtype == torch.float32:
                out = quant_linear(z.reshape(-1, z.shape[-1]), q[0], q[1], b)
            else:
                out = invariant_linear(z.reshape(-1, z.shape[-1]), w, b)
            return out.view(*z.shape[:-1], w.shape[0]), self.vocab_ids
        return F.linear(z, w, b), self.vocab_ids
