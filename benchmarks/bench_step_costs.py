"""What a decoding step of 1, 2, ... rows costs against a 1-row step, measured in the decoding
loop itself: the prices the cost-aware lookup drafter (``ptp.drafters.lookup.CPU_CALL_COSTS``)
weighs its draft lengths with.

    python benchmarks/bench_step_costs.py [--per-category 3] [--max-rows 9] [--out results.md]

A drafter drafts chains of 0, 1, ..., max_rows - 1 tokens in turn (token ids the target does
not write, so nearly every step commits one token: the contexts grow as in plain decoding), the
decoder runs its ordinary loop over Spec-Bench dev prompts (greedy), and each step's wall time
(drafting, the target call, verification, commit: from one committed token to the next) is
grouped by the call's rows. Printed: per row count the median step in ms and its ratio to the
1-row median, for prompts under and over 300 tokens, and their mean (the table's candidate).
The tokens are checked against plain decoding (a draft never changes them).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ptp.decode.draft import Draft, DraftRequest, Drafter  # noqa: E402
from ptp.drafters.trees import pack_draft  # noqa: E402

LONG_PROMPT = 300  # prompt tokens from which a prompt counts as long


class CyclingDrafter(Drafter):
    """Drafts chains of 0, 1, ..., ``max_rows - 1`` tokens in turn (``token``, repeated: a token
    the target is not expected to write); ``rows`` records each step's row count (1 + draft)."""

    name = "cycling"

    def __init__(self, max_rows: int, token: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows, self.token = max_rows, token
        self.rows: list[int] = []
        self._k = 0

    def reset(self) -> None:
        self.rows = []
        self._k = 0

    def propose(self, request: DraftRequest) -> Optional[Draft]:
        n = min(self._k % self.max_rows, request.max_nodes)
        self._k += 1
        self.rows.append(1 + n)
        if n == 0:
            return None
        return pack_draft([([0] + [self.token] * n, list(range(-1, n)))])


def step_costs(steps: dict[int, list[float]]) -> dict[int, tuple[float, float]]:
    """Per row count: (median step seconds, ratio to the 1-row median)."""
    if not steps.get(1):
        raise ValueError("no 1-row steps to compare with")
    base = statistics.median(steps[1])
    return {r: (statistics.median(v), statistics.median(v) / base) for r, v in sorted(steps.items()) if v}


def measure(model, tokenizer, prompts: list[list[int]], max_new: int, max_rows: int, token: int,
            long_prompt: int = LONG_PROMPT) -> dict[str, dict[int, list[float]]]:
    """Step wall times per row count, ``{"short": {rows: [s, ...]}, "long": ...}``; raises if a
    prompt's tokens differ from plain decoding's."""
    from ptp.decode.decoder import Decoder, GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new)
    plain = Decoder(model, tokenizer)
    drafter = CyclingDrafter(max_rows, token)
    dec = Decoder(model, tokenizer, drafter)
    out: dict[str, dict[int, list[float]]] = {"short": defaultdict(list), "long": defaultdict(list)}
    dec.generate(prompts[0], GenerationConfig(max_new_tokens=4))  # warm-up (packing, threads)
    for p in prompts:
        stamps: list[float] = []
        got = dec.generate(p, cfg, on_tokens=lambda i, ids: stamps.append(time.perf_counter()))
        if got.new_token_ids != plain.generate(p, cfg).new_token_ids:
            raise AssertionError("a draft changed the tokens")
        # stamps[0]: the prefill's token; the interval i holds step i's draft (rows[i - 1])
        group = out["long" if len(p) >= long_prompt else "short"]
        for i in range(1, len(stamps)):
            group[drafter.rows[i - 1]].append(stamps[i] - stamps[i - 1])
    return out


def report(times: dict[str, dict[int, list[float]]], max_rows: int) -> list[str]:
    costs = {k: step_costs(v) for k, v in times.items() if v.get(1)}
    lines = ["| rows | " + " | ".join(f"{k}: ms, x 1 row (steps)" for k in costs) + " | mean ratio |",
             "|---:|" + "---:|" * (len(costs) + 1)]
    for r in range(1, max_rows + 1):
        cells, ratios = [], []
        for k, c in costs.items():
            if r in c:
                cells.append(f"{c[r][0] * 1e3:.2f}, {c[r][1]:.3f} ({len(times[k][r])})")
                ratios.append(c[r][1])
            else:
                cells.append("-")
        mean = f"{statistics.mean(ratios):.3f}" if ratios else "-"
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def main(argv=None) -> int:
    from benchmarks.e2e import _cpu_name, _default_prompts, write_report
    from benchmarks.vs_llamacpp import per_category

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default=None, help="Spec-Bench JSONL (default: the dev prompts)")
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-rows", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if min(args.per_category, args.max_new_tokens, args.max_rows, args.threads) < 1:
        ap.error("--per-category, --max-new-tokens, --max-rows and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    from ptp.cli import chat_prompt_ids, read_specbench
    from ptp.models import load_target

    model, tok = load_target("smollm2")
    questions = per_category(read_specbench(args.prompts or _default_prompts()), args.per_category)
    prompts = [chat_prompt_ids(tok, q["turns"][0]) for q in questions]
    load = os.getloadavg()[0]
    times = measure(model, tok, prompts, args.max_new_tokens, args.max_rows, token=tok.eos_token_id or 0)
    lines = [f"# Decoding-step cost per row count, CPU ({datetime.date.today().isoformat()})", "",
             f"Command: `python benchmarks/bench_step_costs.py --per-category {args.per_category} "
             f"--max-rows {args.max_rows} --threads {args.threads}`", "",
             f"Machine: {_cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; load average "
             f"{load:.2f} before, {os.getloadavg()[0]:.2f} after; torch {torch.__version__}, Python "
             f"{platform.python_version()}. SmolLM2-135M-Instruct (Q4_1 GGUF blocks, native decoding "
             f"step), {len(prompts)} Spec-Bench dev prompts, {args.max_new_tokens} new tokens, greedy; "
             f"drafts of 0..{args.max_rows - 1} tokens in turn, rejected; each step from one committed "
             f"token to the next (draft, call, verify, commit); prompts under / from {LONG_PROMPT} "
             f"tokens. Tokens equal plain decoding's on every prompt.", ""] + report(times, args.max_rows)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
