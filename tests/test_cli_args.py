"""``--device`` / ``--dtype`` of ``ptp generate`` and ``benchmarks/e2e.py``: parsed into what
``load_target`` takes, with a clear error (no traceback) for what this machine cannot do."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from ptp.models import load_target, parse_dtype, resolve_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="is_available"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda").type == "cuda"
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_load_target_dtype_and_device(tmp_path):
    """A from_pretrained directory loads in the asked dtype on the asked device."""
    from ptp.models import tiny_model

    model = tiny_model("llama", vocab_size=97)
    model.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tmodels

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tmodels.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    tok.save_pretrained(tmp_path)
    m, _ = load_target(str(tmp_path), dtype=torch.bfloat16, device=resolve_device("cpu"))
    assert next(m.parameters()).dtype is torch.bfloat16 and m.device.type == "cpu"


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    return subprocess.run([sys.executable, "-m", "ptp", "generate", "--prompt", "hi", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_device_without_cuda_is_a_clear_error():
    proc = _cli("--device", "cuda")
    assert proc.returncode != 0
    assert "is_available() is False" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_rejects_unknown_device_and_dtype():
    proc = _cli("--device", "tpu")
    assert proc.returncode != 0 and "unknown device 'tpu'" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("--dtype", "int8")
    assert proc.returncode == 2 and "--dtype" in proc.stderr


def test_row_invariant_flag():
    from ptp.cli import build_parser

    p = build_parser()
    assert p.parse_args(["generate", "--prompt", "x"]).row_invariant is None  # auto: on for CPU
    assert p.parse_args(["generate", "--prompt", "x", "--no-row-invariant"]).row_invariant is False
    assert p.parse_args(["generate", "--prompt", "x", "--row-invariant"]).row_invariant is True


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, before the model loads (in-process, no model)
# ---------------------------------------------------------------------------------------------
def _write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import ptp.models

    def load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(ptp.models, "load_target", load)


def _usage_error(capsys, argv: list[str], loaded: bool = False) -> str:
    """Run the command; it must exit with status 2 and one error line (after the model's loading
    bar when ``loaded``); returns that line."""
    from ptp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and (loaded or len(lines) == 1), err
    assert lines[-1].startswith("ptp generate: error: "), err
    return lines[-1]


GOOD = '{"question_id": 1, "turns": ["hi"]}\n'


BAD_INPUT = [  # (id, argv, stderr pattern); {name} = a file of the test below
    ("json-dir-missing", ["--prompt", "x", "--json", "{tmp}/no/such/dir/out.json"],
     r"--json \S+/no/such/dir/out.json: directory \S+ does not exist"),
    ("json-is-dir", ["--prompt", "x", "--json", "{tmp}"], r"--json \S+: is a directory"),
    ("jsonl-dir-missing", ["--prompt", "x", "--jsonl", "{tmp}/nope/out.jsonl"], r"--jsonl .*does not exist"),
    ("same-file", ["--prompt", "x", "--json", "{tmp}/o", "--jsonl", "{tmp}/o"], r"name the same file"),
    ("prompts-missing", ["--prompts", "{tmp}/missing.jsonl"],
     r"--prompts \S+missing.jsonl: No such file or directory"),
    ("prompts-is-dir", ["--prompts", "{tmp}"], r"--prompts \S+: Is a directory"),
    ("bad-json", ["--prompts", "{bad_json}"], r"bad_json.jsonl:3: malformed JSON \(Expecting ',' "
                                              r"delimiter at column 19\)"),
    ("not-utf8", ["--prompts", "{latin1}"],
     r"latin1.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 15 of the line\)"),
    ("no-turns", ["--prompts", "{no_turns}"], r'no_turns.jsonl:2: expected "turns": a non-empty list '
                                              r"of strings \(the first is the prompt\), got no 'turns'"),
    ("turns-str", ["--prompts", "{turns_str}"],
     r"turns_str.jsonl:1: expected \"turns\".*got 'turns' = \"hi\""),
    ("not-object", ["--prompts", "{array}"], r"array.jsonl:1: expected a JSON object, got list"),
    ("empty-file", ["--prompts", "{empty}"], r"empty.jsonl: no questions"),
    ("model-path", ["--prompt", "x", "--model", "./no-such-model"], r"--model: no model at ./no-such-model"),
    ("model-gguf", ["--prompt", "x", "--model", "{tmp}/m.gguf"], r"--model: no model at \S+m.gguf"),
    ("temperature", ["--prompt", "x", "--temperature", "-0.5"], r"--temperature must be >= 0, got -0.5"),
    ("top-p-0", ["--prompt", "x", "--top-p", "0"], r"--top-p must be in \(0, 1\], got 0.0"),
    ("top-p-big", ["--prompt", "x", "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1.5"),
    ("top-k", ["--prompt", "x", "--top-k", "-1"], r"--top-k must be >= 0, got -1"),
    ("limit-0", ["--prompts", "{good}", "--limit", "0"], r"--limit must be >= 1, got 0"),
    ("limit-neg", ["--prompts", "{good}", "--limit", "-1"], r"--limit must be >= 1, got -1"),
    ("limit-prompt", ["--prompt", "x", "--limit", "2"], r"--limit applies to --prompts"),
    ("stop-empty", ["--prompt", "x", "--stop", ""], r"--stop needs a non-empty string"),
    ("option-none", ["--prompt", "x", "--drafter", "none", "--drafter-option", "tree=1"],
     r"--drafter-option tree=1: --drafter none takes no options"),
    ("option-syntax", ["--prompt", "x", "--drafter-option", "tree"], r"--drafter-option needs KEY=VALUE"),
    ("drafter-unknown", ["--prompt", "x", "--drafter", "nosuch"], r"unknown drafter 'nosuch'"),
    ("option-unknown", ["--prompt", "x", "--drafter", "lookup", "--drafter-option", "nope=1"],
     r"drafter 'lookup' has no option 'nope'; valid options: "),
    ("option-range", ["--prompt", "x", "--drafter", "lookup", "--drafter-option", "lookup_tokens=0"],
     r"option lookup_tokens must be >= 1, got 0"),
    ("option-type", ["--prompt", "x", "--drafter", "ptp", "--drafter-option", "preset=auto",
                     "--drafter-option", "num_slots=many"], r"option num_slots must be an integer"),
    ("option-conflict", ["--prompt", "x", "--drafter", "lookup", "--drafter-option", "measured_costs=true",
                         "--drafter-option", "row_cost=0.2"], r"measured_costs .* leave row_cost unset"),
    ("preset-unknown", ["--prompt", "x", "--drafter", "ptp", "--drafter-option", "preset=fast"],
     r"option preset must be one of "),
    ("max-new", ["--prompt", "x", "--max-new-tokens", "0"], r"--max-new-tokens must be >= 1, got 0"),
    ("batch", ["--prompt", "x", "--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
    ("draft-nodes", ["--prompt", "x", "--max-draft-nodes", "-1"], r"--max-draft-nodes must be >= 0"),
]


@pytest.mark.parametrize("argv,match", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_before_the_model_loads(tmp_path, capsys, no_model, argv, match):
    files = {
        "good": _write(tmp_path / "good.jsonl", GOOD),
        "bad_json": _write(tmp_path / "bad_json.jsonl", GOOD + "\n" + '{"question_id": 2 "turns": ["x"]}\n'),
        "latin1": _write(tmp_path / "latin1.jsonl",
                         GOOD.encode() + '{"turns": ["café"]}\n'.encode("latin-1")),
        "no_turns": _write(tmp_path / "no_turns.jsonl", GOOD + '{"question_id": 2, "prompt": "x"}\n'),
        "turns_str": _write(tmp_path / "turns_str.jsonl", '{"turns": "hi"}\n'),
        "array": _write(tmp_path / "array.jsonl", '["hi"]\n'),
        "empty": _write(tmp_path / "empty.jsonl", "\n\n"),
        "tmp": str(tmp_path),
    }
    err = _usage_error(capsys, [a.format(**files) for a in argv])
    assert re.search(match, err), err


def test_read_specbench_defaults_and_limit(tmp_path):
    from ptp.cli import read_specbench

    path = _write(tmp_path / "q.jsonl", '\ufeff{"turns": ["a"]}\n\n{"question_id": "q7", "category": "c", '
                                        '"turns": ["b", "c"]}\n{"turns": ["d"]}\n{not json')
    qs = read_specbench(path, limit=3)  # stops before the malformed last line
    assert [(q["question_id"], q["category"], q["turns"][0]) for q in qs] == [
        (1, None, "a"), ("q7", "c", "b"), (4, None, "d")]  # default id: the line number


# ---------------------------------------------------------------------------------------------
# A whole run on a tiny saved model (in-process): JSONL as prompts complete, progress, context
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ptp.models import tiny_model

    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", vocab_size=97).save_pretrained(path)
    words = Tokenizer(tmodels.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(path)
    return str(path)


def _questions(tmp_path, n: int, words: int = 6) -> str:
    lines = [json.dumps({"question_id": 10 + i, "category": "c",
                         "turns": [" ".join(f"w{3 + (5 * i + j) % 90}" for j in range(words))]})
             for i in range(n)]
    return _write(tmp_path / "q.jsonl", "\n".join(lines) + "\n")


def test_prompts_run_writes_jsonl_and_shows_progress(tmp_path, capsys, tiny_dir):
    from ptp.cli import main

    out, doc = tmp_path / "out.jsonl", tmp_path / "out.json"
    assert main(["generate", "--model", tiny_dir, "--prompts", _questions(tmp_path, 3),
                 "--max-new-tokens", "8", "--drafter", "lookup", "--batch-size", "2",
                 "--jsonl", str(out), "--json", str(doc), "--progress"]) == 0
    cap = capsys.readouterr()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [10, 11, 12]
    for r in records:
        assert set(r) == {"question_id", "category", "prompt_tokens", "new_token_ids", "text",
                          "finish_reason", "target_calls", "seconds"}
        assert len(r["new_token_ids"]) == 8 and r["finish_reason"] == "length" and r["prompt_tokens"] == 6
        assert r["text"] == " ".join(f"w{i}" for i in r["new_token_ids"])
        assert f"--- [{r['question_id']}] c\n{r['text']}\n" in cap.out
    assert re.search(r"3/3 .*tokens/s, \d+\.\d\d tokens/call", cap.err), cap.err  # the tqdm bar
    results = json.loads(doc.read_text())["results"]
    assert [r["new_token_ids"] for r in results] == [r["new_token_ids"] for r in records]


def test_jsonl_keeps_the_prompts_finished_before_a_crash(tmp_path, capsys, tiny_dir, monkeypatch):
    from ptp.cli import main
    from ptp.decode.decoder import Decoder

    calls = []
    real = Decoder.generate

    def generate(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies during the second batch
        return real(self, *a, **k)
    monkeypatch.setattr(Decoder, "generate", generate)
    out = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        main(["generate", "--model", tiny_dir, "--prompts", _questions(tmp_path, 3),
              "--max-new-tokens", "4", "--drafter", "none", "--jsonl", str(out)])
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [10]


def test_prompt_beyond_the_context_stops_before_decoding(tmp_path, capsys, tiny_dir, monkeypatch):
    from ptp.cli import main
    from ptp.decode.decoder import Decoder

    monkeypatch.setattr(Decoder, "_run", lambda *a, **k: pytest.fail("decoding started"))
    err = _usage_error(capsys, ["--model", tiny_dir, "--prompts", _questions(tmp_path, 2, words=500),
                                "--max-new-tokens", "20", "--drafter", "none"], loaded=True)
    assert err == ("ptp generate: error: question 10 has 500 tokens + max_new_tokens 20 = 520, more "
                   "than the model's max_position_embeddings 512: shorten the prompt or lower "
                   "max_new_tokens")
