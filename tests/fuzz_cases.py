"""Seeded fuzz cases over the public entry points (run by tests/test_fuzz.py,
each family in a child process so that a crash or a hang is caught and named).

Every case draws its inputs from ``numpy.random.default_rng([seed, index])``
and either succeeds, in which case its result is checked against a naive
reference, or raises ``ValueError``/``TypeError`` with a message (a named
error). Anything else, a crash, a hang or a wrong result, is a failure.

Rerun one case by hand: ``python tests/fuzz_cases.py FAMILY SEED INDEX``.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _accepted(what: str):
    """The part of a case past the point where it may be refused: a named
    error there (a ValueError / TypeError) is a wrong result, not a refusal
    (run_case counts those as the case's refusal: a layer that refused to
    load, convert or run its own valid input passed as refused)."""
    try:
        yield
    except NAMED as exc:
        raise AssertionError(f"{what} refused valid input: {type(exc).__name__}: {exc}") from exc


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


# ------------------------------------------------------------------ pruned convs: the engine's kernels

def _channels(rng) -> int:
    """Channel counts around the kernels' panels and tiles (8, 16, 32 columns)."""
    return max(1, int(_pick(rng, [1, 3, 8, 15, 16, 17, 24, 31, 32, 33, 47, 48, 64, 65])) + int(rng.integers(-1, 2)))


def _pruned_weight(rng, k: int, c_in: int, c_out: int, dtype) -> torch.Tensor:
    """A random weight with a random kind of the zeros the engine skips:
    whole offsets, vectors of panels (one or two panels wide, input channels
    in twins), both, unstructured, all zero, one nonzero, or none."""
    from pointsparse.nn import _engine

    w = torch.from_numpy(rng.standard_normal((k, c_in, c_out))).to(dtype)
    kind = _pick(rng, ["none", "offsets", "vectors", "twins", "vectors+offsets", "unstructured", "zero", "one"])
    width = _engine.panel_width(dtype) * int(_pick(rng, [1, 1, 2]))
    if kind in ("vectors", "twins", "vectors+offsets"):
        rows = -(-c_in // 2) if kind == "twins" else c_in
        keep = torch.from_numpy(rng.random((k, rows, -(-c_out // width))) < rng.uniform(0.02, 0.9))
        if kind == "twins":
            keep = keep.repeat_interleave(2, 1)[:, :c_in]
        w *= keep.repeat_interleave(width, 2)[:, :, :c_out].to(dtype)
    if kind in ("offsets", "vectors+offsets"):
        w[torch.from_numpy(rng.random(k) < rng.uniform(0.1, 0.95))] = 0
    if kind == "unstructured":
        w *= torch.from_numpy(rng.random(w.shape) < 0.25).to(dtype)
    if kind in ("zero", "one"):
        keep = w.flatten()[int(rng.integers(w.numel()))].item()
        w.zero_()
        if kind == "one":
            w.view(-1)[int(rng.integers(w.numel()))] = keep
    return w


def case_pruned_conv(rng):
    """The fused core on a pruned weight: every build this CPU runs, 1-3
    threads, the dense / offset-skipping / vector-sparse kernels, with bias,
    ReLU and a residual: forward and input gradient bit for bit the dense
    kernels' of the build (the FMA builds each other's too), the masked weight
    gradient the dense one times the mask, all against torch's float64 sum.
    One case in eight hands the core a bad argument, which it must name."""
    from pointsparse.nn import _engine
    from reference import conv_sum, random_coords

    dtype = _pick(rng, [torch.float32, torch.float32, torch.float64])
    coords = random_coords(int(_pick(rng, [1, 5, 60, 400, 1500])), int(rng.integers(2, 25)),
                           seed=int(rng.integers(1 << 30)))
    c_in, c_out = _channels(rng), _channels(rng)
    k, t, transposed = _pick(rng, [(3, 1, False), (2, 2, False), (2, 2, True), (3, 2, False), ((3, 1, 3), 1, False),
                                   (1, 1, False), (5, 1, False)])
    d = 2 if t == 1 and rng.random() < 0.2 else 1
    x = ps.SparseTensor(torch.from_numpy(rng.standard_normal((len(coords), c_in))).to(dtype), coords)
    if transposed:
        down = kmap.get_kmap(x, k, t)
        x = ps.SparseTensor(torch.from_numpy(rng.standard_normal((down.num_out, c_in))).to(dtype), down.out_coords,
                            t, cache=x.cache, validate=False)
    m = kmap.get_kmap(x, k, t, d, transposed)
    plan = _engine.make_fused_plan(m).core
    w = _pruned_weight(rng, m.kernel_volume, c_in, c_out, dtype)
    bias = torch.from_numpy(rng.standard_normal(c_out)).to(dtype) if rng.random() < 0.5 else None
    add = torch.from_numpy(rng.standard_normal((m.num_out, c_out))).to(dtype) if rng.random() < 0.2 else None
    relu = bool(rng.random() < 0.3)
    g = torch.from_numpy(rng.standard_normal((m.num_out, c_out))).to(dtype)
    mask = (w != 0).to(dtype)
    active = _engine.choose_execution(w).active
    wactive = _engine.weight_execution(mask, None)[0]
    feats, npb = x.feats.numpy(), None if bias is None else bias.numpy()
    if rng.random() < 0.125:
        bad = _pick(rng, ["active", "add", "weight", "out"])
        out = np.empty((plan.num_out + (bad == "out"), c_out), dtype=feats.dtype)
        plan.forward(feats, w[:, :, :1].numpy() if bad == "weight" and c_out > 1 else w.numpy(), npb, out, 2,
                     active=np.ones(m.kernel_volume + 1, np.uint8) if bad == "active" else active,
                     add=np.zeros((plan.num_out + 1, c_out), feats.dtype) if bad == "add" else None)
        assert bad == "weight" and c_out == 1, f"a bad {bad} was accepted"
        raise Expected("the one-column weight was good")
    got = {}
    with _accepted("the fused core"):
        for isa in _ext.core.runnable_isas():
            for nt in (1, 2, 3):
                for vector in (False, True):
                    out = torch.full((m.num_out, c_out), float("nan"), dtype=dtype)
                    plan.forward(feats, w.numpy(), npb, out.numpy(), nt, isa, relu, active=active, vector=vector,
                                 add=None if add is None else add.numpy())
                    gf = torch.full_like(x.feats, float("nan"))
                    plan.backward_input(g.numpy(), w.numpy(), gf.numpy(), nt, isa, active=active, vector=vector)
                    gw = torch.full_like(w, float("nan"))
                    plan.backward_weight(feats, g.numpy(), gw.numpy(), nt, isa, active=wactive if vector else None,
                                         mask=mask.numpy() if vector else None)
                    got[isa, nt, vector] = (out, gf, gw * mask)  # (the vector kernels compute whole vectors)
    f, wd = x.feats.double().requires_grad_(), w.double().requires_grad_()
    ref = conv_sum(f, wd, m)
    refs = [ref.detach(), *torch.autograd.grad(ref, (f, wd), g.double())]
    refs[0] = refs[0] + (0 if bias is None else bias.double()) + (0 if add is None else add.double())
    refs[0] = refs[0].clamp_min(0) if relu else refs[0]
    refs[2] = refs[2] * mask.double()
    fma = [isa for isa in _ext.core.runnable_isas() if isa != "generic"]
    for (isa, nt, vector), results in got.items():
        same = got[fma[0] if isa in fma else isa, 1, False]
        for name, a, b, r in zip(("forward", "input gradient", "weight gradient"), results, same, refs):
            where = f"{name} of {isa}, {nt} thread(s), {'vector' if vector else 'dense'} kernels"
            assert not torch.isnan(a).any(), f"{where}: rows left unwritten"
            assert torch.equal(a, b), f"{where}: not the dense kernels' bits"
            err = float((a.double() - r).abs().max()) if a.numel() else 0.0
            tol = (1e-4 if dtype == torch.float32 else 1e-10) * (float(r.abs().max()) + 1 if r.numel() else 1)
            assert err <= tol * max(c_in, c_out, 8), f"{where}: {err:.3g} from torch's sum"


# ------------------------------------------------------------------ pruned modules

_PRUNINGS = {
    "l1": lambda p, m, a: p.l1_unstructured(m, "weight", a),
    "random": lambda p, m, a: p.random_unstructured(m, "weight", a),
    "ln_out": lambda p, m, a: p.ln_structured(m, "weight", a, 2, dim=2),
    "panel": lambda p, m, a: p.panel_structured(m, "weight", a),
    "panel_square": lambda p, m, a: p.panel_structured(m, "weight", a, square=True),
    "kernel": lambda p, m, a: p.kernel_structured(m, "weight", a),
    "offset": lambda p, m, a: p.kernel_structured(m, "weight", a, scope="offset"),
    "channel_out": lambda p, m, a: p.channel_structured(m, "weight", a),
    "channel_in": lambda p, m, a: p.channel_structured(m, "weight", a, axis="in"),
    "block": lambda p, m, a: p.block_structured(m, "weight", a),
    "nm": lambda p, m, a: p.nm_structured(m, "weight"),
    "vector": lambda p, m, a: p.vector_structured(m, "weight", a),
    "stripe": lambda p, m, a: p.stripe_structured(m, "weight", a),
    "bad_amount": lambda p, m, a: p.vector_structured(m, "weight", 1.5 + a),
}


def case_pruned_module(rng):
    """A conv, BatchNorm, ReLU, conv (and a transposed conv back up) whose
    convs take one or two random prunings of the toolkit (some of them
    refused: a refused one must leave the module as it was) and sometimes
    ``prune.remove``: forward and every gradient in training, eval, and
    ``fuse_for_inference`` equal torch's path in float64; float32 agrees."""
    import copy

    from pointsparse import nn as pnn
    from pointsparse import prune
    from reference import random_coords

    coords = random_coords(int(_pick(rng, [3, 40, 300, 1200])), int(rng.integers(3, 16)), seed=int(rng.integers(1 << 30)))
    c_in, c1, c2 = int(_pick(rng, [1, 4, 16, 19])), _channels(rng), _channels(rng)
    k, t = _pick(rng, [(3, 1), (2, 2), (3, 2), (1, 1), ((3, 1, 3), 1), (5, 1)])
    torch.manual_seed(int(rng.integers(1 << 30)))
    layers = torch.nn.ModuleDict({"a": pnn.Conv3d(c_in, c1, k, t, bias=bool(rng.random() < 0.5)), "bn": pnn.BatchNorm(c1),
                                  "b": pnn.Conv3d(c1, c2, 3, dilation=int(_pick(rng, [1, 1, 2])))})
    if (k, t) == (2, 2):
        layers["up"] = pnn.Conv3d(c2, c_in, 2, 2, transposed=True, bias=True)
    layers = layers.double()

    def forward(net, x):
        y = net["a"](x)
        y = net["b"](y.with_feats(torch.relu(net["bn"](y).feats)))
        return net["up"](y) if "up" in net else y

    refused = []
    for name in [n for n in layers if n != "bn"]:
        conv = layers[name]
        for kind in rng.choice(sorted(_PRUNINGS), size=int(_pick(rng, [1, 1, 2])), replace=False):
            hooks = list(conv._forward_pre_hooks.items())
            try:
                _PRUNINGS[str(kind)](prune, conv, float(rng.uniform(0.1, 0.95)))
            except NAMED as exc:
                refused.append(f"{kind}: {exc}")
                assert list(conv._forward_pre_hooks.items()) == hooks, f"refused {kind} changed the module's hooks"
        if prune.is_pruned(conv) and rng.random() < 0.3:
            prune.remove(conv, "weight")
    x = ps.SparseTensor(torch.from_numpy(rng.standard_normal((len(coords), c_in))), coords)
    probe = {}

    def run(net, train):
        net.train(train)
        f = x.feats.clone().requires_grad_(train)
        try:
            y = forward(net, x.with_feats(f)).feats
        except pnn.BatchStatisticsError as exc:  # (one site at a stride in training: a named refusal of the input)
            raise Expected(str(exc)[:150]) from exc
        if not train:
            return [y.detach()]
        weights = [f] + [p for p in net.parameters() if p.requires_grad]
        probe.setdefault("g", torch.from_numpy(rng.standard_normal(tuple(y.shape))))
        return [y.detach(), *torch.autograd.grad((y * probe["g"]).sum(), weights)]

    with _accepted("the pruned layers"):
        for train in (True, False):
            ours = run(layers, train)
            with _ext.torch_path():
                theirs = run(layers, train)
            for i, (a, b) in enumerate(zip(ours, theirs)):
                mode = "train" if train else "eval"
                assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), f"{mode} result {i} differs"
        with torch.no_grad():
            want = run(layers, False)[0]
            fused = run(pnn.fuse_for_inference(copy.deepcopy(layers)), False)[0]
            assert torch.allclose(fused, want, rtol=1e-8, atol=1e-8), "fuse_for_inference changed the output"
            single = forward(copy.deepcopy(layers).float(), x.with_feats(x.feats.float())).feats
            scale = float(want.abs().max()) + 1 if want.numel() else 1
            close = torch.allclose(single.double(), want, rtol=0, atol=1e-4 * scale)
            assert close, "float32 differs from float64"
    if refused:
        raise Expected("refused: " + "; ".join(refused)[:150])


# ------------------------------------------------------------------ compressed convs

def case_compressed(rng):
    """``formats.compress`` of a randomly pruned conv (a kernel region
    sometimes, a transposed one) in a random format: both executions give
    the module's output; ``.to`` the other float dtype computes what
    compressing the converted conv computes; its ``state_dict`` loads into a
    fresh compressed conv and gives the same bits. Formats that refuse the
    weight (block sizes, N:M shapes) must name it."""
    import copy
    import io

    from pointsparse import formats, prune
    from pointsparse import nn as pnn
    from reference import random_coords

    dtype = _pick(rng, [torch.float32, torch.float64])
    other = torch.float64 if dtype == torch.float32 else torch.float32
    coords = random_coords(int(_pick(rng, [3, 60, 400])), int(rng.integers(3, 14)), seed=int(rng.integers(1 << 30)))
    c_in, c_out = _channels(rng), _channels(rng)
    k, t, transposed = _pick(rng, [(3, 1, False), (2, 2, False), (3, 2, False), (1, 1, False), ((3, 1, 3), 1, False),
                                   (2, 2, True)])
    region = "cross" if k == 3 and t == 1 and rng.random() < 0.3 else None
    x = ps.SparseTensor(torch.from_numpy(rng.standard_normal((len(coords), c_in))).to(dtype), coords)
    if transposed:
        down = F.conv3d(x, torch.zeros(8, c_in, c_in, dtype=dtype), 2, 2)
        x = down.with_feats(torch.from_numpy(rng.standard_normal(tuple(down.feats.shape))).to(dtype))
    torch.manual_seed(int(rng.integers(1 << 30)))
    make = lambda: pnn.Conv3d(c_in, c_out, k, t, bias=True, transposed=transposed, kernel_region=region).to(dtype)  # noqa: E731
    conv = make()
    for kind in rng.choice(sorted(_PRUNINGS), size=int(rng.integers(0, 3)), replace=False):
        try:
            _PRUNINGS[str(kind)](prune, conv, float(rng.uniform(0.1, 0.97)))
        except NAMED:
            pass
    fmt = _pick(rng, ["coo", "csr", "csc", "bsr", "eie", "fkw"])
    kwargs = {"blocksize": int(_pick(rng, [1, 2, 4, 3]))} if fmt == "bsr" else {}
    if rng.random() < 0.1:  # bad arguments: a format that is none, a block of no size, an unknown keyword
        bad = _pick(rng, [("dense", {}), ("bsr", {"blocksize": 0}), ("csr", {"blocks": 2})])
        formats.compress(conv, bad[0], **bad[1])
        raise AssertionError(f"compress accepted {bad}")
    with torch.no_grad():
        want = conv.eval()(x).feats
    compressed = formats.compress(conv, fmt, **kwargs)
    with _accepted("the compressed conv"):
        fresh = formats.compress(make(), fmt, **kwargs)
        buffer = io.BytesIO()
        torch.save(compressed.state_dict(), buffer)
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        converted = copy.deepcopy(compressed).to(other)
        of_converted = formats.compress(copy.deepcopy(conv).to(other), fmt, **kwargs)
        tol = (1e-4 if dtype == torch.float32 else 1e-10) * (float(want.abs().max()) + 1 if want.numel() else 1)
        with torch.no_grad():
            for execution in ("engine", "format"):
                for layer in (compressed, fresh, converted, of_converted):
                    layer.execution = execution
                got = compressed(x).feats
                where = f"{fmt} {execution}"
                assert torch.allclose(got, want, rtol=0, atol=tol * max(c_in, 8)), f"{where}: not the module's"
                assert torch.equal(fresh(x).feats, got), f"{where}: state_dict round trip changed the output"
                xo = x.with_feats(x.feats.to(other))
                a, b = converted(xo).feats, of_converted(xo).feats
                assert a.dtype == other and torch.equal(a, b), f"{where}: .to({other}) is not the converted conv"


# ------------------------------------------------------------------ thread counts

def _at_threads(run, counts=(1, 2)):
    """``run()`` under each of ``counts`` threads (the core's and torch's),
    each on fresh inputs it builds itself (so no map or plan is shared)."""
    before = torch.get_num_threads()
    out = []
    try:
        for nt in counts:
            torch.set_num_threads(nt)
            with _ext.threads_here(nt):
                out.append(run())
    finally:
        torch.set_num_threads(before)
    return out


def _same_bits(results, names, where: str) -> None:
    """Every thread count's tensors equal the first's bit for bit."""
    first = results[0]
    for nt, other in zip((2, 3), results[1:]):
        for name, a, b in zip(names, first, other):
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            if not same and a.shape == b.shape and a.is_floating_point():
                same = f"max |1 thread - {nt}| {float((a.double() - b.double()).abs().max()):.3g}"
            assert same is True, f"{where}: {name} at {nt} threads is not the 1-thread result ({same or 'shape'})"


def case_threads(rng):
    """Clouds of thousands of rows (where the core splits its work between
    threads) through the public entry points at 1 and 2 threads: a pruned
    conv's forward and both gradients (strided, transposed, dilated, with a
    kernel region, bias, ReLU), its forward without autograd (bf16 or as
    drawn; bias, ReLU and a sum in the kernel's store), voxelize and its gradient, the map builders,
    pooling, a compressed conv and a pruned conv + batch norm + transposed
    conv network, each bit for bit the same at both counts (the conv also
    against torch's float64 sum). One case in nine is a cloud too large or
    too far apart for a key, which must be refused before any work."""
    from pointsparse import formats, prune
    from pointsparse import nn as pnn
    from reference import conv_sum, random_coords

    extent = int(rng.integers(12, 60))
    seed = int(rng.integers(1 << 30))
    coords = random_coords(int(_pick(rng, [2000, 6000, 20000])), extent, seed=seed)
    rows = len(coords)
    part = _pick(rng, ["conv", "conv", "inference", "voxelize", "kmap", "pool", "compressed", "network", "refused"])
    where = f"{part} on {rows} rows (extent {extent})"
    if part == "refused":  # a span no 63-bit key holds, from points or coordinates
        if rng.random() < 0.5:
            pts = torch.from_numpy(rng.standard_normal((rows, 3)) * 10)
            pts[0] = torch.tensor([2.0**40, -2.0**40, 2.0**40])
            ps.voxelize(pts, None, voxel_size=1e-3)
        else:
            far = coords.clone()
            far[0, 1:] = torch.tensor([-2**31, 2**31 - 1, -2**31], dtype=far.dtype)
            far[-1, 1:] = torch.tensor([2**31 - 1, -2**31, 2**31 - 1], dtype=far.dtype)
            kmap.build(far, 3)
        raise AssertionError(f"{where}: a span no key holds was accepted")
    dtype = _pick(rng, [torch.float32, torch.float32, torch.float64])

    if part == "conv":
        c_in, c_out = _channels(rng), _channels(rng)
        k, t, transposed = _pick(rng, [(3, 1, False), (2, 2, False), (3, 2, False), (2, 2, True), ((3, 1, 3), 1, False),
                                       (1, 1, False)])
        d = 2 if t == 1 and rng.random() < 0.2 else 1
        region = "cross" if k == 3 and t == 1 and rng.random() < 0.2 else None
        volume = int(np.prod(k)) if isinstance(k, tuple) else k ** 3
        w = _pruned_weight(rng, volume, c_in, c_out, dtype)
        masked = rng.random() < 0.5
        bias = torch.from_numpy(rng.standard_normal(c_out)).to(dtype) if rng.random() < 0.5 else None
        relu = bool(rng.random() < 0.3)
        feats = torch.from_numpy(rng.standard_normal((rows, c_in))).to(dtype)
        grad = {}

        def run():
            x = ps.SparseTensor(feats, coords.clone())
            if transposed:  # the strided tensor and its cache, as a decoder meets them
                down = F.conv3d(x, torch.zeros(8, c_in, c_in, dtype=dtype), 2, 2)
                x = down.with_feats(torch.from_numpy(np.random.default_rng(seed).standard_normal(
                    tuple(down.feats.shape))).to(dtype))
            f, wd = x.feats.clone().requires_grad_(), w.clone().requires_grad_()
            y = F.conv3d(x.with_feats(f), wd, k, t, d, bias=bias, transposed=transposed, relu=relu,
                         kernel_region=region, weight_mask=(w != 0).to(dtype) if masked else None)
            if "g" not in grad:
                grad["g"] = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(
                    tuple(y.feats.shape))).to(dtype)
            gf, gw = torch.autograd.grad(y.feats, (f, wd), grad["g"])
            return [y.coords, y.feats.detach(), gf, gw], (x, y)

        with _accepted("the conv"):
            results = _at_threads(run)
        _same_bits([r for r, _ in results], ("coords", "forward", "input gradient", "weight gradient"), where)
        x, y = results[0][1]
        with _accepted("the conv's map"):
            m = kmap.get_kmap(x, k, t, d, transposed)
        wd = w.double()
        if region is not None:
            wd = wd * F.region_of(k, region).to(wd).view(-1, 1, 1)
        ref = conv_sum(x.feats.double(), wd, m) + (0 if bias is None else bias.double())
        ref = ref.clamp_min(0) if relu else ref
        got = results[0][0][1]
        tol = (1e-4 if dtype == torch.float32 else 1e-10) * (float(ref.abs().max()) + 1 if ref.numel() else 1)
        err = float((got.double() - ref).abs().max()) if ref.numel() else 0.0
        assert err <= tol * max(c_in, c_out, 8), f"{where}: forward {err:.3g} from torch's sum"
        return

    if part == "voxelize":
        pts = torch.from_numpy(rng.standard_normal((rows * 4, 3)) * extent / 4)
        values = torch.from_numpy(rng.standard_normal((rows * 4, int(rng.integers(1, 6))))).to(dtype)
        batch = torch.from_numpy(rng.integers(0, 3, rows * 4))
        reduce = _pick(rng, ["mean", "max", "sum", "first"])
        size = float(_pick(rng, [0.05, 0.2, 0.5]))

        def run():
            v = values.clone().requires_grad_()
            x, inverse = ps.voxelize(pts, v, voxel_size=size, batch=batch, reduce=reduce)
            (g,) = torch.autograd.grad(x.feats, v, torch.ones_like(x.feats)) if reduce != "first" else (torch.zeros(0),)
            return [x.coords, x.feats.detach(), inverse, g]

        with _accepted("voxelize"):
            results = _at_threads(run)
        _same_bits(results, ("coords", "feats", "inverse", "gradient"), f"{where} {reduce} @ {size}")
        return

    if part == "kmap":
        k, t = _pick(rng, [(3, 1), (2, 2), (3, 2), (5, 1)])
        method = _pick(rng, ["mergesort", "hash", "torch"])
        coords = coords.clone()
        with _accepted("kmap.build"):
            results = _at_threads(lambda: [(m := kmap.build(coords, k, t, method=method)).out_coords, m.sizes,
                                           m.in_idx, m.out_idx])
        _same_bits(results, ("out_coords", "sizes", "in_idx", "out_idx"), f"{where} k={k} s={t} {method}")
        ref = kmap_reference(coords, k, t)
        assert torch.equal(results[0][0].to(torch.int64), ref[0].to(torch.int64)), f"{where}: out_coords not the reference's"
        return

    if part == "inference":  # the forward without autograd, as a fused or exported model runs it
        dtype = _pick(rng, [torch.bfloat16, torch.bfloat16, dtype])  # (bf16: vdpbf16ps, or widened to float32)
        c_in, c_out = _channels(rng), _channels(rng)
        k, t = _pick(rng, [(3, 1), (3, 1), (2, 2), (1, 1)])
        w = _pruned_weight(rng, k ** 3, c_in, c_out, torch.float32).to(dtype)
        bias = torch.from_numpy(rng.standard_normal(c_out)).to(dtype) if rng.random() < 0.5 else None
        relu = bool(rng.random() < 0.5)
        feats = torch.from_numpy(rng.standard_normal((rows, c_in))).to(dtype)
        add = torch.from_numpy(rng.standard_normal((rows, c_out))).to(dtype) if t == 1 and rng.random() < 0.5 else None

        def run():
            x = ps.SparseTensor(feats, coords.clone())
            with torch.no_grad():
                y = F.conv3d(x, w, k, t, bias=bias, relu=relu, add=None if add is None else x.with_feats(add))
            return [y.coords, y.feats], (x, y)

        with _accepted("the inference conv"):
            results = _at_threads(run)
        where = f"{where} {dtype} k={k} s={t}"
        _same_bits([r for r, _ in results], ("coords", "forward"), where)
        x, y = results[0][1]
        ref = conv_sum(x.feats.double(), w.double(), kmap.get_kmap(x, k, t))
        ref = ref + (0 if bias is None else bias.double()) + (0 if add is None else add.double())
        ref = ref.clamp_min(0) if relu else ref
        if dtype == torch.bfloat16:  # products of bf16 inputs summed in float32, each output rounded once to bf16
            # (a rounding is 2^-9 of it; without AVX512-BF16 too, where the float32 kernels sum the widened
            # residual before the one rounding: a day's seed, 20261208 case 8 on an AMD Zen 3, found it added
            # after, rounded twice where it cancelled the sum)
            off = (y.feats.double() - ref).abs() - 2.0**-7 * (ref.abs() + 1)
            assert not off.numel() or float(off.max()) <= 0, f"{where}: an output past its bf16 rounding of " \
                                                              f"torch's sum, by {float(off.max()):.3g}"
            return
        tol = (1e-4 if dtype == torch.float32 else 1e-10) * (float(ref.abs().max()) + 1 if ref.numel() else 1)
        err = float((y.feats.double() - ref).abs().max()) if ref.numel() else 0.0
        assert err <= tol * max(c_in, c_out, 8), f"{where}: forward {err:.3g} from torch's sum"
        return

    channels = _channels(rng)
    feats = torch.from_numpy(rng.standard_normal((rows, channels))).to(dtype)
    if part == "pool":
        def run():
            x = ps.SparseTensor(feats, coords.clone())
            a, b = F.max_pool3d(x, 2, 2), F.avg_pool3d(x, 3, 2)
            return [a.coords, a.feats, b.coords, b.feats, F.global_avg_pool(x), F.global_max_pool(x)]

        with _accepted("pooling"):
            results = _at_threads(run)
        _same_bits(results, ("max coords", "max", "avg coords", "avg", "global avg", "global max"), where)
        return

    torch.manual_seed(seed)
    if part == "compressed":
        conv = pnn.Conv3d(channels, _channels(rng), 3, bias=True).to(dtype)
        with torch.no_grad():
            conv.weight.copy_(_pruned_weight(rng, 27, conv.weight.shape[1], conv.weight.shape[2], dtype))
        fmt = _pick(rng, ["coo", "csr", "csc", "bsr", "eie", "fkw"])
        with _accepted("formats.compress"):
            layer = formats.compress(conv.eval(), fmt)

        def run():
            x = ps.SparseTensor(feats, coords.clone())
            out = []
            with torch.no_grad():
                for execution in ("engine", "format"):
                    layer.execution = execution
                    out.append(layer(x).feats)
            return out

        with _accepted("the compressed conv"):
            results = _at_threads(run)
        _same_bits(results, ("engine", "format"), f"{where} {fmt}")
        return

    width = _channels(rng)
    net = torch.nn.ModuleDict({"a": pnn.Conv3d(channels, width, 3), "bn": pnn.BatchNorm(width),
                               "down": pnn.Conv3d(width, width, 2, 2),
                               "up": pnn.Conv3d(width, channels, 2, 2, transposed=True)}).to(dtype)
    for name in ("a", "down", "up"):
        kind = _pick(rng, sorted(k for k in _PRUNINGS if k != "bad_amount"))
        try:
            _PRUNINGS[kind](prune, net[name], float(rng.uniform(0.1, 0.9)))
        except NAMED:
            pass
    net.eval()  # (torch's training BatchNorm sums in an order of its thread count)
    # The engine's parameters (the convs'): torch's batch norm sums its own
    # weight and bias gradients over the rows in an order of its thread count.
    ours = [(n, p) for n, p in net.named_parameters() if p.requires_grad and not n.startswith("bn.")]

    def run():
        x = ps.SparseTensor(feats.clone().requires_grad_(), coords.clone())
        y = net["a"](x)
        y = net["down"](y.with_feats(torch.relu(net["bn"](y).feats)))
        y = net["up"](y)
        grads = torch.autograd.grad(y.feats.square().sum(), [x.feats] + [p for _, p in ours])
        return [y.coords, y.feats.detach(), *grads]

    with _accepted("the pruned network"):
        results = _at_threads(run)
    _same_bits(results, ["coords", "output", "input gradient"] + [n for n, _ in ours], where)


FAMILIES = {"sparse_tensor": case_sparse_tensor, "voxelize": case_voxelize, "kmap": case_kmap, "conv": case_conv,
            "readers": case_readers, "formats": case_formats, "cli": case_cli,
            "pruned_conv": case_pruned_conv, "pruned_module": case_pruned_module,
            "compressed": case_compressed, "threads": case_threads}


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
    """``family seed [index]``: the case ``index`` of ``seed``, or
    ``$FUZZ_COUNT`` cases of it (100 without); ``family seed:count
    [seed:count ...]``: each seed's count of cases in turn, in one process
    (tests/test_fuzz.py runs the built-in seed's and the day's so: a
    process's start is some seconds of importing torch). Each case prints a
    line ``{"start": i, "seed": s}`` before it and its outcome after."""
    family = argv[0]
    if ":" in argv[1]:
        runs = [(int(seed), range(int(count))) for seed, count in (arg.split(":") for arg in argv[1:])]
    else:
        seed = int(argv[1])
        runs = [(seed, [int(argv[2])] if len(argv) > 2 else range(int(os.environ.get("FUZZ_COUNT", "100"))))]
    torch.set_num_threads(1)
    for seed, indices in runs:
        for i in indices:
            print(json.dumps({"start": i, "seed": seed}), flush=True)
            out = run_case(family, seed, i)
            out["index"], out["seed"] = i, seed
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
