# llama-tuner: `make tune` installs and tunes the demo model; `make test` installs and runs the tests.
# llama-cpp-python is built with CUDA (CMAKE_ARGS=-DGGML_CUDA=on) where `nvidia-smi -L` lists a GPU and nvcc is
# on PATH to compile the kernels, else for the CPU; CUDA=1 or CUDA=0 overrides the detection.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_PYTHON  := llama-cpp-python==$(LLAMA_CPP_VERSION)
# "(GPU 0: ...)": the leading parenthesis of the case pattern keeps make's parentheses balanced.
GPU_FOUND  := $(shell case "$$(nvidia-smi -L 2>/dev/null)" in (*"GPU "[0-9]*) echo 1;; esac)
NVCC_FOUND := $(shell command -v nvcc >/dev/null 2>&1 && echo 1)
ifeq ($(origin CUDA),undefined)
ifeq ($(GPU_FOUND)$(NVCC_FOUND),11)
CUDA  := 1
BUILD := CUDA build (NVIDIA GPU and nvcc found)
else ifeq ($(GPU_FOUND),1)
CUDA  := 0
BUILD := CPU build (NVIDIA GPU found but no nvcc on PATH: install the CUDA toolkit for a CUDA build)
else
CUDA  := 0
BUILD := CPU build (no NVIDIA GPU found)
endif
else ifeq ($(CUDA),1)
BUILD := CUDA build (CUDA=1)
else ifeq ($(CUDA),0)
BUILD := CPU build (CUDA=0)
else
$(error CUDA=$(CUDA): use CUDA=1 (a CUDA build) or CUDA=0 (a CPU build), or leave it out to detect)
endif
STAMP  := $(VENV)/.installed-cuda$(CUDA)

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
	@echo "llama-cpp-python $(LLAMA_CPP_VERSION): $(BUILD)"

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
