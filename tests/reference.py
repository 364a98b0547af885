"""Naive references for the tests (loops, dicts, dense torch convolutions on
voxel grids: slow and obviously right), and
a helper that runs code in child processes so that a crash fails a test
instead of killing the test run."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as TF

from pointsparse import SparseTensor
from pointsparse.nn.reference import conv_sum, im2col  # noqa: F401  (the library's naive conv sum, held here)
from pointsparse.tensor import as_triple

ROOT = Path(__file__).resolve().parents[1]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# --- coordinate keys --------------------------------------------------------

def pack_ref(coords: np.ndarray, origin, bits) -> np.ndarray:
    """Keys by arithmetic: fields (batch, x - ox, y - oy, z - oz) of widths
    ``bits``, batch highest, z lowest."""
    out = []
    for b, x, y, z in np.asarray(coords).tolist():
        key = b
        for v, o, w in zip((x, y, z), origin, bits[1:]):
            assert 0 <= v - o < 2**w, "row outside the layout"
            key = key * 2**w + (v - o)
        out.append(key)
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


def default_isa() -> str:
    """The build a call without an ``isa`` runs: the widest that runs here,
    or POINTSPARSE_ISA's narrower one (the suite run as on a CPU without
    AVX-512: ``POINTSPARSE_ISA=avx2 make test``)."""
    from pointsparse import _ext

    order = ["generic", "avx2", "avx512"]
    widest = _ext.core.runnable_isas()[0]
    cap = os.environ.get("POINTSPARSE_ISA", "").strip() or widest
    return order[min(order.index(widest), order.index(cap))]


def run_python(code: str, env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -c code`` with the checkout importable and extra environment."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)


ATTEMPT = (
    "def attempt(call, *label):\n"
    "    try:\n"
    "        call()\n"
    "        print('ran', *label)\n"
    "    except ValueError as exc:\n"
    "        print('ValueError', exc)\n"
)
"""Python defining ``attempt(call, *label)``: runs ``call()`` and prints
``ran *label``, or ``ValueError <message>`` where it is refused."""


def run_core_capped(code: str, limit: int = 3 << 30, timeout: int = 60) -> subprocess.CompletedProcess:
    """``code`` run after CORE_ONLY (``core``, ``np`` and :data:`ATTEMPT`'s
    ``attempt`` loaded) in a child whose address space is capped at ``limit``
    bytes (RLIMIT_AS): a call that allocates what its arguments ask before
    refusing them fails there with MemoryError instead of swapping the machine."""
    return run_python(CORE_ONLY + "import resource\nimport numpy as np\n" + ATTEMPT
                      + f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n" + code,
                      {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}, timeout=timeout)


# --- convolution and pooling -------------------------------------------------


def random_coords(n: int, extent: int = 8, batch: int = 2, stride: int = 1, seed: int = 0) -> torch.Tensor:
    """Unique int32 ``[b, x, y, z]`` rows on a grid of ``extent`` cells per
    axis (multiples of ``stride``), about ``n`` of them."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.randint(0, batch, (n, 1), generator=g),
                      torch.randint(0, extent, (n, 3), generator=g) * stride], 1).to(torch.int32)
    return torch.unique(rows, dim=0)


def random_cloud(n: int = 1500, c: int = 4, seed: int = 0, extent: int = 14) -> SparseTensor:
    """One batch of about ``n`` unique voxels on an ``extent``-cell grid with
    ``c`` standard-normal feature channels (the bf16 kernels' tests)."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.cat([torch.zeros(n, 1, dtype=torch.int64),
                                     torch.randint(0, extent, (n, 3), generator=g)], 1), dim=0).int()
    return SparseTensor(torch.randn(len(coords), c, generator=g), coords)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|, in float64."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _torch_weight(weight: torch.Tensor, k, transposed: bool = False) -> torch.Tensor:
    """``(K, C_in, C_out)`` -> torch's ``(C_out, C_in, kx, ky, kz)`` (conv3d) or
    ``(C_in, C_out, kx, ky, kz)`` (conv_transpose3d)."""
    w = weight.reshape(k[0], k[1], k[2], weight.shape[1], weight.shape[2])
    return w.permute(3, 4, 0, 1, 2) if transposed else w.permute(4, 3, 0, 1, 2)


def _read(dense: torch.Tensor, coords: torch.Tensor, stride) -> torch.Tensor:
    idx = coords[:, 1:].long() // torch.tensor(stride)
    return dense[coords[:, 0].long(), :, idx[:, 0], idx[:, 1], idx[:, 2]]


def dense_conv(x: SparseTensor, weight, out_coords, kernel_size=3, stride=1, dilation=1, bias=None):
    """API.md's sparse conv computed as ``F.conv3d`` on the dense grid of ``x``,
    read at ``out_coords`` (output stride ``x.stride * stride``)."""
    k, t, d = as_triple(kernel_size, "k"), as_triple(stride, "s"), as_triple(dilation, "d")
    dense = x.dense()
    left = [(k[a] - 1) // 2 * d[a] for a in range(3)]
    right = [(k[a] - 1) * d[a] + t[a] for a in range(3)]
    dense = TF.pad(dense, (left[2], right[2], left[1], right[1], left[0], right[0]))
    out = TF.conv3d(dense, _torch_weight(weight, k), bias, stride=t, dilation=d)
    return _read(out, out_coords, tuple(a * b for a, b in zip(x.stride, t)))


def dense_conv_transpose(y: SparseTensor, weight, fine_coords, kernel_size=2, stride=2, dilation=1, bias=None):
    """The transposed sparse conv as ``F.conv_transpose3d`` on the dense grid of
    ``y`` (stride ``S``), read at ``fine_coords`` (stride ``S / stride``)."""
    k, t, d = as_triple(kernel_size, "k"), as_triple(stride, "s"), as_triple(dilation, "d")
    dense = TF.pad(y.dense(), (0, 2, 0, 2, 0, 2))
    out = TF.conv_transpose3d(dense, _torch_weight(weight, k, transposed=True), bias, stride=t, dilation=d)
    left = [(k[a] - 1) // 2 * d[a] for a in range(3)]
    out = TF.pad(out, (-left[2], 0, -left[1], 0, -left[0], 0))
    return _read(out, fine_coords, tuple(a // b for a, b in zip(y.stride, t)))


def brute_pool(x: SparseTensor, out_coords, kernel_size, stride, reduce: str) -> torch.Tensor:
    """Max or mean of the active inputs in each output's window, by loops."""
    k, t = as_triple(kernel_size, "k"), as_triple(stride, "s")
    s = x.stride
    where = {tuple(r): i for i, r in enumerate(x.coords.tolist())}
    rows = []
    for b, *q in out_coords.tolist():
        found = []
        for i in itertools.product(*(range(k[a]) for a in range(3))):
            p = tuple(q[a] + (i[a] - (k[a] - 1) // 2) * s[a] for a in range(3))
            if (b, *p) in where:
                found.append(x.feats[where[(b, *p)]])
        if not found:  # a window without active inputs (kernel smaller than the stride)
            rows.append(x.feats.new_zeros(x.feats.shape[1]))
            continue
        stack = torch.stack(found)
        rows.append(stack.max(0).values if reduce == "max" else stack.mean(0))
    return torch.stack(rows) if rows else x.feats.new_zeros((0, x.feats.shape[1]))


def brute_global(x: SparseTensor, reduce: str) -> torch.Tensor:
    b = x.batch_size
    out = x.feats.new_zeros((b, x.feats.shape[1]))
    for i in range(b):
        sel = x.feats[x.coords[:, 0] == i]
        if len(sel):
            out[i] = sel.max(0).values if reduce == "max" else sel.mean(0)
    return out

# --- kernel maps (self-contained: plain Python dict lookups) --------------

def _kmap_triple(v):
    return (v, v, v) if isinstance(v, int) else tuple(v)


def kmap_reference(coords: torch.Tensor, kernel_size, stride=1, dilation=1, tensor_stride=1):
    """Brute-force kernel map (API.md semantics).

    Returns ``(out_coords, in_idx, out_idx, sizes)``: ``out_coords`` int32
    ``(M, 4)`` (the inputs for stride 1; else the unique
    ``floor(c / (s*t)) * (s*t)`` sorted by (batch, x, y, z)), pairs flat and
    grouped by offset in API.md order, sorted by ``out_idx`` within an
    offset, ``sizes`` int64 ``(K,)``.
    """
    k, t, d, s = (_kmap_triple(v) for v in (kernel_size, stride, dilation, tensor_stride))
    rows = [tuple(r) for r in coords.tolist()]
    if t == (1, 1, 1):
        out_rows = rows
    else:
        q = [s[a] * t[a] for a in range(3)]
        out_rows = sorted({(b, x // q[0] * q[0], y // q[1] * q[1], z // q[2] * q[2]) for b, x, y, z in rows})
    where = {r: i for i, r in enumerate(rows)}
    axes = [[(i - (k[a] - 1) // 2) * d[a] * s[a] for i in range(k[a])] for a in range(3)]
    in_idx, out_idx, sizes = [], [], []
    for dx, dy, dz in itertools.product(*axes):
        count = 0
        for j, (b, x, y, z) in enumerate(out_rows):
            i = where.get((b, x + dx, y + dy, z + dz))
            if i is not None:
                in_idx.append(i)
                out_idx.append(j)
                count += 1
        sizes.append(count)
    out_coords = torch.tensor(out_rows, dtype=torch.int32).reshape(-1, 4)
    return (out_coords, torch.tensor(in_idx, dtype=torch.int64), torch.tensor(out_idx, dtype=torch.int64),
            torch.tensor(sizes, dtype=torch.int64))


def conv_operator_args(x, c_out: int, seed: int):
    """``(args, generator)``: the ``pointsparse::conv`` operator's arguments
    ``(feats, weight, bias, coords, in_idx, out_idx, sizes, key)`` for a
    submanifold k3 conv of ``x`` to ``c_out`` channels (its map from
    ``ops.kmap_build``, a random weight and bias), and the generator that
    drew them, for the test's further tensors."""
    from pointsparse import kmap, ops

    key = ops.key_to_list(kmap.KernelMapKey((1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 1, 1)))
    pairs = ops.kmap_build(x.coords, None, key)
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(27, x.feats.shape[1], c_out, generator=g), torch.randn(c_out, generator=g)
    return (x.feats, weight, bias, x.coords, *pairs, key), g


def scan_and_learning_ids(tmp_path):
    """A SemanticKITTI sequence folder of one 400-point scan (raw ids: car,
    road, sidewalk, building) and the same cloud as an .npz of Open3D-ML's
    learning ids: ``(sequence folder, npz path)``."""
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (400, 3)).astype(np.float32)
    seq = tmp_path / "seq"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    np.c_[xyz, np.zeros(400)].astype(np.float32).tofile(seq / "velodyne" / "000000.bin")
    raw = rng.choice([10, 40, 48, 50], 400)
    raw.astype(np.uint32).tofile(seq / "labels" / "000000.label")
    learning = tmp_path / "learning.npz"
    np.savez(learning, xyz=xyz, labels=np.select([raw == 10, raw == 40, raw == 48], [1, 9, 11], 13))
    return seq, learning


def holed_cloud():
    """An organised cloud's stand-in: 400 points in an 8 m cube with labels
    0-2, every fifth point's position NaN (no return): ``(xyz, labels, bad,
    holed)``, ``holed`` the positions with NaN where ``bad``."""
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (400, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 400)
    bad = np.zeros(400, bool)
    bad[::5] = True
    holed = xyz.copy()
    holed[bad] = np.nan
    return xyz, labels, bad, holed
