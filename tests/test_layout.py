"""The layering of the package: ``ptp.decode`` (the decoder and the Draft contract) never imports
``ptp.drafters`` or ``ptp.train``; inference (``ptp.decode``, ``ptp.drafters``, ``ptp.models``)
never imports ``ptp.train``. Checked on the source (every import statement, module level or
inside functions) and on a real inference run's ``sys.modules``."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "python", "ptp")


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    rel = os.path.relpath(path, os.path.join(ROOT, "python"))[:-3].split(os.sep)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _files(sub: str) -> list[str]:
    top = os.path.join(PKG, sub)
    return [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs if f.endswith(".py")]


@pytest.mark.parametrize("sub, forbidden", [
    ("decode", ("ptp.drafters", "ptp.train")),
    ("drafters", ("ptp.train",)),
])
def test_layers_import_only_downwards(sub, forbidden):
    bad = []
    for path in _files(sub):
        for mod in _imports(path):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                bad.append(f"{os.path.relpath(path, ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)
    assert all(not any(m.startswith("ptp.train") for m in _imports(p)) for p in [os.path.join(PKG, "models.py")])


def test_inference_does_not_load_training_modules():
    """Decoding with a drafter through the public API loads no ptp.train; the CLI's parser loads
    only the ``ptp train`` subcommand's argument definitions (ptp.train.cli), no trainer."""
    code = (
        "import sys, ptp\n"
        "from ptp.models import tiny_model\n"
        "m = tiny_model('llama', vocab_size=97)\n"
        "d = ptp.Decoder(m, drafter=ptp.make_drafter('lookup', m))\n"
        "d.generate([1, 2, 3], ptp.GenerationConfig(max_new_tokens=4, eos_token_ids=()))\n"
        "api = sorted(k for k in sys.modules if k.startswith('ptp.train'))\n"
        "import ptp.cli\n"
        "ptp.cli.build_parser()\n"
        "cli = sorted(k for k in sys.modules if k.startswith('ptp.train'))\n"
        "print(api, cli)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout.strip().splitlines()[-1]
    assert out == "[] ['ptp.train', 'ptp.train.cli']", out
