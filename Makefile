# Two commands do all setup on a fresh machine:
#   make demo   build a tiny local target and run the main job end to end on CPU
#   make test   run the test suite (what CI runs)
# Both create or refresh .venv. On a machine without CUDA, torch is installed first from
# TORCH_SPEC (the CPU wheel here), so nothing pulls CUDA packages.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for the torch install, e.g. an index that serves CPU wheels.
TORCH_PIP_ARGS ?=
DEMO_OUT ?= demo-out

.PHONY: install demo test test-all test-vllm bench-transport clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA machine: installing torch with its CUDA packages"; \
		$(PY) -m pip install -q "torch>=2.6"; \
	else \
		$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[test,plot]"
	@touch $(STAMP)

demo: $(STAMP)
	DRAFTSTREAM=$(VENV)/bin/draftstream bash examples/demo.sh $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest

bench-transport: $(STAMP)
	$(PY) -m bench.transport

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
