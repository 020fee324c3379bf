"""Timing helpers shared by the benchmarks.

CPU: ``torch.utils.benchmark.Timer`` medians. GPU: CUDA events around each call after warm-up,
median of many runs, rotating among several input sets so the L2 cache does not flatter, and
optionally CUDA-graph replay to remove launch overhead.
"""
from __future__ import annotations

import platform
import statistics
from typing import Callable, Sequence

import torch
import torch.utils.benchmark as tb


def cpu_median_ms(fn: Callable[[], object], min_run_time: float = 0.5) -> float:
    """Median wall time of ``fn()`` on the CPU in milliseconds."""
    fn()  # warm-up
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return m.blocked_autorange(min_run_time=min_run_time).median * 1e3


def cuda_median_ms(fns: Sequence[Callable[[], object]], warmup: int = 10, iters: int = 100,
                   graph: bool = False) -> float:
    """Median time in milliseconds of one call, rotating through ``fns`` (one per input set, so
    successive calls touch different memory). With ``graph=True`` each fn is captured once in a
    CUDA graph and the replays are timed."""
    fns = list(fns)
    if graph:
        graphs = []
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        for f in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                f()
            graphs.append(g)
        fns = [g.replay for g in graphs]
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus written."""
    n = nbytes // 2
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    ms = cuda_median_ms([lambda: b.copy_(a)], warmup=3, iters=20)
    return 2 * n / (ms * 1e-3) / 1e9


def rotating_copies(make: Callable[[int], object], total_bytes_one: int,
                    min_bytes: int = 256 << 20, max_copies: int = 16) -> list:
    """Enough independent input sets (``make(i)``) that together they exceed ``min_bytes``
    (several times the L2), capped at ``max_copies``."""
    n = max(1, min(max_copies, -(-min_bytes // max(1, total_bytes_one))))
    return [make(i) for i in range(n)]


def machine_line() -> str:
    """One line naming the machine, for result files."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} | {platform.processor() or platform.machine()} | "
            f"{torch.get_num_threads()} threads | torch {torch.__version__} | {dev}")
