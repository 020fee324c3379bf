"""PTP training on a tiny model: losses fall, checkpoints round-trip and resume."""
import os
import random

import pytest
import torch

from ptp.decode.lora import LoRAConfig
from ptp.drafters.ptp_model import PTPConfig, PTPModel
from ptp.train.checkpoint import load_adapter, read_config
from ptp.train.data import Sequence
from ptp.train.prompts import TEMPLATES, TOPICS, build_prompt_plan, build_prompts, derive_prompts
from ptp.train.trainer import TrainConfig, _bins, lr_scheduler, sequence_loss, train
from ptp.models import tiny_model


def _greedy_seqs(base, n=6, prompt_len=5, new=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.randint(0, base.config.vocab_size, (1, prompt_len), generator=g)
            res = base.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                                pad_token_id=0)
            out.append(Sequence(res[0], prompt_len))
    return out


def test_prompts_deterministic_and_varied():
    a, b = build_prompts(200, seed=3), build_prompts(200, seed=3)
    assert a == b and len(set(a)) == 200
    assert build_prompts(50, seed=4) != a[:50]
    assert len(TEMPLATES) >= 20 and len(TOPICS) >= 60


def test_prompt_plan_v2_deterministic_varied_and_not_specbench():
    s1, plain = build_prompt_plan(600, seed=0)
    assert (s1, plain) == build_prompt_plan(600, seed=0)
    assert build_prompt_plan(600, seed=1) != (s1, plain)
    assert 2 * len(s1) + len(plain) == 600
    assert {k for _, k in s1} == {"passage", "question"}
    prompts = [p for p, _ in s1] + plain
    assert len(set(prompts)) == len(prompts)
    assert any(p.startswith("Translate") for p in plain)
    dev = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "specbench_dev.jsonl")
    if os.path.isfile(dev):
        import json

        with open(dev) as f:
            turns = [json.loads(line)["turns"][0] for line in f if line.strip()]
        long_bits = {t[:60] for t in turns if len(t) >= 60}
        assert not any(b in p for p in prompts for b in long_bits)


def test_derive_prompts_builds_stage_two_from_the_answers():
    stage1 = [("Write a short news article about glaciers.", "passage"),
              ("Write one question about owls. Reply with the question only.", "question")]
    out = derive_prompts(stage1, ["Glaciers are melting fast.\nMore text.", '"Why do owls hoot?"\nextra'])
    assert "Glaciers are melting fast.\nMore text." in out[0] and out[0] != stage1[0][0]
    assert out[1] == "Why do owls hoot?"


def test_lr_schedule():
    """Linear warm-up (step + 1) / warmup, then constant or cosine to 10% at ``steps``."""
    def lrs(schedule, steps=100, warmup=10, n=101):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched = lr_scheduler(opt, schedule, warmup, steps)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"] / 2.0)
            opt.step()
            sched.step()
        return out
    c = lrs("cosine")
    assert c[0] == pytest.approx(0.1) and c[4] == pytest.approx(0.5) and c[10] == pytest.approx(1.0)
    assert c[55] == pytest.approx(0.55) and c[100] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(c[10:], c[11:]))  # monotone decay after warm-up
    k = lrs("constant")
    assert k[0] == pytest.approx(0.1) and k[9] == pytest.approx(1.0) and k[90] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        lrs("linear")


def test_bins_cover_the_picked_token():
    from ptp.drafters.ptp_model import vector_pick

    probs = torch.softmax(torch.randn(30, 17), -1)
    tok = torch.randint(0, 17, (30,))
    left, right = _bins(probs, tok)
    u = (left + right) / 2
    assert torch.equal(vector_pick(u, probs), tok)


@pytest.mark.parametrize("variant,mode,temperature", [
    ("optp", "distill", 0.0), ("cptp", "distill", 0.0), ("optp", "distill", 0.8),
    ("cptp", "distill", 0.8), ("cptp", "teacher-free", 0.8)])
def test_loss_decreases(variant, mode, temperature):
    torch.manual_seed(0)
    base = tiny_model("llama", vocab_size=53, hidden_size=32)
    seqs = _greedy_seqs(base) if temperature == 0 else [
        Sequence(torch.randint(0, 53, (30,)), 5) for _ in range(6)]
    model = PTPModel(base, PTPConfig(variant=variant, num_slots=4, temperature=temperature,
                                     lora=LoRAConfig(rank=4, alpha=8)))
    cfg = TrainConfig(mode=mode, windows_per_seq=8, lr=3e-3, warmup=1)
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    first = float(sequence_loss(model, seqs[0], cfg, gen, random.Random(1))[0].detach())
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr)
    for step in range(40):
        loss, _ = sequence_loss(model, seqs[step % len(seqs)], cfg, gen, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(sequence_loss(model, seqs[0], cfg, gen, random.Random(1))[0].detach())
    assert last < first


def test_checkpoint_roundtrip_and_resume(tmp_path):
    torch.manual_seed(0)
    base = tiny_model("llama", vocab_size=53, hidden_size=32)
    seqs = _greedy_seqs(base, n=3, new=12)
    cfg = PTPConfig(num_slots=3, lora=LoRAConfig(rank=2, alpha=4))
    model = PTPModel(base, cfg)
    out = str(tmp_path / "ck")
    tc = TrainConfig(steps=3, windows_per_seq=4, save_every=2, warmup=1)
    m = train(model, seqs, tc, out, progress=False)
    assert m["step"] == 3 and os.path.exists(os.path.join(out, "adapter.safetensors"))
    conf, meta = read_config(out)
    assert conf == cfg and meta["step"] == 3 and "command" in meta
    loaded = load_adapter(tiny_model("llama", vocab_size=53, hidden_size=32), out)
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[k], v), k
    # resume continues from step 3 up to 5
    tc.steps = 5
    model2 = PTPModel(tiny_model("llama", vocab_size=53, hidden_size=32), cfg)
    assert train(model2, seqs, tc, out, progress=False)["step"] == 5


def test_teacher_free_metrics_use_target_bins():
    """Teacher-free u's lie in the student's own bins, so the student picks the data tokens by
    construction there; the reported accuracy must be measured with u's in the target's bins
    (what coupled verification sees), so an untrained adapter does not report ~100%."""
    torch.manual_seed(0)
    base = tiny_model("llama", vocab_size=53, hidden_size=32)
    seqs = [Sequence(torch.randint(0, 53, (40,)), 5) for _ in range(2)]
    model = PTPModel(base, PTPConfig(variant="cptp", num_slots=4, temperature=1.0,
                                     lora=LoRAConfig(rank=4, alpha=8)))
    cfg = TrainConfig(mode="teacher-free", windows_per_seq=16)
    _, metrics = sequence_loss(model, seqs[0], cfg, torch.Generator().manual_seed(0),
                               random.Random(0))
    assert 0.0 <= metrics["prefix"] < 2.0
    assert max(metrics["acc"]) < 0.9


def test_ptp_slot_loss_variants():
    """O-PTP learns the data token (CE); C-PTP distillation learns the teacher's conditional (KL,
    at temperature 1 when T = 0), so it vanishes where the student's logits equal the teacher's
    even when the data token is not the argmax; teacher-free C-PTP uses the data token at T."""
    import torch.nn.functional as F
    from ptp.train.trainer import ptp_slot_loss
    torch.manual_seed(0)
    lg, teacher = torch.randn(3, 4, 29), torch.randn(3, 4, 29)
    tok = torch.randint(0, 29, (3, 4))
    ce = F.cross_entropy(lg.reshape(-1, 29), tok.reshape(-1))
    for T in (0.0, 0.8):
        assert torch.allclose(ptp_slot_loss("optp", "distill", T, lg, tok, teacher), ce)
    assert torch.allclose(ptp_slot_loss("cptp", "teacher-free", 0.0, lg, tok, teacher), ce)
    assert torch.allclose(ptp_slot_loss("cptp", "teacher-free", 0.8, lg, tok, teacher),
                          F.cross_entropy(lg.reshape(-1, 29) / 0.8, tok.reshape(-1)))
    for T in (0.0, 0.7):
        t = T or 1.0
        p_t = torch.softmax(teacher / t, -1)
        kl = (p_t * (p_t.log() - torch.log_softmax(lg / t, -1))).sum(-1).mean()
        got = ptp_slot_loss("cptp", "distill", T, lg, tok, teacher)
        assert torch.allclose(got, kl, atol=1e-5), (T, got, kl)
        assert float(ptp_slot_loss("cptp", "distill", T, teacher, tok, teacher)) < 1e-5
