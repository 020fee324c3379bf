"""MTP heads trained on cached hidden states (``ptp.train.heads``): the cache equals the target's
own hidden states, the anchors and the loss equal the direct computation, resume equals an
uninterrupted run, a trained checkpoint decodes exactly (tiny models)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ptp_testing import maybe_reference_ops
from ptp.decode.decoder import Decoder, GenerationConfig
from ptp.drafters import make_drafter
from ptp.models import tiny_model
from ptp.drafters.heads_model import HeadsConfig, MTPHeads
from ptp.train.data import Sequence, answer_token_counts
from ptp.train.heads import (HeadsTrainConfig, _losses, _Vocab, answer_hidden_states, head_positions,
                             load_or_compute_hidden, teacher_topk, train_heads_cached)

VOCAB = 97


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _seqs(base, n=8, seed=0):
    """Greedy answers of the tiny target to random prompts of varied lengths (as the data is)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(n):
            p = torch.randint(3, VOCAB, (1, 4 + (i * 3) % 9), generator=g)
            new = 10 + (i * 5) % 13
            ids = base.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0)
            out.append(Sequence(ids[0], p.shape[1]))
    return out


def _heads(base, token_input=True, n=3):
    """``token_input``: a bool, "chain" for chain-input heads (head i reads token t+1+i) or "copy"
    (chain input and the context attention)."""
    return MTPHeads(base, HeadsConfig(num_heads=n, token_input=bool(token_input),
                                      chain_input=token_input == "chain", copy_attn=token_input == "copy"))


def _copy_ref(seqs, pos, n):
    """Copy inputs ``[P, n, M]`` of every anchor from the loop reference (teacher-forced: head i
    reads the data token t+1+i; the context is the sequence through t+1)."""
    from ptp_testing import copy_matches_loop
    from ptp.drafters.masked_model import CopyInputs

    rows = []
    for q, t in zip(pos.seq.tolist(), pos.t.tolist()):
        ids = seqs[q].ids.tolist()
        hist = ids[:t + 2]
        for i in range(n):
            p = t + 1 + i
            tail = [ids[k] if k >= 0 else -2 for k in (p - 2, p - 1, p)]
            rows.append(copy_matches_loop(hist, *tail, p, 16))
    M = max(1, max(len(r) for r in rows))
    vals = torch.zeros(len(rows), M, dtype=torch.long)
    feats = torch.zeros(len(rows), M, 3)
    valid = torch.zeros(len(rows), M, dtype=torch.bool)
    for r, row in enumerate(rows):
        for k, (v, *f) in enumerate(row):
            vals[r, k], valid[r, k] = v, True
            feats[r, k] = torch.tensor(f)
    P = len(pos)
    return CopyInputs(vals.view(P, n, M), feats.view(P, n, M, 3), valid.view(P, n, M))


def _head_tokens(pos, form):
    """What the heads read at each anchor, built here from the data: none, the committed token
    t+1, or (chain) tokens t+1 .. t+n."""
    if not form:
        return None
    if form in ("chain", "copy"):
        return torch.stack([pos.next] + [pos.targets[:, i] for i in range(pos.targets.shape[1] - 1)], 1)
    return pos.next


def test_hidden_states_are_the_targets_own():
    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    seqs = _seqs(base)
    H, off = answer_hidden_states(base, seqs, batch_tokens=40, progress=False)  # several padded batches
    assert H.dtype == torch.float16 and off.numel() == len(seqs) + 1 and H.shape[0] == int(off[-1])
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = base.model(input_ids=s.ids.view(1, -1)).last_hidden_state[0]
            rows = ref[s.prompt_len - 1:s.ids.numel() - 1]
            assert off[i + 1] - off[i] == rows.shape[0]
            torch.testing.assert_close(H[off[i]:off[i + 1]].float(), rows, atol=2e-3, rtol=2e-3)


def test_head_positions_index_the_right_tokens():
    seqs = [Sequence(torch.arange(10, 22), 4), Sequence(torch.arange(30, 37), 5), Sequence(torch.arange(50, 60), 3)]
    off = torch.tensor([0, 8, 10, 17])
    pos = head_positions(seqs, off, num_heads=3)
    # sequence 0: anchors 3 .. 12-2-3=7; sequence 1 (L=7, n=3): anchors 4 .. 2: none; sequence 2: 2 .. 5
    assert pos.rows.tolist() == [0, 1, 2, 3, 4] + [10, 11, 12, 13]
    assert pos.next.tolist() == [14, 15, 16, 17, 18] + [53, 54, 55, 56]
    assert pos.targets[0].tolist() == [15, 16, 17] and pos.targets[-1].tolist() == [57, 58, 59]
    held = head_positions(seqs, off, num_heads=3, which=[2])
    assert held.rows.tolist() == [10, 11, 12, 13]


@pytest.mark.parametrize("token_input", [False, True, "chain", "copy"])
@pytest.mark.parametrize("train_vocab", [0, 8])
def test_loss_is_the_heads_cross_entropy(token_input, train_vocab):
    from ptp.train.heads import _copy_for, padded_ids

    base = tiny_model("llama", vocab_size=VOCAB, seed=1)
    h = _heads(base, token_input)
    with torch.no_grad():
        h.proj.normal_(0, 0.2)
        if token_input:
            h.tok_proj.normal_(0, 0.2)
        if token_input == "copy":
            h.copy_proj.normal_(0, 0.2)
            h.copy_gate.normal_(0, 1.0)
    seqs = _seqs(base, n=4)
    h.set_token_counts(answer_token_counts(seqs, VOCAB))
    H, off = answer_hidden_states(base, seqs, progress=False)
    pos = head_positions(seqs, off, 3)
    vocab = _Vocab(h, train_vocab, "cpu")
    x = H[pos.rows].float()
    # the training path's copy inputs (padded ids of all sequences) vs the loop reference's
    copy = _copy_for(h, padded_ids(seqs), pos, torch.arange(len(pos)), "cpu")
    ref_copy = _copy_ref(seqs, pos, 3) if token_input == "copy" else None
    if ref_copy is not None:
        assert int(ref_copy.valid.sum()) > 0
    loss, hit = _losses(h, vocab, x, pos.next, pos.targets, copy=copy)
    full = h.logits(x, _head_tokens(pos, token_input), copy=ref_copy)  # [P, n, V]
    if train_vocab:
        h.set_draft_vocab(train_vocab)
        assert torch.equal(vocab.ids, h.vocab_ids)  # the decoder's draft vocabulary
        full = full[..., vocab.ids]
    tk = vocab.index[pos.targets]
    ref = sum(F.cross_entropy(full[:, i], tk[:, i], ignore_index=-100) for i in range(3)) / 3
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(hit, (full.argmax(-1) == tk).float())
    if train_vocab:
        assert bool((tk < 0).any())  # some targets outside the draft vocabulary: skipped


def test_teacher_rows_hold_the_targets_prediction_of_each_heads_token():
    """Head i's distillation target at anchor t is the LM head on row ``rows + 1 + i`` of the cache
    (h_{t+1+i}); on the target's own greedy text its argmax is the data token t+2+i."""
    base = tiny_model("llama", vocab_size=VOCAB, seed=2)
    seqs = _seqs(base, n=6)
    H, off = answer_hidden_states(base, seqs, progress=False)
    pos = head_positions(seqs, off, 3)
    with torch.no_grad():
        for i in range(3):
            pred = base.lm_head(H[pos.rows + 1 + i].float()).argmax(-1)
            assert (pred == pos.targets[:, i]).float().mean() > 0.99  # float16 cache: near ties may flip
            assert not torch.equal(pred, pos.targets[:, (i + 1) % 3])


def _soft_setup(train_vocab=12):
    base = tiny_model("llama", vocab_size=VOCAB, seed=1)
    h = _heads(base)
    with torch.no_grad():
        h.proj.normal_(0, 0.2)
        h.tok_proj.normal_(0, 0.2)
    seqs = _seqs(base, n=4)
    h.set_token_counts(answer_token_counts(seqs, VOCAB))
    H, off = answer_hidden_states(base, seqs, progress=False)
    pos = head_positions(seqs, off, 3)
    return base, h, H, pos, _Vocab(h, train_vocab, "cpu")


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_soft_loss_mixes_data_and_target_distribution(w):
    base, h, H, pos, vocab = _soft_setup(train_vocab=8)
    x = H[pos.rows].float()
    teacher = [H[pos.rows + 1 + i].float() for i in range(3)]
    loss, _ = _losses(h, vocab, x, pos.next, pos.targets, teacher, w)
    full = h.logits(x, pos.next)[..., vocab.ids]  # [P, n, 8]
    tk = vocab.index[pos.targets]
    ref = 0.0
    for i in range(3):
        p = torch.softmax(base.lm_head(teacher[i])[:, vocab.ids], -1)
        soft = -(p * torch.log_softmax(full[:, i], -1)).sum(-1).mean()
        ref = ref + ((1 - w) * F.cross_entropy(full[:, i], tk[:, i], ignore_index=-100) + w * soft) / 3
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    plain, _ = _losses(h, vocab, x, pos.next, pos.targets)
    if w == 0.0:
        torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    else:
        assert abs(float(loss.detach()) - float(plain.detach())) > 1e-4
    with pytest.raises(ValueError, match="soft_weight"):
        HeadsTrainConfig(soft_weight=1.5)


def test_teacher_topk_is_the_targets_top_k_over_the_train_vocabulary():
    base, h, H, pos, vocab = _soft_setup()
    idx, p = teacher_topk(vocab, H, 5, chunk=7, progress=False)  # chunks that do not divide N
    assert idx.shape == p.shape == (H.shape[0], 5) and idx.dtype == torch.int32
    with torch.no_grad():
        ref = torch.softmax(base.lm_head(H.float())[:, vocab.ids], -1)
    v, i = ref.topk(5, -1)
    torch.testing.assert_close(p, v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref.gather(-1, idx.long()), v, rtol=1e-5, atol=1e-6)  # ties may swap ids
    assert (p[:, :-1] >= p[:, 1:]).all()
    full_idx, full_p = teacher_topk(vocab, H, 100, progress=False)  # k capped at the vocabulary
    assert full_idx.shape[1] == vocab.ids.numel()
    torch.testing.assert_close(full_p.sum(-1), torch.ones(H.shape[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w", [0.3, 1.0])
def test_soft_topk_loss_is_the_exact_loss_restricted_to_the_top_k(w):
    """With K = the whole train vocabulary the precomputed targets give the exact loss; with a
    smaller K, exactly the exact loss's terms of the K most likely tokens."""
    base, h, H, pos, vocab = _soft_setup()
    x = H[pos.rows].float()
    teacher = [H[pos.rows + 1 + i].float() for i in range(3)]
    r = pos.rows.unsqueeze(1) + 1 + torch.arange(3)
    exact, hit_exact = _losses(h, vocab, x, pos.next, pos.targets, teacher, w)
    idx, p = teacher_topk(vocab, H, vocab.ids.numel(), progress=False)
    full, hit = _losses(h, vocab, x, pos.next, pos.targets, None, w, teacher_topk=(idx[r], p[r]))
    torch.testing.assert_close(full, exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(hit, hit_exact)
    idx, p = teacher_topk(vocab, H, 3, progress=False)
    got, _ = _losses(h, vocab, x, pos.next, pos.targets, None, w, teacher_topk=(idx[r], p[r]))
    logits = h.logits(x, pos.next)[..., vocab.ids]
    tk = vocab.index[pos.targets]
    ref = 0.0
    for i in range(3):
        logp = torch.log_softmax(logits[:, i], -1)
        q = torch.softmax(base.lm_head(teacher[i])[:, vocab.ids], -1)
        top = q.topk(3, -1)
        soft = -(top.values * logp.gather(-1, top.indices)).sum(-1).mean()
        ref = ref + ((1 - w) * F.cross_entropy(logits[:, i], tk[:, i], ignore_index=-100) + w * soft) / 3
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert abs(float(got.detach()) - float(exact.detach())) > 1e-4  # the dropped tail is not nothing
    with pytest.raises(ValueError, match="soft_topk"):
        HeadsTrainConfig(soft_topk=-1)


def test_train_with_soft_topk_matches_the_exact_run_at_full_k(tmp_path):
    """A run with the precomputed targets at K = the train vocabulary is the exact run (same
    batches, the same loss up to float rounding), and the default K trains too."""
    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    seqs = _seqs(base, n=8)
    H, off = answer_hidden_states(base, seqs, progress=False)
    counts = answer_token_counts(seqs, VOCAB)
    out = {}
    for k in (0, 12, 4):
        h = _heads(base)
        h.set_token_counts(counts)
        cfg = HeadsTrainConfig(steps=20, lr=1e-2, positions_per_step=16, train_vocab=12, soft_weight=0.5,
                               soft_topk=k, save_every=100, lr_schedule="constant")
        m = train_heads_cached(h, seqs, H, off, cfg, str(tmp_path / f"k{k}"), progress=False)
        out[k] = (m["loss"], h.proj.detach().clone())
    torch.testing.assert_close(out[12][1], out[0][1], rtol=1e-4, atol=1e-5)
    assert abs(out[12][0] - out[0][0]) < 1e-4
    assert not torch.allclose(out[4][1], out[0][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", [True, "chain", "copy"])
def test_train_resume_checkpoint_and_exact_decoding(tmp_path, form):
    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    seqs = _seqs(base, n=10)
    H, off = answer_hidden_states(base, seqs, progress=False)
    counts = answer_token_counts(seqs, VOCAB)
    # constant schedule: the 30-step run's cosine would follow its own --steps
    cfg = HeadsTrainConfig(steps=60, lr=1e-2, positions_per_step=32, train_vocab=0, holdout=2, save_every=30,
                           lr_schedule="constant")

    def fresh():
        h = _heads(base, form)
        h.set_token_counts(counts)
        return h

    a = fresh()
    m = train_heads_cached(a, seqs, H, off, cfg, str(tmp_path / "a"), progress=False)
    assert m["step"] == 60 and m["heldout"]["positions"] > 0 and len(m["heldout"]["acc"]) == 3
    # resumed at step 30 == uninterrupted
    b = fresh()
    train_heads_cached(b, seqs, H, off, HeadsTrainConfig(**{**cfg.__dict__, "steps": 30}), str(tmp_path / "b"),
                       progress=False)
    b2 = fresh()
    train_heads_cached(b2, seqs, H, off, cfg, str(tmp_path / "b"), progress=False)
    for k in a.trainable_names():
        torch.testing.assert_close(getattr(b2, k), getattr(a, k), rtol=0, atol=0)
    # it learned: training accuracy of head 0 above an untrained head's
    untrained = fresh()
    from ptp.train.heads import evaluate_heads, padded_ids

    pos = head_positions(seqs, off, 3)
    ids = padded_ids(seqs)
    assert evaluate_heads(a, _Vocab(a, 0, "cpu"), H, pos, "cpu", ids=ids)["acc"][0] > \
        evaluate_heads(untrained, _Vocab(untrained, 0, "cpu"), H, pos, "cpu", ids=ids)["acc"][0] + 0.2
    # the checkpoint loads as a drafter and decodes exactly what plain greedy decoding gives
    drafter = make_drafter(str(tmp_path / "a"), base, tree=1)
    prompts = [s.ids[:s.prompt_len].tolist() for s in seqs[:3]]
    cfg_g = GenerationConfig(max_new_tokens=24)
    spec = Decoder(base, drafter=drafter).generate(prompts, cfg_g)
    plain = Decoder(base).generate(prompts, cfg_g)
    assert [r.new_token_ids for r in spec] == [r.new_token_ids for r in plain]
    assert sum(r.target_calls for r in spec) < sum(r.target_calls for r in plain)
    assert drafter.heads.config.chain_input == (form in ("chain", "copy"))
    assert drafter.heads.config.copy_attn == (form == "copy")


@pytest.mark.parametrize("form", ["chain", "copy"])
def test_chain_input_heldout_prefix_is_the_greedy_chains(form):
    """Chain-input heads: the teacher-forced held-out prefix (evaluate_heads) is exactly the mean
    accepted depth of the drafter's greedy chain (head i reads the drafted token, which equals the
    data's while heads 0..i-1 are right), position by position through the drafter's own code."""
    from ptp.decode.draft import DraftRequest
    from ptp.drafters.heads import HeadsDrafter
    from ptp.decode.sampling import SamplingConfig
    from ptp.train.heads import evaluate_heads

    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    seqs = _seqs(base, n=6)
    H, off = answer_hidden_states(base, seqs, progress=False)
    h = _heads(base, form)
    h.set_token_counts(answer_token_counts(seqs, VOCAB))
    pos = head_positions(seqs, off, 3)
    cfg = HeadsTrainConfig(steps=40, lr=1e-2, positions_per_step=32, train_vocab=20, lr_schedule="constant")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        train_heads_cached(h, seqs, H, off, cfg, d, progress=False)
    from ptp.train.heads import padded_ids

    got = evaluate_heads(h, _Vocab(h, 20, "cpu"), H, pos, "cpu", ids=padded_ids(seqs))
    drafter = HeadsDrafter(h, draft_vocab=20)
    P = len(pos)
    # each anchor's committed tokens 0 .. t+1 (copy heads attend over them)
    hists = [seqs[q].ids[:t + 2].tolist() for q, t in zip(pos.seq.tolist(), pos.t.tolist())]
    req = DraftRequest(histories=hists, sequence_ids=list(range(P)), max_nodes=3, sampling=SamplingConfig())
    rows, _ = drafter.draft_chains(H[pos.rows].float(), pos.next.tolist(), [True] * P, 3, req)
    depth = []
    for (toks, _), truth in zip(rows, pos.targets.tolist()):
        k = 0
        while k < 3 and toks[1 + k] == truth[k]:
            k += 1
        depth.append(k)
    assert got["prefix"] == round(sum(depth) / P, 4)
    assert 0 < got["prefix"] and got["acc"][1] > 0  # trained: deeper heads hit too


def test_hidden_cache_reused_and_invalidated(tmp_path):
    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    seqs = _seqs(base, n=4)
    path = str(tmp_path / "data-hidden.safetensors")
    H, off = load_or_compute_hidden(base, seqs, path, "tiny", progress=False)
    t = os.path.getmtime(path)
    H2, off2 = load_or_compute_hidden(base, seqs, path, "tiny", progress=False)
    assert os.path.getmtime(path) == t and torch.equal(H, H2) and torch.equal(off, off2)
    # the SmolLM2 aliases name one model: a cache made under one is reused under another
    alias = str(tmp_path / "alias-hidden.safetensors")
    load_or_compute_hidden(base, seqs, alias, "smollm2", progress=False)
    t = os.path.getmtime(alias)
    load_or_compute_hidden(base, seqs, alias, "SmolLM2-135M-Instruct", progress=False)
    assert os.path.getmtime(alias) == t
    other = seqs[:3] + [Sequence(seqs[3].ids.flip(0), seqs[3].prompt_len)]
    H3, off3 = load_or_compute_hidden(base, other, path, "tiny", progress=False)
    assert not torch.equal(H3, H)


def test_errors():
    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    seqs = _seqs(base, n=3)
    H, off = answer_hidden_states(base, seqs, progress=False)
    h = _heads(base)
    with pytest.raises(ValueError, match="do not match"):
        train_heads_cached(h, seqs[:2], H, off, HeadsTrainConfig(steps=1), "/nonexistent", progress=False)
    with pytest.raises(ValueError, match="hidden states have size"):
        train_heads_cached(h, seqs, H[:, :5], off, HeadsTrainConfig(steps=1), "/nonexistent", progress=False)
    with pytest.raises(ValueError, match="token counts"):
        train_heads_cached(h, seqs, H, off, HeadsTrainConfig(steps=1, train_vocab=10), "/nonexistent",
                           progress=False)
    with pytest.raises(ValueError, match="positions_per_step"):
        HeadsTrainConfig(positions_per_step=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        HeadsTrainConfig(lr_schedule="linear")
    short = [Sequence(torch.arange(3, 9), 4)]
    with pytest.raises(ValueError, match="no training anchors"):
        H1, o1 = answer_hidden_states(base, short, progress=False)
        train_heads_cached(h, short, H1, o1, HeadsTrainConfig(steps=1, train_vocab=0), "/nonexistent", progress=False)


@pytest.mark.parametrize("form", ["--token-input", "--chain-input", "--copy-attn"])
def test_cli_trains_heads_on_cached_hidden_states(tmp_path, monkeypatch, form):
    """``ptp train heads`` (cached path, the default): the hidden cache lands beside the data, the
    checkpoint records the settings and the held-out figures, and it loads as a drafter."""
    import json

    import ptp.train.models as tm
    from ptp.train.cli import main
    from ptp.train.data import DataConfig, save_sequences

    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    monkeypatch.setattr(tm, "load_target", lambda *a, **k: (base, None))
    seqs = _seqs(base, n=10)
    data = str(tmp_path / "data")
    save_sequences(data, seqs, DataConfig(num_prompts=10), ["p"] * 10)
    out = str(tmp_path / "run")
    assert main(["heads", "--out", out, "--data", data, "--heads", "3", form, "--steps", "40",
                 "--positions-per-step", "16", "--train-vocab", "20", "--holdout", "2", "--lr", "1e-2",
                 "--soft-weight", "0.5", "--no-progress", "--device", "cpu"]) == 0
    assert os.path.exists(data + "-hidden.safetensors")
    meta = json.load(open(os.path.join(out, "config.json")))
    assert meta["step"] == 40 and meta["train"]["cached_hidden"] and meta["train"]["train_vocab"] == 20
    assert meta["train"]["soft_weight"] == 0.5 and meta["train"]["soft_topk"] == 32
    assert meta["train"]["eval_every"] == 500 and meta["metrics"]["heldout"]["step"] == 40
    assert meta["metrics"]["heldout"]["positions"] > 0
    assert meta["heads"]["token_input"] and meta["heads"]["chain_input"] == (form != "--token-input")
    assert meta["heads"]["copy_attn"] == (form == "--copy-attn")
    drafter = make_drafter(out, base)
    assert drafter.heads.config.num_heads == 3 and drafter.heads.token_counts is not None
    assert drafter.heads.config.chain_input == (form != "--token-input")
    assert drafter.heads.config.copy_attn == (form == "--copy-attn")


@pytest.mark.parametrize("token_input", [False, True, "chain", "copy"])
def test_evaluate_heads_is_the_training_losses_hits(token_input):
    """The held-out check (argmax only) counts exactly the hits of the training loss's pass, over
    a restricted vocabulary (targets outside it are misses) and in chunks."""
    from ptp.train.heads import evaluate_heads

    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    seqs = _seqs(base, n=6)
    H, off = answer_hidden_states(base, seqs, progress=False)
    h = _heads(base, token_input)
    with torch.no_grad():
        for p in h.trainable_parameters():
            p.normal_(0, 0.3)
    h.set_token_counts(answer_token_counts(seqs, VOCAB))
    vocab = _Vocab(h, 20, "cpu")
    pos = head_positions(seqs, off, 3, list(range(6)))
    from ptp.train.heads import _copy_for, padded_ids

    ids = padded_ids(seqs)
    _, hit = _losses(h, vocab, H[pos.rows].float(), pos.next, pos.targets,
                     copy=_copy_for(h, ids, pos, torch.arange(len(pos)), "cpu"))
    got = evaluate_heads(h, vocab, H, pos, "cpu", chunk=7, ids=ids)
    assert got["positions"] == len(pos)
    assert got["acc"] == [round(float(x), 4) for x in hit.mean(0)]
    assert got["prefix"] == round(float(hit.cumprod(1).sum(1).mean()), 4)
    assert 0 < got["acc"][0] < 1  # random heads: some hits, some misses


def test_heldout_check_runs_every_eval_every_steps_and_at_the_end(tmp_path, monkeypatch):
    """Checkpoints every 2 steps, held-out every 4 (and at the first checkpoint and the end): the
    checkpoints in between repeat the last figures, tagged with the step they were measured at."""
    import json

    import ptp.train.heads as th

    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    seqs = _seqs(base, n=8)
    H, off = answer_hidden_states(base, seqs, progress=False)
    h = _heads(base)
    calls = []
    real = th.evaluate_heads
    monkeypatch.setattr(th, "evaluate_heads", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    real_save = th.save_adapter

    def save(m, d, meta, **k):
        seen.append((meta["step"], meta["metrics"]["heldout"]["step"]))
        return real_save(m, d, meta, **k)

    monkeypatch.setattr(th, "save_adapter", save)
    cfg = HeadsTrainConfig(steps=10, positions_per_step=16, train_vocab=0, holdout=2, save_every=2, eval_every=4)
    m = train_heads_cached(h, seqs, H, off, cfg, str(tmp_path), progress=False)
    # step 10: the periodic checkpoint repeats step 8's figures, the final one measures again
    assert seen == [(2, 2), (4, 4), (6, 4), (8, 8), (10, 8), (10, 10)]
    assert len(calls) == 4 and m["heldout"]["step"] == 10
    assert json.load(open(tmp_path / "config.json"))["metrics"]["heldout"]["step"] == 10
    with pytest.raises(ValueError, match="eval_every"):
        HeadsTrainConfig(eval_every=0)


def test_copy_heads_learn_to_copy_what_chain_heads_cannot():
    """Answers that repeat their prompt (random tokens): the next tokens are in the context, not in
    a random tiny model's hidden state. Copy heads (context attention) learn to draft them on
    held-out sequences; chain heads trained the same way do not (a tied LM head, as SmolLM2's)."""
    base = tiny_model("llama", vocab_size=VOCAB, seed=0, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(200):  # enough sequences that 100 steps cannot memorise them
        p = torch.randint(3, VOCAB, (10 + i % 5,), generator=g)
        seqs.append(Sequence(torch.cat([p, p, p[:6]]), p.numel()))
    H, off = answer_hidden_states(base, seqs, progress=False)
    counts = answer_token_counts(seqs, VOCAB)
    cfg = HeadsTrainConfig(steps=100, lr=5e-2, positions_per_step=64, train_vocab=0, holdout=8,
                           lr_schedule="constant")
    prefix = {}
    import tempfile

    for form in ("chain", "copy"):
        h = _heads(base, form)
        h.set_token_counts(counts)
        with tempfile.TemporaryDirectory() as d:
            prefix[form] = train_heads_cached(h, seqs, H, off, cfg, d, progress=False)["heldout"]["prefix"]
    assert prefix["copy"] > 2.5 and prefix["chain"] < 0.3, prefix


def test_cli_init_from_starts_copy_heads_from_chain_heads(tmp_path, monkeypatch):
    """``--init-from DIR``: the new heads start from DIR's tensors (chain heads -> copy heads: the
    copy parameters keep their init, so the start decodes as the chain heads); a checkpoint of
    another shape is refused."""
    import ptp.train.models as tm
    from ptp.train.checkpoint import load_heads
    from ptp.train.cli import main
    from ptp.train.data import DataConfig, save_sequences

    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    monkeypatch.setattr(tm, "load_target", lambda *a, **k: (base, None))
    seqs = _seqs(base, n=8)
    data = str(tmp_path / "data")
    save_sequences(data, seqs, DataConfig(num_prompts=8), ["p"] * 8)
    common = ["--data", data, "--heads", "3", "--positions-per-step", "16", "--train-vocab", "0",
              "--lr", "1e-2", "--no-progress", "--device", "cpu"]
    chain_dir, copy_dir = str(tmp_path / "chain"), str(tmp_path / "copy")
    assert main(["heads", "--out", chain_dir, "--chain-input", "--steps", "20"] + common) == 0
    assert main(["heads", "--out", copy_dir, "--copy-attn", "--init-from", chain_dir, "--steps", "0"] + common) == 0
    chain, copy = load_heads(base, chain_dir), load_heads(base, copy_dir)
    assert copy.config.copy_attn and float(chain.proj.detach().abs().sum()) > 0
    for k in ("proj", "bias", "tok_proj"):
        assert torch.equal(getattr(copy, k), getattr(chain, k))
    assert not copy.copy_proj.detach().any() and not copy.copy_gate.detach().any()
    with pytest.raises(ValueError, match="shape"):
        main(["heads", "--out", str(tmp_path / "four"), "--chain-input", "--init-from", chain_dir,
              "--steps", "0"] + [c if c != "3" else "4" for c in common])
    with pytest.raises(FileNotFoundError):
        main(["heads", "--out", str(tmp_path / "x"), "--chain-input", "--init-from", str(tmp_path / "none"),
              "--steps", "0"] + common)
