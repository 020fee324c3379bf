"""CUDA-graph decoding (``ptp.decode.cuda_graphs``): buckets, padding, capture and replay.

On the CPU: bucket choice; the vectorised tree mask against the decoder's loop; the padded layout
on hand-built trees; and the padded calls (``GraphRunner(capture=False)``, the graphs' exact
computation without the capture) against the unpadded ones, *bitwise* with the row-invariant
linears: padding rows change no real row's logits or hidden states, for chains, trees and drafter
aux rows under a gated LoRA; then whole decodes through the padded path, token for token.
On a GPU (``cuda`` marker, skipped without one): captured graphs against eager decoding in
float32 (tokens identical, a second generate replays without capturing), replays bitwise
reproducible and within rounding of the padded and unpadded eager calls (float32 and bfloat16),
and bfloat16 greedy tokens identical on a model with clear argmax gaps. The cost-curve report's
arithmetic (``benchmarks/gpu_cost_curve.py``) is checked on the CPU from made-up timings.
"""
from __future__ import annotations

import pytest
import torch

from ptp_testing import maybe_reference_ops, randomize_slot_drafter
from ptp.decode import cuda_graphs
from ptp.decode.cache import RowCache
from ptp.decode.cuda_graphs import (AUX_BUCKETS, NODE_BUCKETS, GraphRunner, pad_call, pick_bucket,
                                    tree_mask_and_depth_closure)
from ptp.decode.decoder import Decoder, GenerationConfig, aux_mask_and_positions, tree_mask_and_depth
from ptp.decode.draft import AuxRows
from ptp.decode.fastpath import fast_forward_for
from ptp.decode.linear import LinearRouter
from ptp.decode.lora import LoRAConfig
from ptp.decode.sampling import SamplingConfig
from ptp.drafters.lookup import LookupDrafter
from ptp.drafters.ptp_drafter import PTPSlotDrafter
from ptp.drafters.ptp_model import PTPConfig, PTPModel
from ptp.models import tiny_model

VOCAB = 97
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _ops():
    with maybe_reference_ops():
        yield


def _random_parents(B: int, N1: int, g: torch.Generator, pad_frac: float = 0.2) -> torch.Tensor:
    """Random trees (parents precede children) with some padding nodes (-1) past node 0."""
    parents = torch.full((B, N1), -1, dtype=torch.long)
    for b in range(B):
        for i in range(1, N1):
            if torch.rand((), generator=g) < pad_frac:
                continue
            real = [0] + [j for j in range(1, i) if parents[b, j] >= 0]
            parents[b, i] = real[int(torch.randint(len(real), (), generator=g))]
    return parents


# -- buckets and padding ----------------------------------------------------------------------
def test_pick_bucket():
    assert pick_bucket(1, NODE_BUCKETS) == 1
    assert pick_bucket(3, NODE_BUCKETS) == 4
    assert pick_bucket(65, NODE_BUCKETS) == 72
    assert pick_bucket(193, NODE_BUCKETS) == 256
    assert pick_bucket(257, NODE_BUCKETS) is None
    assert pick_bucket(0, AUX_BUCKETS) == 0
    assert pick_bucket(1449, AUX_BUCKETS) == 1536
    with pytest.raises(ValueError, match="row count must be >= 0, got -1"):
        pick_bucket(-1, NODE_BUCKETS)
    # the cache's slack covers the largest bucket a call of the decoder's room can take
    assert cuda_graphs.cache_slack(65, 0) == 72
    assert cuda_graphs.cache_slack(65, 520) == 72 + 640
    assert cuda_graphs.rounded_capacity(1025) == 2048 and cuda_graphs.rounded_capacity(5) == 1024


@pytest.mark.parametrize("B,N1", [(1, 1), (1, 2), (2, 7), (3, 33), (1, 193)])
def test_tree_mask_closure_matches_the_loop(B, N1, seed, device):
    """The vectorised mask (what tree_mask_and_depth runs for CUDA tensors) is the loop's."""
    g = torch.Generator().manual_seed(seed)
    parents = _random_parents(B, N1, g)
    mask, depth = tree_mask_and_depth(parents)
    mask2, depth2 = tree_mask_and_depth_closure(parents.to(device))
    assert torch.equal(mask, mask2.cpu())
    assert torch.equal(depth, depth2.cpu())
    if device == "cuda":  # the decoder's entry point dispatches to it
        mask3, depth3 = tree_mask_and_depth(parents.to(device))
        assert torch.equal(mask, mask3.cpu()) and torch.equal(depth, depth3.cpu())


def test_pad_call_layout():
    # a 4-node tree (root, two children of the root, one grandchild) and 3 aux rows after node 1
    parents = torch.tensor([[-1, 0, 0, 1]])
    tokens = torch.tensor([[5, 6, 7, 8]])
    aux = AuxRows(embeds=torch.randn(1, 3, 8), anchor=torch.tensor([[1, 1, 1]]),
                  offset=torch.tensor([[1, 2, 3]]), group=torch.tensor([[0, 0, 0]]))
    lens = torch.tensor([10])
    mask, pos = aux_mask_and_positions(parents, aux, lens)
    p = pad_call(tokens, pos, mask, lens, aux, 8, 4)
    assert p.bucket == (8, 4) and (p.num_nodes, p.num_aux) == (4, 3)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 0, 0, 0, 0]]
    # tree positions, pads at the root's position, aux rows moved to start at 8
    assert p.position_ids.tolist() == [[10, 11, 11, 12, 10, 10, 10, 10, 12, 13, 14, 10]]
    m = p.tree_mask[0]
    assert torch.equal(m[:4, :4], mask[0, :4, :4])
    assert torch.equal(m[8:11, :4], mask[0, 4:, :4]) and torch.equal(m[8:11, 8:11], mask[0, 4:, 4:])
    pads = [4, 5, 6, 7, 11]
    for r in pads:  # a padding row sees only itself; no row sees a padding row but itself
        assert m[r].nonzero().flatten().tolist() == [r]
        assert m[:, r].nonzero().flatten().tolist() == [r]
    assert torch.equal(p.aux_embeds[0, :3], aux.embeds[0]) and not p.aux_embeds[0, 3].any()
    # a chain (mask None): causal over the real rows
    c = pad_call(tokens, lens.view(1, 1) + torch.arange(4), None, lens, None, 4, 0)
    assert torch.equal(c.tree_mask[0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert c.aux_embeds is None


def test_pad_call_errors():
    tokens = torch.zeros(1, 5, dtype=torch.long)
    pos = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="node bucket 4 is smaller than the call's 5 tree rows"):
        pad_call(tokens, pos, None, torch.zeros(1, dtype=torch.long), None, 4, 0)
    with pytest.raises(ValueError, match=r"position_ids must be \[B, N1 \+ A\] = \[1, 5\], got \[1, 4\]"):
        pad_call(tokens, pos[:, :4], None, torch.zeros(1, dtype=torch.long), None, 8, 0)
    with pytest.raises(ValueError, match="node_buckets must be increasing"):
        GraphRunner(None, None, None, capture=False, node_buckets=(4, 2))
    with pytest.raises(ValueError, match="aux_buckets must be increasing and start at 0"):
        GraphRunner(None, None, None, capture=False, aux_buckets=(4, 8))


# -- the padded call against the unpadded one (CPU, row-invariant: bitwise) ----------------------
def _slot_model(seed=0):
    base = tiny_model("llama", vocab_size=VOCAB, seed=seed)
    m = PTPModel(base, PTPConfig(num_slots=3, lora=LoRAConfig(rank=4, alpha=8)))
    randomize_slot_drafter(m)
    return base, m.eval()


def _prefilled(base, prompt, S=128):
    """A RowCache holding ``prompt``'s K/V (through the decoder's own prefill path)."""
    dec = Decoder(base)
    cache = RowCache(base.config.num_hidden_layers, 1, S)
    base.set_attn_implementation(dec.impl)
    dev = base.device
    ids = torch.tensor([prompt], device=dev)
    T = ids.shape[1]
    zeros = torch.zeros(1, dtype=torch.long, device=dev)
    dec._forward(cache, ids, torch.arange(T, device=dev).view(1, T), zeros, [0], prefill=True)
    return dec, cache


@pytest.mark.parametrize("kind", ["one", "chain", "tree", "tree+aux"])
@torch.inference_mode()
def test_padded_call_is_bitwise_the_unpadded_call(kind, seed):
    base, m = _slot_model()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (11,), generator=g).tolist()
    L = len(prompt)
    lens = torch.tensor([L])
    N1 = {"one": 1, "chain": 5, "tree": 9, "tree+aux": 9}[kind]
    tokens = torch.randint(3, VOCAB, (1, N1), generator=g)
    aux, mask = None, None
    if kind == "chain":
        positions = lens.view(1, 1) + torch.arange(N1)
    elif kind == "one":
        positions = lens.view(1, 1)
    else:
        parents = _random_parents(1, N1, g, pad_frac=0.1)
        if kind == "tree":
            mask, depth = tree_mask_and_depth(parents)
            positions = lens.view(1, 1) + depth
        else:
            A = 6
            emb = base.get_input_embeddings().weight[torch.randint(3, VOCAB, (1, A), generator=g)]
            aux = AuxRows(embeds=emb.clone(), anchor=torch.tensor([[0, 0, 0, 2, 2, 2]]),
                          offset=torch.tensor([[1, 2, 3, 1, 2, 3]]),
                          group=torch.tensor([[0, 0, 0, 1, 1, 1]]))
            mask, positions = aux_mask_and_positions(parents, aux, lens)
    drafter = PTPSlotDrafter(m, num_slots=3)
    outs = []
    for padded in (False, True):
        dec, cache = _prefilled(base, prompt)
        dec.drafter = drafter
        with LinearRouter(base) as linears:
            dec._fast, dec._linears = fast_forward_for(base), linears
            linears.active = True
            if padded:
                dec._graphs = GraphRunner(dec._fast, cache, drafter.aux_context, capture=False,
                                          linears=linears)
            logits, hidden = dec._forward(cache, tokens, positions, lens, [L], tree_mask=mask, aux=aux,
                                          want_hidden=True)
            if padded:
                assert dec._graphs.replays == 1 and dec._graphs.eager_calls == 0
            T = N1 + (aux.num_rows if aux is not None else 0)
            keys = cache.layers[0].keys[:, :, L:L + N1].clone()
        outs.append((logits, hidden, keys, T))
    (l0, h0, k0, T), (l1, h1, k1, _) = outs
    assert l1.shape == l0.shape == (1, N1, VOCAB)
    assert torch.equal(l0, l1), (l0 - l1).abs().max()
    assert h1.shape == h0.shape and torch.equal(h0, h1)
    assert torch.equal(k0, k1)  # the tree rows' K/V land where the unpadded call puts them


def test_calls_beyond_the_buckets_run_eagerly():
    base, _ = _slot_model()
    dec, cache = _prefilled(base, list(range(3, 10)))
    runner = GraphRunner(fast_forward_for(base), cache, None, capture=False, node_buckets=(1, 2, 4))
    tokens = torch.randint(3, VOCAB, (1, 5))
    pos = torch.tensor([[7, 8, 9, 10, 11]])
    assert runner.forward(tokens, pos, torch.tensor([7]), None, None, 7) is None
    assert runner.eager_calls == 1
    # a call whose padded rows would pass the cache's end runs eagerly too
    assert runner.forward(tokens[:, :3], pos[:, :3], torch.tensor([7]), None, None, 125) is None
    assert runner.eager_calls == 2 and runner.replays == 0


# -- whole decodes through the padded path (CPU) -------------------------------------------------
def _force_padded(monkeypatch):
    """The decoder's graph path on the CPU: GraphRunner(capture=False), the padded calls."""
    monkeypatch.setattr(Decoder, "_graphs_wanted", lambda self, config, batch_size: True)


def _decode(base, drafter, prompts, n=24, temperature=0.0, **cfg):
    dec = Decoder(base, drafter=drafter)
    res = dec.generate(prompts, GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(
        temperature=temperature, seed=4), **cfg))
    return [r.new_token_ids for r in res], dec


@pytest.mark.parametrize("drafter", ["none", "chain", "tree", "ptp"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_padded_decoding_is_token_identical(monkeypatch, drafter, temperature):
    base, m = _slot_model()
    unit = [11, 12, 13, 14, 15]
    prompts = [unit * 3, [20, 21, 22, 23, 20, 21]]

    def make():
        if drafter == "none":
            return None
        if drafter == "ptp":
            return PTPSlotDrafter(m, num_slots=3, tree=temperature == 0, max_nodes=6, top=2)
        return LookupDrafter(lookup_ngram=1, lookup_tokens=5, lookup_branches=1 if drafter == "chain" else 3)

    plain, _ = _decode(base, None, prompts, temperature=temperature)
    eager, _ = _decode(base, make(), prompts, temperature=temperature)
    _force_padded(monkeypatch)
    padded, dec = _decode(base, make(), prompts, temperature=temperature)
    assert eager == plain
    assert padded == plain
    assert dec._graph_state[1].replays > 0
    # a generate call of the same batch size reuses the cache (and, on a GPU, the graphs); rows
    # that finish early leave the batch, so use one prompt
    dec.generate(prompts[:1], GenerationConfig(max_new_tokens=4))
    cache = dec._graph_state[0]
    dec.generate(prompts[1:], GenerationConfig(max_new_tokens=4))
    assert dec._graph_state[0] is cache


def test_cuda_graphs_option_is_checked():
    base = tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="cuda_graphs=True, but the model is on cpu, not CUDA"):
        Decoder(base).generate([[3, 4, 5]], GenerationConfig(max_new_tokens=2, cuda_graphs=True))
    # None on a CPU model: eager calls, no runner
    dec = Decoder(base)
    dec.generate([[3, 4, 5]], GenerationConfig(max_new_tokens=2))
    assert dec._graph_state is None


# -- CUDA: capture and replay ---------------------------------------------------------------------
def _cuda_models(dtype):
    base, m = _slot_model()
    return base.to("cuda", dtype), m.to("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("drafter", ["none", "chain", "tree", "ptp"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_graph_decoding_float32_matches_eager(drafter, temperature):
    """float32: speculative decoding with graphs emits plain decoding's tokens (graphs on and off).

    Not a bitwise claim: on the GPU a token's logits depend on the bucket's kernels by rounding
    (~1e-6); the tiny model's sharpened head keeps argmax and CDF gaps far above that."""
    base, m = _cuda_models(torch.float32)
    unit = [11, 12, 13, 14, 15]
    prompts = [unit * 3, [20, 21, 22, 23, 20, 21]]

    def make():
        if drafter == "none":
            return None
        if drafter == "ptp":
            return PTPSlotDrafter(m, num_slots=3, tree=temperature == 0, max_nodes=6, top=2)
        return LookupDrafter(lookup_ngram=1, lookup_tokens=5, lookup_branches=1 if drafter == "chain" else 3)

    plain_eager, _ = _decode(base, None, prompts, temperature=temperature, cuda_graphs=False)
    plain_graph, _ = _decode(base, None, prompts, temperature=temperature, cuda_graphs=True)
    spec_graph, dec = _decode(base, make(), prompts, temperature=temperature, cuda_graphs=True)
    assert plain_graph == plain_eager
    assert spec_graph == plain_eager
    runner = dec._graph_state[1]
    assert runner.captures > 0 and runner.replays > 0
    # one prompt (no row leaves the batch early): a second generate replays the graphs the first
    # captured, with the same tokens
    dec = Decoder(base, drafter=make())
    cfg = GenerationConfig(max_new_tokens=24, cuda_graphs=True,
                           sampling=SamplingConfig(temperature=temperature, seed=4))
    first = dec.generate(prompts[:1], cfg, sequence_ids=[0])[0].new_token_ids
    runner = dec._graph_state[1]
    before = runner.captures
    assert dec.generate(prompts[:1], cfg, sequence_ids=[0])[0].new_token_ids == first == plain_eager[0]
    assert dec._graph_state[1] is runner and runner.captures == before


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_cuda_replay_matches_the_padded_eager_call(dtype):
    """Replays are bitwise reproducible; they match the padded call run eagerly (the same kernels
    on the same inputs: equal up to cuBLAS's choices under capture), and the real rows' logits stay
    within rounding of the unpadded call (float32 1e-4; bf16 0.1 abs)."""
    base, m = _cuda_models(dtype)
    prompt = list(range(3, 40))
    L = len(prompt)
    lens = torch.tensor([L], device="cuda")
    g = torch.Generator().manual_seed(0)
    parents = _random_parents(1, 9, g, pad_frac=0.1)
    mask, depth = tree_mask_and_depth(parents)
    mask, positions = mask.cuda(), lens.view(1, 1) + depth.cuda()
    tokens = torch.randint(3, VOCAB, (1, 9), generator=g).cuda()
    drafter = PTPSlotDrafter(m, num_slots=3)
    outs = {}
    for how in ("unpadded", "padded", "graph"):
        dec, cache = _prefilled(base, prompt)
        dec.drafter, dec._fast = drafter, fast_forward_for(base)
        if how != "unpadded":
            dec._graphs = GraphRunner(dec._fast, cache, drafter.aux_context, capture=how == "graph")
        logits, _ = dec._forward(cache, tokens, positions, lens, [L], tree_mask=mask)
        outs[how] = logits.float().clone()
        if how == "graph":  # replay again over the same inputs: bitwise the same
            again, _ = dec._forward(cache, tokens, positions, lens, [L], tree_mask=mask)
            assert dec._graphs.captures == 1 and dec._graphs.replays == 2
            assert torch.equal(again.float(), outs["graph"])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs["graph"], outs["padded"], atol=tol, rtol=0)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(outs["padded"], outs["unpadded"], atol=tol, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_decoding_bfloat16_greedy_tokens():
    """bf16, greedy: with graphs, lookup trees and PTP slots emit plain decoding's tokens on this
    model (argmax gaps far above bf16 rounding); bitwise logits are not claimed across buckets."""
    base, m = _cuda_models(torch.bfloat16)
    prompts = [[11, 12, 13, 14, 15] * 3]
    plain, _ = _decode(base, None, prompts, cuda_graphs=True)
    tree, _ = _decode(base, LookupDrafter(lookup_ngram=1, lookup_tokens=5, lookup_branches=3), prompts,
                      cuda_graphs=True)
    ptp, _ = _decode(base, PTPSlotDrafter(m, num_slots=3, tree=True, max_nodes=6, top=2), prompts,
                     cuda_graphs=True)
    assert tree == plain and ptp == plain


# -- the cost curve's report (CPU: made-up timings) ----------------------------------------------
def test_cost_curve_projection():
    from benchmarks.gpu_cost_curve import interpolate, report

    curve = {1: 5.0, 8: 5.2, 512: 12.0, 1024: 20.0}
    assert interpolate(curve, 1) == (5.0, False) and interpolate(curve, 0.5) == (5.0, False)
    assert interpolate(curve, 768) == (16.0, False)
    assert interpolate(curve, 1536) == (28.0, True)  # past the curve: the last slope
    data = {"meta": {"device": "test", "torch": "x", "layers": 32, "params": 8_030_261_248, "build_s": 1.0,
                     "copy_bytes_per_s": 3.0e12, "matmul_flops": 8.0e14, "vocab_size": 128256,
                     "hidden_size": 4096, "kv_heads": 8, "heads": 32, "head_dim": 128, "reps": 3,
                     "eager_reps": 1},
            "curves": {"512": {str(r): [c, c + 0.5, c + 3] for r, c in curve.items()}}}
    text = report(data, {"plain": (1.0, 1.0), "tree": (3.0, 1024.0)}, None, "cmd")
    # call column = curve + 0.5: plain 1.00x; tree 3 x 5.5 / 20.5
    assert "| plain | 1.00 | 1 | 5.50 | 1.00x |" in text
    assert f"| tree | 3.00 | 1024 | 20.50 | {3 * 5.5 / 20.5:.2f}x |" in text
    # the floor of a 1-row call: the bf16 weights over the copy bandwidth (16.06 GB / 3 TB/s)
    kv = 512 * 32 * 2 * 8 * 128 * 2
    assert f"| 1 | 5.000 | 5.500 | 8.000 | {(8_030_261_248 * 2 + kv) / 3.0e12 * 1e3:.3f} |" in text
