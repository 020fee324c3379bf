"""Standalone GPU correctness sweep of ptp_ext.verify_tree against the reference.

    PYTHONPATH=$PWD:$PWD/python python benchmarks/check_verify_cuda.py

Prints PASS/FAIL per case (rows whose sampled decisions lie within 1e-5 of a boundary are
skipped and counted, see tests/test_verify.py), then checks determinism and that a row's token
does not depend on the batch (B = 1 vs batched). Exit 1 on any failure, 0 when all pass;
"skipped" and exit 0 without a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import traceback

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU")
        return 0
    import ptp_ext

    if not ptp_ext.with_cuda():
        print("FAIL: ptp_ext was built without CUDA")
        return 1
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "test_verify", os.path.join(here, "..", "tests", "test_verify.py"))
    tv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tv)
    from benchmarks.bench_verify import make_verify_inputs

    failures = 0
    cases = []
    for mode in tv.MODES:
        for dtype in tv.DTYPES:
            for vocab in (111, 1000, 32000, 49152, 128256):
                for i, (t, k, p) in enumerate(tv._sampling_for(mode)):
                    cases.append((mode, dtype, vocab, i, t, k, p))
    for mode, dtype, vocab, i, t, k, p in cases:
        batch, nodes = (8, 9) if vocab <= 1000 else (4, 7)
        name = f"{mode:9s} {str(dtype)[6:]:8s} V={vocab:6d} t={t} k={k} p={p}"
        try:
            inp = make_verify_inputs(batch, nodes, vocab, dtype, mode, t, k, p,
                                     kinds=("chain", "tree", "ragged", "wide", "root"),
                                     seed=1000 * i + vocab, device="cuda",
                                     uniform_dtype=[torch.float32, torch.float64][i % 2])
            outs = ptp_ext.verify_tree(*inp.args())
            torch.cuda.synchronize()
            skipped = tv.assert_matches_reference(inp, outs)
            again = ptp_ext.verify_tree(*inp.args())
            assert all(torch.equal(a, b) for a, b in zip(outs, again)), "not deterministic"
            one = [ptp_ext.verify_tree(*[a[b:b + 1].contiguous() if torch.is_tensor(a) else a
                                         for a in inp.args()]) for b in range(batch)]
            for j, o in enumerate(("num_accepted", "accepted_nodes", "next_token")):
                assert torch.equal(torch.cat([x[j] for x in one]), outs[j]), f"B=1 {o} differs"
            print(f"PASS {name} (boundary rows skipped: {skipped})", flush=True)
        except Exception as e:  # noqa: BLE001 - report every case
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=2)
    # big batch, graph capture
    try:
        inp = make_verify_inputs(64, 64, 128256, torch.bfloat16, "coupled", 0.7, 0, 0.9,
                                 kinds=("tree", "wide"), seed=3, device="cuda")
        outs = ptp_ext.verify_tree(*inp.args())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            gouts = ptp_ext.verify_tree(*inp.args())
        g.replay()
        g.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, gouts)), "graph replay differs"
        print("PASS B=64 N+1=64 V=128256 eager == CUDA-graph replay")
    except Exception as e:  # noqa: BLE001
        failures += 1
        print(f"FAIL graph replay: {type(e).__name__}: {e}")
    print(f"{len(cases) + 1 - failures}/{len(cases) + 1} passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
