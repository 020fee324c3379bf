"""Training sequences: the teacher (the target) answers the training prompts.

A sequence is ``(ids, prompt_len)``: the chat-templated prompt followed by the teacher's answer.
The uniforms are not stored: the trainer recomputes the teacher's conditionals over the whole
sequence in its one real-token pass anyway, so each token's CDF bin ``[F(t-1), F(t))`` (and u
inside it) comes from the very logits it trains against. Temperature 0: greedy answers (u is not
used). Temperature > 0: answers are sampled from the plain temperature distribution (no top-k /
top-p at generation, so every token has a non-empty bin under the training distribution).

Two generation backends (``DataConfig.backend``): ``"ptp"`` decodes with this project's own
:class:`ptp.decode.decoder.Decoder` (drafter ``none``): every answer is exactly the target's plain
single-sequence decoding whatever the batch it shared (row-invariant calls on the CPU), finished
answers leave the batch, and sampled answers take the position-indexed uniform stream, so token
``j`` of sequence ``i`` was picked by ``U(seed, i, prompt_len + j)`` (:func:`ptp.decode.sampling.uniforms`).
``"hf"`` is transformers' batched ``generate`` (left padded). ``"auto"`` (default) takes ``ptp`` on
the CPU, where it is 2.1x faster (SmolLM2, 32 answers x 160 tokens on a 2-core AMD EPYC: 0.82 vs
1.69 s per answer, the same 32 answers), and ``hf`` elsewhere.

Stored as ``<path>.safetensors`` (one flat int32 tensor + offsets) plus ``<path>.json``
(the command's settings and the prompts), so a data set is reproducible and inspectable.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ptp.decode.draft import Drafter
from ptp.train.prompts import build_prompt_plan, build_prompts, derive_prompts


@dataclass
class DataConfig:
    num_prompts: int = 256
    seed: int = 0
    max_new_tokens: int = 192
    temperature: float = 0.0
    batch_size: int = 16
    model: str = "smollm2-135m-instruct"
    prompt_set: str = "v2"  # "v2": two-stage varied set (default); "v1": the first 320-template set
    backend: str = "auto"  # "ptp" (ptp.decode.decoder), "hf" (transformers generate), "auto": ptp on the CPU


@dataclass
class Sequence:
    ids: torch.Tensor  # [L] long
    prompt_len: int
    # the target's final hidden states at the answer anchors ``prompt_len-1 .. L-2`` ([L - prompt_len,
    # d] float16), when the generation recorded them (``generate_sequences(record_hidden=True)``)
    hidden: Optional[torch.Tensor] = None


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


BACKENDS = ("auto", "ptp", "hf")


def resolve_backend(model, backend: str) -> str:
    """``auto`` -> ``ptp`` for a CPU model, ``hf`` elsewhere (the decoder's GPU path is exact but its
    end-to-end speed is unmeasured); ``ptp`` / ``hf`` as given."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    return "ptp" if next(model.parameters()).device.type == "cpu" else "hf"


def _truncate_at_eos(ans: torch.Tensor, eos) -> torch.Tensor:
    if eos is None:
        return ans
    hit = (ans == eos).nonzero()
    return ans[: int(hit[0, 0]) + 1] if hit.numel() else ans


@torch.no_grad()
def _answer(model, tok, prompts: list[str], cfg: DataConfig, gen: torch.Generator, bar,
            first_id: int = 0, record_hidden: bool = False) -> list[Sequence]:
    """The teacher answers ``prompts`` (batches formed by prompt length, so little compute goes to
    padding); returned in the order of ``prompts``. ``first_id`` numbers the prompts in the
    uniform stream of the ``ptp`` backend (prompt ``r`` is sequence ``first_id + r``).
    ``record_hidden`` (``ptp`` backend only) fills each ``Sequence.hidden`` from the decoding calls."""
    if resolve_backend(model, cfg.backend) == "ptp":
        return _answer_decoder(model, tok, prompts, cfg, bar, first_id, record_hidden)
    if record_hidden:
        raise ValueError("only the ptp generation backend records hidden states")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chats = [chat_ids(tok, p) for p in prompts]
    order = sorted(range(len(chats)), key=lambda i: len(chats[i]))
    out: list[Optional[Sequence]] = [None] * len(chats)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = [chats[i] for i in idx]
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, b in enumerate(batch):
            ids[r, width - len(b):] = torch.tensor(b)
            attn[r, width - len(b):] = 1
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        kw = dict(do_sample=False) if cfg.temperature == 0 else dict(
            do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
        res = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, **kw)
        for r, (i, b) in enumerate(zip(idx, batch)):
            ans = _truncate_at_eos(res[r, width:].cpu(), tok.eos_token_id)
            out[i] = Sequence(torch.cat([torch.tensor(b), ans]), len(b))
        bar.update(len(batch))
    return out  # type: ignore[return-value]


class _HiddenRecorder(Drafter):
    """Plain decoding (it drafts nothing) that keeps the target's final hidden state of every fed
    token: the prefill's last prompt token, then each step's root (the token committed before it).
    Those are exactly the answer anchors ``prompt_len-1 .. L-2`` of the finished sequence, computed
    by the very calls the ``heads`` drafter reads at decode time, so the training pass over the
    data (``ptp.train.heads.answer_hidden_states``) is not needed."""

    name = "none"
    wants_hidden = True

    def __init__(self) -> None:
        self.rows: dict[int, list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.rows = {}

    def propose(self, request):
        return None

    def observe(self, outcome) -> None:
        if outcome.hidden.shape[1] != 1:
            raise RuntimeError("the hidden-state recorder expects one node (the root) per step")
        h = outcome.hidden[:, 0].float().cpu().to(torch.float16)
        for b, seq in enumerate(outcome.sequence_ids):
            self.rows.setdefault(seq, []).append(h[b])

    def take(self, seq: int, count: int) -> torch.Tensor:
        rows = self.rows.pop(seq)
        if len(rows) < count:
            raise RuntimeError(f"sequence {seq}: {len(rows)} hidden states recorded for {count} anchors")
        return torch.stack(rows[:count])


def _answer_decoder(model, tok, prompts: list[str], cfg: DataConfig, bar, first_id: int,
                    record_hidden: bool = False) -> list[Sequence]:
    """``_answer`` through :class:`ptp.decode.decoder.Decoder` with no drafter (plain decoding)."""
    from ptp.decode.decoder import Decoder, GenerationConfig
    from ptp.drafters import make_drafter
    from ptp.decode.sampling import SamplingConfig

    recorder = _HiddenRecorder() if record_hidden else None
    decoder = Decoder(model, tok, recorder if recorder is not None else make_drafter("none", model, tok))
    eos = tok.eos_token_id
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens,
                              sampling=SamplingConfig(temperature=cfg.temperature, seed=cfg.seed),
                              eos_token_ids=() if eos is None else (int(eos),))
    chats = [chat_ids(tok, p) for p in prompts]
    order = sorted(range(len(chats)), key=lambda i: len(chats[i]))
    out: list[Optional[Sequence]] = [None] * len(chats)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        results = decoder.generate([chats[i] for i in idx], config, sequence_ids=[first_id + i for i in idx])
        for i, res in zip(idx, results):
            ans = _truncate_at_eos(torch.tensor(res.new_token_ids, dtype=torch.long), eos)
            hidden = recorder.take(first_id + i, ans.numel()) if recorder is not None else None
            out[i] = Sequence(torch.cat([torch.tensor(chats[i], dtype=torch.long), ans]), len(chats[i]), hidden)
        bar.update(len(idx))
    return out  # type: ignore[return-value]


@torch.no_grad()
def generate_sequences(model, tok, cfg: DataConfig, progress: bool = True,
                       record_hidden: bool = False) -> tuple[list[Sequence], list[str]]:
    """The teacher answers the training prompts: ``build_prompts`` (v1) or the two-stage v2 plan
    (stage 1 writes passages and questions, stage 2 works on them; see ``ptp.train.prompts``).
    ``record_hidden`` (``ptp`` backend only) also keeps each answer's hidden states
    (``Sequence.hidden``), which the ``heads`` trainer would otherwise recompute."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    if cfg.batch_size < 1:
        raise ValueError(f"generation batch size must be >= 1, got {cfg.batch_size}")
    cfg = replace(cfg, backend=resolve_backend(model, cfg.backend))  # once, for both stages
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    if cfg.prompt_set == "v1":
        prompts = build_prompts(cfg.num_prompts, cfg.seed)
        with tqdm(total=len(prompts), desc="teacher answers", disable=not progress) as bar:
            return _answer(model, tok, prompts, cfg, gen, bar, record_hidden=record_hidden), prompts
    if cfg.prompt_set != "v2":
        raise ValueError(f"unknown prompt set {cfg.prompt_set!r} (v1 or v2)")
    stage1, plain = build_prompt_plan(cfg.num_prompts, cfg.seed)
    first = [p for p, _ in stage1]
    with tqdm(total=2 * len(stage1) + len(plain), desc="teacher answers", disable=not progress) as bar:
        seqs1 = _answer(model, tok, first, cfg, gen, bar, record_hidden=record_hidden)
        texts = [tok.decode(s.ids[s.prompt_len:], skip_special_tokens=True) for s in seqs1]
        second = derive_prompts(stage1, texts, cfg.seed) + plain
        seqs2 = _answer(model, tok, second, cfg, gen, bar, first_id=len(first), record_hidden=record_hidden)
    return seqs1 + seqs2, first + second


def save_sequences(path: str, seqs: list[Sequence], cfg: DataConfig, prompts: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    flat = torch.cat([s.ids for s in seqs]).to(torch.int32)
    lens = torch.tensor([len(s.ids) for s in seqs], dtype=torch.int64)
    plens = torch.tensor([s.prompt_len for s in seqs], dtype=torch.int64)
    save_file({"ids": flat, "lengths": lens, "prompt_lengths": plens}, path + ".safetensors")
    with open(path + ".json", "w") as f:
        json.dump({"config": asdict(cfg), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "num_sequences": len(seqs), "num_tokens": int(flat.numel()), "prompts": prompts}, f,
                  indent=1)


def load_sequences(path: str) -> tuple[list[Sequence], dict]:
    t = load_file(path + ".safetensors")
    with open(path + ".json") as f:
        meta = json.load(f)
    seqs, off = [], 0
    for n, p in zip(t["lengths"].tolist(), t["prompt_lengths"].tolist()):
        seqs.append(Sequence(t["ids"][off : off + n].long(), p))
        off += n
    return seqs, meta


def text_sequences(tok, texts: list[str], max_len: int = 512) -> list[Sequence]:
    """Plain text for teacher-free training: every token after the first is a training target."""
    out = []
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids[0][:max_len]
        if len(ids) > 4:
            out.append(Sequence(ids, 1))
    return out


def answer_token_counts(seqs: list[Sequence], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in the answers (``ids[prompt_len:]``) of ``seqs``, float32
    ``[vocab_size]``: the MTP heads keep it to choose their draft vocabulary."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in seqs:
        a = s.ids[s.prompt_len:].long().view(-1)
        if a.numel() and int(a.max()) >= vocab_size:
            raise ValueError(f"token id {int(a.max())} is outside the model's vocabulary ({vocab_size}): "
                             "data made for another model?")
        counts += torch.bincount(a, minlength=vocab_size).double()
    return counts.float()
