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

.PHONY: setup build demo test test-fast bench lint cuda-check clean

setup: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q setuptools wheel ninja pybind11 numpy tqdm pytest pytest-benchmark hypothesis ruff matplotlib
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

# Incremental (ninja) build of the extension into the source tree.
build: $(DEPS_STAMP)
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m fastbald.demo

test: build
	FASTBALD_REQUIRE_NATIVE=1 $(PY) -m pytest -q

test-fast: build
	FASTBALD_REQUIRE_NATIVE=1 $(PY) -m pytest -q -m "not slow"

bench: build
	$(PY) benchmarks/bench_scores.py

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .

cuda-check: $(DEPS_STAMP)
	bash scripts/check_cuda_build.sh

clean:
	rm -rf build fastbald/*.so
