# pointsparse: `make demo` (the main job) and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.deps-stamp
BUILD := build/dev
EXT_STAMP := $(BUILD)/.ext-stamp
CORE_SOURCES := $(shell find cpp -name '*.cpp' -o -name '*.h') CMakeLists.txt
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: all venv build test demo bench install clean

all: build

# The virtual environment with the tested torch and everything the build,
# the tests, the demo and the benchmarks use.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# open3d (optional, PLY/PCD) needs libusb on Debian: install it where we can.
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libusb-1.0; then \
	  (apt-get update -qq && apt-get install -y -qq libusb-1.0-0) >/dev/null 2>&1 || echo "libusb-1.0-0 not installed: open3d readers will be skipped"; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q numpy pytest pytest-xdist pybind11 scikit-build-core cmake ninja tqdm matplotlib
	-$(PY) -m pip install -q open3d-cpu laspy scikit-learn 2>/dev/null || echo "optional open3d-cpu/laspy/scikit-learn not installed: PLY/PCD and LAS readers and the digits pruning experiments will be skipped"
	touch $(STAMP)

venv: $(STAMP)

# The extension, built in place (pointsparse/_core*.so) so the source tree
# runs as is; `make install` builds the same module as a wheel.
$(EXT_STAMP): $(STAMP) $(CORE_SOURCES)
	$(VENV)/bin/cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja \
	  -DPython_EXECUTABLE=$(CURDIR)/$(PY) \
	  -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) > /dev/null
	$(VENV)/bin/cmake --build $(BUILD)
	@# Copied beside, then renamed over the old module: a process still running on the
	@# old one (a training run, a test) keeps its file; copying over it in place had
	@# changed the pages it had mapped (SIGBUS).
	for so in $(BUILD)/_core*.so; do cp "$$so" "pointsparse/.$$(basename $$so).new" && \
	  mv -f "pointsparse/.$$(basename $$so).new" "pointsparse/$$(basename $$so)" || exit 1; done
	touch $(EXT_STAMP)

build: $(EXT_STAMP)

# Two pytest workers, a test file each at a time (--dist loadfile: a file's
# fixtures are made once): most of the suite is single-threaded Python
# (tracing, exports, small models), and the 2-core CI machine runs it in
# under 20 minutes so (bench/RESULTS.md stop 62).
test: build
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: build
	$(PY) -m pointsparse demo

# The engine's suites; `pointsparse bench train prune prune_procedures` runs
# the longer training and pruning experiments.
bench: build
	$(PY) -m pointsparse bench kmap conv spmm

install: $(STAMP)
	$(PY) -m pip install --no-build-isolation --no-deps .

clean:
	rm -rf build pointsparse/_core*.so
