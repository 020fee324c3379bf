"""The documentation holds together: relative links resolve, the README stays short, every result
file is reachable from the results page, and no committed file names a machine-local path."""
from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 200
# Paths of the development machines, not of a checkout: data and scratch directories must be
# written as placeholders (RUNS/..., DATA/...) in committed files.
LOCAL_PATHS = ("/" + "work/", ".." + "/shared")  # spelled in pieces: this file is checked too
THIS_FILE = "tests/test_docs.py"  # names the paths above to look for them

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _doc_files() -> list[str]:
    files = ["README.md", "csrc/README.md", "python/ptp/drafters/weights/README.md"]
    files += sorted(glob.glob("docs/*.md", root_dir=ROOT))
    files += sorted(glob.glob("benchmarks/results/**/*.md", root_dir=ROOT, recursive=True))
    return files


def relative_links(text: str) -> list[str]:
    """The targets of the markdown links in ``text`` that point into the repository (no URL, no
    pure #anchor), outside fenced code blocks, without their #anchor."""
    out = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_relative_links_parser():
    text = ("[a](docs/x.md) [b](https://x.org/y.md) [c](#top) [d](../e.md#sec) "
            '[f](g.md "title")\n```\n[h](in/code.md)\n```\n')
    assert relative_links(text) == ["docs/x.md", "../e.md", "g.md"]


@pytest.mark.parametrize("doc", _doc_files())
def test_relative_links_resolve(doc):
    path = os.path.join(ROOT, doc)
    with open(path, encoding="utf-8") as f:
        links = relative_links(f.read())
    broken = [t for t in links
              if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(path), t)))]
    assert broken == [], f"{doc}: links to missing files: {broken}"


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md must stay within {README_MAX_LINES} lines, got {len(lines)}: move detail to docs/")


def test_every_result_file_is_on_the_results_page():
    with open(os.path.join(ROOT, "docs/results.md"), encoding="utf-8") as f:
        linked = {os.path.normpath(os.path.join(ROOT, "docs", t)) for t in relative_links(f.read())}
    results = glob.glob(os.path.join(ROOT, "benchmarks/results/**/20*.md"), recursive=True)
    assert results, "no result files found under benchmarks/results/"
    missing = sorted(os.path.relpath(p, ROOT) for p in results if os.path.normpath(p) not in linked)
    assert missing == [], f"result files not linked from docs/results.md: {missing}"


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.decode().split("\0") if p]


def test_no_committed_file_names_a_local_path():
    offenders = []
    for rel in _tracked_files():
        path = os.path.join(ROOT, rel)
        if rel == THIS_FILE or rel.endswith(".safetensors") or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data[:8192]:  # binary
            continue
        text = data.decode("utf-8", errors="replace")
        for pattern in LOCAL_PATHS:
            for lineno, line in enumerate(text.splitlines(), 1):
                if pattern in line:
                    offenders.append(f"{rel}:{lineno}: {pattern}")
    assert offenders == [], "machine-local paths in committed files (use RUNS/..., DATA/...):\n" + \
        "\n".join(offenders)
