# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs torch + fastbald (building its C++ kernels), runs the demo
#   make test   the same set-up, then the whole test suite
# Both are idempotent: a second run only rebuilds what changed (ninja) and skips installed deps.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  := torch==2.14.1 torchvision==0.29.1
DEPS_STAMP := $(VENV)/.deps-stamp
# Extra build flags (e.g. FASTBALD_CPU_ONLY=1) pass through the environment.
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup build demo test test-fast bench lint cuda-check emu-check clean

setup: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q setuptools wheel ninja pybind11 numpy tqdm pytest pytest-benchmark hypothesis ruff matplotlib
	$(PIP) install -q --no-build-isolation --no-deps -e .
	# Peers for the comparison benchmarks and the integration tests (baal, batchbald_redux): with
	# --no-deps so they cannot replace torch / numpy; then only the small deps they import.
	$(PIP) install -q --no-deps baal==2.1.0 batchbald-redux==2.0.5
	$(PIP) install -q scipy==1.17.1 scikit-learn==1.9.1 "structlog>=22,<23" "torchmetrics>=1.7.3,<2" "toma<2" psutil
	touch $@

# Incremental (ninja) build of the extension into the source tree.
build: $(DEPS_STAMP)
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m fastbald.demo

test: build
	FASTBALD_REQUIRE_NATIVE=1 FASTBALD_REQUIRE_PEERS=1 $(PY) -m pytest -q

test-fast: build
	FASTBALD_REQUIRE_NATIVE=1 FASTBALD_REQUIRE_PEERS=1 $(PY) -m pytest -q -m "not slow"

bench: build
	$(PY) benchmarks/bench_scores.py
	$(PY) -m fastbald bench

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .

cuda-check: $(DEPS_STAMP)
	bash scripts/check_cuda_build.sh

# The CUDA kernel bodies run in the CPU emulator (csrc/cuda/emu): the case table at blocks 64 and
# 256, the seeded fuzz, and both under ASan/UBSan. `make test` runs them too; this is the short loop.
emu-check: $(DEPS_STAMP)
	$(PY) -m pytest -q tests/test_cuda.py -k "emulat or fuzz or asan or padded_flat or invalid_rows"

clean:
	rm -rf build fastbald/*.so
