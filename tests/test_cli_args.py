"""``--device`` / ``--dtype`` of ``ptp generate`` and ``benchmarks/e2e.py``: parsed into what
``load_target`` takes, with a clear error (no traceback) for what this machine cannot do."""
from __future__ import annotations

import os
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
