"""The masked-input drafter's copy sampler (``MaskedConfig(copy_attn=True)``): the sampler head also
attends over the committed context's earlier occurrences of the token it reads. Its block equals
a loop reference, training reads the same matches decoding computes, decoding stays exact
(greedy and coupled sampling), the frozen-adapter stage trains only the sampler, checkpoints and
``ptp train masked --copy-attn --init-from --freeze-adapter`` work (tiny models). Also the
masked-input drafter's greedy trees (``tree=True``): the best paths of the sampler's candidate
grid, decoded exactly with groups after the first nodes."""
from __future__ import annotations

import random

import pytest
import torch

from ptp_testing import (candidate_path_scores, copy_inputs_from_rows, copy_matches_loop, copy_sampler_loop,
                          maybe_reference_ops, copy_prompts, decode, randomize_slot_drafter, repeat_sequences)
from ptp.drafters import make_drafter
from ptp.drafters.masked import MaskedInputDrafter
from ptp.decode.lora import LoRAConfig
from ptp.models import tiny_model
from ptp.drafters.masked_model import CopyInputs, MaskedConfig, MaskedModel, teacher_copy_matches
from ptp.decode.sampling import SamplingConfig
from ptp.train.checkpoint import load_masked, save_adapter
from ptp.train.masked import masked_sequence_loss
from ptp.train.trainer import TrainConfig

VOCAB = 97
K = 4


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _model(copy: bool = True, seed: int = 0, randomize: bool = True, tie: bool = False) -> MaskedModel:
    base = tiny_model("llama", vocab_size=VOCAB, seed=seed, tie_word_embeddings=tie)
    m = MaskedModel(base, MaskedConfig(num_masks=K, lora=LoRAConfig(rank=4, alpha=8), copy_attn=copy))
    if randomize:
        randomize_slot_drafter(m)
    return m.eval()


@torch.no_grad()
def test_copy_sampler_equals_the_loop_reference():
    """Per mask (an int index) and for rows of mixed masks (an index tensor), the copy sampler is
    its formula computed by loops; other matches give another output; zero copy parameters give the
    plain sampler bit for bit; a copy sampler without copy inputs is refused."""
    m = _model()
    g = torch.Generator().manual_seed(3)
    hist = torch.randint(3, 9, (30,), generator=g).tolist()
    d = m.embedding().shape[1]
    z = torch.randn(K, d, generator=g)
    path = hist[-3:] + torch.randint(3, 9, (K,), generator=g).tolist()
    rows, prevs = [], []
    for j in range(K):
        rows.append(copy_matches_loop(hist, path[j], path[j + 1], path[j + 2], len(hist) - 1 + j, 16))
        prevs.append(path[j + 2])
    assert sum(len(r) for r in rows) >= K  # matches to attend to
    prev = torch.tensor(prevs)
    together = m.sampler_hidden(z, prev, torch.arange(K), copy=copy_inputs_from_rows(rows))
    for j in range(K):
        want = copy_sampler_loop(m, z[j], prevs[j], j, rows[j])
        one = m.sampler_hidden(z[j:j + 1], prev[j:j + 1], j, copy=copy_inputs_from_rows([rows[j]]))
        torch.testing.assert_close(one[0], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together[j], want, rtol=1e-5, atol=1e-5)
        fused = m.sampler_hidden(z[j:j + 1], prev[j:j + 1], j, copy=copy_inputs_from_rows([rows[j]]), fused=True)
        torch.testing.assert_close(fused[0], want, rtol=1e-4, atol=1e-4)
    other = m.sampler_hidden(z, prev, torch.arange(K), copy=copy_inputs_from_rows([[] for _ in range(K)]))
    assert not torch.allclose(other, together)
    plain = _model(copy=False)
    zero = _model(randomize=False)
    zero.load_adapter_state_dict({**plain.adapter_state_dict(),
                                  **{n: getattr(zero, n) for n in MaskedModel.COPY_NAMES}})
    assert torch.equal(zero.sampler_hidden(z, prev, torch.arange(K), copy=copy_inputs_from_rows(rows)),
                       plain.sampler_hidden(z, prev, torch.arange(K)))
    with pytest.raises(ValueError, match="copy_attn"):
        m.sampler_hidden(z, prev, torch.arange(K))
    with pytest.raises(ValueError, match="queries"):
        m.sampler_hidden(z, prev, torch.arange(K), copy=copy_inputs_from_rows(rows[:2]))


@torch.no_grad()
@pytest.mark.parametrize("anchor", [4, 9, 15])
def test_training_copy_inputs_are_the_drafters(anchor):
    """What training feeds mask j of a window anchored at ``a`` (``teacher_copy_matches(ids, a - 1)``)
    is what drafting computes after verifying token ``a`` with the data's tokens drafted before
    mask j: same logits, mask by mask; one place off, they differ (the test can fail)."""
    m = _model()
    g = torch.Generator().manual_seed(5)
    unit = torch.randint(3, 12, (7,), generator=g)
    ids = torch.cat([unit, unit, unit[:3], unit, unit])  # repeats: many matches
    d = m.embedding().shape[1]
    z = torch.randn(K, d, generator=g)
    c = teacher_copy_matches(ids.unsqueeze(0), torch.tensor([anchor - 1]), K, m.config.copy_matches)
    M = c.values.shape[-1]
    copy = CopyInputs(c.values.reshape(-1, M), c.feats.reshape(-1, M, 3), c.valid.reshape(-1, M))
    train_h = m.sampler_hidden(z, ids[anchor:anchor + K], torch.arange(K), copy=copy)
    train_logits = m.logits(train_h).float()
    seen = []

    def forced(j, logits):  # teacher forcing: draft the data's token, keep the logits
        seen.append(logits)
        return int(ids[anchor + 1 + j])

    m.draft_chain(z, int(ids[anchor]), forced, context=ids[:anchor + 1].tolist())
    torch.testing.assert_close(torch.stack(seen), train_logits, rtol=1e-4, atol=1e-4)
    assert bool(copy.valid.any())
    seen.clear()
    m.draft_chain(z, int(ids[anchor - 1]), forced, context=ids[:anchor].tolist())
    assert not torch.allclose(torch.stack(seen), train_logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="context"):
        m.draft_chain(z, int(ids[anchor]), context=None)


def _generate(base, prompts, drafter, sampling, n=40):
    return decode(base, prompts, drafter, sampling, n)


def _prompts():
    return copy_prompts(VOCAB)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("options", [{"scheme": "quadratic"}, {"scheme": "linear"},
                                     {"max_groups": 2, "lookup_ngram": 1},
                                     {"max_groups": 1, "lookup_ngram": 1, "lookup_groups": 0, "lookup_tokens": 5}])
def test_copy_sampler_decodes_exactly(temperature, options):
    """Greedy and coupled sampling with a copy sampler give plain decoding's tokens, whatever the
    scheme (the sampler reads each row's committed tokens, kept across steps)."""
    m = _model()
    sampling = SamplingConfig(temperature=temperature, seed=4)
    plain, plain_calls = _generate(m.base, _prompts(), None, sampling)
    d = MaskedInputDrafter(m, **options)
    spec, calls = _generate(m.base, _prompts(), d, sampling)
    assert spec == plain
    assert calls <= plain_calls and d.groups_used > 0
    assert (d.groupless_rows > 0) == (options.get("lookup_groups") == 0)
    d.reset()
    assert not d._hist and not d._next


def test_frozen_adapter_trains_only_the_sampler_and_learns_to_copy():
    """``freeze_adapter``: LoRA and masks keep their values, real rows stay the target's, the
    sampler learns. On answers that repeat their prompt, a copy sampler trained this way drafts the
    held-out answers; the plain sampler, trained the same way from the same adapter, cannot."""
    train_seqs, held = repeat_sequences(60, 0, VOCAB), repeat_sequences(8, 1, VOCAB)
    cfg = TrainConfig(windows_per_seq=8, lr=3e-2)
    prefix = {}
    for copy in (False, True):
        m = _model(copy=copy, randomize=False, tie=True)
        if copy:
            with torch.no_grad():  # the same adapter as the plain run (the copy tensors start at zero)
                m.load_adapter_state_dict(ref_state, missing_ok=True)
        else:
            ref_state = {k: v.clone() for k, v in m.adapter_state_dict().items()}
        m.freeze_adapter()
        frozen = {k: v.clone() for k, v in m.adapter_state_dict().items() if not k.startswith(("sampler", "copy"))}
        ids = held[0].ids.unsqueeze(0)
        real = m.base(ids).logits
        opt = torch.optim.AdamW(m.trainable_parameters(), lr=cfg.lr)
        rng = random.Random(0)
        for step in range(120):
            loss, _ = masked_sequence_loss(m, train_seqs[step % len(train_seqs)], cfg, torch.Generator(), rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for k, v in m.adapter_state_dict().items():
            if k in frozen:
                assert torch.equal(v, frozen[k]), k
        assert torch.equal(m.base(ids).logits, real)
        with torch.no_grad():
            res = [masked_sequence_loss(m, s, TrainConfig(windows_per_seq=64), torch.Generator(), random.Random(1))
                   for s in held]
        prefix[copy] = sum(r[1]["prefix"] for r in res) / len(res)
    assert prefix[True] > 2.5 and prefix[False] < 0.5, prefix


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = _model()
    save_adapter(m, str(tmp_path / "copy"))
    base2 = tiny_model("llama", vocab_size=VOCAB, seed=0)
    m2 = load_masked(base2, str(tmp_path / "copy"))
    assert m2.config.copy_attn
    for (k, v), (k2, v2) in zip(sorted(m.adapter_state_dict().items()), sorted(m2.adapter_state_dict().items())):
        assert k == k2 and torch.equal(v, v2)
    d = make_drafter(str(tmp_path / "copy"), tiny_model("llama", vocab_size=VOCAB, seed=0))
    assert isinstance(d, MaskedInputDrafter) and d.needs_context
    plain = _model(copy=False)
    with pytest.raises(ValueError, match="lacks 'copy_score'"):
        _model(randomize=False).load_adapter_state_dict(plain.adapter_state_dict())
    with pytest.raises(ValueError, match="unexpected masked-input tensors"):
        plain.load_adapter_state_dict(m.adapter_state_dict())
    bad = {**m.adapter_state_dict(), "copy_gate": torch.zeros(K + 1, m.copy_gate.shape[1])}
    with pytest.raises(ValueError, match="copy_gate: expected shape"):
        _model(randomize=False).load_adapter_state_dict(bad)
    with pytest.raises(ValueError, match="needs sampler"):
        MaskedConfig(copy_attn=True, sampler=False)


def test_cli_copy_sampler_from_a_trained_drafter(tmp_path, monkeypatch):
    """``ptp train masked --copy-attn --init-from DIR --freeze-adapter``: starts from DIR's drafter
    (LoRA, masks, sampler), trains the sampler and its copy attention only, saves a checkpoint that
    loads as a drafter; ``--freeze-adapter`` alone is refused."""
    import ptp.train.models as tm
    from ptp.train.cli import main
    from ptp.train.data import DataConfig, save_sequences

    def fresh():  # each run wraps its own target in a gated LoRA
        return tiny_model("llama", vocab_size=VOCAB, seed=0)

    monkeypatch.setattr(tm, "load_target", lambda *a, **k: (fresh(), None))
    data = str(tmp_path / "data")
    seqs = repeat_sequences(6, 2, VOCAB)
    save_sequences(data, seqs, DataConfig(num_prompts=6), ["p"] * 6)
    common = ["--data", data, "--masks", str(K), "--rank", "4", "--alpha", "8", "--windows", "4",
              "--lr", "1e-2", "--no-progress", "--device", "cpu"]
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert main(["masked", "--out", first] + common + ["--steps", "4"]) == 0
    assert main(["masked", "--out", second, "--copy-attn", "--init-from", first, "--freeze-adapter",
                 "--steps", "6"] + common) == 0
    a, b = load_masked(fresh(), first).adapter_state_dict(), load_masked(fresh(), second).adapter_state_dict()
    for k, v in a.items():
        if k.startswith("sampler."):
            assert not torch.equal(v, b[k]), k  # trained
        else:
            assert torch.equal(v, b[k]), k  # LoRA and masks: as initialised
    assert b["copy_gate"].abs().sum() > 0 and b["copy_proj"].abs().sum() > 0
    assert isinstance(make_drafter(second, fresh()), MaskedInputDrafter)
    with pytest.raises(ValueError, match="--init-from"):
        main(["masked", "--out", str(tmp_path / "x"), "--freeze-adapter", "--steps", "1"] + common)


def _tree_paths(tokens, parents):
    """Each node's token path from the root (nodes 1..n; parent 0 = the root, parents first)."""
    paths = []
    for i, par in enumerate(parents):
        assert 0 <= par <= i
        p, j = [tokens[i]], par
        while j > 0:
            p.append(tokens[j - 1])
            j = parents[j - 1]
        paths.append(tuple(reversed(p)))
    return paths


@torch.no_grad()
@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("top,budget", [(2, 5), (3, 10), (200, 7)])
def test_tree_takes_the_best_paths_of_the_samplers_grid(copy, top, budget):
    """``draft_tree``: the ``budget`` best paths (product of mask d's sampler probabilities, each
    given its path: the previous token and, for a copy sampler, its path's context matches by the
    loop reference) of the candidate grid, found by brute force over three masks."""
    m = _model(copy=copy)
    d = MaskedInputDrafter(m, num_slots=3, tree=True, max_nodes=budget, top=top)
    g = torch.Generator().manual_seed(top + budget)
    z = torch.randn(3, m.embedding().shape[1], generator=g)
    hist = torch.randint(3, 12, (25,), generator=g).tolist()

    def lp(i, tail):  # mask i's log-probabilities after the path ending with tail = (y2, y1, y)
        c = copy_inputs_from_rows([copy_matches_loop(hist, *tail, len(hist) - 1 + i, 16)]) if copy else None
        h = m.sampler_hidden(z[i:i + 1], torch.tensor([tail[2]]), i, copy=c)
        return torch.log_softmax(m.logits(h)[0].float(), -1)

    scores = candidate_path_scores(lp, tuple(hist[-3:]), 3, min(top, budget + 1))
    tokens, parents = d.draft_tree(z, hist[-1], hist)
    assert len(tokens) == min(budget, len(scores))
    paths = _tree_paths(tokens, parents)
    assert len(set(paths)) == len(paths) and all(p in scores for p in paths)
    best = sorted(scores.values(), reverse=True)[:budget]
    assert sorted((scores[p] for p in paths), reverse=True) == pytest.approx(best, abs=1e-4)
    got = [scores[p] for p in paths]
    assert got == sorted(got, reverse=True) or top == 200  # best-first order (ties aside)


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("options", [{}, {"max_groups": 3, "max_nodes": 6, "top": 2}, {"lookup_ngram": 1},
                                     {"min_prob": 0.2}])
def test_tree_decodes_exactly(copy, temperature, options):
    """Trees (greedy; at T > 0 the drafter drafts coupled chains) give plain decoding's tokens with
    fewer target calls; lookup's continuation joins the tree as a trie path."""
    m = _model(copy=copy)
    sampling = SamplingConfig(temperature=temperature, seed=4)
    plain, plain_calls = _generate(m.base, _prompts(), None, sampling)
    d = MaskedInputDrafter(m, tree=True, **options)
    spec, calls = _generate(m.base, _prompts(), d, sampling)
    assert spec == plain
    assert d.groups_used > 0
    # an untrained tiny model's drafts are rarely above a path probability of 0.2
    assert calls < plain_calls if "min_prob" not in options else calls <= plain_calls
    if options.get("lookup_ngram"):
        assert d.lookup_used > 0


def test_tree_options_and_errors():
    m = _model()
    with pytest.raises(ValueError, match="quadratic"):
        MaskedInputDrafter(m, tree=True, scheme="linear")
    with pytest.raises(ValueError, match="max_nodes"):
        MaskedInputDrafter(m, tree=True, max_nodes=0)
    with pytest.raises(ValueError, match="min_prob"):
        MaskedInputDrafter(m, tree=True, min_prob=1.0)
    d = MaskedInputDrafter(m, tree="1", max_nodes=12)
    assert d.tree and d.max_drafts == 12 and d.aux_room(64) == K * 13
    assert MaskedInputDrafter(m, tree=True, max_groups=2).aux_room(64) == 2 * K
    assert MaskedInputDrafter(m, tree=True, lookup_ngram=1).max_drafts == 16 + K
    with pytest.raises(ValueError, match="context"):
        d.draft_tree(torch.zeros(K, m.embedding().shape[1]), 5, None)
