"""The ``ptp`` command line (``ptp`` console script and ``python -m ptp``)."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench-kernels", help="CPU microbenchmarks of the ptp_ext ops")
    bench.add_argument("--quick", action="store_true", help="a few shapes only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench-kernels":
        import runpy

        sys.argv = ["bench"] + (["--quick"] if args.quick else [])
        runpy.run_module("benchmarks.run_all", run_name="__main__")
        return 0
    return 2
