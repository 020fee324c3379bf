"""The PTP drafter: k dependent draft tokens from one forward of the target + its PTP adapter.

Per step and row: one forward over ``[the newly committed tokens (adapter off) ; k slots]``
against the drafter's own KV cache of the row's history (the adapter is off on real tokens, so
those are the target's own keys and values). Slot j drafts the token at absolute index
``len(history) + j`` with the stream's uniform ``U(seed, sequence, len(history) + j)``, the very
uniform the decoder's coupled verification uses there. The first draft is replaced by the exact
pick from the real root row's logits (the target's own distribution at the root), which is then
accepted whenever the two attention paths round alike. Exactness never depends on the drafts:
verification (greedy or coupled) only accepts what plain decoding would produce.

Temperature 0: verification is greedy and ignores u; the slots read ``u = 0.5``
(:data:`ptp.drafters.ptp_model.GREEDY_U`) as in training.

Schemes (``scheme=``):

* ``quadratic`` (default): :class:`PTPSlotDrafter`, partial quadratic decoding: the verify call
  also carries k u-slots after every draft node; the slots after the accepted node draft the next
  step (their slot 0 predicts the very token verification picks, slots 1..k-1 the ones after it).
  One target call per step, no drafter call (``python/ptp/drafters/slots.py``).
* ``linear``: the same with slots after the last draft node only.

Row-saving options of the verify-call schemes (for CPUs, where every row costs compute; they
change which rows ride on a call, never the output): ``max_groups=G`` keeps the slot groups after
the first G nodes only; ``check_first=1`` drops a group's drafts when its slot 0 mispredicted the
token verification picked (the later slots assumed that prediction); ``min_prob=p`` cuts a draft
where the product of its slots' own probabilities falls below p. ``lookup_ngram=n`` drafts by
prompt lookup instead whenever the last n..``lookup_max_ngram`` tokens occurred before
(copy-heavy text; its chain up to ``lookup_tokens`` long, ``lookup_groups=0``: no slot rows on
such steps); ``min_gain=g`` (``rest=R``) pauses a row's slot groups for R steps when they commit
under g tokens a step. ``preset=cpu|gpu|auto`` (:data:`ptp.drafters.options.PTP_PRESETS`) fills
in the measured best setting of a device; explicit options override it (``ptp generate`` uses it
when given no ``--drafter-option``). Every option: :class:`ptp.drafters.options.PTPOptions`
(``docs/drafter-options.md``).
An adapter with a sampler head (``PTPConfig.sampler``) drafts slots 1..k-1 one at a time, each on
the previous slot's token (a copy sampler also over the row's committed tokens); greedy,
``tree=1`` (``max_nodes``, ``top``, ``min_prob``) drafts a best-first tree over the slots instead,
groups hanging after its first nodes, lookup's continuations merged in as trie paths
(``lookup_branches`` of them, each ``lookup_tokens`` deep, default k).
Greedy drafting reads the LM head's rows of the draft vocabulary only (``draft_vocab=K``: the K
tokens most frequent in the adapter's training answers; default 8,192 when the checkpoint stores
their counts, else the full vocabulary; 0 = full): a sampler chain runs the LM head once per slot,
and on a CPU the full one (49,152 x 576 for SmolLM2) costs a large part of a call.
* ``separate``: :class:`PTPDrafter`, a drafter call (over the newly committed tokens and k slots,
  its own KV cache) before each verify call: two calls per step.

``auto`` (registered here): on a CPU, cost-aware prompt lookup (measured faster there); on a
GPU the shipped PTP adapter with the device's preset when it fits the model, else prompt lookup
(a note on stderr). PTP options given select ``ptp`` on any device.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import OrderedDict
from typing import Optional

import torch

from ptp.decode.draft import Draft, DraftRequest, Drafter, StepOutcome
from ptp.decode.sampling import SamplingConfig, uniforms
from ptp.drafters.base import make_drafter, register_drafter
from ptp.drafters.options import PTP_PRESETS, PTPOptions
from ptp.drafters.ptp_model import GREEDY_U, PTPModel, crop_cache, packed_layout, vector_pick
from ptp.drafters.slots import SlotGroupDrafter
from ptp.drafters.trees import pack_draft
from ptp_ext.reference import sampling_probs

__all__ = ["PTPDrafter", "PTPSlotDrafter", "DEFAULT_ADAPTER", "DEFAULT_CPTP", "PRESETS", "adapter_mismatch",
           "sdpa_attention"]

PRESETS = PTP_PRESETS  # the PTP drafters' presets (instances of PTPOptions)

DEFAULT_ADAPTER = os.path.join(os.path.dirname(__file__), "weights", "ptp-smollm2-135m-instruct")
# the shipped C-PTP adapter (``--drafter cptp``): the same drafter, trained on the teacher's conditionals
DEFAULT_CPTP = os.path.join(os.path.dirname(__file__), "weights", "cptp-smollm2-135m-instruct")


@contextlib.contextmanager
def sdpa_attention(model):
    """Run ``model`` with SDPA attention inside the block (the decoder may have set ``"ptp"``)."""
    previous = model.config._attn_implementation
    if previous == "sdpa":
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class PTPDrafter(Drafter):
    name = "ptp"

    def __init__(self, model: PTPModel, options: Optional[PTPOptions] = None, max_rows: int = 16, **kw):
        self.options = o = PTPOptions.build(options, **{"scheme": "separate", **kw})
        if o.scheme != "separate":
            raise ValueError(f"PTPDrafter is scheme='separate' (PTPSlotDrafter drafts on the verify call), "
                             f"got scheme={o.scheme!r}")
        self.model = model.eval()
        model.auto_draft_vocab(o.draft_vocab)  # greedy drafts (None: 8,192 tokens if it has counts)
        self.num_slots = o.num_slots or model.config.num_slots
        self.max_rows = max_rows
        # sequence id -> (cached token ids, HF DynamicCache of exactly those tokens)
        self._caches: OrderedDict[int, tuple[list[int], object]] = OrderedDict()
        self.drafter_calls = 0

    def reset(self) -> None:
        self._caches.clear()

    def slot_uniforms(self, sampling: SamplingConfig, seq_id: int, anchor: int, k: int,
                      device) -> torch.Tensor:
        if sampling.greedy or self.model.config.temperature == 0:
            return torch.full((k,), GREEDY_U, dtype=torch.float32, device=device)
        pos = torch.arange(anchor, anchor + k)
        return uniforms(sampling.seed, torch.tensor(seq_id), pos).float().to(device)

    def _row_cache(self, seq_id: int, history: list[int]):
        from transformers import DynamicCache

        entry = self._caches.pop(seq_id, None)
        if entry is not None:
            ids, cache = entry
            if len(ids) < len(history) and history[: len(ids)] == ids:
                return ids, cache
        return [], DynamicCache(config=self.model.base.config)

    @torch.inference_mode()
    def draft_row(self, history: list[int], seq_id: int, k: int, sampling: SamplingConfig) -> list[int]:
        """k draft tokens after ``history`` (its last token is the root)."""
        m = self.model
        dev = m.base.get_input_embeddings().weight.device
        cached, cache = self._row_cache(seq_id, history)
        new = torch.tensor(history[len(cached):], dtype=torch.long, device=dev)
        L = len(history)
        u = self.slot_uniforms(sampling, seq_id, L, k, dev)
        pos, vis = packed_layout(len(cached), len(new), [L], [k], device=dev)
        with sdpa_attention(m.base):
            h, _ = m.packed_forward(new, m.slot_embeddings(u.view(1, k)).view(k, -1), pos, vis,
                                    past_key_values=cache, use_cache=True)
        self.drafter_calls += 1
        crop_cache(cache, L)
        self._caches[seq_id] = (list(history), cache)
        while len(self._caches) > self.max_rows:
            self._caches.popitem(last=False)
        rows = h[0, len(new) - 1:] if m.sampler is None else h[0, len(new) - 1:len(new)]
        logits = m.logits(rows).float()  # [1 + k, V]: root row, then the slots (only the root with a sampler)
        # the root row is the target itself: its pick is the exact next token (up to rounding)
        if sampling.greedy:
            first = int(logits[0].argmax())
        else:
            u0 = float(uniforms(sampling.seed, torch.tensor(seq_id), torch.tensor(L)))
            first = int(vector_pick(torch.tensor(u0), sampling_probs(
                logits[0], sampling.temperature, sampling.top_k, sampling.top_p)))
        if m.sampler is not None:  # slots 1..k-1 one by one, each on the previous slot's token
            ctx = list(history) + [first] if m.config.copy_attn else None
            pick = None if sampling.greedy else slot_pick(m, sampling, u)
            return [first] + m.draft_chain(h[0, len(new):], first, pick, context=ctx, first_slot=1)
        if m.config.variant == "optp" or sampling.greedy:
            drafts = logits[1:].argmax(-1)
        else:
            drafts = vector_pick(u.double(), sampling_probs(logits[1:], sampling.temperature,
                                                            sampling.top_k, sampling.top_p))
        out = drafts.tolist()
        out[0] = first
        return out

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        k = min(self.num_slots, request.max_nodes)
        if k <= 0:
            return None
        rows = [self.draft_row(h, s, k, request.sampling)
                for h, s in zip(request.histories, request.sequence_ids)]
        return pack_draft([([0] + r, list(range(-1, k))) for r in rows])


class PTPSlotDrafter(SlotGroupDrafter):
    """PTP drafting on the verify call (partial quadratic or linear; see the module notes)."""

    name = "ptp"
    slot_offset = 0  # slot 0 shares its anchor node's position and predicts the next token

    def __init__(self, model: PTPModel, options: Optional[PTPOptions] = None, **kw):
        o = PTPOptions.build(options, **kw)
        if o.scheme == "separate":
            raise ValueError("scheme='separate' is PTPDrafter (a drafter call before each verify call)")
        k = o.num_slots or model.config.num_slots
        if k < 2:
            raise ValueError(f"PTP on the verify call needs num_slots >= 2, got {k}")
        if model.sampler is not None and k > model.config.num_slots:
            raise ValueError(f"this adapter's sampler head has {model.config.num_slots} slots, got num_slots={k}")
        super().__init__(model.gate, o, k, depth=k - 1)
        self.check_first = o.check_first
        self.model = model.eval()
        # greedy drafts over the adapter's most frequent answer tokens (None: 8,192 if it has counts)
        model.auto_draft_vocab(o.draft_vocab)
        self.needs_context = bool(model.config.copy_attn)  # a copy sampler reads the committed tokens
        self._sampling = SamplingConfig()
        self._greedy_rows: Optional[torch.Tensor] = None

    def _u(self, seq_id: int, first_index: int, device) -> torch.Tensor:
        k, s = self.num_slots, self._sampling
        if s.greedy or self.model.config.temperature == 0:
            return torch.full((k,), GREEDY_U, dtype=torch.float32, device=device)
        pos = torch.arange(first_index, first_index + k)
        return uniforms(s.seed, torch.tensor(seq_id), pos).float().to(device)

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        self._sampling = request.sampling
        return super().propose(request)

    @torch.no_grad()
    def group_embeds(self, request: DraftRequest, row: int, first_index: int) -> torch.Tensor:
        m, k = self.model, self.num_slots
        dev = m.base.get_input_embeddings().weight.device
        greedy = request.sampling.greedy or m.config.temperature == 0
        if greedy and self._greedy_rows is not None:
            return self._greedy_rows
        u = self._u(request.sequence_ids[row], first_index, dev)
        e = m.slot_embeddings(u.view(1, k)).view(k, -1)
        if greedy:
            self._greedy_rows = e
        return e

    @torch.no_grad()
    def group_drafts(self, hidden: torch.Tensor, next_token: int, seq_id: int, next_index: int,
                     outcome: StepOutcome, context: Optional[list[int]] = None) -> list[int]:
        m, s = self.model, self._sampling
        if m.sampler is not None or self.tree:
            return self._sampler_drafts(hidden, next_token, seq_id, next_index, context)
        logits = m.logits(hidden).float()  # slot j drafts the token at next_index + j
        if m.config.variant == "optp" or s.greedy:
            tokens = logits.argmax(-1)
        else:
            u = self._u(seq_id, next_index, logits.device)
            tokens = vector_pick(u.double(), sampling_probs(logits, s.temperature, s.top_k, s.top_p))
        # Slot 0 predicted the token verification just picked; slots 1.. assumed that prediction.
        # If it was wrong, they continue a text that did not happen: draft nothing (saves rows).
        if self.check_first and int(tokens[0]) != next_token:
            return []
        out = tokens[1:]
        if self.min_prob > 0.0 and out.numel():
            # stop where the slots' own estimate that the whole prefix survives drops below min_prob
            p = torch.softmax(logits[1:], -1).gather(-1, out.view(-1, 1)).view(-1)
            keep = int((torch.cumprod(p, 0) >= self.min_prob).sum())
            out = out[:keep]
        return out.tolist()

    def _sampler_drafts(self, hidden: torch.Tensor, next_token: int, seq_id: int, next_index: int,
                        context: Optional[list[int]]):
        """Drafts of slots 1..k-1 one at a time (a sampler head: each on the previous slot's token)
        or, greedy with ``tree``, a best-first tree over them (:meth:`ptp.drafters.sampler_head.SlotSampler.draft_tree`)."""
        m, s = self.model, self._sampling
        pick = slot_pick(m, s, self._u(seq_id, next_index, hidden.device))
        if self.check_first and pick(0, m.logits(hidden[0]).float()) != next_token:
            return []
        if self.tree and s.greedy:
            return m.draft_tree(hidden, next_token, context, self.max_nodes, self.top, self.min_prob, first_slot=1)
        probs: Optional[list[float]] = [] if self.min_prob > 0.0 else None
        out = m.draft_chain(hidden, next_token, None if s.greedy else pick, context=context, first_slot=1,
                            probs=probs)
        if probs is not None:
            keep = int((torch.cumprod(torch.tensor(probs, dtype=torch.float64), 0) >= self.min_prob).sum())
            out = out[:keep]
        return out

    def reset(self) -> None:
        super().reset()
        self._greedy_rows = None


def slot_pick(model: PTPModel, sampling: SamplingConfig, u: torch.Tensor):
    """``pick(j, logits) -> token`` of slot j: the argmax (greedy, or O-PTP), else
    ``Pick(u[j], sampling_probs(logits))`` (C-PTP with the slots' uniforms ``u [k]``)."""
    if sampling.greedy or model.config.variant == "optp":
        return lambda j, lg: int(lg.argmax())
    return lambda j, lg: int(vector_pick(u[j].double(), sampling_probs(
        lg.float(), sampling.temperature, sampling.top_k, sampling.top_p)))


def adapter_mismatch(model, path: Optional[str] = None) -> Optional[str]:
    """Why the adapter at ``path`` (default: the shipped one) cannot serve ``model``, or ``None``
    when every adapted layer of the checkpoint exists in ``model`` with its shapes (read from the
    safetensors header, no weights loaded)."""
    from safetensors import safe_open

    ckpt = os.path.join(path or DEFAULT_ADAPTER, "adapter.safetensors")
    if not os.path.isfile(ckpt):
        return f"no adapter at {ckpt}"
    modules = dict(model.named_modules())
    vocab = model.get_output_embeddings().weight.shape[0]
    with safe_open(ckpt, "pt") as f:
        if "token_counts" in f.keys() and f.get_slice("token_counts").get_shape()[0] != vocab:
            return f"the adapter's vocabulary has {f.get_slice('token_counts').get_shape()[0]} tokens, the model's {vocab}"
        for key in f.keys():
            if not key.startswith("lora.") or not key.endswith(".lora_A"):
                continue
            name = key[len("lora."):-len(".lora_A")]
            mod = modules.get(name)
            mod = getattr(mod, "base", mod)  # already wrapped by a gated LoRA
            in_features = f.get_slice(key).get_shape()[1]
            out_features = f.get_slice(key[:-1] + "B").get_shape()[0]
            if not isinstance(mod, torch.nn.Linear):
                return f"the model has no linear layer {name}"
            if (mod.in_features, mod.out_features) != (in_features, out_features):
                return (f"{name} is {mod.in_features} -> {mod.out_features} in the model, "
                        f"{in_features} -> {out_features} in the adapter")
    return None


def _factory(model, tokenizer, path, options: PTPOptions, default: str = DEFAULT_ADAPTER):
    from ptp.drafters.checkpoint import load_adapter

    ckpt = path or default
    if not os.path.isfile(os.path.join(ckpt, "adapter.safetensors")):
        raise FileNotFoundError(f"no PTP adapter at {ckpt} (train one with `ptp train ptp --out DIR`)")
    if options.scheme == "separate":
        return PTPDrafter(load_adapter(model, ckpt), options)
    return PTPSlotDrafter(load_adapter(model, ckpt), options)


def _auto_factory(model, tokenizer, path, options: Optional[PTPOptions] = None, **kw):
    """``auto``: the fastest exact drafter measured for the model's device. On a CPU that is
    cost-aware prompt lookup with the shipped MTP heads drafting where lookup drafts nothing
    (``heads=default``: the heads when they fit the model; every row of a call costs compute
    there, and the PTP adapter's slot rows did not pay:
    benchmarks/results/2026-12-08-cpu-lookup-heads.md); elsewhere the shipped
    PTP adapter when it fits ``model`` (the device's preset, or the PTP options given), else
    prompt lookup with a note on stderr. PTP options given on a CPU select ``ptp``."""
    if model is None:
        raise ValueError("drafter 'auto' picks a drafter for the model: pass the model")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and options is None and not kw:
        return make_drafter("lookup", model, tokenizer, heads="default")
    why = adapter_mismatch(model)
    if why is None:
        if options is None and not kw:
            kw = {"preset": "auto"}
        return make_drafter("ptp", model, tokenizer, options=options, **kw)
    if options is not None or kw:
        given = ", ".join(sorted(kw)) or type(options).__name__
        raise ValueError(f"drafter 'auto': the shipped PTP adapter does not fit this model ({why}), so it "
                         f"would draft by prompt lookup, which the PTP options given ({given}) do not "
                         f"apply to: name the drafter (--drafter lookup, or ptp with a fitting checkpoint)")
    print(f"[ptp] the shipped PTP drafter does not fit this model ({why}): drafting by prompt lookup "
          f"(train a PTP drafter for it with `ptp train ptp`)", file=sys.stderr)
    return make_drafter("lookup", model, tokenizer)


register_drafter("ptp", _factory, PTPOptions, PTP_PRESETS)
register_drafter("cptp", lambda model, tokenizer, path, options: _factory(model, tokenizer, path, options, DEFAULT_CPTP),
                 PTPOptions, PTP_PRESETS, summary="C-PTP: the ptp drafter with the shipped C-PTP adapter "
                 "(trained on the teacher's conditionals); the same options and presets.")
register_drafter("auto", _auto_factory, None, summary=(
    "The default of `ptp generate`: the fastest exact drafter measured for the model's device. On a CPU, "
    "cost-aware prompt lookup with the shipped MTP heads drafting where lookup drafts nothing (`lookup` "
    "with `heads=default`: every row of a call costs compute there, and the PTP adapter's slot rows do "
    "not pay on 2 cores); on a GPU the shipped PTP adapter (`ptp`) when it fits the model "
    "(SmolLM2-135M-Instruct), with the preset of the model's device (`preset=auto`), else `lookup` (a note "
    "on stderr). Given `ptp`'s options, `ptp` with those (on any device)."))
