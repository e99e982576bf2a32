# streamcnn — quick start: `make demo`, `make test`.
VENV    := .venv
PY      := $(abspath $(VENV))/bin/python
STAMP   := $(VENV)/.setup-stamp
BUILD   := build/dev
SOURCES := $(shell find op io kernels cmake python tests/abi tests/c tests/cuda -type f 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: all setup build test ctest pytest demo bench abi-check clean sanitize fuzz valgrind

all: build

setup: $(STAMP)

$(STAMP): requirements-dev.txt .ci/setup.sh
	bash .ci/setup.sh
	touch $@

# The C library + C unit tests (build tree), then the Python package
# installed into .venv with the library inside (scikit-build-core).
build: $(VENV)/.build-stamp

$(VENV)/.build-stamp: $(STAMP) $(SOURCES)
	cmake -S . -B $(BUILD) -G Ninja -DSTREAMCNN_TESTS=ON -DPython_EXECUTABLE=$(PY)
	cmake --build $(BUILD)
	$(PY) -m pip install -q --no-build-isolation --no-deps .
	touch $@

ctest: build
	ctest --test-dir $(BUILD) --output-on-failure

pytest: build
	$(PY) -m pytest -q --durations=25 tests/python

test: ctest pytest

# synth + train + evaluate + export on the CPU (examples/demo.sh, into build/demo)
demo: build
	STREAMCNN=$(abspath $(VENV))/bin/streamcnn bash examples/demo.sh build/demo

bench: build
	$(PY) bench/cpu_resnet18.py

# Same binary under torch 2.10 and 2.11 (downloads torch 2.10 once).
abi-check: setup
	bash .ci/abi_check.sh

# --- hardening (issue 17): sanitizers, fuzzing, valgrind -----------------------
# sanitize: ASan + UBSan build (build/asan), ctest, then a focused pytest
#   subset in a Python with the sanitizer runtime preloaded; the settings
#   (LD_PRELOAD, ASAN_OPTIONS=detect_leaks=0, ...) are explained in
#   .ci/sanitize.sh. SANITIZE_TESTS="tests/python/x.py" overrides the subset.
# fuzz: the libFuzzer targets of tests/fuzz (clang), FUZZ_SECONDS each.
# valgrind: every C test (ctest) under valgrind memcheck, leaks included.
FUZZ_SECONDS ?= 60
SANITIZE_TESTS ?=

sanitize: setup
	bash .ci/sanitize.sh $(PY) $(SANITIZE_TESTS)

fuzz: setup
	bash .ci/fuzz.sh $(PY) $(FUZZ_SECONDS)

valgrind: setup
	cmake -S . -B $(BUILD) -G Ninja -DSTREAMCNN_TESTS=ON -DPython_EXECUTABLE=$(PY)
	cmake --build $(BUILD)
	bash .ci/valgrind.sh $(BUILD)

clean:
	rm -rf build $(VENV)/.build-stamp
