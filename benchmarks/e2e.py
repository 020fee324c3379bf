"""End-to-end decoding speed on Spec-Bench dev prompts (first turn, chat template), batch 1.

In one run, on the same model: HF ``generate`` (SDPA), HF prompt-lookup decoding
(``prompt_lookup_num_tokens``), ptp plain (drafter ``none``) and every ptp drafter given in
``--methods`` (``name[:option=value;...]``: lookup chain/tree, ptp quadratic/linear/separate,
masked quadratic/linear, heads chain/tree; options: ``docs/drafter-options.md``; a drafter without a shipped checkpoint is skipped).
Reports tokens/s, mean new tokens per target call (HF: counted with a forward hook), ratios vs HF
greedy, per Spec-Bench category, and checks that every ptp method emits the tokens of ptp plain
(and how many prompts match HF greedy token for token). Writes
``benchmarks/results/<date>-cpu-e2e.md``.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/e2e.py --limit 10 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections import defaultdict
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _default_prompts() -> str:
    for p in (os.path.join(ROOT, "..", "shared", "data", "specbench_dev.jsonl"),
              os.path.join(ROOT, "..", "..", "shared", "data", "specbench_dev.jsonl")):
        if os.path.exists(p):
            return os.path.normpath(p)
    return os.path.join("..", "shared", "data", "specbench_dev.jsonl")  # relative, for the message


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class CallCounter:
    """Counts forward calls of a module (target calls of HF generate)."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def run_hf(model, prompts, max_new, eos, lookup_tokens=None, temperature=0.0, seed=0):
    model.set_attn_implementation("sdpa")
    counter = CallCounter(model)
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([p], device=model.device)
        counter.count = 0
        kw = {"prompt_lookup_num_tokens": lookup_tokens} if lookup_tokens else {}
        if temperature > 0:
            torch.manual_seed(seed + i)
            kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kw.update(do_sample=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 eos_token_id=list(eos), pad_token_id=eos[0], **kw)
        dt = time.perf_counter() - t0
        out.append((seq[0, len(p):].tolist(), counter.count, dt))
    counter.handle.remove()
    return out


def run_ptp(model, tokenizer, drafter, prompts, max_new, eos, temperature=0.0, seed=0, row_invariant=None,
            fast_path=None, max_draft_nodes=64, cuda_graphs=None, decoder=None, first_id=0):
    """Per prompt ``(new_token_ids, target_calls, seconds, decode_seconds, decode_tokens)``:
    decode_* count from the first commit (the prefill's token) on, timed inside the same run.
    ``decoder``: reuse one Decoder (of ``model`` and ``drafter``) across runs, e.g. so that the
    CUDA graphs captured in the warm-up replay in the timed run. Prompt i is sequence
    ``first_id + i`` (its uniform stream when sampling)."""
    from ptp.decode.decoder import Decoder, GenerationConfig
    from ptp.decode.sampling import SamplingConfig

    decoder = decoder if decoder is not None else Decoder(model, tokenizer, drafter)
    cfg = GenerationConfig(max_new, eos_token_ids=tuple(eos),
                           sampling=SamplingConfig(temperature=temperature, seed=seed),
                           row_invariant=row_invariant, fast_path=fast_path, max_draft_nodes=max_draft_nodes,
                           cuda_graphs=cuda_graphs)
    out = []
    for i, p in enumerate(prompts):
        first: list = []  # (time, tokens) of the first commit: the prefill's token

        def on_tokens(_, new, first=first):
            if not first:
                first.append((time.perf_counter(), len(new)))
        t0 = time.perf_counter()
        r = decoder.generate([p], cfg, sequence_ids=[first_id + i], on_tokens=on_tokens)[0]
        t1 = time.perf_counter()
        # decode-only: the calls after the first commit, and the tokens they committed
        t_first, n_first = first[0] if first else (t1, len(r.new_token_ids))
        out.append((r.new_token_ids, r.target_calls, t1 - t0, t1 - t_first,
                    len(r.new_token_ids) - n_first))
    return out


DEFAULT_METHODS = ("hf,hf-pld,none,lookup,lookup:lookup_branches=3,ptp,ptp:scheme=linear,"
                   "ptp:scheme=separate,ptp:preset=cpu,cptp:preset=cpu,masked,masked:scheme=linear,"
                   "masked:max_groups=1;lookup_ngram=1;num_slots=4,heads,heads:tree=1,heads:tree=1;lookup_ngram=1,"
                   "heads:tree=1;lookup_ngram=1;min_prob=0.1")


def select_questions(questions: list, limit: int, how: str = "categories") -> list:
    """``limit`` questions (all when ``limit`` is 0 or too large), in file order.

    ``categories``: round robin over the categories (first question of each category, then the
    second, ...), so every category appears once ``limit`` reaches their number.
    ``stride``: every ``len // limit``-th question."""
    if not limit or limit >= len(questions):
        return list(questions)
    if how == "stride":
        return questions[::len(questions) // limit][:limit]
    if how != "categories":
        raise ValueError(f"unknown selection {how!r}: expected 'categories' or 'stride'")
    by_cat = defaultdict(list)
    for i, q in enumerate(questions):
        by_cat[q.get("category", "?")].append(i)
    picked, rank = [], 0
    while len(picked) < limit:
        for idx in by_cat.values():
            if rank < len(idx) and len(picked) < limit:
                picked.append(idx[rank])
        rank += 1
    return [questions[i] for i in sorted(picked)]


def parse_method(spec: str) -> tuple[str, dict]:
    """``name[:key=value;...]`` -> (drafter name or path, text options: the drafter's option
    dataclass converts them; ``rows``, ``fast`` and ``quant`` are this script's)."""
    from ptp.drafters.options import parse_spec

    return parse_spec(spec)


def row_switch(value) -> "bool | None":
    """``auto`` / ``on`` / ``off`` (also 1/0, true/false) -> None / True / False."""
    v = str(value).lower()
    if v in ("auto", "none"):
        return None
    if v in ("on", "1", "true", "yes"):
        return True
    if v in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"row invariance must be auto, on or off, got {value!r}")


def main(argv=None) -> int:
    import copy

    sys.path.insert(0, os.path.join(ROOT, "python"))
    sys.path.insert(0, ROOT)
    from ptp.cli import chat_prompt_ids, eos_ids, read_specbench
    from ptp.drafters import make_drafter
    from ptp.models import load_target, parse_dtype, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=_default_prompts())
    ap.add_argument("--limit", type=int, default=12, help="questions, spread over the categories")
    ap.add_argument("--select", choices=["categories", "stride"], default="categories",
                    help="categories: round robin over the categories in file order (--limit 13 "
                         "takes one question of each Spec-Bench category); stride: every k-th "
                         "question (the tables recorded before 2026-11-23 19:30)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-lookup-tokens", type=int, default=10)
    ap.add_argument("--max-draft-nodes", type=int, default=64,
                    help="the decoder's cap on draft nodes per step (GenerationConfig.max_draft_nodes)")
    ap.add_argument("--row-invariant", default="auto", choices=["auto", "on", "off"],
                    help="row-invariant decoding calls (invariant_linear; auto: on for CPU); a "
                         "method can override it with the option rows=on|off, e.g. none:rows=off; "
                         "likewise fast=off runs a method's decoding calls through the HF forward "
                         "instead of ptp.decode.fastpath's direct layer loop (default: auto), and "
                         "quant=off its linears through the float32 weights instead of the GGUF "
                         "blocks ptp.decode.quant attached (quant_linear), and graphs=off its "
                         "CUDA decoding calls eagerly instead of from CUDA graphs (ptp.decode.cuda_graphs)")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="comma list of hf, hf-pld, or drafter[:opt=val;...] (';' separates options)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="prompts each ptp method decodes before the timed run (HF: 1); on a GPU "
                         "all of them, so that the timed run replays CUDA graphs captured beforehand")
    ap.add_argument("--stats-json", default=None,
                    help="also write each method's tokens/s, tokens per call and (CUDA graphs) rows "
                         "per call as JSON (benchmarks/gpu_cost_curve.py --e2e-stats reads it)")
    ap.add_argument("--out", default=None, help="markdown file (default benchmarks/results/...)")
    args = ap.parse_args(argv)

    questions = select_questions(read_specbench(args.prompts), args.limit, args.select)
    model, tokenizer = load_target(args.model, dtype=parse_dtype(args.dtype), device=resolve_device(args.device))
    eos = eos_ids(model, tokenizer)
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in questions]
    N, T, seed = args.max_new_tokens, args.temperature, args.seed

    methods, skipped, decoders = {}, [], {}
    for spec in args.methods.split(","):
        if spec == "hf":
            methods["HF generate"] = lambda ps: run_hf(model, ps, N, eos, temperature=T, seed=seed)
        elif spec == "hf-pld":
            methods[f"HF prompt lookup ({args.hf_lookup_tokens})"] = \
                lambda ps: run_hf(model, ps, N, eos, args.hf_lookup_tokens, temperature=T, seed=seed)
        else:
            name, opts = parse_method(spec)
            rows = row_switch(opts.pop("rows", args.row_invariant))
            fast = row_switch(opts.pop("fast", "auto"))
            graphs = row_switch(opts.pop("graphs", "auto"))  # CUDA graphs (auto: on for CUDA models)
            quant = row_switch(opts.pop("quant", "auto"))
            m = copy.deepcopy(model)  # adapters wrap the model's linears: one copy per drafter
            if quant is False:  # the float32 weights instead of the attached GGUF blocks
                from ptp.decode.quant import quantized_weights

                quantized_weights(m).clear()
            try:
                drafter = make_drafter(name, m, tokenizer, **opts)
            except FileNotFoundError as e:
                skipped.append(f"{spec}: {e}")
                continue
            # a checkpoint directory is labelled by its folder name (drafter type in brackets)
            short = spec if not os.path.isdir(name) else \
                f"{os.path.basename(os.path.normpath(name))} [{type(drafter).__name__}]" + spec[len(name):]
            label = "ptp plain" if spec == "none" else f"ptp {short}"
            from ptp.decode.decoder import Decoder

            decoders[label] = Decoder(m, tokenizer, drafter)
            methods[label] = (lambda mm, d, r, f, gr, dec: lambda ps: run_ptp(
                mm, tokenizer, d, ps, N, eos, T, seed, r, f, args.max_draft_nodes, gr, dec))(
                m, drafter, rows, fast, graphs, decoders[label])
    for name, fn in methods.items():  # warm-up (allocator, thread pools, lazy imports, CUDA graphs)
        fn(prompts[:max(args.warmup, 1) if name in decoders else 1])
    results, graph_stats = {}, {}
    for name, fn in methods.items():
        dec = decoders.get(name)
        before = dec.graph_stats() if dec is not None else None
        t0 = time.perf_counter()
        results[name] = fn(prompts)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        after = dec.graph_stats() if dec is not None else None
        if after is not None:  # the timed run's CUDA-graph counters
            graph_stats[name] = {k: v - (before or {}).get(k, 0) for k, v in after.items()}

    ref_name = "ptp plain" if "ptp plain" in results else None
    ref = [r[0] for r in results[ref_name]] if ref_name else None
    exact = {name: (sum(r[0] == x for r, x in zip(res, ref)) if ref else None)
             for name, res in results.items()}

    cats = defaultdict(list)
    for i, q in enumerate(questions):
        cats[q.get("category", "?")].append(i)
    cats["all"] = list(range(len(questions)))

    def stats(name, idx):
        res = [results[name][i] for i in idx]
        toks = sum(len(r[0]) for r in res)
        calls = sum(r[1] for r in res)
        secs = sum(r[2] for r in res)
        return toks / secs, toks / max(calls, 1)

    lines = []
    date = datetime.date.today().isoformat()
    mode = "greedy" if T == 0 else f"temperature {T} (seed {seed})"
    where = "CPU" if model.device.type == "cpu" else torch.cuda.get_device_name(model.device)
    lines.append(f"# End-to-end decoding, {where} ({date}), {mode}\n")
    lines.append("Command: `PYTHONPATH=$PWD:$PWD/python python benchmarks/e2e.py "
                 + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")
    lines.append(f"Machine: {_cpu_name()}, {os.cpu_count()} cores visible, torch "
                 f"{torch.__version__} with {torch.get_num_threads()} threads"
                 + (f", GPU {where}" if model.device.type == "cuda" else "")
                 + f". Model: {args.model} {args.dtype} on {model.device}. {len(prompts)} Spec-Bench dev prompts (first turn, chat template, spread "
                 f"over the categories), {N} new tokens max, {mode}, batch 1. Every method ran in this "
                 f"one process; tokens/s counts each prompt's whole generate call (prefill included).\n")
    if T > 0:
        lines.append("Sampling: HF generate draws from its own RNG (different tokens, same "
                     "distribution); ptp methods use the position-indexed uniforms, so every ptp "
                     "method must emit exactly ptp plain's tokens.\n")
    for s in skipped:
        lines.append(f"Skipped {s}\n")
    names = list(results)
    base_name = names[0]
    lines.append("## All prompts\n")
    lines.append(f"| method | tokens/s | vs {base_name} | tokens per target call | tokens == ptp plain |")
    lines.append("|---|---|---|---|---|")
    base = stats(base_name, cats["all"])[0]
    for name in names:
        tps, tpc = stats(name, cats["all"])
        ex = "-" if exact[name] is None else f"{exact[name]}/{len(prompts)}"
        lines.append(f"| {name} | {tps:.1f} | {tps / base:.2f}x | {tpc:.2f} | {ex} |")
    lines.append(f"\n## Per category (tokens/s, ratio vs {base_name}, tokens per target call)\n")
    lines.append("| category | n | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for cat, idx in sorted(cats.items()):
        if cat == "all":
            continue
        b = stats(base_name, idx)[0]
        cells = []
        for name in names:
            tps, tpc = stats(name, idx)
            cells.append(f"{tps:.1f} ({tps / b:.2f}x, {tpc:.2f})")
        lines.append(f"| {cat} | {len(idx)} | " + " | ".join(cells) + " |")
    if graph_stats:
        lines.append("\n## CUDA graphs (timed run)\n")
        lines.append("| method | target calls | rows per call | bucket rows per call | eager calls | captures |")
        lines.append("|---|---|---|---|---|---|")
        for name, g in graph_stats.items():
            calls = max(g["replays"] + g["eager_calls"], 1)
            lines.append(f"| {name} | {calls} | {g['rows'] / calls:.1f} | {g['bucket_rows'] / calls:.1f} | "
                         f"{g['eager_calls']} | {g['captures']} |")
    if args.stats_json:
        import json

        summary = {}
        for name in names:
            tps, tpc = stats(name, cats["all"])
            entry = {"tokens_per_s": tps, "tokens_per_call": tpc,
                     "exact": exact[name], "prompts": len(prompts)}
            g = graph_stats.get(name)
            if g is not None:
                calls = max(g["replays"] + g["eager_calls"], 1)
                entry.update(rows_per_call=g["rows"] / calls, bucket_rows_per_call=g["bucket_rows"] / calls)
            summary[name] = entry
        with open(args.stats_json, "w") as f:
            json.dump(summary, f, indent=1)
    write_report(lines, args.out or os.path.join(HERE, "results", f"{date}-cpu-e2e.md"))
    return 0


def write_report(lines: list[str], out: Optional[str]) -> None:
    """Print the markdown report and write it to ``out`` (None: print only)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
