"""voxelize / devoxelize against naive numpy references (dict of voxel ->
points, 8-corner interpolation), their gradients, the torch path against the
C++ path, empty and single-point inputs, thread counts, and bad input."""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse import coords as C

V = importlib.import_module("pointsparse.voxelize")  # the package attribute is the function
from reference import CORE_ONLY, run_in_children, trilinear_ref, voxelize_ref

REDUCES = ["mean", "max", "sum", "first"]
DTYPES = [torch.float32, torch.float64]


def cloud(n: int, seed: int = 0, dtype=torch.float32, batches: int = 1, scale: float = 2.0):
    """Points in [-scale, scale)^3 (negative coordinates included), feats,
    and a batch index (None for one batch)."""
    g = torch.Generator().manual_seed(seed)
    points = ((torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype)
    feats = torch.randn(n, 5, generator=g, dtype=torch.float64).to(dtype)
    batch = torch.randint(0, batches, (n,), generator=g) if batches > 1 else None
    return points, feats, batch


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("voxel_size", [0.5, (0.3, 0.7, 1.1)])
@pytest.mark.parametrize("batches", [1, 3])
def test_voxelize_matches_reference(reduce, dtype, voxel_size, batches):
    points, feats, batch = cloud(400, seed=batches, dtype=dtype, batches=batches)
    x, inverse = ps.voxelize(points, feats, voxel_size=voxel_size, batch=batch, reduce=reduce)
    vs = (voxel_size,) * 3 if isinstance(voxel_size, float) else voxel_size
    coords, out, inv = voxelize_ref(points.numpy(), feats.numpy(), vs,
                                    None if batch is None else batch.numpy(), reduce)
    assert x.stride == (1, 1, 1)
    assert x.coords.dtype == torch.int32 and x.feats.dtype == dtype
    assert np.array_equal(x.coords.numpy(), coords)
    assert np.array_equal(inverse.numpy(), inv)
    assert np.array_equal(x.feats.numpy(), out)  # same order of sums, same division: exact
    assert bool((x.coords[:, 1:] < 0).any())  # negative coordinates are in the table


def test_voxelize_default_feats_are_positions_and_boundaries():
    points = torch.tensor([[-0.5, 0.0, 0.49], [-0.01, 0.0, 0.5], [0.0, -0.0, 0.999], [-1.0, 1.0, -1.0]])
    x, inverse = ps.voxelize(points, voxel_size=0.5)
    # floor(p / 0.5): -1, 0, 0 | -1, 0, 1 | 0, 0, 1 | -2, 2, -2
    assert x.coords.tolist() == [[0, -2, 2, -2], [0, -1, 0, 0], [0, -1, 0, 1], [0, 0, 0, 1]]
    assert inverse.tolist() == [1, 2, 3, 0]
    assert torch.equal(x.feats[inverse], points)  # one point per voxel: mean is the point


@pytest.mark.parametrize("reduce", REDUCES)
def test_voxelize_gradcheck(reduce):
    points, _, batch = cloud(24, seed=3, dtype=torch.float64, batches=2, scale=1.0)
    feats = torch.randn(24, 2, dtype=torch.float64, requires_grad=True)
    x0, _ = ps.voxelize(points, feats, voxel_size=0.8, batch=batch, reduce=reduce)
    assert len(x0) < 24  # voxels do merge points

    def fn(f):
        return ps.voxelize(points, f, voxel_size=0.8, batch=batch, reduce=reduce)[0].feats

    assert torch.autograd.gradcheck(fn, (feats,))


def test_voxelize_grad_routes_to_the_right_points():
    points = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.3, 0.3, 0.3], [5.0, 5.0, 5.0]], dtype=torch.float64)
    feats = torch.tensor([[1.0, 9.0], [3.0, 2.0], [2.0, 9.0], [4.0, 4.0]], dtype=torch.float64, requires_grad=True)
    expected = {
        "sum": [[1, 1], [1, 1], [1, 1], [1, 1]],
        "mean": [[1 / 3, 1 / 3], [1 / 3, 1 / 3], [1 / 3, 1 / 3], [1, 1]],
        "max": [[0, 1], [1, 0], [0, 0], [1, 1]],  # ties (9, 9): the first point
        "first": [[1, 1], [0, 0], [0, 0], [1, 1]],
    }
    for reduce, want in expected.items():
        feats.grad = None
        x, _ = ps.voxelize(points, feats, voxel_size=1.0, reduce=reduce)
        x.feats.sum().backward()
        assert torch.allclose(feats.grad, torch.tensor(want, dtype=torch.float64)), reduce


# --- the torch path (used for non-CPU tensors) equals the C++ path ----------

@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_torch_equals_core(dtype):
    points, _, batch = cloud(3000, seed=4, dtype=dtype, batches=4, scale=50.0)
    points[:5] = torch.tensor([[-0.0, 0.0, 1e-30], [-1e-30, 2.5, -2.5], [0.3, 0.6, 0.9],
                               [-0.3, -0.6, -0.9], [7.0, -7.0, 0.1]], dtype=dtype)
    for vs in [(0.1, 0.1, 0.1), (0.3, 0.25, 1.7)]:
        keys, layout = V.quantize_keys(points, vs, batch)
        t_keys, t_layout = V._quantize_torch(points, vs, batch.long())
        assert torch.equal(keys, t_keys) and layout == t_layout


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_reduce_torch_equals_core(mode, dtype):
    points, feats, batch = cloud(3000, seed=5, dtype=dtype, batches=2)
    feats[::7, 1] = feats[1::7, 1]  # some ties for max
    uniq, inverse, perm, seg_ptr = C.unique(V.quantize_keys(points, 0.4, batch)[0])
    out, arg = _ext.core.segment_reduce(feats.numpy(), perm.numpy(), seg_ptr.numpy(), mode, 2)
    t_out, t_arg = V._segment_reduce_torch(feats, inverse, perm, seg_ptr, mode)
    assert torch.equal(torch.from_numpy(out), t_out)
    if mode in (2, 3):
        assert torch.equal(torch.from_numpy(arg), t_arg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2, (1, 2, 4)])
def test_trilinear_torch_equals_core(dtype, stride):
    points, feats, batch = cloud(2000, seed=6, dtype=dtype, batches=2)
    x, _ = ps.voxelize(points, feats, voxel_size=0.25, batch=batch)
    x = coarsen(x, stride)
    extra = torch.tensor([[1e6, 0, 0], [-1e12, 5, 5], [0.1, 0.1, 0.1]], dtype=dtype)  # far away: no corners
    pts = torch.cat([points, extra])
    b = torch.cat([batch, torch.tensor([0, 1, 1])])
    idx, w = V.trilinear_weights(x, pts, 0.25, b)
    t_idx, t_w = V._trilinear_torch(x, pts, (0.25,) * 3, b)
    assert torch.equal(idx, t_idx)
    assert t_w.dtype == w.dtype
    assert torch.equal(w, t_w)
    assert bool((idx[-3:-1] == -1).all()) and bool((w[-3:-1] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_trilinear_devoxelize_runs_the_core_product_to_the_same_bits(dtype, monkeypatch):
    """On the CPU the corners' weighted sum runs as the core's CSR product
    (one row of 8 weights a point), with or without a gradient: the same
    bits as the corners summed one by one (the torch path), at 1 and 2
    threads, against the reference; no points at all give an empty (0, C)
    result."""
    points, _, batch = cloud(3000, seed=11, dtype=torch.float64, batches=2)
    x, _ = ps.voxelize(points, torch.randn(len(points), 37, dtype=torch.float64).to(dtype), voxel_size=0.25,
                       batch=batch)
    x = coarsen(x, 2)
    pts = torch.cat([points, torch.tensor([[1e6, 0, 0]], dtype=torch.float64)])  # (no corner: zeros)
    b = torch.cat([batch, torch.tensor([1])])
    calls = []
    spmm = _ext.core.csr_spmm
    monkeypatch.setattr(_ext.core, "csr_spmm", lambda *a: calls.append(a) or spmm(*a))

    def run(**kw):
        return ps.devoxelize(x, points=pts, voxel_size=0.25, batch=b, mode="trilinear", **kw)

    with ps.backend("torch"):
        corners = run()
    assert not calls
    got = []
    for threads in (1, 2):
        with _ext.threads_here(threads), torch.no_grad():
            got.append(run())
    assert len(calls) == 2
    assert got[0].dtype == dtype and all(torch.equal(g, corners) for g in got)
    leaf = x.feats.detach().clone().requires_grad_(True)
    with_grad = ps.devoxelize(x.with_feats(leaf), points=pts, voxel_size=0.25, batch=b, mode="trilinear")
    assert len(calls) == 3 and torch.equal(with_grad.detach(), corners)
    want = trilinear_ref(pts.numpy(), x.coords.numpy(), x.feats.double().numpy(), (0.25,) * 3, (2, 2, 2),
                         b.numpy())
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(corners.double().numpy(), want, atol=tol * max(1.0, float(np.abs(want).max())))
    assert bool((got[0][-1] == 0).all())
    with torch.no_grad():
        empty = ps.devoxelize(x, points=pts[:0], voxel_size=0.25, batch=b[:0], mode="trilinear")
    assert empty.shape == (0, 37) and empty.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trilinear_devoxelize_gradient_on_the_core_is_the_transposed_sum(dtype):
    """The feats' gradient of the core's corner product is its transpose
    (each voxel's points, in point order): torch's path's gradient to a few
    ulps, the same bits at 1 and 2 threads and again; float64 gradcheck and
    gradgradcheck (the second derivative through torch's index_add); no
    points give zeros."""
    points, _, batch = cloud(2500, seed=12, dtype=torch.float64, batches=2)
    x, _ = ps.voxelize(points, torch.randn(len(points), 21, dtype=torch.float64).to(dtype), voxel_size=0.25,
                       batch=batch)
    g = torch.randn(len(points), 21, generator=torch.Generator().manual_seed(3)).to(dtype)

    def grad_of(feats, pts=points, b=batch, out_grad=g):
        leaf = feats.detach().clone().requires_grad_(True)
        ps.devoxelize(x.with_feats(leaf), points=pts, voxel_size=0.25, batch=b, mode="trilinear").backward(out_grad)
        return leaf.grad

    with ps.backend("torch"):
        want = grad_of(x.feats)
    got = []
    for threads in (1, 2, 2):
        with _ext.threads_here(threads):
            got.append(grad_of(x.feats))
    assert got[0].dtype == dtype and all(torch.equal(a, got[0]) for a in got)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[0].float(), want.float(), atol=tol * float(want.abs().max()), rtol=0)
    assert not grad_of(x.feats, points[:0], batch[:0], g[:0]).any()
    xs, _ = ps.voxelize(points[:60], torch.randn(60, 2, dtype=torch.float64), voxel_size=0.25, batch=batch[:60])

    def f(feats):
        return ps.devoxelize(xs.with_feats(feats), points=points[:60], voxel_size=0.25, batch=batch[:60],
                             mode="trilinear")

    leaf = xs.feats.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (leaf,))
    assert torch.autograd.gradgradcheck(f, (leaf,))


def test_trilinear_devoxelize_keeps_a_forward_mode_tangent():
    """Feats carrying a forward-mode tangent (torch.autograd.forward_ad,
    torch.func.jvp) keep it through trilinear devoxelize, as the torch
    path's corner sum does: the core's product has no jvp rule and would
    drop it (a silent zero)."""
    from torch.autograd import forward_ad

    points, _, batch = cloud(800, seed=13, dtype=torch.float64, batches=2)
    x, _ = ps.voxelize(points, torch.randn(len(points), 5, dtype=torch.float64), voxel_size=0.25, batch=batch)
    tangent = torch.randn_like(x.feats)

    def run(feats):
        return ps.devoxelize(x.with_feats(feats), points=points, voxel_size=0.25, batch=batch, mode="trilinear")

    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(run(forward_ad.make_dual(x.feats, tangent)))
    # the map is linear in the feats: its tangent is the map of the tangent
    assert out.tangent is not None
    torch.testing.assert_close(out.tangent, run(tangent), rtol=0, atol=1e-12)
    _, jvp = torch.func.jvp(run, (x.feats,), (tangent,))
    torch.testing.assert_close(jvp, run(tangent), rtol=0, atol=1e-12)


def test_trilinear_devoxelize_gradient_on_the_core_under_vmap():
    """The core's corner product's backward run under vmap
    (torch.autograd.grad with is_grads_batched, torch.autograd.functional's
    jacobian with vectorize=True): torch's index_add of each corner, the
    gradients of the rows one by one (the core's transposed product took no
    batched gradient: "Batching rule not implemented for aten::detach")."""
    points, _, batch = cloud(80, seed=14, dtype=torch.float64, batches=2)
    x, _ = ps.voxelize(points, torch.randn(len(points), 3, dtype=torch.float64), voxel_size=0.25, batch=batch)

    def run(feats):
        return ps.devoxelize(x.with_feats(feats), points=points, voxel_size=0.25, batch=batch, mode="trilinear")

    leaf = x.feats.detach().clone().requires_grad_(True)
    out = run(leaf)
    rows = torch.randn((4, *out.shape), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(out, leaf, rows, is_grads_batched=True, retain_graph=True)[0]
    want = torch.stack([torch.autograd.grad(out, leaf, r, retain_graph=True)[0] for r in rows])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    jac = torch.autograd.functional.jacobian(run, x.feats, vectorize=True)
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(run, x.feats), rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride", [1, (1, 2, 4)])
def test_trilinear_torch_equals_core_at_the_top_of_int32(stride):
    """Voxels at the top of int32 whose x span (6 voxels) is no power of two:
    the coords' key layout reaches past 2**31 - 1, and a corner there (a
    point beyond the last voxel) is no voxel. The torch path (a GPU's) took
    such a corner as inside the layout, wrapped it to -2**31 in int32 and
    refused the rows ("lies outside the key layout"); both paths must give
    the reference's weights."""
    s = ps.tensor.as_triple(stride, "stride")
    top = (2**31 - 1) // s[0] * s[0]
    coords = torch.tensor([[0, top - 5 * s[0], 0, 0], [0, top, 0, 0], [0, top, 0, s[2]]], dtype=torch.int32)
    x = ps.SparseTensor(torch.tensor([[1.0], [3.0], [5.0]], dtype=torch.float64), coords, stride)
    # around the last voxel's centre, beyond it, and between it and the one below
    points = torch.tensor([[top + 0.5 * s[0], 0.5, 1.0], [top + 1.7 * s[0], 0.3, 0.9], [top - 2.0 * s[0], 0.5, 0.5]],
                          dtype=torch.float64)
    want = trilinear_ref(points.numpy(), coords.numpy(), x.feats.numpy(), (1.0,) * 3, s)
    for backend in ("auto", "torch"):
        with ps.backend(backend):
            got = ps.devoxelize(x, points=points, voxel_size=1.0, mode="trilinear")
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12, err_msg=backend)
    idx, w = V.trilinear_weights(x, points, 1.0)
    t_idx, t_w = V._trilinear_torch(x, points, (1.0,) * 3, None)
    assert torch.equal(idx, t_idx) and torch.equal(w, t_w)


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_path_end_to_end_equals_core(reduce, dtype, monkeypatch):
    """voxelize -> devoxelize (nearest, trilinear, stride 2) -> gradients, once
    through the core and once through the torch path non-CPU tensors take."""
    points, feats, batch = cloud(3000, seed=13, dtype=dtype, batches=3)
    feats.requires_grad_()
    vs = (0.2, 0.3, 0.25)
    results = []
    for use_torch in (False, True):
        with _ext.torch_path() if use_torch else contextlib.nullcontext():
            if use_torch:
                monkeypatch.setattr(_ext, "core", None)  # any core call would fail
            x, inverse = ps.voxelize(points, feats, voxel_size=vs, batch=batch, reduce=reduce)
            near = ps.devoxelize(x, inverse)
            tri = ps.devoxelize(x, points=points, voxel_size=vs, batch=batch, mode="trilinear")
            tri2 = ps.devoxelize(coarsen(x, 2), points=points, voxel_size=vs, batch=batch, mode="trilinear")
            # one gradient per term: the engine may sum several terms in another order
            grads = [torch.autograd.grad(loss, feats, retain_graph=True)[0]
                     for loss in (near.sum(), tri.square().sum(), tri2.sum())]
        results.append((x.coords, x.feats, inverse, near, tri, tri2, *grads))
    monkeypatch.undo()
    for i, (a, b) in enumerate(zip(*results)):
        if i >= 7:  # the trilinear gradients: the core's transposed product sums each voxel's terms in point order,
            # torch's autograd corner by corner (test_trilinear_devoxelize_gradient_on_the_core_is_the_transposed_sum)
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=(1e-13 if dtype == torch.float64 else 4e-6)
                                       * float(b.abs().max()))
            continue
        assert a.dtype == b.dtype and torch.equal(a, b), (i, (a.double() - b.double()).abs().max())


# --- devoxelize ---------------------------------------------------------------

def coarsen(x: ps.SparseTensor, stride) -> ps.SparseTensor:
    """The stride-s tensor of x: coords floor(c / s) * s, feats averaged."""
    s = torch.tensor(ps.tensor.as_triple(stride, "stride"))
    coords = x.coords.clone()
    coords[:, 1:] = torch.div(coords[:, 1:], s, rounding_mode="floor") * s
    layout = C.KeyLayout.of(coords)
    uniq, inverse, perm, seg_ptr = C.unique(C.pack(coords, layout))
    feats = torch.zeros(len(uniq), x.feats.shape[1], dtype=x.dtype).index_add_(0, inverse, x.feats)
    return ps.SparseTensor(feats, C.unpack(uniq, layout), tuple(int(v) for v in s))


def test_devoxelize_nearest():
    points, feats, batch = cloud(500, seed=7, batches=2)
    x, inverse = ps.voxelize(points, feats, voxel_size=0.3, batch=batch)
    out = ps.devoxelize(x, inverse)
    assert torch.equal(out, x.feats[inverse])
    x, inverse = ps.voxelize(points[:30], feats[:30, :2], voxel_size=0.8, batch=batch[:30])
    f = x.feats.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ps.devoxelize(x.with_feats(t), inverse), (f,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2, (2, 1, 4)])
@pytest.mark.parametrize("voxel_size", [0.3, (0.2, 0.5, 0.35)])
def test_devoxelize_trilinear_matches_reference(dtype, stride, voxel_size):
    points, feats, batch = cloud(600, seed=8, dtype=dtype, batches=2)
    x, _ = ps.voxelize(points, feats, voxel_size=voxel_size, batch=batch)
    x = coarsen(x, stride)
    # the voxelised points plus points around and outside the cloud
    query = torch.cat([points, (torch.rand(200, 3, dtype=torch.float64) * 6 - 3).to(dtype)])
    qb = torch.cat([batch, torch.randint(0, 3, (200,))])
    out = ps.devoxelize(x, points=query, voxel_size=voxel_size, batch=qb, mode="trilinear")
    vs = (voxel_size,) * 3 if isinstance(voxel_size, float) else voxel_size
    want = trilinear_ref(query.numpy(), x.coords.numpy(), x.feats.numpy(), vs, x.stride, qb.numpy())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert out.dtype == dtype and out.shape == (len(query), feats.shape[1])
    np.testing.assert_allclose(out.numpy(), want, rtol=tol, atol=tol)
    assert bool((out[len(points):][qb[len(points):] == 2] == 0).all())  # batch 2 has no voxels


@pytest.mark.parametrize("stride", [1, (2, 1, 4)])
def test_trilinear_devoxelize_of_points_half_a_voxel_up_is_torchsparses_convention(stride):
    """TorchSparse's voxel_to_point (calc_ti_weights) anchors a voxel's
    value at its lower corner, where devoxelize anchors it at its centre;
    the README's recipe for a port (points + 0.5 * voxel_size * stride)
    gives TorchSparse's interpolation, checked against a loop written from
    its rule: corners floor(u / s) * s and + s, in voxel units u, weights
    1 - |u - corner| / s per axis, renormalised over the active corners."""
    points, feats, _ = cloud(300, seed=9, dtype=torch.float64, batches=1)
    vs = (0.3, 0.2, 0.25)
    x = coarsen(ps.voxelize(points, feats, voxel_size=vs)[0], stride)
    s = np.array(x.stride, float)
    sites = {tuple(c[1:]): r for r, c in enumerate(x.coords.tolist())}
    want = np.zeros((len(points), feats.shape[1]))
    for i, u in enumerate(points.numpy() / np.array(vs)):
        low = np.floor(u / s) * s
        total, acc = 0.0, 0.0
        for corner in np.ndindex(2, 2, 2):
            at = low + np.array(corner) * s
            row = sites.get(tuple(int(v) for v in at))
            if row is not None:
                w = float(np.prod(1 - np.abs(u - at) / s))
                total, acc = total + w, acc + w * x.feats[row].numpy()
        want[i] = acc / total if total > 0 else 0
    shift = 0.5 * torch.tensor(vs, dtype=points.dtype) * torch.tensor(x.stride, dtype=points.dtype)
    got = ps.devoxelize(x, points=points + shift, voxel_size=vs, mode="trilinear")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    assert not np.allclose(ps.devoxelize(x, points=points, voxel_size=vs, mode="trilinear").numpy(), want, atol=1e-3)


@pytest.mark.parametrize("stride", [(1, 1, 1), (1, 2, 3)])
def test_trilinear_core_finds_every_corner_of_a_half_filled_grid(stride):
    """The core searches a point's corners two by two along z (the second
    key within st[2] places of the first's search) and four columns side by
    side: on a grid where about half the voxels are active, in two batch
    items, every corner pattern comes up, and the rows and weights are the
    brute-force reference's (and the torch twin's) for points inside,
    on the edges of and outside the grid."""
    g = torch.Generator().manual_seed(70)
    s = torch.tensor(stride)
    cells = torch.stack(torch.meshgrid(*[torch.arange(-3, 4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.cat([torch.full((len(cells), 1), b), cells * s], 1) for b in (0, 1)])
    coords = coords[torch.rand(len(coords), generator=g) < 0.5].to(torch.int32)
    x = ps.SparseTensor(torch.randn(len(coords), 3, generator=g, dtype=torch.float64), coords, stride)
    points = (torch.rand(3000, 3, generator=g, dtype=torch.float64) * 10 - 5) * s
    batch = torch.randint(0, 3, (3000,), generator=g)  # (item 2 holds no voxel)
    got = ps.devoxelize(x, points=points, voxel_size=1.0, batch=batch, mode="trilinear")
    want = trilinear_ref(points.numpy(), coords.numpy(), x.feats.numpy(), (1.0,) * 3, stride, batch.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    idx, w = V.trilinear_weights(x, points, 1.0, batch)
    t_idx, t_w = V._trilinear_torch(x, points, (1.0,) * 3, batch)
    assert torch.equal(idx, t_idx) and torch.equal(w, t_w)
    found = (idx >= 0).sum(1)
    assert set(found.tolist()) == set(range(9))  # (every count of active corners, 0 to 8)
    pairs = (idx[:, 0::2] >= 0) * 2 + (idx[:, 1::2] >= 0)  # each column's pattern along z
    assert set(pairs.reshape(-1).tolist()) == {0, 1, 2, 3}


def test_devoxelize_trilinear_weights_sum_to_one_and_hit_own_voxel():
    points, feats, _ = cloud(300, seed=9)
    x, inverse = ps.voxelize(points, feats, voxel_size=0.4)
    idx, w = V.trilinear_weights(x, points, 0.4)
    assert torch.allclose(w.sum(1), torch.ones(len(points)))
    own = (idx == inverse[:, None]) & (w > 0)
    assert bool(own.any(1).all())  # each point's own voxel is among its active corners


def test_devoxelize_trilinear_exact_at_voxel_centres():
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 4, 4, 4]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [3.0], [7.0]], dtype=torch.float64)
    x = ps.SparseTensor(feats, coords)
    centres = (coords[:, 1:].double() + 0.5) * 0.5
    mid = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)  # halfway between voxels 0 and 1
    out = ps.devoxelize(x, points=torch.cat([centres, mid]), voxel_size=0.5, mode="trilinear")
    assert out[:, 0].tolist() == [1.0, 3.0, 7.0, 2.0]


def test_devoxelize_refuses_what_its_mode_would_ignore():
    """Nearest mode reads ``inverse`` alone, trilinear mode ``points``,
    ``voxel_size`` and ``batch``: the others given are a ValueError naming
    them and the mode, where ``devoxelize(x, inverse, points=p,
    voxel_size=0.4)`` (mode left at its default) silently gave the nearest
    voxel's features instead of the interpolation the arguments asked for."""
    points, feats, batch = cloud(300, seed=9, batches=2)
    x, inverse = ps.voxelize(points, feats, voxel_size=0.4, batch=batch)
    with pytest.raises(ValueError, match=r"mode='nearest'.* points, voxel_size .*mode='trilinear'"):
        ps.devoxelize(x, inverse, points=points, voxel_size=0.4)
    with pytest.raises(ValueError, match=r"mode='nearest'.* batch "):
        ps.devoxelize(x, inverse, batch=batch)
    with pytest.raises(ValueError, match=r"mode='trilinear'.* inverse "):
        ps.devoxelize(x, inverse, points=points, voxel_size=0.4, batch=batch, mode="trilinear")
    assert torch.equal(ps.devoxelize(x, inverse), x.feats[inverse])
    assert ps.devoxelize(x, points=points, voxel_size=0.4, batch=batch, mode="trilinear").shape == feats.shape


@pytest.mark.parametrize("stride", [1, 2])
def test_devoxelize_trilinear_gradcheck(stride):
    points, feats, batch = cloud(16, seed=10, dtype=torch.float64, batches=2, scale=1.0)
    feats = feats[:, :2]
    x, _ = ps.voxelize(points, feats, voxel_size=0.5, batch=batch)
    x = coarsen(x, stride)
    f = x.feats.clone().requires_grad_()

    def fn(t):
        return ps.devoxelize(x.with_feats(t), points=points, voxel_size=0.5, batch=batch, mode="trilinear")

    assert torch.autograd.gradcheck(fn, (f,))


def test_trilinear_devoxelize_gives_points_a_gradient_on_the_core_as_on_the_torch_path(monkeypatch):
    """On the CPU the core's trilinear weights are numbers without a history:
    points that required grad got none from devoxelize(mode="trilinear")
    (their grad stayed None) where the torch path, on any other device,
    gives them one. Points that require grad now take the torch twin's
    weights: float64 gradcheck in points and feats together (the points
    inside their cells, away from the planes of voxel centres where the 8
    corners change), the gradients of the torch path bit for bit, the
    forward the core path's bits; points without grad, or under no_grad,
    still get the core's weights. A forward-mode tangent of the points
    (forward_ad, torch.func.jvp) and torch.func.grad in them: the torch
    path's too (the core's weights dropped the tangent, a silent zero)."""
    points, _, batch = cloud(200, seed=16, dtype=torch.float64, batches=2, scale=1.0)
    x, _ = ps.voxelize(points, torch.randn(len(points), 3, dtype=torch.float64), voxel_size=0.25, batch=batch)
    # each query in the corner cell of one of the cloud's points (so an active corner), its fraction in [0.2, 0.8]
    g = torch.Generator().manual_seed(4)
    cell = torch.floor(points[:24] / 0.25 - 0.5)
    query = (cell + 0.5 + 0.2 + 0.6 * torch.rand(24, 3, generator=g, dtype=torch.float64)) * 0.25
    qb = batch[:24]

    def run(feats, pts):
        return ps.devoxelize(x.with_feats(feats), points=pts, voxel_size=0.25, batch=qb, mode="trilinear")

    def grads():
        feats = x.feats.detach().clone().requires_grad_(True)
        pts = query.clone().requires_grad_(True)
        out = run(feats, pts)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape))
        return out.detach(), pts.grad, feats.grad

    out, points_grad, feats_grad = grads()
    assert points_grad is not None and bool(points_grad.abs().sum() > 0)
    with ps.backend("torch"):
        want = grads()
    assert torch.equal(points_grad, want[1]) and torch.equal(feats_grad, want[2])
    with torch.no_grad():
        assert torch.equal(out, run(x.feats, query)) and torch.equal(out, want[0])
    calls = []
    neighbors = _ext.core.trilinear_neighbors
    monkeypatch.setattr(_ext.core, "trilinear_neighbors", lambda *a: calls.append(a) or neighbors(*a))
    leaf = query.clone().requires_grad_(True)
    with torch.no_grad():
        run(x.feats, leaf)
    run(x.feats.clone().requires_grad_(True), query)
    assert len(calls) == 2
    run(x.feats, leaf)
    assert len(calls) == 2
    feats = x.feats.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(run, (feats, query.clone().requires_grad_(True)))
    # the points' forward-mode tangent (the core's weights dropped it too) and torch.func.grad (a zero gradient)
    from torch.autograd import forward_ad

    tangent = torch.randn(query.shape, dtype=torch.float64, generator=g)

    def transformed():
        with forward_ad.dual_level():
            dual = forward_ad.unpack_dual(run(x.feats, forward_ad.make_dual(query, tangent))).tangent
        return (dual, torch.func.jvp(lambda p: run(x.feats, p), (query,), (tangent,))[1],
                torch.func.grad(lambda p: run(x.feats, p).pow(2).sum())(query))

    got = transformed()
    with ps.backend("torch"):
        want = transformed()
    assert all(a is not None and torch.equal(a, b) for a, b in zip(got, want))
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-12)
    assert bool(got[0].abs().sum() > 0) and bool(got[2].abs().sum() > 0)


# --- empty and single-point inputs ---------------------------------------------

@pytest.mark.parametrize("reduce", REDUCES)
def test_voxelize_empty_and_single(reduce):
    x, inverse = ps.voxelize(torch.zeros(0, 3), torch.zeros(0, 4), voxel_size=0.1, reduce=reduce)
    assert len(x) == 0 and x.feats.shape == (0, 4) and x.coords.shape == (0, 4) and inverse.shape == (0,)
    assert ps.devoxelize(x, inverse).shape == (0, 4)
    out = ps.devoxelize(x, points=torch.rand(3, 3), voxel_size=0.1, mode="trilinear")
    assert torch.equal(out, torch.zeros(3, 4))
    f = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    x, inverse = ps.voxelize(torch.tensor([[-0.25, 0.0, 3.0]]), f, voxel_size=0.5, reduce=reduce)
    assert x.coords.tolist() == [[0, -1, 0, 6]] and inverse.tolist() == [0]
    assert torch.equal(x.feats, f)
    x.feats.sum().backward()
    assert torch.equal(f.grad, torch.ones(1, 2, dtype=torch.float64))
    out = ps.devoxelize(x, points=torch.zeros(0, 3), voxel_size=0.5, mode="trilinear")
    assert out.shape == (0, 2)


def test_devoxelize_trilinear_empty_tensor_keeps_the_graph():
    f = torch.zeros(0, 3, requires_grad=True)
    x = ps.SparseTensor(f, torch.zeros(0, 4, dtype=torch.int32))
    out = ps.devoxelize(x, points=torch.rand(5, 3), voxel_size=1.0, mode="trilinear")
    assert torch.equal(out, torch.zeros(5, 3))
    out.sum().backward()
    assert f.grad.shape == (0, 3)


def test_one_and_two_threads_bit_identical(monkeypatch):
    points, feats, batch = cloud(60000, seed=12, batches=3, scale=8.0)
    results = []
    before = torch.get_num_threads()
    try:
        for nt in (1, 2):
            monkeypatch.setenv("POINTSPARSE_NUM_THREADS", str(nt))
            torch.set_num_threads(nt)
            row = []
            for reduce in REDUCES:
                x, inverse = ps.voxelize(points, feats, voxel_size=0.1, batch=batch, reduce=reduce)
                row += [x.coords, x.feats, inverse]
            row += list(V.trilinear_weights(x, points, 0.1, batch))
            results.append(row)
    finally:
        torch.set_num_threads(before)
    assert len(results[0][0]) > 16384  # the radix sort goes parallel
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_devoxelize_gradients_are_deterministic(monkeypatch):
    """Gradients through devoxelize sum each voxel's contributions in a fixed
    order: equal bit for bit across runs and thread counts."""
    points, feats, batch = cloud(60000, seed=14, batches=2, scale=6.0)
    x, inverse = ps.voxelize(points, feats, voxel_size=0.2, batch=batch)
    grads = []
    before = torch.get_num_threads()
    try:
        for nt in (2, 2, 1):
            monkeypatch.setenv("POINTSPARSE_NUM_THREADS", str(nt))
            torch.set_num_threads(nt)
            f = x.feats.clone().requires_grad_()
            y = x.with_feats(f)
            w = torch.linspace(-1, 1, len(points))[:, None]
            for out in (ps.devoxelize(y, inverse),
                        ps.devoxelize(y, points=points, voxel_size=0.2, batch=batch, mode="trilinear")):
                grads.append(torch.autograd.grad((out * w).sum(), f)[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[0], grads[4])
    assert torch.equal(grads[1], grads[3]) and torch.equal(grads[1], grads[5])


# --- bad input: each case in its own process (a crash fails the case) -------------

# The setup runs before the forks, so it must not enter an OpenMP region (a
# forked child of a process with a running OpenMP pool can deadlock): cases
# that need a voxelised tensor build it themselves.
SETUP = (
    "import math, numpy as np, torch, pointsparse as ps\n"
    "p = torch.rand(10, 3)\n"
)
VOX = "x, inv = ps.voxelize(p, voxel_size=0.5); "
BAD = {
    # name: (code, exception types, words the message must hold)
    "points_nan": ("ps.voxelize(torch.tensor([[0.0, float('nan'), 0.0]]), voxel_size=1)", "ValueError", "points"),
    "points_inf": ("ps.voxelize(torch.tensor([[0.0, 0.0, -float('inf')]]), voxel_size=1)", "ValueError", "points"),
    "points_int": ("ps.voxelize(torch.zeros(3, 3, dtype=torch.int32), voxel_size=1)", "TypeError", "points"),
    "points_shape": ("ps.voxelize(torch.zeros(3, 2), voxel_size=1)", "ValueError", "points"),
    "points_1d": ("ps.voxelize(torch.zeros(3), voxel_size=1)", "ValueError", "points"),
    "points_numpy_objects": ("ps.voxelize(np.zeros((3, 3)).astype(object), voxel_size=1)", "TypeError", "points"),
    "points_numpy_ints": ("ps.voxelize(np.zeros((3, 3), np.int64), voxel_size=1)", "TypeError", "points"),
    "points_out_of_range": ("ps.voxelize(p * 1e10, voxel_size=1)", "ValueError", "voxel_size"),
    "points_span_too_wide": ("ps.voxelize(torch.tensor([[-2e9, -2e9, -2e9], [2e9, 2e9, 2e9]]), voxel_size=1)",
                             "ValueError", "span"),
    "voxel_size_zero": ("ps.voxelize(p, voxel_size=0)", "ValueError", "voxel_size"),
    "voxel_size_negative": ("ps.voxelize(p, voxel_size=(0.1, -0.1, 0.1))", "ValueError", "voxel_size"),
    "voxel_size_nan": ("ps.voxelize(p, voxel_size=float('nan'))", "ValueError", "voxel_size"),
    "voxel_size_inf": ("ps.voxelize(p, voxel_size=math.inf)", "ValueError", "voxel_size"),
    "voxel_size_two": ("ps.voxelize(p, voxel_size=(0.1, 0.1))", "ValueError", "voxel_size"),
    "voxel_size_string": ("ps.voxelize(p, voxel_size='0.1')", "TypeError", "voxel_size"),
    "voxel_size_none": ("ps.voxelize(p, voxel_size=None)", "TypeError", "voxel_size"),
    "reduce_unknown": ("ps.voxelize(p, voxel_size=1, reduce='median')", "ValueError", "reduce"),
    "reduce_not_str": ("ps.voxelize(p, voxel_size=1, reduce=2)", "ValueError", "reduce"),
    "feats_rows": ("ps.voxelize(p, torch.zeros(9, 2), voxel_size=1)", "ValueError", "feats"),
    "feats_int": ("ps.voxelize(p, torch.zeros(10, 2, dtype=torch.long), voxel_size=1)", "TypeError", "feats"),
    "feats_1d": ("ps.voxelize(p, torch.zeros(10), voxel_size=1)", "ValueError", "feats"),
    # float8 passed the floating-point checks and failed inside torch ("Promotion for Float8 Types is not
    # supported", '"aminmax_cpu" not implemented'): a SparseTensor holds no float8 feats
    "feats_float8": ("ps.voxelize(p, torch.zeros(10, 2).to(torch.float8_e4m3fn), voxel_size=1)", "TypeError",
                     "feats"),
    "points_float8": ("ps.voxelize(p.to(torch.float8_e5m2), p, voxel_size=1)", "TypeError", "points"),
    "devox_tri_points_float8": (VOX + "ps.devoxelize(x, points=p.to(torch.float8_e5m2), voxel_size=0.5, "
                                "mode='trilinear')", "TypeError", "points"),
    "batch_length": ("ps.voxelize(p, voxel_size=1, batch=torch.zeros(9, dtype=torch.long))", "ValueError", "batch"),
    "batch_negative": ("ps.voxelize(p, voxel_size=1, batch=torch.full((10,), -1))", "ValueError", "batch"),
    "batch_too_big": ("ps.voxelize(p, voxel_size=1, batch=torch.full((10,), 2**31))", "ValueError", "batch"),
    "batch_float": ("ps.voxelize(p, voxel_size=1, batch=torch.zeros(10))", "TypeError", "batch"),
    "batch_2d": ("ps.voxelize(p, voxel_size=1, batch=torch.zeros(10, 1, dtype=torch.long))", "ValueError", "batch"),
    "devox_mode": (VOX + "ps.devoxelize(x, inv, mode='cubic')", "ValueError", "mode"),
    "devox_inverse_missing": (VOX + "ps.devoxelize(x)", "TypeError", "inverse"),
    "devox_inverse_bool": (VOX + "ps.devoxelize(x, inv == 0)", "TypeError", "bool mask is no row map"),
    "devox_inverse_range": (VOX + "ps.devoxelize(x, inv + 100)", "ValueError", "inverse"),
    "devox_inverse_negative": (VOX + "ps.devoxelize(x, inv - 100)", "ValueError", "inverse"),
    "devox_tensor": (VOX + "ps.devoxelize(x.feats, inv)", "TypeError", "tensor"),
    "devox_tri_no_points": (VOX + "ps.devoxelize(x, mode='trilinear', voxel_size=0.5)", "ValueError", "points"),
    "devox_tri_points_nan": (VOX + "ps.devoxelize(x, points=torch.full((2, 3), float('nan')), voxel_size=0.5, "
                             "mode='trilinear')", "ValueError", "points"),
    "devox_tri_voxel_size": (VOX + "ps.devoxelize(x, points=p, voxel_size=-1.0, mode='trilinear')", "ValueError",
                             "voxel_size"),
    "devox_tri_batch": (VOX + "ps.devoxelize(x, points=p, voxel_size=0.5, batch=torch.zeros(3, dtype=torch.long), "
                        "mode='trilinear')", "ValueError", "batch"),
}

RAW = {
    "quantize_strings": ("core.quantize(np.array([['a', 'b', 'c']]), [1.0] * 3, None, 2)", "ValueError", "points"),
    "quantize_shape": ("core.quantize(np.zeros((4, 2)), [1.0] * 3, None, 2)", "ValueError", "points"),
    "quantize_nan": ("core.quantize(np.full((2, 3), np.nan), [1.0] * 3, None, 2)", "ValueError", "points"),
    "quantize_voxel_size": ("core.quantize(np.zeros((2, 3)), [1.0, 0.0, 1.0], None, 2)", "ValueError", "voxel_size"),
    "quantize_voxel_size_len": ("core.quantize(np.zeros((2, 3)), [1.0], None, 2)", "ValueError", "voxel_size"),
    "quantize_batch_len": ("core.quantize(np.zeros((2, 3)), [1.0] * 3, np.zeros(5, np.int64), 2)", "ValueError",
                           "batch"),
    "quantize_batch_negative": ("core.quantize(np.zeros((2, 3)), [1.0] * 3, np.array([0, -1]), 2)", "ValueError",
                                "batch"),
    "quantize_batch_strings": ("core.quantize(np.zeros((1, 3)), [1.0] * 3, np.array(['a']), 2)", "ValueError",
                               "batch"),
    "quantize_batch_object": ("core.quantize(np.zeros((1, 3)), [1.0] * 3, {}, 2)", "ValueError", "batch"),
    "reduce_perm_range": ("core.segment_reduce(np.zeros((3, 2)), np.array([0, 7, 1]), np.array([0, 3]), 0, 2)",
                          "ValueError", "perm"),
    "reduce_perm_negative": ("core.segment_reduce(np.zeros((3, 2)), np.array([0, -1, 1]), np.array([0, 3]), 2, 2)",
                             "ValueError", "perm"),
    "reduce_perm_length": ("core.segment_reduce(np.zeros((3, 2)), np.array([0, 1]), np.array([0, 3]), 0, 2)",
                           "ValueError", "perm"),
    "reduce_seg_not_increasing": ("core.segment_reduce(np.zeros((3, 2)), np.arange(3), np.array([0, 2, 1, 3]), 1, 2)",
                                  "ValueError", "seg_ptr"),
    "reduce_seg_repeated": ("core.segment_reduce(np.zeros((3, 2)), np.arange(3), np.array([0, 2, 2, 3]), 3, 2)",
                            "ValueError", "seg_ptr"),
    "reduce_seg_end": ("core.segment_reduce(np.zeros((3, 2)), np.arange(3), np.array([0, 2, 9]), 0, 2)",
                       "ValueError", "seg_ptr"),
    "reduce_seg_start": ("core.segment_reduce(np.zeros((3, 2)), np.arange(3), np.array([-4, 3]), 0, 2)",
                         "ValueError", "seg_ptr"),
    "reduce_seg_empty": ("core.segment_reduce(np.zeros((3, 2)), np.arange(3), np.array([], np.int64), 0, 2)",
                         "ValueError", "seg_ptr"),
    "reduce_mode": ("core.segment_reduce(np.zeros((3, 2)), np.arange(3), np.array([0, 3]), 4, 2)",
                    "ValueError", "mode"),
    "reduce_feats_int": ("core.segment_reduce(np.zeros((3, 2), np.int32), np.arange(3), np.array([0, 3]), 0, 2)",
                         "ValueError", "feats"),
    "reduce_feats_1d": ("core.segment_reduce(np.zeros(3), np.arange(3), np.array([0, 3]), 0, 2)",
                        "ValueError", "feats"),
    "trilinear_rows": ("core.trilinear_neighbors(np.zeros((1, 3)), None, [1.0] * 3, [1, 1, 1], LAY, np.array([5]), "
                       "np.array([3]), 1, 2)", "ValueError", "sorted_rows"),
    "trilinear_rows_length": ("core.trilinear_neighbors(np.zeros((1, 3)), None, [1.0] * 3, [1, 1, 1], LAY, "
                              "np.array([5, 6]), np.array([0]), 2, 2)", "ValueError", "sorted_rows"),
    "trilinear_stride": ("core.trilinear_neighbors(np.zeros((1, 3)), None, [1.0] * 3, [1, 0, 1], LAY, np.array([5]), "
                         "np.array([0]), 1, 2)", "ValueError", "stride"),
    "trilinear_strings": ("core.trilinear_neighbors(np.array([['a', 'b', 'c']]), None, [1.0] * 3, [1, 1, 1], "
                          "LAY, np.array([5]), np.array([0]), 1, 2)", "ValueError", "points"),
    "trilinear_batch": ("core.trilinear_neighbors(np.zeros((2, 3)), np.array([0, 2**31]), [1.0] * 3, [1, 1, 1], "
                        "LAY, np.array([5]), np.array([0]), 1, 2)", "ValueError", "batch"),
    "trilinear_layout_bits": ("core.trilinear_neighbors(np.zeros((1, 3)), None, [1.0] * 3, [1, 1, 1], "
                              "[0, 0, 0, 20, 20, 20, 20], np.array([5]), np.array([0]), 1, 2)", "ValueError", "layout"),
    "trilinear_layout_len": ("core.trilinear_neighbors(np.zeros((1, 3)), None, [1.0] * 3, [1, 1, 1], "
                             "[0, 0, 0], np.array([5]), np.array([0]), 1, 2)", "ValueError", "layout"),
    "trilinear_keys_unsorted": ("core.trilinear_neighbors(np.zeros((1, 3)), None, [1.0] * 3, [1, 1, 1], LAY, "
                                "np.array([5, 0]), np.array([0, 1]), 2, 2)", "ValueError", "sorted_keys"),
    "trilinear_keys_2d": ("core.trilinear_neighbors(np.zeros((1, 3)), None, [1.0] * 3, [1, 1, 1], "
                          "LAY, np.zeros((1, 1), np.int64), np.array([0]), 1, 2)", "ValueError", "sorted_keys"),
}


@pytest.fixture(scope="module")
def bad_results():
    return run_in_children({k: v[0] for k, v in BAD.items()}, setup=SETUP)


@pytest.fixture(scope="module")
def raw_results():
    return run_in_children({k: v[0] for k, v in RAW.items()},
                           setup=CORE_ONLY + "import numpy as np\nLAY = [0, 0, 0, 1, 8, 8, 8]\n")


def check_child(result, exc, word, name):
    assert result["status"] == 0, f"{name} crashed the process (status {result['status']})"
    assert result["exc"] == exc, f"{name}: expected {exc}, got {result['exc']}: {result['msg']}"
    assert word in result["msg"], f"{name}: the message must name {word!r}: {result['msg']}"


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input(bad_results, name):
    code, exc, word = BAD[name]
    check_child(bad_results[name], exc, word, name)


@pytest.mark.parametrize("name", sorted(RAW))
def test_raw_core_bad_arrays(raw_results, name):
    code, exc, word = RAW[name]
    check_child(raw_results[name], exc, word, name)


@pytest.mark.parametrize("size", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(1, dtype=torch.int64) * 0.5,
                                  [np.float32(0.5)] * 3, torch.tensor([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])])
def test_numpy_and_torch_scalars_are_numbers(size):
    points = torch.rand(300, 3, generator=torch.Generator().manual_seed(0)) * 4
    x, inverse = ps.voxelize(points, voxel_size=size)
    ref, ref_inverse = ps.voxelize(points, voxel_size=0.5)
    assert torch.equal(x.coords, ref.coords) and torch.equal(inverse, ref_inverse)


@pytest.mark.parametrize("reduce", ["max", "mean", "sum", "first"])
def test_non_finite_feats_propagate_alike_on_both_paths(reduce):
    points = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [0.3, 0.3, 0.3], [5.0, 5.0, 5.0], [5.1, 5.1, 5.1]])
    for order in ([0, 1, 2, 3, 4], [2, 1, 0, 4, 3], [1, 2, 0, 3, 4]):  # NaN first, middle or last in its voxel
        feats = torch.tensor([[1.0, float("nan")], [float("nan"), 2.0], [3.0, float("inf")], [4.0, -1.0],
                              [float("-inf"), 7.0]], dtype=torch.float64)
        p, f = points[order], feats[order].clone().requires_grad_()
        core, _ = ps.voxelize(p, f, voxel_size=1.0, reduce=reduce)
        core.feats.sum().backward()
        f2 = feats[order].clone().requires_grad_()
        with _ext.torch_path():
            ref, _ = ps.voxelize(p, f2, voxel_size=1.0, reduce=reduce)
            ref.feats.sum().backward()
        torch.testing.assert_close(core.feats, ref.feats, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(f.grad, f2.grad, equal_nan=True, rtol=0, atol=0)
        if reduce == "max":  # a NaN anywhere in a voxel's channel gives NaN there
            assert torch.isnan(core.feats[0]).all()
            assert core.feats[1].tolist() == [4.0, 7.0]

# --- points anywhere in int32 voxel coordinates (adaptive keys) ----------------

FAR = {  # shift of the points in voxels (multiples of 4, the coarsest stride below)
    "x_100000": (100000, 0, 0),
    "int32_min": (-(2**31), -(2**31), -(2**31)),
    "int32_max": (2**31 - 64, 2**31 - 64, 2**31 - 64),
    "both_ends": (2**31 - 64, -(2**31), 12),
}


@pytest.mark.parametrize("far", sorted(FAR))
def test_far_clouds_voxelize_and_devoxelize_like_near_ones(far):
    g = torch.Generator().manual_seed(3)
    near = torch.randint(0, 40 * 64, (500, 3), generator=g).double() / 64  # exact under any shift
    batch = torch.randint(0, 3, (500,), generator=g)
    feats = torch.randn(500, 4, generator=g, dtype=torch.float64)
    shift = torch.tensor(FAR[far], dtype=torch.float64)
    points = near + shift
    x, inverse = ps.voxelize(points, feats, voxel_size=1.0, batch=batch)
    coords, out, inv = voxelize_ref(points.numpy(), feats.numpy(), (1.0,) * 3, batch.numpy(), "mean")
    assert np.array_equal(x.coords.numpy(), coords) and np.array_equal(inverse.numpy(), inv)
    assert np.array_equal(x.feats.detach().numpy(), out)
    with _ext.torch_path():
        xt, inverse_t = ps.voxelize(points, feats, voxel_size=1.0, batch=batch)
    assert torch.equal(xt.coords, x.coords) and torch.equal(inverse_t, inverse) and torch.equal(xt.feats, x.feats)
    x_near, _ = ps.voxelize(near, feats, voxel_size=1.0, batch=batch)
    assert torch.equal(x.coords[:, 1:].long(), x_near.coords[:, 1:].long() + shift.long())
    for stride in (1, 2, (1, 2, 4)):
        far_t, near_t = coarsen(x, stride), coarsen(x_near, stride)
        got = ps.devoxelize(far_t, points=points, voxel_size=1.0, batch=batch, mode="trilinear")
        want = ps.devoxelize(near_t, points=near, voxel_size=1.0, batch=batch, mode="trilinear")
        assert torch.equal(got, want)
        with _ext.torch_path():
            assert torch.equal(ps.devoxelize(far_t, points=points, voxel_size=1.0, batch=batch, mode="trilinear"), got)


def test_voxelize_span_over_63_bits_names_it():
    points = torch.tensor([[-2e9, -2e9, 0.0], [2e9, 2e9, 0.0]], dtype=torch.float64)
    for path in (False, True):
        with _ext.torch_path() if path else contextlib.nullcontext():
            with pytest.raises(ValueError, match=r"coordinates span batch \[0, 0\] \(0 bits\), x \[-2000000000, "):
                ps.voxelize(points, voxel_size=1.0)


def test_a_voxel_size_too_small_is_refused_before_anything_is_quantised(monkeypatch):
    """A tiny voxel_size quantised every point (the core or torch allocating
    the (N, 4) coords, keys, sort) before failing on the int32 or key range,
    and the key-range message named the coordinates' span, not voxel_size.
    The points' bounds alone decide it now, on every path and entry."""
    import re

    def quantised(*args, **kwargs):
        raise AssertionError("quantised")

    for name in ("voxelize", "quantize"):
        monkeypatch.setattr(_ext.core, name, quantised)
    monkeypatch.setattr(V, "_quantize_torch", quantised)
    points = torch.tensor([[0.5, -3.0, 2.0], [100.25, 40.0, 7.5], [20.0, 0.0, 2.0]], dtype=torch.float64)
    extent = re.escape("the points' extent (x, y, z from [0.5, -3, 2] to [100.25, 40, 7.5])")
    # (powers of two: every voxel exact)
    cases = [(2**-26, rf"voxel_size 1\.4901161193847656e-08 puts {extent} in voxels \[33554432, -201326592, "
                      r"134217728\] to \[6727663616, 2684354560, 503316480\]; voxel coordinates "
                      r"\(floor\(points / voxel_size\)\) must lie in the int32 range"),
             ((2**-20, 2**-20, 2**-17), rf"voxel_size \(9\.5367431640625e-07, 9\.5367431640625e-07, "
                                        rf"7\.62939453125e-06\) spreads {extent} over voxels \[524288, -3145728, "
                                        r"262144\] to \[105119744, 41943040, 983040\]: coordinates span batch "
                                        r"\[0, 0\] \(0 bits\), x \[524288, 105119744\] \(27 bits\).* 73 bits in all"),
             (5e-324, rf"voxel_size 5e-324 is too small for {extent}: points / voxel_size leaves float64")]
    for voxel_size, match in cases:
        for dtype in (torch.float64, torch.float32):
            for backend in ("auto", "torch"):
                with ps.backend(backend):
                    for call in (lambda: ps.voxelize(points.to(dtype), voxel_size=voxel_size),
                                 lambda: V.group_points(points.to(dtype), voxel_size),
                                 lambda: V.quantize_keys(points.to(dtype), voxel_size)):
                        with pytest.raises(ValueError, match=f"^{match}"):
                            call()
    fits = (2**-20, 2**-20, 2**-7)  # 27 + 26 + 10 bits: 63, the most a key holds
    with pytest.raises(ValueError, match=r"^voxel_size .* spreads .* batch \[0, 1\] \(1 bits\).* 64 bits in all"):
        ps.voxelize(points, voxel_size=fits, batch=torch.tensor([0, 1, 1]))  # (the batch count is in the key too)
    with pytest.raises(ValueError, match=r"points row 1 is not finite"):  # (non-finite rows: named, as before)
        ps.voxelize(torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]]), voxel_size=1e-9)
    monkeypatch.undo()
    x, inverse = ps.voxelize(points, voxel_size=fits)
    assert len(x) == 3 and x.coords[:, 1:].tolist()[0] == [524288, -3145728, 256]


# --- the one-call core entry (core.voxelize) ------------------------------------

@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("points_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("feats_dtype", DTYPES)
def test_core_voxelize_equals_the_torch_path(mode, points_dtype, feats_dtype):
    points, feats, batch = cloud(3000, seed=17, dtype=torch.float64, batches=3)
    points, feats = points.to(points_dtype), feats.to(feats_dtype)
    feats[::11, 2] = float("nan")
    feats[::7, 1] = feats[1::7, 1]  # ties for max
    p = V._points_np(points)
    coords, inverse, perm, seg_ptr, out, arg = (torch.from_numpy(a) for a in _ext.core.voxelize(
        p, feats.numpy(), [0.4, 0.3, 0.5], batch.numpy(), mode, 2))
    keys, layout = V._quantize_torch(torch.from_numpy(p), (0.4, 0.3, 0.5), batch)
    t_uniq, t_inverse, t_perm, t_seg = C.unique_torch(keys)
    t_out, t_arg = V._segment_reduce_torch(feats, t_inverse, t_perm, t_seg, mode)
    assert torch.equal(coords, C.unpack_torch(t_uniq, layout))
    for got, want in ((inverse, t_inverse), (perm, t_perm), (seg_ptr, t_seg)):
        assert torch.equal(got, want)
    torch.testing.assert_close(out, t_out, rtol=0, atol=0, equal_nan=True)
    if mode in (2, 3):
        assert torch.equal(arg, t_arg)
    else:
        assert arg.numel() == 0
    # with_arg=False (no gradient to route): the same voxels and reduced values, no source rows made
    *same, bare, no_arg = _ext.core.voxelize(p, feats.numpy(), [0.4, 0.3, 0.5], batch.numpy(), mode, 2,
                                             with_arg=False)
    for got, want in zip(same, (coords, inverse, perm, seg_ptr)):
        assert torch.equal(torch.from_numpy(got), want)
    torch.testing.assert_close(torch.from_numpy(bare), out, rtol=0, atol=0, equal_nan=True)
    assert no_arg.shape == (0,)


@pytest.mark.parametrize("reduce", ["max", "first", "mean"])
def test_voxelize_makes_no_source_rows_where_no_gradient_needs_them(reduce, monkeypatch):
    """voxelize under no_grad (or of feats that need no gradient) asks the
    core for no max / first source rows: an int64 (M, C), twice a float32
    output, kept until the tensor died. Its values are the gradient-taking
    call's; a call that needs a gradient still gets them (and its gradient
    is checked against the torch path's)."""
    points, feats, batch = cloud(2000, seed=5, dtype=torch.float64, batches=2)
    asked, core = [], _ext.core.voxelize
    monkeypatch.setattr(_ext.core, "voxelize", lambda *a, **k: asked.append(k.get("with_arg", True)) or core(*a, **k))
    with torch.no_grad():
        quiet, inverse = V.voxelize(points, feats, 0.3, batch=batch, reduce=reduce)
    plain = V.voxelize(points, feats, 0.3, batch=batch, reduce=reduce)[0]
    leaf = feats.clone().requires_grad_()
    taking = V.voxelize(points, leaf, 0.3, batch=batch, reduce=reduce)[0]
    assert asked == [False, False, True]
    for other in (plain, taking):
        assert torch.equal(quiet.coords, other.coords) and torch.equal(quiet.feats, other.feats.detach())
    grad = torch.randn_like(taking.feats)
    taking.feats.backward(grad)
    monkeypatch.setattr(V._ext, "serves", lambda *a, **k: False)  # (the torch path's gradient)
    ref_leaf = feats.clone().requires_grad_()
    ref = V.voxelize(points, ref_leaf, 0.3, batch=batch, reduce=reduce)[0]
    ref.feats.backward(grad)
    assert torch.equal(leaf.grad, ref_leaf.grad)


@pytest.mark.parametrize("n", [0, 1])
def test_core_voxelize_empty_and_single_point(n):
    points, feats = torch.full((n, 3), 0.7, dtype=torch.float64), torch.ones(n, 2, dtype=torch.float64)
    coords, inverse, perm, seg_ptr, out, arg = _ext.core.voxelize(points.numpy(), feats.numpy(), [1.0] * 3, None, 2, 1)
    assert coords.shape == (n, 4) and out.shape == (n, 2) and arg.shape == (n, 2)
    assert seg_ptr.tolist() == list(range(n + 1)) and inverse.tolist() == [0] * n and perm.tolist() == [0] * n


VOXELIZE_RAW = {
    "points_shape": ("core.voxelize(np.zeros((4, 2)), np.zeros((4, 1)), [1.0] * 3, None, 1, 2)", "points"),
    "points_strings": ("core.voxelize(np.array([['a', 'b', 'c']]), np.zeros((1, 1)), [1.0] * 3, None, 1, 2)",
                       "points"),
    "points_nan": ("core.voxelize(np.full((2, 3), np.nan), np.zeros((2, 1)), [1.0] * 3, None, 1, 2)", "points"),
    "points_outside_int32": ("core.voxelize(np.full((2, 3), 1e12), np.zeros((2, 1)), [1.0] * 3, None, 1, 2)",
                             "points"),
    "feats_rows": ("core.voxelize(np.zeros((4, 3)), np.zeros((5, 1)), [1.0] * 3, None, 1, 2)", "feats"),
    "feats_1d": ("core.voxelize(np.zeros((4, 3)), np.zeros(4), [1.0] * 3, None, 1, 2)", "feats"),
    "feats_int": ("core.voxelize(np.zeros((4, 3)), np.zeros((4, 1), np.int32), [1.0] * 3, None, 1, 2)", "feats"),
    "voxel_size_zero": ("core.voxelize(np.zeros((2, 3)), np.zeros((2, 1)), [1.0, 0.0, 1.0], None, 1, 2)",
                        "voxel_size"),
    "voxel_size_len": ("core.voxelize(np.zeros((2, 3)), np.zeros((2, 1)), [1.0], None, 1, 2)", "voxel_size"),
    "mode": ("core.voxelize(np.zeros((2, 3)), np.zeros((2, 1)), [1.0] * 3, None, 7, 2)", "mode"),
    "batch_len": ("core.voxelize(np.zeros((2, 3)), np.zeros((2, 1)), [1.0] * 3, np.zeros(5, np.int64), 1, 2)",
                  "batch"),
    "batch_negative": ("core.voxelize(np.zeros((2, 3)), np.zeros((2, 1)), [1.0] * 3, np.array([0, -1]), 1, 2)",
                       "batch"),
    "batch_strings": ("core.voxelize(np.zeros((1, 3)), np.zeros((1, 1)), [1.0] * 3, np.array(['a']), 1, 2)",
                      "batch"),
}


@pytest.fixture(scope="module")
def voxelize_raw_results():
    return run_in_children({k: v[0] for k, v in VOXELIZE_RAW.items()}, setup=CORE_ONLY + "import numpy as np\n")


@pytest.mark.parametrize("name", sorted(VOXELIZE_RAW))
def test_core_voxelize_bad_arrays_name_the_argument(voxelize_raw_results, name):
    check_child(voxelize_raw_results[name], "ValueError", VOXELIZE_RAW[name][1], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_points_are_refused_naming_the_row_on_every_path(dtype, bad):
    """The core's pass rejects a non-finite row itself (voxelize checks the
    values in Python only where the core does not run: other dtypes, the
    torch backend)."""
    points = torch.zeros(6, 3, dtype=dtype)
    points[4, 2] = bad
    for backend in ("auto", "torch"):
        with ps.backend(backend), pytest.raises(ValueError, match=r"points row 4"):
            ps.voxelize(points, voxel_size=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_half_precision_feats_sum_and_mean_accumulate_in_float32(dtype, backend):
    """float16 summed 2000 features of 100 into inf (its largest is 65504),
    so their mean was inf too, and bfloat16 rounded every partial sum; the
    gradient of a mean over more points than float16 counts was 0."""
    n = 70_000
    points = torch.zeros(n, 3)
    feats = torch.full((n, 2), 100.0, dtype=dtype)
    feats[:, 1] = torch.linspace(0, 1, n, dtype=torch.float64).to(dtype)
    wide = feats.double()
    with ps.backend(backend):
        for reduce, want in (("mean", wide.mean(0, keepdim=True)), ("sum", wide.sum(0, keepdim=True))):
            f = feats.clone().requires_grad_()
            x, _ = ps.voxelize(points, f, voxel_size=1.0, reduce=reduce)
            assert x.feats.dtype == dtype
            # (within the rounding of the result to its dtype; float16's sum of the 100s is inf)
            torch.testing.assert_close(x.feats, want.to(dtype), rtol=2 ** -7, atol=0, msg=reduce)
            x.feats.sum().backward()
            grad = torch.tensor(1.0 / n if reduce == "mean" else 1.0).to(dtype)
            assert torch.equal(f.grad, torch.full_like(f, grad)), (reduce, f.grad[:2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_half_precision_trilinear_devoxelize_rounds_once(dtype, backend):
    """float16 / bfloat16 feats are interpolated in float32 and the result
    rounded once: the weights were rounded to the feats' dtype and the 8
    products summed in it, so a constant field of 7 came back as 6.96875 or
    7.03125 in bfloat16 between voxels, and a fifth of the points were off
    the float32 interpolation rounded by up to 2 units in the last place.
    The gradient reaches the feats in their dtype."""
    points, feats, batch = cloud(3000, seed=21, batches=2, scale=6.0)
    query = torch.rand(4000, 3) * 12 - 6
    qb = torch.randint(0, 2, (4000,))
    with ps.backend(backend):
        x, _ = ps.voxelize(points, feats * 3 + 10, voxel_size=0.5, batch=batch)
        low = x.with_feats(x.feats.to(dtype).requires_grad_())
        out = ps.devoxelize(low, points=query, voxel_size=0.5, batch=qb, mode="trilinear")
        wide = ps.devoxelize(low.with_feats(low.feats.float()), points=query, voxel_size=0.5, batch=qb,
                             mode="trilinear")
        assert out.dtype == dtype and torch.equal(out, wide.to(dtype))
        seven = ps.devoxelize(low.with_feats(torch.full_like(low.feats, 7.0)), points=query, voxel_size=0.5,
                              batch=qb, mode="trilinear")
        active = (seven != 0).any(1)
        assert bool(active.sum() > 1000) and bool((seven[active] == 7).all())
        out.float().sum().backward()
        assert low.feats.grad.dtype == dtype and bool((low.feats.grad > 0).any())


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_unsigned_batch_and_inverse_are_integers_like_the_others(dtype, backend):
    """uint16/32/64 batch indices or inverse maps (torch.from_numpy of numpy's
    unsigned arrays) were NotImplementedError "min_all" from the range check;
    a uint64 past int64 is out of range, named."""
    points, feats, batch = cloud(300, seed=3, batches=3)
    with ps.backend(backend):
        x, inverse = ps.voxelize(points, feats, voxel_size=0.5, batch=batch)
        y, u_inverse = ps.voxelize(points, feats, voxel_size=0.5, batch=batch.to(dtype))
        assert torch.equal(x.coords, y.coords) and torch.equal(x.feats, y.feats) and torch.equal(inverse, u_inverse)
        assert torch.equal(ps.devoxelize(x, inverse.to(dtype)), ps.devoxelize(x, inverse))
        tri = ps.devoxelize(x, points=points, voxel_size=0.5, batch=batch, mode="trilinear")
        assert torch.equal(ps.devoxelize(x, points=points, voxel_size=0.5, batch=batch.to(dtype), mode="trilinear"),
                           tri)
        if dtype == torch.uint64:
            far = torch.full((300,), 2**63, dtype=dtype)
            with pytest.raises(ValueError, match="batch indices must lie in"):
                ps.voxelize(points, feats, voxel_size=0.5, batch=far)
            with pytest.raises(ValueError, match="inverse holds rows outside"):
                ps.devoxelize(x, far)


@pytest.mark.parametrize("dtype", [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
                                   if d is not None])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_float8_points_and_feats_are_refused_naming_them(dtype, backend):
    """float8 passed the floating-point checks: float8 feats were torch's
    "Promotion for Float8 Types is not supported" (mean, sum) or
    NotImplementedError (max), and reduce="first" returned a SparseTensor of
    float8 feats, which SparseTensor refuses; float8 points were
    NotImplementedError "aminmax_cpu" from the extent check."""
    points, feats, _ = cloud(40, seed=5)
    with ps.backend(backend):
        for reduce in REDUCES:
            with pytest.raises(TypeError, match="feats must be a float tensor .*float16.*float8"):
                ps.voxelize(points, feats.to(dtype), voxel_size=0.5, reduce=reduce)
        with pytest.raises(TypeError, match="points must be a float tensor .*float16.*float8"):
            ps.voxelize(points.to(dtype), feats, voxel_size=0.5)
        with pytest.raises(TypeError, match="points must be a float tensor .*float16.*float8"):
            ps.voxelize(points.to(dtype), voxel_size=0.5)
        x, _ = ps.voxelize(points, feats, voxel_size=0.5)
        with pytest.raises(TypeError, match="points must be a float tensor .*float16.*float8"):
            ps.devoxelize(x, points=points.to(dtype), voxel_size=0.5, mode="trilinear")


def test_sparse_layout_arguments_are_refused_naming_them():
    """torch sparse points, feats, batch or inverse were bare torch errors
    ("Could not run 'aten::aminmax' ... SparseCPU", "unsupported memory
    format option Contiguous", "Could not run 'aten::min' ...")."""
    points, feats, batch = cloud(40, seed=6, batches=2)
    for backend in ("auto", "torch"):
        with ps.backend(backend):
            with pytest.raises(TypeError, match=r"points must be a dense \(strided\) tensor"):
                ps.voxelize(points.to_sparse(), feats, voxel_size=0.5)
            with pytest.raises(TypeError, match=r"feats must be a dense \(strided\) tensor"):
                ps.voxelize(points, feats.to_sparse(), voxel_size=0.5)
            with pytest.raises(TypeError, match=r"batch must be a dense \(strided\) tensor"):
                ps.voxelize(points, feats, voxel_size=0.5, batch=batch.to_sparse())
            x, inverse = ps.voxelize(points, feats, voxel_size=0.5, batch=batch)
            with pytest.raises(TypeError, match=r"inverse must be a dense \(strided\) tensor"):
                ps.devoxelize(x, inverse.to_sparse())
            with pytest.raises(TypeError, match=r"points must be a dense \(strided\) tensor"):
                ps.devoxelize(x, points=points.to_sparse(), voxel_size=0.5, batch=batch, mode="trilinear")
            with pytest.raises(TypeError, match=r"batch must be a dense \(strided\) tensor"):
                ps.devoxelize(x, points=points, voxel_size=0.5, batch=batch.to_sparse(), mode="trilinear")


def test_trilinear_weights_checks_its_arguments_and_compiled_devoxelize_refuses_non_finite_points():
    """trilinear_weights (the helper devoxelize and the trilinear_weights
    operator call) checked nothing itself: NaN points gave zero weights
    silently, so a compiled devoxelize(mode="trilinear") (whose points are
    checked only by the operator when the graph runs) returned zeros for a
    NaN point where eager refuses it; a batch of another length was a bare
    size mismatch on the torch path, plain coords an AttributeError."""
    points, feats, batch = cloud(60, seed=7, batches=2)
    x, _ = ps.voxelize(points, feats, voxel_size=0.5, batch=batch)
    bad = points.clone()
    bad[3, 1] = float("nan")
    for backend in ("auto", "torch"):
        with ps.backend(backend):
            idx, w = V.trilinear_weights(x, points, 0.5, batch)
            assert idx.shape == w.shape == (60, 8)
            with pytest.raises(ValueError, match="points row 3 is not finite"):
                V.trilinear_weights(x, bad, 0.5, batch)
            with pytest.raises(ValueError, match=r"batch must be \(N,\) with N = 60"):
                V.trilinear_weights(x, points, 0.5, batch[:-1])
            with pytest.raises(ValueError, match=r"batch indices must lie in"):
                V.trilinear_weights(x, points, 0.5, batch - 1)
            with pytest.raises(TypeError, match="tensor must be a SparseTensor"):
                V.trilinear_weights(x.coords, points, 0.5, batch)

    def run(x, points):
        return ps.devoxelize(x, points=points, voxel_size=0.5, batch=batch, mode="trilinear")

    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, points), run(x, points))
    with pytest.raises(ValueError, match="points row 3 is not finite"):
        run(x, bad)
    with pytest.raises(ValueError, match="points row 3 is not finite"):
        compiled(x, bad)


def test_compiled_nearest_devoxelize_names_an_inverse_outside_the_voxels():
    """In a graph devoxelize(mode="nearest") skipped its range check (a host
    read): an inverse past the voxels or negative was torch's bare
    "IndexError: index out of range in self" from index_select. Now the
    graph checks the rows when it runs, with eager's words (a RuntimeError
    there, as select_voxels' check in a graph); valid ones as eager."""
    points, feats, _ = cloud(80, seed=8)
    x, inverse = ps.voxelize(points, feats, voxel_size=0.5)

    def run(x, inverse):
        return ps.devoxelize(x, inverse)

    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="eager")
    assert torch.equal(compiled(x, inverse), run(x, inverse))
    for bad in (inverse + len(x), inverse - len(x)):
        with pytest.raises(ValueError, match=r"inverse holds rows outside \[0, "):
            run(x, bad)
        with pytest.raises(RuntimeError, match=r"inverse holds rows outside \[0, "):
            compiled(x, bad)


# (perm, seg_ptr, mode, the word the error names): each refused by the core (float32 feats) and, alike, by
# the operator's torch path (float16 feats, which the core does not reduce)
BAD_SEGMENTS = {
    "mode": ([0, 1, 2], [0, 2, 3], 7, "mode"),
    "negative_mode": ([0, 1, 2], [0, 2, 3], -1, "mode"),
    "perm_range": ([0, 7, 1], [0, 2, 3], 3, "perm"),
    "perm_negative": ([0, -1, 1], [0, 2, 3], 0, "perm"),
    "perm_length": ([0, 1], [0, 1, 2], 0, "perm"),
    "seg_end": ([0, 1, 2], [0, 2, 9], 1, "seg_ptr"),
    "seg_start": ([0, 1, 2], [1, 2, 3], 1, "seg_ptr"),
    "seg_not_increasing": ([0, 1, 2], [0, 2, 2, 3], 1, "seg_ptr"),
    "seg_empty": ([0, 1, 2], [], 0, "seg_ptr"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", sorted(BAD_SEGMENTS))
def test_the_segment_reduce_operator_refuses_bad_segments_alike_on_both_paths(name, dtype):
    """``torch.ops.pointsparse.segment_reduce`` (a program's operator) on
    float16 feats runs the torch path, which took any mode past 1 as max
    (mode 7 reduced silently), summed past a seg_ptr that does not tile the
    rows, and gave a bare IndexError for a perm row outside the feats: a
    ValueError naming the argument, as the core's for float32 feats."""
    perm, seg_ptr, mode, word = BAD_SEGMENTS[name]
    feats = torch.arange(6, dtype=dtype).reshape(3, 2)
    inverse = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=word):
        torch.ops.pointsparse.segment_reduce(feats, inverse, torch.tensor(perm),
                                             torch.tensor(seg_ptr, dtype=torch.int64), mode)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_the_segment_reduce_operator_refuses_feats_that_are_no_float_feats(dtype):
    """Integer, bool or complex feats took the torch path: integers summed
    in float32 (two rows of 2**25 + 1 summed to 2**26, their mean
    truncated), max a bare RuntimeError ('cannot be converted to type
    int64_t'), bools and complex reduced silently. A TypeError naming feats
    and the dtypes voxelize takes, as voxelize gives."""
    wide = torch.tensor([[2**25 + 1], [2**25 + 1], [3]])
    feats = wide.to(dtype)
    inverse, perm, seg_ptr = torch.tensor([0, 0, 1]), torch.arange(3), torch.tensor([0, 2, 3])
    for mode in range(4):
        with pytest.raises(TypeError, match=f"feats must be a float tensor .*float16.*got dtype {dtype}"):
            torch.ops.pointsparse.segment_reduce(feats, inverse, perm, seg_ptr, mode)
        with pytest.raises(TypeError, match="feats must be a float tensor"):
            torch.ops.pointsparse.segment_reduce(feats, inverse, perm, seg_ptr, mode, True)
    out, _ = torch.ops.pointsparse.segment_reduce(wide.double(), inverse, perm, seg_ptr, 0)
    assert out.tolist() == [[2.0**26 + 2], [3.0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_the_segment_reduce_operator_refuses_an_inverse_that_disagrees_with_perm(dtype):
    """The core reduces by perm and seg_ptr, the torch path (float16) and
    every backward by inverse: an inverse that put a point in another voxel
    than its segment of perm reduced by perm and routed the gradient by
    inverse (gradient 1, 1, 10 for rows 0, 1, 2 summed into voxels 0, 1, 0),
    an inverse outside the voxels or of another length was a bare
    IndexError / RuntimeError from the backward, and a perm naming a row
    twice (and another never) passed. A ValueError naming them, on both
    paths; voxelize's own segments (trusted) are not read again."""
    feats = torch.randn(5, 2, dtype=torch.float64).to(dtype).requires_grad_()
    perm, seg_ptr = torch.tensor([0, 2, 1, 4, 3]), torch.tensor([0, 2, 4, 5])
    inverse = torch.tensor([0, 1, 0, 2, 1])
    for bad, match in ((torch.tensor([0, 0, 1, 2, 1]), "inverse .*perm"), (torch.tensor([0, 1, 0, 2, 7]), "inverse"),
                       (torch.tensor([0, 1]), "inverse")):
        for mode in range(4):
            with pytest.raises(ValueError, match=match):
                torch.ops.pointsparse.segment_reduce(feats, bad, perm, seg_ptr, mode)
    with pytest.raises(ValueError, match="perm must hold each row of feats once"):
        torch.ops.pointsparse.segment_reduce(feats, torch.tensor([0, 1, 0, 2, 2]), torch.tensor([0, 0, 1, 3, 4]),
                                             seg_ptr, 0)
    out, _ = torch.ops.pointsparse.segment_reduce(feats, inverse, perm, seg_ptr, 0)
    (out * torch.tensor([[1.0], [10.0], [100.0]], dtype=dtype)).sum().backward()
    assert feats.grad[:, 0].tolist() == [1.0, 10.0, 1.0, 100.0, 10.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_the_segment_reduce_operator_takes_int32_segments_checked_as_trusted(dtype):
    """int32 inverse, perm and seg_ptr pass the operator's dtype check (an
    integer tensor) and reduce with trusted=True, but the untrusted check's
    pass over perm added int32 ones into an int64 count: a bare RuntimeError
    from index_add_ where trusted reduced them. They reduce as int64 ones do,
    checked or not, on the core (float64) and the torch path (float16), the
    gradient too."""
    g = torch.Generator().manual_seed(3)
    points = torch.rand(40, 3, generator=g) * 3
    _, inverse, perm, seg_ptr = torch.ops.pointsparse.voxelize(points, [1.0, 1.0, 1.0], None)
    feats = torch.randn(40, 2, generator=g, dtype=torch.float64).to(dtype)
    narrow = [t.int() for t in (inverse, perm, seg_ptr)]
    for mode in range(4):
        want = torch.ops.pointsparse.segment_reduce(feats, inverse, perm, seg_ptr, mode)[0]
        for trusted in (False, True):
            x = feats.clone().requires_grad_()
            got = torch.ops.pointsparse.segment_reduce(x, *narrow, mode, trusted)[0]
            assert torch.equal(got, want), (mode, trusted)
            got.sum().backward()
            y = feats.clone().requires_grad_()
            torch.ops.pointsparse.segment_reduce(y, inverse, perm, seg_ptr, mode)[0].sum().backward()
            assert torch.equal(x.grad, y.grad), (mode, trusted)
    bad = torch.tensor([0, 1, 0, 2, 2], dtype=torch.int32)  # (still refused by value, named)
    with pytest.raises(ValueError, match="perm must hold each row of feats once"):
        torch.ops.pointsparse.segment_reduce(torch.zeros(5, 2, dtype=dtype), torch.tensor([0, 0, 1, 2, 2]), bad,
                                             torch.tensor([0, 2, 3, 5]), 0)


def test_the_segment_reduce_operator_names_an_inverse_that_is_no_voxel_map():
    """The torch path reduces by ``inverse`` (the core by perm and
    seg_ptr): one of another length or outside the voxels was a bare torch
    error from index_add_ / scatter; a ValueError naming it."""
    feats = torch.arange(6, dtype=torch.float16).reshape(3, 2)
    perm, seg_ptr = torch.arange(3), torch.tensor([0, 2, 3])
    for inverse in (torch.tensor([0, 0]), torch.tensor([0, 0, 5]), torch.tensor([0, -1, 1])):
        with pytest.raises(ValueError, match="inverse"):
            torch.ops.pointsparse.segment_reduce(feats, inverse, perm, seg_ptr, 0)
    out, _ = torch.ops.pointsparse.segment_reduce(feats, torch.tensor([0, 0, 1]), perm, seg_ptr, 1)
    assert out.tolist() == [[1.0, 2.0], [4.0, 5.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_segment_reduce_operator_checks_dtypes_and_shapes_when_trusted_too(dtype):
    """``trusted=True`` (voxelize's own segments; a program's user may pass
    it) skipped every check of inverse, perm and seg_ptr: float ones, a
    short or 2-D inverse reduced silently. Their dtypes and shapes (no host
    read) are checked either way, naming the argument; only the checks of
    the values are skipped."""
    feats = torch.arange(6, dtype=dtype).reshape(3, 2)
    inverse, perm, seg_ptr = torch.tensor([0, 0, 1]), torch.arange(3), torch.tensor([0, 2, 3])
    good = dict(feats=feats, inverse=inverse, perm=perm, seg_ptr=seg_ptr)
    cases = [("inverse", inverse.float(), TypeError), ("perm", perm.float(), TypeError),
             ("seg_ptr", seg_ptr.float(), TypeError), ("inverse", inverse[:2], ValueError),
             ("inverse", inverse[None], ValueError), ("perm", perm[:2], ValueError),
             ("seg_ptr", seg_ptr[None], ValueError), ("feats", feats[:, 0], ValueError),
             # (int16 / uint8 got past the check into bare torch errors: repeat_interleave has no Byte kernel)
             ("inverse", inverse.to(torch.int16), TypeError), ("perm", perm.to(torch.uint8), TypeError),
             ("seg_ptr", seg_ptr.to(torch.int8), TypeError)]
    for trusted in (False, True):
        for name, bad, err in cases:
            for mode in range(4):
                with pytest.raises(err, match=f"^{name}"):
                    torch.ops.pointsparse.segment_reduce(**{**good, name: bad}, mode=mode, trusted=trusted)
        out, _ = torch.ops.pointsparse.segment_reduce(**good, mode=0, trusted=trusted)
        assert out.tolist() == [[2.0, 4.0], [4.0, 5.0]]


def test_trilinear_devoxelize_of_several_items_needs_batch():
    """devoxelize(mode='trilinear') without batch read every point from
    batch item 0: the points of item 1 got item 0's features (or zeros
    where item 0 has no voxel there), silently. A tensor holding any item
    but 0 now needs batch (ValueError naming it); with it, each point reads
    its own item."""
    points, feats, batch = cloud(300, seed=9, batches=2)
    x, _ = ps.voxelize(points, feats, voxel_size=0.4, batch=batch)
    with pytest.raises(ValueError, match=r"batch items \[0, 1\], not item 0 alone; pass batch"):
        ps.devoxelize(x, points=points, voxel_size=0.4, mode="trilinear")
    both = ps.devoxelize(x, points=points, voxel_size=0.4, batch=batch, mode="trilinear")
    one = batch == 1
    alone, _ = ps.voxelize(points[one], feats[one], voxel_size=0.4)
    torch.testing.assert_close(both[one], ps.devoxelize(alone, points=points[one], voxel_size=0.4, mode="trilinear"))


@pytest.mark.parametrize("dtype,low", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                       (torch.float32, torch.bfloat16)])
def test_voxelize_under_autocast_is_voxelize_outside_it(dtype, low):
    """Voxelizing inside an autocast region (a half-precision pipeline's points under the other 16-bit
    autocast) stopped in the extent check, torch.stack of the points' bounds, with a bare "RuntimeError:
    Unexpected floating ScalarType in at::autocast::prioritize" (autocast's stack refuses a 16-bit dtype
    not its own). The bounds are now read as outside autocast: the same voxels, feats and inverse."""
    points, feats, batch = cloud(500, seed=3, dtype=torch.float32, batches=2)
    points, feats = points.to(dtype), feats.to(dtype)
    want, want_inverse = ps.voxelize(points, feats, voxel_size=0.5, batch=batch)
    with torch.autocast("cpu", low):
        got, inverse = ps.voxelize(points, feats, voxel_size=0.5, batch=batch)
    assert torch.equal(got.coords, want.coords) and torch.equal(inverse, want_inverse)
    assert got.feats.dtype == dtype and torch.equal(got.feats, want.feats)


def _point_voxel_op_calls():
    """(operator, its arguments by name, the tensors' names) of the
    point-voxel operators on a small valid input."""
    ops = torch.ops.pointsparse
    points = torch.tensor([[0.5, 0.5, 0.5], [0.7, 0.5, 0.5], [2.5, 0.5, 0.5]])
    coords, inverse, perm, seg_ptr = ops.voxelize(points, [1.0, 1.0, 1.0], None)
    return {
        "segment_reduce": (ops.segment_reduce, dict(feats=torch.ones(3, 2), inverse=inverse, perm=perm,
                                                    seg_ptr=seg_ptr, mode=1)),
        "trilinear_weights": (ops.trilinear_weights, dict(coords=coords, stride=[1, 1, 1], points=points,
                                                          voxel_size=[1.0, 1.0, 1.0], batch=torch.zeros(3).long())),
        "voxel_rows": (ops.voxel_rows, dict(coords=coords, stride=[1, 1, 1], point_coords=coords[inverse])),
    }


@pytest.mark.parametrize("op, name", [("segment_reduce", "inverse"), ("segment_reduce", "perm"),
                                      ("segment_reduce", "seg_ptr"), ("trilinear_weights", "coords"),
                                      ("trilinear_weights", "batch"), ("voxel_rows", "coords")])
def test_point_voxel_operators_refuse_a_meta_tensor_beside_real_ones(op, name):
    """A point-voxel operator called with one tensor on the meta device
    and the others on the CPU ran its fake implementation (torch dispatches
    to the Meta kernel) and returned uninitialised CPU memory as its result:
    garbage means, interpolation weights and voxel rows, silently. Its
    tensors on several devices are now a ValueError naming the operator and
    the argument; on one device (CPU, or meta alone) it runs as before."""
    fn, args = _point_voxel_op_calls()[op]
    want = fn(**args)
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{op}: {name} is on meta but "):
        fn(**args)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    for got, expected in zip(fn(**meta) if isinstance(want, tuple) else [fn(**meta)],
                             want if isinstance(want, tuple) else [want]):
        assert got.is_meta and got.shape == expected.shape and got.dtype == expected.dtype


def test_trilinear_points_on_another_device_than_the_tensor_are_named_once():
    """devoxelize(mode="trilinear") and trilinear_weights checked the batch and then the points' device
    against the tensor's in two copies of the same lines; one check serves both now, its message as before.
    Their public entry refuses a meta tensor as shape-only before this check (a second device stands in
    only here, on a CPU-only machine), so the check is taken at its source: points on meta, the tensor
    on cpu."""
    vox = importlib.import_module("pointsparse.voxelize")

    points = torch.rand(10, 3) * 4
    x, _ = ps.voxelize(points, torch.randn(10, 2), voxel_size=1.0)
    assert vox._check_batch_on(x, points, None) is None
    assert vox._check_batch_on(x, points, torch.zeros(10, dtype=torch.int32)).dtype == torch.int64
    with pytest.raises(ValueError, match=r"^points are on meta but the tensor on cpu$"):
        vox._check_batch_on(x, points.to("meta"), None)
    with pytest.raises(ValueError, match=r"^batch is on cpu but points on meta$"):
        vox._check_batch_on(x, points.to("meta"), torch.zeros(10, dtype=torch.int64))


def test_nearest_devoxelize_of_a_strided_tensor_names_the_stride_when_inverse_overruns_it():
    """voxelize's inverse indexes the stride-1 voxels; given with a tensor
    at stride 2 (after a pooling) it overran the coarse rows with only
    'inverse holds rows outside [0, N)', naming neither the stride nor the
    cause. The refusal now says both and what to do; an inverse into the
    coarse voxels themselves (a user's map of the points into them) still
    reads them."""
    from pointsparse import nn as snn

    torch.manual_seed(0)
    points = torch.rand(3000, 3) * 10
    x, inverse = ps.voxelize(points, torch.rand(3000, 2), voxel_size=0.5)
    y = snn.MaxPool3d(2, stride=2)(x)
    assert y.stride == (2, 2, 2) and int(inverse.max()) >= len(y)
    with pytest.raises(ValueError, match=rf"outside \[0, {len(y)}\) \(the tensor is at stride \(2, 2, 2\): inverse "
                                         rf"indexes its {len(y)} voxels at that stride, where voxelize's inverse "
                                         rf"indexes the {len(x)} stride-1 voxels.*mode='trilinear'"):
        ps.devoxelize(y, inverse)
    # the points' own coarse voxels: the rows of floor(coords / 2) * 2 in y
    coarse = {tuple(r): i for i, r in enumerate(y.coords.tolist())}
    parent = torch.tensor([coarse[(b, x0 // 2 * 2, x1 // 2 * 2, x2 // 2 * 2)] for b, x0, x1, x2 in x.coords.tolist()])
    assert torch.equal(ps.devoxelize(y, parent[inverse]), y.feats[parent[inverse]])


def test_voxelize_takes_numpy_arrays_as_torchsparse_and_minkowski_quantisers_do():
    """``ps.voxelize(np_array, ...)`` was a TypeError ('points must be a
    torch.Tensor; got ndarray'), the first call a TorchSparse or
    MinkowskiEngine user makes (their sparse_quantize takes numpy). Points,
    feats and batch may be numpy arrays now: the same voxels as their
    tensors give, the values shared (copied where read-only or big-endian);
    an array torch holds no dtype of is a TypeError naming it."""
    rng = np.random.default_rng(0)
    points, feats, batch = rng.uniform(0, 10, (2000, 3)), rng.standard_normal((2000, 4)).astype(np.float32), \
        rng.integers(0, 3, 2000)
    want = ps.voxelize(torch.from_numpy(points), torch.from_numpy(feats), voxel_size=0.5,
                       batch=torch.from_numpy(batch))
    frozen = points.copy()
    frozen.flags.writeable = False
    for p, f, b in ((points, feats, batch), (frozen, feats.astype(">f4"), batch.astype(">i8"))):
        x, inverse = ps.voxelize(p, f, voxel_size=0.5, batch=b)
        assert torch.equal(x.coords, want[0].coords) and torch.equal(x.feats, want[0].feats)
        assert torch.equal(inverse, want[1])
    flipped = ps.voxelize(points[::-1], voxel_size=0.5)[0]  # (negative strides: copied)
    assert torch.equal(flipped.coords, ps.voxelize(torch.from_numpy(points[::-1].copy()), voxel_size=0.5)[0].coords)
    with pytest.raises(TypeError, match="points: a numpy masked array"):
        ps.voxelize(np.ma.masked_invalid(points), voxel_size=0.5)
    with pytest.raises(TypeError, match="points: a numpy array of dtype object"):
        ps.voxelize(points.astype(object), voxel_size=0.5)
    with pytest.raises(TypeError, match="points must be a float tensor"):
        ps.voxelize(points.astype(np.int64), voxel_size=0.5)


def test_a_voxel_size_given_second_is_named():
    """``voxelize(points, 0.1)`` (TorchSparse's and MinkowskiEngine's
    quantisers take the size second) said only "feats must be a
    torch.Tensor; got float": it names voxel_size's place now."""
    points = torch.rand(20, 3)
    with pytest.raises(TypeError, match=r"feats must be a torch.Tensor \(N, C\) or None; got float 0.1: voxel_size is "
                                        r"voxelize's third argument \(voxelize\(points, voxel_size=...\)\)"):
        V.voxelize(points, 0.1)
    import numpy as np
    for size, shown in ((2, "int 2"), (np.float32(0.1), "float32 "), ((0.1, 0.1, 0.2), r"tuple \(0.1, 0.1, 0.2\)"),
                        ([1, 1, 2], r"list \[1, 1, 2\]")):
        with pytest.raises(TypeError, match=rf"got {shown}.*voxel_size is voxelize's third argument"):
            V.voxelize(points, size)
    with pytest.raises(TypeError, match=r"feats must be a torch.Tensor; got bool"):
        V.voxelize(points, True)
    assert len(V.voxelize(points, voxel_size=0.1)[0]) > 1
