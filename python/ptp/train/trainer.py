"""PTP training loops: distillation (O-PTP / C-PTP) and teacher-free inverse-autoregressive C-PTP.

One step per sequence (``seqs_per_step`` accumulated):

1. *Real pass* (no grad, adapter off): the target over the whole sequence gives its KV cache and
   its conditional at every position (the teacher's distributions, CDF bins for free).
2. *Windows*: ``windows_per_seq`` anchors ``a`` drawn in the answer (``a >= prompt_len``); window
   a's k slots draft tokens ``a .. a+k-1``; u_j is drawn in token ``a+j``'s CDF bin
   (``left + (right-left) * Beta(beta, beta)``; ``0.5`` at temperature 0).
3. *Slot pass* (grad, adapter on the slot rows only): all windows' slots at once against the
   cached context, through the block mask of :func:`ptp.ptp_model.packed_layout`.
4. Loss. O-PTP: cross-entropy on the data token. C-PTP distillation: KL(teacher P_T || student
   P_T) at temperature T (cross-entropy on the data token at T = 0). C-PTP teacher-free: the u's
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
from ptp.ptp_model import PTPModel, crop_cache, packed_layout
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
    beta: float = 0.3
    seed: int = 0
    save_every: int = 100
    max_minutes: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    device: str = "cpu"
    bf16: bool = False  # autocast bf16 (CUDA)
    save_dtype: str = "float32"  # adapter file dtype ("float16" halves it; loading casts back)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant or cosine to 0.1."""
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    f = min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup:
        t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        f = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t))
    return f


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


def sequence_loss(model: PTPModel, seq: Sequence, cfg: TrainConfig, gen: torch.Generator,
                  rng: random.Random) -> Optional[tuple[torch.Tensor, dict]]:
    """Loss of one sequence's packed windows (``None`` if the answer is shorter than k)."""
    c = model.config
    k, dev = c.num_slots, torch.device(cfg.device)
    ids = seq.ids.to(dev).view(1, -1)
    L = ids.shape[1]
    lo, hi = seq.prompt_len, L - k
    if hi < lo:
        return None
    anchors = sorted(rng.sample(range(lo, hi + 1), min(cfg.windows_per_seq, hi - lo + 1)))
    W = len(anchors)
    tgt_idx = torch.tensor(anchors, device=dev).unsqueeze(1) + torch.arange(k, device=dev)  # [W, k]
    targets = ids[0, tgt_idx]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    with torch.no_grad(), amp, model.gate.off():
        out = model.base(ids, use_cache=True)
    cache = output_cache(out)
    teacher = out.logits[0].float()[tgt_idx - 1]  # [W, k, V]: P at position a+j-1 predicts a+j
    del out
    T = c.temperature
    pos, vis = packed_layout(L, 0, anchors, [k] * W, device=dev)

    def slot_logits(u: torch.Tensor) -> torch.Tensor:
        emb = model.slot_embeddings(u).reshape(W * k, -1)
        with amp:
            h, _ = model.packed_forward(ids[:, :0], emb, pos, vis, past_key_values=cache, use_cache=True)
            lg = model.logits(h[0])
        crop_cache(cache, L)
        return lg.float().view(W, k, -1)

    if T == 0:
        u = torch.full((W, k), 0.5, device=dev)
    elif cfg.mode == "distill":
        u = _u_in_bins(*_bins(sampling_probs(teacher, T, c.top_k, c.top_p), targets), cfg.beta, gen)
    elif cfg.mode == "teacher-free":
        if c.variant != "cptp":
            raise ValueError("teacher-free training needs the C-PTP variant")
        u = torch.full((W, k), 0.5, device=dev)
        with torch.no_grad():
            for j in range(k):  # slot j's conditional depends on u_0..u_{j-1} only
                pj = sampling_probs(slot_logits(u)[:, j], T, c.top_k, c.top_p)
                u[:, j] = _u_in_bins(*_bins(pj, targets[:, j]), cfg.beta, gen)
    else:
        raise ValueError(f"mode must be 'distill' or 'teacher-free', got {cfg.mode!r}")

    logits = slot_logits(u)
    if c.variant == "optp" or T == 0 or cfg.mode == "teacher-free":
        scaled = logits if (c.variant == "optp" or T == 0) else logits / T
        loss = F.cross_entropy(scaled.reshape(W * k, -1), targets.reshape(-1))
    else:  # C-PTP distillation: KL(teacher || student) at the sampling temperature
        logp_s = F.log_softmax(logits / T, dim=-1)
        logp_t = F.log_softmax(teacher / T, dim=-1)
        loss = F.kl_div(logp_s.reshape(W * k, -1), logp_t.reshape(W * k, -1), log_target=True,
                        reduction="batchmean")
    with torch.no_grad():
        if cfg.mode == "teacher-free" and T > 0:
            # The u's above sit in the student's own bins, so the student picks the data tokens
            # by construction. What decoding sees is u in the *target's* bins (coupled
            # verification accepts iff the student picks what Pick(u, P_target) picks): measure
            # the metrics there, with one more no-grad slot pass.
            u = _u_in_bins(*_bins(sampling_probs(teacher, T, c.top_k, c.top_p), targets),
                           cfg.beta, gen)
            eval_logits = slot_logits(u)
        else:
            eval_logits = logits
        hit = (model.slot_tokens(eval_logits, u) == targets).float()  # [W, k]
        # accepted-prefix length a drafter would get from these windows (greedy chain)
        prefix = hit.cumprod(dim=1).sum(dim=1).mean()
    return loss, {"acc": hit.mean(0).tolist(), "prefix": float(prefix)}


def train(model, seqs: list[Sequence], cfg: TrainConfig, out_dir: str,
          extra_meta: Optional[dict] = None, resume: bool = True, progress: bool = True,
          loss_fn=None) -> dict:
    """Train ``model``'s adapter on ``seqs``; checkpoints to ``out_dir``; returns the last metrics.

    ``loss_fn(model, seq, cfg, gen, rng) -> (loss, metrics) | None`` is one sequence's loss
    (default :func:`sequence_loss`, PTP); the masked-input drafter and the MTP heads plug in
    their own (``python/ptp/train/mtp.py``). ``model`` needs ``trainable_parameters``,
    ``adapter_state_dict``/``load_adapter_state_dict`` and ``config``.
    """
    loss_fn = loss_fn or sequence_loss
    from tqdm.auto import tqdm

    start_time = time.time()
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_factor(cfg, 0)  # validates cfg.lr_schedule before any work
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
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
    meta = {"train": asdict(cfg), "command": " ".join(sys.argv), **(extra_meta or {})}

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
            if not order:
                order = list(range(len(seqs)))
                rng.shuffle(order)
            res = loss_fn(model, seqs[order.pop()], cfg, gen, rng)
            if res is None:
                continue
            loss, m = res
            (loss / cfg.seqs_per_step).backward()
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
