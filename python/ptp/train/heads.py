"""MTP heads trained on cached hidden states (``ptp train heads``, the default since 2026-12-01).

The heads read only the frozen target's final hidden state ``h_t`` (and, with ``token_input``, the
embedding of the committed token ``t+1``). So the target runs **once** over the training data:
:func:`answer_hidden_states` keeps ``h_t`` for every answer anchor (positions ``prompt_len-1 ..
L-2`` of each sequence), saved beside the data as ``<data>-hidden.safetensors`` (float16; 220 MB
for the 190k answer tokens of the v2 set, 10 minutes on the 2-core CPU, reused by later runs).
When ``ptp train heads`` writes its data with the ``ptp`` backend (the CPU default), the decoding
calls record these states as they go (:func:`recorded_hidden`) and that pass is skipped: 26 of
the 78 minutes data + hidden states took for the 3,200-answer set on a 2-core AMD EPYC.
Every optimizer step then trains on ``positions_per_step`` anchors drawn from all sequences, at
the cost of the heads and their LM-head rows alone: 2 passes over the v2 set take 2-3 minutes on
that CPU, where the per-sequence loop (:func:`ptp.train.masked.heads_batch_loss`, which reruns the
target every step) took 37 minutes for 1.75 passes.

Loss of head i at anchor t: cross-entropy of the data token ``t+2+i`` over the **draft
vocabulary**, the ``train_vocab`` most frequent answer tokens, which is what decoding drafts over
(``MTPHeads.set_draft_vocab``: the same counts, the same ids). Anchors whose target lies outside
it are left out of that head's loss (the heads can never draft such a token). ``train_vocab=0``
trains over the full vocabulary.

With ``soft_weight`` w > 0 each head also learns the target's own distribution of its token:
``(1 - w) CE(data token) + w CE(p)``, p the softmax (over the same vocabulary) of the LM head on
the cached ``h_{t+1+i}``, the state from which the target predicts token ``t+2+i`` (Hydra++'s
teacher loss; no extra target call). A 512-sequence pilot: +0.06 held-out tokens per call. By
default p is kept to its ``soft_topk`` (32) most likely tokens, computed once for every cached
row before training (:func:`teacher_topk`), so a step runs no LM-head pass for the teacher. With
the heads' four LM-head passes also merged into one, a 256-anchor step with w = 0.5 computes in
0.24 s instead of 0.39 s on a 2-core AMD EPYC; the shipped v6 heads (6,000 steps, a held-out check
every 100) trained in 35 minutes there, at the held-out accuracy of the exact loss (v5).

Batches are a fixed function of ``(seed, step)`` (epoch ``e`` walks ``randperm(N)`` seeded with
``seed + e``), so a run resumed from its ``trainer_state.pt`` draws what an uninterrupted one
would. ``holdout`` sequences (drawn with ``seed``) are kept out of training; their accuracy per
head and accepted chain prefix are measured at every checkpoint (``metrics["heldout"]``).
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ptp.models import SMOLLM2_ALIASES
from ptp.drafters.heads_model import MTPHeads
from ptp.drafters.sampler_head import draft_vocab_ids
from ptp.train.checkpoint import TRAINER_STATE, save_adapter
from ptp.train.data import Sequence
from ptp.train.trainer import lr_scheduler

__all__ = ["HeadsTrainConfig", "HeadPositions", "answer_hidden_states", "load_or_compute_hidden",
           "recorded_hidden", "save_hidden", "head_positions", "teacher_topk", "train_heads_cached"]


@dataclass
class HeadsTrainConfig:
    steps: int = 3000
    lr: float = 1e-3
    warmup: int = 20
    lr_schedule: str = "cosine"  # "constant" after warm-up, or "cosine" decay to 10% at ``steps``
    weight_decay: float = 0.0
    positions_per_step: int = 256
    train_vocab: int = 8192  # 0: the full vocabulary
    holdout: int = 0  # sequences kept out of training, measured every ``eval_every`` steps and at the end
    seed: int = 0
    save_every: int = 500
    # held-out check (a few seconds on a CPU: an LM-head pass over every held-out position) at
    # the checkpoints whose step is a multiple of this, and at the last; the others repeat the
    # last figures
    eval_every: int = 500
    max_minutes: float = 0.0
    device: str = "cpu"
    save_dtype: str = "float32"
    # Weight of the distillation term: head i also matches the target's own distribution of the
    # token it predicts (the LM head on the cached h_{t+1+i}), as Hydra++'s teacher loss; the loss
    # is (1 - w) * CE(data token) + w * CE(target distribution). 0: data tokens only.
    soft_weight: float = 0.0
    # The target's distribution in that term: its ``soft_topk`` most likely tokens (their exact
    # probabilities; the tail's terms are dropped), computed once per cached row before training
    # (:func:`teacher_topk`) instead of an LM-head pass per head every step. 0: the whole
    # distribution, recomputed every step (exact; the ``--soft-weight`` runs before 2026-12-02 s18).
    soft_topk: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.soft_weight <= 1.0:
            raise ValueError(f"soft_weight must be in [0, 1], got {self.soft_weight}")
        if self.soft_topk < 0:
            raise ValueError(f"soft_topk must be >= 0, got {self.soft_topk}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.positions_per_step < 1:
            raise ValueError(f"positions_per_step must be >= 1, got {self.positions_per_step}")
        if self.train_vocab < 0:
            raise ValueError(f"train_vocab must be >= 0, got {self.train_vocab}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")


def _anchor_range(s: Sequence) -> tuple[int, int]:
    """Answer anchors of ``s`` whose hidden state is kept: ``prompt_len-1 .. L-2`` (h_t predicts
    token t+1, which must be an answer token)."""
    return max(s.prompt_len - 1, 0), s.ids.numel() - 2


def _anchor_offsets(seqs: list[Sequence]) -> tuple[list[int], torch.Tensor]:
    """Anchors per sequence and the row offsets ``[S+1]`` of their hidden states in ``H``."""
    counts = []
    for s in seqs:
        lo, hi = _anchor_range(s)
        counts.append(max(hi - lo + 1, 0))
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    return counts, offsets


@torch.no_grad()
def answer_hidden_states(base, seqs: list[Sequence], device="cpu", batch_tokens: int = 8192,
                         progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's final (normed) hidden state at every answer anchor of every sequence:
    ``H [N, d]`` float16 (CPU) and ``offsets [S+1]`` (sequence s owns rows ``offsets[s] ..
    offsets[s+1]-1``, anchors ``prompt_len-1 ..`` in order). Sequences run in right-padded
    batches of similar length (about ``batch_tokens`` padded tokens each); right padding needs no
    mask in a causal pass."""
    from tqdm.auto import tqdm

    from ptp.train.trainer import padded_batch

    counts, offsets = _anchor_offsets(seqs)
    d = base.get_input_embeddings().weight.shape[1]
    H = torch.zeros(int(offsets[-1]), d, dtype=torch.float16)
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].ids.numel())
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    with tqdm(total=len(seqs), desc="target hidden states", disable=not progress, mininterval=5.0) as bar:
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * seqs[order[end]].ids.numel() <= batch_tokens:
                end += 1
            idx = order[start:end]
            ids, _ = padded_batch([seqs[i] for i in idx], device)
            with amp:
                h = base.model(input_ids=ids, use_cache=False).last_hidden_state
            for r, i in enumerate(idx):
                if counts[i]:
                    lo, hi = _anchor_range(seqs[i])
                    H[offsets[i]:offsets[i + 1]] = h[r, lo:hi + 1].float().cpu().to(torch.float16)
            bar.update(len(idx))
            start = end
    return H, offsets


def _cache_meta(seqs: list[Sequence], model_name: str, d: int) -> dict:
    import hashlib

    digest = hashlib.sha256()
    for s in seqs:
        digest.update(int(s.prompt_len).to_bytes(8, "little"))
        digest.update(s.ids.to(torch.int64).numpy().tobytes())
    if model_name.lower() in SMOLLM2_ALIASES:  # one model under several names: one cache
        model_name = SMOLLM2_ALIASES[-1]
    return {"model": model_name, "hidden": str(d), "sequences": str(len(seqs)),
            "tokens": str(sum(int(s.ids.numel()) for s in seqs)), "ids_sha256": digest.hexdigest()}


def load_or_compute_hidden(base, seqs: list[Sequence], path: str, model_name: str, device="cpu",
                           progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`answer_hidden_states` of ``seqs``, cached in ``path`` (``<data>-hidden.safetensors``).
    A cache made for other sequences, another model or another hidden size is recomputed."""
    d = base.get_input_embeddings().weight.shape[1]
    meta = _cache_meta(seqs, model_name, d)
    if os.path.exists(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            if f.metadata() == meta:
                t = load_file(path)
                return t["h"], t["offsets"]
        print(f"{path}: made for other data or another model; recomputing", file=sys.stderr)
    H, offsets = answer_hidden_states(base, seqs, device=device, progress=progress)
    save_hidden(path, seqs, H, offsets, model_name)
    return H, offsets


def save_hidden(path: str, seqs: list[Sequence], H: torch.Tensor, offsets: torch.Tensor, model_name: str) -> None:
    """Writes the hidden-state cache that :func:`load_or_compute_hidden` reads for ``seqs``."""
    meta = _cache_meta(seqs, model_name, H.shape[1])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({"h": H, "offsets": offsets}, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def recorded_hidden(seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, offsets)`` as :func:`answer_hidden_states` returns them, from the hidden states the
    generation recorded (``Sequence.hidden``, see ``generate_sequences(record_hidden=True)``)."""
    counts, offsets = _anchor_offsets(seqs)
    for i, (s, n) in enumerate(zip(seqs, counts)):
        if s.hidden is None or s.hidden.shape[0] != n:
            got = "none" if s.hidden is None else s.hidden.shape[0]
            raise ValueError(f"sequence {i}: {got} recorded hidden states for {n} answer anchors")
    return torch.cat([s.hidden for s in seqs]).to(torch.float16), offsets


@dataclass
class HeadPositions:
    """Training anchors: ``rows [N]`` (rows of H), ``next [N]`` (token t+1), ``targets [N, n]``
    (tokens t+2 .. t+1+n), ``seq [N]`` (the sequence) and ``t [N]`` (the anchor's position in it;
    copy heads read the context before it)."""
    rows: torch.Tensor
    next: torch.Tensor
    targets: torch.Tensor
    seq: Optional[torch.Tensor] = None
    t: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.rows.numel())


def head_positions(seqs: list[Sequence], offsets: torch.Tensor, num_heads: int,
                   which: Optional[list[int]] = None) -> HeadPositions:
    """Every anchor t of the sequences ``which`` (default all) whose n targets exist
    (``t+1+n <= L-1``)."""
    rows, nxt, tgt, seq, pos = [], [], [], [], []
    ar = torch.arange(num_heads)
    for i in (range(len(seqs)) if which is None else which):
        s = seqs[i]
        lo, hi = _anchor_range(s)
        last = s.ids.numel() - 2 - num_heads
        if last < lo:
            continue
        t = torch.arange(lo, last + 1)
        rows.append(int(offsets[i]) + t - lo)
        ids = s.ids.long().view(-1)
        nxt.append(ids[t + 1])
        tgt.append(ids[t.unsqueeze(1) + 2 + ar])
        seq.append(torch.full_like(t, i))
        pos.append(t)
    if not rows:
        z = torch.zeros(0, dtype=torch.long)
        return HeadPositions(z, z, torch.zeros(0, num_heads, dtype=torch.long), z, z)
    return HeadPositions(torch.cat(rows), torch.cat(nxt), torch.cat(tgt), torch.cat(seq), torch.cat(pos))


def padded_ids(seqs: list[Sequence]) -> torch.Tensor:
    """All sequences' token ids ``[S, L_max]`` (long, right-padded with 0, on the CPU): the contexts
    copy heads attend over (:meth:`MTPHeads.teacher_copy_inputs` never reads past an anchor's
    sequence)."""
    from ptp.train.trainer import padded_batch

    return padded_batch(seqs, "cpu")[0]


def _copy_for(model: MTPHeads, ids: Optional[torch.Tensor], pos: HeadPositions, sel, device):
    """Copy inputs of the anchors ``pos[sel]`` (``None`` for heads without copy_attn)."""
    if not model.config.copy_attn:
        return None
    if ids is None or pos.seq is None:
        raise ValueError("copy heads (copy_attn) need the sequences' token ids and the anchors' positions")
    seq, t = pos.seq[sel], pos.t[sel]
    ctx = ids[seq]
    L = int(t.max()) + 2 + model.config.num_heads if t.numel() else 1
    return model.teacher_copy_inputs(ctx[:, :min(L, ctx.shape[1])].to(device), t.to(device))


class _Vocab:
    """The train vocabulary: ids, LM-head rows (and bias), token id -> index (-100 outside)."""

    def __init__(self, model: MTPHeads, size: int, device):
        lm = model.base.lm_head
        V = lm.weight.shape[0]
        if size == 0 or size >= V:
            self.ids = torch.arange(V, device=device)
        else:
            if model.token_counts is None:
                raise ValueError("train_vocab needs the heads' token counts (set_token_counts)")
            self.ids = draft_vocab_ids(model.token_counts, size).to(device)  # the draft vocabulary's
        self.weight = lm.weight.detach().index_select(0, self.ids).float()
        b = getattr(lm, "bias", None)
        self.bias = None if b is None else b.detach().index_select(0, self.ids).float()
        self.index = torch.full((V,), -100, dtype=torch.long, device=device)
        self.index[self.ids] = torch.arange(self.ids.numel(), device=device)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight, self.bias)


def _losses(model: MTPHeads, vocab: _Vocab, h: torch.Tensor, nxt: torch.Tensor, targets: torch.Tensor,
            teacher: Optional[list[torch.Tensor]] = None, soft_weight: float = 0.0,
            teacher_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None, copy=None):
    """Mean CE over heads (each head's CE over its in-vocabulary targets) and hits ``[P, n]``
    (argmax == target; a target outside the vocabulary is a miss). With ``soft_weight`` w > 0
    each head's loss is ``(1 - w) * CE(data token) + w * CE(the target's distribution over the
    vocabulary)``, that distribution given either as ``teacher`` (head i's ``[P, d]`` target hidden
    states h_{t+1+i}: the exact softmax, one LM-head pass per head) or as ``teacher_topk``
    (``(idx [P, n, K], p [P, n, K])`` from :func:`teacher_topk`: only the K most likely tokens'
    terms). All heads share one LM-head pass over ``[P * n]`` rows."""
    n = model.config.num_heads
    tk = vocab.index[targets]
    z = model.head_hidden(h, next_tokens=model.input_tokens(nxt, targets), copy=copy)  # [P, n, d]
    logits = vocab.logits(z)  # [P, n, K]
    logp = torch.log_softmax(logits, -1)
    soft_all = None
    if soft_weight > 0 and teacher_topk is not None:
        idx, p = teacher_topk
        soft_all = -(p.to(logp.dtype) * logp.gather(-1, idx.long())).sum(-1).mean(0)  # [n]
    elif soft_weight > 0 and teacher is not None:
        with torch.no_grad():
            p = torch.softmax(vocab.logits(torch.stack(teacher, 1)), -1)  # [P, n, K]
        soft_all = -(p * logp).sum(-1).mean(0)
    loss = 0.0
    for i in range(n):
        valid = tk[:, i] >= 0
        hard = F.nll_loss(logp[:, i], tk[:, i], ignore_index=-100) if bool(valid.any()) else None
        if soft_all is not None:
            loss = loss + (soft_weight * soft_all[i] + (0.0 if hard is None else (1.0 - soft_weight) * hard)) / n
        elif hard is not None:
            loss = loss + hard / n
    hits = (logits.detach().argmax(-1) == tk).float()
    return loss, hits


@torch.no_grad()
def teacher_topk(vocab: _Vocab, H: torch.Tensor, k: int, device="cpu", chunk: int = 4096,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's ``k`` most likely tokens at every row of the cache: indices into the train
    vocabulary ``[N, k]`` (int32) and their probabilities under the softmax over that vocabulary
    ``[N, k]`` (float32). Row r is the target's distribution of the token after the anchor of row
    r, the distillation target of the heads whose token that is (rows ``r - 1 - i``). One
    LM-head pass over the cache (about 40 s for 400k rows on a 2-core CPU) replaces one per head
    per training step."""
    from tqdm.auto import tqdm

    N = H.shape[0]
    k = min(int(k), vocab.ids.numel())
    idx = torch.empty(N, k, dtype=torch.int32)
    prob = torch.empty(N, k, dtype=torch.float32)
    for s in tqdm(range(0, N, chunk), desc="target top-k", disable=not progress, mininterval=5.0):
        e = min(N, s + chunk)
        p = torch.softmax(vocab.logits(H[s:e].to(device).float()), -1)
        v, i = p.topk(k, -1)
        idx[s:e] = i.to(torch.int32).cpu()
        prob[s:e] = v.cpu()
    return idx, prob


@torch.no_grad()
def evaluate_heads(model: MTPHeads, vocab: _Vocab, H: torch.Tensor, pos: HeadPositions,
                   device, chunk: int = 0, ids: Optional[torch.Tensor] = None) -> dict:
    """Accuracy per head and mean accepted chain prefix (greedy, heads' argmax) on ``pos``
    (copy heads also need the sequences' ids, :func:`padded_ids`)."""
    if len(pos) == 0:
        return {}
    if chunk <= 0:  # about 64 MB of float32 logits per chunk
        chunk = max(1, (1 << 24) // (model.config.num_heads * vocab.ids.numel()))
    hits = []
    for s in range(0, len(pos), chunk):
        h = H[pos.rows[s:s + chunk]].to(device).float()
        # chain_input: teacher-forced, which is the greedy chain's prefix (head i reads the data
        # token exactly when heads 0..i-1 were right)
        tok = model.input_tokens(pos.next[s:s + chunk].to(device), pos.targets[s:s + chunk].to(device))
        copy = _copy_for(model, ids, pos, slice(s, s + chunk), device)
        z = model.head_hidden(h, next_tokens=tok, copy=copy)  # [P, n, d]; argmax only, no softmax
        hits.append((vocab.logits(z).argmax(-1) == vocab.index[pos.targets[s:s + chunk].to(device)]).float())
    hit = torch.cat(hits)
    return {"acc": [round(float(x), 4) for x in hit.mean(0)],
            "prefix": round(float(hit.cumprod(1).sum(1).mean()), 4), "positions": len(pos)}


def holdout_indices(num_seqs: int, holdout: int, seed: int) -> list[int]:
    """The sequences ``--holdout``/``--seed`` keep out of training (sorted indices)."""
    split = list(range(num_seqs))
    random.Random(seed).shuffle(split)
    return sorted(split[:holdout])


def _batch(cfg: HeadsTrainConfig, N: int, step: int) -> torch.Tensor:
    """Indices of step ``step``'s anchors: epoch ``e`` walks ``randperm(N)`` seeded ``seed + e``
    (the last incomplete batch of an epoch is skipped); a function of ``(seed, step)`` only."""
    bs = min(cfg.positions_per_step, N)
    per_epoch = N // bs
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    return perm[b * bs:(b + 1) * bs]


def train_heads_cached(model: MTPHeads, seqs: list[Sequence], H: torch.Tensor, offsets: torch.Tensor,
                       cfg: HeadsTrainConfig, out_dir: str, extra_meta: Optional[dict] = None,
                       resume: bool = True, progress: bool = True) -> dict:
    """Train ``model``'s heads on the cached hidden states ``H``/``offsets`` of ``seqs``
    (:func:`answer_hidden_states`); checkpoints to ``out_dir`` (resumed from it); returns the last
    metrics. ``model.token_counts`` must be set when ``cfg.train_vocab`` restricts the vocabulary."""
    from tqdm.auto import tqdm

    if H.shape[0] != int(offsets[-1]) or offsets.numel() != len(seqs) + 1:
        raise ValueError(f"hidden states do not match the sequences: {H.shape[0]} rows, "
                         f"{offsets.numel() - 1} sequences in the cache, {len(seqs)} given")
    d = model.base.get_input_embeddings().weight.shape[1]
    if H.shape[1] != d:
        raise ValueError(f"hidden states have size {H.shape[1]}, the model {d}")
    dev = torch.device(cfg.device)
    n = model.config.num_heads
    held = holdout_indices(len(seqs), cfg.holdout, cfg.seed)
    held_set = set(held)
    train_pos = head_positions(seqs, offsets, n, [i for i in range(len(seqs)) if i not in held_set])
    held_pos = head_positions(seqs, offsets, n, held)
    if len(train_pos) == 0:
        raise ValueError(f"no training anchors: every sequence's answer is shorter than {n + 2} tokens")
    vocab = _Vocab(model, cfg.train_vocab, dev)
    ids = padded_ids(seqs) if model.config.copy_attn else None
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_scheduler(opt, cfg.lr_schedule, cfg.warmup, cfg.steps)
    step = 0
    state_path = os.path.join(out_dir, TRAINER_STATE)
    if resume and os.path.exists(state_path):
        st = torch.load(state_path, weights_only=False)
        model.load_adapter_state_dict({k: v.to(dev) for k, v in
                                       load_file(os.path.join(out_dir, "adapter.safetensors")).items()})
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = st["step"]
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("ptp", "__main__.py")):
        argv[0] = "python -m ptp"
    meta = {"train": {"cached_hidden": True, **asdict(cfg)}, "command": " ".join(argv), **(extra_meta or {}),
            "train_positions": len(train_pos)}
    ema: dict = {}
    held_metrics: dict = {}
    start_time = time.time()
    # the distillation targets, once per cached row (the budget counts it)
    topk = (teacher_topk(vocab, H, cfg.soft_topk, dev, progress=progress)
            if cfg.soft_weight > 0 and cfg.soft_topk > 0 and step < cfg.steps else None)

    def checkpoint(final: bool = False) -> dict:
        metrics = dict(ema)
        if len(held_pos) and (final or step % cfg.eval_every == 0 or not held_metrics):
            model.eval()
            held_metrics.clear()
            held_metrics.update(evaluate_heads(model, vocab, H, held_pos, dev, ids=ids), step=step)
            model.train()
        if held_metrics:
            metrics["heldout"] = dict(held_metrics)
        save_adapter(model, out_dir, {**meta, "step": step, "metrics": metrics},
                     dtype=getattr(torch, cfg.save_dtype))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                   state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)
        return metrics

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="heads (cached hidden states)", disable=not progress,
               mininterval=5.0)
    while step < cfg.steps:
        if cfg.max_minutes and time.time() - start_time > 60 * cfg.max_minutes:
            break
        b = _batch(cfg, len(train_pos), step)
        rows = train_pos.rows[b]
        h = H[rows].to(dev).float()
        # head i's token t+2+i is what the target predicts from h_{t+1+i}: rows + 1 + i (an anchor
        # t has its n targets inside the sequence, so those rows are the same sequence's)
        teacher = soft = None
        if cfg.soft_weight > 0 and topk is not None:
            r = rows.unsqueeze(1) + 1 + torch.arange(n)  # [P, n]
            soft = (topk[0][r].to(dev), topk[1][r].to(dev))
        elif cfg.soft_weight > 0:
            teacher = [H[rows + 1 + i].to(dev).float() for i in range(n)]
        loss, hit = _losses(model, vocab, h, train_pos.next[b].to(dev), train_pos.targets[b].to(dev),
                            teacher, cfg.soft_weight, teacher_topk=soft,
                            copy=_copy_for(model, ids, train_pos, b, dev))
        opt.zero_grad(set_to_none=True)
        if torch.is_tensor(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        sched.step()
        step += 1
        scalars = {"loss": float(loss.detach() if torch.is_tensor(loss) else loss),
                   "acc0": float(hit[:, 0].mean()), "accK": float(hit[:, -1].mean()),
                   "prefix": float(hit.cumprod(1).sum(1).mean())}
        for k, v in scalars.items():
            ema[k] = v if k not in ema else 0.98 * ema[k] + 0.02 * v
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
        if step % cfg.save_every == 0:
            m = checkpoint()
            if not progress:
                print(f"step {step} {(time.time() - start_time) / 60:.1f} min "
                      + " ".join(f"{k} {v:.3f}" for k, v in ema.items())
                      + (f" heldout {m['heldout']}" if "heldout" in m else ""), flush=True)
    bar.close()
    metrics = checkpoint(final=True)
    model.eval()
    return {**metrics, "step": step, "minutes": (time.time() - start_time) / 60}
