"""ptp against llama.cpp on the same GGUF, the same prompts and token counts, the same threads.

The CPU peer of ptp is llama.cpp running ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the file ptp's
default model is loaded from). In one process and one run, for every selected Spec-Bench dev
prompt (first turn, chat template; the same token ids for both, the GGUF carries the vocabulary):

* ptp plain (drafter ``none``) and the ptp methods of ``--methods`` (default: prompt lookup with
  fixed 4-token chains, the default drafter ``auto`` -- cost-aware lookup on a CPU -- and the PTP
  adapter with its CPU preset), each checked token-for-token against ptp plain;
* llama.cpp (llama-cpp-python's ``Llama.eval`` loop, greedy argmax over its logits) generating
  exactly as many tokens as ptp plain did for that prompt, EOS ignored: llama.cpp rounds the
  activations of its quantised matmuls to 8 bits, so its text differs from float32 decoding and
  the comparison is of speed at equal token counts, not of text;
* ``llama-bench -p 0 -n 128`` (tg128, llama.cpp's own loop without any Python) when the binary
  is found (``--llama-bench PATH`` or on ``PATH``): from an empty context (tg128, at four points
  spread over the run) and at every prompt's depth (``-d``: the prompt's token count), so that ptp's decoding of a prompt is
  compared with llama.cpp's own loop decoding after a context of the same length (attention over
  a longer context costs both engines: llama-bench's tg128 is 147 tok/s at depth 0, 107 at 512).

Timing: tokens/s over each prompt's whole generation (prefill included) and, for the headline
ratio, decode-only tokens/s (from the first committed token, the prefill's, to the end, timed
inside the same run; llama.cpp: its ``eval`` calls after the prompt's). ``--temperature 0.7``
runs ptp with coupled sampling (each method checked against plain sampling with the same
uniforms); llama.cpp stays greedy. With 2 threads on a 2-core machine llama.cpp spin-waits: the script records the load
average before it starts and refuses to run above ``--max-load`` (an idle machine is the only
fair one). Writes a table per Spec-Bench category to ``benchmarks/results/<date>-cpu-vs-llamacpp.md``.

Without llama-cpp-python it prints why and exits 0 (nothing measured, nothing written). Install:
``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`` (builds llama.cpp from source,
about 10 minutes on 2 cores; add ``-DLLAMA_BUILD_TOOLS=ON`` for llama-bench).

    PYTHONPATH=$PWD:$PWD/python python benchmarks/vs_llamacpp.py --per-category 3 --max-new-tokens 128
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

INSTALL_HINT = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python'


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def find_llama_bench(path: Optional[str]) -> Optional[str]:
    """The llama-bench binary: ``path`` if given, else on PATH or beside llama_cpp's libraries."""
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SystemExit(f"--llama-bench {path}: not an executable file")
        return path
    found = shutil.which("llama-bench")
    if found:
        return found
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.submodule_search_locations:
        for root, _, files in os.walk(spec.submodule_search_locations[0]):
            if "llama-bench" in files:
                return os.path.join(root, "llama-bench")
    return None


def per_category(questions: list, per_cat: int) -> list:
    """The first ``per_cat`` questions of every category, in file order."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for q in questions:
        c = q.get("category", "?")
        if seen[c] < per_cat:
            seen[c] += 1
            out.append(q)
    return out


def llama_bench_tg(binary: str, gguf: str, threads: int, n: int = 128) -> Optional[float]:
    """llama-bench's tg``n`` tokens/s (mean over its repetitions), or None if it failed."""
    cmd = [binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(n), "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
        rows = json.loads(out)
        return float(rows[0]["avg_ts"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError, OSError) as e:
        print(f"llama-bench failed: {e}", file=sys.stderr)
        return None


def llama_bench_depths(binary: str, gguf: str, threads: int, depths: list[int], n: int = 128,
                       reps: int = 2) -> Optional[dict[int, float]]:
    """{depth: llama-bench tg``n`` tokens/s after a context of ``depth`` tokens} (one llama-bench
    run over all the depths, ``reps`` repetitions each), or None if it failed."""
    uniq = sorted(set(depths))
    cmd = [binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(n), "-r", str(reps),
           "-d", ",".join(map(str, uniq)), "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True).stdout
        got = {int(r["n_depth"]): float(r["avg_ts"]) for r in json.loads(out)}
    except (subprocess.SubprocessError, ValueError, KeyError, TypeError, OSError) as e:
        print(f"llama-bench -d failed: {e}", file=sys.stderr)
        return None
    if set(got) != set(uniq):
        print(f"llama-bench -d: missing depths {sorted(set(uniq) - set(got))}", file=sys.stderr)
        return None
    return got


def run_llama(llm, prompt: list[int], n: int) -> tuple[float, float]:
    """Greedy decode exactly ``n`` tokens after ``prompt``; returns (prefill s, decode s)."""
    import llama_cpp
    import numpy as np

    def last_logits():  # the last evaluated token's logits, read in place (no copy)
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(last_logits()))])
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=None, help="Spec-Bench JSONL (default: the dev file)")
    ap.add_argument("--per-category", type=int, default=3, help="prompts per Spec-Bench category")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="threads for both (torch and llama.cpp)")
    ap.add_argument("--methods", default="lookup:row_cost=0,auto,ptp:preset=cpu",
                    help="ptp drafters besides plain, comma separated (name[:k=v;...])")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="ptp's sampling temperature (0: greedy; else coupled sampling, seed 0, "
                         "each method checked token-for-token against plain sampling with the "
                         "same uniforms); llama.cpp stays greedy (its speed does not depend on it)")
    ap.add_argument("--llama-bench", default=None, help="path of the llama-bench binary")
    ap.add_argument("--bench-reps", type=int, default=2,
                    help="llama-bench repetitions per prompt depth")
    ap.add_argument("--max-load", type=float, default=0.5,
                    help="refuse to run when the 1-minute load average is above this")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.temperature < 0:
        raise SystemExit("--temperature must be >= 0")
    if min(args.per_category, args.max_new_tokens, args.threads, args.bench_reps) < 1:
        raise SystemExit("--per-category, --max-new-tokens, --threads and --bench-reps must be >= 1")
    if not llama_cpp_available():
        print(f"vs_llamacpp: skipped: llama-cpp-python is not installed ({INSTALL_HINT})")
        return 0
    load = os.getloadavg()[0]
    if load > args.max_load:
        print(f"vs_llamacpp: load average {load:.2f} > --max-load {args.max_load}: the machine is "
              f"not idle, timings would be meaningless", file=sys.stderr)
        return 3

    sys.path.insert(0, os.path.join(ROOT, "python"))
    sys.path.insert(0, ROOT)
    import torch
    import llama_cpp

    from benchmarks.e2e import _cpu_name, _default_prompts, parse_method, run_ptp, write_report
    from ptp.cli import chat_prompt_ids, eos_ids, read_specbench
    from ptp.drafters import make_drafter
    from ptp.models import _GGUF_FILE, load_target, smollm2_gguf_dir

    torch.set_num_threads(args.threads)
    gguf = os.path.join(smollm2_gguf_dir(), _GGUF_FILE)
    questions = per_category(read_specbench(args.prompts or _default_prompts()), args.per_category)
    model, tokenizer = load_target("smollm2")
    eos = eos_ids(model, tokenizer)
    prompts = [chat_prompt_ids(tokenizer, q["turns"][0]) for q in questions]
    N = args.max_new_tokens

    methods = {"ptp plain": (make_drafter("none", model, tokenizer), model)}
    for spec in filter(None, args.methods.split(",")):
        name, opts = parse_method(spec.replace(";", ","))
        m = copy.deepcopy(model)  # adapters wrap the model's linears: one copy per drafter
        methods[f"ptp {spec}"] = (make_drafter(name, m, tokenizer, **opts), m)

    llm = llama_cpp.Llama(model_path=gguf, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=4096, verbose=False)
    bench_bin = find_llama_bench(args.llama_bench)

    # Warm-ups, then prompt by prompt every engine in turn (ptp's methods, llama.cpp's loop,
    # llama-bench at the prompt's depth), so that a slow spell of the shared machine hits all of
    # them alike. A short pause between engines lets the other's idle threads stop spinning.
    # ptp's decode time: from the first commit (the prefill's token) to the end, inside each run.
    for label, (drafter, m) in methods.items():
        # a whole first prompt each: with 8-token warm-ups, two greedy runs of 2026-12-08 had one
        # early category at 0.4-0.6x plain for every drafter (each on a fresh copy of the model;
        # plain on the long-resident one), and an in-process A/B of the same prompts had none
        run_ptp(m, tokenizer, drafter, prompts[:1], N, eos, temperature=args.temperature)
    run_llama(llm, prompts[0], 4)
    results = {label: [] for label in methods}
    lcpp = []
    at_depth: Optional[dict[int, float]] = {} if bench_bin else None
    tg_runs: list[float] = []  # tg128 at 4 points spread over the run (it drifts with the VM)
    tg_every = max(1, -(-len(prompts) // 4))
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        if bench_bin and i % tg_every == 0:
            tg = llama_bench_tg(bench_bin, gguf, args.threads)
            tg_runs += [tg] if tg is not None else []
        for label, (drafter, m) in methods.items():
            results[label] += run_ptp(m, tokenizer, drafter, [p], N, eos, temperature=args.temperature,
                                      first_id=i)
            time.sleep(0.05)
        lcpp.append(run_llama(llm, p, len(results["ptp plain"][-1][0])))
        time.sleep(0.05)
        if at_depth is not None and len(p) not in at_depth:
            got = llama_bench_depths(bench_bin, gguf, args.threads, [len(p)], N, args.bench_reps)
            at_depth = None if got is None else {**at_depth, **got}
        print(f"prompt {i + 1}/{len(prompts)}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    ref = [r[0] for r in results["ptp plain"]]
    exact = {k: sum(r[0] == x for r, x in zip(v, ref)) for k, v in results.items()}
    tg128 = sum(tg_runs) / len(tg_runs) if tg_runs else None
    load_after = os.getloadavg()[0]

    cats = defaultdict(list)
    for i, q in enumerate(questions):
        cats[q.get("category", "?")].append(i)

    def ptp_stats(label, idx):
        toks = sum(len(results[label][i][0]) for i in idx)
        calls = sum(results[label][i][1] for i in idx)
        secs = sum(results[label][i][2] for i in idx)
        dec = sum(results[label][i][3] for i in idx)
        dec_toks = sum(results[label][i][4] for i in idx)
        return toks / secs, dec_toks / max(dec, 1e-9), toks / max(calls, 1)

    def llama_stats(idx):
        toks = sum(len(ref[i]) for i in idx)
        return toks / sum(sum(lcpp[i]) for i in idx), toks / sum(lcpp[i][1] for i in idx)

    def bench_stats(idx):  # llama-bench at each prompt's depth, as many tokens as ptp plain made
        toks = sum(len(ref[i]) for i in idx)
        return toks / sum(len(ref[i]) / at_depth[len(prompts[i])] for i in idx)

    date = datetime.date.today().isoformat()
    all_idx = list(range(len(prompts)))
    l_e2e, l_dec = llama_stats(all_idx)
    mode = "greedy" if args.temperature == 0 else f"T = {args.temperature:g} (coupled sampling)"
    lines = [f"# ptp vs llama.cpp on the same GGUF, CPU ({date}), ptp {mode}\n",
             "Command: `PYTHONPATH=$PWD:$PWD/python python benchmarks/vs_llamacpp.py "
             + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n",
             f"Machine: {_cpu_name()}, {os.cpu_count()} cores, {args.threads} threads for each "
             f"engine; load average {load:.2f} before, {load_after:.2f} after. torch "
             f"{torch.__version__}; llama-cpp-python {getattr(llama_cpp, '__version__', '?')}. "
             f"Model: SmolLM2-135M-Instruct, `{_GGUF_FILE}` for llama.cpp, the same file "
             f"dequantised to float32 for ptp (its decoding calls read the Q4_1 blocks). "
             f"{len(prompts)} Spec-Bench dev prompts ({args.per_category} per category, first "
             f"turn, chat template), up to {N} new tokens, batch 1.\n",
             "llama.cpp decodes exactly as many tokens as ptp plain did for each prompt (EOS "
             "ignored): it rounds activations to 8 bits in its quantised matmuls, so its tokens "
             "differ from float32 decoding; the comparison is of speed at equal token counts. "
             "`e2e` counts the whole generation (prefill included); `decode` counts from the "
             "first token (the prefill's) on, timed inside the same run (llama.cpp: its `eval` "
             "calls after the prompt's). The engines run prompt by prompt in turn (every ptp "
             "method, llama.cpp's loop, llama-bench at the prompt's depth), so that the shared "
             "machine's slow spells hit them alike.\n"]
    if tg128 is not None:
        lines.append(f"llama-bench `-t {args.threads} -p 0 -n 128`: **{tg128:.1f} tok/s** (tg128: "
                     f"mean of {len(tg_runs)} runs spread over the run, "
                     f"{min(tg_runs):.1f}-{max(tg_runs):.1f}; decoding after an empty context).\n")
    b_dec = bench_stats(all_idx) if at_depth else None
    if b_dec is not None:
        lines.append(f"llama-bench at each prompt's depth (`-t {args.threads} -p 0 -n {N} -d "
                     f"<prompt tokens> -r {args.bench_reps}`, weighted by ptp plain's token "
                     f"counts): **{b_dec:.1f} tok/s**. This is llama.cpp's plain decoding at the "
                     f"contexts ptp decodes at; the ratios below use it as the reference.\n")
    lines.append("## All prompts\n")
    lines.append("| engine | e2e tok/s | decode tok/s | decode vs llama.cpp loop | "
                 + ("decode vs llama-bench (same depths) | " if b_dec else "")
                 + ("decode vs llama-bench tg128 | " if tg128 else "")
                 + "tokens per call | tokens == ptp plain |")
    lines.append("|---|---|---|---|" + ("---|" if b_dec else "") + ("---|" if tg128 else "")
                 + "---|---|")
    if b_dec:
        lines.append(f"| llama-bench (same depths) | - | {b_dec:.1f} | {b_dec / l_dec:.2f}x | 1.00x | "
                     + (f"{b_dec / tg128:.2f}x | " if tg128 else "") + "1.00 | - |")
    lines.append(f"| llama.cpp (Llama.eval loop) | {l_e2e:.1f} | {l_dec:.1f} | 1.00x | "
                 + (f"{l_dec / b_dec:.2f}x | " if b_dec else "")
                 + (f"{l_dec / tg128:.2f}x | " if tg128 else "") + "1.00 | - |")
    for label in results:
        e2e, dec, tpc = ptp_stats(label, all_idx)
        lines.append(f"| {label} | {e2e:.1f} | {dec:.1f} | {dec / l_dec:.2f}x | "
                     + (f"{dec / b_dec:.2f}x | " if b_dec else "")
                     + (f"{dec / tg128:.2f}x | " if tg128 else "")
                     + f"{tpc:.2f} | {exact[label]}/{len(prompts)} |")
    ref_name = "llama-bench at the same depths" if b_dec else "llama.cpp's eval loop"
    lines.append(f"\n## Per category (decode tok/s, ratio vs {ref_name}, tokens per call)\n")
    names = list(results)
    lines.append("| category | n | prompt tokens | llama.cpp loop | "
                 + ("llama-bench | " if b_dec else "") + " | ".join(names) + " |")
    lines.append("|---|---|---|---|" + ("---|" if b_dec else "") + "---|" * len(names))
    for cat, idx in sorted(cats.items()):
        ld = llama_stats(idx)[1]
        bd = bench_stats(idx) if b_dec else None
        base = bd if bd else ld
        cells = []
        for label in names:
            _, dec, tpc = ptp_stats(label, idx)
            cells.append(f"{dec:.1f} ({dec / base:.2f}x, {tpc:.2f})")
        ptoks = sum(len(prompts[i]) for i in idx) / len(idx)
        lines.append(f"| {cat} | {len(idx)} | {ptoks:.0f} | {ld:.1f} | "
                     + (f"{bd:.1f} | " if bd else "") + " | ".join(cells) + " |")
    write_report(lines, args.out or os.path.join(HERE, "results", f"{date}-cpu-vs-llamacpp.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
