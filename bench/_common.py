"""Shared by the benchmark scripts: timing, environment, generated scenes of
a target voxel count, and the real sweeps in ../shared/datasets (or the folder
``$POINTSPARSE_DATASETS`` names)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pointsparse as ps  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"


def positive_int(text: str) -> int:
    """An argparse ``type`` for a count (``--repeats``, ``--rounds``,
    ``--threads``): a whole number of at least 1, else argparse's usage error
    naming the option (0 read as 'not given' where the default is None, and a
    negative count ran a whole benchmark to fail at its first median)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def quick_defaults(args, **defaults) -> None:
    """Each option ``name=(default, quick)`` the command line left unset
    (None) takes its ``default``, or its ``quick`` value where ``args.quick``:
    a value the user gave wins over --quick's (``--quick --rounds 7`` runs 7
    rounds, as the page's command says)."""
    for name, (default, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)


def page_arg(text: str) -> str:
    """An argparse ``type`` for a page option (``--out x.md``): the text as
    given, once it can name a page: not a folder, not under a file, in a
    folder this process may write (or create). Checked as the options are
    parsed, since the page is written at the end of the run (a folder given
    as the page cost the whole run, then a bare IsADirectoryError)."""
    if not text:
        return text
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give the page's file name (a folder/name.md)")
    if not os.path.dirname(text):  # (a bare name: a page in the results folder, see page_path)
        return text
    _check_writable_below(text, path.parent)
    return text


def _check_writable_below(text: str, folder: Path) -> None:
    """ArgumentTypeError where ``folder``'s nearest existing ancestor (or
    itself) is a file or cannot be written in (``text``: the option's value,
    named in the message)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write in {str(folder)!r}")


def folder_arg(text: str) -> str:
    """An argparse ``type`` for a folder option (spmm.py's ``--out``): the
    text as given, once it can be a folder: not a file, not under one (the
    folder is made at the end of the run, after the timings)."""
    if not text:
        return text
    _check_writable_below(text, Path(text))
    return text


def results_path(name: str, quick: bool = False) -> Path:
    """Where a script writes its page ``name`` (``"voxelize.md"``):
    bench/results/, or for a ``--quick`` smoke run a scratch folder under the
    system's temporary directory, so that a smoke run never replaces the
    committed results. The folder is created."""
    folder = Path(tempfile.gettempdir()) / "pointsparse-bench-quick" if quick else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def page_path(out, default: str, quick: bool = False) -> Path:
    """Where a script writes its page for ``--out OUT``: a path with a
    folder (``bench/results/x.md``, ``/tmp/x.md``, ``./x.md``) as given; a bare file
    name (``x.md``) as a page in :func:`results_path`'s folder, as no
    ``--out`` writes ``default`` there (a bare name landed in the folder the
    script was run from in some scripts, under bench/results/ in others)."""
    if out is None or str(out) == "":
        return results_path(default, quick)
    # (the text, not the Path, which reads "./x.md" as the bare "x.md")
    return Path(out) if os.path.dirname(str(out)) else results_path(str(out), quick)


KITTI_SWEEP = Path("kitti-raw") / "000049.bin"


def datasets_folders() -> list[Path]:
    """The folders searched for the real datasets, in order: the one
    ``$POINTSPARSE_DATASETS`` names alone where it is set, else
    ``../shared/datasets`` beside the checkout and ``/work/shared/datasets``."""
    given = os.environ.get("POINTSPARSE_DATASETS", "")
    if given:
        return [Path(given)]
    return [ROOT.parent / "shared" / "datasets", Path("/work/shared/datasets")]


#: The checkpoint the fine-tuning suites start from where none is named (``make demo`` writes it).
DEMO_CHECKPOINT = ROOT / "runs" / "demo" / "checkpoint.pt"


def shown(path) -> str:
    """``path`` as a page shows it: relative to the repository where it lies
    inside it (a default resolved there read as this checkout's own folder,
    which another clone has not), else as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def absent_checkpoint(parser, path: Path, script: str) -> bool:
    """Whether the suite ``script`` has no checkpoint to start from: True
    (after a line on stdout: nothing measured, exit 0, as for absent data)
    where ``path`` is the default :data:`DEMO_CHECKPOINT` and a checkout
    has not run ``make demo`` (a smoke run of every suite must not fail
    there); a ``--checkpoint`` named and absent is ``parser.error`` (exit 2);
    False where it is a file."""
    if Path(path).is_file():
        return False
    if Path(path).resolve() != DEMO_CHECKPOINT.resolve():
        parser.error(f"--checkpoint: {path} does not exist")
    print(f"{script}: {path} does not exist (run `make demo` first, or pass --checkpoint); nothing measured")
    return True


def datasets_dir() -> Path | None:
    """The first of :func:`datasets_folders` that exists, None when none
    does. A ``$POINTSPARSE_DATASETS`` naming no folder is an error (exit 2,
    naming it, on stderr): it fell back to ../shared/datasets in silence, and
    a page then measured other data than the variable named."""
    given = os.environ.get("POINTSPARSE_DATASETS", "")
    if given and not Path(given).is_dir():
        print(f"POINTSPARSE_DATASETS={given!r} is not a folder (unset it to search ../shared/datasets)",
              file=sys.stderr)
        raise SystemExit(2)
    return next((folder for folder in datasets_folders() if folder.is_dir()), None)


def kitti_searched() -> str:
    """Where the KITTI sweep was looked for, for a message saying it is
    absent: its path in the datasets folder found, else in each folder
    searched (the messages named ../shared/datasets whatever
    ``$POINTSPARSE_DATASETS`` said)."""
    root = datasets_dir()
    return " or ".join(str(folder / KITTI_SWEEP) for folder in ([root] if root is not None else datasets_folders()))


def kitti_path() -> Path | None:
    """The KITTI raw sweep 000049 (float32 x, y, z, intensity), None when absent."""
    root = datasets_dir()
    path = None if root is None else root / KITTI_SWEEP
    return path if path is not None and path.is_file() else None


def cpu_name() -> str:
    """The CPU as the pages name it: model, family/model numbers and the
    kernel builds this machine runs, e.g. ``AMD EPYC (family 25 model 1)
    [avx2 generic]`` (Zen 3) or ``... model 17) [avx512 avx2 generic]``."""
    name, ids = platform.processor() or platform.machine(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("model name", "cpu family", "model") and key not in ids:
                    ids[key] = value
                if len(ids) == 3:
                    break
    except OSError:
        pass
    if "model name" in ids:
        name = ids["model name"]
        if "cpu family" in ids and "model" in ids:
            name += f" (family {ids['cpu family']} model {ids['model']})"
    try:
        from pointsparse import _core
    except ImportError:  # no extension built: the torch paths only
        return name
    return f"{name} [{' '.join(_core.runnable_isas())}]"


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg": " ".join(f"{v:.1f}" for v in os.getloadavg()),
    }
    for name in ("POINTSPARSE_ISA", "POINTSPARSE_AVX512_FULL_WIDTH"):  # (a page run as another CPU says so)
        if os.environ.get(name, "").strip():
            env[name] = os.environ[name].strip()
    return env


def timeit(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """Median seconds of each callable (name -> fn), the calls interleaved
    round by round so that a busy spell slows all of them alike; with
    ``warmup`` each runs once first, untimed. Each round takes the calls in
    a new (seeded) order: in a fixed order a call always follows the same
    one, and what that one leaves in the caches (or flushes from them)
    biases it every round."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    names = list(fns)
    order = np.random.default_rng(0)
    for _ in range(repeats):
        for i in order.permutation(len(names)):
            t0 = time.perf_counter()
            fns[names[i]]()
            times[names[i]].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def child_peaks(forms: list, run_child, rounds: int, script: str) -> tuple[dict, dict]:
    """Peak-memory measurements of ``forms``, each in a fresh child process:
    ``run_child(form)`` returns the argv (after ``python -c``) of a child
    that prints one JSON line holding ``grown`` (bytes). The forms run round
    by round in a seeded new order (as :func:`interleaved`); returns ``({form:
    [MiB each round]}, {form: its first child's JSON})``. ``script`` names
    the bench script in the Linux-only refusal (it reads ``/proc``)."""
    import json
    import subprocess

    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit(f"bench/{script} reads /proc/self/status and resets /proc/self/clear_refs: Linux only")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    grown: dict = {f: [] for f in forms}
    seen: dict = {}
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for i in order.permutation(len(forms)):
            run = subprocess.run([sys.executable, "-c", *run_child(forms[i])], capture_output=True, text=True,
                                 env=env)
            if run.returncode != 0:
                raise SystemExit(f"the {forms[i]} child failed (exit {run.returncode}): "
                                 f"{run.stderr.strip()[-1500:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            grown[forms[i]].append(result["grown"] / 2**20)
            seen.setdefault(forms[i], result)
            print(forms[i], f"{grown[forms[i]][-1]:.0f} MiB", flush=True)
    return grown, seen


def add_peak_options(parser, page: str) -> None:
    """The options every :func:`child_peaks` script takes: ``--rounds``
    (default 3; --quick 1, through :func:`quick_defaults`), ``--quick`` and
    ``--out`` (default ``bench/results/<page>``)."""
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="interleaved rounds, one child per form each (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None, help=f"the page (default bench/results/{page})")


def peak_table(grown: dict, base: str) -> str:
    """The markdown table of :func:`child_peaks`' measurements, each form's
    median against ``base``'s."""
    reference = statistics.median(grown[base])
    rows = [f"| {f} | {statistics.median(v):.0f} | {', '.join(f'{g:.0f}' for g in v)} | "
            f"{statistics.median(v) / reference:.2f}x |" for f, v in grown.items()]
    return (f"| form | peak growth MiB (median) | each round | against {base} |\n|---|---|---|---|\n"
            + "\n".join(rows))


def enforce_error(case: str, error: float, tolerance: float, what: str = "max abs diff") -> float:
    """``error`` when within ``tolerance``; else a RuntimeError naming the
    case, the error and the tolerance (NaN fails too), raised before
    anything is timed or written: a speed-up counts only for outputs that
    agree with their reference."""
    if not error <= tolerance:
        raise RuntimeError(f"{case}: {what} {error:.3g} is above the tolerance {tolerance:g}; "
                           "outputs wrong, nothing timed")
    return error


def street_points(num_voxels: int, voxel_size: float = 0.05, seed: int = 0) -> np.ndarray:
    """Points on the surfaces of a street (ground, two facades, cars, poles),
    the street's length chosen so that voxelising at ``voxel_size`` gives about
    ``num_voxels`` voxels (surfaces: about 9 neighbours per voxel in 3x3x3)."""
    rng = np.random.default_rng(seed)
    width, height = 16.0, 8.0
    area = num_voxels * voxel_size**2 / 0.88  # not every surface voxel is hit
    length = area / (width + 2 * height + 6.0)
    density = 1.6 / voxel_size**2  # points per m^2: most surface voxels get hit, as in a scan

    def plane(n, origin, u, v):
        a, b = rng.random((2, n))
        return np.asarray(origin) + a[:, None] * np.asarray(u) + b[:, None] * np.asarray(v)

    parts = []
    n = int(density * length * width)
    ground = plane(n, (0, 0, 0), (length, 0, 0), (0, width, 0))
    ground[:, 2] += 0.15 * np.sin(ground[:, 0] / 3.0) * np.cos(ground[:, 1] / 4.0)
    parts.append(ground)
    for y in (0.0, width):
        parts.append(plane(int(density * length * height), (0, y, 0), (length, 0, 0), (0, 0, height)))
    # cars and poles: about 6 m^2 of surface per metre of street
    for x in np.arange(2.0, length - 4.0, 9.0):
        y = rng.uniform(2.0, width - 4.0)
        for origin, u, v in (((x, y, 1.5), (4, 0, 0), (0, 1.8, 0)), ((x, y, 0.3), (4, 0, 0), (0, 0, 1.2)),
                             ((x, y + 1.8, 0.3), (4, 0, 0), (0, 0, 1.2))):
            parts.append(plane(int(density * 7.2), origin, u, v))
        t = rng.random(int(density * 5.0)) * 2 * np.pi
        z = rng.random(t.size) * 6.0
        parts.append(np.stack([x + 5 + 0.13 * np.cos(t), 1.0 + 0.13 * np.sin(t), z], 1))
    pts = np.concatenate(parts).astype(np.float32)
    pts += rng.normal(0, voxel_size * 0.05, pts.shape).astype(np.float32)
    return pts


def street_scene(num_voxels: int, voxel_size: float = 0.05, seed: int = 0) -> torch.Tensor:
    """int32 coords (N, 4) of a generated street scene of about ``num_voxels`` voxels."""
    pts = torch.from_numpy(street_points(num_voxels, voxel_size, seed))
    tensor, _ = ps.voxelize(pts, voxel_size=voxel_size)
    return tensor.coords


def real_sweeps() -> dict[str, np.ndarray]:
    """name -> (N, 3) float32 points of the real clouds present (centred)."""
    root = datasets_dir()
    out: dict[str, np.ndarray] = {}
    if root is None:
        return out
    kitti = kitti_path()
    if kitti is not None:
        out["kitti-raw/000049"] = np.fromfile(kitti, dtype=np.float32).reshape(-1, 4)[:, :3]
    skitti = root / "semantickitti" / "full-scan" / "velodyne" / "000000.bin"
    if skitti.exists():
        out["semantickitti/000000"] = np.fromfile(skitti, dtype=np.float32).reshape(-1, 4)[:, :3]
    tile = root / "ign-lidarhd" / "tiles50m" / "test_data_77050_627755_LA93_IGN69.npz"
    if tile.exists():
        out["ign-lidarhd/77050_627755"] = np.load(tile)["xyz"].astype(np.float32)
    for k, v in out.items():
        out[k] = v - v.min(0)
    return out


def real_scene(points: np.ndarray, voxel_size: float) -> torch.Tensor:
    tensor, _ = ps.voxelize(torch.from_numpy(np.ascontiguousarray(points)), voxel_size=voxel_size)
    return tensor.coords


def kitti_or_street(quick: bool = False) -> tuple[torch.Tensor, str]:
    """The north star's sweep (KITTI raw 000049 at 0.05 m) and its name, or,
    for ``quick`` or where the dataset is absent, a generated street of 20k
    voxels."""
    sweeps = {} if quick else real_sweeps()
    if "kitti-raw/000049" in sweeps:
        return real_scene(sweeps["kitti-raw/000049"], 0.05), "KITTI raw 000049 at 0.05 m"
    return street_scene(20_000), "A generated street of 20k voxels"


def write_markdown(path: Path, title: str, command: str, env: dict, tables: list[str], notes: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())
    body = f"# {title}\n\nCommand: `{command}`\n\nEnvironment: {env_line}\n\n" + "\n\n".join(tables)
    if notes:
        body += "\n\n" + notes
    path.write_text(body + "\n")


# The opening of a child that loads the extension module by its path
# (argv[1]) with numpy alone, as `core` (pybind11 refuses a second module
# registering the same types in one process, and torch under valgrind is slow).
LOAD_CORE = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("_core", sys.argv[1])
core = importlib.util.module_from_spec(spec)
spec.loader.exec_module(core)
"""


def callgrind_instructions(child: str, args: list) -> int:
    """Instructions valgrind's callgrind counts for ``python -c child *args``
    (one thread, a fixed hash seed); RuntimeError with its stderr when the
    child fails."""
    import re
    import shutil
    import subprocess

    proc = subprocess.run([shutil.which("valgrind"), "--tool=callgrind", "--callgrind-out-file=/dev/null",
                           sys.executable, "-c", child, *map(str, args)], capture_output=True, text=True,
                          env={"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"the callgrind child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(found.group(1))
