"""Tests of ptp_ext.verify_tree (CPU and CUDA) against ptp_ext.reference.verify_tree_ref.

Token ids must be exactly equal. The one allowed difference: a sampled decision whose operands
lie within 1e-5 of each other (u at a CDF boundary, u * q(x) against p(x), or top-p's mass-before
against top_p) may go either way when the probabilities differ in the last bits (the CUDA kernel
computes them in another order). Such rows are detected explicitly by replaying the reference's
decisions (``row_margins``) and skipped; everything else is compared exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

import ptp_ext
from benchmarks.bench_verify import VerifyInputs, make_verify_inputs, verify_tree_eager
from ptp_ext.reference import pick, sampling_probs, verify_tree_ref

HAS_CUDA = torch.cuda.is_available() and ptp_ext.with_cuda()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build")
BOUNDARY = 1e-5

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["greedy", "coupled", "rejection"]
# (temperature, top_k, top_p): every value of the grid appears, in varied combinations.
SAMPLING = [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9), (0.7, 50, 0.5),
            (1.3, 1, 0.9), (0.7, 5, 0.9), (1.3, 50, 1.0), (1.0, 0, 0.5)]


def _topp_margin(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> float:
    if top_p >= 1.0 or temperature == 0:
        return math.inf
    p = sampling_probs(logits, temperature, top_k, 1.0)
    sp = torch.sort(p, descending=True, stable=True).values
    before = sp.cumsum(0) - sp
    return float((before.double() - top_p).abs().min())


def _cdf_margin(u: float, probs: torch.Tensor) -> float:
    return float((probs.double().cumsum(0) - u).abs().min())


def row_margins(inp: VerifyInputs) -> torch.Tensor:
    """[B] float64: the smallest distance between the operands of any sampled decision the
    reference takes on its path (inf for argmax-only decisions)."""
    d = inp.to("cpu")
    B, N1, _ = d.target_logits.shape
    out = torch.full((B,), math.inf, dtype=torch.float64)
    if d.mode == "greedy" or d.temperature == 0:
        return out
    for b in range(B):
        c, depth, m = 0, 0, math.inf
        while True:
            children = [j for j in range(1, N1) if int(d.parents[b, j]) == c]
            logits = d.target_logits[b, c]
            m = min(m, _topp_margin(logits, d.temperature, d.top_k, d.top_p))
            P = sampling_probs(logits, d.temperature, d.top_k, d.top_p)
            nxt = None
            if d.mode == "coupled":
                u = float(d.uniforms[b, depth])
                m = min(m, _cdf_margin(u, P))
                t = pick(u, P)
                nxt = next((j for j in children if int(d.draft_tokens[b, j]) == t), None)
            else:
                p = P.double()
                for j in children:
                    x = int(d.draft_tokens[b, j])
                    q = d.draft_probs[b, j].double()
                    lhs, rhs = float(d.uniforms[b, j]) * float(q[x]), float(p[x])
                    m = min(m, abs(lhs - rhs))
                    if lhs < rhs:
                        nxt = j
                        break
                    r = (p - q).clamp_min(0.0)
                    if float(r.sum()) > 0:
                        p = r / r.sum()
                if nxt is None:
                    m = min(m, _cdf_margin(float(d.uniforms[b, 0]), p))
            if nxt is None:
                break
            c, depth = nxt, depth + 1
        out[b] = m
    return out


def assert_matches_reference(inp: VerifyInputs, outs) -> int:
    """Exact comparison on the rows away from sampling boundaries; returns rows skipped."""
    ref = verify_tree_ref(*inp.to("cpu").args())
    ok = row_margins(inp) >= BOUNDARY
    for got, want, name in zip(outs, ref, ("num_accepted", "accepted_nodes", "next_token")):
        got = got.cpu()
        assert got.dtype == torch.long and got.shape == want.shape, name
        assert torch.equal(got[ok], want[ok]), (
            f"{name} differs ({inp.mode} t={inp.temperature} k={inp.top_k} p={inp.top_p}):\n"
            f"got  {got[ok]}\nwant {want[ok]}")
    return int((~ok).sum())


def _sampling_for(mode):
    return SAMPLING[:1] + [(1.0, 5, 0.9)] if mode == "greedy" else SAMPLING


# ---------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [111, 1000, 32000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_against_reference(mode, dtype, vocab):
    batch, nodes = (8, 9) if vocab < 32000 else (4, 7)
    skipped = total = 0
    for i, (t, k, p) in enumerate(_sampling_for(mode)):
        if vocab == 32000 and i % 2:  # keep the big vocab affordable
            continue
        inp = make_verify_inputs(batch, nodes, vocab, dtype, mode, t, k, p,
                                 kinds=("chain", "tree", "ragged", "wide", "root"),
                                 seed=1000 * i + vocab, uniform_dtype=[torch.float32,
                                                                     torch.float64][i % 2])
        skipped += assert_matches_reference(inp, ptp_ext.verify_tree(*inp.args()))
        total += batch
    assert skipped <= total // 10, f"too many boundary rows skipped: {skipped}/{total}"


@pytest.mark.parametrize("mode", MODES)
def test_plain_sampling_is_n0(mode):
    """N = 0 (only the root): the op is the plain sampler, the same draw as the root's."""
    inp = make_verify_inputs(16, 1, 1000, torch.float32, mode, 0.9, 50, 0.9, seed=7)
    num, nodes, tok = ptp_ext.verify_tree(*inp.args())
    assert torch.equal(num, torch.zeros(16, dtype=torch.long))
    assert torch.equal(nodes, torch.zeros(16, 1, dtype=torch.long))
    u = inp.uniforms if inp.uniforms is not None else torch.zeros(16, 1)
    want = [pick(float(u[b, 0]), sampling_probs(inp.target_logits[b, 0],
                                                0.0 if mode == "greedy" else 0.9, 50, 0.9))
            for b in range(16)]
    assert tok.tolist() == want


def test_eager_baseline_matches_reference():
    """The batched eager PyTorch of the benchmark is a faithful baseline."""
    for mode in MODES:
        inp = make_verify_inputs(6, 8, 300, torch.float32, mode, 0.8, 0, 0.9, seed=3)
        ref = verify_tree_ref(*inp.args())
        for a, r in zip(verify_tree_eager(*inp.args()), ref):
            assert torch.equal(a, r)


# ---------------------------------------------------------------------------------------------
# Hand-built cases with known outputs
# ---------------------------------------------------------------------------------------------
def _one_hot_logits(tokens_per_node, vocab=50, dtype=torch.float32):
    logits = torch.randn(1, len(tokens_per_node), vocab)
    for i, t in enumerate(tokens_per_node):
        logits[0, i, t] = 100.0
    return logits.to(dtype)


@pytest.mark.parametrize("mode", MODES)
def test_all_accepted_chain_gives_bonus(mode):
    # target: after the root comes 5, then 7, then 9, then (bonus) 11
    logits = _one_hot_logits([5, 7, 9, 11])
    draft = torch.tensor([[0, 5, 7, 9]])
    parents = torch.tensor([[-1, 0, 1, 2]])
    q = torch.full((1, 4, 50), 1e-3)
    for i, t in enumerate([0, 5, 7, 9]):
        q[0, i, t] = 1.0
    q = q / q.sum(-1, keepdim=True)
    u = torch.full((1, 4), 0.5)
    num, nodes, tok = ptp_ext.verify_tree(draft, parents, logits, q, u, mode, 1.0, 0, 1.0)
    assert num.tolist() == [3] and nodes.tolist() == [[0, 1, 2, 3]] and tok.tolist() == [11]


@pytest.mark.parametrize("mode", MODES)
def test_first_token_rejected(mode):
    logits = _one_hot_logits([5, 7, 9])
    draft = torch.tensor([[0, 6, 7]])
    parents = torch.tensor([[-1, 0, 1]])
    q = torch.softmax(torch.randn(1, 3, 50), -1)
    u = torch.full((1, 3), 0.3)
    num, nodes, tok = ptp_ext.verify_tree(draft, parents, logits, q, u, mode, 1.0, 0, 1.0)
    assert num.tolist() == [0] and nodes.tolist() == [[0, -1, -1]] and tok.tolist() == [5]


@pytest.mark.parametrize("mode", MODES)
def test_tree_second_sibling_accepted(mode):
    # root children: node 1 (token 3), node 2 (token 8, accepted), node 3 (token 8, later
    # sibling); node 4 under node 2 (token 2, accepted), padding node 5; bonus 4 at node 4.
    logits = _one_hot_logits([8, 0, 2, 0, 4, 0])
    draft = torch.tensor([[0, 3, 8, 8, 2, 7]])
    parents = torch.tensor([[-1, 0, 0, 0, 2, -1]])
    q = torch.zeros(1, 6, 50)
    for i, t in enumerate([0, 3, 8, 8, 2, 7]):
        q[0, i, t] = 1.0  # one-hot drafts: node 1 is surely rejected, the residual stays p
    u = torch.full((1, 6), 0.5)
    num, nodes, tok = ptp_ext.verify_tree(draft, parents, logits, q, u, mode, 1.0, 0, 1.0)
    assert num.tolist() == [2] and nodes.tolist() == [[0, 2, 4, -1, -1, -1]]
    assert tok.tolist() == [4]


def test_rejection_residual_known():
    # p = (0.5, 0.5, 0, ...), q = (1, 0, ...), draft token 0 with u = 0.9: 0.9 * 1 >= 0.5 ->
    # rejected; residual max(p - q, 0) = (0, 0.5) -> normalised (0, 1): the next token is 1.
    V = 6
    logits = torch.full((1, 2, V), -1e4)
    logits[0, 0, :2] = 0.0
    q = torch.zeros(1, 2, V)
    q[0, 1, 0] = 1.0
    u = torch.tensor([[0.01, 0.9]])
    out = ptp_ext.verify_tree(torch.tensor([[0, 0]]), torch.tensor([[-1, 0]]), logits, q, u,
                              "rejection", 1.0, 0, 1.0)
    assert [o.tolist() for o in out] == [[0], [[0, -1]], [1]]


# ---------------------------------------------------------------------------------------------
# Rejection sampling is lossless: a frequency test
# ---------------------------------------------------------------------------------------------
def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with target probability 0 was emitted"
    exp = probs[keep].double() * n
    stat = ((counts[keep].double() - exp) ** 2 / exp).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_rejection_frequencies(shape):
    """The first emitted token follows the target distribution (drafts drawn from q)."""
    g = torch.Generator().manual_seed(1234)
    V, rows = 8, 40000
    parents = [-1, 0, 1] if shape == "chain" else [-1, 0, 0, 0, 1]
    N1 = len(parents)
    logits = torch.randn(N1, V, generator=g) * 1.5
    q = torch.softmax(torch.randn(N1, V, generator=g), -1)
    q[:, 3] = 0.0  # the draft never proposes token 3: only the residual can produce it
    q = q / q.sum(-1, keepdim=True)
    draft = torch.zeros(rows, N1, dtype=torch.long)
    for i in range(1, N1):
        draft[:, i] = torch.multinomial(q[i], rows, replacement=True, generator=g)
    out = ptp_ext.verify_tree(
        draft, torch.tensor(parents).expand(rows, N1).contiguous(),
        logits.expand(rows, N1, V).contiguous(), q.expand(rows, N1, V).contiguous(),
        torch.rand(rows, N1, generator=g, dtype=torch.float64), "rejection", 1.0, 5, 0.95)
    num, nodes, tok = out
    first = torch.where(num > 0, draft.gather(1, nodes[:, 1:2].clamp_min(0)).squeeze(1), tok)
    target = sampling_probs(logits[0], 1.0, 5, 0.95)
    counts = torch.bincount(first, minlength=V)
    assert _chi_square_pvalue(counts, target) > 1e-4
    assert (num > 0).float().mean() > 0.2  # drafts do get accepted


@pytest.mark.parametrize("V", [5, 8, 37, 64, 1003])
def test_greedy_argmax_ties_and_invalid_values(V):
    """Greedy verify picks the lowest index of the maximum (ties in different 8-lane groups,
    the vectorised body and the scalar tail), and a NaN / +inf anywhere in the row, before or
    after the maximum, makes the row invalid."""
    g = torch.Generator().manual_seed(V)
    rows = []
    for case in range(12):
        x = torch.randn(V, generator=g)
        top = x.max().item() + 1.0
        pos = torch.randperm(V, generator=g)[:3].tolist()
        if case % 3 == 0:
            x[pos] = top  # a three-way tie
        elif case % 3 == 1:
            x[pos[0]] = top
        else:
            x[:] = -math.inf
            if case % 2:
                x[pos[-1]] = 0.0
        if case in (4, 7):
            x[pos[1 if V > 1 else 0]] = math.nan if case == 4 else math.inf
        if case == 10:
            x[V - 1] = math.nan  # in the tail (or the last lane)
        rows.append(x)
    logits = torch.stack(rows).view(12, 1, V)
    tokens = torch.zeros(12, 1, dtype=torch.long)
    parents = torch.full((12, 1), -1)
    num, nodes, tok = ptp_ext.verify_tree(tokens, parents, logits, None, None, "greedy", 1.0, 0, 1.0)
    ref = verify_tree_ref(tokens, parents, logits, None, None, "greedy", 1.0, 0, 1.0)
    assert torch.equal(tok, ref[2]), (tok.tolist(), ref[2].tolist())
    for r, x in enumerate(rows):
        if torch.isnan(x).any() or torch.isposinf(x).any() or torch.isneginf(x).all():
            assert tok[r] == -1
        else:
            assert tok[r] == int(torch.nonzero(x == x.max())[0])


# ---------------------------------------------------------------------------------------------
# Invalid rows: NaN / +inf / all -inf logits and uniforms outside [0, 1) give the sentinel row
# (0 accepted, next_token -1), never a token; the other rows are unaffected.
# ---------------------------------------------------------------------------------------------
NAN, INF = math.nan, math.inf


def poison_verify_inputs(mode: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """(clean, poisoned, must_be_invalid): 10 rows over 6 nodes, V = 64. Rows 0-2: NaN / +inf /
    all -inf root logits; row 3: NaN at every non-root node (invalid iff the root accepts a
    child); row 4: -inf masks on half the vocabulary (valid); row 5: NaN logits at a padding node
    (valid); rows 6-8: uniforms NaN / 1.0 / -0.25 (invalid unless greedy, which reads none);
    row 9 clean. ``clean`` has row 5's padding and finite logits everywhere else."""
    t, k, p = (0.0, 0, 1.0) if mode == "greedy" else (0.8, 5, 0.9)
    inp = make_verify_inputs(10, 6, 64, dtype, mode, t, k, p, kinds=("chain", "tree", "wide"),
                             seed=seed)
    parents = inp.parents.clone()
    parents[5, -1] = -1
    g = torch.Generator().manual_seed(seed)
    uniforms = (inp.uniforms.clone() if inp.uniforms is not None
                else torch.rand(10, 6, generator=g))  # greedy ignores them, even bad ones
    clean = VerifyInputs(inp.draft_tokens, parents, inp.target_logits, inp.draft_probs,
                         uniforms, mode, t, k, p)
    logits = inp.target_logits.clone()
    logits[0, 0, 3] = NAN
    logits[1, 0, 7] = INF
    logits[2, 0, :] = -INF
    logits[3, 1:] = NAN
    logits[4, :, ::2] = -INF
    logits[5, -1] = NAN
    u = uniforms.clone()
    u[6, 2], u[7, 0], u[8, 1] = NAN, 1.0, -0.25
    bad = VerifyInputs(inp.draft_tokens, parents, logits, inp.draft_probs, u, mode, t, k, p)
    must = [0, 1, 2] + ([] if mode == "greedy" else [6, 7, 8])
    return clean.to(device), bad.to(device), must


def check_invalid_rows(mode: str, dtype: torch.dtype, device: str = "cpu") -> None:
    clean, bad, must = poison_verify_inputs(mode, dtype, device, seed=17)
    num, nodes, tok = [o.cpu() for o in ptp_ext.verify_tree(*bad.args())]
    ref = verify_tree_ref(*bad.to("cpu").args())
    invalid = ref[2] == -1
    assert invalid[must].all(), "the reference misses a sentinel row"
    assert not invalid[[4, 5, 9]].any(), "masks and padding are valid"
    assert torch.equal(tok == -1, invalid), f"sentinel rows {tok.tolist()} vs {ref[2].tolist()}"
    assert (num[invalid] == 0).all() and (nodes[invalid, 0] == 0).all()
    assert (nodes[invalid, 1:] == -1).all()
    # the other rows: as without the poison (row 4's logits differ: checked against the masks)
    want = [o.cpu() for o in ptp_ext.verify_tree(*clean.args())]
    rows = [b for b in range(10) if not invalid[b] and b != 4]
    for got, w in zip((num, nodes, tok), want):
        assert torch.equal(got[rows], w[rows])
    assert tok[4] % 2 == 1, "a masked (-inf) token was emitted"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_invalid_rows(mode, dtype):
    check_invalid_rows(mode, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_invalid_node_deeper_on_the_path(mode):
    """The root accepts node 1 (one-hot logits), node 1's logits are NaN: the whole row is the
    sentinel, not the accepted prefix; a NaN at node 2, which is never reached, is harmless."""
    logits = _one_hot_logits([5, 7, 9])
    draft = torch.tensor([[0, 5, 8]])
    parents = torch.tensor([[-1, 0, 0]])  # node 2 (token 8) is a rejected sibling
    q = torch.zeros(1, 3, 50)
    q[0, 1, 5] = q[0, 2, 8] = 1.0
    u = torch.full((1, 3), 0.5)
    args = (draft, parents, logits, q, u, mode, 1.0, 0, 1.0)
    assert [o.tolist() for o in ptp_ext.verify_tree(*args)] == [[1], [[0, 1, -1]], [7]]
    unreached = logits.clone()
    unreached[0, 2] = NAN
    assert [o.tolist() for o in ptp_ext.verify_tree(draft, parents, unreached, *args[3:])] == \
        [[1], [[0, 1, -1]], [7]]
    bad = logits.clone()
    bad[0, 1, 0] = NAN
    out = ptp_ext.verify_tree(draft, parents, bad, *args[3:])
    ref = verify_tree_ref(draft, parents, bad, *args[3:])
    assert [o.tolist() for o in out] == [o.tolist() for o in ref] == [[0], [[0, -1, -1]], [-1]]


@pytest.mark.parametrize("mode", MODES)
def test_temperature_overflow_is_invalid(mode):
    """Finite logits that overflow once divided by the temperature are +inf: invalid when
    sampling; at temperature 0 (argmax) the same logits are fine."""
    logits = torch.randn(1, 1, 20)
    logits[0, 0, 4] = 3e38
    none = torch.zeros(1, 1, dtype=torch.long)
    q = torch.full((1, 1, 20), 0.05)
    u = torch.full((1, 1), 0.3)
    hot = ptp_ext.verify_tree(none, none - 1, logits, q, u, mode, 0.5, 0, 1.0)[2]
    cold = ptp_ext.verify_tree(none, none - 1, logits, q, u, mode, 0.0, 0, 1.0)[2]
    assert cold.tolist() == [4]
    assert hot.tolist() == ([4] if mode == "greedy" else [-1])
    assert verify_tree_ref(none, none - 1, logits, q, u, mode, 0.5, 0, 1.0)[2].tolist() == hot.tolist()


def test_raise_on_invalid():
    clean, bad, _ = poison_verify_inputs("coupled", torch.float32)
    ptp_ext.verify_tree(*clean.args(), raise_on_invalid=True)  # nothing invalid: no error
    with pytest.raises(ValueError, match=r"verify_tree: [67] invalid row\(s\) \[0, 1, 2, (3, )?6, 7, 8\] "
                                         r".*target_logits\[0, c\] for nodes c in \[0\]"):
        ptp_ext.verify_tree(*bad.args(), raise_on_invalid=True)
    u = clean.uniforms.clone()
    u[2, 3] = 1.5
    args = list(clean.args())
    args[4] = u
    with pytest.raises(ValueError, match=r"uniforms\[2\] must be in \[0, 1\), got \[1.5\]"):
        ptp_ext.verify_tree(*args, raise_on_invalid=True)


# ---------------------------------------------------------------------------------------------
# opcheck, errors, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    for dtype in (torch.float32, torch.bfloat16):
        inp = make_verify_inputs(3, 5, 64, dtype, mode, 0.8, 5, 0.9, seed=11)
        torch.library.opcheck(torch.ops.ptp_ext.verify_tree.default, inp.args())


def _base():
    return make_verify_inputs(2, 4, 16, torch.float32, "rejection", 1.0, 0, 1.0, seed=5)


def _call(**over):
    d = _base()
    a = dict(draft_tokens=d.draft_tokens, parents=d.parents, target_logits=d.target_logits,
             draft_probs=d.draft_probs, uniforms=d.uniforms, mode=d.mode, temperature=1.0,
             top_k=0, top_p=1.0)
    a.update(over)
    return torch.ops.ptp_ext.verify_tree(*a.values())


def _with(t, idx, value):
    t = t.clone()
    t[idx] = value
    return t


ERRORS = [
    (dict(mode="sample"), "mode must be one of"),
    (dict(target_logits=torch.randn(2, 4)), r"target_logits must have shape \[B, N\+1, V\]"),
    (dict(target_logits=torch.randn(2, 4, 16).double()),
     "target_logits must be float32, float16 or bfloat16"),
    (dict(target_logits=torch.randn(2, 4, 0)), r"N\+1 >= 1 nodes and V >= 1"),
    (dict(draft_tokens=torch.zeros(2, 4, dtype=torch.int32)), "draft_tokens must be Long"),
    (dict(draft_tokens=torch.zeros(2, 5, dtype=torch.long)), "draft_tokens must have shape"),
    (dict(parents=torch.zeros(2, 4, dtype=torch.int32)), "parents must be Long"),
    (dict(parents=torch.zeros(3, 4, dtype=torch.long)), "parents must have shape"),
    (dict(draft_tokens=torch.zeros(4, 2, dtype=torch.long).t()), "draft_tokens must be contiguous"),
    (dict(parents=torch.tensor([[-1, 0, 1, 2]] * 2).t().contiguous().t()),
     "parents must be contiguous"),
    (dict(target_logits=torch.randn(2, 16, 4).transpose(1, 2)), "target_logits must be contiguous"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(draft_probs=None), "mode 'rejection' needs draft_probs"),
    (dict(draft_probs=torch.rand(2, 4, 16).half()), "draft_probs must be Float"),
    (dict(draft_probs=torch.rand(2, 4, 15)), "draft_probs must have shape"),
    (dict(draft_probs=torch.rand(2, 16, 4).transpose(1, 2)), "draft_probs must be contiguous"),
    (dict(uniforms=None), "mode 'rejection' needs uniforms"),
    (dict(uniforms=None, mode="coupled"), "mode 'coupled' needs uniforms"),
    (dict(uniforms=torch.rand(2, 4).half()), "uniforms must be float32 or float64"),
    (dict(uniforms=torch.rand(2, 3)), "uniforms must have shape"),
    (dict(uniforms=torch.rand(4, 2).t()), "uniforms must be contiguous"),
]


@pytest.mark.parametrize("over,match", ERRORS, ids=[m for _, m in ERRORS])
def test_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_index_errors():
    d = _base()
    with pytest.raises(ValueError, match=r"parents\[1, 0\] must be -1"):
        _call(parents=_with(d.parents, (1, 0), 0))
    with pytest.raises(ValueError, match=r"parents\[0, 2\] must be in \[-1, 1\]"):
        _call(parents=_with(d.parents, (0, 2), 2))
    with pytest.raises(ValueError, match=r"draft_tokens\[0, 1\] must be in \[0, V=16\)"):
        _call(parents=torch.tensor([[-1, 0, 1, 2]] * 2), draft_tokens=_with(d.draft_tokens, (0, 1), 16))


@cuda_only
def test_device_mismatch_error():
    d = _base()
    with pytest.raises(ValueError, match="uniforms must be on the same device"):
        _call(draft_tokens=d.draft_tokens.cuda(), parents=d.parents.cuda(),
              target_logits=d.target_logits.cuda(), draft_probs=d.draft_probs.cuda())


def test_torch_compile_fullgraph():
    inp = make_verify_inputs(3, 5, 64, torch.float32, "coupled", 0.8, 0, 0.9, seed=2)

    @torch.compile(fullgraph=True, backend="eager")
    def f(tokens, parents, logits, u):
        num, nodes, nxt = ptp_ext.verify_tree(tokens, parents, logits, None, u, "coupled", 0.8,
                                              0, 0.9)
        return num + 1, nodes, nxt

    num, nodes, nxt = f(inp.draft_tokens, inp.parents, inp.target_logits, inp.uniforms)
    ref = verify_tree_ref(*inp.args())
    assert torch.equal(num - 1, ref[0]) and torch.equal(nodes, ref[1]) and torch.equal(nxt, ref[2])


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------
@cuda_only
@pytest.mark.parametrize("vocab", [111, 1000, 32000, 128256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_against_reference(mode, dtype, vocab):
    batch, nodes = (8, 9) if vocab < 32000 else (3, 6)
    skipped = total = 0
    for i, (t, k, p) in enumerate(_sampling_for(mode)):
        if vocab >= 32000 and i % 2:
            continue
        inp = make_verify_inputs(batch, nodes, vocab, dtype, mode, t, k, p,
                                 kinds=("chain", "tree", "ragged", "wide", "root"),
                                 seed=1000 * i + vocab, device="cuda",
                                 uniform_dtype=[torch.float32, torch.float64][i % 2])
        outs = ptp_ext.verify_tree(*inp.args())
        skipped += assert_matches_reference(inp, outs)
        total += batch
        # deterministic: a second call gives the same ids
        assert all(torch.equal(a, b) for a, b in zip(outs, ptp_ext.verify_tree(*inp.args())))
    assert skipped <= total // 5, f"too many boundary rows skipped: {skipped}/{total}"


@cuda_only
@pytest.mark.parametrize("mode", ["coupled", "rejection"])
def test_cuda_same_row_same_token(mode):
    """A node's decision does not depend on B or N: plain sampling (N = 0) of row b's root gives
    the token the tree gives when nothing is accepted at the root."""
    inp = make_verify_inputs(32, 7, 49152, torch.bfloat16, mode, 0.8, 0, 0.95, seed=9,
                             device="cuda")
    num, _, tok = ptp_ext.verify_tree(*inp.args())
    plain = ptp_ext.verify_tree(inp.draft_tokens[:, :1].contiguous(),
                                inp.parents[:, :1].contiguous(),
                                inp.target_logits[:, :1].contiguous(),
                                None if inp.draft_probs is None else
                                inp.draft_probs[:, :1].contiguous(),
                                inp.uniforms[:, :1].contiguous(), mode, 0.8, 0, 0.95)[2]
    rejected = num == 0
    if mode == "coupled":
        assert torch.equal(tok[rejected], plain[rejected])
    # every row, one by one (B = 1) gives the batched result
    one = torch.stack([ptp_ext.verify_tree(*[a[b:b + 1].contiguous() if torch.is_tensor(a) else a
                                            for a in inp.args()])[2][0] for b in range(32)])
    assert torch.equal(one, tok)
