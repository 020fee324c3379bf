"""Build of ptp (the decoder package) and ptp_ext (the kernel package with its extension ptp_ext._C).

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

``--no-build-isolation`` matters: an isolated build environment would download an unpinned (CUDA,
multi-GB) torch and compile against headers that do not match the torch you run.

Environment:
    PTP_WITH_CUDA=auto|0|1   auto (default): build the CUDA sources when torch is a CUDA build and
                             a CUDA toolkit (CUDA_HOME / nvcc) is found; no GPU is needed.
                             (PTP_CUDA is accepted as an alias.)
    TORCH_CUDA_ARCH_LIST     default "8.0;9.0a" (A100 and H100/H200 with wgmma).
    PTP_DEBUG=1              -O0 -g -lineinfo.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# What `import ptp` and the `ptp` command import (tests/test_api.py checks this list against the
# imports under python/ptp). torch is a floor, never a pin: pip keeps the torch you built against.
# jinja2: transformers' chat templates (not one of its own requirements); gguf: GGUF files
# (transformers' loader and ptp.decode.quant). The kernel package ptp_ext needs torch only.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "numpy",
    "transformers>=4.56",  # cache layers (StaticLayer), set_attn_implementation, dtype=
    "safetensors",
    "gguf>=0.10",
    "jinja2>=3.1",
    "tqdm",
]


def _want_cuda() -> bool:
    flag = os.environ.get("PTP_WITH_CUDA", os.environ.get("PTP_CUDA", "auto")).lower()
    if flag in ("0", "false", "no", "off"):
        return False
    import torch
    from torch.utils import cpp_extension

    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on"):
        if not available:
            sys.exit("PTP_WITH_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found "
                     f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})")
        return True
    return available


def _extensions():
    from torch.utils import cpp_extension

    debug = os.environ.get("PTP_DEBUG", "0") == "1"
    with_cuda = _want_cuda()
    sources = ["csrc/registration.cpp", "csrc/module.cpp"]
    sources += sorted(glob.glob("csrc/*/*_cpu.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unused-function"]
    nvcc = (["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]) + [
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/*/*_cuda.cu"))
        define_macros.append(("PTP_WITH_CUDA", None))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        # CUDA 13 wheels keep some runtime headers (used by ATen/cuda) beside torch.
        import torch

        nv = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13",
                          "include")
        if os.path.isdir(nv):
            include_dirs.append(nv)
        ext_cls = cpp_extension.CUDAExtension
        args = {"cxx": cxx, "nvcc": nvcc}
    else:
        ext_cls = cpp_extension.CppExtension
        args = {"cxx": cxx}
    print(f"ptp_ext: building {'CPU + CUDA' if with_cuda else 'CPU only'} extension", flush=True)
    return [
        ext_cls(
            name="ptp_ext._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=args,
            extra_link_args=["-fopenmp"],
        )
    ], cpp_extension.BuildExtension.with_options(use_ninja=True)


if __name__ == "__main__" or "setuptools" in sys.modules:
    ext_modules, build_ext = _extensions()
    setup(
        name="ptp",
        version="0.1.0",
        description="Parallel token prediction and exact speculative decoding for HF models",
        python_requires=">=3.10",
        packages=find_packages(include=["ptp_ext", "ptp_ext.*"])
        + find_packages("python", include=["ptp", "ptp.*"]),
        package_dir={"ptp": "python/ptp", "ptp_ext": "ptp_ext"},
        package_data={"ptp": ["drafters/*.json", "drafters/*.safetensors", "drafters/weights/*/*.json",
                              "drafters/weights/*/*.safetensors", "drafters/weights/README.md"]},
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext},
        install_requires=INSTALL_REQUIRES,
        extras_require={"test": ["pytest"]},
        entry_points={"console_scripts": ["ptp=ptp.cli:main"]},
    )
