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
	$(PY) -m pip install -q numpy pytest pytest-xdist pybind11 scikit-build-core cmake ninja tqdm matplotlib scikit-learn
	-$(PY) -m pip install -q open3d-cpu laspy 2>/dev/null || echo "optional open3d-cpu/laspy not installed: PLY/PCD and LAS readers will be skipped"
	touch $(STAMP)

venv: $(STAMP)

# The extension, built in place (pointsparse/_core*.so) so the source tree
# runs as is. It is built as `pip install .` builds it: a wheel, through
# scikit-build-core into its build-dir (build/{wheel_tag}, incremental), whose
# module is then taken out of the wheel. So the module the tests run is the
# one a wheel carries, and the wheel test (tests/test_build.py) finds its
# objects built: it packages and imports, without compiling the core again
# (a second full compile had cost CI 2 minutes on 2 cores). `make install`
# installs the same wheel.
define TAKE_CORE
import os, pathlib, sys, zipfile
wheels = sorted(pathlib.Path(sys.argv[1]).glob("pointsparse-*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one pointsparse wheel in {sys.argv[1]}; got {[w.name for w in wheels]}")
with zipfile.ZipFile(wheels[0]) as zf:
    cores = [n for n in zf.namelist() if n.startswith("pointsparse/_core") and n.endswith(".so")]
    if len(cores) != 1:
        sys.exit(f"expected one pointsparse/_core*.so in {wheels[0].name}; got {cores}")
    name = pathlib.Path(cores[0]).name
    # Written beside, then renamed over the old module: a process still running
    # on the old one (a training run, a test) keeps its file; copying over it in
    # place had changed the pages it had mapped (SIGBUS).
    tmp = pathlib.Path("pointsparse") / f".{name}.new"
    tmp.write_bytes(zf.read(cores[0]))
    os.chmod(tmp, 0o755)
    os.replace(tmp, pathlib.Path("pointsparse") / name)
endef
export TAKE_CORE

$(EXT_STAMP): $(STAMP) $(CORE_SOURCES) pyproject.toml
	rm -rf $(BUILD)/wheel
	$(PY) -m pip wheel --no-build-isolation --no-deps --disable-pip-version-check -q -w $(BUILD)/wheel .
	$(PY) -c "$$TAKE_CORE" $(BUILD)/wheel
	touch $(EXT_STAMP)

build: $(EXT_STAMP)

# Two pytest workers, a test file each at a time (--dist loadfile: a file's
# fixtures are made once): most of the suite is single-threaded Python
# (tracing, exports, small models), and the 2-core CI machine runs it in
# under 20 minutes so (bench/RESULTS.md stop 62). Each worker runs its share
# of the cores' threads (tests/conftest.py: one each here; stop 73).
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
