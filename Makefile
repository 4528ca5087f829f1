# llama-tuner: `make tune` installs and tunes the demo model; `make test` installs and runs the tests.
# CUDA=1 builds llama-cpp-python with CUDA (CMAKE_ARGS=-DGGML_CUDA=on) instead of the CPU build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CUDA   ?= 0
STAMP  := $(VENV)/.installed-cuda$(CUDA)
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36

.PHONY: install test test-fast tune bench-fidelity clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,demo]' '$(LLAMA_CPP_PYTHON)'
ifeq ($(CUDA),1)
	CMAKE_ARGS="-DGGML_CUDA=on" $(BIN)/pip install --quiet --force-reinstall --no-deps --no-cache-dir '$(LLAMA_CPP_PYTHON)'
endif
	rm -f $(VENV)/.installed-cuda*
	touch $@

install: $(STAMP)

# The layer contracts (import-linter) and ruff first: seconds, and they fail before the slow tests.
test: install
	$(BIN)/lint-imports
	$(BIN)/ruff check llama_tuner tests bench
	$(BIN)/python -m pytest -q

# The fast lane: no llama.cpp, no GPU (under a minute on 2 cores).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

# A short study (20 configurations) of the demo model; run again, it resumes.
tune: install
	$(BIN)/llama-tuner tune "$$($(BIN)/llama-tuner demo)" --trials 20

bench-fidelity: install
	$(BIN)/python bench/fidelity.py

clean:
	rm -rf $(VENV) build *.egg-info
