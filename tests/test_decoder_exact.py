"""Exactness of the ptp decoder on tiny random Llama / Qwen2 / Mistral models.

Speculative greedy (lookup chains and trees, batch 1 and 3) == plain greedy == HF ``generate``
greedy; coupled sampling == plain sampling (same seed); rejection sampling reproduces the target's
distribution (chi-square, chains and trees); edge cases. Token ids are compared exactly.
"""
from __future__ import annotations

import pytest
import torch

import ptp_ext

from ptp_testing import assert_same_logits, hf_greedy, maybe_reference_ops, record_sampling_logits
from ptp.decode.decoder import Decoder, GenerationConfig, tree_mask_and_depth
from ptp.decode.linear import LinearRouter
from ptp.decode.draft import Draft, DraftRequest, Drafter, NoDrafter
from ptp.drafters import LookupDrafter, make_drafter
from ptp.models import tiny_model
from ptp.decode.sampling import SamplingConfig, uniforms
from ptp_ext.reference import sampling_probs

FAMILIES = ["llama", "qwen2", "mistral"]
VOCAB = 97


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    extra = {"sliding_window": None} if request.param == "mistral" else {}
    seed = FAMILIES.index(request.param)
    return tiny_model(request.param, vocab_size=VOCAB, seed=seed, **extra)


def make_prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [5, 12, 9, 17, 3][:n]
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lens]


def run(model, prompts, drafter=None, **cfg):
    return Decoder(model, drafter=drafter).generate(prompts, GenerationConfig(**cfg))


def ids(results):
    return [r.new_token_ids for r in results]


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------
def test_blas_is_not_row_invariant_here(model):
    """Why the decoder needs invariant linears: on this backend F.linear rounds some rows
    differently depending on the call's row count (if it ever stops doing so, the test below
    still checks the property, it just no longer guards anything)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g), torch.randn(16, 64, generator=g)
    full = torch.nn.functional.linear(x, w)
    differs = [m for m in range(1, 16) if not torch.equal(torch.nn.functional.linear(x[:m], w), full[:m])]
    if not differs:
        pytest.skip("this backend's BLAS happens to be row-invariant for these shapes")
    assert differs


@pytest.mark.parametrize("batch", [1, 3])
def test_target_logits_do_not_depend_on_rows_per_call(model, batch):
    """Row invariance: every token's logits are bitwise the same in plain decoding (one row per
    call) and in speculative decoding with chain drafts (several rows per call), so a uniform
    within rounding of a CDF boundary cannot pick differently."""
    prompts = make_prompts(batch)
    for T in (0.0, 0.9):
        cfg = GenerationConfig(max_new_tokens=40, sampling=SamplingConfig(temperature=T, seed=3))
        # a random 1-5 node chain every step (rows of every count), and lookup chains
        for drafter in (RandomTreeDrafter(5, seed=T, chain=True), LookupDrafter(lookup_tokens=6)):
            plain_dec, spec_dec = Decoder(model), Decoder(model, drafter=drafter)
            plain_rec, spec_rec = record_sampling_logits(plain_dec), record_sampling_logits(spec_dec)
            plain, spec = plain_dec.generate(prompts, cfg), spec_dec.generate(prompts, cfg)
            assert ids(spec) == ids(plain)
            assert len(spec_rec) >= sum(len(r.new_token_ids) for r in spec)
            assert_same_logits(plain_rec, spec_rec)


def test_linear_router_swaps_and_restores(model):
    """Inside the router every plain ``nn.Linear`` child is a ``RoutedLinear`` sharing its
    parameters; small calls and active (decoding) calls take the row-invariant op; on exit the
    original modules are back and the state dict is untouched."""
    from ptp.decode.linear import RoutedLinear

    keys = list(model.state_dict())
    parent = next(m for m in model.modules()
                  if any(type(c) is torch.nn.Linear for c in m.children()))
    name, layer = next((n, c) for n, c in parent.named_children() if type(c) is torch.nn.Linear)
    x = torch.randn(3, layer.in_features)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with LinearRouter(model, small_rows=2) as lin:
        routed = getattr(parent, name)
        assert isinstance(routed, RoutedLinear) and routed.weight is layer.weight
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        assert torch.equal(routed(x), ref)  # inactive, 3 rows > small_rows: BLAS
        small = routed(x[:2])
        torch.testing.assert_close(small, ref[:2], rtol=1e-5, atol=1e-5)
        assert torch.equal(small, ptp_ext.ops.invariant_linear(x[:2], layer.weight, layer.bias))
        lin.active = True
        y = routed(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(routed(x[1:2]), y[1:2])  # a row alone: the same bits
    assert getattr(parent, name) is layer and list(model.state_dict()) == keys
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("batch", [1, 3])
def test_tree_draft_logits_do_not_depend_on_rows_per_call(model, batch, temperature):
    """Tree drafts too: a node's ancestors are not contiguous in the call, so the CPU attention
    reads each row's visible new keys at consecutive positions; every sampled token's logits
    are then bitwise those of plain decoding."""
    prompts = make_prompts(batch)
    cfg = GenerationConfig(max_new_tokens=40, sampling=SamplingConfig(temperature=temperature, seed=3))
    plain_dec, spec_dec = Decoder(model), Decoder(model, drafter=RandomTreeDrafter(5, seed=1))
    plain_rec, spec_rec = record_sampling_logits(plain_dec), record_sampling_logits(spec_dec)
    assert ids(spec_dec.generate(prompts, cfg)) == ids(plain_dec.generate(prompts, cfg))
    assert_same_logits(plain_rec, spec_rec)


class RandomTreeDrafter(Drafter):
    """Proposes random draft tokens for every row: a random tree of ``n`` nodes, or a chain of a
    random length 1..n."""
    name = "random-tree"

    def __init__(self, n: int, seed: float = 0, chain: bool = False):
        self.n, self.chain, self.g = n, chain, torch.Generator().manual_seed(int(seed * 10))

    def propose(self, request: DraftRequest):
        B, n = len(request.histories), min(self.n, request.max_nodes)
        if n <= 0:
            return None
        if self.chain:
            n = int(torch.randint(1, n + 1, (1,), generator=self.g))
            parents = torch.arange(-1, n).expand(B, n + 1).contiguous()
            return Draft(tokens=torch.randint(0, VOCAB, (B, n + 1), generator=self.g), parents=parents,
                         is_chain=True)
        parents = torch.full((B, n + 1), -1, dtype=torch.long)
        for i in range(1, n + 1):
            parents[:, i] = torch.randint(0, i, (B,), generator=self.g)
        return Draft(tokens=torch.randint(0, VOCAB, (B, n + 1), generator=self.g), parents=parents)


def test_row_invariance_off_gives_the_same_tokens(model):
    prompts = make_prompts(3)
    on = run(model, prompts, LookupDrafter(), max_new_tokens=24)
    off = run(model, prompts, LookupDrafter(), max_new_tokens=24, row_invariant=False)
    assert ids(on) == ids(off)
    assert [r.target_calls for r in on] == [r.target_calls for r in off]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("branches", [1, 3])
def test_speculative_greedy_equals_plain_and_hf(model, batch, branches):
    prompts = make_prompts(batch)
    plain = run(model, prompts, max_new_tokens=48)
    spec = run(model, prompts, LookupDrafter(lookup_branches=branches, lookup_tokens=6),
               max_new_tokens=48)
    assert ids(spec) == ids(plain)
    assert all(r.target_calls == 48 for r in plain)
    # the drafts do get accepted (else this test would not exercise verification + compaction)
    assert sum(r.target_calls for r in spec) < sum(r.target_calls for r in plain)
    assert ids(plain) == [hf_greedy(model, p, 48) for p in prompts]


def test_batch_equals_single_rows(model):
    prompts = make_prompts(3)
    drafter = LookupDrafter(lookup_branches=2)
    together = run(model, prompts, drafter, max_new_tokens=32)
    alone = [run(model, [p], drafter, max_new_tokens=32)[0] for p in prompts]
    assert ids(together) == ids(alone)


# ---------------------------------------------------------------------------------------------
# Sampling: coupled verification == plain sampling with the same uniforms
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [(0.7, 0, 0.9), (1.0, 20, 1.0), (0.3, 5, 0.8)])
@pytest.mark.parametrize("branches", [1, 3])
def test_coupled_sampling_equals_plain(model, settings, branches):
    prompts = make_prompts(3)
    sampling = SamplingConfig(*settings, seed=1234)
    plain = run(model, prompts, max_new_tokens=40, sampling=sampling)
    spec = run(model, prompts, LookupDrafter(lookup_branches=branches), max_new_tokens=40,
               sampling=sampling)
    assert ids(spec) == ids(plain)
    other = run(model, prompts, max_new_tokens=40, sampling=SamplingConfig(*settings, seed=99))
    assert ids(other) != ids(plain)  # the seed matters


def test_sampling_is_independent_of_batch_layout(model):
    prompts = make_prompts(3)
    sampling = SamplingConfig(0.8, seed=5)
    together = Decoder(model).generate(prompts, GenerationConfig(24, sampling))
    alone = [Decoder(model).generate([p], GenerationConfig(24, sampling), sequence_ids=[i])[0]
             for i, p in enumerate(prompts)]
    assert ids(together) == ids(alone)


def test_uniform_stream_is_a_pure_function():
    seq = torch.arange(3).view(-1, 1)
    pos = torch.arange(1000).view(1, -1)
    u = uniforms(7, seq, pos)
    assert u.dtype == torch.float64 and u.shape == (3, 1000)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert torch.equal(u[1, 500:501], uniforms(7, torch.tensor([1]), torch.tensor([500])))
    assert not torch.equal(u, uniforms(8, seq, pos))
    assert not torch.equal(u, uniforms(7, seq, pos, salt=1))
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) * 12 - 1) < 0.05


# ---------------------------------------------------------------------------------------------
# Rejection sampling: the output distribution is the target's (chi-square)
# ---------------------------------------------------------------------------------------------
class RandomQDrafter(Drafter):
    """Samples node i's token from a fixed random distribution q_i (sharp, context-free)."""

    name = "random-q"

    def __init__(self, parents: list[int], vocab: int, seed: int):
        self.parents = parents
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)
        alpha = torch.full((len(parents), vocab), 0.5)
        self.q = torch._standard_gamma(alpha, generator=self.gen)
        self.q = self.q / self.q.sum(-1, keepdim=True)

    def propose(self, request: DraftRequest):
        B, N1 = len(request.histories), len(self.parents)
        q = self.q.expand(B, N1, self.vocab)
        tokens = torch.multinomial(q.reshape(-1, self.vocab), 1, generator=self.gen).view(B, N1)
        parents = torch.tensor(self.parents).expand(B, N1).contiguous()
        chain = self.parents == list(range(-1, N1 - 1))
        return Draft(tokens=tokens, parents=parents, is_chain=chain,
                     draft_probs=q.float().contiguous())


def _chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    # merge cells with small expectation into one, then Pearson's statistic
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("tree", [[-1, 0, 1, 2], [-1, 0, 0, 1, 1, 2]], ids=["chain", "tree"])
def test_rejection_sampling_matches_target_distribution(tree):
    V = 6
    torch.manual_seed(0)
    m = tiny_model("llama", vocab_size=V, seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(0.5)  # moderately peaked target distributions
    prompt = [1, 4, 3]
    temperature, n = 0.9, 4000
    sampling = SamplingConfig(temperature, seed=11)
    out = Decoder(m, drafter=RandomQDrafter(tree, V, seed=2)).generate(
        [prompt] * n, GenerationConfig(3, sampling), sequence_ids=list(range(n)))
    toks = torch.tensor([r.new_token_ids for r in out])  # [n, 3]
    assert toks.shape == (n, 3)
    # exact joint law of (t1, t2, t3) by enumeration with the HF forward
    seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
    with torch.no_grad():
        m.set_attn_implementation("sdpa")
        logits = m(seqs).logits[:, -3:]  # predicts t1, t2 | t1, t3 | t1, t2
    p = sampling_probs(logits, temperature).double().view(V, V, 3, V)
    p1, p2, p3 = p[0, 0, 0], p[:, 0, 1], p[:, :, 2]  # [V], [V(t1), V], [V, V, V]
    joint = p1.view(V, 1, 1) * p2.view(V, V, 1) * p3
    # (t2, t3) come from the speculative step; (t1, t2) checks the step boundary
    observed = torch.zeros(V, V, V, dtype=torch.float64)
    observed.index_put_((toks[:, 0], toks[:, 1], toks[:, 2]), torch.ones(n, dtype=torch.float64),
                        accumulate=True)
    for dims in [(0,), (1, 2), (0, 1)]:
        rest = tuple(d for d in range(3) if d not in dims)
        pv = _chi2_pvalue(observed.sum(rest).flatten(), n * joint.sum(rest).flatten())
        assert pv > 1e-3, f"marginal over {dims}: chi-square p-value {pv:.2e}"


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------
class OracleDrafter(Drafter):
    """Drafts the next ``k`` tokens of a known continuation (single row): every draft accepted."""

    name = "oracle"

    def __init__(self, prompt: list[int], continuation: list[int], k: int = 6):
        self.prompt, self.continuation, self.k = prompt, continuation, k

    def propose(self, request: DraftRequest):
        done = len(request.histories[0]) - len(self.prompt)  # generated so far (root included)
        nxt = self.continuation[done:done + min(self.k, request.max_nodes)]
        if not nxt:
            return None
        tokens = torch.tensor([[0] + nxt])
        parents = torch.arange(-1, len(nxt)).view(1, -1)
        return Draft(tokens=tokens, parents=parents, is_chain=True)


def _commits(model, prompt, drafter, **cfg):
    steps = []
    res = Decoder(model, drafter=drafter).generate(
        [prompt], GenerationConfig(**cfg), on_tokens=lambda i, new: steps.append(list(new)))
    return res[0], steps


def test_eos_inside_a_draft(model):
    # a prompt and an index i whose token is new there and not the last of its step (oracle
    # steps commit tokens 1..7, 8..14, ...: index 7k closes a step)
    for prompt in make_prompts(5):
        full = run(model, [prompt], max_new_tokens=40)[0].new_token_ids
        cut = next((i for i in range(2, 40) if i % 7 and full[i] not in full[:i]), None)
        if cut is not None:
            break
    assert cut is not None, "no prompt with a fresh token inside a draft"
    _, steps = _commits(model, prompt, OracleDrafter(prompt, full), max_new_tokens=40)
    assert [len(s) for s in steps[:3]] == [1, 7, 7]  # prefill, then 6 accepted + 1 per call
    eos = full[cut]
    res, steps = _commits(model, prompt, OracleDrafter(prompt, full), max_new_tokens=40,
                          eos_token_ids=(eos,))
    assert res.new_token_ids == full[:cut + 1] and res.finish_reason == "eos"
    assert steps[-1][-1] == eos and len(steps[-1]) < 7  # the rest of the draft was dropped
    plain = run(model, [prompt], max_new_tokens=40, eos_token_ids=(eos,))[0]
    lookup = run(model, [prompt], LookupDrafter(lookup_branches=2), max_new_tokens=40,
                 eos_token_ids=(eos,))[0]
    assert plain.new_token_ids == lookup.new_token_ids == res.new_token_ids


@pytest.mark.parametrize("limit", [4, 11, 12])
def test_max_tokens_reached_mid_draft(model, limit):
    prompt = make_prompts(1)[0]
    full = run(model, [prompt], max_new_tokens=40)[0].new_token_ids
    res, steps = _commits(model, prompt, OracleDrafter(prompt, full), max_new_tokens=limit)
    assert res.new_token_ids == full[:limit] and res.finish_reason == "length"
    assert res.target_calls == len(steps) == 1 + -(-(limit - 1) // 7)
    plain = run(model, [prompt], max_new_tokens=limit)[0]
    assert plain.new_token_ids == full[:limit] and plain.target_calls == limit


def test_rows_finish_at_different_steps(model):
    prompts = make_prompts(3)
    drafter = LookupDrafter(lookup_branches=2)
    full = run(model, prompts, drafter, max_new_tokens=40)
    # an EOS that ends row 0 early but rows 1, 2 later or never
    eos = full[0].new_token_ids[5]
    res = run(model, prompts, drafter, max_new_tokens=40, eos_token_ids=(eos,))
    alone = [run(model, [p], drafter, max_new_tokens=40, eos_token_ids=(eos,))[0] for p in prompts]
    assert ids(res) == ids(alone)
    assert len(res[0].new_token_ids) <= 6
    assert len({r.target_calls for r in res}) > 1
    plain = run(model, prompts, max_new_tokens=40, eos_token_ids=(eos,))
    assert ids(plain) == ids(res)


def test_prompt_longer_than_cache_is_an_error(model):
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        run(model, [list(range(3, 40))], max_new_tokens=4, max_cache_len=20)


def test_negative_max_draft_nodes_is_an_error(model):
    with pytest.raises(ValueError, match="max_draft_nodes must be >= 0"):
        run(model, [list(range(3, 10))], max_new_tokens=4, max_draft_nodes=-1)


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="empty prompt"):
        run(model, [[5, 6], []], max_new_tokens=4)


def test_cache_fills_up_exactly(model):
    # drafting stops when the cache is nearly full; decoding still reaches max_cache_len
    prompt = make_prompts(1)[0]
    full = run(model, [prompt], max_new_tokens=30)[0]
    res = run(model, [prompt], LookupDrafter(), max_new_tokens=30,
              max_cache_len=len(prompt) + 30)[0]
    assert res.new_token_ids == full.new_token_ids


def test_tree_mask_and_depth():
    parents = torch.tensor([[-1, 0, 0, 1, 2, -1], [-1, 0, 1, 2, -1, -1]])
    mask, depth = tree_mask_and_depth(parents)
    assert depth.tolist() == [[0, 1, 1, 2, 2, 0], [0, 1, 2, 3, 0, 0]]
    assert mask[0, 3].tolist() == [True, True, False, True, False, False]
    assert mask[0, 4].tolist() == [True, False, True, False, True, False]
    assert mask[0, 5].tolist() == [False] * 5 + [True]
    assert torch.equal(mask[1, :4, :4], torch.ones(4, 4, dtype=torch.bool).tril())


def test_drafter_registry():
    assert isinstance(make_drafter("none"), NoDrafter)
    assert isinstance(make_drafter("lookup", lookup_branches=2), LookupDrafter)
    with pytest.raises(ValueError, match="unknown drafter"):
        make_drafter("no-such-drafter")
    with pytest.raises(ValueError, match="drafter 'lookup': option 'num_branches' was renamed 'lookup_branches'"):
        make_drafter("lookup", num_branches=2)
    with pytest.raises(ValueError, match="drafter 'none' has no option 'tree'; valid options: none"):
        make_drafter("none", tree=1)
    with pytest.raises(ValueError, match="option lookup_ngram must be >= 1, got 0"):
        LookupDrafter(lookup_ngram=0)
    with pytest.raises(ValueError, match=r"option lookup_ngram must be <= lookup_max_ngram \(3\), got 4"):
        LookupDrafter(lookup_ngram=4)
    d = make_drafter("lookup", lookup_ngram="2", lookup_max_ngram="4", lookup_tokens="6")
    assert (d.lookup_ngram, d.lookup_max_ngram, d.lookup_tokens, d.max_nodes) == (2, 4, 6, 6)
    assert d.spec.description == "lookup lookup_ngram=2,lookup_max_ngram=4,lookup_tokens=6"


def test_lookup_drafter_trees():
    d = LookupDrafter(lookup_tokens=3, lookup_branches=3, max_nodes=5, row_cost=0)
    history = [5, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2, 3, 8, 1, 2]
    draft = d.propose(DraftRequest([history], [0], 16, SamplingConfig()))
    # continuations of "1 2" (most recent first): [3 8 1], [4 7 1], [3 9 1] -> trie under root
    assert draft.tokens[0].tolist() == [0, 3, 8, 1, 4, 7]
    assert draft.parents[0].tolist() == [-1, 0, 1, 2, 0, 4]
    assert not draft.is_chain
    chain = LookupDrafter(lookup_tokens=4, row_cost=0).propose(DraftRequest([history], [0], 16,
                                                                               SamplingConfig()))
    assert chain.tokens[0].tolist() == [0, 3, 8, 1, 2] and chain.is_chain


def test_ngram_index_equals_the_scan():
    """The cost-aware lookup's incremental n-gram index finds exactly the continuations of the
    full-history scan (``matches``), as the history grows by steps of any size."""
    import numpy as np

    from ptp.drafters.lookup import NgramIndex, matches

    rng = np.random.default_rng(0)
    for _ in range(150):
        vocab, lo = int(rng.integers(2, 8)), int(rng.integers(1, 3))
        hi = int(rng.integers(lo, 5))
        h = rng.integers(0, vocab, int(rng.integers(1, 50))).tolist()
        index = NgramIndex(lo, hi)
        for L in range(1, len(h) + 1):
            if rng.random() < 0.4 or L == len(h):
                index.extend(h[:L])
                for depth, num in ((1, 1), (3, 1), (5, 3)):
                    assert index.matches(depth, num) == matches(h[:L], depth, lo, hi, num), (h[:L], depth, num)


def test_acceptance_model_draft_length():
    from ptp.drafters.lookup import CPU_CALL_COSTS, PRIOR_RATES, AcceptanceModel

    # the default prior: the class's fitted rates per depth (deeper than the table: its last)
    m = AcceptanceModel(row_cost=0.13)
    k = m.key(4, True)
    assert m.rate(k, 1) == PRIOR_RATES[k][0] and m.rate(k, 9) == PRIOR_RATES[k][-1]
    assert m.rate(("unseen", True), 1) == 0.5
    short, long_ = m.key(1, False), m.key(30, True)  # short matches rarely pay, long ones do
    assert m.length(short, 4) == 0 and m.length(long_, 4) == 4

    m = AcceptanceModel(row_cost=0.13, prior_rate=0.5)
    k1, k3 = m.key(1, False), m.key(12, True)
    assert k1 != k3 and m.key(2, True) != m.key(3, True) and m.key(17, True) == m.key(30, True)
    assert m.length(k1, 6) == 2  # prior rate 0.5: (1 + .5 + .25) / 1.26 beats L = 1 and L = 3
    for _ in range(50):
        m.record(k1, 4, 0)  # never accepted
        m.record(k3, 6, 6)  # always
    assert m.rate(k1, 1) < 0.05 and m.rate(k3, 1) > 0.95 and m.rate(k3, 4) > 0.95
    assert m.rate(k1, 2) == 0.5  # never reached: the prior
    assert m.length(k1, 6) == 0 and m.length(k3, 6) == 6 and m.length(k3, 2) == 2
    assert AcceptanceModel(row_cost=0.0).length(k1, 5) == 5  # free rows: as deep as allowed
    lengths = [AcceptanceModel(row_cost=0.13, prior_rate=a, prior=1.0).length(k1, 8)
               for a in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert lengths == sorted(lengths) and lengths[0] == 0 and lengths[-1] == 8

    # depth by depth: the first token accepted half the time, the rest always once it was
    m = AcceptanceModel(costs=CPU_CALL_COSTS, prior_rate=0.5)
    for i in range(200):
        m.record(k1, 4, 4 if i % 2 else 0)
    assert abs(m.rate(k1, 1) - 0.5) < 0.01 and m.rate(k1, 2) > 0.98 and m.rate(k1, 4) > 0.98
    # with the table's costs, (1 + .5 * 3) / 1.78 (L = 3) beats L = 1, 2 and 4 (3 / 2.20)
    assert m.length(k1, 8) == 3 and m.length(k1, 1) == 1  # 1.5 / 1.26 > 1
    assert AcceptanceModel(costs=CPU_CALL_COSTS, prior_rate=0.15).length(k1, 8) == 0  # 1.15 / 1.26
    assert [m.cost(L) for L in range(len(CPU_CALL_COSTS))] == list(CPU_CALL_COSTS)
    assert m.cost(len(CPU_CALL_COSTS)) > CPU_CALL_COSTS[-1]  # beyond the table: extrapolated
    for bad in (dict(), dict(row_cost=0.1, costs=CPU_CALL_COSTS), dict(costs=(1.0, 0.9)),
                dict(costs=(1.2, 1.4))):
        with pytest.raises(ValueError):
            AcceptanceModel(**bad)


def test_lookup_match_features():
    from ptp.drafters.lookup import NgramIndex, match_features

    #            0  1  2  3  4  5  6  7  8  9 10 11
    history = [9, 1, 2, 3, 4, 7, 1, 2, 3, 5, 1, 2, 3]
    index = NgramIndex(1, 3)
    index.extend(history)
    found, n, length, agree = index.matches_with_features(4, 1)
    # the most recent 3-gram match (1 2 3 at 6..8) continues 5 1 2 3; traced back, 3 tokens agree
    # (7 before it, 5 before the end); its occurrences continue with 5 and 4: no agreement
    assert found == [[5, 1, 2, 3]] and n == 3 and length == 3 and not agree
    history = [8, 1, 2, 3, 4, 0, 8, 1, 2, 3]
    index = NgramIndex(1, 3)
    index.extend(history)
    found, n, length, agree = index.matches_with_features(2, 1)
    assert found == [[4, 0]] and n == 3 and length == 4 and agree  # 8 1 2 3 twice, both then 4
    assert match_features(history, 3, 1, index._starts) == (4, True)
    index = NgramIndex(1, 3)
    index.extend([1, 2, 3])
    assert index.matches_with_features(4, 1) == ([], 0, 0, False)


def test_lookup_drafts_only_what_pays():
    """row_cost > 0: drafts that are never accepted stop (plain steps), drafts that always are
    grow to lookup_tokens; the acceptance is read off the committed tokens of the next step."""
    period = [11, 12, 13, 14, 15, 16, 17, 18]
    d = LookupDrafter(lookup_tokens=6, row_cost=0.13)
    history = period * 3  # every lookup continuation right: commit the whole draft + 1
    lengths = []
    for _ in range(12):
        draft = d.propose(DraftRequest([history], [0], 16, SamplingConfig()))
        L = 0 if draft is None else draft.num_nodes - 1
        lengths.append(L)
        for _ in range(L + 1):
            history = history + [period[len(history) % len(period)]]
    assert lengths[-1] == 6 and lengths[0] >= 1  # a long, agreeing match: drafted from the start

    d = LookupDrafter(lookup_tokens=6, row_cost=0.13)
    history = [1, 2, 3, 4, 5] * 4
    proposed = []
    for _ in range(80):  # the target never follows the lookup: one token, not the drafted one
        draft = d.propose(DraftRequest([history], [0], 16, SamplingConfig()))
        proposed.append(draft is not None)
        conts = d.continuations(history, 1)  # drafted or not, the lookup's guess is wrong
        history = history + [conts[0][0] % 5 + 1 if conts else 1]
    assert proposed[0] and not any(proposed[-10:])
    d.reset()  # a new generate call keeps what was learnt; forget() goes back to the prior
    assert d.propose(DraftRequest([history], [0], 16, SamplingConfig())) is None
    d.forget()
    assert d.propose(DraftRequest([history], [0], 16, SamplingConfig())) is not None
    assert LookupDrafter(lookup_tokens=6, row_cost=0).propose(
        DraftRequest([history], [0], 16, SamplingConfig())) is not None


def test_lookup_scores_lookups_it_did_not_draft():
    """Every lookup is scored against the committed tokens, drafted or not: after the target
    stopped following the lookup (drafting stopped), the drafter drafts again once it follows it
    again; and the CPU's default prices calls by the measured call-cost table."""
    from ptp.drafters.lookup import CPU_CALL_COSTS

    d = LookupDrafter(lookup_tokens=4)  # on the CPU: the call-cost table
    assert d.call_costs == CPU_CALL_COSTS and d.model.costs == CPU_CALL_COSTS and d.row_cost > 0
    assert LookupDrafter(lookup_tokens=4, row_cost=0.2).model.costs is None
    assert LookupDrafter(lookup_tokens=4, device="meta").model is None  # off the CPU: fixed chains
    period = [11, 12, 13, 14, 15, 16, 17, 18]
    history = period * 2
    proposed = []
    for step in range(150):
        draft = d.propose(DraftRequest([history], [0], 16, SamplingConfig()))
        proposed.append(draft is not None)
        follow = step >= 70  # first the target never follows the lookup, then always
        nxt = period[len(history) % len(period)] if follow else 100 + step
        if draft is not None and follow:  # the whole draft accepted, plus one token
            history = history + draft.tokens[0, 1:].tolist()
            nxt = period[len(history) % len(period)]
        history = history + [nxt]
    assert not any(proposed[50:70]) and all(proposed[-20:])


def test_measured_costs_table():
    """MeasuredCosts: the prior until 1-row steps are timed; then the prior's extra-row costs
    scaled by the measured ones (sample-weighted against the prior), for the L never timed too;
    slow outliers do not move the medians."""
    from ptp.drafters.lookup import CPU_CALL_COSTS, MeasuredCosts

    m = MeasuredCosts(CPU_CALL_COSTS, weight=8.0, min_samples=4)
    assert m.costs() == CPU_CALL_COSTS and m.scale() == 1.0
    for _ in range(3):
        m.record(0, 0.010)
        m.record(1, 0.030)
    assert m.costs() == CPU_CALL_COSTS  # fewer than min_samples
    for i in range(61):
        m.record(0, 0.010 if i % 10 else 1.0)  # every tenth step a slow spell
        m.record(1, 0.0113)  # (1.13 - 1) / (1.26 - 1) = 0.5: rows cost half the table's
    m.record(len(CPU_CALL_COSTS), 0.5)  # beyond the table: ignored
    m.record(3, -1.0)  # not a duration: ignored
    r = (8.0 + 64 * 0.5) / (8.0 + 64)  # the window keeps the last 64
    assert abs(m.scale() - r) < 1e-9
    c = m.costs()
    assert c[0] == 1.0 and all(abs(c[L] - (1 + r * (CPU_CALL_COSTS[L] - 1))) < 1e-12 for L in range(len(c)))
    assert all(a < b for a, b in zip(c, c[1:])) and c[4] < CPU_CALL_COSTS[4]  # L = 4 never timed
    for _ in range(64):
        m.record(2, 0.005)  # cheaper than a 1-row step: no row is worth less than nothing
    assert 0 < m.scale() < r


@pytest.mark.parametrize("per_row, expect_deep", [(0.02, True), (3.0, False)])
def test_lookup_prices_rows_by_measured_step_times(per_row, expect_deep):
    """measured_costs: the drafter times its own steps (the end of one draft to the start of
    the next) and drafts by the measured costs. Steps timed on a fake clock: with rows nearly
    free every match class drafts lookup_tokens deep; with each row costing 3x a 1-row step,
    drafting stops although the prior and the table (a 2-core CPU's) would draft."""
    d = LookupDrafter(lookup_tokens=4, measured_costs=True)
    now = [0.0]
    d.clock = lambda: now[0]
    period = [11, 12, 13, 14, 15, 16, 17, 18]
    history = list(range(100, 116))
    lengths = []
    for step in range(170):
        draft = d.propose(DraftRequest([history], [0], 16, SamplingConfig()))
        L = 0 if draft is None else draft.num_nodes - 1
        lengths.append(L)
        now[0] += 0.010 * (1.0 + per_row * L)  # the step: call, verify, commit
        if step < 20:  # new tokens, nothing to look up: 1-row steps, the timing's reference
            assert L == 0
            history = history + [200 + step]
        else:  # then the target follows a period: a draft is accepted whole, plus one token
            history = history + [period[(len(history) + j) % len(period)] for j in range(L + 1)]
    assert max(lengths[20:40]) >= 1  # the table and the prior draft a long agreeing match
    costs = d.model.costs
    assert costs != d.call_costs  # refreshed from the measured steps every 8 steps
    if expect_deep:
        assert all(L == 4 for L in lengths[-20:]) and costs[4] < 1.4 < d.call_costs[4]
    else:
        assert costs[1] > 2.0 and not any(lengths[-20:])
    d.forget()  # back to the table
    assert d.model.costs == d.call_costs and d.measured.costs() == d.call_costs


def test_measured_costs_option_and_exactness(model):
    """measured_costs is an option of lookup (text form too), refused with row_cost; with it the
    tokens are plain decoding's."""
    d = make_drafter("lookup", measured_costs="true")
    assert d.measured is not None and d.options.measured_costs
    assert make_drafter("lookup").measured is None
    with pytest.raises(ValueError, match="measured_costs"):
        make_drafter("lookup", measured_costs=True, row_cost=0.2)
    prompts = make_prompts(1) + [[5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]]
    for p in prompts:
        plain = run(model, [p], max_new_tokens=40)[0].new_token_ids
        res = run(model, [p], drafter=LookupDrafter(measured_costs=True), max_new_tokens=40)[0]
        assert res.new_token_ids == plain
    assert run(model, prompts, drafter=LookupDrafter(measured_costs=True), max_new_tokens=30)[1].new_token_ids \
        == run(model, prompts, max_new_tokens=30)[1].new_token_ids  # batch 2: not timed, same tokens


class _CharTokenizer:
    """Token id i decodes to one letter: enough to test stop strings without a vocabulary."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_string_ends_the_row(model):
    prompt = make_prompts(1)[0]
    full = run(model, [prompt], max_new_tokens=40)[0].new_token_ids
    text = _CharTokenizer().decode(full)
    stop = text[12:14]
    end = text.index(stop) + len(stop)  # first occurrence ends at this token
    for drafter in (None, LookupDrafter(lookup_branches=2)):
        res = Decoder(model, _CharTokenizer(), drafter).generate(
            [prompt], GenerationConfig(40, stop_strings=(stop,)))[0]
        assert res.new_token_ids == full[:end] and res.finish_reason == "stop"
