"""A seeded differential fuzz of the path a CUDA GPU runs, on the CPU.

On a GPU every op runs the torch path, and a few pieces of it only off the
CPU: a conv as one product of scattered columns (``reference.conv_gemm``
where the columns fit); the kernel map query of every offset at once
(``kmap._query_torch``) and for a kernel that tiles its stride the parents
map (``kmap._parents_torch``) are the torch path's on the CPU too. Here the
conv is forced on the CPU (:func:`gpu_path`, as bench/host_reads.py does) and
held in float64 to the C++ core (the default backend): random coords
(batches, extents, tensor strides, shuffled rows, far origins, tiny and
empty clouds), random convs (kernel sizes, strides, dilations, transposed
convs through the shared cache, bias, kernel regions, pruning masks, relu
and add), poolings and the maps themselves; out coords, values and the
gradients of feats, weight, bias and the added tensor.

A failing case names its index: ``_conv_case(index)`` etc. rebuild it."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse import kmap as km
from pointsparse.nn import reference

pytestmark = pytest.mark.usefixtures("one_thread")

_loop = reference.conv_sum


def _gemm_where_it_fits(feats, weight, kmap):
    """The GPU's conv in the torch path: one product of columns where they fit."""
    if reference.gemm_fits(feats, kmap):
        return reference.conv_gemm(feats, weight, kmap)
    return _loop(feats, weight, kmap)


@contextlib.contextmanager
def gpu_path(chunk=None):
    """The torch path as a GPU runs it, on the CPU (``chunk``: the query's
    :data:`kmap.QUERY_CHUNK`, small to cut the queries in pieces)."""
    with pytest.MonkeyPatch.context() as patch, ps.backend("torch"):
        patch.setattr(reference, "conv_torch", _gemm_where_it_fits)
        if chunk is not None:
            patch.setattr(km, "QUERY_CHUNK", chunk)
        yield


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


KERNELS = [1, 2, 3, 3, 4, 5, (1, 3, 3), (3, 1, 1), (2, 3, 1), (3, 2, 2), (1, 1, 3)]
STRIDES = [1, 1, 2, (2, 2, 1), (1, 2, 2), 3]
DILATIONS = [1, 1, 2, (1, 2, 3)]
TENSOR_STRIDES = [(1, 1, 1), (1, 1, 1), (2, 2, 2), (2, 1, 2), (4, 2, 1), (3, 3, 3)]
INT32_MAX = 2**31 - 1
#: Rows drawn for a cloud (fewer after the duplicates go).
SIZES = [0, 1, 2, 5, 40, 150, 300, 300]


def _coords(rng, tensor_stride=(1, 1, 1)):
    """Unique int32 coords on multiples of ``tensor_stride``: 0-3 batches,
    extents of 1-10 cells around 0 or a far origin, rows shuffled or sorted,
    empty, one or two rows now and then."""
    n = _pick(rng, SIZES)
    batches = int(rng.integers(1, 4))
    extent = int(rng.integers(1, 11))
    s = np.asarray(tensor_stride)
    origin = _pick(rng, [(0, 0, 0), (0, 0, 0), (-7, 3, 0), (2**30, -2**29, 2**20), "top", "bottom"])
    # in cells of the stride; "top", "bottom": the highest and lowest cells of int32 (a kernel reaches past them)
    if origin == "top":
        origin = INT32_MAX // s - extent
    elif origin == "bottom":
        origin = -((INT32_MAX + 1) // s) + extent
    else:
        origin = np.asarray(origin) // s
    rows = np.concatenate([rng.integers(0, batches, (n, 1)),
                           (rng.integers(-extent, extent + 1, (n, 3)) + origin) * s], 1)
    rows = np.unique(rows, axis=0)
    if rng.random() < 0.5:
        rows = rows[rng.permutation(len(rows))]
    return torch.from_numpy(rows.astype(np.int32)).reshape(-1, 4)


def _both(fn, chunk=None):
    """``fn()`` on the C++ core (the default backend) and on the GPU's path;
    None where both refuse it with a ValueError (coords downsampled below
    int32), naming the same row."""
    refused = []
    try:
        want = fn()
    except ValueError as error:
        refused.append(str(error))
    with gpu_path(chunk):
        try:
            got = fn()
        except ValueError as error:
            refused.append(str(error))
            if len(refused) == 1:
                raise
    if len(refused) == 1:
        raise AssertionError(f"the core refused what the GPU's path took: {refused[0]}")
    if refused:
        assert refused[0].startswith(refused[1]), refused  # (the core's adds the rule)
        return None
    return want, got


def close(got, want, what, tol=1e-10):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def same_sparse(got, want, what):
    """Two SparseTensors: the same coords and stride, feats within ``close``."""
    assert torch.equal(got.coords, want.coords), what
    assert got.stride == want.stride, what
    close(got.feats, want.feats, what)


# ------------------------------------------------------------------ kernel maps

def _kmap_case(index):
    rng = np.random.default_rng([11, index])
    s = _pick(rng, TENSOR_STRIDES)
    coords = _coords(rng, s)
    k, t, d = _pick(rng, KERNELS), _pick(rng, STRIDES), _pick(rng, DILATIONS)
    if rng.random() < 0.3:  # the U-Net's k2 s2 and its kin: the parents map
        t = _pick(rng, [2, (2, 2, 1), (1, 2, 2)])
        k = t
    chunk = _pick(rng, [None, None, 1, 97])
    return coords, s, k, t, d, chunk


def _maps(coords, s, k, t, d):
    """The maps a layer takes from a cache, down and (after a stride) up,
    and build()'s with the default method."""
    x = ps.SparseTensor(torch.zeros(len(coords), 1), coords, s)
    down = km.get_kmap(x, k, t, d)
    maps = [down, km.build(coords, k, t, d, tensor_stride=s)]
    if _triple(t) != (1, 1, 1):
        coarse = ps.SparseTensor(torch.zeros(down.num_out, 1), down.out_coords, down.key.out_stride, cache=x.cache,
                                 validate=False)
        maps.append(km.get_kmap(coarse, k, t, d, transposed=True))
    return maps


@pytest.mark.parametrize("index", range(200))
def test_kernel_maps(index):
    coords, s, k, t, d, chunk = _kmap_case(index)
    both = _both(lambda: _maps(coords, s, k, t, d), chunk)
    if both is None:
        return
    want, got = both
    for i, (a, b) in enumerate(zip(got, want)):
        what = f"case {index}: map {i} of k={k} t={t} d={d} s={s} on {len(coords)} rows"
        assert torch.equal(a.out_coords, b.out_coords), what
        assert torch.equal(a.sizes, b.sizes), what
        assert torch.equal(a.in_idx, b.in_idx) and torch.equal(a.out_idx, b.out_idx), what
        assert (a.num_in, a.num_out, a.key) == (b.num_in, b.num_out, b.key), what


# ------------------------------------------------------------------ convs

def _conv_case(index):
    """A conv's configuration: a module (with its pruning mask), how to call
    it, and its input."""
    rng = np.random.default_rng([12, index])
    s = _pick(rng, TENSOR_STRIDES)
    coords = _coords(rng, s)
    k, d = _pick(rng, KERNELS), _pick(rng, DILATIONS)
    transposed = rng.random() < 0.3
    t = _pick(rng, [2, (2, 2, 1), (2, 1, 2)]) if transposed else _pick(rng, STRIDES)
    c_in, c_out = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    volume = int(np.prod(_triple(k)))
    region = None
    if rng.random() < 0.3:
        region = "cross" if rng.random() < 0.5 else sorted(rng.choice(volume, int(rng.integers(1, volume + 1)),
                                                                      replace=False).tolist())
    torch.manual_seed(index)
    conv = ps.nn.Conv3d(c_in, c_out, k, t, d, bias=bool(rng.random() < 0.5), transposed=transposed,
                        kernel_region=region).double()
    conv.relu = bool(rng.random() < 0.3)
    mask = None
    if rng.random() < 0.3:
        mask = torch.from_numpy(rng.random((volume, c_in, c_out)) < 0.6).double()
        mask[torch.from_numpy(rng.random(volume) < 0.3)] = 0  # whole offsets too
        ps.prune.custom_from_mask(conv, "weight", mask)
    # a transposed conv comes back up from a strided conv's output (the shared cache): that conv first
    first = ps.nn.Conv3d(c_in, c_in, _pick(rng, [k, 2, 3]), t).double() if transposed else None
    add = rng.random() < 0.3
    g = torch.Generator().manual_seed(index)
    feats = torch.randn(len(coords), c_in, generator=g, dtype=torch.float64)
    return coords, s, feats, first, conv, mask, add, index


def _run_conv(coords, s, feats, first, conv, mask, add, index):
    """The conv's output and the gradients of a random linear loss."""
    f = feats.clone().requires_grad_()
    x = ps.SparseTensor(f, coords, s)
    if first is not None:
        x = first(x)
    extra = None
    if add:
        kmap = km.get_kmap(x, conv.kernel_size, conv.stride, conv.dilation, conv.transposed)
        g = torch.Generator().manual_seed(1000 + index)
        a = torch.randn(kmap.num_out, conv.out_channels, generator=g, dtype=torch.float64).requires_grad_()
        extra = ps.SparseTensor(a, kmap.out_coords, kmap.key.out_stride, cache=x.cache)
    y = conv(x, add=extra)
    g = torch.Generator().manual_seed(2000 + index)
    r = torch.randn(y.feats.shape, generator=g, dtype=torch.float64)
    (y.feats * r).sum().backward()
    grads = {"feats": f.grad}
    modules = {"conv": conv} if first is None else {"conv": conv, "first": first}
    for name, module in modules.items():
        for key, p in module.named_parameters():
            grads[f"{name}.{key}"] = p.grad
    if extra is not None:
        grads["add"] = extra.feats.grad
    return y, grads


@pytest.mark.parametrize("index", range(300))
def test_convs(index):
    coords, s, feats, first, conv, mask, add, _ = _conv_case(index)
    both = _both(lambda: _run_conv(*_conv_case(index)))  # (fresh modules each: a pruned one has no deepcopy)
    if both is None:
        return
    want, got = both
    what = f"case {index}: {first} then {conv} (mask {mask is not None}, add {add}) on {len(coords)} rows at {s}"
    (y_want, g_want), (y_got, g_got) = want, got
    same_sparse(y_got, y_want, what)
    assert g_got.keys() == g_want.keys(), what
    for key in g_want:
        assert (g_got[key] is None) == (g_want[key] is None), f"{what}: {key}"
        if g_want[key] is not None:
            close(g_got[key], g_want[key], f"{what}: grad of {key}")
    weight = g_got.get("conv.weight_orig", g_got.get("conv.weight"))
    if weight is not None:
        if mask is not None:
            assert torch.all(weight[mask == 0] == 0), what
        if conv.kernel_region is not None:
            outside = torch.ones(weight.shape[0], dtype=torch.bool)
            outside[list(conv.kernel_region)] = False
            assert torch.all(weight[outside] == 0), what


# ------------------------------------------------------------------ poolings

@pytest.mark.parametrize("index", range(100))
def test_poolings(index):
    rng = np.random.default_rng([13, index])
    s = _pick(rng, TENSOR_STRIDES)
    coords = _coords(rng, s)
    layer = _pick(rng, [ps.nn.MaxPool3d, ps.nn.AvgPool3d])
    k = _pick(rng, KERNELS)
    t = _pick(rng, [None, 1, 2, (2, 2, 1)])
    d = _pick(rng, DILATIONS)
    pool = layer(k, t, d)
    c = int(rng.integers(1, 5))
    feats = torch.randn(len(coords), c, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    warm = rng.random() < 0.3  # the map cached under inference_mode first

    def run():
        f = feats.clone().requires_grad_()
        x = ps.SparseTensor(f, coords, s)
        if warm:
            with torch.inference_mode():
                pool(x)
        y = pool(x)
        r = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(3000 + index), dtype=torch.float64)
        (y.feats * r).sum().backward()
        return y, f.grad

    both = _both(run)
    if both is None:
        return
    (y_want, g_want), (y_got, g_got) = both
    what = f"case {index}: {pool} on {len(coords)} rows at {s}"
    same_sparse(y_got, y_want, what)
    close(g_got, g_want, f"{what}: grad")


# ------------------------------------------------------------------ networks

def _network_case(index):
    """A small U-Net step: a strided conv (or a pooling after it), a
    submanifold conv with a residual ``add`` and ReLU, a transposed conv
    back up with the input as its ``add``; each random; run with or without
    gradients, the maps cached under inference_mode first or not."""
    rng = np.random.default_rng([14, index])
    s = _pick(rng, TENSOR_STRIDES)
    coords = _coords(rng, s)
    c, c1 = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    t = _pick(rng, [2, (2, 2, 1), (1, 2, 2)])
    torch.manual_seed(index)
    down = ps.nn.Conv3d(c, c1, _pick(rng, [2, 3, t]), t, bias=bool(rng.random() < 0.5)).double()
    pool = _pick(rng, [None, None, ps.nn.MaxPool3d(2), ps.nn.AvgPool3d(3, 2)])
    mid = ps.nn.Conv3d(c1, c1, _pick(rng, KERNELS), 1, _pick(rng, DILATIONS),
                       kernel_region=_pick(rng, [None, "cross"])).double()
    mid.relu = bool(rng.random() < 0.5)
    up = [ps.nn.Conv3d(c1, c1, _pick(rng, [2, 3, t]), 2, transposed=True).double() if pool is not None else None,
          ps.nn.Conv3d(c1, c, _pick(rng, [2, 3, t]), t, transposed=True, bias=bool(rng.random() < 0.5)).double()]
    up[1].relu = bool(rng.random() < 0.5)
    feats = torch.randn(len(coords), c, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
    return coords, s, feats, down, pool, mid, up, bool(rng.random() < 0.3), bool(rng.random() < 0.3)


def _run_network(coords, s, feats, down, pool, mid, up, no_grad, warm, index):
    f = feats.clone().requires_grad_()
    x = ps.SparseTensor(f, coords, s)

    def net(x):
        y = down(x)
        if pool is not None:
            y = up[0](pool(y))
        return up[1](mid(y, add=y), add=x)

    if warm:
        with torch.inference_mode():
            net(x)
    if no_grad:
        with torch.no_grad():
            return net(x), {}
    y = net(x)
    r = torch.randn(y.feats.shape, generator=torch.Generator().manual_seed(4000 + index), dtype=torch.float64)
    (y.feats * r).sum().backward()
    grads = {"feats": f.grad}
    for name, module in (("down", down), ("mid", mid), ("up0", up[0]), ("up1", up[1])):
        for key, p in module.named_parameters() if module is not None else ():
            grads[f"{name}.{key}"] = p.grad
    return y, grads


@pytest.mark.parametrize("index", range(100))
def test_networks(index):
    coords, s, *_ = _network_case(index)
    both = _both(lambda: _run_network(*_network_case(index), index))
    if both is None:
        return
    (y_want, g_want), (y_got, g_got) = both
    what = f"case {index} on {len(coords)} rows at {s}"
    same_sparse(y_got, y_want, what)
    assert g_got.keys() == g_want.keys(), what
    for key in g_want:
        close(g_got[key], g_want[key], f"{what}: grad of {key}")
