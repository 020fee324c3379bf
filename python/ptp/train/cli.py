"""``ptp train {ptp,mtp,heads} ...``: generate the teacher data (cached in the output dir) and train
a drafter (PTP adapter, masked-input drafter, MTP heads) with the shared loop and checkpoints.

Also runnable as ``python -m ptp.train.cli ptp ...`` (same arguments).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ptp.decode.lora import LoRAConfig


def _common(p: argparse.ArgumentParser, windows: int) -> None:
    p.add_argument("--out", required=True, help="checkpoint directory (resumed if it exists)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="teacher sampling temperature of the generated data (0: greedy)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-backend", choices=["auto", "ptp", "hf"], default="auto",
                   help="teacher generation: ptp's own decoder (plain decoding, exact, row-invariant "
                        "on the CPU: 2.1x transformers' generate there), hf (transformers generate), "
                        "auto (ptp on the CPU, hf elsewhere)")
    p.add_argument("--prompt-set", choices=["v2", "v1"], default="v2",
                   help="training prompts (ptp.train.prompts): v2 two-stage varied set, v1 the first 320-template set")
    p.add_argument("--data", default=None,
                   help="data path prefix (default: <out>/data; generated there if missing; another "
                        "drafter's data can be reused)")
    p.add_argument("--text-file", default=None,
                   help="plain text, one document per line, instead of teacher data")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after warm-up: constant, or cosine decay to 10%% of --lr at --steps")
    p.add_argument("--windows", type=int, default=windows, help="windows packed per sequence")
    p.add_argument("--seqs-per-step", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per forward pass (padded); raise it on a GPU, where one sequence "
                        "at a time is launch-bound (results equal up to float rounding)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=0.0, help="wall budget incl. data generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of adapter.safetensors (float16 halves the file)")


def _sampler_args(p: argparse.ArgumentParser, copy_note: str, init_help: str) -> None:
    """``--copy-attn`` and ``--init-from`` of the drafters with a sampler head (ptp, mtp)."""
    p.add_argument("--copy-attn", action=argparse.BooleanOptionalAction, default=False,
                   help="the sampler head also attends over the context's earlier occurrences of the token "
                        "it reads " + copy_note)
    p.add_argument("--init-from", default=None, help=init_help)


def add_train_parsers(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` (sub-commands ``ptp``, ``mtp``, ``heads``) to the main CLI's ``subparsers``."""
    train = subparsers.add_parser("train", help="train drafters")
    sub = train.add_subparsers(dest="train_command", required=True)
    p = sub.add_parser("ptp", help="train a PTP adapter (gated LoRA + u-embedding) for a target")
    _common(p, windows=24)
    p.add_argument("--variant", choices=["optp", "cptp"], default="optp")
    p.add_argument("--mode", choices=["distill", "teacher-free"], default="distill")
    p.add_argument("--slots", type=int, default=8, help="k auxiliary slots per window")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--u-embedding", choices=["interp", "bits"], default="interp")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=False,
                   help="slots 1..k-1 predict through the masked-input drafter's sampler head (reads the "
                        "previous slot's token)")
    _sampler_args(p, "(implies --sampler)",
                  "start from a trained PTP adapter's tensors (sampler / copy tensors it lacks keep their init)")
    m = sub.add_parser("masked", help="train the masked-input drafter (gated LoRA + masks + sampler head)")
    _common(m, windows=24)
    m.add_argument("--masks", type=int, default=8, help="k mask tokens per window")
    m.add_argument("--rank", type=int, default=16)
    m.add_argument("--alpha", type=float, default=32.0)
    m.add_argument("--no-sampler", action="store_true", help="no sampler head (LM head on the masks)")
    m.add_argument("--lcm-weight", type=float, default=1.0, help="latent consistency loss weight")
    _sampler_args(m, "(the copy heads' learned prompt lookup)",
                  "start from this masked-input drafter (a checkpoint directory with the same --masks and "
                  "--rank; with --copy-attn, one without it: the copy parameters start at zero, so training "
                  "starts from that drafter's drafts)")
    m.add_argument("--freeze-adapter", action="store_true",
                   help="train only the sampler head (and its copy attention): the LoRA and the "
                        "masks stay as initialised (use with --init-from); no backward through the target")
    h = sub.add_parser("heads", help="train independent MTP heads (Medusa style) on the frozen target")
    _common(h, windows=16)
    h.add_argument("--heads", type=int, default=4, help="number of heads (tokens t+2 .. t+1+n)")
    h.add_argument("--token-input", action=argparse.BooleanOptionalAction, default=False,
                   help="heads also read the embedding of the committed token t+1")
    h.add_argument("--chain-input", action=argparse.BooleanOptionalAction, default=False,
                   help="head i reads the token t+1+i (the previous head's; Hydra-style sequential "
                        "heads, drafted one depth at a time) instead of t+1; implies --token-input")
    h.add_argument("--copy-attn", action=argparse.BooleanOptionalAction, default=False,
                   help="heads also attend over the context's earlier occurrences of the token they "
                        "read (a learned prompt lookup inside each head); implies --chain-input")
    h.add_argument("--init-from", default=None,
                   help="start from these heads' weights (a checkpoint directory; with --copy-attn, "
                        "chain heads without it: the copy parameters start at zero)")
    h.add_argument("--cached-hidden", action=argparse.BooleanOptionalAction, default=True,
                   help="run the target once over the data and train on its cached hidden states "
                        "(ptp.train.heads; --steps then counts steps of --positions-per-step anchors); "
                        "--no-cached-hidden: the per-sequence loop (--windows, --micro-batch)")
    h.add_argument("--positions-per-step", type=int, default=256, help="anchors per step (cached)")
    h.add_argument("--train-vocab", type=int, default=8192,
                   help="softmax over the N most frequent answer tokens, the draft vocabulary "
                        "decoding uses (cached; 0: full vocabulary)")
    h.add_argument("--holdout", type=int, default=0,
                   help="sequences kept out of training and measured every --eval-every steps (cached)")
    h.add_argument("--eval-every", type=int, default=500,
                   help="held-out check every N steps and at the end (cached; a few seconds each on a CPU)")
    h.add_argument("--weight-decay", type=float, default=0.0)
    h.add_argument("--soft-weight", type=float, default=0.0,
                   help="distillation weight w in [0, 1] (cached hidden states): each head's loss is "
                        "(1-w) CE(data token) + w CE(the target's own distribution of that token)")
    h.add_argument("--soft-topk", type=int, default=32,
                   help="with --soft-weight: the target's distribution as its K most likely tokens, "
                        "computed once per cached row before training (0: the whole distribution, "
                        "recomputed every step)")
    return train


def _sequences(args, base, tok):
    from ptp.train.data import (DataConfig, generate_sequences, load_sequences, resolve_backend, save_sequences,
                                text_sequences)

    data_path = args.data or os.path.join(args.out, "data")
    if args.text_file:
        if not os.path.isfile(args.text_file):
            raise FileNotFoundError(f"--text-file {args.text_file} does not exist")
        with open(args.text_file) as f:
            seqs = text_sequences(tok, [line.strip() for line in f if line.strip()])
        return seqs, {"text_file": os.path.abspath(args.text_file)}
    if not os.path.exists(data_path + ".safetensors"):
        dcfg = DataConfig(num_prompts=args.num_prompts, seed=args.seed, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, batch_size=args.gen_batch, model=args.model,
                          prompt_set=args.prompt_set, backend=resolve_backend(base, args.gen_backend))
        # heads on cached hidden states: the decoder backend records them while it answers
        record = args.train_command == "heads" and args.cached_hidden and dcfg.backend == "ptp"
        seqs, prompts = generate_sequences(base, tok, dcfg, progress=not args.no_progress, record_hidden=record)
        save_sequences(data_path, seqs, dcfg, prompts)
        if record:
            from ptp.train.heads import recorded_hidden, save_hidden

            H, offsets = recorded_hidden(seqs)
            save_hidden(data_path + "-hidden.safetensors", seqs, H, offsets, args.model)
    seqs, meta = load_sequences(data_path)
    return seqs, {"data": meta["config"], "data_tokens": meta["num_tokens"]}


def _init_from(model, ckpt_dir: str, what: str = "heads") -> None:
    """Starts ``model`` from the drafter tensors in ``ckpt_dir`` (same shapes; tensors the
    checkpoint lacks keep their init; the token counts stay this run's data's)."""
    from safetensors.torch import load_file

    path = os.path.join(ckpt_dir, "adapter.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init-from: no {what} checkpoint at {ckpt_dir}")
    dev = next(iter(model.parameters())).device
    state = {k: v.to(dev) for k, v in load_file(path).items()}
    state.pop("token_counts", None)
    try:
        model.load_adapter_state_dict(state, missing_ok=True)
    except ValueError as e:
        raise ValueError(f"--init-from {ckpt_dir}: {e}") from None


def run_train(args: argparse.Namespace) -> int:
    import time

    from ptp.train.data import answer_token_counts
    from ptp.train.models import load_target
    from ptp.train.trainer import TrainConfig, train

    if args.train_command not in ("ptp", "masked", "heads"):
        raise ValueError(f"unknown train command {args.train_command!r}")
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    base, tok = load_target(args.model, device=args.device, dtype=dtype)
    seqs, data_meta = _sequences(args, base, tok)
    # how often each token occurs in the answers: saved with every drafter, it picks the draft vocabulary
    counts = answer_token_counts(seqs, base.get_input_embeddings().weight.shape[0])
    loss_fn, mode = None, "distill"
    if args.train_command == "ptp":
        from ptp.drafters.ptp_model import PTPConfig, PTPModel

        config = PTPConfig(variant=args.variant, num_slots=args.slots, u_embedding=args.u_embedding,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           lora=LoRAConfig(rank=args.rank, alpha=args.alpha), base_model=args.model,
                           sampler=args.sampler or args.copy_attn, copy_attn=args.copy_attn)
        model = PTPModel(base, config)
        model.set_token_counts(counts)
        if args.init_from and not os.path.exists(os.path.join(args.out, "trainer_state.pt")):
            _init_from(model, args.init_from, "PTP adapter")
        mode = args.mode
    elif args.train_command == "masked":
        from ptp.drafters.masked_model import MaskedConfig, MaskedModel
        from ptp.train.masked import masked_batch_loss

        model = MaskedModel(base, MaskedConfig(num_masks=args.masks, lora=LoRAConfig(rank=args.rank, alpha=args.alpha),
                                         sampler=not args.no_sampler, lcm_weight=args.lcm_weight,
                                         base_model=args.model, copy_attn=args.copy_attn))
        model.set_token_counts(counts)
        if args.freeze_adapter and not args.init_from:
            raise ValueError("--freeze-adapter trains only the sampler head on a trained adapter: pass --init-from")
        if args.init_from and not os.path.exists(os.path.join(args.out, "trainer_state.pt")):
            _init_from(model, args.init_from, "masked-input drafter")
        if args.freeze_adapter:
            model.freeze_adapter()
        loss_fn = masked_batch_loss
    else:
        from ptp.drafters.heads_model import HeadsConfig, MTPHeads
        from ptp.train.masked import heads_batch_loss

        model = MTPHeads(base, HeadsConfig(num_heads=args.heads, base_model=args.model,
                                                 token_input=args.token_input,
                                                 chain_input=args.chain_input, copy_attn=args.copy_attn))
        model.set_token_counts(counts)
        if args.init_from and not os.path.exists(os.path.join(args.out, "trainer_state.pt")):
            _init_from(model, args.init_from)
        loss_fn = heads_batch_loss
        if args.cached_hidden:
            from ptp.train.heads import HeadsTrainConfig, load_or_compute_hidden, train_heads_cached

            cache = (os.path.join(args.out, "text-hidden.safetensors") if args.text_file
                     else (args.data or os.path.join(args.out, "data")) + "-hidden.safetensors")
            H, offsets = load_or_compute_hidden(base, seqs, cache, args.model, device=args.device,
                                                progress=not args.no_progress)
            remaining = args.max_minutes - (time.time() - t0) / 60 if args.max_minutes else 0.0
            hcfg = HeadsTrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup,
                                    lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
                                    soft_weight=args.soft_weight, soft_topk=args.soft_topk,
                                    positions_per_step=args.positions_per_step,
                                    train_vocab=args.train_vocab, holdout=args.holdout, seed=args.seed,
                                    save_every=args.save_every, eval_every=args.eval_every,
                                    max_minutes=max(remaining, 0.01) if args.max_minutes else 0.0,
                                    device=args.device, save_dtype=args.save_dtype)
            metrics = train_heads_cached(model, seqs, H, offsets, hcfg, args.out, extra_meta=data_meta,
                                         progress=not args.no_progress)
            print(f"saved {args.out}: {metrics}")
            return 0
    remaining = args.max_minutes - (time.time() - t0) / 60 if args.max_minutes else 0.0
    tcfg = TrainConfig(mode=mode, steps=args.steps, lr=args.lr, warmup=args.warmup,
                       lr_schedule=args.lr_schedule,
                       windows_per_seq=args.windows, seqs_per_step=args.seqs_per_step,
                       micro_batch=args.micro_batch, seed=args.seed,
                       save_every=args.save_every, max_minutes=max(remaining, 0.01) if args.max_minutes else 0.0,
                       device=args.device, bf16=cuda, save_dtype=args.save_dtype)
    metrics = train(model, seqs, tcfg, args.out, extra_meta=data_meta, progress=not args.no_progress,
                    batch_loss_fn=loss_fn)
    print(f"saved {args.out}: {metrics}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptp")
    add_train_parsers(parser.add_subparsers(dest="command", required=True))
    return run_train(parser.parse_args(["train"] + (sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    raise SystemExit(main())
