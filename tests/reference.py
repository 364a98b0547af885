"""Naive numpy references for the tests (loops and dicts, no cleverness), and
a helper that runs code in child processes so that a crash fails a test
instead of killing the test run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

COORD_BIAS = 2**16
BATCH_MAX = 4095
COORD_MIN, COORD_MAX = -(2**16), 2**16 - 1


# --- coordinate keys --------------------------------------------------------

def pack_ref(coords: np.ndarray) -> np.ndarray:
    """Keys by arithmetic: b * 2^51 + (x + 2^16) * 2^34 + (y + 2^16) * 2^17 + (z + 2^16)."""
    out = []
    for b, x, y, z in np.asarray(coords).tolist():
        out.append(b * 2**51 + (x + COORD_BIAS) * 2**34 + (y + COORD_BIAS) * 2**17 + (z + COORD_BIAS))
    return np.array(out, dtype=np.int64).reshape(-1)


# --- voxelisation -------------------------------------------------------------

def voxel_of(point, voxel_size) -> tuple[int, int, int]:
    """floor(p / voxel_size) per axis, in float64 (the documented quantisation)."""
    return tuple(int(np.floor(np.float64(p) / np.float64(v))) for p, v in zip(point, voxel_size))


def voxelize_ref(points: np.ndarray, feats: np.ndarray, voxel_size, batch=None, reduce: str = "mean"):
    """(coords (M, 4) int32 sorted by (b, x, y, z), feats (M, C), inverse (N,))
    from a dict voxel -> list of point indices. Sums run in point order in the
    feats dtype, mean divides the sum by the count."""
    n = len(points)
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        b = 0 if batch is None else int(batch[i])
        groups.setdefault((b, *voxel_of(points[i], voxel_size)), []).append(i)
    voxels = sorted(groups)
    c = feats.shape[1]
    out = np.zeros((len(voxels), c), dtype=feats.dtype)
    inverse = np.zeros(n, dtype=np.int64)
    for j, v in enumerate(voxels):
        rows = groups[v]
        for i in rows:
            inverse[i] = j
        if reduce == "first":
            out[j] = feats[rows[0]]
        elif reduce == "max":
            acc = feats[rows[0]].copy()
            for i in rows[1:]:
                acc = np.where(feats[i] > acc, feats[i], acc)
            out[j] = acc
        else:
            acc = np.zeros(c, dtype=feats.dtype)
            for i in rows:
                acc = acc + feats[i]
            if reduce == "mean":
                acc = acc / feats.dtype.type(len(rows))
            out[j] = acc
    coords = np.array(voxels, dtype=np.int32).reshape(-1, 4)
    return coords, out, inverse


def trilinear_ref(points, coords, feats, voxel_size, stride=(1, 1, 1), batch=None):
    """Interpolate voxel feats at points over the 8 voxel centres around each
    point; voxel c (a multiple of the stride s) has its centre at
    (c + s / 2) * voxel_size; weights are renormalised over the active
    corners; a point with no active corner gets zeros. float64."""
    table = {tuple(r): i for i, r in enumerate(np.asarray(coords).tolist())}
    out = np.zeros((len(points), feats.shape[1]), dtype=np.float64)
    for i, p in enumerate(np.asarray(points, dtype=np.float64)):
        b = 0 if batch is None else int(batch[i])
        u = [p[a] / (voxel_size[a] * stride[a]) - 0.5 for a in range(3)]
        base = [int(np.floor(v)) for v in u]
        frac = [u[a] - base[a] for a in range(3)]
        total, acc = 0.0, np.zeros(feats.shape[1])
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    key = (b, (base[0] + dx) * stride[0], (base[1] + dy) * stride[1], (base[2] + dz) * stride[2])
                    if key not in table:
                        continue
                    w = ((frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1])
                         * (frac[2] if dz else 1 - frac[2]))
                    total += w
                    acc += w * np.asarray(feats[table[key]], dtype=np.float64)
        if total > 0:
            out[i] = acc / total
    return out


def dense_ref(feats, coords, stride, shape):
    """(B, C, X, Y, Z) grid with feats at coords // stride."""
    b, c = shape[0], shape[1]
    out = np.zeros(shape, dtype=feats.dtype)
    for f, (bb, x, y, z) in zip(feats, np.asarray(coords).tolist()):
        out[bb, :, x // stride[0], y // stride[1], z // stride[2]] = f
    return out


# --- child processes ------------------------------------------------------------

_DRIVER = r"""
import json, os, signal, sys, traceback
cases = json.loads(sys.stdin.read())
setup = cases.pop("__setup__")
shared = {}
exec(setup, shared)  # imports once; nothing here may start OpenMP threads before the forks
results = {}
for name, code in cases.items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.alarm(60)
        out = {"exc": None, "msg": ""}
        try:
            exec(code, dict(shared))
        except BaseException as e:
            out = {"exc": type(e).__name__, "msg": str(e)}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(out))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    res = json.loads(text) if text else {"exc": None, "msg": ""}
    if os.WIFSIGNALED(status):
        res["status"] = -os.WTERMSIG(status)
    else:
        res["status"] = os.WEXITSTATUS(status)
    results[name] = res
print(json.dumps(results))
"""


def run_in_children(cases: dict[str, str], setup: str = "") -> dict[str, dict]:
    """Run each code string in its own process (forked from one fresh
    interpreter that runs nothing but the fork loop): name -> {"status": exit
    status (negative: killed by that signal), "exc": exception type name or
    None, "msg": its message}."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    payload = json.dumps({"__setup__": setup, **cases})
    proc = subprocess.run([sys.executable, "-c", _DRIVER], input=payload, capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"child driver failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


CORE_ONLY = (
    "import glob, importlib.util, os\n"
    f"_so = glob.glob(os.path.join({str(ROOT / 'pointsparse')!r}, '_core*.so'))[0]\n"
    "_spec = importlib.util.spec_from_file_location('_core', _so)\n"
    "core = importlib.util.module_from_spec(_spec)\n"
    "_spec.loader.exec_module(core)\n"
)
"""Python that loads the built core alone (no torch import: a quick child)."""


def run_python(code: str, env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -c code`` with the checkout importable and extra environment."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
