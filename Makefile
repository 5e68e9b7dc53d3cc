# Everyday commands. The README's two quickstart commands are the source of truth; these wrap them.
PY ?= python
JOBS ?= 2

.PHONY: build build-cpu test bench bench-quick info cmake lint format

build:            ## editable build, CUDA sources included when nvcc is found
	MAX_JOBS=$(JOBS) $(PY) -m pip install --no-build-isolation -e ".[test]"

build-cpu:        ## CPU-only editable build
	BIGMODEL_CUDA=0 MAX_JOBS=$(JOBS) $(PY) -m pip install --no-build-isolation -e ".[test]"

test:             ## the test suite
	$(PY) -m pytest tests -q

bench:            ## full benchmark suite vs native PyTorch (both allocator baselines)
	$(PY) -m bigmodel bench --ops lstm,classifier

bench-quick:
	$(PY) -m bigmodel bench --quick

info:
	$(PY) -m bigmodel info

cmake:            ## libtorch build + ctest
	cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build build-cmake -j $(JOBS)
	ctest --test-dir build-cmake --output-on-failure

lint:
	ruff check bigmodel tests benchmarks
	ruff format --check bigmodel tests benchmarks

format:
	ruff format bigmodel tests benchmarks
