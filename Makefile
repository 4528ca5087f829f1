# llama-tuner: `make tune` installs and tunes the demo model; `make test` installs and runs the tests.
# llama-cpp-python is built with CUDA (CMAKE_ARGS=-DGGML_CUDA=on) where `nvidia-smi -L` lists a GPU and nvcc is
# on PATH to compile the kernels, else for the CPU; CUDA=1 or CUDA=0 overrides the detection.
# `make llama-server` builds llama-server and llama-bench, the same way, from the llama.cpp that llama-cpp-python
# vendors (its sdist), into .cache/llama.cpp/<commit>/; `make test` builds them first.
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

# llama-server from the sdist of the pinned llama-cpp-python: its vendor/llama.cpp is llama.cpp's source at the
# commit the bindings are built from, and the sdist carries that submodule's git HEAD (the cache's key; without one,
# the llama-cpp-python version is). .cache/llama.cpp/llama-server points to the last build.
CACHE         := .cache
SDIST_DIR     := $(CACHE)/llama-cpp-python-$(LLAMA_CPP_VERSION)
SDIST_SRC     := $(SDIST_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)
SDIST_STAMP   := $(SDIST_DIR)/.unpacked
LLAMA_CPP_SRC := $(SDIST_SRC)/vendor/llama.cpp
LLAMA_CPP_HEAD = $(SDIST_SRC)/.git/modules/vendor/llama.cpp/HEAD
BACKEND       := $(if $(filter 1,$(CUDA)),cuda,cpu)
# No web UI (it would be downloaded from Hugging Face at build time), no libcurl, static: one self-contained binary.
LLAMA_CMAKE_FLAGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
                     -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF \
                     -DLLAMA_BUILD_UI=OFF $(if $(filter 1,$(CUDA)),-DGGML_CUDA=on)

.PHONY: install llama-server llama-server-build test test-fast tune bench-fidelity clean clean-cache

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

$(SDIST_STAMP): | $(STAMP)
	rm -rf $(SDIST_DIR) && mkdir -p $(SDIST_DIR)
	$(BIN)/pip download --quiet --no-deps --no-binary :all: '$(LLAMA_CPP_PYTHON)' -d $(SDIST_DIR)
	tar -xzf $(SDIST_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(SDIST_DIR)
	rm $(SDIST_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
	test -f $(LLAMA_CPP_SRC)/tools/server/CMakeLists.txt
	touch $@

# The build directory's name needs the commit, known once the sdist is unpacked: a second make reads it.
llama-server: $(SDIST_STAMP)
	@$(MAKE) --no-print-directory llama-server-build \
	    LLAMA_CPP_KEY="$$(cut -c1-7 $(LLAMA_CPP_HEAD) 2>/dev/null || echo llama-cpp-python-$(LLAMA_CPP_VERSION))"

ifdef LLAMA_CPP_KEY
LLAMA_BUILD := $(CACHE)/llama.cpp/$(LLAMA_CPP_KEY)/$(BACKEND)
llama-server-build: $(LLAMA_BUILD)/.built
	ln -sfn $(LLAMA_CPP_KEY)/$(BACKEND)/bin/llama-server $(CACHE)/llama.cpp/llama-server
	@echo "llama-server: $(LLAMA_BUILD)/bin/llama-server ($(BUILD), llama.cpp $(LLAMA_CPP_KEY))"

$(LLAMA_BUILD)/.built: $(SDIST_STAMP)
	@echo "building llama-server and llama-bench ($(BUILD), llama.cpp $(LLAMA_CPP_KEY)): minutes"
	@mkdir -p $(LLAMA_BUILD) && start=$$(date +%s); \
	cmake -S $(LLAMA_CPP_SRC) -B $(LLAMA_BUILD) $(LLAMA_CMAKE_FLAGS) >$(LLAMA_BUILD)/build.log 2>&1 && \
	cmake --build $(LLAMA_BUILD) -j2 --target llama-server llama-bench >>$(LLAMA_BUILD)/build.log 2>&1 \
	    || { tail -n 40 $(LLAMA_BUILD)/build.log; exit 1; }; \
	echo "built in $$(( $$(date +%s) - start )) s (log: $(LLAMA_BUILD)/build.log)"
	touch $@
endif

# The layer contracts (import-linter) and ruff first: seconds, and they fail before the slow tests.
test: install llama-server
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

# The llama-cpp-python sdist and llama.cpp builds (a rebuild takes minutes).
clean-cache:
	rm -rf $(CACHE)
