"""The build: one private ``pointsparse._core`` (OpenMP, release, no libtorch,
portable flags) that a wheel carries next to the Python files; the core takes
numpy buffers, releases the GIL and follows the configured thread count."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import pointsparse
from pointsparse import _ext

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict:
    """The environment without the source checkout on PYTHONPATH."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow
def test_wheel_holds_core_and_python_files_and_imports(tmp_path):
    out = tmp_path / "wheelhouse"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--disable-pip-version-check",
         "-q", "-w", str(out), str(ROOT)],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("pointsparse-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
        cores = [n for n in names if re.fullmatch(r"pointsparse/_core\.[^/]*\.so", n)]
        assert len(cores) == 1, f"the wheel must hold exactly one pointsparse/_core*.so; got {cores}"
        assert [n for n in names if n.endswith(".so")] == cores
        sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pointsparse").rglob("*.py*")
                         if p.suffix in (".py", ".pyi"))
        missing = [s for s in sources if s not in names]
        assert not missing, f"python files missing from the wheel: {missing}"
        assert any(n.endswith(".dist-info/entry_points.txt") for n in names)
        label_maps = sorted(f"pointsparse/label_maps/{p.name}" for p in (ROOT / "datasets").glob("*.json"))
        assert label_maps and all(m in names for m in label_maps), "the wheel must carry datasets/*.json"
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        requires = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)", metadata, re.M)
        for dep in ("torch", "numpy", "tqdm", "matplotlib"):  # what `pip install .` must bring for the CLI
            assert dep in requires, f"the wheel must require {dep}; it requires {requires}"
        core_bytes = zf.read(cores[0])
        target = tmp_path / "site"
        zf.extractall(target)
    # No libtorch: the core links against neither libtorch nor libc10.
    for lib in (b"libtorch", b"libc10"):
        assert lib not in core_bytes, f"the core must not link {lib.decode()}"
    assert b"libgomp" in core_bytes or b"libomp" in core_bytes, "the core must link OpenMP"
    code = (
        "import sys, pathlib, torch, pointsparse\n"
        "from pointsparse import _core\n"
        f"root = pathlib.Path({str(target)!r})\n"
        "assert pathlib.Path(pointsparse.__file__).parent == root / 'pointsparse', pointsparse.__file__\n"
        "assert pathlib.Path(_core.__file__).parent == root / 'pointsparse', _core.__file__\n"
        "x, inv = pointsparse.voxelize(torch.rand(100, 3), voxel_size=0.25)\n"
        "assert inv.shape == (100,) and len(x) > 0\n"
        "from pointsparse.data.readers import load_label_map\n"
        "assert len(load_label_map('ign-lidarhd').classes) > 1\n"
        "print('imported from', pointsparse.__file__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**_clean_env(), "PYTHONPATH": str(target)}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(target) in run.stdout
    # The installed CLI trains one epoch, even where the optional niceties
    # (progress bars, figures) cannot be imported.
    blocked = ("import sys, runpy\n"
               "for name in ('tqdm', 'matplotlib'):\n    sys.modules[name] = None\n"
               "sys.argv = ['pointsparse'] + sys.argv[1:]\n"
               "runpy.run_module('pointsparse', run_name='__main__')\n")
    tiny = ["train", "--data", "generated", "--scenes", "2", "--val-scenes", "1", "--beams", "16", "--azimuth-steps",
            "128", "--max-range", "12", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--epochs", "1",
            "--out", str(tmp_path / "run")]
    run = subprocess.run([sys.executable, "-c", blocked, *tiny], cwd=tmp_path, capture_output=True, text=True,
                         env={**_clean_env(), "PYTHONPATH": str(target)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mIoU" in run.stdout and "no PNG figures" in run.stderr
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not list((tmp_path / "run").glob("*.png"))
    # The flags the wheel was compiled with: release, OpenMP, portable.
    builds = sorted((ROOT / "build").glob("*/build.ninja"), key=lambda p: p.stat().st_mtime)
    builds = [b for b in builds if b.parent.name != "dev"]
    assert builds, "scikit-build-core's build-dir (build/{wheel_tag}) holds no Ninja build"
    ninja = builds[-1].read_text()
    cache = (builds[-1].parent / "CMakeCache.txt").read_text()
    assert "CMAKE_BUILD_TYPE:STRING=Release" in cache
    assert "POINTSPARSE_NATIVE:BOOL=OFF" in cache
    assert "-O3" in ninja and "-fopenmp" in ninja
    assert "-march=native" not in ninja


def test_a_checkout_without_its_core_names_the_installed_package(tmp_path):
    """``python -m pointsparse`` from a source checkout's root after ``pip
    install .`` imports the checkout's package (first on the path), which has
    no core: the error said "run make build, or pip install ." to a user who
    had. It now names the checkout, the build there, and the installed
    package (here the repository's own, built, standing in for one in
    site-packages) that runs from other folders."""
    import shutil

    checkout = tmp_path / "src"
    shutil.copytree(ROOT / "pointsparse", checkout / "pointsparse", ignore=shutil.ignore_patterns("_core*", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{ROOT}"}

    def message() -> str:
        done = subprocess.run([sys.executable, "-c", "import pointsparse"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
        assert done.returncode != 0
        return done.stderr.strip().splitlines()[-1]

    (checkout / "pyproject.toml").write_text("[project]\nname = 'pointsparse'\n")
    said = message()
    assert f"is not built in the source checkout {checkout}: run `make build` there; the one installed at " \
           f"{ROOT / 'pointsparse'} runs from any other folder" in said, said
    (checkout / "pyproject.toml").unlink()  # (a package folder, no checkout)
    said = message()
    assert "is not built: run `make build` in the repository, or `pip install .`" in said, said


def test_core_is_the_only_extension_and_private():
    so = list((ROOT / "pointsparse").glob("_core*.so"))
    assert so, "build the core first (make build)"
    assert pointsparse._ext.core is pointsparse._ext._core
    for name in ("pack_keys", "unpack_keys", "sort_keys", "unique_keys", "quantize", "segment_reduce",
                 "trilinear_neighbors"):
        assert hasattr(_ext.core, name)
    # Only _ext imports the core.
    importers = [p.name for p in (ROOT / "pointsparse").rglob("*.py")
                 if re.search(r"from \. import _core|import pointsparse\._core|from pointsparse import _core",
                              p.read_text())]
    assert importers == ["_ext.py"], importers


def test_num_threads_follows_torch_and_env(monkeypatch):
    monkeypatch.delenv("POINTSPARSE_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _ext.num_threads() == 1
        torch.set_num_threads(2)
        assert _ext.num_threads() == 2
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("POINTSPARSE_NUM_THREADS", "3")
    assert _ext.num_threads() == min(3, _ext.max_threads())
    monkeypatch.setenv("POINTSPARSE_NUM_THREADS", " ")  # empty: as if unset
    assert _ext.num_threads() == min(torch.get_num_threads(), _ext.max_threads())
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("POINTSPARSE_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="POINTSPARSE_NUM_THREADS"):
            _ext.num_threads()


def test_each_pytest_worker_takes_its_share_of_the_processors():
    """``make test``'s two pytest-xdist workers run one torch thread each on
    a 2-core machine (conftest.pytest_configure): two workers of two threads
    stalled each other (bench/RESULTS.md stop 73). More cores or one worker
    leave torch's default."""
    from conftest import worker_threads

    assert worker_threads(2, 2, 2) == 1
    assert worker_threads(3, 2, 2) == 1  # (never none)
    assert worker_threads(2, 8, 8) == 4
    assert worker_threads(2, None, 2) == 1  # (os.cpu_count() may be None)
    assert worker_threads(1, 2, 2) is None
    assert worker_threads(2, 16, 8) is None
    assert worker_threads(2, 2, 1) is None


@pytest.mark.parametrize("value", ["1000000", "512", "99999999999"])
def test_huge_thread_counts_are_clamped_not_a_crash(value):
    """A runaway thread count once overflowed the OpenMP runtime's stacks."""
    code = ("import torch, pointsparse as ps\n"
            "from pointsparse import _ext, nn\n"
            "assert _ext.num_threads() == _ext.max_threads()\n"
            "x, _ = ps.voxelize(torch.rand(20000, 3) * 40, voxel_size=0.1)\n"
            "y = nn.Conv3d(3, 8)(x)\n"
            "y.feats.sum().backward()\n"
            "print('ok', len(x))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), POINTSPARSE_NUM_THREADS=value)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok")
    # The core clamps too, for a direct call.
    keys = torch.arange(20000, dtype=torch.int64).numpy()
    _ext.core.sort_keys(keys, 10**6)


def test_zero_copy_numpy_views():
    t = torch.arange(12, dtype=torch.int64)
    a = _ext.to_numpy(t)
    assert a.ctypes.data == t.data_ptr()
    back = _ext.to_tensor(a)
    assert back.data_ptr() == t.data_ptr()
    with pytest.raises(ValueError, match="CPU"):
        _ext.to_numpy(torch.empty(1, device="meta"))


def test_core_releases_the_gil():
    """While one thread is inside a long core call, another Python thread runs."""
    keys = np.random.default_rng(0).integers(0, 2**62, 3_000_000)
    window = {}
    ticks: list[float] = []

    def work():
        window["t0"] = time.perf_counter()
        _ext.core.sort_keys(keys, 1)
        window["t1"] = time.perf_counter()

    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    t0, t1 = window["t0"], window["t1"]
    span = t1 - t0
    inside = [t for t in ticks if t0 + 0.1 * span < t < t1 - 0.1 * span]
    # With the GIL held for the whole call this thread could not run in the
    # middle of it at all.
    assert len(inside) > 10, (len(inside), span)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc/self/task (Linux)")
def test_small_calls_do_not_start_a_thread_team():
    """Tiny inputs run on the calling thread; large ones use the team."""
    from reference import CORE_ONLY, run_python

    code = CORE_ONLY + (
        "import os, numpy as np\n"
        "tasks = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = tasks()\n"
        "c = np.zeros((100, 4), np.int32); c[:, 1] = np.arange(100)\n"
        "lay = core.fit_layout([0, 0, 0, 0], [0, 99, 0, 0], [0, 0, 0])\n"
        "k = core.pack_keys(c, lay, 2); core.unpack_keys(k, lay, 2); core.sort_keys(k, 2)\n"
        "u, inv, perm, seg = core.unique_keys(k, 2)\n"
        "core.segment_reduce(np.ones((100, 3)), perm, seg, 1, 2)\n"
        "keys = core.quantize(np.random.rand(100, 3), [0.1] * 3, None, 2)\n"
        "core.trilinear_neighbors(np.random.rand(100, 3), None, [0.1] * 3, [1, 1, 1], lay, u, perm, 100, 2)\n"
        "assert tasks() == before, ('small calls started threads', before, tasks())\n"
        "core.sort_keys(np.arange(300000), 2)\n"  # above the sort's 2^18-key grain
        "assert tasks() > before, 'a large call should use the team'\n"
        "print('ok')\n"
    )
    proc = run_python(code, {"OMP_WAIT_POLICY": "passive"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_public_names_and_lazy_subpackages():
    """`import pointsparse as ps` gives the API.md names, and ps.nn / ps.kmap
    (the contract's `pointsparse.nn.Conv3d`, `pointsparse.kmap.build`) without
    importing them first; ps.export and ps.models too (`pointsparse.export.load`
    after `import pointsparse` was an AttributeError, which the export command's
    own hint led a user into)."""
    from reference import run_python

    code = (
        "import sys, pointsparse as ps\n"
        "for name in ('SparseTensor', 'voxelize', 'devoxelize', 'collate', 'num_threads', '__version__'):\n"
        "    assert hasattr(ps, name), name\n"
        "assert 'pointsparse.nn' not in sys.modules\n"
        "assert ps.nn.Conv3d and ps.nn.functional.conv3d and ps.kmap.build\n"
        "assert 'nn' in dir(ps)\n"
        "assert 'pointsparse.export' not in sys.modules and 'pointsparse.models' not in sys.modules\n"
        "assert ps.export.load and ps.export.ProgramModel and ps.models.MinkUNet and ps.models.build_model\n"
        "assert {'export', 'models'} <= set(dir(ps))\n"
        "try:\n"
        "    ps.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('ok')\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_stub_matches_the_core():
    import ast

    tree = ast.parse((ROOT / "pointsparse" / "_core.pyi").read_text())
    stub_functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    stub_constants = {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    core = _ext.core
    functions = {n for n in dir(core) if not n.startswith("_") and callable(getattr(core, n))}
    constants = {n for n in dir(core) if not n.startswith("_") and isinstance(getattr(core, n), int)}
    assert stub_functions == functions
    assert stub_constants == constants


def test_forked_child_runs_on_one_thread_and_does_not_hang():
    """After the parent ran OpenMP regions, a forked child must still
    voxelise. Like a DataLoader worker it sets torch to one thread (torch's own
    ops would hang otherwise); POINTSPARSE_NUM_THREADS=2 must not start a
    second core thread there."""
    from reference import run_python

    code = (
        "import os, signal, torch, pointsparse as ps\n"
        "from pointsparse import _ext\n"
        "p = torch.rand(100000, 3) * 10\n"
        "x, _ = ps.voxelize(p, voxel_size=0.05)\n"  # the parent's OpenMP team runs
        "assert _ext.num_threads() == 2\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(30)\n"
        "    torch.set_num_threads(1)\n"
        "    y, _ = ps.voxelize(p, voxel_size=0.05)\n"
        "    os._exit(0 if (_ext.num_threads() == 1 and torch.equal(y.coords, x.coords)) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child status', status)\n"
    )
    proc = run_python(code, {"POINTSPARSE_NUM_THREADS": "2"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "child status 0" in proc.stdout, proc.stdout


REUSE_PROBE = r"""
import resource, sys
import numpy as np
import pointsparse as ps

def faults(rounds=8, size=8 << 20):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        a = np.empty(size, np.uint8)
        a[::4096] = 1  # touch every page
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

ok = ps.reuse_freed_memory(False)
off = faults()
ps.reuse_freed_memory(True)
faults(1)  # the heap grows once
on = faults()
print(ok, off, on)
"""


def test_reuse_freed_memory_keeps_pages_mapped():
    """With glibc (this project's Linux machines) the setting takes effect:
    8 MB blocks freed and allocated again fault their pages in every time
    at glibc's defaults (some 500 faults a block here, or a handful where
    transparent huge pages serve it), and far fewer once freed memory
    stays in the process. In a subprocess: the setting is process-wide."""
    import platform

    proc = subprocess.run([sys.executable, "-c", REUSE_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok, off, on = proc.stdout.split()
    if platform.libc_ver()[0] != "glibc":
        assert ok == "False"
        return
    # at least 4 faults a fresh 8 MB block even where transparent huge pages serve all of it (4 x 2 MB; on
    # this Xeon 5 a block then, against some 500 without), and far fewer once freed memory is kept
    assert ok == "True" and int(off) >= 8 * 4 and int(on) * 4 < int(off), (off, on)
    with pytest.raises(TypeError, match="on must be a bool"):
        pointsparse.reuse_freed_memory(1)
    with pytest.raises(ValueError, match="max_bytes"):
        pointsparse.reuse_freed_memory(True, 1 << 31)


@pytest.mark.parametrize("make", [np.int64, np.int32, np.uint32])
def test_reuse_freed_memory_takes_numpy_integers(monkeypatch, make):
    """max_bytes may be a numpy integer (it was refused: isinstance int); the
    core gets the Python int. The core call is recorded, not made: the
    setting is process-wide."""
    calls = []
    monkeypatch.setattr(_ext.core, "reuse_freed_memory", lambda on, max_bytes: calls.append((on, max_bytes)) or True)
    assert pointsparse.reuse_freed_memory(True, make(1 << 20)) is True
    assert pointsparse.reuse_freed_memory(True, 1 << 20) is True
    assert calls[0] == calls[1] == (True, 1 << 20) and type(calls[0][1]) is int


def test_reuse_freed_memory_takes_a_numpy_bool(monkeypatch):
    """``on`` may be a numpy bool, as every flag of the package takes
    (``as_bool``): it was a TypeError 'on must be a bool; got True'. The
    core gets a Python bool; an int is still refused."""
    calls = []
    monkeypatch.setattr(_ext.core, "reuse_freed_memory", lambda on, max_bytes: calls.append((on, max_bytes)) or True)
    assert pointsparse.reuse_freed_memory(np.bool_(True)) is True
    assert pointsparse.reuse_freed_memory(np.bool_(False), 1 << 20) is True
    assert calls == [(True, 1 << 30), (False, 1 << 20)] and all(type(on) is bool for on, _ in calls)
    with pytest.raises(TypeError, match="on must be a bool"):
        pointsparse.reuse_freed_memory(1)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5, np.float64(1 << 20), "1024"])
def test_reuse_freed_memory_refuses_bools_and_floats(monkeypatch, bad):
    calls = []
    monkeypatch.setattr(_ext.core, "reuse_freed_memory", lambda on, max_bytes: calls.append((on, max_bytes)) or True)
    with pytest.raises(TypeError, match=r"max_bytes must be an int in \[0, 2\*\*30\]"):  # (a type: was ValueError)
        pointsparse.reuse_freed_memory(True, bad)
    with pytest.raises(ValueError, match=r"max_bytes must be an int in \[0, 2\*\*30\]; got -1"):
        pointsparse.reuse_freed_memory(True, -1)
    assert calls == []


def test_importing_the_package_leaves_sympy_and_dynamo_out():
    """``import pointsparse`` (and its nn and models) imported torch's symbolic shapes (and sympy under them)
    for one helper of voxelize's and VoxelPrune's graphs: half a second of every process that imports the
    package (a CLI call, a DataLoader worker, each subprocess of this suite) and runs no graph. They load
    where a graph is traced."""
    code = ("import sys, pointsparse, pointsparse.nn, pointsparse.models\n"
            "left = [m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes', 'torch._dynamo') if m in sys.modules]\n"
            "print(left)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**_clean_env(), "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]", run.stdout
