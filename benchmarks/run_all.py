"""Runs the CPU microbenchmarks of the three ptp_ext ops, one after the other.

    python benchmarks/run_all.py [--quick] [--device cpu|cuda] [--out results.md]

Each ``benchmarks/bench_<op>.py`` script (correctness check, then a table of reference time, ours
and the ratio) runs in its own process with ``--device``; a missing script is reported and
skipped, a failing one makes the exit code non-zero. ``--out`` also writes a markdown report with
the exact command and machine line (for ``benchmarks/results/``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["bench_tree_attention.py", "bench_verify.py", "bench_sampler_mlp.py", "bench_invariant_linear.py",
           "bench_quant_linear.py"]


def child_env() -> dict[str, str]:
    """The scripts import ptp_ext, ptp and benchmarks from a source checkout too."""
    paths = [ROOT, os.path.join(ROOT, "python")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def run_scripts(device: str, quick: bool, extra: list[str] | None = None,
                timeout: float | None = None) -> list[dict]:
    """Runs every bench script, streaming its output; returns one record per script."""
    records = []
    for name in SCRIPTS:
        path = os.path.join(ROOT, "benchmarks", name)
        rec = {"script": name, "status": "", "seconds": 0.0, "output": ""}
        if not os.path.exists(path):
            rec["status"] = "missing"
            print(f"\n### {name}: MISSING (benchmarks/{name} does not exist yet): skipped",
                  flush=True)
            records.append(rec)
            continue
        cmd = [sys.executable, path, "--device", device] + (["--quick"] if quick else [])
        cmd += extra or []
        print(f"\n### {name}\n$ {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        lines = []
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line)
            rc = proc.wait(timeout=timeout)
            rec["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            proc.kill()
            rec["status"] = f"timed out after {timeout:.0f} s"
        rec["seconds"] = time.perf_counter() - t0
        rec["output"] = "".join(lines)
        records.append(rec)
    return records


def summary_lines(records: list[dict]) -> list[str]:
    out = ["| script | status | seconds |", "| --- | --- | --- |"]
    out += [f"| {r['script']} | {r['status']} | {r['seconds']:.1f} |" for r in records]
    return out


def write_report(path: str, title: str, records: list[dict], header: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {title}\n\n")
        f.write("\n".join(header) + "\n\n")
        f.write("\n".join(summary_lines(records)) + "\n")
        for r in records:
            f.write(f"\n## {r['script']} ({r['status']})\n\n")
            if r["output"]:
                f.write("```\n" + r["output"].rstrip() + "\n```\n")
    print(f"\nreport written to {path}")


def exit_code(records: list[dict]) -> int:
    ran = [r for r in records if r["status"] != "missing"]
    if not ran:
        print("ERROR: no benchmark script found (benchmarks/bench_*.py)", file=sys.stderr)
        return 1
    return 0 if all(r["status"] == "ok" for r in ran) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", help="also write a markdown report here")
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, ROOT)
    from benchmarks._timing import machine_line

    print(f"ptp CPU microbenchmarks | {machine_line()}", flush=True)
    records = run_scripts(args.device, args.quick)
    print("\n" + "\n".join(summary_lines(records)))
    if args.out:
        cmd = "python benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_report(args.out, f"ptp_ext microbenchmarks ({args.device})", records, [
            f"- date: {datetime.date.today().isoformat()}",
            f"- machine: {machine_line()}",
            f"- torch: {torch.__version__}",
            f"- command: `{cmd.strip()}`",
        ])
    return exit_code(records)


if __name__ == "__main__":
    sys.exit(main())
