"""Seeded fuzz cases over the public entry points (run by tests/test_fuzz.py,
each family in a child process so that a crash or a hang is caught and named).

Every case draws its inputs from ``numpy.random.default_rng([seed, index])``
and either succeeds, in which case its result is checked against a naive
reference, or raises ``ValueError``/``TypeError`` with a message (a named
error). Anything else, a crash, a hang or a wrong result, is a failure.

Rerun one case by hand: ``python tests/fuzz_cases.py FAMILY SEED INDEX``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pointsparse as ps  # noqa: E402
from pointsparse import _ext, kmap  # noqa: E402
from pointsparse.nn import functional as F  # noqa: E402
from reference import dense_conv, dense_conv_transpose, dense_ref, kmap_reference  # noqa: E402

NAMED = (ValueError, TypeError)


class Expected(Exception):
    """A case that was meant to be refused and was (not a failure)."""


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _scale(rng) -> float:
    return float(10.0 ** rng.integers(-2, 8))


# ------------------------------------------------------------------ tensors

def _coords(rng, n: int, extent: int, stride: int = 1, batch: int = 2, origin=(0, 0, 0)) -> torch.Tensor:
    rows = np.concatenate([rng.integers(0, batch, (n, 1)),
                           rng.integers(0, extent, (n, 3)) * stride + np.asarray(origin) // stride * stride], 1)
    rows = np.unique(rows, axis=0)
    return torch.from_numpy(rows.astype(np.int64))


def _maybe_bad_coords(rng, stride):
    n = int(rng.integers(0, 40))
    kind = _pick(rng, ["ok", "ok", "ok", "far", "edge", "dup", "negbatch", "dtype", "shape", "nan", "bigbatch",
                       "offgrid"])
    step = torch.tensor(stride if isinstance(stride, tuple) else (stride,) * 3, dtype=torch.int64).clamp_min(1)
    origin = torch.zeros(3, dtype=torch.int64)
    if kind == "far":
        origin = torch.from_numpy(rng.integers(-2**31 + 100, 2**31 - 100, 3))
    if kind == "edge":
        origin = torch.tensor([int(_pick(rng, [-2**31, 2**31 - 16, 65530, -65540, 0])) for _ in range(3)])
    c = _coords(rng, n, 8)
    c[:, 1:] = (c[:, 1:] * step + origin // step * step).clamp(-2**31, 2**31 - 1) // step * step
    c = torch.unique(c, dim=0)
    if kind == "offgrid" and len(c) and int(step.max()) > 1:
        c[0, 1:] += 1
    if kind == "dup" and len(c):
        c = torch.cat([c, c[:1]])
    if kind == "negbatch" and len(c):
        c[0, 0] = -1
    if kind == "bigbatch" and len(c):
        c[0, 0] = int(_pick(rng, [4095, 4096, 70000, 2**31 - 1]))
    if kind == "dtype":
        return c.to(_pick(rng, [torch.int64, torch.float32, torch.int16, torch.uint8]))
    if kind == "shape":
        return c[:, :3].to(torch.int32)
    if kind == "nan":
        return c.to(torch.float64).fill_(float("nan"))
    return c.to(torch.int32)


def case_sparse_tensor(rng):
    stride = _pick(rng, [1, 1, 1, 2, (1, 2, 1), 0, -1, 2.5, "x"])
    coords = _maybe_bad_coords(rng, stride if isinstance(stride, (int, tuple)) else 1)
    n = coords.shape[0]
    c = int(rng.integers(0, 5))
    feats = torch.from_numpy(rng.standard_normal((n + int(rng.random() < 0.1), c)))
    if rng.random() < 0.1:
        feats = feats.to(torch.int64)
    x = ps.SparseTensor(feats, coords, stride)
    assert len(x) == n
    if n and x.coords[:, 1:].amin() >= 0 and x.coords[:, 1:].amax() < 24 and x.batch_size <= 4:
        dense = x.dense()
        ref = dense_ref(x.feats.numpy(), x.coords, x.stride, tuple(dense.shape))
        assert np.array_equal(dense.numpy(), ref), "dense() differs from the reference"


# ------------------------------------------------------------------ voxelize

def case_voxelize(rng):
    n = int(rng.integers(0, 300))
    pts = rng.standard_normal((n, 3)) * _scale(rng)
    if rng.random() < 0.5:
        pts = pts + rng.uniform(-1e4, 1e4, 3)
    if n and rng.random() < 0.1:
        pts[int(rng.integers(n))] = _pick(rng, [np.nan, np.inf, -np.inf, 1e30])
    points = torch.from_numpy(pts).to(_pick(rng, [torch.float32, torch.float64, torch.float64]))
    feats = None
    if rng.random() < 0.6:
        f = rng.standard_normal((n + int(rng.random() < 0.05), int(rng.integers(1, 4))))
        if n and rng.random() < 0.2:
            f[int(rng.integers(n)), 0] = _pick(rng, [np.nan, np.inf])
        feats = torch.from_numpy(f).to(points.dtype)
    size = _pick(rng, [0.1, 0.5, 1.0, np.float32(0.25), torch.tensor(0.3), (0.1, 0.2, 0.3), 0.0, -1.0, float("nan"),
                       "1", None, 1e-9])
    batch = None
    if rng.random() < 0.3:
        batch = torch.from_numpy(rng.integers(0, 3, n + int(rng.random() < 0.05)))
    reduce = _pick(rng, ["mean", "max", "sum", "first", "median"])
    x, inverse = ps.voxelize(points, feats, voxel_size=size, batch=batch, reduce=reduce)
    with _ext.torch_path():
        y, inverse_t = ps.voxelize(points, feats, voxel_size=size, batch=batch, reduce=reduce)
    assert torch.equal(x.coords, y.coords) and torch.equal(inverse, inverse_t), "core and torch paths disagree"
    assert torch.allclose(x.feats, y.feats, rtol=1e-6, atol=1e-6, equal_nan=True), "core and torch feats disagree"
    if n:
        assert torch.equal(x.coords[inverse][:, 0], (batch if batch is not None else torch.zeros(n)).to(torch.int32))


# ------------------------------------------------------------------ kernel maps

def case_kmap(rng):
    ts = int(_pick(rng, [1, 1, 2]))
    origin = (0, 0, 0) if rng.random() < 0.7 else tuple(int(v) for v in rng.integers(-2**30, 2**30, 3))
    coords = _coords(rng, int(rng.integers(0, 60)), int(rng.integers(1, 7)), stride=ts, origin=origin).to(torch.int32)
    k = _pick(rng, [1, 2, 3, 3, 5, (3, 1, 2), (4096, 4096, 1), 0, 101, (2, 2)])
    t = _pick(rng, [1, 1, 2, (2, 1, 1), 3, 0])
    d = _pick(rng, [1, 1, 2, 3, -1])
    method = _pick(rng, ["mergesort", "hash", "torch", "quantum"])
    m = kmap.build(coords, kernel_size=k, stride=t, dilation=d, tensor_stride=ts, method=method)
    ref_out, ref_in, ref_oi, ref_sizes = kmap_reference(coords, k, t, d, ts)
    assert torch.equal(m.out_coords, ref_out), "out_coords differ from brute force"
    assert torch.equal(m.sizes.cpu(), ref_sizes), "pair counts differ from brute force"
    assert torch.equal(m.in_idx.cpu(), ref_in) and torch.equal(m.out_idx.cpu(), ref_oi), "pairs differ"


# ------------------------------------------------------------------ convolution

def case_conv(rng):
    coords = _coords(rng, int(rng.integers(1, 60)), int(rng.integers(2, 6))).to(torch.int32)
    c_in, c_out = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    x = ps.SparseTensor(torch.from_numpy(rng.standard_normal((len(coords), c_in))), coords)
    k = _pick(rng, [1, 2, 3, (3, 1, 2)])
    t = _pick(rng, [1, 1, 2])
    if isinstance(k, int) and k < t:
        k = t
    volume = int(np.prod(k)) if isinstance(k, tuple) else k ** 3
    w = torch.from_numpy(rng.standard_normal((volume, c_in, c_out)))
    bias = torch.from_numpy(rng.standard_normal(c_out)) if rng.random() < 0.3 else None
    if rng.random() < 0.1:  # a wrong weight: must be refused
        w = w[:, :, :1].repeat(1, 2, 1) if c_in == 1 else w[:, :1]
    y = F.conv3d(x, w, k, t, bias=bias)
    ref = dense_conv(x, w, y.coords, k, t, 1, bias)
    assert torch.allclose(y.feats, ref, rtol=1e-9, atol=1e-9), "conv differs from dense conv3d"
    if t == 2 and rng.random() < 0.5:
        w_t = torch.from_numpy(rng.standard_normal((volume, c_out, c_in)))
        z = F.conv3d(y, w_t, k, t, transposed=True)
        ref_t = dense_conv_transpose(y, w_t, x.coords, k, t)
        assert torch.allclose(z.feats, ref_t, rtol=1e-9, atol=1e-9), "transposed conv differs from dense"
    feats = x.feats.clone().requires_grad_()
    F.conv3d(x.with_feats(feats), w, k, t, bias=bias).feats.square().sum().backward()
    with _ext.torch_path():
        feats_t = x.feats.clone().requires_grad_()
        F.conv3d(x.with_feats(feats_t), w, k, t, bias=bias).feats.square().sum().backward()
    assert torch.allclose(feats.grad, feats_t.grad, rtol=1e-9, atol=1e-9), "input gradient differs"


# ------------------------------------------------------------------ readers

def _write_valid(rng, folder: Path) -> Path:
    n = int(rng.integers(1, 200))
    xyz = rng.uniform(-50, 50, (n, 3)).astype(np.float32)
    kind = _pick(rng, ["npz", "npy", "bin", "txt", "ply", "pcd"])
    if kind == "npz":
        path = folder / "cloud.npz"
        np.savez(path, xyz=xyz, intensity=rng.integers(0, 1000, n).astype(np.uint16),
                 classification=rng.integers(1, 7, n).astype(np.uint8))
    elif kind == "npy":
        path = folder / "cloud_points.npy"
        np.save(path, np.concatenate([xyz, rng.random((n, 1), dtype=np.float32)], 1))
    elif kind == "bin":
        path = folder / "velodyne" / "000000.bin"
        path.parent.mkdir(exist_ok=True)
        np.concatenate([xyz, rng.random((n, 1), dtype=np.float32)], 1).tofile(path)
    elif kind == "txt":
        path = folder / "room.txt"
        np.savetxt(path, np.concatenate([xyz, rng.integers(0, 255, (n, 3))], 1))
    else:
        path = folder / f"cloud.{kind}"
        header = (f"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {n}\nHEIGHT 1\n"
                  f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA ascii\n") if kind == "pcd" else (
                  f"ply\nformat ascii 1.0\nelement vertex {n}\nproperty float x\nproperty float y\nproperty float z\n"
                  "end_header\n")
        path.write_text(header + "\n".join(" ".join(f"{v:.4f}" for v in row) for row in xyz) + "\n")
    return path


def _corrupt(rng, path: Path) -> str:
    data = bytearray(path.read_bytes())
    how = _pick(rng, ["truncate", "flip", "garbage", "empty", "none", "nan", "huge_header"])
    if how == "truncate" and len(data) > 1:
        data = data[: int(rng.integers(0, len(data)))]
    elif how == "flip" and data:
        for _ in range(int(rng.integers(1, 64))):
            i = int(rng.integers(len(data)))
            data[i] ^= int(rng.integers(1, 256))
    elif how == "garbage":
        data = bytearray(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
    elif how == "empty":
        data = bytearray()
    elif how == "nan" and path.suffix == ".bin":
        arr = np.frombuffer(bytes(data), dtype=np.float32).copy()
        arr[int(rng.integers(arr.size))] = np.nan
        data = bytearray(arr.tobytes())
    elif how == "huge_header" and path.suffix == ".npy":
        text = bytes(data)
        start = text.find(b"'shape': (") + len(b"'shape': (")
        end = text.find(b",", start)
        if start > 10 and end > start:
            data = bytearray(text[:start] + b"99999999999" + text[end:])
    path.write_bytes(bytes(data))
    return how


def case_readers(rng):
    from pointsparse.data import read_cloud

    with tempfile.TemporaryDirectory() as tmp:
        path = _write_valid(rng, Path(tmp))
        how = _corrupt(rng, path)
        try:
            sample = read_cloud(path, label_map="ign-lidarhd" if path.suffix == ".npz" else None)
        except ImportError:
            raise Expected("optional reader not installed")
        except NAMED as exc:
            if path.name not in str(exc):
                raise AssertionError(f"the error does not name the file ({how}): {exc}") from None
            raise Expected(str(exc))
        assert np.isfinite(sample.xyz).all(), f"a sample with non-finite positions was returned ({how})"
        for field in ("intensity", "rgb"):
            value = getattr(sample, field)
            assert value is None or np.isfinite(value).all(), f"non-finite {field} returned ({how})"


# ------------------------------------------------------------------ formats

def case_formats(rng):
    from pointsparse import formats

    m, k = int(rng.integers(0, 24)), int(rng.integers(1, 24))
    dense = torch.from_numpy(rng.standard_normal((m, k)) * (rng.random((m, k)) < rng.random()))
    name = _pick(rng, ["COO", "CSR", "CSC", "BSR", "NM", "EIE"])
    cls = getattr(formats, name)
    kwargs = {}
    if name == "BSR":
        kwargs["blocksize"] = _pick(rng, [(2, 2), (4, 1), (3, 3), (0, 2), (2.0, 2), 2])
    if name == "NM":
        kwargs.update(n=_pick(rng, [1, 2, 3, 0]), m=_pick(rng, [2, 4, 8, 3]), prune=bool(rng.random() < 0.7))
    if name == "EIE":
        kwargs["num_pe"] = _pick(rng, [1, 2, 4, 10**9, 0, 3.5])
    fmt = cls.from_dense(dense, **kwargs)
    back = fmt.to_dense()
    assert back.shape == dense.shape
    rhs = torch.from_numpy(rng.standard_normal((k, int(rng.integers(1, 9)))))
    assert torch.allclose(fmt.matmul(rhs.to(back.dtype)), back @ rhs.to(back.dtype), rtol=1e-4, atol=1e-4), \
        "matmul differs from the dense product of to_dense()"
    if name != "NM" and name != "EIE":
        assert torch.allclose(back.double(), dense, rtol=1e-6, atol=1e-6), "round trip changed the matrix"
    assert fmt.nbytes() >= 0


# ------------------------------------------------------------------ CLI flags

TRAIN_FLAGS = {"--epochs": ["0", "-1", "3", "1e9"], "--lr": ["nan", "inf", "-0.1", "0", "0.01", "1e30"],
               "--voxel-size": ["0", "nan", "-1", "0.2"], "--max-range": ["1e30", "inf", "0", "20"],
               "--batch-size": ["0", "2"], "--threads": ["0", "1", "100000"], "--beams": ["0", "16", "100000"],
               "--azimuth-steps": ["0", "64", "10000000"], "--val-fraction": ["0", "1", "nan", "0.2"],
               "--warmup": ["-1", "2", "nan", "0.1"], "--weight-decay": ["-1", "nan", "inf", "0"],
               "--time-limit": ["-1", "nan", "0"], "--time-budget": ["0", "nan", "1"], "--cr": ["0", "nan", "0.5"]}


def case_cli(rng):
    import argparse

    from pointsparse.app import train as tr

    argv = ["--out", tempfile.gettempdir() + "/never-written"]
    for flag in rng.choice(sorted(TRAIN_FLAGS), size=int(rng.integers(1, 4)), replace=False):
        argv += [str(flag), _pick(rng, TRAIN_FLAGS[str(flag)])]
    parser = argparse.ArgumentParser()
    tr.add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise Expected("argparse refused it")
    tr.check_args(args)
    for name in ("lr", "voxel_size", "max_range", "cr", "weight_decay", "warmup"):
        value = getattr(args, name, None)
        assert value is None or math.isfinite(value), f"--{name} {value} was accepted"
    assert args.beams <= 1024 and args.azimuth_steps <= 65536, "an unbounded scene size was accepted"


FAMILIES = {"sparse_tensor": case_sparse_tensor, "voxelize": case_voxelize, "kmap": case_kmap, "conv": case_conv,
            "readers": case_readers, "formats": case_formats, "cli": case_cli}


def run_case(family: str, seed: int, index: int) -> dict:
    rng = np.random.default_rng([seed, index])
    t0 = time.perf_counter()
    try:
        FAMILIES[family](rng)
        outcome = {"result": "ok"}
    except Expected as exc:
        outcome = {"result": "refused", "msg": str(exc)[:200]}
    except NAMED as exc:
        msg = str(exc)
        outcome = {"result": "refused" if len(msg) >= 10 else "unnamed",
                   "msg": f"{type(exc).__name__}: {msg[:300]}"}
    except AssertionError as exc:
        outcome = {"result": "wrong", "msg": str(exc)[:500] or traceback.format_exc()[-800:]}
    except Exception as exc:  # noqa: BLE001 - any other type is an unnamed error
        outcome = {"result": "unnamed", "msg": f"{type(exc).__name__}: {str(exc)[:300]}",
                   "where": traceback.format_exc()[-1200:]}
    outcome["seconds"] = round(time.perf_counter() - t0, 3)
    return outcome


def main(argv) -> int:
    family, seed = argv[0], int(argv[1])
    indices = [int(argv[2])] if len(argv) > 2 else None
    count = int(os.environ.get("FUZZ_COUNT", "100"))
    torch.set_num_threads(1)
    for i in indices if indices is not None else range(count):
        print(json.dumps({"start": i}), flush=True)
        out = run_case(family, seed, i)
        out["index"] = i
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
