"""The CMake build (CMakeLists.txt) produces a libptp_ext.so that plain torch can load.

Builds (incrementally) into build/cmake, the directory `make cmake` and .ci/run use, so CI builds
it once; then, in a fresh Python process that never imports ptp_ext (both would register the
ptp_ext namespace), loads it with torch.ops.load_library and runs an op against the reference.
Marked slow (a first build takes about a minute): CI runs it, `-m "not slow"` leaves it out, and
so does benchmarks/gpu_check.sh (GPU machines need not have cmake).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("PTP_CMAKE_BUILD_DIR", os.path.join(ROOT, "build", "cmake"))


def _tool(name: str) -> str:
    # Prefer the tools of the running venv (make setup installs cmake and ninja there).
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.path.exists(here) else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install it (pip install {name}) to build with CMake")
    return found


@pytest.fixture(scope="module")
def cmake_library() -> str:
    cmake = _tool("cmake")
    env = dict(os.environ, PATH=os.path.dirname(_tool("ninja")) + os.pathsep + os.environ["PATH"])
    if not os.path.exists(os.path.join(BUILD, "CMakeCache.txt")):
        subprocess.run([cmake, "-S", ROOT, "-B", BUILD, "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release", "-DPTP_WITH_CUDA=OFF",
                        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                       check=True, env=env, capture_output=True, text=True)
    r = subprocess.run([cmake, "--build", BUILD, "-j", os.environ.get("MAX_JOBS", "2")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"cmake --build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    lib = os.path.join(BUILD, "libptp_ext.so")
    assert os.path.exists(lib), f"{lib} was not produced"
    return lib


_CHILD = textwrap.dedent(r"""
    import importlib.util, json, sys
    import torch

    torch.ops.load_library(sys.argv[1])
    assert "ptp_ext" not in sys.modules, "the CMake library must load without ptp_ext"
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ptp_ext::"))
    # The reference module alone (importing the ptp_ext package would load _C as well).
    spec = importlib.util.spec_from_file_location("ptp_reference", sys.argv[2])
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, S, D = 2, 3, 4, 2, 40, 16
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    lens = torch.tensor([5, 30], dtype=torch.int32)
    try:
        out, lse = torch.ops.ptp_ext.tree_attention(q, k, v, lens, None, D ** -0.5)
    except RuntimeError as e:
        if "not implemented" in str(e):
            print(json.dumps({"ops": ops, "ran": False, "why": str(e).splitlines()[0]}))
            sys.exit(0)
        raise
    ref_out, ref_lse = ref.tree_attention_ref(q, k, v, lens, None, D ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    print(json.dumps({"ops": ops, "ran": True}))
""")


@pytest.mark.slow
def test_cmake_library_loads_and_runs(cmake_library: str):
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, cmake_library, os.path.join(ROOT, "ptp_ext", "reference.py")],
        capture_output=True, text=True, timeout=300, cwd=BUILD,
    )
    assert r.returncode == 0, f"child failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    import json

    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"ptp_ext::tree_attention", "ptp_ext::verify_tree",
            "ptp_ext::sampler_mlp"} <= set(result["ops"])
    if not result["ran"]:
        pytest.skip(f"library loads and registers the ops; CPU tree_attention: {result['why']}")
