"""The CUDA verify_tree sweep (was benchmarks/check_verify_cuda.py): every test is marked
``cuda`` and skipped without a GPU; on a GPU with a CPU-only build of ptp_ext it fails.

    pytest -m cuda tests/test_verify_cuda.py

Each case compares the op with the reference (rows whose sampled decisions lie within 1e-5 of a
boundary are skipped and counted, see tests/test_verify.py), checks determinism and that a row's
result does not depend on the batch (B = 1 vs batched); then a CUDA-graph capture at B = 64,
V = 128256, and the invalid-row rule (NaN / inf logits, uniforms outside [0, 1)).
"""
from __future__ import annotations

import pytest
import torch

import ptp_ext
from benchmarks.bench_verify import make_verify_inputs
from test_verify import DTYPES, MODES, _sampling_for, assert_matches_reference, check_invalid_rows

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _cuda_build():
    assert ptp_ext.with_cuda(), "a GPU is present but ptp_ext was built without CUDA"


CASES = [(mode, dtype, vocab, i, t, k, p)
         for mode in MODES for dtype in DTYPES for vocab in (111, 1000, 32000, 49152, 128256)
         for i, (t, k, p) in enumerate(_sampling_for(mode))]


@pytest.mark.parametrize("mode,dtype,vocab,i,t,k,p", CASES,
                         ids=[f"{m}-{str(d)[6:]}-V{v}-t{t}-k{k}-p{p}" for m, d, v, _, t, k, p in CASES])
def test_sweep(mode, dtype, vocab, i, t, k, p):
    batch, nodes = (8, 9) if vocab <= 1000 else (4, 7)
    inp = make_verify_inputs(batch, nodes, vocab, dtype, mode, t, k, p,
                             kinds=("chain", "tree", "ragged", "wide", "root"),
                             seed=1000 * i + vocab, device="cuda",
                             uniform_dtype=[torch.float32, torch.float64][i % 2])
    outs = ptp_ext.verify_tree(*inp.args())
    torch.cuda.synchronize()
    skipped = assert_matches_reference(inp, outs)
    assert skipped <= batch // 2, f"too many boundary rows skipped: {skipped}/{batch}"
    again = ptp_ext.verify_tree(*inp.args())
    assert all(torch.equal(a, b) for a, b in zip(outs, again)), "not deterministic"
    one = [ptp_ext.verify_tree(*[a[b:b + 1].contiguous() if torch.is_tensor(a) else a
                                 for a in inp.args()]) for b in range(batch)]
    for j, name in enumerate(("num_accepted", "accepted_nodes", "next_token")):
        assert torch.equal(torch.cat([x[j] for x in one]), outs[j]), f"B=1 {name} differs"


def test_cuda_graph_replay():
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_invalid_rows(mode, dtype):
    check_invalid_rows(mode, dtype, "cuda")
