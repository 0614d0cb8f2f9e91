# Two entry points for a fresh machine (see README.md):
#   make quickstart   install, build the data and train the quick-start chain (CPU, < 15 min)
#   make test         install, lint and run the tests
#   make gpu-carry    prepare .gpu_carry/ for benchmarks/gpu_chain.sh and gpu_step.sh (a lent GPU)
# Everything installs into .venv; torch comes first, pinned to the CPU wheel that lies on disk,
# so that pip never resolves a multi-GB CUDA build for the bare `torch` requirement.

VENV ?= .venv
BIN := $(VENV)/bin
NAICS_RAW_DIR ?= $(abspath ../shared/naics2022)
export NAICS_RAW_DIR
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test lint quickstart gpu-carry

# The dependencies install at the versions python_env.yaml pins, the ones `mlflow run .` builds
# and the tests check (tests/test_project_env.py): a release on PyPI changes nothing here.
$(VENV)/.installed: pyproject.toml python_env.yaml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	sed -n 's/^ *- \([A-Za-z0-9_.-]*==.*\)$$/\1/p' python_env.yaml > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers, each taking whole test files (module fixtures are built once): most tests wait on
# one single-threaded subprocess at a time, so a 2-core machine runs two of them side by side.
# Files go out in collection order, where tests/conftest.py puts the longest first.
test: lint
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder

quickstart: install
	$(BIN)/naics-embedder data build
	$(BIN)/naics-embedder train-curriculum --chain chain_quickstart

gpu-carry: install
	PYTHON=$(BIN)/python bash benchmarks/prepare_gpu_carry.sh
