"""PTP training loops: distillation (O-PTP / C-PTP) and teacher-free inverse-autoregressive C-PTP.

Per sequence (``seqs_per_step`` accumulated per optimizer step; ``micro_batch`` of them share one
right-padded real pass and one slot pass, which is what keeps a GPU busy):

1. *Real pass* (no grad, adapter off): the target over the whole sequence gives its KV cache and
   its conditional at every position (the teacher's distributions, CDF bins for free).
2. *Windows*: ``windows_per_seq`` anchors ``a`` drawn in the answer (``a >= prompt_len``); window
   a's k slots draft tokens ``a .. a+k-1``; u_j is drawn in token ``a+j``'s CDF bin
   (``left + (right-left) * Beta(beta, beta)``; ``0.5`` at temperature 0).
3. *Slot pass* (grad, adapter on the slot rows only): all windows' slots at once against the
   cached context, through the block mask of :func:`ptp.drafters.ptp_model.packed_layout`.
4. Loss. O-PTP: cross-entropy on the data token. C-PTP distillation: KL(teacher P_T || student
   P_T) at temperature T (cross-entropy on the data token at T = 0). With a sampler head
   (``PTPConfig.sampler``) slots 1.. predict through it, teacher-forced on the data token before
   their target, and their own LM-head output gets the same loss as a second term. C-PTP teacher-free: the u's
   come from the bins under the *student's own* conditionals (k sequential no-grad slot passes,
   slot j's bin given u_1..u_{j-1}), loss -log P_student(data token).
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

from ptp.models import output_cache
from ptp.drafters.ptp_model import PTPModel, batched_slot_layout, crop_cache
from ptp.drafters.sampler_head import window_copy_inputs
from ptp.train.checkpoint import TRAINER_STATE, save_adapter
from ptp.train.data import Sequence
from ptp_ext.reference import sampling_probs


@dataclass
class TrainConfig:
    mode: str = "distill"  # "distill" | "teacher-free"
    steps: int = 1000
    lr: float = 5e-4
    warmup: int = 20
    lr_schedule: str = "constant"  # "constant" after warm-up, or "cosine" decay to 10% at ``steps``
    weight_decay: float = 0.0
    windows_per_seq: int = 24
    seqs_per_step: int = 1
    micro_batch: int = 1  # sequences per forward pass (padded batch); 1 = one at a time
    beta: float = 0.3
    seed: int = 0
    save_every: int = 100
    max_minutes: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    device: str = "cpu"
    bf16: bool = False  # autocast bf16 (CUDA)
    save_dtype: str = "float32"  # adapter file dtype ("float16" halves it; loading casts back)


def lr_scheduler(opt: torch.optim.Optimizer, schedule: str, warmup: int, steps: int
                 ) -> torch.optim.lr_scheduler.LRScheduler:
    """The training runs' schedule, from ``torch.optim.lr_scheduler``: linear warm-up over
    ``warmup`` steps (factor ``(step + 1) / warmup``), then ``"constant"`` or ``"cosine"`` decay
    to 10% of the learning rate at ``steps``."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
    sched = torch.optim.lr_scheduler
    w = max(1, int(warmup))
    warm = sched.LinearLR(opt, start_factor=1.0 / w, end_factor=1.0, total_iters=w - 1)
    if schedule == "constant":
        return warm
    base = [g["initial_lr"] for g in opt.param_groups]  # LinearLR already scaled g["lr"]
    cosine = sched.CosineAnnealingLR(opt, T_max=max(1, steps - w), eta_min=0.1 * min(base))
    return sched.SequentialLR(opt, [warm, cosine], milestones=[w])


def _bins(probs: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CDF bin ``[F(t-1), F(t))`` of each token: ``probs [..., V]``, ``tokens [...]``."""
    cdf = probs.double().cumsum(-1)
    right = cdf.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    left = right - probs.double().gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return left.float(), right.float()


def _u_in_bins(left, right, beta: float, gen: torch.Generator) -> torch.Tensor:
    d = torch.distributions.Beta(torch.full_like(left, beta), torch.full_like(left, beta))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        x = d.sample().cpu()
    return (left.cpu() + (right - left).cpu() * x).clamp(0.0, 1.0 - 1e-7).to(left.device)


def padded_batch(seqs: list[Sequence], device) -> tuple[torch.Tensor, list[int]]:
    """Token ids of ``seqs`` right-padded to the longest ``[B, Lmax]`` (pad id 0), and the lengths.

    Right padding needs no attention mask in the causal real pass: a real token never sees the
    padding after it. Padding keys stay invisible to the slots (:func:`batched_slot_layout`)."""
    lengths = [int(s.ids.numel()) for s in seqs]
    ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids[b, :lengths[b]] = s.ids.to(device).view(-1)
    return ids, lengths


def pad_windows(anchors: list[list[int]]) -> list[list[int]]:
    """Every sequence's anchors padded to the most windows by repeating its last anchor (padded
    windows are computed and then left out of the loss and the metrics)."""
    W = max(len(a) for a in anchors)
    return [a + [a[-1]] * (W - len(a)) for a in anchors]


@dataclass
class WindowBatch:
    """The sequences of a micro-batch that have windows: ``live`` (their indices in the input),
    ``ids [B, Lmax]`` right-padded, ``lengths``, ``counts`` (real windows per sequence) and
    ``anchors`` (padded to the most windows by :func:`pad_windows`)."""
    live: list[int]
    ids: torch.Tensor
    lengths: list[int]
    counts: list[int]
    anchors: list[list[int]]


def window_batch(seqs: list[Sequence], lo_hi, count: int, rng: random.Random,
                 device) -> Optional[WindowBatch]:
    """Per sequence, in order, ``count`` sorted anchors drawn from ``lo_hi(seq) = (lo, hi)`` (all
    of them if fewer; the sequence is left out if the range is empty): the same draws as one
    sequence at a time. ``None`` if no sequence has a window."""
    plan = []
    for s in seqs:
        lo, hi = lo_hi(s)
        plan.append(None if hi < lo else sorted(rng.sample(range(lo, hi + 1), min(count, hi - lo + 1))))
    live = [b for b, a in enumerate(plan) if a is not None]
    if not live:
        return None
    ids, lengths = padded_batch([seqs[b] for b in live], device)
    return WindowBatch(live, ids, lengths, [len(plan[b]) for b in live], pad_windows([plan[b] for b in live]))


def ptp_slot_loss(variant: str, mode: str, T: float, logits: torch.Tensor, targets: torch.Tensor,
                  teacher: torch.Tensor) -> torch.Tensor:
    """The PTP slots' loss: ``logits [..., V]`` against the data ``targets [...]`` and the
    teacher's conditionals ``teacher [..., V]`` at the same positions.

    - O-PTP learns the token the uniforms select: cross-entropy on the data token.
    - C-PTP distillation learns the teacher's conditional: KL(teacher || student) at the sampling
      temperature T; at T = 0 (greedy data, whose token is the teacher's argmax) at temperature 1,
      the teacher's whole distribution, so C-PTP at T = 0 still learns a conditional, not a token.
    - C-PTP teacher-free (no teacher): cross-entropy on the data token at temperature T.
    """
    V = logits.shape[-1]
    lb = logits.reshape(-1, V)
    if variant == "optp" or mode == "teacher-free":
        scaled = lb if (variant == "optp" or T == 0) else lb / T
        return F.cross_entropy(scaled, targets.reshape(-1))
    t = T if T > 0 else 1.0
    logp_s = F.log_softmax(lb / t, dim=-1)
    logp_t = F.log_softmax(teacher.reshape(-1, V) / t, dim=-1)
    return F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")


def batch_loss(model: PTPModel, seqs: list[Sequence], cfg: TrainConfig, gen: torch.Generator,
               rng: random.Random) -> list[Optional[tuple[torch.Tensor, dict]]]:
    """Per-sequence losses of a micro-batch of sequences, computed in one real pass and one slot
    pass (``None`` for a sequence whose answer is shorter than k). Each loss is that sequence's
    mean over its own windows, exactly what :func:`sequence_loss` gives it alone up to float
    rounding; the anchors and, in distillation, the u's are drawn per sequence in order, as one
    at a time would draw them (teacher-free at T > 0 draws each slot's u's for the whole batch)."""
    c = model.config
    k, dev, T = c.num_slots, torch.device(cfg.device), c.temperature
    if cfg.mode not in ("distill", "teacher-free"):
        raise ValueError(f"mode must be 'distill' or 'teacher-free', got {cfg.mode!r}")
    if cfg.mode == "teacher-free" and T > 0 and c.variant != "cptp":
        raise ValueError("teacher-free training needs the C-PTP variant")
    results: list[Optional[tuple[torch.Tensor, dict]]] = [None] * len(seqs)
    wb = window_batch(seqs, lambda s: (s.prompt_len, s.ids.numel() - k), cfg.windows_per_seq, rng, dev)
    if wb is None:
        return results
    ids, lengths, counts, anchors, live = wb.ids, wb.lengths, wb.counts, wb.anchors, wb.live
    B, W = len(live), len(anchors[0])
    tgt_idx = torch.tensor(anchors, device=dev).unsqueeze(-1) + torch.arange(k, device=dev)  # [B, W, k]
    targets = torch.gather(ids, 1, tgt_idx.view(B, -1)).view(B, W, k)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    with torch.no_grad(), amp, model.gate.off():
        out = model.base(ids, use_cache=True)
    cache = output_cache(out)
    # P at position a+j-1 predicts a+j: [B, W, k, V]
    teacher = out.logits[torch.arange(B, device=dev).view(B, 1, 1), tgt_idx - 1].float()
    del out
    pos, vis = batched_slot_layout(lengths, anchors, k, device=dev)
    Lmax = ids.shape[1]
    if model.sampler is not None:
        # slot j >= 1 reads the data token before its target (a + j - 1); a copy sampler also reads
        # its earlier occurrences in tokens 0 .. a (committed once verification picked token a)
        prev_tok = torch.gather(ids, 1, (tgt_idx[:, :, 1:] - 1).reshape(B, -1)).view(B, W, k - 1)
        slot_index = torch.arange(1, k, device=dev).repeat(B * W)
        copy = None
        if c.copy_attn:
            copy = window_copy_inputs(ids, anchors, k - 1, c.copy_matches)

    def slot_logits(u: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """u [B, W, k] -> the slots' logits [B, W, k, V] (slots 1.. through the sampler head, if
        any) and, with a sampler head, the slots' own LM-head logits (else None)."""
        emb = model.slot_embeddings(u).reshape(B, W * k, -1)
        with amp:
            h, _ = model.packed_forward(None, emb, pos, vis, past_key_values=cache, use_cache=True)
            lg = model.logits(h)
        crop_cache(cache, Lmax)
        lg = lg.float().view(B, W, k, -1)
        if model.sampler is None:
            return lg, None
        z = h.float().view(B, W, k, -1)[:, :, 1:].reshape(B * W * (k - 1), -1)
        h2 = model.sampler_hidden(z, prev_tok.reshape(-1), slot_index, copy=copy)
        with amp:
            s_lg = model.logits(h2.to(model.embedding().dtype)).float().view(B, W, k - 1, -1)
        return torch.cat([lg[:, :, :1], s_lg], 2), lg

    def target_bins_u() -> torch.Tensor:  # u in the target's bins, drawn per sequence in order
        u = torch.empty(B, W, k, device=dev)
        for b, n in enumerate(counts):
            ub = _u_in_bins(*_bins(sampling_probs(teacher[b, :n], T, c.top_k, c.top_p), targets[b, :n]),
                            cfg.beta, gen)
            u[b] = torch.cat([ub, ub[-1:].expand(W - n, k)]) if n < W else ub
        return u

    if T == 0:
        u = torch.full((B, W, k), 0.5, device=dev)
    elif cfg.mode == "distill":
        u = target_bins_u()
    else:
        u = torch.full((B, W, k), 0.5, device=dev)
        with torch.no_grad():
            for j in range(k):  # slot j's conditional depends on u_0..u_{j-1} only
                pj = sampling_probs(slot_logits(u)[0][:, :, j], T, c.top_k, c.top_p)
                u[:, :, j] = _u_in_bins(*_bins(pj, targets[:, :, j]), cfg.beta, gen)

    logits, own = slot_logits(u)
    with torch.no_grad():
        if cfg.mode == "teacher-free" and T > 0:
            # The u's above sit in the student's own bins, so the student picks the data tokens
            # by construction. What decoding sees is u in the *target's* bins (coupled
            # verification accepts iff the student picks what Pick(u, P_target) picks): measure
            # the metrics there, with one more no-grad slot pass.
            u_eval = target_bins_u()
            eval_logits = slot_logits(u_eval)[0]
        else:
            u_eval, eval_logits = u, logits
        hit = (model.slot_tokens(eval_logits, u_eval) == targets).float()  # [B, W, k]

    def slot_loss(lb: torch.Tensor, tb: torch.Tensor, teacher_b: torch.Tensor) -> torch.Tensor:
        return ptp_slot_loss(c.variant, cfg.mode, T, lb, tb, teacher_b)

    for b, n in enumerate(counts):
        tb = targets[b, :n]
        loss = slot_loss(logits[b, :n], tb, teacher[b, :n])
        if own is not None:  # the sampler's slots' own LM-head output learns the same targets (as masked-input)
            loss = loss + slot_loss(own[b, :n, 1:], tb[:, 1:], teacher[b, :n, 1:])
        hb = hit[b, :n]
        # accepted-prefix length a drafter would get from these windows (greedy chain); with a
        # sampler head, of slots 1.. after the verified token (slot 0's own pick is never drafted,
        # and slot j conditions on the true token before it)
        prefix = (hb[:, 1:] if own is not None else hb).cumprod(dim=1).sum(dim=1).mean()
        results[live[b]] = (loss, {"acc": hb.mean(0).tolist(), "prefix": float(prefix)})
    return results


def sequence_loss(model: PTPModel, seq: Sequence, cfg: TrainConfig, gen: torch.Generator,
                  rng: random.Random) -> Optional[tuple[torch.Tensor, dict]]:
    """Loss of one sequence's packed windows (``None`` if the answer is shorter than k)."""
    return batch_loss(model, [seq], cfg, gen, rng)[0]


def train(model, seqs: list[Sequence], cfg: TrainConfig, out_dir: str,
          extra_meta: Optional[dict] = None, resume: bool = True, progress: bool = True,
          loss_fn=None, batch_loss_fn=None) -> dict:
    """Train ``model``'s adapter on ``seqs``; checkpoints to ``out_dir``; returns the last metrics.

    ``loss_fn(model, seq, cfg, gen, rng) -> (loss, metrics) | None`` is one sequence's loss
    (default :func:`sequence_loss`, PTP); the masked-input drafter and the MTP heads plug in
    their own (``python/ptp/train/mtp.py``). ``batch_loss_fn(model, seqs, cfg, gen, rng)`` is the
    same for a list of sequences at once (a list of results), used ``cfg.micro_batch`` sequences
    per call (default :func:`batch_loss`, or ``loss_fn`` on each sequence). Either way the step's
    gradient is the mean over ``seqs_per_step`` sequences of their own losses. ``model`` needs
    ``trainable_parameters``, ``adapter_state_dict``/``load_adapter_state_dict`` and ``config``.
    """
    if cfg.micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {cfg.micro_batch}")
    if batch_loss_fn is None:
        if loss_fn is None:
            batch_loss_fn = batch_loss
        else:
            def batch_loss_fn(m, ss, c, g, r, _one=loss_fn):
                return [_one(m, s, c, g, r) for s in ss]
    from tqdm.auto import tqdm

    start_time = time.time()
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_scheduler(opt, cfg.lr_schedule, cfg.warmup, cfg.steps)
    step, rng, gen = 0, random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    state_path = os.path.join(out_dir, TRAINER_STATE)
    if resume and os.path.exists(state_path):
        from safetensors.torch import load_file

        st = torch.load(state_path, weights_only=False)
        model.load_adapter_state_dict({k: v.to(cfg.device) for k, v in
                                       load_file(os.path.join(out_dir, "adapter.safetensors")).items()})
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = st["step"]
        rng.setstate(st["rng"])
        gen.set_state(st["gen"])
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("ptp", "__main__.py")):
        argv[0] = "python -m ptp"  # what the user typed, not the module's path on this machine
    meta = {"train": asdict(cfg), "command": " ".join(argv), **(extra_meta or {})}

    def checkpoint(metrics: dict) -> None:
        save_adapter(model, out_dir, {**meta, "step": step, "metrics": metrics},
                     dtype=getattr(torch, cfg.save_dtype))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "rng": rng.getstate(), "gen": gen.get_state()}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    model.train()
    order: list[int] = []
    ema: dict = {}
    desc = getattr(model, "DRAFTER_TYPE", "ptp") + " " + str(getattr(model.config, "variant", "")) + " " + cfg.mode
    bar = tqdm(total=cfg.steps, initial=step, desc=desc,
               disable=not progress, mininterval=5.0)
    while step < cfg.steps:
        if cfg.max_minutes and time.time() - start_time > 60 * cfg.max_minutes:
            break
        opt.zero_grad(set_to_none=True)
        n = 0
        while n < cfg.seqs_per_step:
            picked = []
            for _ in range(min(cfg.micro_batch, cfg.seqs_per_step - n)):
                if not order:
                    order = list(range(len(seqs)))
                    rng.shuffle(order)
                picked.append(seqs[order.pop()])
            valid = [r for r in batch_loss_fn(model, picked, cfg, gen, rng) if r is not None]
            if not valid:
                continue
            (sum(loss for loss, _ in valid) / cfg.seqs_per_step).backward()
            for loss, m in valid:
                n += 1
                scalars = {"loss": float(loss.detach())}
                scalars.update({key: float(v) for key, v in m.items() if key != "acc"})
                if "acc" in m:
                    scalars.update({"acc0": m["acc"][0], "accK": m["acc"][-1]})
                for key, v in scalars.items():
                    ema[key] = v if key not in ema else 0.95 * ema[key] + 0.05 * v
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
        if step % cfg.save_every == 0:
            checkpoint(ema)
            if not progress:
                print(f"step {step} {(time.time() - start_time) / 60:.1f} min "
                      + " ".join(f"{k} {v:.3f}" for k, v in ema.items()), flush=True)
    bar.close()
    checkpoint(ema)
    model.eval()
    return {**ema, "step": step, "minutes": (time.time() - start_time) / 60}
