# `make demo` and `make test` create .venv on first use. torch==2.13.0 is installed first so that
# nothing later pulls another torch; DeepSpeed builds against it without build isolation.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.15"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeline run recipes/demo.yaml

test: $(STAMP)
	$(BIN)/pytest -q --durations=30

# In-process tests only: no `pipeline run` subprocesses (those are marked e2e).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/pretrain_overhead.py
	$(BIN)/python bench/tokenize_throughput.py
	$(BIN)/python bench/zero_memory.py

clean:
	rm -rf runs .pytest_cache
