"""GPU kernel benchmarks of ptp_ext (issue 5): the bench scripts with ``--device cuda``.

    python benchmarks/kernel_report.py [--quick] [--out benchmarks/results/<date>-<gpu>-kernels.md]

Measures the device-to-device copy bandwidth once (printed, and passed to the scripts as
``PTP_COPY_BANDWIDTH_GBS`` so each reports its fraction of it without measuring again), then runs
the scripts of ``benchmarks/run_all.py``'s ``SCRIPTS`` (tree attention, verify, sampler MLP,
invariant and quant linear; CUDA-event timing, warm-up, medians, ratios to the PyTorch
references: see each script) and
writes a markdown report with date, device, versions and the exact command. Without a GPU it
prints "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.run_all import exit_code, run_scripts, summary_lines, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--out", help="markdown report path")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per script (default: none)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    from benchmarks._timing import copy_bandwidth_gbs, machine_line

    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth_gbs()
    os.environ["PTP_COPY_BANDWIDTH_GBS"] = f"{bw:.1f}"
    try:
        import ptp_ext

        with_cuda = ptp_ext.with_cuda()
    except Exception as e:  # reported, not hidden: the scripts will fail loudly too
        with_cuda = f"import failed: {e}"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                          "clocks.max.mem,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    header = [
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- device: {props.name}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        + (f" ({smi})" if smi else ""),
        f"- machine: {machine_line()}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, ptp_ext.with_cuda() = {with_cuda}",
        f"- measured device-to-device copy bandwidth: **{bw:.0f} GB/s** (read + write)",
        f"- command: `python benchmarks/kernel_report.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
    ]
    print("\n".join(header), flush=True)
    records = run_scripts("cuda", args.quick, timeout=args.timeout)
    print("\n" + "\n".join(summary_lines(records)))
    if args.out:
        write_report(args.out, f"ptp_ext CUDA kernels on {props.name}", records, header)
    return exit_code(records)


if __name__ == "__main__":
    sys.exit(main())
