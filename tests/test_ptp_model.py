"""PTP model: packing equals separate windows, u embedding, variants, temperature-0 rule."""
import pytest
import torch

from ptp.decode.lora import GatedLoRALinear
from ptp.drafters.ptp_model import GREEDY_U, PTPConfig, PTPModel, UniformEmbedding, packed_layout, vector_pick
from ptp.decode.lora import LoRAConfig
from ptp.models import cache_kw
from ptp.models import tiny_model
from ptp_ext.reference import pick


def _model(variant="optp", temperature=0.7, u_embedding="interp"):
    m = PTPModel(tiny_model("llama", vocab_size=101, hidden_size=48), PTPConfig(variant=variant, temperature=temperature,
                                         u_embedding=u_embedding, lora=LoRAConfig(rank=4, alpha=8)))
    g = torch.Generator().manual_seed(3)
    for mod in m.modules():
        if isinstance(mod, GatedLoRALinear):
            with torch.no_grad():
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.1)
    return m


def _run(m, ids, u, anchors, k, past=None, real=None):
    P = 0 if past is None else past.get_seq_length()
    real = ids if real is None else real
    pos, vis = packed_layout(P, real.shape[1], anchors, [k] * len(anchors))
    emb = m.slot_embeddings(u).reshape(-1, m.base.config.hidden_size)
    h, _ = m.packed_forward(real, emb, pos, vis, past_key_values=past, use_cache=past is not None)
    return m.logits(h)[0]


@pytest.mark.parametrize("variant", ["optp", "cptp"])
@pytest.mark.parametrize("u_embedding", ["interp", "bits"])
def test_packed_windows_equal_separate_forwards(variant, u_embedding):
    torch.manual_seed(0)
    m, k, L = _model(variant, u_embedding=u_embedding), 3, 11
    ids = torch.randint(0, 101, (1, L))
    anchors = [1, 4, 8, 11]
    u = torch.rand(len(anchors), k)
    with torch.no_grad():
        packed = _run(m, ids, u, anchors, k)
        plain = m.base(ids).logits[0]
        torch.testing.assert_close(packed[:L], plain, rtol=1e-5, atol=1e-5)
        for w, a in enumerate(anchors):
            alone = _run(m, ids[:, :a], u[w : w + 1], [a], k)[a:]
            torch.testing.assert_close(packed[L + w * k : L + (w + 1) * k], alone, rtol=1e-5, atol=1e-5)


def test_slots_against_cached_context_equal_one_forward():
    from transformers import DynamicCache

    torch.manual_seed(1)
    m, k, L = _model(), 4, 9
    ids = torch.randint(0, 101, (1, L))
    u = torch.rand(2, k)
    with torch.no_grad():
        one = _run(m, ids, u, [5, 9], k)[L:]
        cache = DynamicCache(config=m.base.config)
        m.base(ids, use_cache=True, **cache_kw(m.base, cache))
        two = _run(m, None, u, [5, 9], k, past=cache, real=ids[:, :0])
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


def test_real_rows_bit_identical_adapter_on_off():
    torch.manual_seed(2)
    m, k, L = _model(), 4, 10
    ids = torch.randint(0, 101, (1, L))
    u = torch.rand(2, k)
    with torch.no_grad():
        on = _run(m, ids, u, [6, 10], k)
        for mod in m.modules():
            if isinstance(mod, GatedLoRALinear):
                mod.lora_B.zero_()
        off = _run(m, ids, u, [6, 10], k)
    assert torch.equal(on[:L], off[:L])
    assert not torch.allclose(on[L:], off[L:])


def test_position_ids_and_visibility():
    pos, vis = packed_layout(2, 3, [3, 5], [2, 3])
    assert pos.tolist() == [2, 3, 4, 2, 3, 4, 5, 6]
    # slot 0 of window 0 (anchor 3) sees keys 0,1,2 and itself only
    assert vis[3].nonzero().squeeze(1).tolist() == [0, 1, 2, 5]
    # slot 2 of window 1 (anchor 5) sees keys 0..4 and its own slots 0..2
    assert vis[7].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    with pytest.raises(ValueError, match="anchors must lie"):
        packed_layout(0, 3, [4], [1])


def test_uniform_embedding_interp_endpoints_and_bits():
    e = UniformEmbedding(8, "interp", num_knots=5)
    torch.testing.assert_close(e(torch.tensor([0.0, 1.0, 0.25])),
                               torch.stack([e.knots[0], e.knots[4], e.knots[1]]).detach())
    mid = e(torch.tensor([0.125]))[0]
    torch.testing.assert_close(mid, (e.knots[0] + e.knots[1]).detach() / 2)
    b = UniformEmbedding(8, "bits", num_bits=4)
    # u and u + 2^-6 share the first 4 bits
    assert torch.equal(b(torch.tensor([0.5])), b(torch.tensor([0.5 + 2 ** -6])))
    assert not torch.equal(b(torch.tensor([0.5])), b(torch.tensor([0.5 + 2 ** -4])))


def test_temperature_zero_drafts_ignore_u():
    torch.manual_seed(4)
    for variant in ("optp", "cptp"):
        m, k = _model(variant, temperature=0.0), 5
        ids = torch.randint(0, 101, (1, 7))
        with torch.no_grad():
            a = _run(m, ids, torch.rand(1, k), [7], k)[7:]
            b = _run(m, ids, torch.rand(1, k), [7], k)[7:]
        assert torch.equal(a, b)
        assert torch.equal(m.slot_uniforms(torch.rand(3)), torch.full((3,), GREEDY_U))
        assert torch.equal(m.slot_tokens(a, torch.rand(k)), a.argmax(-1))


def test_cptp_slot_j_does_not_read_u_j():
    torch.manual_seed(5)
    m, k = _model("cptp"), 4
    u = torch.rand(1, k)
    e1 = m.slot_embeddings(u)
    u2 = u.clone()
    u2[0, 2] = 1 - u2[0, 2]
    e2 = m.slot_embeddings(u2)
    assert torch.equal(e1[0, :3], e2[0, :3]) and not torch.equal(e1[0, 3], e2[0, 3])


def test_vector_pick_matches_reference():
    torch.manual_seed(6)
    probs = torch.softmax(torch.randn(50, 37) * 3, dim=-1)
    probs[:, -3:] = 0
    u = torch.rand(50)
    u[0] = 0.0
    u[1] = 1.0 - 1e-12
    got = vector_pick(u, probs)
    assert got.tolist() == [pick(float(u[i]), probs[i]) for i in range(50)]
