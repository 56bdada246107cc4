# Two commands do all setup on a fresh machine:
#   make demo   build a tiny local target and run the main job end to end on CPU
#   make test   lint, then the whole test suite (what CI runs)
# Inner loop: make test-fast (the non-slow lane, about a minute) and make format.
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
# make test-vllm: vLLM gets a venv of its own (it pins a CUDA torch and an older transformers).
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_SPEC  ?= vllm==0.33.0
# Requirement floors of the vLLM wheel to drop: vLLM 0.33.0 asks for a certifi newer than the
# registry serves (see tests/vllm/wheel_requirements.py).
VLLM_RELAX ?= certifi
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install demo test test-fast lint format test-vllm bench-transport clean

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

test: lint
	$(PY) -m pytest

# Everything but the multi-process `slow` tests: the inner loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow and not vllm and not gpu'

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# vLLM's requirement list (floors in VLLM_RELAX dropped), then the wheel with --no-deps, then
# draftstream beside it (--no-deps: vLLM brings torch and transformers) and the test tools.
$(VLLM_STAMP): pyproject.toml tests/vllm/wheel_requirements.py
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@ls $(VLLM_VENV)/wheelhouse/vllm-*.whl >/dev/null 2>&1 || \
		$(VLLM_PY) -m pip download -q --no-deps --only-binary=:all: -d $(VLLM_VENV)/wheelhouse "$(VLLM_SPEC)"
	$(VLLM_PY) tests/vllm/wheel_requirements.py $(VLLM_VENV)/wheelhouse/vllm-*.whl \
		$(addprefix --relax ,$(VLLM_RELAX)) > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q --no-deps $(VLLM_VENV)/wheelhouse/vllm-*.whl
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q "pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6.100" \
		"msgpack>=1.0" "pyzmq>=26" "safetensors>=0.4" "datasets>=3.0" "tqdm>=4.66"
	@touch $(VLLM_STAMP)

# -m vllm overrides the default `-m 'not vllm and not gpu'` of pyproject's addopts. No GPU needed:
# engine configs build with VLLM_TARGET_DEVICE=cpu, and CUDA-only paths fall back to CPU copies.
test-vllm: $(VLLM_STAMP)
	VLLM_TARGET_DEVICE=cpu $(VLLM_PY) -m pytest -m vllm tests/vllm

bench-transport: $(STAMP)
	$(PY) -m bench.transport

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
