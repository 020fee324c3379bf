"""Micro-batched training (``TrainConfig.micro_batch``, ``--micro-batch``): B sequences share one
right-padded real pass and one slot/mask pass. Each sequence's loss, metrics and gradient must be
what it gives alone (same anchors, same u's), for PTP (O/C, distillation at T = 0 and T > 0),
the masked-input drafter and the MTP heads, sequences of different lengths, one too short."""
from __future__ import annotations

import random

import pytest
import torch

from ptp_testing import maybe_reference_ops
from ptp.decode.lora import LoRAConfig
from ptp.models import tiny_model
from ptp.drafters.heads_model import HeadsConfig, MTPHeads
from ptp.drafters.masked_model import MaskedConfig, MaskedModel
from ptp.drafters.ptp_model import PTPConfig, PTPModel, batched_slot_layout, packed_layout
from ptp.train.data import Sequence
from ptp.train.masked import heads_batch_loss, masked_batch_loss
from ptp.train.trainer import TrainConfig, batch_loss, train

VOCAB = 61


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _seqs():
    g = torch.Generator().manual_seed(3)
    # lengths differ (padding), and the 3rd is too short for k = 4 windows (prompt 6, 2 answer tokens)
    spec = [(40, 7), (27, 5), (8, 6), (33, 9)]
    return [Sequence(torch.randint(0, VOCAB, (n,), generator=g), p) for n, p in spec]


def _perturb(model):
    """Trained-looking adapter: random non-zero LoRA B (zero-init B would hide gate bugs)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _compare(model, fn, cfg, seqs):
    """Per-sequence (B = 1 each, in order) vs one micro-batch, same seeds."""
    gen1, rng1 = torch.Generator().manual_seed(5), random.Random(5)
    one = [fn(model, [s], cfg, gen1, rng1)[0] for s in seqs]
    gen2, rng2 = torch.Generator().manual_seed(5), random.Random(5)
    many = fn(model, seqs, cfg, gen2, rng2)
    assert [r is None for r in one] == [r is None for r in many]
    assert any(r is None for r in one) and sum(r is not None for r in one) >= 2
    params = model.trainable_parameters()
    for a, b in zip(one, many):
        if a is None:
            continue
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
        for key, v in a[1].items():
            if key == "acc":
                assert b[1][key] == pytest.approx(v, abs=1e-6)
            else:
                assert b[1][key] == pytest.approx(v, rel=1e-4, abs=1e-5), key
    g_one = torch.autograd.grad(sum(r[0] for r in one if r is not None), params, allow_unused=True)
    g_many = torch.autograd.grad(sum(r[0] for r in many if r is not None), params, allow_unused=True)
    n_grad = 0
    for x, y in zip(g_one, g_many):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
            n_grad += int(x.abs().sum() > 0)
    assert n_grad > 0


@pytest.mark.parametrize("variant,temperature", [("optp", 0.0), ("cptp", 0.0), ("optp", 0.8), ("cptp", 0.8)])
def test_ptp_batch_equals_one_at_a_time(variant, temperature):
    torch.manual_seed(0)
    model = PTPModel(tiny_model("llama", vocab_size=VOCAB), PTPConfig(
        variant=variant, num_slots=4, temperature=temperature, lora=LoRAConfig(rank=4, alpha=8)))
    _perturb(model)
    _compare(model, batch_loss, TrainConfig(windows_per_seq=6), _seqs())


def test_ptp_teacher_free_batch_runs():
    torch.manual_seed(0)
    model = PTPModel(tiny_model("llama", vocab_size=VOCAB), PTPConfig(
        variant="cptp", num_slots=4, temperature=1.0, lora=LoRAConfig(rank=4, alpha=8)))
    res = batch_loss(model, _seqs(), TrainConfig(mode="teacher-free", windows_per_seq=6),
                     torch.Generator().manual_seed(0), random.Random(0))
    assert [r is None for r in res] == [False, False, True, False]
    for r in res:
        if r is not None:
            assert torch.isfinite(r[0]) and 0.0 <= r[1]["prefix"] <= 4.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mtp_batch_equals_one_at_a_time(family):
    torch.manual_seed(0)
    model = MaskedModel(tiny_model(family, vocab_size=VOCAB), MaskedConfig(num_masks=4, lora=LoRAConfig(rank=4, alpha=8)))
    _perturb(model)
    _compare(model, masked_batch_loss, TrainConfig(windows_per_seq=6), _seqs())


@pytest.mark.parametrize("token_input", [False, True, "chain"])
def test_heads_batch_equals_one_at_a_time(token_input):
    torch.manual_seed(0)
    model = MTPHeads(tiny_model("llama", vocab_size=VOCAB),
                     HeadsConfig(num_heads=3, token_input=bool(token_input), chain_input=token_input == "chain"))
    _perturb(model)
    seqs = _seqs()
    seqs[2] = Sequence(seqs[2].ids[:7], 6)  # too short for 3 heads
    _compare(model, heads_batch_loss, TrainConfig(windows_per_seq=2), seqs)


def test_batched_slot_layout_matches_packed_layout():
    lengths, anchors = [9, 5, 7], [[3, 9], [2, 5], [7, 7]]
    pos, vis = batched_slot_layout(lengths, anchors, 3)
    assert pos.shape == (3, 6) and vis.shape == (3, 6, 9 + 6)
    for b, (L, a) in enumerate(zip(lengths, anchors)):
        p, v = packed_layout(L, 0, a, [3, 3])
        assert torch.equal(pos[b], p)
        assert torch.equal(vis[b, :, :L], v[:, :L]) and torch.equal(vis[b, :, 9:], v[:, L:])
        assert not vis[b, :, L:9].any()  # padding keys are never visible
    with pytest.raises(ValueError, match="same number of windows"):
        batched_slot_layout([4, 4], [[2], [2, 3]], 2)


def test_train_micro_batch_matches_one_at_a_time(tmp_path):
    """Three optimizer steps of 3 sequences each: micro_batch 3 == micro_batch 1 up to float
    rounding. Adam divides by sqrt(v), so a gradient element near zero can turn a rounding
    difference of the padded batch's GEMMs into a visible one: the tolerance is 1% of one step
    (lr 1e-2), and the weights must have moved by far more than it."""
    states, init = [], None
    for mb in (1, 3):
        torch.manual_seed(0)
        model = PTPModel(tiny_model("llama", vocab_size=VOCAB),
                         PTPConfig(num_slots=4, lora=LoRAConfig(rank=4, alpha=8)))
        if init is None:
            init = {k: v.clone() for k, v in model.adapter_state_dict().items()}
        cfg = TrainConfig(steps=3, windows_per_seq=6, seqs_per_step=3, micro_batch=mb, warmup=1, lr=1e-2)
        m = train(model, _seqs(), cfg, str(tmp_path / f"mb{mb}"), progress=False)
        assert m["step"] == 3
        states.append(model.adapter_state_dict())
    moved = 0.0
    for key, v in states[0].items():
        torch.testing.assert_close(states[1][key], v, rtol=1e-3, atol=1e-4)
        moved = max(moved, float((v - init[key]).abs().max()))
    assert moved > 1e-2  # three steps of lr 1e-2: 100x the tolerance
    with pytest.raises(ValueError, match="micro_batch"):
        train(model, _seqs(), TrainConfig(steps=1, micro_batch=0), str(tmp_path / "bad"), progress=False)
