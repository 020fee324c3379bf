"""PTP adapters with a sampler head (``PTPConfig(sampler=True[, copy_attn=True])``): slots 1..k-1
draft one at a time through the masked-input drafter's sampler head (``ptp.sampler_head``), each
on the previous slot's token, optionally attending over the committed context.

Training feeds each slot what drafting computes; decoding stays exact (greedy and coupled
sampling, O-PTP and C-PTP, every scheme, greedy trees, lookup); training learns what the sampler
is for (copying from the context) where the plain adapter cannot; checkpoints, ``--init-from``
and the errors (tiny models)."""
from __future__ import annotations

import random

import pytest
import torch

from ptp_testing import candidate_path_scores, maybe_reference_ops, copy_prompts, decode, randomize_slot_drafter, repeat_sequences
from ptp.drafters import make_drafter
from ptp.drafters.ptp_drafter import PTPDrafter, PTPSlotDrafter
from ptp.decode.lora import GatedLoRALinear, LoRAConfig
from ptp.models import tiny_model
from ptp.drafters.ptp_model import PTPConfig, PTPModel
from ptp.drafters.sampler_head import CopyInputs, teacher_copy_matches
from ptp.decode.sampling import SamplingConfig
from ptp.train.checkpoint import load_adapter, save_adapter
from ptp.train.trainer import TrainConfig, batch_loss

VOCAB = 97
K = 4


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _model(copy: bool = True, sampler: bool = True, variant: str = "optp", temperature: float = 0.0,
           randomize: bool = True, seed: int = 0, tie: bool = False) -> PTPModel:
    base = tiny_model("llama", vocab_size=VOCAB, seed=seed, tie_word_embeddings=tie)
    m = PTPModel(base, PTPConfig(variant=variant, num_slots=K, temperature=temperature,
                                 lora=LoRAConfig(rank=4, alpha=8), sampler=sampler or copy, copy_attn=copy))
    if randomize:
        randomize_slot_drafter(m)
    return m.eval()


@torch.no_grad()
@pytest.mark.parametrize("anchor", [4, 9, 15])
def test_training_inputs_are_the_drafters(anchor):
    """Slot j >= 1 of a window anchored at ``a`` (its slot 0 predicts token a) is trained on the data
    token ``a + j - 1`` and ``teacher_copy_matches(ids, a - 1, k - 1)``: exactly what drafting
    computes once verification picked token a, with the data's tokens drafted before slot j (same
    logits, slot by slot); one place off they differ (the test can fail)."""
    m = _model()
    g = torch.Generator().manual_seed(5)
    unit = torch.randint(3, 12, (7,), generator=g)
    ids = torch.cat([unit, unit, unit[:3], unit, unit])
    z = torch.randn(K, m.embedding().shape[1], generator=g)
    c = teacher_copy_matches(ids.unsqueeze(0), torch.tensor([anchor - 1]), K - 1, m.config.copy_matches)
    M = c.values.shape[-1]
    copy = CopyInputs(c.values.reshape(-1, M), c.feats.reshape(-1, M, 3), c.valid.reshape(-1, M))
    train_logits = m.logits(m.sampler_hidden(z[1:], ids[anchor:anchor + K - 1], torch.arange(1, K), copy=copy))
    seen = []

    def forced(j, logits):
        seen.append(logits)
        return int(ids[anchor + j])

    m.draft_chain(z, int(ids[anchor]), forced, context=ids[:anchor + 1].tolist(), first_slot=1)
    assert len(seen) == K - 1 and bool(copy.valid.any())
    torch.testing.assert_close(torch.stack(seen), train_logits.float(), rtol=1e-4, atol=1e-4)
    seen.clear()
    m.draft_chain(z, int(ids[anchor - 1]), forced, context=ids[:anchor].tolist(), first_slot=1)
    assert not torch.allclose(torch.stack(seen), train_logits.float(), rtol=1e-4, atol=1e-4)


def test_batch_loss_adds_the_sampler_and_trains_every_tensor():
    """The loss of a sampler adapter is the sampler's CE plus the slots' own CE (so it exceeds the
    plain adapter's own-CE term alone at equal LoRA), and its gradient reaches the LoRA, the
    u-embedding, the sampler head and the copy tensors (all but the unused slot-0 rows)."""
    m = _model()
    m.train()
    seqs = repeat_sequences(2, 3, VOCAB)
    cfg = TrainConfig(windows_per_seq=6)
    res = batch_loss(m, seqs, cfg, torch.Generator().manual_seed(0), random.Random(0))
    loss = sum(r[0] for r in res)
    loss.backward()
    assert m.sampler.fc1.weight.grad is not None and m.sampler.fc1.weight.grad.abs().sum() > 0
    for name in ("copy_score", "copy_null", "copy_gate"):
        grad = getattr(m, name).grad
        assert grad[1:].abs().sum() > 0, name
        assert grad[0].abs().sum() == 0, name  # slot 0 keeps the plain LM head
    assert m.copy_proj.grad.abs().sum() > 0
    assert m.u_embed.knots.grad.abs().sum() > 0
    lora = [mod.lora_A.grad for mod in m.modules() if isinstance(mod, GatedLoRALinear)]
    assert all(gr is not None for gr in lora) and sum(float(gr.abs().sum()) for gr in lora) > 0
    for _, metrics in res:
        assert len(metrics["acc"]) == K and 0.0 <= metrics["prefix"] <= K


def _train(m: PTPModel, seqs, steps: int, lr: float = 3e-2) -> float:
    """``steps`` steps of one sequence each; the mean prefix on held-out repeat sequences."""
    m.train()
    cfg = TrainConfig(windows_per_seq=8, lr=lr)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=lr)
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    for step in range(steps):
        loss, _ = batch_loss(m, [seqs[step % len(seqs)]], cfg, gen, rng)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        held = batch_loss(m, repeat_sequences(8, 99, VOCAB), TrainConfig(windows_per_seq=64), gen, random.Random(1))
    return sum(r[1]["prefix"] for r in held) / len(held)


def test_copy_sampler_learns_to_copy_where_the_plain_sampler_cannot():
    """Answers that repeat a random prompt: a copy-sampler adapter trained briefly drafts most of a
    held-out window (prefix of slots 1..3 near 3); the plain sampler, same steps, almost nothing."""
    seqs = repeat_sequences(60, 0, VOCAB)
    prefix = {}
    for copy in (False, True):
        torch.manual_seed(0)
        prefix[copy] = _train(_model(copy=copy, randomize=False, tie=True), seqs, 120)
    assert prefix[True] > 2.0 and prefix[False] < 0.5, prefix


def _generate(base, prompts, drafter, sampling, n=40):
    return decode(base, prompts, drafter, sampling, n)


def _prompts():
    return copy_prompts(VOCAB)


@pytest.mark.parametrize("variant,temperature", [("optp", 0.0), ("optp", 0.8), ("cptp", 0.8)])
@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("options", [{"scheme": "quadratic"}, {"scheme": "linear"}, {"scheme": "separate"},
                                     {"max_groups": 2, "lookup_ngram": 1, "check_first": True},
                                     {"min_prob": 0.05},
                                     {"max_groups": 1, "lookup_ngram": 1, "lookup_groups": 0, "lookup_tokens": 5}])
def test_sampler_adapter_decodes_exactly(variant, temperature, copy, options):
    """Greedy and coupled sampling with a sampler (or copy-sampler) adapter give plain decoding's
    tokens under every scheme and row saver."""
    m = _model(copy=copy, variant=variant, temperature=temperature)
    sampling = SamplingConfig(temperature=temperature, seed=4)
    plain, plain_calls = _generate(m.base, _prompts(), None, sampling)
    opts = dict(options)
    scheme = opts.pop("scheme", "quadratic")
    d = PTPDrafter(m) if scheme == "separate" else PTPSlotDrafter(m, scheme=scheme, **opts)
    spec, calls = _generate(m.base, _prompts(), d, sampling)
    assert spec == plain
    if scheme != "separate":
        assert calls <= plain_calls and d.groups_used > 0
        d.reset()
        assert not d._hist and not d._next


@pytest.mark.parametrize("copy,sampler", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("options", [{}, {"max_groups": 3, "max_nodes": 6, "top": 2}, {"lookup_ngram": 1},
                                     {"min_prob": 0.02}, {"lookup_ngram": 1, "lookup_branches": 3},
                                     {"lookup_ngram": 1, "lookup_branches": 2, "lookup_tokens": 7}])
def test_tree_decodes_exactly(copy, sampler, temperature, options):
    """Greedy trees over the slots (``tree=1``; at T > 0 coupled chains) decode plain decoding's
    tokens, with and without a sampler head; greedy trees take at most as many calls as plain."""
    m = _model(copy=copy, sampler=sampler)
    sampling = SamplingConfig(temperature=temperature, seed=4)
    plain, plain_calls = _generate(m.base, _prompts(), None, sampling)
    d = PTPSlotDrafter(m, tree=True, **options)
    spec, calls = _generate(m.base, _prompts(), d, sampling)
    assert spec == plain and calls <= plain_calls and d.groups_used > 0
    if "lookup_branches" in options:
        depth = options.get("lookup_tokens", K - 1)
        assert d.lookup.lookup_branches == options["lookup_branches"]
        assert d.max_drafts == 16 + depth * options["lookup_branches"]


def test_tree_merges_every_lookup_branch():
    """``lookup_branches=N``: the continuations of the N most recent longest matches all join the
    slots' tree as trie paths (room: k - 1 nodes each)."""
    from ptp.decode.draft import DraftRequest

    m = _model()
    d = PTPSlotDrafter(m, tree=True, lookup_ngram=1, lookup_branches=3)
    hist = [5, 9, 10, 11, 5, 12, 13, 5, 14, 15, 5]  # three earlier 5s, each a continuation
    d._next[0] = (len(hist) - 1, [20, 21, 22], [0, 0, 1])  # the slots' tree: 20, 21 below the root, 22 below 20
    draft = d.propose(DraftRequest(histories=[hist], sequence_ids=[0], max_nodes=64, sampling=SamplingConfig()))
    toks, pars = draft.tokens[0].tolist(), draft.parents[0].tolist()
    below_root = {toks[i] for i in range(1, len(toks)) if pars[i] == 0}
    assert below_root == {20, 21, 14, 12, 9}
    assert len(toks) == 1 + 3 + 3 + 4 + 4  # root, the slots' 3, then [14 15 5], [12 13 5 14], [9 10 11 5] (k = 4)


@pytest.mark.parametrize("lookup_tokens", [None, 6])
def test_tree_lookup_depth(lookup_tokens):
    """``lookup_tokens=L`` sets how deep lookup's continuations reach into a tree (default: k
    tokens), deeper than the slots' own depth."""
    from ptp.decode.draft import DraftRequest

    m = _model()
    d = PTPSlotDrafter(m, tree=True, lookup_ngram=1, lookup_tokens=lookup_tokens)
    hist = [5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 5]  # one earlier 5, nine tokens after it
    d._next[0] = (len(hist) - 1, [20, 21], [0, 0])  # the slots' tree: two nodes below the root
    draft = d.propose(DraftRequest(histories=[hist], sequence_ids=[0], max_nodes=64, sampling=SamplingConfig()))
    toks, pars = draft.tokens[0].tolist(), draft.parents[0].tolist()
    depth = lookup_tokens or K
    assert toks == [0, 20, 21] + list(range(9, 9 + depth)) and pars == [-1, 0, 0, 0] + list(range(3, 2 + depth))
    assert d.max_drafts == 16 + (lookup_tokens or K - 1)


@torch.no_grad()
@pytest.mark.parametrize("top,budget", [(2, 5), (3, 9)])
def test_tree_takes_the_best_paths_over_slots_one_on(top, budget):
    """The slot tree of slots 1..k-1 is the best ``budget`` prefixes (by path probability) of the
    candidate grid where slot 1 + d's sampler runs on each depth-d node's token: brute force over
    the ``top`` candidates per node agrees (node count, every node's path is among the best)."""
    m = _model()
    g = torch.Generator().manual_seed(11)
    z = torch.randn(K, m.embedding().shape[1], generator=g) * 3
    ctx = torch.randint(3, 12, (20,), generator=g).tolist()
    toks, pars = m.draft_tree(z, ctx[-1], ctx, budget, top, first_slot=1)
    assert len(toks) == budget

    def logprobs(d, tail):  # depth d's distribution after the path ending with tail = (y2, y1, y)
        from ptp.drafters.sampler_head import node_copy_inputs

        L = len(ctx)
        copy = node_copy_inputs(torch.tensor([ctx]), torch.tensor([L]), [tail], L - 1 + d, m.config.copy_matches)
        h = m.sampler_hidden(z[1 + d:2 + d], torch.tensor([tail[2]]), 1 + d, copy=copy, fused=True)
        return torch.log_softmax(m.logits(h)[0].float(), -1)

    scores = candidate_path_scores(logprobs, tuple(ctx[-3:]), K - 1, top)
    best = sorted(scores.values(), reverse=True)[:budget]
    paths = []
    for i in range(len(toks)):
        p, q = [], i + 1
        while q:
            p.append(toks[q - 1])
            q = pars[q - 1]
        paths.append(tuple(reversed(p)))
    got = sorted((scores[p] for p in paths), reverse=True)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(best), rtol=1e-4, atol=1e-4)


def test_checkpoint_roundtrip_init_from_and_errors(tmp_path):
    """A copy-sampler adapter saves and loads (same drafts), loads through ``make_drafter`` with tree
    options; a plain adapter inits a sampler one (``missing_ok``); mismatches are clear errors."""
    m = _model()
    save_adapter(m, str(tmp_path / "a"), extra={"step": 1})
    base2 = tiny_model("llama", vocab_size=VOCAB, seed=0)
    m2 = load_adapter(base2, str(tmp_path / "a"))
    for k, v in m.adapter_state_dict().items():
        torch.testing.assert_close(m2.adapter_state_dict()[k], v)
    d = make_drafter(str(tmp_path / "a"), tiny_model("llama", vocab_size=VOCAB, seed=0), tree="1", max_nodes="6",
                     top="2")
    assert isinstance(d, PTPSlotDrafter) and d.tree and d.max_nodes == 6 and d.needs_context
    plain = _model(copy=False, sampler=False)
    fresh = _model(randomize=False)
    fresh.load_adapter_state_dict(plain.adapter_state_dict(), missing_ok=True)
    with pytest.raises(ValueError, match="lacks"):
        _model(randomize=False).load_adapter_state_dict(plain.adapter_state_dict())
    with pytest.raises(ValueError, match="unexpected PTP sampler"):
        _model(copy=False, sampler=False).load_adapter_state_dict(m.adapter_state_dict())
    with pytest.raises(ValueError, match="needs sampler"):
        PTPConfig(copy_attn=True)
    with pytest.raises(ValueError, match="num_slots >= 2"):
        PTPConfig(num_slots=1, sampler=True)
    with pytest.raises(ValueError, match="quadratic"):
        PTPSlotDrafter(m, scheme="linear", tree=True)
    with pytest.raises(ValueError, match="sampler head has"):
        PTPSlotDrafter(m, num_slots=K + 2)
    with pytest.raises(ValueError, match="context"):
        m.draft_chain(torch.zeros(K, m.embedding().shape[1]), 5, context=None, first_slot=1)


def test_cli_trains_a_copy_sampler_from_a_plain_adapter(tmp_path, monkeypatch):
    """``ptp train ptp --copy-attn --init-from PLAIN`` starts from the plain adapter's LoRA and
    u-embedding and saves a copy-sampler adapter that decodes exactly."""
    from ptp.train import cli as train_cli
    import ptp.train.models as tm

    seqs = repeat_sequences(6, 1, VOCAB)
    from ptp.train.data import DataConfig, save_sequences

    save_sequences(str(tmp_path / "data"), seqs, DataConfig(num_prompts=6), ["p"] * 6)
    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    plain = PTPModel(base, PTPConfig(num_slots=K, lora=LoRAConfig(rank=4, alpha=8)))
    with torch.no_grad():
        plain.u_embed.knots.add_(1.0)
    save_adapter(plain, str(tmp_path / "plain"))

    monkeypatch.setattr(tm, "load_target", lambda *a, **k: (tiny_model("llama", vocab_size=VOCAB, seed=0), None))
    rc = train_cli.main(["ptp", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data"), "--slots", str(K),
                         "--rank", "4", "--alpha", "8", "--copy-attn", "--init-from", str(tmp_path / "plain"),
                         "--steps", "3", "--lr", "0", "--windows", "4", "--no-progress"])
    assert rc == 0
    out = load_adapter(tiny_model("llama", vocab_size=VOCAB, seed=0), str(tmp_path / "out"))
    assert out.config.sampler and out.config.copy_attn
    torch.testing.assert_close(out.u_embed.knots, plain.u_embed.knots)  # lr 0: the init survives
    sampling = SamplingConfig()
    want, _ = _generate(out.base, _prompts(), None, sampling)
    got, _ = _generate(out.base, _prompts(), PTPSlotDrafter(out, tree=True), sampling)
    assert got == want


def _counts(seed: int = 3) -> torch.Tensor:
    return torch.rand(VOCAB, generator=torch.Generator().manual_seed(seed)) * 100


@torch.no_grad()
@pytest.mark.parametrize("copy,sampler", [(True, True), (False, False)])
def test_draft_vocab_greedy_chain_and_tree_are_restricted_argmaxes(copy, sampler):
    """With a draft vocabulary of the K most frequent tokens, greedy drafting (chain and tree) is
    the full logits' argmax / top over those K tokens only (reference: the full LM head with the
    other tokens masked out); draft_vocab=0 is the full vocabulary again; with a pick (sampling)
    the full vocabulary is used."""
    m = _model(copy=copy, sampler=sampler)
    m.set_token_counts(_counts())
    g = torch.Generator().manual_seed(2)
    z = torch.randn(K, m.embedding().shape[1], generator=g) * 3
    ctx = torch.randint(3, 12, (20,), generator=g).tolist()
    full = m.draft_chain(z, ctx[-1], context=ctx, first_slot=1)
    m.set_draft_vocab(30)
    keep = torch.sort(-m.token_counts, stable=True).indices[:30]
    assert torch.equal(m.vocab_ids, keep.sort().values)
    masked = torch.full((VOCAB,), float("-inf"))
    masked[keep] = 0.0
    seen = []

    def restricted(j, lg):
        seen.append(j)
        return int((lg + masked).argmax())

    got = m.draft_chain(z, ctx[-1], context=ctx, first_slot=1)
    assert got == m.draft_chain(z, ctx[-1], restricted, context=ctx, first_slot=1) and seen == [1, 2, 3]
    assert set(got) <= set(keep.tolist())
    toks, _ = m.draft_tree(z, ctx[-1], ctx, 6, 2, first_slot=1)
    assert set(toks) <= set(keep.tolist())
    m.set_draft_vocab(0)
    assert m.vocab_ids is None and m.draft_chain(z, ctx[-1], context=ctx, first_slot=1) == full
    m.set_draft_vocab(VOCAB)  # the whole vocabulary: no restriction
    assert m.draft_vocab is None


@pytest.mark.parametrize("options", [{"scheme": "quadratic"}, {"scheme": "separate"}, {"tree": True, "lookup_ngram": 1},
                                     {"min_prob": 0.05}])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_draft_vocab_decodes_exactly(options, temperature):
    """A small draft vocabulary (20 of 97 tokens) changes the drafts, never the output: greedy and
    coupled sampling give plain decoding's tokens; drafting outside the draft vocabulary still
    happens at T > 0 (the slots' sampled picks use the full distribution)."""
    m = _model()
    m.set_token_counts(_counts())
    sampling = SamplingConfig(temperature=temperature, seed=4)
    plain, _ = _generate(m.base, _prompts(), None, sampling)
    opts = dict(options)
    scheme = opts.pop("scheme", "quadratic")
    d = (PTPDrafter(m, draft_vocab=20) if scheme == "separate"
         else PTPSlotDrafter(m, scheme=scheme, draft_vocab=20, **opts))
    assert m.vocab_ids.numel() == 20
    spec, _ = _generate(m.base, _prompts(), d, sampling)
    assert spec == plain


def test_token_counts_roundtrip_auto_vocab_and_errors(tmp_path):
    """Token counts save with a slot adapter (float32 even in a float16 checkpoint) and load back;
    a drafter over such a checkpoint drafts over AUTO_DRAFT_VOCAB tokens by default (here more than
    the vocabulary: the full one; draft_vocab=N through make_drafter); without counts a draft
    vocabulary is a clear error, and wrong-shaped counts too."""
    m = _model()
    m.set_token_counts(_counts())
    save_adapter(m, str(tmp_path / "a"), dtype=torch.float16)
    m2 = load_adapter(tiny_model("llama", vocab_size=VOCAB, seed=0), str(tmp_path / "a"))
    assert m2.token_counts.dtype == torch.float32 and torch.equal(m2.token_counts, m.token_counts)
    d = make_drafter(str(tmp_path / "a"), tiny_model("llama", vocab_size=VOCAB, seed=0))
    assert d.model.token_counts is not None and d.model.vocab_ids is None
    d = make_drafter(str(tmp_path / "a"), tiny_model("llama", vocab_size=VOCAB, seed=0), draft_vocab="16")
    assert d.model.vocab_ids.numel() == 16
    with pytest.raises(ValueError, match="token counts"):
        _model().set_draft_vocab(8)
    with pytest.raises(ValueError, match="expected shape"):
        _model().set_token_counts(torch.ones(VOCAB + 1))
    with pytest.raises(ValueError, match=">= 0"):
        m.set_draft_vocab(-1)
