# make run: set up, build the default bundle if none exists, and serve it over gRPC.
# make test: set up and run the test suite. Both work from a clean clone on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUNDLE ?= artifacts/default-bundle
# Training: glibc malloc returns big batch buffers to the OS and refaults them every step; keep
# them. (Servers set their own, which give memory back: see REPLICA_ENV in services/server.py.)
TRAIN_MALLOC := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824

.PHONY: install run test test-unit test-integration test-system test-training test-bundle \
	test-servers test-training-beside lint bundle clean

PROTOS := $(wildcard protos/multimed/v1/*.proto)
STUBS := multimed/v1/multimed_pb2.py

PERF_ANALYZER := $(VENV)/perf_analyzer/bin/perf_analyzer

install: $(VENV)/.installed $(STUBS) $(PERF_ANALYZER)

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

# Triton's perf_analyzer (the protocol's load test): the binary in tritonclient 2.51's wheel, the
# newest built for this glibc, installed apart so the project's own tritonclient stays current.
# It also needs Debian's libb64-0d (root: apt-get install libb64-0d; .ci/run does).
$(PERF_ANALYZER): | $(VENV)/.installed
	$(BIN)/pip install -q --no-deps --target $(VENV)/perf_analyzer \
		tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79

bundle: $(BUNDLE)/manifest.json

$(BUNDLE)/manifest.json: | install
	$(TRAIN_MALLOC) $(BIN)/multimed -v train --out $(BUNDLE)

# Serves on 127.0.0.1:8001 (gRPC) and :8002 (/metrics) until Ctrl-C.
run: install bundle
	$(BIN)/multimed serve --config deploy/serve_config.yaml --bundle $(BUNDLE)

# The suite in tiers, each its own pytest session so that a tier's servers stop with it
# (docs/testing.md says what each covers). The unit tier first, beside the server tiers' bundle
# (pytest keeps one core busy); then the server tiers, with the training tier beside them: they
# leave about a third of the two cores idle, waiting on recoveries, scale-downs and peers. A
# failing step stops `make test`.
PYTEST := $(BIN)/python -m pytest
test: install
	$(MAKE) --no-print-directory -j2 --output-sync=target test-unit test-bundle
	$(MAKE) --no-print-directory -j2 test-servers test-training-beside

test-servers: install test-bundle
	$(MAKE) --no-print-directory test-integration
	$(MAKE) --no-print-directory test-system

# Its output is kept whole: printed when it ends, not mixed into the server tiers'.
test-training-beside: install
	@mkdir -p artifacts
	@echo "training tier running beside the server tiers (artifacts/test-training.log)"
	@$(MAKE) --no-print-directory test-training > artifacts/test-training.log 2>&1; \
		status=$$?; cat artifacts/test-training.log; exit $$status

test-unit: install
	$(PYTEST) tests/unit

test-training: install
	$(TRAIN_MALLOC) $(PYTEST) tests/training

# The server tiers share one small bundle, trained once (under a minute) and again whenever the
# model code changes; a tier run by plain pytest trains its own.
TEST_BUNDLE := artifacts/test-bundle
test-integration test-system: export MULTIMED_TEST_BUNDLE = $(abspath $(TEST_BUNDLE))

test-integration: install test-bundle
	$(PYTEST) tests/integration

test-system: install test-bundle
	$(PYTEST) tests/system

test-bundle: $(TEST_BUNDLE)/manifest.json

$(TEST_BUNDLE)/manifest.json: $(shell find multimed/models -name '*.py') | install
	rm -rf $(TEST_BUNDLE)
	$(TRAIN_MALLOC) $(BIN)/python tests/bundles.py $(TEST_BUNDLE)

lint: install
	$(BIN)/ruff check multimed tests

clean:
	rm -rf $(VENV) artifacts
