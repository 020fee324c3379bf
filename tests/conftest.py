"""Shared pytest setup for ptp.

- Imports work from a source checkout: the repo root (``ptp_ext``, ``benchmarks``) and
  ``python/`` (``ptp``) are put on ``sys.path`` (harmless after ``pip install -e .``).
- Markers: ``cuda`` (needs a CUDA GPU: skipped, with the reason, when there is none; tests whose
  parametrize id contains ``cuda`` get the marker too) and ``slow`` (real model or long runs;
  run by default, deselect with ``-m "not slow"``).
- Seeding: every test starts from a seed derived from its node id (stable across runs and
  independent of test order); ``PTP_TEST_SEED=N`` shifts all seeds. The ``seed`` fixture returns
  it and ``generator`` gives a seeded CPU ``torch.Generator``.
"""
from __future__ import annotations

import os
import random
import sys
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (os.path.join(ROOT, "python"), ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: real-model or long tests (deselect: -m 'not slow')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(
            v == "cuda" or (isinstance(v, torch.device) and v.type == "cuda")
            for v in callspec.params.values()
        ):
            item.add_marker(pytest.mark.cuda)
        if not HAS_CUDA and item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


def pytest_report_header(config: pytest.Config) -> str:
    cuda = torch.cuda.get_device_name() if HAS_CUDA else "no GPU"
    return (f"ptp: torch {torch.__version__} (CUDA {torch.version.cuda}), {cuda}, "
            f"{torch.get_num_threads()} threads, PTP_TEST_SEED={os.environ.get('PTP_TEST_SEED', 0)}")


def _seed_for(nodeid: str) -> int:
    return (zlib.crc32(nodeid.encode()) + int(os.environ.get("PTP_TEST_SEED", "0"))) % (2**31)


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch (CPU and CUDA), random and numpy from the test's node id."""
    s = _seed_for(request.node.nodeid)
    torch.manual_seed(s)
    random.seed(s)
    import numpy as np  # an install requirement of ptp

    np.random.seed(s)
    return s


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded like the test."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over "cpu" and, with a GPU, "cuda"."""
    return request.param
