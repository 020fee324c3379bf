"""The CUDA tree_attention sweep (was benchmarks/check_tree_attention_cuda.py): every test is
marked ``cuda`` and skipped without a GPU; on a GPU with a CPU-only build of ptp_ext it fails.

    pytest -m cuda tests/test_tree_attention_cuda.py            # ~900 cases
    pytest -m cuda tests/test_tree_attention_cuda.py -k quick     # a subset of the grid

For every case of a grid (dtype x head dim x GQA group x T x batch x tree/causal, with cache
lengths 0, random and S_max - T), the op's output is compared with the float32 reference
(``tree_attention_ref`` on upcast inputs) by flash-attention's rule (error at most twice that of
a low-precision SDPA in the input dtype, ``assert_attention_close``), and its log-sum-exp with the
reference's (-inf exactly where the reference has -inf). Before each call the caching allocator
is poisoned with NaN (unwritten outputs show up) and the cache positions past
``cache_lens[b] + T`` are set to NaN (they must never be read into a result). Extra cases: random
masks with rows that see nothing (out = 0, lse = -inf), int64 cache_lens, head dims the
tensor-core path does not cover, long caches (several key splits), a CUDA-graph capture (the op
must not synchronise), and the non-finite input rules of tests/test_tree_attention.py.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import ptp_ext
from ptp_ext._testing import assert_attention_close, make_attention_inputs
from ptp_ext.reference import tree_attention_ref
from test_tree_attention import DTYPES, check_nonfinite, check_nonfinite_across_splits

pytestmark = pytest.mark.cuda
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _cuda_build():
    assert ptp_ext.with_cuda(), "a GPU is present but ptp_ext was built without CUDA"


def poison_allocator(nbytes_list):
    """Fill freshly allocated blocks with NaN and free them, so the op's outputs (allocated with
    torch.empty through the same caching allocator) start as NaN when the op leaves them unwritten."""
    for n in nbytes_list:
        t = torch.empty(max(1, n // 4), dtype=torch.float32, device="cuda")
        t.fill_(float("nan"))
        del t


def sdpa_lowp(q, k, v, lens, mask, scale):
    """SDPA in the input dtype with an explicit boolean mask: flash-attention's low-precision
    baseline. Rows that see nothing come out NaN from SDPA: set to 0 like the op's contract."""
    B, T, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    pos = torch.arange(S, device=q.device)
    L = lens.long().view(B, 1, 1)
    j = pos.view(1, 1, S) - L  # index among the new tokens
    if mask is None:
        new_vis = j <= torch.arange(T, device=q.device).view(1, T, 1)
    else:
        jj = j.clamp(0, T - 1).expand(B, T, S)
        new_vis = torch.gather(mask, 2, jj)
    vis = (pos.view(1, 1, S) < L) | ((j >= 0) & (j < T) & new_vis)  # [B, T, S]
    kk = k.repeat_interleave(G, dim=1).nan_to_num(0.0)  # the NaN-poisoned tail is masked anyway
    vv = v.repeat_interleave(G, dim=1).nan_to_num(0.0)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=vis.unsqueeze(1),
                                       scale=scale)
    return o.transpose(1, 2).nan_to_num(0.0)


def run_case(q, k, v, lens, mask, scale, graph=False):
    B, T, Hq, D = q.shape
    # NaN past each row's last valid key: the kernel must never let them into a result.
    k = k.clone()
    v = v.clone()
    for b in range(B):
        end = int(lens[b]) + T
        k[b, :, end:] = float("nan")
        v[b, :, end:] = float("nan")
    ref_out, ref_lse = tree_attention_ref(q.float(), k.float(), v.float(), lens, mask, scale)
    low = sdpa_lowp(q, k, v, lens, mask, scale)
    poison_allocator([q.numel() * q.element_size(), B * Hq * T * 4, 64 * B * Hq * T * D * 4])
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ptp_ext.ops.tree_attention(q, k, v, lens, mask, scale, return_lse=True)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out, lse = ptp_ext.ops.tree_attention(q, k, v, lens, mask, scale, return_lse=True)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        g.replay()
    else:
        out, lse = ptp_ext.ops.tree_attention(q, k, v, lens, mask, scale, return_lse=True)
    torch.cuda.synchronize()
    assert out.dtype == q.dtype and out.shape == q.shape, f"out {out.dtype} {tuple(out.shape)}"
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, T), f"lse {tuple(lse.shape)}"
    assert_attention_close(out, ref_out, low)
    ninf_ref = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), ninf_ref), "lse -inf pattern differs from reference"
    fin = ~ninf_ref
    lse_tol = 2e-5 if q.dtype == torch.float32 else 1e-3
    if fin.any():
        err = (lse[fin] - ref_lse[fin]).abs().max().item()
        assert math.isfinite(err) and err <= lse_tol * (1 + ref_lse[fin].abs().max().item()), \
            f"lse error {err:.3g}"
    if ninf_ref.any():  # rows that see nothing: exact zeros
        rows = ninf_ref.permute(0, 2, 1)  # [B, T, Hq]
        assert torch.all(out[rows] == 0), "row that sees nothing has non-zero output"


def make(B, T, Hq, Hkv, D, S, dtype, tree, seed, lens_mode="mixed", lens_dtype=torch.int32):
    a = make_attention_inputs(B, T, Hq, Hkv, D, S, dtype, device="cuda", tree=tree, seed=seed)
    lens = a.cache_lens
    if lens_mode == "zero":
        lens = torch.zeros_like(lens)
    elif lens_mode == "full":
        lens = torch.full_like(lens, S - T)
    return a.query, a.key_cache, a.value_cache, lens.to(lens_dtype), a.tree_mask, a.scale


def _grid():
    """The sweep: (id, make kwargs); ids of the quick subset contain "quick"."""
    cases = []
    slack = [7, 300, 2500]  # S_max - T: short caches, a few tiles, several splits
    product = itertools.product(["fp16", "bf16", "fp32"], [64, 128, 256], [1, 3, 4, 8],
                                [1, 5, 16, 33, 64, 80], [1, 3], [True, False])
    for i, (dt, D, G, T, B, tree) in enumerate(product):
        Hkv = 2
        S = T + slack[i % len(slack)]
        mode = ["mixed", "zero", "full", "mixed"][i % 4]
        quick = " quick" if G in (1, 4) and T in (1, 16, 33, 80) else ""
        cases.append((f"{dt} D={D} G={G} T={T} B={B} S={S} {'tree' if tree else 'causal'} "
                      f"lens={mode}{quick}",
                      dict(B=B, T=T, Hq=G * Hkv, Hkv=Hkv, D=D, S=S, dtype=DTYPE_NAMES[dt],
                           tree=tree, seed=i, lens_mode=mode)))
    # Extras: unusual head dims (CUDA-core path for fp16/bf16 too), int64 lengths, MHA with many
    # heads, a long cache at batch 1 (many splits), big T * G (several row tiles).
    extras = [
        ("fp16 D=96 G=2 T=8", dict(B=3, T=8, Hq=4, Hkv=2, D=96, S=600, dtype=torch.float16)),
        ("bf16 D=40 G=1 T=3", dict(B=2, T=3, Hq=2, Hkv=2, D=40, S=100, dtype=torch.bfloat16)),
        ("fp32 D=72 G=3 T=17", dict(B=2, T=17, Hq=6, Hkv=2, D=72, S=300, dtype=torch.float32)),
        ("fp16 int64 lens", dict(B=3, T=9, Hq=8, Hkv=2, D=128, S=1000, dtype=torch.float16,
                                 lens_dtype=torch.int64)),
        ("bf16 long B=1 T=1 S=20000", dict(B=1, T=1, Hq=32, Hkv=8, D=128, S=20000,
                                          dtype=torch.bfloat16)),
        ("fp16 long B=1 T=64 G=4 S=9000", dict(B=1, T=64, Hq=32, Hkv=8, D=128, S=9000,
                                              dtype=torch.float16)),
        ("bf16 SmolLM T=33 G=3", dict(B=2, T=33, Hq=9, Hkv=3, D=64, S=5000, dtype=torch.bfloat16)),
        ("fp16 MHA B=8 T=8", dict(B=8, T=8, Hq=32, Hkv=32, D=128, S=700, dtype=torch.float16)),
    ]
    for j, (name, kw) in enumerate(extras):
        kw.setdefault("tree", True)
        kw.setdefault("seed", 10_000 + j)
        cases.append((f"extra {name} quick", kw))
    return cases


GRID = _grid()


@pytest.mark.parametrize("kw", [c[1] for c in GRID], ids=[c[0] for c in GRID])
def test_sweep(kw):
    run_case(*make(**kw))


@pytest.mark.parametrize("dt,D,G", list(itertools.product(["fp16", "bf16", "fp32"], [64, 128],
                                                          [1, 4])))
def test_random_mask_with_empty_rows_quick(dt, D, G):
    """Random (non-tree) masks with rows that see nothing (cache_lens = 0): out 0, lse -inf."""
    q, k, v, lens, _, scale = make(3, 12, 2 * G, 2, D, 200, DTYPE_NAMES[dt], True, seed=77)
    lens[0] = 0
    g = torch.Generator(device="cuda").manual_seed(5)
    mask = torch.rand(3, 12, 12, device="cuda", generator=g) < 0.3
    mask[0, 2] = False  # row (b=0, t=2) sees nothing at all
    mask[0, 5] = False
    run_case(q, k, v, lens, mask, scale)


@pytest.mark.parametrize("dt", ["fp16", "bf16"])
def test_cuda_graph_capture_quick(dt):
    """No host sync inside the op: it captures, and the replay gives the right answer."""
    run_case(*make(2, 8, 8, 2, 128, 3000, DTYPE_NAMES[dt], True, seed=3), graph=True)


@pytest.mark.parametrize("head_dim", [32, 64, 128])  # 64, 128: the tensor-core path (fp16/bf16)
@pytest.mark.parametrize("tree", [True, False], ids=["tree", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_inputs_follow_the_reference_quick(dtype, tree, head_dim):
    check_nonfinite(dtype, tree, "cuda", head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_across_key_splits_quick(dtype):
    check_nonfinite_across_splits(dtype, "cuda")
