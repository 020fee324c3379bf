"""Test helpers for the decoder: tiny-model prompts, HF greedy baselines, and (for development
before the compiled ops exist) routing ``ptp_ext.ops`` to the pure-PyTorch references.

The decoder always calls ``ptp_ext.ops.*``; :func:`reference_ops` swaps those module attributes
for the duration of a ``with`` block, and is used only when ``PTP_TEST_REFERENCE_OPS=1``.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ptp_ext import ops, reference

__all__ = ["reference_ops", "maybe_reference_ops", "hf_greedy"]


def _tree_attention_ref(query, key_cache, value_cache, cache_lens, tree_mask=None, scale=None,
                        return_lse=False):
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if tree_mask is not None and tree_mask.dim() == 2:
        tree_mask = tree_mask.unsqueeze(0).expand(query.shape[0], -1, -1)
    out, lse = reference.tree_attention_ref(query, key_cache, value_cache, cache_lens, tree_mask,
                                            scale)
    return (out, lse) if return_lse else out


def _verify_tree_ref(draft_tokens, parents, target_logits, draft_probs=None, uniforms=None,
                     mode="greedy", temperature=0.0, top_k=0, top_p=1.0):
    return reference.verify_tree_ref(draft_tokens, parents, target_logits, draft_probs, uniforms,
                                     mode, temperature, top_k, top_p)


@contextlib.contextmanager
def reference_ops(names=("tree_attention", "verify_tree")):
    refs = {"tree_attention": _tree_attention_ref, "verify_tree": _verify_tree_ref}
    saved = {n: getattr(ops, n) for n in names}
    for n in names:
        setattr(ops, n, refs[n])
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(ops, n, f)


def maybe_reference_ops():
    """``PTP_TEST_REFERENCE_OPS=1`` (all ops) or a comma list of op names: route those to the
    references; otherwise a no-op context."""
    flag = os.environ.get("PTP_TEST_REFERENCE_OPS", "")
    if not flag or flag == "0":
        return contextlib.nullcontext()
    return reference_ops() if flag == "1" else reference_ops(tuple(flag.split(",")))


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    """HF ``generate`` greedy (SDPA attention), new token ids only."""
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=0,
                         eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def record_sampling_logits(decoder) -> dict:
    """Patch ``decoder._verify`` to record the logits row behind every token the decoder commits:
    ``{(sequence_id, position of the sampled token): logits [V]}``. Plain and speculative runs
    with row-invariant target calls must record bitwise-identical rows for shared keys."""
    from ptp.decode.decoder import tree_mask_and_depth

    rec: dict = {}
    orig = decoder._verify

    def verify(tokens, parents, logits, cache_lens, seq_ids, sampling, draft_probs=None):
        out = orig(tokens, parents, logits, cache_lens, seq_ids, sampling, draft_probs)
        num_acc, acc_nodes = out[0].tolist(), out[1].tolist()
        _, depth = tree_mask_and_depth(parents)
        for b in range(tokens.shape[0]):
            for i in range(num_acc[b] + 1):
                node = acc_nodes[b][i]
                pos = int(cache_lens[b]) + 1 + int(depth[b, node])
                rec[(int(seq_ids[b]), pos)] = logits[b, node].detach().clone()
        return out

    decoder._verify = verify
    return rec


def record_drafter_hidden(drafter) -> list:
    """Patch ``drafter.observe`` (if it reads hidden states) to record, per step, the tree rows'
    and the aux rows' final hidden states it is handed; returns the (growing) list."""
    hidden: list = []
    if drafter is None or not getattr(drafter, "wants_hidden", False):
        return hidden
    orig = drafter.observe

    def observe(outcome):
        hidden.append(outcome.hidden.clone())
        if outcome.aux_hidden is not None:
            hidden.append(outcome.aux_hidden.clone())
        orig(outcome)
    drafter.observe = observe
    return hidden


def assert_same_logits(plain: dict, spec: dict) -> None:
    """Every position plain decoding sampled was also sampled by ``spec`` (which may have
    verified a few more past the token limit), with bitwise-equal logits."""
    missing = set(plain) - set(spec)
    assert not missing, f"{len(missing)} positions never sampled speculatively, e.g. {sorted(missing)[:3]}"
    bad = [(k, float((plain[k] - spec[k]).abs().max())) for k in sorted(plain)
           if not torch.equal(plain[k], spec[k])]
    assert not bad, f"{len(bad)} of {len(plain)} positions differ, first: {bad[:3]}"


def copy_matches_loop(hist: list, y2: int, y1: int, y: int, pos: int, max_matches: int) -> list:
    """Loop reference of :func:`ptp.drafters.masked_model.copy_matches` for one query: the ``max_matches``
    most recent ``j`` with ``hist[j] == y`` and ``j + 1 < len(hist)``, each as ``(hist[j + 1],
    bigram, trigram, log(pos - j))``, most recent first."""
    import math

    out = []
    for j in range(len(hist) - 2, -1, -1):
        if hist[j] != y:
            continue
        m2 = j >= 1 and hist[j - 1] == y1
        m3 = m2 and j >= 2 and hist[j - 2] == y2
        out.append((int(hist[j + 1]), float(m2), float(m3), math.log(max(pos - j, 1))))
        if len(out) == max_matches:
            break
    return out


def copy_attention_loop(E, w, a, h, matches: list):
    """Loop reference of :func:`ptp.drafters.masked_model.copy_attention` for one query: softmax over the "no
    copy" logit ``a[:-1] . h + a[-1]`` and each match's score ``w0 + w1 bigram + w2 trigram -
    softplus(w3) log distance`` (``matches`` of :func:`copy_matches_loop`), weighting the embeddings
    ``E`` of the tokens that followed (float64 accumulation)."""
    import torch.nn.functional as F

    logits = [float(h @ a[:-1] + a[-1])]
    for _, m2, m3, logd in matches:
        logits.append(float(w[0] + w[1] * m2 + w[2] * m3 - F.softplus(w[3]) * logd))
    att = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)[1:]
    o = torch.zeros(E.shape[1], dtype=torch.float64)
    for (v, *_), p in zip(matches, att):
        o += float(p) * E[v].double()
    return o.to(h.dtype)


def copy_head_loop(heads, h, head: int, y: int, matches: list):
    """Loop reference of one copy head's block (``MTPHeads.head_hidden`` with ``copy_attn``) for
    one query: ``h + silu(W h + U e(y) + C o + b) + g * o``, ``o`` the attention over the "no
    copy" logit and the ``matches`` of :func:`copy_matches_loop`."""
    import torch.nn.functional as F

    E = heads.base.get_input_embeddings().weight
    o = copy_attention_loop(E, heads.copy_score[head], heads.copy_null[head], h, matches)
    pre = heads.proj[head] @ h + heads.bias[head] + heads.tok_proj[head] @ E[y] + heads.copy_proj[head] @ o
    return h + F.silu(pre) + heads.copy_gate[head] * o


def copy_sampler_loop(model, z, prev: int, j: int, matches: list):
    """Loop reference of the masked-input drafter's copy sampler (``MaskedModel.sampler_hidden`` with
    ``copy_attn``) for one mask row: ``h = z + MLP([z; E(prev)])`` (the sampler head), then
    ``h + g_j * o + C o`` with ``o`` the attention over the "no copy" logit ``a_j . h + c_j`` and
    the ``matches`` of :func:`copy_matches_loop`."""
    import torch.nn.functional as F

    E = model.embedding()
    s = model.sampler
    a1 = s.norm1(F.silu(s.fc1(torch.cat([z, E[prev]]))))
    h = z + s.norm2(F.silu(s.fc2(a1)))
    o = copy_attention_loop(E, model.copy_score[j], model.copy_null[j], h, matches)
    return h + model.copy_gate[j] * o + model.copy_proj @ o


def copy_inputs_from_rows(rows: list):
    """:class:`ptp.drafters.masked_model.CopyInputs` ``[Q, M]`` from per-query :func:`copy_matches_loop` lists
    (padded; invalid past each list's end)."""
    from ptp.drafters.masked_model import CopyInputs

    M = max(1, max(len(r) for r in rows))
    vals = torch.zeros(len(rows), M, dtype=torch.long)
    feats = torch.zeros(len(rows), M, 3)
    valid = torch.zeros(len(rows), M, dtype=torch.bool)
    for q, r in enumerate(rows):
        for k, (v, m2, m3, logd) in enumerate(r):
            vals[q, k], valid[q, k] = v, True
            feats[q, k] = torch.tensor([m2, m3, logd])
    return CopyInputs(vals, feats, valid)


def candidate_path_scores(logprobs, start_tail: tuple, depths: int, per_node: int) -> dict:
    """Brute force over a chained drafter's candidate grid: every path of up to ``depths`` tokens
    whose token at each depth is one of the ``per_node`` most likely after its path, with its
    log-probability. ``logprobs(i, tail) -> [V]``: depth i's distribution after the path ending with
    ``tail = (y2, y1, y)`` (``start_tail``: the root's)."""
    scores: dict = {}

    def walk(path: tuple, tail: tuple, score: float) -> None:
        i = len(path)
        lp = logprobs(i, tail)
        v, ix = lp.topk(min(per_node, lp.shape[-1]))
        for c in range(v.shape[0]):
            t = int(ix[c])
            p, sc = path + (t,), score + float(v[c])
            scores[p] = sc
            if i + 1 < depths:
                walk(p, (tail[1], tail[2], t), sc)

    walk((), tuple(start_tail), 0.0)
    return scores


@torch.no_grad()
def randomize_slot_drafter(model, seed: int = 2) -> None:
    """Gives a slot drafter (PTP or masked-input) random LoRA B matrices (x 0.05) and, if it has
    copy attention, random copy tensors, so its drafts depend on every part (tests)."""
    from ptp.decode.lora import GatedLoRALinear

    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, GatedLoRALinear):
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
    if getattr(model, "copy_score", None) is not None:
        for name, scale in (("copy_score", 1.0), ("copy_null", 0.3), ("copy_proj", 0.1), ("copy_gate", 1.0)):
            t = getattr(model, name)
            t.copy_(torch.randn(t.shape, generator=g) * scale)


def repeat_sequences(n: int, seed: int, vocab: int) -> list:
    """``n`` training sequences whose answers repeat their random prompt (then its first 6 tokens):
    the next tokens are in the context only, so only a drafter that copies can predict them."""
    from ptp.train.data import Sequence

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, vocab, (10 + i % 5,), generator=g)
        out.append(Sequence(torch.cat([p, p, p[:6]]), p.numel()))
    return out


def decode(base, prompts, drafter, sampling, n: int = 40) -> tuple[list, int]:
    """Each prompt's new tokens through ptp's decoder with ``drafter`` (``None``: plain decoding)
    and the target calls it took in all."""
    from ptp.decode.decoder import Decoder, GenerationConfig

    res = Decoder(base, drafter=drafter).generate(prompts, GenerationConfig(max_new_tokens=n, sampling=sampling))
    return [r.new_token_ids for r in res], sum(r.target_calls for r in res)


def copy_prompts(vocab: int) -> list:
    """Two random prompts and one that repeats a 5-token unit three times (lookup and copy drafters
    then have something to copy)."""
    g = torch.Generator().manual_seed(1)
    unit = torch.randint(3, vocab, (5,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in (6, 11)] + [unit * 3]
