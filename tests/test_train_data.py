"""Teacher data generation (``ptp.train.data``): the ``ptp`` backend (this project's decoder) gives
plain greedy decoding token for token and samples with the position-indexed uniform stream,
whatever the batch; the ``hf`` backend stores the same format; ``auto`` resolves per device."""
from __future__ import annotations

import json

import pytest
import torch

from ptp_testing import hf_greedy
from ptp.decode.sampling import uniforms
from ptp.train.data import DataConfig, _answer, generate_sequences, load_sequences, resolve_backend, \
    save_sequences
from ptp.models import tiny_model
from ptp_ext.reference import pick, sampling_probs

VOCAB = 101


class WordTokenizer:
    """Enough of a tokenizer for the data code: a chat template that maps characters to ids
    (prompts of different lengths), ``decode`` to text, ``eos_token_id``."""

    pad_token_id = 0

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        text = messages[-1]["content"]
        return [1] + [2 + ord(c) % (VOCAB - 3) for c in text] + [VOCAB - 1]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{int(i)}" for i in ids)


PROMPTS = ["Write a haiku.", "Explain tides to a child, please.", "Sum 1..10?", "x", "A longer prompt, "
           "with several clauses, so that the batch holds prompts of very different lengths."]


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def _answers(model, tok, cfg, first_id=0):
    bar = _Bar()
    out = _answer(model, tok, PROMPTS, cfg, torch.Generator().manual_seed(cfg.seed), bar, first_id=first_id)
    assert bar.n == len(PROMPTS)
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, hidden_size=32)


def test_resolve_backend(model):
    assert resolve_backend(model, "auto") == "ptp"  # a CPU model
    assert resolve_backend(model, "hf") == "hf"
    assert resolve_backend(model, "ptp") == "ptp"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(model, "vllm")


@pytest.mark.parametrize("backend,batch", [("ptp", 2), ("ptp", 5), ("hf", 1)])
def test_greedy_answers_are_plain_greedy(model, backend, batch):
    """Each answer is the target's own single-sequence greedy decoding, cut after the first EOS
    (an id greedy really produces, so the cut is exercised), whatever the batch it shared."""
    plain_tok = WordTokenizer()
    chats = [plain_tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    eos = hf_greedy(model, chats[1], 12)[4]
    tok = WordTokenizer(eos_token_id=eos)
    seqs = _answers(model, tok, DataConfig(max_new_tokens=12, batch_size=batch, backend=backend))
    cut = 0
    for chat, seq in zip(chats, seqs):
        want = hf_greedy(model, chat, 12, eos_token_id=eos)
        if eos in want:
            want = want[: want.index(eos) + 1]
            cut += 1
        assert seq.prompt_len == len(chat)
        assert seq.ids[: seq.prompt_len].tolist() == chat
        assert seq.ids[seq.prompt_len:].tolist() == want
    assert cut >= 1


def test_sampled_answers_follow_the_uniform_stream(model):
    """T = 1: token j of prompt r is Pick(U(seed, first_id + r, prompt_len + j), P(. | prefix)),
    so the data are the same for any batch size and the uniforms are recoverable."""
    tok = WordTokenizer()
    cfg = DataConfig(max_new_tokens=10, batch_size=5, temperature=1.0, seed=7, backend="ptp")
    seqs = _answers(model, tok, cfg, first_id=3)
    again = _answers(model, tok, DataConfig(**{**cfg.__dict__, "batch_size": 1}), first_id=3)
    assert [s.ids.tolist() for s in seqs] == [s.ids.tolist() for s in again]
    other = _answers(model, tok, DataConfig(**{**cfg.__dict__, "seed": 8}), first_id=3)
    assert [s.ids.tolist() for s in seqs] != [s.ids.tolist() for s in other]
    with torch.no_grad():
        for r, seq in enumerate(seqs):
            logits = model(seq.ids[None]).logits[0]
            for p in range(seq.prompt_len, len(seq.ids)):
                u = float(uniforms(7, torch.tensor(3 + r), torch.tensor(p)))
                assert int(seq.ids[p]) == pick(u, sampling_probs(logits[p - 1], 1.0))


def test_generate_sequences_records_the_backend(model, tmp_path):
    """v2's two stages through the ptp backend: stage 2 prompts are built from stage 1 answers, the
    stream numbers stage 2 after stage 1, and the saved config names the resolved backend."""
    tok = WordTokenizer()
    cfg = DataConfig(num_prompts=12, max_new_tokens=6, batch_size=4, temperature=0.7, seed=1)
    seqs, prompts = generate_sequences(model, tok, cfg, progress=False)
    assert len(seqs) == len(prompts) == 12
    assert all(0 < len(s.ids) - s.prompt_len <= 6 for s in seqs)
    save_sequences(str(tmp_path / "d"), seqs, DataConfig(**{**cfg.__dict__, "backend": resolve_backend(model, "auto")}),
                   prompts)
    loaded, meta = load_sequences(str(tmp_path / "d"))
    assert meta["config"]["backend"] == "ptp"
    assert [s.ids.tolist() for s in loaded] == [s.ids.tolist() for s in seqs]
    with pytest.raises(ValueError, match="batch size"):
        generate_sequences(model, tok, DataConfig(num_prompts=2, batch_size=0), progress=False)
    with open(str(tmp_path / "d") + ".json") as f:
        assert json.load(f)["num_sequences"] == 12


def test_cli_gen_backend_flag():
    import argparse

    from ptp.train.cli import add_train_parsers

    parser = argparse.ArgumentParser()
    add_train_parsers(parser.add_subparsers(dest="command", required=True))
    for kind in ("ptp", "masked", "heads"):
        assert parser.parse_args(["train", kind, "--out", "x"]).gen_backend == "auto"
        assert parser.parse_args(["train", kind, "--out", "x", "--gen-backend", "hf"]).gen_backend == "hf"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "heads", "--out", "x", "--gen-backend", "vllm"])


@pytest.mark.parametrize("temperature,batch", [(0.0, 2), (1.0, 5)])
def test_recorded_hidden_states_are_the_targets_own(model, temperature, batch):
    """``record_hidden``: the decoding calls keep the final hidden state of every answer anchor
    (``prompt_len-1 .. L-2``), equal to a teacher-forced pass over the finished sequence (what
    ``answer_hidden_states`` computes), and recording changes no token."""
    from ptp.train.heads import answer_hidden_states, recorded_hidden

    tok = WordTokenizer()
    cfg = DataConfig(max_new_tokens=9, batch_size=batch, temperature=temperature, seed=3, backend="ptp")
    bar = _Bar()
    seqs = _answer(model, tok, PROMPTS, cfg, torch.Generator(), bar, first_id=2, record_hidden=True)
    plain = _answers(model, tok, cfg, first_id=2)
    assert [s.ids.tolist() for s in seqs] == [s.ids.tolist() for s in plain]
    assert all(s.hidden is None for s in plain)
    H, off = recorded_hidden(seqs)
    H_ref, off_ref = answer_hidden_states(model, seqs, progress=False)
    assert H.dtype == torch.float16 and torch.equal(off, off_ref)
    torch.testing.assert_close(H.float(), H_ref.float(), atol=2e-3, rtol=2e-3)
    # a shifted row (the anchor one place off) is far from the reference: the test can fail
    assert not torch.allclose(H[1:].float(), H_ref[:-1].float(), atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="recorded hidden states"):
        recorded_hidden(plain)
    with pytest.raises(ValueError, match="only the ptp generation backend"):
        _answer(model, tok, PROMPTS, DataConfig(backend="hf"), torch.Generator(), _Bar(), record_hidden=True)


def test_cli_heads_data_records_hidden_states(model, tmp_path, monkeypatch):
    """``ptp train heads`` writing its own data with the ptp backend saves the hidden-state cache
    with the data, and training reads it instead of running the target over the data again."""
    import ptp.train.heads as th
    import ptp.train.models as tm
    from ptp.train.cli import main
    from ptp.train.heads import answer_hidden_states, load_or_compute_hidden

    monkeypatch.setattr(tm, "load_target", lambda *a, **k: (model, WordTokenizer()))

    def no_pass(*a, **k):
        raise AssertionError("the hidden states were recomputed")

    monkeypatch.setattr(th, "answer_hidden_states", no_pass)
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    assert main(["heads", "--out", out, "--data", data, "--num-prompts", "8", "--max-new-tokens", "6",
                 "--gen-batch", "3", "--heads", "2", "--token-input", "--steps", "3", "--positions-per-step",
                 "8", "--train-vocab", "0", "--holdout", "1", "--no-progress", "--device", "cpu",
                 "--model", "tiny"]) == 0
    seqs, meta = load_sequences(data)
    assert meta["config"]["backend"] == "ptp" and len(seqs) == 8
    H, off = load_or_compute_hidden(model, seqs, data + "-hidden.safetensors", "tiny", progress=False)
    monkeypatch.undo()
    H_ref, off_ref = answer_hidden_states(model, seqs, progress=False)
    assert torch.equal(off, off_ref)
    torch.testing.assert_close(H.float(), H_ref.float(), atol=2e-3, rtol=2e-3)
