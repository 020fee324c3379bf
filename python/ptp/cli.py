"""The ``ptp`` command line (``ptp`` console script and ``python -m ptp``).

    ptp generate [--model M] [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16] [--drafter auto|NAME_OR_PATH|none] [--drafter-option KEY=VALUE ...]
                 [--prompt TEXT | --prompts FILE.jsonl] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                 [--batch-size B] [--json OUT]

``--drafter auto`` (the default) drafts with the shipped PTP adapter for SmolLM2-135M-Instruct
(``ptp``, with the preset of the device: ``ptp.drafters.ptp_drafter.PRESETS``), or by prompt lookup
for a model it does not fit. ``--prompts`` reads Spec-Bench's JSONL (``question_id``, ``category``, ``turns``); the first turn
is the user message, wrapped in the tokenizer's chat template. Text goes to stdout (streamed for a
single prompt); tokens/s, mean accepted tokens per target call and target calls go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptp", description="ptp: exact speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (plain or speculative, always exact)")
    gen.add_argument("--model", default="smollm2",
                     help="'smollm2' (default: SmolLM2-135M-Instruct), a .gguf file, or a from_pretrained "
                          "name/path")
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the target and the drafter)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="the target's weights and activations")
    gen.add_argument("--drafter", default="auto",
                     help="registered drafter name (none, lookup, ptp, cptp, mtp, heads), checkpoint directory, "
                          "or auto (default): the shipped PTP drafter (ptp) when it fits the model "
                          "(SmolLM2-135M-Instruct), else prompt lookup. ptp / cptp without --drafter-option "
                          "take the device's preset (preset=cpu|gpu)")
    gen.add_argument("--drafter-option", action="append", default=[], metavar="KEY=VALUE",
                     help="drafter option (repeatable), e.g. scheme=linear, num_slots=4, tree=1")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--prompts", help="Spec-Bench JSONL file (first turn of each question)")
    gen.add_argument("--limit", type=int, default=None, help="first N questions of --prompts")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--max-draft-nodes", type=int, default=64,
                     help="cap on draft nodes a step verifies (big trees with long lookup paths need more)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", dest="json_out", help="write results as JSON to this file")
    gen.add_argument("--row-invariant", action=argparse.BooleanOptionalAction, default=None,
                     help="run the target's linear layers through ptp_ext's invariant_linear in the "
                          "decoding calls, so a token's logits do not depend on the draft size "
                          "(bitwise; default: on for CPU models)")

    bench = sub.add_parser("bench-kernels", help="CPU microbenchmarks of the ptp_ext ops")
    bench.add_argument("--quick", action="store_true", help="a few shapes only")

    from .train.cli import add_train_parsers

    add_train_parsers(sub)
    return parser


def read_specbench(path: str, limit: int | None = None) -> list[dict]:
    """Spec-Bench questions: ``{"question_id", "category", "turns": [...]}`` per line."""
    questions = []
    with open(path) as f:
        for line in f:
            if line.strip():
                questions.append(json.loads(line))
            if limit is not None and len(questions) >= limit:
                break
    return questions


def chat_prompt_ids(tokenizer, user_message: str) -> list[int]:
    """The user message wrapped in the tokenizer's chat template, as token ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(sorted(set(ids)))


def _drafter_options(items: list[str]) -> dict:
    from .drafters.base import option_value

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--drafter-option needs KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = option_value(value)
    return out


def resolve_drafter(name: str, options: dict, model) -> tuple[str, dict]:
    """The drafter ``ptp generate`` builds: ``auto`` is the shipped PTP drafter when its adapter
    fits ``model`` (else prompt lookup, with a note on stderr); ``ptp`` / ``cptp`` with no options
    take the preset of the model's device (``preset=cpu`` or ``gpu``)."""
    from .drafters.ptp_drafter import adapter_mismatch, device_preset

    if name == "auto":
        why = adapter_mismatch(model)
        if why is not None:
            print(f"[ptp] the shipped PTP drafter does not fit this model ({why}): drafting by prompt "
                  f"lookup (train a PTP drafter for it with `ptp train ptp`)", file=sys.stderr)
            return "lookup", options
        name = "ptp"
    if name in ("ptp", "cptp") and not options:
        options = {"preset": device_preset(model)}
    return name, options


def describe_drafter(name: str, options: dict) -> str:
    if not options:
        return name
    return name + " " + ",".join(f"{k}={v}" for k, v in options.items())


def _generate(args) -> int:
    from .decoder import Decoder, GenerationConfig
    from .drafters import make_drafter
    from .models import load_target, parse_dtype, resolve_device
    from .sampling import SamplingConfig

    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    if args.prompt is not None:
        questions = [{"question_id": 0, "category": "prompt", "turns": [args.prompt]}]
    else:
        questions = read_specbench(args.prompts, args.limit)
    try:
        device = resolve_device(args.device)
        model, tokenizer = load_target(args.model, dtype=parse_dtype(args.dtype), device=device)
        name, options = resolve_drafter(args.drafter, _drafter_options(args.drafter_option), model)
        drafter = make_drafter(name, model, tokenizer, **options)
    except (FileNotFoundError, ValueError, TypeError) as e:  # bad --model/--drafter/--device: a message, no trace
        raise SystemExit(f"ptp generate: error: {e}")
    row_invariant = args.row_invariant if args.row_invariant is not None else device.type == "cpu"
    if args.dtype != "float32" and name != "none" and not row_invariant:
        print(f"[ptp] warning: --dtype {args.dtype} without row-invariant calls: the target's logits "
              f"change with the number of rows in a call (other kernels, other rounding at "
              f"{args.dtype}), so a near-tie can resolve differently than in plain decoding and the "
              f"text can differ from --drafter none; float32 (or a CPU model with --row-invariant, "
              f"the CPU default) is token-identical", file=sys.stderr)
    decoder = Decoder(model, tokenizer, drafter)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed),
        eos_token_ids=eos_ids(model, tokenizer), stop_strings=tuple(args.stop),
        row_invariant=args.row_invariant, max_draft_nodes=args.max_draft_nodes)
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in questions]

    streamed: dict[int, list[int]] = {}
    printed: dict[int, int] = {}

    def stream(i: int, new: list[int]) -> None:  # single prompt: print text as it is accepted
        ids = streamed.setdefault(i, [])
        ids.extend(new)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            sys.stdout.write(text[printed.get(i, 0):])
            sys.stdout.flush()
            printed[i] = len(text)

    single = len(questions) == 1
    results = []
    start = time.perf_counter()
    for lo in range(0, len(prompts), args.batch_size):
        batch = range(lo, min(lo + args.batch_size, len(prompts)))
        out = decoder.generate([prompts[i] for i in batch], config, sequence_ids=list(batch),
                               on_tokens=stream if single else None)
        for i, r in zip(batch, out):
            q = questions[i]
            if single:
                sys.stdout.write("\n")
            else:
                print(f"--- [{q['question_id']}] {q.get('category', '')}")
                print(tokenizer.decode(r.new_token_ids, skip_special_tokens=True))
            results.append({"question_id": q["question_id"], "category": q.get("category"),
                            "prompt_tokens": r.prompt_tokens, "new_token_ids": r.new_token_ids,
                            "target_calls": r.target_calls, "seconds": round(r.seconds, 4)})
    elapsed = time.perf_counter() - start
    new_tokens = sum(len(r["new_token_ids"]) for r in results)
    calls = sum(r["target_calls"] for r in results)
    print(f"[ptp] {new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s, "
          f"{new_tokens / max(calls, 1):.2f} accepted tokens per target call, "
          f"{calls} target calls (drafter {describe_drafter(name, options)})", file=sys.stderr)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "drafter": name,
                       "temperature": args.temperature, "seed": args.seed, "results": results}, f)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench-kernels":
        import runpy

        sys.argv = ["bench"] + (["--quick"] if args.quick else [])
        runpy.run_module("benchmarks.run_all", run_name="__main__")
        return 0
    if args.command == "train":
        from .train.cli import run_train

        return run_train(args)
    return 2
