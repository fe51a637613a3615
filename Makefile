# make run: set up, build the default bundle if none exists, and serve it over gRPC.
# make test: set up and run the test suite. Both work from a clean clone on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUNDLE ?= artifacts/default-bundle
# glibc malloc returns big batch buffers to the OS and refaults them every step; keep them.
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824

.PHONY: install run test lint bundle clean

PROTOS := $(wildcard protos/multimed/v1/*.proto)
STUBS := multimed/v1/multimed_pb2.py

install: $(VENV)/.installed $(STUBS)

# Stubs are generated from protos/ (the source of truth), never edited or committed.
$(STUBS): $(PROTOS) $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# torch first, pinned to the CPU build on disk, so the `torch>=` range pulls no CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip check
	touch $@

bundle: $(BUNDLE)/manifest.json

$(BUNDLE)/manifest.json: | install
	$(BIN)/multimed -v train --out $(BUNDLE)

# Serves on 127.0.0.1:8001 (gRPC) and :8002 (/metrics) until Ctrl-C.
run: install bundle
	$(BIN)/multimed serve --config deploy/serve_config.yaml --bundle $(BUNDLE)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check multimed tests

clean:
	rm -rf $(VENV) artifacts
