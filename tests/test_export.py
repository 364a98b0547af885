"""torch.compile / torch.export: the core's custom operators against the eager
path and naive references, fullgraph compilation without recompiles, an
export round trip through a file in a fresh process, clear errors."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

import pointsparse as ps
from pointsparse import checkpoint, export, kmap, ops
from pointsparse import nn as spnn
from pointsparse.models import SPVCNN, MinkUNet
from pointsparse.prune import l1_unstructured, surgery
from reference import conv_operator_args, dense_conv, kmap_reference, random_coords, run_python

pytestmark = pytest.mark.usefixtures("one_thread")


def _cloud(n: int, seed: int, channels: int = 3, dtype=torch.float32) -> ps.SparseTensor:
    g = torch.Generator().manual_seed(seed)
    x, _ = ps.voxelize(torch.rand(n, 3, generator=g) * 12, voxel_size=0.5)
    feats = torch.randn(len(x), channels, generator=g, dtype=dtype)
    return ps.SparseTensor(feats, x.coords)


# --- operators -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (2, 2), (3, 2)])
def test_kmap_operators_match_reference(kernel_size, stride):
    coords = random_coords(300, extent=10, seed=kernel_size + stride)
    key = kmap.KernelMapKey((1, 1, 1), (kernel_size,) * 3, (stride,) * 3, (1, 1, 1))
    out = None if stride == 1 else ops.downsample(coords, [stride] * 3)
    in_idx, out_idx, sizes = ops.kmap_build(coords, out, ops.key_to_list(key))
    ref_out, ref_in, ref_pairs_out, ref_sizes = kmap_reference(coords, kernel_size, stride)
    if out is not None:
        assert torch.equal(out, ref_out)
    assert torch.equal(in_idx, ref_in) and torch.equal(out_idx, ref_pairs_out) and torch.equal(sizes, ref_sizes)
    if stride > 1:  # the adjoint map: the same pairs swapped, sorted by the new output row
        up_in, up_out = ops.kmap_transpose(out, coords, in_idx, out_idx, sizes, ops.key_to_list(key))
        eager = kmap.build(coords, kernel_size, stride).transpose(coords)
        assert torch.equal(up_in, eager.in_idx) and torch.equal(up_out, eager.out_idx)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_operator_matches_dense_conv_and_gradcheck(stride):
    x = _cloud(120, stride, channels=3, dtype=torch.float64)
    k = 3
    key = kmap.KernelMapKey((1, 1, 1), (k,) * 3, (stride,) * 3, (1, 1, 1))
    out_coords = x.coords if stride == 1 else ops.downsample(x.coords, [stride] * 3)
    pairs = ops.kmap_build(x.coords, None if stride == 1 else out_coords, ops.key_to_list(key))
    weight = torch.randn(k ** 3, 3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    feats = x.feats.clone().requires_grad_()
    got = ops.conv(feats, weight, bias, out_coords, *pairs, ops.key_to_list(key))
    assert torch.allclose(got, dense_conv(x, weight.detach(), out_coords, k, stride, bias=bias.detach()), atol=1e-10)
    torch.autograd.gradcheck(lambda f, w, b: ops.conv(f, w, b, out_coords, *pairs, ops.key_to_list(key)),
                             (feats, weight, bias))
    with ps._ext.torch_path():  # the operators' torch loop (other devices) gives the same sums and gradients
        torch.autograd.gradcheck(lambda f, w: ops.conv(f, w, None, out_coords, *pairs, ops.key_to_list(key)),
                                 (feats, weight))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_conv_operators_are_differentiable_twice(backend):
    """A gradient penalty (create_graph=True) through the conv operators, as
    a compiled or exported model's backward runs them: float64
    gradgradcheck of conv (submanifold, strided) and of conv_inference (its
    residual and ReLU), and gradcheck of the gradient operators
    conv_input_grad and conv_weight_grad themselves, on the engine and the
    torch loop (they had no autograd formula: the second backward raised
    "no autograd formula was registered")."""
    coords = random_coords(20, 3, seed=3)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(len(coords), 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    with ps.backend(backend):
        for stride in (1, 2):
            k = 3 if stride == 1 else 2
            key = ops.key_to_list(kmap.KernelMapKey((1, 1, 1), (k,) * 3, (stride,) * 3, (1, 1, 1)))
            out_coords = coords if stride == 1 else ops.downsample(coords, [stride] * 3)
            pairs = ops.kmap_build(coords, None if stride == 1 else out_coords, key)
            weight = torch.randn(k ** 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
            conv = lambda f, w, b: ops.conv(f, w, b, out_coords, *pairs, key)  # noqa: E731
            assert torch.autograd.gradgradcheck(conv, (feats, weight, bias))
            grad = torch.randn(len(out_coords), 3, generator=g, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(
                lambda gr, w: ops.conv_input_grad(gr, w, out_coords, *pairs, key, len(coords)), (grad, weight))
            assert torch.autograd.gradcheck(lambda f, gr: ops.conv_weight_grad(f, gr, out_coords, *pairs, key),
                                            (feats, grad))
        add = torch.randn(len(coords), 3, generator=g, dtype=torch.float64, requires_grad=True)
        key = ops.key_to_list(kmap.KernelMapKey((1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 1, 1)))
        pairs = ops.kmap_build(coords, None, key)
        inference = lambda f, w, b, a: ops.conv_inference(f, w, b, coords, *pairs, key, a, True)  # noqa: E731
        weight = torch.randn(27, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(inference, (feats, weight, bias, add))


def test_opcheck_conv():
    """torch.library.opcheck: schema, fake implementation and autograd registration."""
    x = _cloud(80, 3, channels=2)
    key = ops.key_to_list(kmap.KernelMapKey((1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 1, 1)))
    pairs = ops.kmap_build(x.coords, None, key)
    args = (x.feats.requires_grad_(), torch.randn(27, 2, 5, requires_grad=True), None, x.coords, *pairs, key)
    torch.library.opcheck(torch.ops.pointsparse.conv.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_opcheck_the_map_operators_taking_pairs(index_dtype):
    """torch.library.opcheck of kmap_transpose and kmap_restrict on pairs of
    either index dtype they take (int64, int32): their fake implementations
    give the dtypes the real ones do. kmap_restrict's fake gave its sizes
    the input's dtype where the real one gives int64 counts."""
    x = _cloud(80, 3)
    down = ops.key_to_list(kmap.KernelMapKey((1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 1, 1)))
    coarse = ops.downsample(x.coords, [2, 2, 2])
    pairs = [t.to(index_dtype) for t in ops.kmap_build(x.coords, coarse, down)]
    rows = torch.arange(0, len(coarse), 2)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.pointsparse.kmap_transpose.default, (coarse, x.coords, *pairs, down, False),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.pointsparse.kmap_restrict.default,
                          (x.coords, coarse, *pairs, down, rows, coarse[rows]), test_utils=utils)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_input_gradient_operator_sums_low_precision_products_in_float32(dtype):
    """conv_input_grad on bf16 / fp16 (a compiled bf16 model's backward: the
    core runs no low-precision gradient): the per-offset products
    (``grad[out_idx] @ W[o].T``, each rounded once by its matmul) summed in
    float32 and the sum rounded once, as eager's torch path sums them; the
    loop added them into a bf16 / fp16 tensor, rounding at every offset."""
    x = _cloud(600, 5, channels=16)
    args, g = conv_operator_args(x, 16, seed=2)
    _, weight, _, coords, *pairs, key = args
    weight, grad = (weight / 8).to(dtype), torch.randn(len(x), 16, generator=g).to(dtype)
    got = ops.conv_input_grad(grad, weight, coords, *pairs, key, len(x))
    want = torch.zeros(len(x), 16)
    in_idx, out_idx, sizes = pairs
    for o, (i, j) in enumerate(zip(in_idx.split(sizes.tolist()), out_idx.split(sizes.tolist()))):
        want.index_add_(0, i, (grad[j] @ weight[o].t()).float())
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))


def test_conv_inference_operator():
    """conv_inference (a graph's conv without gradients): schema and fake
    implementation; equal to the conv operator plus the residual and the
    ReLU, bit for bit (the kernel's store adds and clamps as torch does);
    kmap_parents' schema and fake implementation, and its map equal to
    downsample + kmap_build's."""
    x = _cloud(300, 3, channels=4)
    args, g = conv_operator_args(x, 6, seed=3)
    add = torch.randn(len(x), 6, generator=g)
    torch.library.opcheck(torch.ops.pointsparse.conv_inference.default, (*args, add, True),
                          test_utils=("test_schema", "test_faketensor"))
    plain = ops.conv(*args)
    assert torch.equal(ops.conv_inference(*args, add, True), torch.relu(plain + add))
    assert torch.equal(ops.conv_inference(*args, None, False), plain)
    down = ops.key_to_list(kmap.KernelMapKey((1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 1, 1)))
    torch.library.opcheck(torch.ops.pointsparse.kmap_parents.default, (x.coords, down, False),
                          test_utils=("test_schema", "test_faketensor"))
    parents, *got = ops.kmap_parents(x.coords, down, False)
    coarse = ops.downsample(x.coords, [2, 2, 2])
    assert torch.equal(parents, coarse)
    for a, b in zip(got, ops.kmap_build(x.coords, coarse, down)):
        assert torch.equal(a, b)
    scores, batch = x.feats.norm(dim=1), (torch.arange(len(x)) % 3).sort().values
    for ratio, threshold in ((0.3, None), (None, float(scores.median()))):
        torch.library.opcheck(torch.ops.pointsparse.keep_rows.default, (scores, batch, ratio, threshold),
                              test_utils=("test_schema", "test_faketensor"))
        assert torch.equal(ops.keep_rows(scores, batch, ratio, threshold),
                           spnn.functional.keep_per_batch(scores, batch, ratio, threshold))
    items = torch.cat([x.coords[:, :1] * 0 + (torch.arange(len(x)) % 4)[:, None].int(), x.coords[:, 1:]], 1)
    torch.library.opcheck(torch.ops.pointsparse.batch_counts.default, (items, 3, 4),
                          test_utils=("test_schema", "test_faketensor"))
    assert ops.batch_counts(items, 3, 4).tolist() == [len(x) // 4 + (i < len(x) % 4) for i in range(4)]
    inverse = torch.randint(0, len(x), (50,), generator=torch.Generator().manual_seed(3))
    points = x.coords[inverse, 1:].double() + torch.rand(50, 3, dtype=torch.float64)
    point_batch = x.coords[inverse, 0].long()
    torch.library.opcheck(torch.ops.pointsparse.point_coords.default, (x.coords, inverse, points, point_batch),
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(ops.point_coords(x.coords, inverse, points, point_batch), x.coords[inverse])


@pytest.mark.parametrize("reduce", ["mean", "max", "first"])
def test_voxel_operators_match_eager_and_gradcheck(reduce):
    g = torch.Generator().manual_seed(1)
    points = torch.rand(200, 3, generator=g, dtype=torch.float64) * 4
    feats = torch.randn(200, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x, inverse = ps.voxelize(points, feats, voxel_size=0.7, reduce=reduce)
    coords, inv, perm, seg_ptr = ops.voxelize(points, [0.7] * 3, None)
    assert torch.equal(coords, x.coords) and torch.equal(inv, inverse)
    mode = ps.voxelize.__globals__["REDUCE_MODES"][reduce]
    out, _ = ops.segment_reduce(feats, inv, perm, seg_ptr, mode)
    assert torch.equal(out, x.feats)
    torch.autograd.gradcheck(lambda f: ops.segment_reduce(f, inv, perm, seg_ptr, mode)[0], (feats,))
    idx, w = ops.trilinear_weights(x.coords, [1, 1, 1], points, [0.7] * 3, None)
    ref_idx, ref_w = ps.voxelize.__globals__["trilinear_weights"](x, points, 0.7)
    assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w)


# --- pytree and eager cache ------------------------------------------------------------------------------

def test_sparse_tensor_is_a_pytree_node():
    x = _cloud(50, 1)
    leaves, spec = torch.utils._pytree.tree_flatten(x)
    assert leaves[0] is x.feats and leaves[1] is x.coords
    y = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert isinstance(y, ps.SparseTensor) and y.stride == x.stride and y.cache is not x.cache
    assert torch.utils._pytree.treespec_loads(torch.utils._pytree.treespec_dumps(spec)) == spec


@pytest.mark.parametrize("cast, exc, match", [
    (lambda t: t.half(), TypeError, "coords must be int32 .* got dtype torch.float16"),
    (lambda t: t.float(), TypeError, "coords must be int32 .* got dtype torch.float32"),
    (lambda t: t.long(), TypeError, "coords must be int32 .* got dtype torch.int64"),
    (lambda t: t.int(), TypeError, "feats must be a floating-point tensor .* got dtype torch.int32"),
    (lambda t: t.flatten(), ValueError, r"coords must be \(N, 4\) int32 .* got 1 dimension"),
])
def test_a_pytree_map_that_recasts_the_coords_is_refused(cast, exc, match):
    """tree_map(lambda t: t.half(), batch) (a batch cast for mixed precision)
    casts a SparseTensor's coords too, and the unflattened tensor took them:
    a conv then ran on coords rounded to float16 ([2049, 2050, 2051] became
    [2048, 2050, 2052]: other neighbours, other feats, float output coords)
    without a word. The leaves' dtypes and ranks are checked (metadata only:
    a graph's fake tensors pass); the values stay unchecked."""
    coords = torch.tensor([[0, 2049, 0, 0], [0, 2050, 0, 0], [0, 2051, 0, 0]], dtype=torch.int32)
    x = ps.SparseTensor(torch.ones(3, 1), coords)
    with pytest.raises(exc, match=match):
        torch.utils._pytree.tree_map(cast, x)
    y = torch.utils._pytree.tree_map(lambda t: t.double() if t.is_floating_point() else t, x)
    assert y.feats.dtype == torch.float64 and y.coords is x.coords  # (a map of the feats alone still works)


# --- torch.compile ---------------------------------------------------------------------------------------

class _UNet(torch.nn.Module):
    """Every kind of map: submanifold, strided, transposed (reused), a skip."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(spnn.Conv3d(3, 8, 3), spnn.BatchNorm(8), spnn.ReLU())
        self.down = spnn.Conv3d(8, 16, 2, stride=2)
        self.mid = spnn.Conv3d(16, 16, 3, bias=True)
        self.up = spnn.Conv3d(16, 8, 2, stride=2, transposed=True)
        self.head = spnn.Conv3d(16, 4, 1)

    def forward(self, x):
        a = self.stem(x)
        b = self.up(self.mid(self.down(a)))
        return self.head(spnn.cat([a, b]))


def _training_step_matches_eager(eager: torch.nn.Module, twin: torch.nn.Module, clouds) -> None:
    """``twin`` (eager's copy) under torch.compile (fullgraph, dynamic, aot_eager) on each of ``clouds``
    (float64 SparseTensors, or tuples of forward arguments; other sizes, no recompilation): a SparseTensor
    output's coords and stride equal, the output's values within 1e-12, every parameter's gradient within
    1e-10 of eager's."""
    torch.compiler.reset()
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in clouds:
            args = x if isinstance(x, tuple) else (x,)
            got, want = compiled(*args), eager(*args)
            if isinstance(want, ps.SparseTensor):
                assert torch.equal(got.coords, want.coords) and got.stride == want.stride
                got, want = got.feats, want.feats
            assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-12)
            got.square().sum().backward()
            want.square().sum().backward()
            for (name, p), q in zip(twin.named_parameters(), eager.parameters()):
                assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-10), name


def test_compile_fullgraph_two_sizes_no_recompile():
    torch.manual_seed(0)
    eager = _UNet().double()
    clouds = [_cloud(n, seed, dtype=torch.float64) for n, seed in ((400, 1), (700, 2))]
    _training_step_matches_eager(eager, copy.deepcopy(eager), clouds)
    # the graph kept its maps in a cache of its own: the inputs' caches hold only eager's
    assert all(x.cache.kmaps and all(isinstance(k, kmap.KernelMapKey) for k in x.cache.kmaps) for x in clouds)


def test_a_gradient_penalty_through_a_compiled_model_equals_eager():
    """A gradient penalty (the input gradient taken with create_graph=True,
    its square then differentiated) through a compiled U-Net (fullgraph,
    dynamic, backend "eager": the graph's conv operators run with autograd;
    AOT autograd's backends refuse create_graph themselves): every
    parameter's gradient and the feats' within 1e-10 of eager's (the conv
    operators' gradient operators had no autograd formula: the second
    backward raised). Its middle conv has a kernel region, its stem a
    pruning mask (the parameter is weight_orig)."""
    torch.manual_seed(0)
    eager = _UNet().double()
    eager.mid = spnn.Conv3d(16, 16, 3, bias=True, kernel_region="cross").double()
    twin = copy.deepcopy(eager)
    for model in (eager, twin):
        l1_unstructured(model.stem[0], "weight", 0.5)
    torch.compiler.reset()
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="eager")
    x = _cloud(80, 1, dtype=torch.float64)
    grads = []
    for model in (compiled, eager):
        feats = x.feats.clone().requires_grad_()
        y = model(ps.SparseTensor(feats, x.coords))
        (g,) = torch.autograd.grad(y.feats.pow(3).sum(), feats, create_graph=True)
        g.square().sum().backward()
        grads.append([feats.grad, *(p.grad for p in model.parameters())])
    for got, want in zip(*grads):
        assert torch.allclose(got, want, rtol=0, atol=1e-10)


def test_minkunet_compiles_in_one_graph():
    model = MinkUNet(3, 5, cr=0.25, blocks=1).eval()
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for n, seed in ((600, 4), (900, 5)):
            x = _cloud(n, seed)
            assert torch.allclose(compiled(x).feats, model(x).feats, rtol=0, atol=1e-6)


def test_minkunet_compiles_without_fullgraph_in_one_graph():
    """torch.compile's default (no fullgraph, no dynamic): the graph broke at every map operator (torch breaks
    at an operator of data-dependent output size unless fullgraph=True), 26 breaks in this MinkUNet, so each
    layer's forward became a frame of its own, compiled again for every layer's widths, strides and
    activation past dynamo's recompile limit (8) in Conv3d.forward, BatchNorm and the activations, which then
    ran eagerly. Now the operators' unbacked counts are traced here as under fullgraph: one graph (and one
    recompile, when the second cloud makes the sizes dynamic), eager's output."""
    from torch._dynamo.utils import counters

    model = MinkUNet(3, 5, cr=0.25, blocks=1).eval()
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for n, seed in ((300, 1), (400, 2), (350, 3)):
            x = _cloud(n, seed)
            assert torch.allclose(compiled(x).feats, model(x).feats, rtol=0, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_model_takes_an_empty_cloud_as_eager_does(backend):
    """An empty cloud through a compiled MinkUNet (fullgraph, dynamic; torch compiles 0 rows as a static
    size of its own): the map operators' fake implementations gave data-dependent counts even for coords
    known to have no row, and batch norm then failed the trace with torch's "Could not guard on
    data-dependent expression Eq(8*u1, 0)", where eager gives an empty output. Now no row in, no row (and
    no pair) out: eager's empty output, first or after a cloud, and the clouds after it as eager."""
    torch.manual_seed(0)
    model = _trained_like(MinkUNet(3, 4, cr=0.25, blocks=1))
    empty = ps.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32))
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    with torch.no_grad():
        for x in (empty, _cloud(200, 1), empty, _cloud(260, 2)):
            got, want = compiled(x), model(x)
            assert got.feats.shape == want.feats.shape and torch.equal(got.feats, want.feats)
            assert torch.equal(got.coords, want.coords) and got.stride == want.stride


def _points_and_voxels(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 3, generator=g, dtype=torch.float64) * 8
    feats = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    return points, feats


def test_voxelize_devoxelize_compile_with_gradients():
    def run(points, feats):
        x, inverse = ps.voxelize(points, feats, voxel_size=0.5, reduce="max")
        return ps.devoxelize(x, inverse) + ps.devoxelize(x, points=points, voxel_size=0.5, mode="trilinear")

    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n, seed in ((500, 1), (800, 2)):
            points, feats = _points_and_voxels(n, seed)
            got, want = compiled(points, feats), run(points, feats)
            assert torch.allclose(got, want, rtol=0, atol=1e-12)
            g1, = torch.autograd.grad(got.square().sum(), feats)
            g2, = torch.autograd.grad(want.square().sum(), feats)
            assert torch.allclose(g1, g2, rtol=0, atol=1e-10)


def test_trilinear_devoxelize_of_points_that_require_grad_compiles_as_eager():
    """Points that require grad (made by a learnable step before the network:
    a scale, a pose): eager's trilinear weights are the core's, constants
    of the points, so the feats get their gradient and the points none. A
    compiled devoxelize, and so a compiled SPVCNN, failed when the graph was
    built ('Trying to backward through pointsparse.trilinear_weights.default
    but no autograd formula was registered'); it now takes the core's
    weights as constants of the points: eager's values and feats'
    gradient, the points' step none (eager mode gives it one, the torch
    twin's weights: devoxelize's docstring names the difference)."""
    def run(points, feats, scale):
        x, _ = ps.voxelize(points.detach(), feats, voxel_size=0.5)
        return ps.devoxelize(x, points=points * scale, voxel_size=0.5, mode="trilinear")

    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="aot_eager")
    for n, seed in ((500, 1), (800, 2)):
        points, feats = _points_and_voxels(n, seed)
        scale = torch.ones((), dtype=torch.float64, requires_grad=True)
        got, want = compiled(points, feats, scale), run(points, feats, scale)
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
        g1 = torch.autograd.grad(got.square().sum(), [feats, scale], allow_unused=True)
        g2 = torch.autograd.grad(want.square().sum(), [feats, scale], allow_unused=True)
        assert torch.allclose(g1[0], g2[0], rtol=0, atol=1e-10) and g1[1] is None and g2[1] is not None

    torch.manual_seed(0)
    net = _trained_like(SPVCNN(4, 3, cr=0.25, blocks=1)).double()
    voxels, inverse, points, point_batch = export.example_input(4, 0.4, points=True)
    voxels = voxels.with_feats(voxels.feats.double())
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    torch.compiler.reset()
    fast = torch.compile(net, fullgraph=True, dynamic=True, backend="aot_eager")
    got = fast(voxels, inverse, points.double() * scale, point_batch)
    want = net(voxels, inverse, points.double() * scale, point_batch)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    weight = net.classifier.weight
    g1, = torch.autograd.grad(got.square().sum(), weight)
    g2, = torch.autograd.grad(want.square().sum(), weight)
    assert torch.allclose(g1, g2, rtol=0, atol=1e-10)


def test_torchscript_is_refused_and_feats_of_other_rows_than_coords_too_in_a_graph():
    """torch.jit.trace of a model under no_grad recorded an empty tensor's
    allocation for the core's calls (its output: uninitialised memory; with
    grad, 'unordered_map::at'): TorchScript is a TypeError naming what to
    use. A tensor made in a compiled graph with validate=False (as the
    README builds one there) took the first rows of longer feats silently;
    now the graph refuses it, as eager does, naming the rows."""
    conv = spnn.Conv3d(4, 8, 3)
    coords = random_coords(120, extent=6, seed=3)

    class Plain(torch.nn.Module):
        def forward(self, f, c):
            return conv(ps.SparseTensor(f, c, validate=False)).feats

    feats = torch.randn(len(coords), 4)
    with torch.no_grad(), pytest.raises(TypeError, match=r"does not run under torch.jit.trace \(TorchScript\).*torch.export"):
        torch.jit.trace(Plain(), (feats, coords), check_trace=False)
    longer = torch.cat([feats, torch.randn(5, 4)])
    with pytest.raises(ValueError, match=rf"one row per site; got {len(coords) + 5} and {len(coords)} rows"):
        Plain()(longer, coords)
    torch.compiler.reset()
    compiled = torch.compile(Plain(), fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(feats, coords), Plain()(feats, coords))
        with pytest.raises(Exception, match="feats and coords must have one row per site"):
            compiled(longer, coords)


def test_union_in_a_compiled_model_runs_eagerly_between_graphs():
    """nn.union's row count depends on the coords' values: under
    torch.compile it runs eagerly between two graphs (eager's values and
    gradients, no warning of an untraceable call), fullgraph=True refuses
    it; importing pointsparse.nn imports no compiler for it (the CLI's
    import test)."""
    torch.manual_seed(0)
    coords = [random_coords(80, extent=6, seed=s) for s in (4, 5)]
    conv = spnn.Conv3d(3, 4, 3).double()

    def run(fa, fb):  # (the tensors made outside the graph, as the README's compiled models take them)
        return conv(spnn.union([a.with_feats(fa), b.with_feats(fb)])).feats

    a, b = (ps.SparseTensor(torch.zeros(len(c), 3, dtype=torch.float64), c) for c in coords)

    feats = [torch.randn(len(c), 3, dtype=torch.float64, requires_grad=True) for c in coords]
    torch.compiler.reset()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = torch.compile(run, backend="aot_eager")(*feats)
    assert not [w for w in seen if "does not know how to trace" in str(w.message)]
    want = run(*feats)
    assert torch.equal(got, want)
    g1 = torch.autograd.grad(got.square().sum(), feats)
    g2 = torch.autograd.grad(want.square().sum(), feats)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    torch.compiler.reset()
    with pytest.raises(Exception, match="skipped|disable"):
        torch.compile(run, fullgraph=True, backend="aot_eager")(*feats)


def test_nearest_devoxelize_after_a_voxel_prune_compiles():
    """Nearest devoxelize of a tensor pruned at stride 1 (VoxelPrune, then a
    submanifold conv on the kept voxels) maps voxelize's inverse through the
    kept rows (zeros for the points of dropped voxels) in a graph too: all in
    one graph (with gradients), a compiled model's output devoxelized in
    eager mode, and a compiled conv on voxels pruned in eager mode; in each
    eager's values (the graph read feats[inverse] of the kept rows)."""
    torch.manual_seed(0)
    prune, conv = spnn.VoxelPrune(0.5), spnn.Conv3d(4, 3, 3).double()

    def run(points, feats):
        x, inverse = ps.voxelize(points, feats, voxel_size=0.5)
        return ps.devoxelize(conv(prune(x)), inverse)

    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="aot_eager")
    model = torch.compile(torch.nn.Sequential(prune, conv), fullgraph=True, dynamic=True, backend="eager")
    later = torch.compile(conv, fullgraph=True, dynamic=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n, seed in ((500, 1), (800, 2)):
            points, feats = _points_and_voxels(n, seed)
            got, want = compiled(points, feats), run(points, feats)
            assert (want == 0).all(1).sum() > 10 and (want != 0).any(1).sum() > 10
            assert torch.allclose(got, want, rtol=0, atol=1e-12)
            g1, = torch.autograd.grad(got.square().sum(), feats)
            g2, = torch.autograd.grad(want.square().sum(), feats)
            assert torch.allclose(g1, g2, rtol=0, atol=1e-10)
            x, inverse = ps.voxelize(points, feats.detach(), voxel_size=0.5)
            with torch.no_grad():
                want = run(points, feats.detach())
                assert torch.allclose(ps.devoxelize(model(x), inverse), want, rtol=0, atol=1e-12)
                assert torch.allclose(ps.devoxelize(later(prune(x)), inverse), want, rtol=0, atol=1e-12)


def test_spvcnn_compiles_in_one_graph():
    """SPVCNN's point branch (trilinear devoxelize, point-to-voxel rows) and
    the voxelisation of its input, all inside one graph."""
    torch.manual_seed(0)
    model = SPVCNN(4, 3, cr=0.125, blocks=1).double().eval()

    def run(points, feats):
        x, inverse = ps.voxelize(points, feats, voxel_size=0.5)
        return model(x, inverse, points * 2, torch.zeros(len(points), dtype=torch.long))

    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for n, seed in ((500, 1), (800, 2)):
            points, feats = _points_and_voxels(n, seed)
            assert torch.allclose(compiled(points, feats), run(points, feats), rtol=0, atol=1e-12)


class _Pools(torch.nn.Module):
    """Max and average pooling (k2 s2, and k3 s2 whose windows overlap) between convs, back up by a
    transposed conv onto the pooled coords' finer ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = spnn.Conv3d(3, 4, 3)
        self.max, self.avg = spnn.MaxPool3d(2), spnn.AvgPool3d(3, 2)
        self.mid = spnn.Conv3d(4, 4, 3)
        self.up = spnn.Conv3d(4, 4, 2, stride=2, transposed=True)

    def forward(self, x):
        y = self.conv(x)
        z = spnn.add(self.max(y), self.avg(y))
        return spnn.cat([self.up(self.mid(z)), y])


class _Classifier(torch.nn.Module):
    """Convs, a global pooling and a Linear: one row of class logits per batch item, from plain tensors."""

    def __init__(self, pool: torch.nn.Module) -> None:
        super().__init__()
        self.conv, self.down = spnn.Conv3d(3, 8, 3), spnn.Conv3d(8, 16, 2, stride=2)
        self.pool, self.fc = pool, torch.nn.Linear(16, 5)

    def forward(self, feats, coords):
        return self.fc(self.pool(self.down(self.conv(ps.SparseTensor(feats, coords, validate=False)))))


def _batched_cloud(items: int, seed: int, dtype=torch.float64):
    """(feats, coords) of ``items`` batch items of 200 random sites each."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.cat([torch.cat([torch.full((200, 1), b, dtype=torch.int32),
                                   torch.randint(0, 10, (200, 3), generator=g, dtype=torch.int32)], 1)
                        for b in range(items)]).unique(dim=0)
    return torch.randn(len(coords), 3, generator=g, dtype=dtype), coords


@pytest.mark.parametrize("pool", [spnn.GlobalAvgPool, spnn.GlobalMaxPool])
def test_global_pooling_compiles_trains_and_exports(pool):
    """A classifier ending in a global pooling (its dense (B, C) output sized by the data: the graph reads B
    from ``pointsparse::batch_counts``): the compiled training step equals eager (outputs 1e-12, gradients
    1e-10) on clouds of 3 and 5 batch items without recompiling, and its exported program, traced on 3
    items, gives eager's logits bit for bit on 5; the output-size limit holds in the graph too."""
    torch.manual_seed(0)
    eager = _Classifier(pool()).double()
    assert eager(*_batched_cloud(3, 1)).shape == (3, 5)
    _training_step_matches_eager(eager, copy.deepcopy(eager), [_batched_cloud(3, 1), _batched_cloud(5, 2)])
    eager.eval()
    rows = torch.export.Dim("voxels", min=2)
    program = torch.export.export(eager, _batched_cloud(3, 1), dynamic_shapes=({0: rows}, {0: rows})).module()
    with torch.no_grad():
        assert torch.equal(program(*_batched_cloud(5, 2)), eager(*_batched_cloud(5, 2)))
        feats, coords = _batched_cloud(1, 3)
        far = coords.clone()
        far[-1, 0] = 2**31 - 1
        with pytest.raises(ValueError, match=r"\(2147483648, 16\).*GiB limit"):
            program(feats, far)


class _PrunedClassifier(torch.nn.Module):
    """A conv, a VoxelPrune by threshold (which may drop a batch item's every voxel), a global pooling and a
    Linear, from plain tensors."""

    def __init__(self, pool: torch.nn.Module) -> None:
        super().__init__()
        self.conv, self.prune = spnn.Conv3d(3, 8, 3), spnn.VoxelPrune(threshold=1.0)
        self.pool, self.fc = pool, torch.nn.Linear(8, 5)

    def forward(self, feats, coords):
        x = ps.SparseTensor(feats, coords, validate=False)
        return self.fc(self.pool(self.conv(self.prune(x))))


def _cloud_losing(items: int, emptied: int, seed: int):
    """_batched_cloud whose item ``emptied`` scores under _PrunedClassifier's threshold on every voxel."""
    feats, coords = _batched_cloud(items, seed)
    feats = feats.abs() + 1.0
    feats[coords[:, 0] == emptied] = 0.01
    return feats, coords


@pytest.mark.parametrize("pool", [spnn.GlobalAvgPool, spnn.GlobalMaxPool])
def test_global_pooling_of_a_pruned_item_compiles_and_exports(pool):
    """In a graph too the pooled rows are one per batch item of the graph's input, where a VoxelPrune dropped
    every voxel of the last one (it gave B - 1 rows, the count read from the kept voxels): the compiled
    training step equals eager, and the exported program (traced on 3 items, none emptied) gives eager's
    logits bit for bit on 4 items with the last, or a middle one, emptied."""
    torch.manual_seed(0)
    eager = _PrunedClassifier(pool()).double()
    assert eager(*_cloud_losing(3, 2, 1)).shape == (3, 5)
    _training_step_matches_eager(eager, copy.deepcopy(eager), [_cloud_losing(3, 2, 1), _cloud_losing(4, 1, 2)])
    eager.eval()
    rows = torch.export.Dim("voxels", min=2)
    program = torch.export.export(eager, _cloud_losing(3, 5, 3), dynamic_shapes=({0: rows}, {0: rows})).module()
    with torch.no_grad():
        for emptied in (3, 1):
            got, want = program(*_cloud_losing(4, emptied, 4)), eager(*_cloud_losing(4, emptied, 4))
            assert got.shape == (4, 5) and torch.equal(got, want)


def test_pooling_compiles_trains_and_exports():
    torch.manual_seed(0)
    eager = _Pools().double()
    _training_step_matches_eager(eager, copy.deepcopy(eager),
                                 [_cloud(n, seed, dtype=torch.float64) for n, seed in ((400, 1), (700, 2))])
    net = _Pools().eval()
    program = export.export_model(net, _cloud(500, 3))
    for n, seed in ((400, 4), (900, 5)):
        x = _cloud(n, seed)
        with torch.no_grad():
            assert torch.equal(program.module()(x.feats, x.coords), net(x).feats)


class _InPlaceAfterMaxPools(torch.nn.Module):
    """In-place ReLUs on a max pooling's and a global max pooling's outputs."""

    def forward(self, x):
        y = spnn.MaxPool3d(2)(x)
        return spnn.GlobalMaxPool()(y.with_feats(y.feats.relu_())).relu_()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_in_place_op_after_max_pooling_compiles_with_gradients(backend):
    """In a graph run by ``backend="eager"`` the max poolings' backward read
    the outputs they returned, which an in-place ReLU had changed: autograd's
    "modified by an inplace operation" (as in eager mode); now eager's
    gradients."""
    x = _cloud(400, 1, dtype=torch.float64)
    grads = []
    for run in (_InPlaceAfterMaxPools(), torch.compile(_InPlaceAfterMaxPools(), fullgraph=True, backend=backend)):
        feats = x.feats.clone().requires_grad_()
        out = run(x.with_feats(feats * 1.0))
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(feats.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


class _PooledClassifier(torch.nn.Module):
    """_Classifier taking a SparseTensor, as a model export_model is given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.down = spnn.Conv3d(3, 8, 3), spnn.Conv3d(8, 16, 2, stride=2)
        self.pool, self.fc = spnn.GlobalMaxPool(), torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.pool(self.down(self.conv(x))))


def _sparse_equal(a: ps.SparseTensor, b: ps.SparseTensor) -> bool:
    return a.stride == b.stride and torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)


@pytest.mark.parametrize("ends", ["stride 4", "max pool", "voxel prune"])
def test_export_model_of_a_sparse_output_elsewhere(tmp_path, ends):
    """A model ending off its input's coords (a backbone at stride 4, a pooling, a VoxelPrune at the end)
    exports to a program of its output SparseTensor: (feats, coords, stride), the number of output rows
    dynamic; saved, loaded and run through ProgramModel on clouds of other sizes and of two batch items it
    gives eager's output bit for bit at its stride (an empty input: an empty output)."""
    torch.manual_seed(0)
    model = {"stride 4": torch.nn.Sequential(spnn.Conv3d(3, 8, 3), spnn.Conv3d(8, 8, 2, stride=2), spnn.ReLU(),
                                             spnn.Conv3d(8, 16, 3, stride=2)),
             "max pool": torch.nn.Sequential(spnn.Conv3d(3, 4, 3), spnn.MaxPool3d(2)),
             "voxel prune": torch.nn.Sequential(spnn.Conv3d(3, 4, 3), spnn.VoxelPrune(0.5))}[ends].eval()
    stride = {"stride 4": (4, 4, 4), "max pool": (2, 2, 2), "voxel prune": (1, 1, 1)}[ends]
    program = export.export_model(model, _cloud(500, 3))
    export.save(program, tmp_path / "m.pt2", {"what": ends})
    loaded = export.ProgramModel.load(tmp_path / "m.pt2")
    assert export.output_kind(program) == "sparse"
    assert (loaded.output, loaded.output_stride, loaded.out_shape, loaded.num_classes) == \
        ("sparse", stride, (model[-1].out_channels if ends == "stride 4" else 4,), None)
    assert "output='sparse'" in repr(loaded) and loaded.meta == {"what": ends}
    for x in (_cloud(400, 4), _cloud(900, 5), _two_items(600, 6)):
        with torch.no_grad():
            want = model(x)
            got = loaded(x)
            feats, coords, out_stride, *kept = program.module()(x.feats, x.coords)
        assert len(kept) == (2 if ends == "voxel prune" else 0)  # a selection's record: its rows, of n
        if kept:
            assert torch.equal(kept[0], want.cache.kept[stride][0]) and kept[1] == len(x)
        assert want.stride == stride and len(want) < len(x)
        assert _sparse_equal(got, want)
        assert torch.equal(feats, want.feats) and torch.equal(coords, want.coords)
        assert out_stride.tolist() == list(stride)
    empty = loaded(ps.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32)))
    assert empty.feats.shape == (0, loaded.out_shape[0]) and empty.stride == stride


def test_program_of_a_stride_1_voxel_prune_devoxelizes_as_eager(tmp_path):
    """A model ending in a stride-1 VoxelPrune and a submanifold conv on the kept voxels: its program (saved
    and loaded) and its compiled form give outputs that devoxelize with voxelize's inverse as eager's do (the
    kept voxel's row, zeros for the points of dropped voxels) on a batch of two items, on an input that is
    itself a selection (the selections compose) and on an empty selection; the program's output came back
    with a fresh coordinate cache, so a point whose voxel row is below K read another voxel's feats (and the
    whole inverse was refused). A model ending at stride 2 after the prune has no record there, as eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(spnn.VoxelPrune(0.5), spnn.Conv3d(3, 4, 3)).eval()
    loaded = _program_round_trip(model, _cloud(500, 3), tmp_path)
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    g = torch.Generator().manual_seed(1)
    points = torch.rand(900, 3, generator=g) * 6
    x, inverse = ps.voxelize(points, torch.randn(900, 3, generator=g), voxel_size=0.5,
                             batch=(torch.arange(900) >= 500).long())
    selection = spnn.VoxelPrune(0.7)(x)
    nothing = spnn.VoxelPrune(threshold=1e9)(x)
    assert x.batch_size == 2 and len(nothing) == 0
    for inp in (x, selection, nothing):
        with torch.no_grad():
            eager = model(inp)
            outs = (loaded(inp), compiled(inp)) if len(inp) else (loaded(inp),)
        want = ps.devoxelize(eager, inverse)
        for got in outs:
            assert _sparse_equal(got, eager)
            assert torch.equal(ps.devoxelize(got, inverse), want)
        if not len(inp):
            assert torch.equal(want, torch.zeros(len(inverse), 4))
            continue
        low = inverse < len(eager)  # every row below K: read straight, no range check tells
        assert 0 < len(eager) < len(inp) and low.sum() > 10 and (want == 0).all(1).sum() > 10
        assert not torch.equal(eager.feats[inverse[low]], want[low])
        for got in outs:
            assert torch.equal(ps.devoxelize(got, inverse[low]), want[low])
    coarse = torch.nn.Sequential(spnn.VoxelPrune(0.5), spnn.Conv3d(3, 4, 2, stride=2)).eval()
    program = _program_round_trip(coarse, _cloud(500, 3), tmp_path, "coarse.pt2")
    with torch.no_grad():
        eager, got = coarse(x), program(x)
    rows = torch.arange(len(eager)).flip(0)
    assert got.stride == (2, 2, 2) and torch.equal(ps.devoxelize(got, rows), ps.devoxelize(eager, rows))


@pytest.mark.parametrize("stride", [1, 2])
def test_program_output_of_a_selection_keeps_the_batch_items(tmp_path, stride):
    """A model ending in a VoxelPrune by threshold (at stride 1, or after a conv down to stride 2) that drops
    every voxel of the last batch item: the program's output, as eager's, pools to one row per batch item of
    the input (the emptied item's row 0). The program's output came back with a fresh coordinate cache, so a
    global pooling of it counted the items left in its own coords and gave B - 1 rows, no longer lining up
    with the labels."""
    torch.manual_seed(0)
    head = [spnn.Conv3d(3, 4, 3)] if stride == 1 else [spnn.Conv3d(3, 4, 2, stride=2)]
    model = torch.nn.Sequential(*head, spnn.VoxelPrune(threshold=0.5)).eval()
    loaded = _program_round_trip(model, _cloud(500, 1), tmp_path)
    assert loaded.output_stride == (stride,) * 3
    last = _cloud(300, 4)
    x = ps.collate([_cloud(300, 3), last.with_feats(last.feats * 0)])  # every score of the last item is 0
    with torch.no_grad():
        eager, got = model(x), loaded(x)
    assert _sparse_equal(got, eager) and bool((eager.coords[:, 0] == 0).all())
    for pool in (spnn.functional.global_avg_pool, spnn.functional.global_max_pool):
        want = pool(eager)
        assert want.shape == (2, 4) and torch.equal(pool(got), want)


def test_program_of_a_coarse_voxel_prune_at_the_end_records_the_kept_voxels(tmp_path):
    """A VoxelPrune at stride 2 at a model's end (after a conv down, or followed by a submanifold conv on the
    kept voxels, two selections in a row): its program's output records which of the stride-2 voxels were
    kept, as eager's does, so devoxelize with an inverse into those voxels gives eager's values (the kept
    voxel's row, zeros for the points of dropped ones) and pools one row per batch item. The program gave a
    bare output at stride 2: an inverse row past the K kept was refused, one below K read another voxel's
    feats without a word. Composed with the record of an input that is itself a selection, as eager's."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(spnn.Conv3d(3, 4, 2, stride=2), spnn.VoxelPrune(0.5)),
              torch.nn.Sequential(spnn.Conv3d(3, 4, 3, stride=2), spnn.VoxelPrune(0.7), spnn.Conv3d(4, 4, 3),
                                  spnn.VoxelPrune(threshold=1e-3, score="learned", in_channels=4))]
    x = _two_items(900, 5)
    for i, model in enumerate(models):
        model.eval()
        loaded = _program_round_trip(model, _cloud(500, 1), tmp_path, f"coarse{i}.pt2")
        for inp in (x, spnn.VoxelPrune(0.6)(x)):
            with torch.no_grad():
                eager, got = model(inp), loaded(inp)
            assert got.stride == (2, 2, 2) and _sparse_equal(got, eager)
            rows, n = eager.cache.kept[(2, 2, 2)]
            assert 0 < len(eager) < n and torch.equal(got.cache.kept[(2, 2, 2)][0], rows)
            assert got.cache.kept[(2, 2, 2)][1] == n
            inverse = torch.arange(n).flip(0)  # an inverse into the n voxels the prune scored
            want = ps.devoxelize(eager, inverse)
            assert (want == 0).all(1).any() and torch.equal(ps.devoxelize(got, inverse), want)
            low = inverse[inverse < len(eager)]  # rows below K: read straight without the record
            assert torch.equal(ps.devoxelize(got, low), ps.devoxelize(eager, low))


def test_a_checkpoint_given_as_the_program_is_named_as_one(tmp_path):
    """A checkpoint (checkpoint.save's, or a plain torch.save) where a program is read (ProgramModel.load,
    eval --program for --checkpoint) was "not a program ..., or it is damaged" with torch's "We ran into an
    error when deserializing the saved file"; it is named as a torch.save file, and how to export it."""

    checkpoint.save(tmp_path / "run.pt", {"model": {"w": torch.ones(2)}, "config": {}})
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt2")
    for name in ("run.pt", "plain.pt2"):
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} is a torch\.save file \(a checkpoint\?\), "
                                             r"not an exported program.*pointsparse export --checkpoint"):
            export.ProgramModel.load(tmp_path / name)


def test_a_program_written_without_the_selection_record_still_loads_and_devoxelizes(tmp_path):
    """A sparse program of a stride-1 VoxelPrune written before programs gave their selection's record
    (feats, coords and stride only) loads and runs: ProgramModel finds the kept rows among the input's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(spnn.VoxelPrune(0.5), spnn.Conv3d(3, 4, 3)).eval()
    example, rows = _cloud(500, 1), torch.export.Dim("voxels", min=2)
    with torch.no_grad():
        program = torch.export.export(export.VoxelOutputs(model, (1, 1, 1)), (example.feats, example.coords),
                                      dynamic_shapes=({0: rows}, {0: rows}))
    export.save(program, tmp_path / "old.pt2")
    loaded = export.ProgramModel.load(tmp_path / "old.pt2")
    assert loaded.output == "sparse" and not loaded.records_kept
    x = _two_items(900, 5)
    inverse = torch.arange(len(x)).flip(0)
    with torch.no_grad():
        eager, got = model(x), loaded(x)
    assert _sparse_equal(got, eager) and torch.equal(ps.devoxelize(got, inverse), ps.devoxelize(eager, inverse))


def test_a_voxel_prune_that_keeps_every_voxel_of_the_example_exports_its_output_coords(tmp_path):
    """A threshold every voxel of the example passes (or a keep ratio that rounds up to all) kept the
    example's rows, so export wrote a logits program; on an input of weaker voxels it kept fewer and the
    loaded program gave a bare tensor of those rows, without their coords. A model with a VoxelPrune of its
    own at stride 1 exports its output's coords; a VoxelSkip's (every voxel kept) or a prune at a coarser
    stride (the transposed convs come back to the input's coords) still give logits on the input's rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(spnn.VoxelPrune(threshold=0.5), spnn.Conv3d(3, 4, 3)).eval()
    example = _cloud(500, 3)
    example = example.with_feats(example.feats.abs() + 1.0)  # every norm >= sqrt(3): all kept
    with torch.no_grad():
        assert len(model(example)) == len(example)
    loaded = _program_round_trip(model, example, tmp_path)
    x = _cloud(700, 4)
    with torch.no_grad():
        eager, got = model(x), loaded(x)
    assert 0 < len(eager) < len(x)
    assert isinstance(got, ps.SparseTensor) and _sparse_equal(got, eager)
    skip = torch.nn.Sequential(spnn.VoxelSkip(spnn.Conv3d(3, 3, 3), keep_ratio=0.5), spnn.Conv3d(3, 4, 3)).eval()
    assert _program_round_trip(skip, example, tmp_path, "skip.pt2").output == "logits"
    # a prune at stride 2 between a conv down and one back up: the output is on the input's coords, logits
    coarse = torch.nn.Sequential(spnn.Conv3d(3, 3, 2, stride=2), spnn.VoxelPrune(0.5),
                                 spnn.Conv3d(3, 4, 2, stride=2, transposed=True)).eval()
    program = _program_round_trip(coarse, example, tmp_path, "coarse.pt2")
    assert program.output == "logits"
    with torch.no_grad():
        assert _sparse_equal(program(x), coarse(x))


def test_export_model_of_a_classifier(tmp_path):
    """A classifier (convs, a global pooling, a Linear) exports to a program of its (B, K) tensor, the
    numbers of voxels and of batch items dynamic: saved and loaded, ProgramModel gives eager's logits bit
    for bit on 1 and 3 batch items and (0, K) for an empty input; eval and predict refuse it by name, as
    models returning what no program holds are refused by export_model."""
    torch.manual_seed(0)
    model = _PooledClassifier().eval()
    program = export.export_model(model, _cloud(500, 3))
    export.save(program, tmp_path / "c.pt2")
    loaded = export.ProgramModel.load(tmp_path / "c.pt2")
    assert (loaded.output, loaded.out_shape, loaded.output_stride) == ("tensor", (5,), None)
    assert export.output_kind(program) == "tensor"
    three = ps.collate([_cloud(300, 4), _cloud(500, 5), _cloud(200, 6)])
    for x in (_cloud(700, 7), three):
        with torch.no_grad():
            want = model(x)
            assert torch.equal(loaded(x), want)
        assert want.shape == (int(x.coords[:, 0].max()) + 1, 5)
    assert loaded(ps.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32))).shape == (0, 5)
    from pointsparse.app.evaluate import program_and_state

    with pytest.raises(ValueError, match=r"c\.pt2: the program gives tensor output, not logits"):
        program_and_state(tmp_path / "c.pt2")

    class Pair(torch.nn.Module):
        def forward(self, x):
            return x.feats, x.coords

    class Total(torch.nn.Module):
        def forward(self, x):
            return x.feats.sum()

    with pytest.raises(TypeError, match="returning a SparseTensor or a tensor of at least one dimension.*tuple"):
        export.export_model(Pair().eval(), _cloud(100, 1))
    with pytest.raises(TypeError, match="this one returns a 0-d tensor"):
        export.export_model(Total().eval(), _cloud(100, 1))


def _spatially_pruned(in_channels: int = 3, dtype=torch.float32) -> MinkUNet:
    """MinkUNet with every kind of spatial pruning in its decoder: VoxelPrune
    by magnitude before stage 0, by a learned score before stage 1, by a
    threshold before stage 2 (hooks, as bench/voxel_prune.py adds them), and
    VoxelSkip around the convs of stage 3's residual block."""
    torch.manual_seed(3)
    model = MinkUNet(in_channels, 5, cr=0.25, blocks=1).to(dtype)
    width = lambda j: next(m for m in model.fuse[j].modules() if isinstance(m, spnn.Conv3d)).in_channels  # noqa: E731
    pruners = [spnn.VoxelPrune(0.5), spnn.VoxelPrune(0.6, "learned", width(1)).to(dtype),
               spnn.VoxelPrune(threshold=1e-4)]
    for j, pruner in enumerate(pruners):
        model.add_module(f"voxel_prune_{j}", pruner)
        model.fuse[j].register_forward_pre_hook(lambda module, args, p=pruner: (p(args[0]),))
    block = model.fuse[3][-1]
    block.main = spnn.VoxelSkip(block.main, 0.5)
    return model


def _two_items(n: int, seed: int, dtype=torch.float32) -> ps.SparseTensor:
    return ps.collate([_cloud(n, seed, dtype=dtype), _cloud(n // 2, seed + 100, dtype=dtype)])


class _SpatialUNet(torch.nn.Module):
    """A small U-Net with every kind of spatial pruning at its coarse stride (VoxelPrune by magnitude, by a
    learned score, by a threshold) and VoxelSkip (its own forward) around a conv of the fine decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.down = spnn.Conv3d(3, 8, 3), spnn.Conv3d(8, 8, 2, stride=2)
        self.magnitude, self.learned = spnn.VoxelPrune(0.5), spnn.VoxelPrune(0.6, "learned", 8)
        self.threshold = spnn.VoxelPrune(threshold=1e-4)
        self.mid = torch.nn.Sequential(spnn.Conv3d(8, 8, 3), spnn.ReLU(), spnn.Conv3d(8, 8, 3))
        self.up = spnn.Conv3d(8, 8, 2, stride=2, transposed=True)
        self.skip = spnn.VoxelSkip(spnn.Conv3d(16, 16, 3), 0.5)
        self.head = spnn.Conv3d(16, 5, 1)

    def forward(self, x):
        a = self.stem(x)
        b = self.threshold(self.mid(self.learned(self.magnitude(self.down(a)))))
        c = spnn.cat([a, self.up(b)])
        return self.head(spnn.add(self.skip(c), c))


def test_spatial_pruning_compiles_and_trains_in_one_graph():
    # VoxelPrune's selection is an operator with a data-dependent row count; the kept voxels get a graph cache of
    # their own (the kept coords at their stride, the finer strides' coords and maps for the transposed convs)
    torch.manual_seed(0)
    eager = _SpatialUNet().double()
    _training_step_matches_eager(eager, copy.deepcopy(eager),
                                 [_two_items(n, seed, torch.float64) for n, seed in ((500, 1), (800, 2))])
    assert eager.learned.scorer.weight.grad.abs().sum() > 0  # the learned score trains in the graph too


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("breaks", [False, True])
def test_learned_voxel_prune_compiles_without_fullgraph(training, breaks, monkeypatch):
    """torch.compile's default (no fullgraph): one graph (the operators' data-dependent counts traced as
    under fullgraph), or (``breaks``) a graph break at keep_rows, as torch made at each such operator
    before, so the learned score reaches the next graph as an output of the one before.
    _SpatialUNet (every kind of VoxelPrune) compiled so, train and eval, equals eager: outputs and gradients.
    The score was a squeeze(1) view of the scorer's Linear output, returned with its detach: torch's
    AOTAutograd replayed that view on the wrong base and raised a bare IndexError ("Dimension out of
    range") from deep inside torch on the first call."""
    if breaks:
        keep_rows = ops.keep_rows

        def broken(*args):
            torch._dynamo.graph_break()
            return keep_rows(*args)

        monkeypatch.setattr(ops, "keep_rows", broken)
    torch.manual_seed(0)
    eager = _SpatialUNet().double().train(training)
    twin = copy.deepcopy(eager)
    torch.compiler.reset()
    compiled = torch.compile(twin, dynamic=True, backend="aot_eager")
    for n, seed in ((500, 1), (800, 2)):
        x = _two_items(n, seed, torch.float64)
        got, want = compiled(x), eager(x)
        assert torch.equal(got.coords, want.coords) and torch.allclose(got.feats, want.feats, rtol=0, atol=1e-12)
        got.feats.square().sum().backward()
        want.feats.square().sum().backward()
        for (name, p), q in zip(twin.named_parameters(), eager.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-10), name
    assert eager.learned.scorer.weight.grad.abs().sum() > 0


def test_spatially_pruned_model_exports_bit_for_bit(tmp_path):
    model = _spatially_pruned().eval()
    program = export.export_model(model, _two_items(600, 3))
    export.save(program, tmp_path / "m.pt2")
    loaded, _ = export.load(tmp_path / "m.pt2")
    seen = []
    for n, seed in ((500, 4), (900, 5)):
        x = _two_items(n, seed)
        with torch.no_grad():
            want = model(x).feats
        assert torch.equal(loaded.module()(x.feats, x.coords), want)
        seen.append(len(x))
    assert seen[0] != seen[1]
    # a threshold that keeps nothing: eager carries on with no voxel there, a graph (traced for at least one) says so
    skip = torch.nn.Sequential(spnn.Conv3d(3, 4, 3), spnn.VoxelSkip(spnn.Conv3d(4, 4, 3), 0.5)).eval()
    x = _cloud(700, 6)  # VoxelSkip's own forward (MinkUNet's blocks take add_to), on another size than the example
    with torch.no_grad():
        assert torch.equal(export.export_model(skip, _cloud(500, 5)).module()(x.feats, x.coords), skip(x).feats)
    model.voxel_prune_2.threshold = 1e9
    x = _two_items(500, 4)
    with torch.no_grad():
        assert model(x).feats.shape == (len(x), 5)
    with pytest.raises(ValueError, match=r"VoxelPrune\(threshold=1000000000.0\) kept no voxel"):
        export.export_model(model, x).module()(x.feats, x.coords)


def test_a_selection_of_a_selection_in_a_graph_restricts_its_maps_without_a_search():
    """_SpatialUNet selects three times in a row at its coarse stride (by magnitude, by a learned score, by a
    threshold after two convs): the second selection's graph cache restricted only the maps the first held, not
    those the first had still to restrict, so the transposed conv back up searched the downsampling map onto the
    kept coords (a kmap_build with out coords given). Now every selection restricts the source map through the
    rows of the selections before it: no such search in the program, and eager's values bit for bit."""
    torch.manual_seed(0)
    model = _SpatialUNet().eval()
    program = export.export_model(model, _two_items(600, 3))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    builds = [n for n in calls if n.target == torch.ops.pointsparse.kmap_build.default]
    assert builds and all(n.args[1] is None for n in builds)  # (no map onto given out coords: none searched)
    assert sum(n.target == torch.ops.pointsparse.kmap_restrict.default for n in calls) == 1
    x = _two_items(900, 5)
    with torch.no_grad():
        assert torch.equal(program.module()(x.feats, x.coords), model(x).feats)


def test_exported_program_runs_under_inference_mode(tmp_path):
    # torch.inference_mode makes the graph's pair tensors inference tensors, which keep no version counter:
    # the plan cache must not read one (it raised "Inference tensors do not track version counter")
    torch.manual_seed(0)
    model = _trained_like(MinkUNet(3, 5, cr=0.25, blocks=1))
    export.save(export.export_model(model, _cloud(600, 1)), tmp_path / "m.pt2")
    program = export.ProgramModel.load(tmp_path / "m.pt2")
    for n, seed in ((500, 2), (800, 3)):
        x = _cloud(n, seed)
        with torch.no_grad():
            want = model(x).feats
        with torch.inference_mode():
            got = program(x).feats
            again = program(x).feats  # the same maps' plans again, a run later
        assert got.is_inference()
        assert torch.equal(got, want) and torch.equal(again, want)
    torch.compiler.reset()  # a compiled model runs the same operators
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.inference_mode():
        assert torch.allclose(compiled(x).feats, want, rtol=0, atol=1e-6)


# --- torch.export ----------------------------------------------------------------------------------------

def _checkpoint(tmp_path, model: torch.nn.Module, config: dict):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": config}, path)
    return path


def _config(**kw):
    return {"in_channels": 7, "classes": ["a", "b", "c", "d"], "cr": 0.25, "blocks": 1, "voxel_size": 0.4,
            "ignore_index": 255, "model": "minkunet", **kw}


def _trained_like(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


_CHILD = """
import json, sys, torch
import pointsparse
from pointsparse import export
program, meta = export.load(sys.argv[1])
out = {}
for name in sys.argv[2:]:
    inputs = torch.load(name)
    with torch.no_grad():
        logits = program.module()(inputs["feats"], inputs["coords"])
    out[name] = torch.equal(logits.argmax(1), inputs["pred"]) and bool(torch.allclose(logits, inputs["logits"], rtol=0, atol=1e-5))
print(json.dumps({"meta": meta, "ok": out}))
"""


def _scenes(tmp_path, model, config, datasets):
    """Inputs (generated scene, real scan if present) and the eager model's predictions, saved for the child."""
    from pointsparse.data import generated
    from pointsparse.data.readers import read_semantickitti
    from pointsparse.data.transforms import voxelize_sample

    samples = [generated.outdoor_scene(seed=7, beams=16, azimuth_steps=384)]
    scan = None if datasets is None else datasets / "semantickitti/full-scan/velodyne/000000.bin"
    if scan is not None and scan.is_file():
        samples.append(read_semantickitti(scan))
    names = []
    for i, sample in enumerate(samples):
        v = voxelize_sample(sample, config["voxel_size"], 255)
        with torch.no_grad():
            logits = model(ps.SparseTensor(v.feats, v.coords)).feats
        names.append(str(tmp_path / f"scene{i}.pt"))
        torch.save({"feats": v.feats, "coords": v.coords, "logits": logits, "pred": logits.argmax(1)}, names[-1])
    return names


def test_export_cli_round_trip_in_fresh_process(tmp_path):
    from conftest import find_datasets

    model = _trained_like(MinkUNet(7, 4, cr=0.25, blocks=1))
    config = _config()
    ckpt = _checkpoint(tmp_path, model, config)
    out = tmp_path / "programs" / "v1" / "model.pt2"  # (folders it makes, as eval's and predict's --out)
    from pointsparse.app.cli import main

    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    names = _scenes(tmp_path, model, config, find_datasets())
    proc = run_python(_CHILD.replace("sys.argv[1]", repr(str(out))).replace("sys.argv[2:]", repr(names)),
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["meta"]["classes"] == config["classes"] and result["meta"]["voxel_size"] == 0.4
    assert all(result["ok"].values()) and len(result["ok"]) == len(names)


def test_export_channel_pruned_checkpoint(tmp_path):
    model = _trained_like(MinkUNet(7, 4, cr=0.25, blocks=1))
    group = next(g for g in surgery.channel_groups(model) if g.consumer is not None)
    surgery.apply_channel_ratios(model, {group.producer: 0.5})
    ckpt = _checkpoint(tmp_path, model, _config())
    loaded, config = export.load_checkpoint(ckpt)
    x = export.example_input(7, 0.4, seed=3)
    program = export.export_model(loaded, x)
    y = _cloud(900, 6, channels=7)
    with torch.no_grad():
        assert torch.allclose(program.module()(y.feats, y.coords), model(y).feats, rtol=0, atol=1e-5)


def test_export_loads_checkpoints_as_load_model_does(tmp_path):
    """One loader: ``export.load_checkpoint`` gives ``models.load_model``'s
    model (a channel-pruned checkpoint whose config records no widths
    included) and the checkpoint's config."""
    from pointsparse.models import load_model

    model = _trained_like(MinkUNet(7, 4, cr=0.25, blocks=1))
    group = next(g for g in surgery.channel_groups(model) if g.consumer is not None)
    surgery.apply_channel_ratios(model, {group.producer: 0.5})
    ckpt = _checkpoint(tmp_path, model, _config())
    exported, config = export.load_checkpoint(ckpt)
    loaded = load_model(ckpt)
    assert config == _config() and not exported.training and not loaded.training
    y = _cloud(700, 5, channels=7)
    with torch.no_grad():
        assert torch.equal(exported(y).feats, loaded(y).feats)
        assert torch.equal(loaded(y).feats, model.eval()(y).feats)


def test_export_errors_are_clear(tmp_path):
    x = export.example_input(7, 0.4)
    model = MinkUNet(7, 4, cr=0.25, blocks=1)
    with pytest.raises(ValueError, match="model.eval"):
        export.export_model(model, x)
    with pytest.raises(TypeError, match=r"example must be SPVCNN's arguments \(voxels: SparseTensor, inverse"):
        export.export_model(SPVCNN(7, 4, cr=0.25, blocks=1).eval(), x)
    with pytest.raises(TypeError, match="example"):
        export.export_model(model.eval(), x.feats)
    with pytest.raises(ValueError, match="does not exist"):
        export.load_checkpoint(tmp_path / "missing.pt")
    class Sum(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    other = torch.export.export(Sum(), (torch.ones(4, 3), torch.ones(4, 3)),
                                dynamic_shapes=({1: torch.export.Dim("c")}, {1: torch.export.Dim("c")}))
    with pytest.raises(ValueError, match=r"with C and K fixed, as export_model writes"):
        export.ProgramModel(other)

    class Three(torch.nn.Module):
        def forward(self, a, b, c):
            return a + b + c

    three = torch.export.export(Three(), (torch.ones(4, 3),) * 3)
    for read in (export.ProgramModel, export.output_kind):  # (the kind is read off what export_model writes only)
        with pytest.raises(ValueError, match=r"program must take \(feats, coords\) or .* it takes \['a', 'b', 'c'\] "
                                             r"and gives 1 outputs"):
            read(three)
    with pytest.raises(TypeError, match="program must be a torch.export.ExportedProgram"):
        export.ProgramModel(model)
    program = export.export_model(model.eval(), x)
    bad = x.coords.clone()
    bad[1] = bad[0]
    with pytest.raises(ValueError, match="duplicate"):
        program.module()(x.feats, bad)


@pytest.mark.skipif(not ps._ext.core.conv_bf16(), reason="the CPU has no AVX512-BF16")
def test_exported_bf16_vector_pruned_model_runs_the_bf16_kernels(monkeypatch, tmp_path):
    """A fused MinkUNet with whole bf16 vectors pruned (rows=2), in bfloat16,
    exported and loaded back: its conv operator runs the bf16 kernels (the
    vector form included, the residual sums and ReLUs in its store through
    conv_inference) and the logits equal eager bf16 inference bit for bit."""
    from pointsparse import prune
    from pointsparse.nn import _engine

    torch.manual_seed(0)
    net = spnn.fuse_for_inference(_trained_like(MinkUNet(3, 5, cr=0.25, blocks=1)))
    for module in net.modules():
        if isinstance(module, spnn.Conv3d) and module.weight.shape[0] > 1:
            prune.panel_structured(module, "weight", 0.75, rows=2)
            prune.remove(module, "weight")
    net = net.to(torch.bfloat16)
    x = _cloud(3000, 3)
    xb = ps.SparseTensor(x.feats.bfloat16(), x.coords)
    with torch.no_grad():
        eager = net(xb).feats.float()
    path = tmp_path / "bf16.pt2"
    export.save(export.export_model(net, xb), path)
    program, _ = export.load(path)
    calls, real = [], _engine.bf16_forward
    monkeypatch.setattr(_engine, "bf16_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out = program.module()(xb.feats, xb.coords)
    assert out.dtype == torch.bfloat16 and len(calls) >= 10
    assert torch.equal(out.float(), eager)  # residual sums and ReLUs in the store, as in eager inference


def _refuse(*args, **kwargs):
    raise AssertionError("this path must not run here")


@pytest.mark.parametrize("inference", ["fused", "bf16", "bf16 without AVX512-BF16"])
def test_export_cli_inference_forms(monkeypatch, tmp_path, inference):
    """``pointsparse export --inference fused|bf16``: the program of the model
    ``pointsparse eval --inference`` scores (masks permanent, BatchNorm
    folded; bf16 feats and logits), its form named in the file. Where the
    bf16 kernels do not run (a CPU without AVX512-BF16; here switched off),
    the program's convs run the float32 kernels on the widened values as
    eager inference does, never the torch loop in bfloat16."""
    from pointsparse.app.cli import main
    from pointsparse.app.evaluate import inference_model
    from pointsparse.nn import _engine, reference

    if inference == "bf16" and not ps._ext.core.conv_bf16():
        pytest.skip("the CPU has no AVX512-BF16 (the case below runs that path)")
    if inference.startswith("bf16 without"):
        inference = "bf16"
        monkeypatch.setattr(_engine, "bf16_kernels", lambda: False)
        monkeypatch.setattr(_engine, "bf16_forward", _refuse)
        monkeypatch.setattr(reference, "conv_sum", _refuse)
    model = _trained_like(MinkUNet(7, 4, cr=0.25, blocks=1))
    ckpt = _checkpoint(tmp_path, model, _config())
    out = tmp_path / f"{inference}.pt2"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--inference", inference]) == 0
    program, meta = export.load(out)
    assert meta["inference"] == inference
    reference = inference_model(export.load_checkpoint(ckpt)[0], inference)
    dtype = torch.bfloat16 if inference == "bf16" else torch.float32
    y = _cloud(900, 6, channels=7, dtype=dtype)
    with torch.no_grad():
        got, want = program.module()(y.feats, y.coords), reference(y).feats
    assert got.dtype == dtype and torch.equal(got, want)  # the same kernels, epilogues included


def test_graph_maps_trust_only_coords_the_graph_checked_or_made():
    """In an exported MinkUNet the first map built on the input coords is
    untrusted (it checks them: duplicates raise), every later map on them,
    and every map on coords the graph downsampled itself, is trusted (no
    check, a 1x1x1 map without a search); its k2 s2 maps come with their
    output coords (kmap_parents); a graph of one 1x1x1 conv on its input
    checks the input all the same."""
    x = export.example_input(7, 0.4)
    program = export.export_model(_trained_like(MinkUNet(7, 4, cr=0.25, blocks=1)), x)
    flags = [n.args[3] if len(n.args) > 3 else n.kwargs.get("trusted", False)
             for n in program.graph.nodes if n.op == "call_function" and "kmap_build" in str(n.target)]
    assert flags[0] is False and all(flags[1:]) and len(flags) > 5
    # the k2 s2 maps make their output coords themselves (one pass), no downsample of their own
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("kmap_parents" in t for t in targets) >= 2 and not any("downsample" in t for t in targets)
    one = export.export_model(torch.nn.Sequential(spnn.Conv3d(7, 4, 1)).eval(), x)
    bad = x.coords.clone()
    bad[1] = bad[0]
    with pytest.raises(ValueError, match="duplicate"):
        one.module()(x.feats, bad)


def test_graph_plans_a_transposed_map_as_its_downsampling_maps_plan_transposed(monkeypatch):
    """In an exported MinkUNet each transposed conv's plan is the plan of
    the k2 s2 map it transposes, transposed (no pass over its pairs, as the
    eager cache does): no plan is built from a transposed map's pairs, every
    other map's once, and the logits equal eager inference bit for bit."""
    from pointsparse.nn import _engine

    model = spnn.fuse_for_inference(_trained_like(MinkUNet(7, 4, cr=0.25, blocks=1)))
    x = export.example_input(7, 0.4)
    y = _cloud(1500, 8, channels=7)
    program = export.export_model(model, x).module()
    built, transposed = [], []
    make, flip = _engine.make_fused_plan, _engine.transposed_plan
    monkeypatch.setattr(_engine, "make_fused_plan", lambda kmap: built.append(kmap.key) or make(kmap))
    monkeypatch.setattr(_engine, "transposed_plan", lambda plan: transposed.append(plan) or flip(plan))
    with torch.no_grad():
        got = program(y.feats, y.coords)
    ups = [n for n in program.graph.nodes if n.op == "call_function" and "kmap_transpose" in str(n.target)]
    assert len(ups) == 4 and len(transposed) == 4
    assert built and not any(key.transposed for key in built) and len(set(built)) == len(built)
    with torch.no_grad():
        assert torch.equal(got, model(y).feats)


def test_load_names_a_file_that_is_no_exported_program(tmp_path, caplog):
    """export.load on an empty file, text, random bytes, a torch.save file
    (a zip, but no program) or the first half of one: a ValueError naming the
    file (was zipfile's BadZipFile or torch's RuntimeError), and no traceback
    logged by torch.export's reader before it; a missing path:
    FileNotFoundError naming it."""
    import logging
    import os

    caplog.set_level(logging.WARNING)

    files = {"empty.pt2": b"", "text.pt2": b"not a program\n", "garbage.pt2": os.urandom(4096)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "saved.pt2")
    (tmp_path / "half.pt2").write_bytes((tmp_path / "saved.pt2").read_bytes()[:3000])
    for name in [*files, "saved.pt2", "half.pt2"]:
        what = "is a torch.save file" if name == "saved.pt2" else "is not a program written by pointsparse.export.save"
        with pytest.raises(ValueError, match=what) as info:
            export.load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    assert "Traceback" not in caplog.text and "deserializing" not in caplog.text, caplog.text[:500]
    with pytest.raises(FileNotFoundError, match="missing.pt2"):
        export.load(tmp_path / "missing.pt2")


class _Payload:
    """Unpickling this runs code (it touches a file)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.target),))


@pytest.mark.parametrize("member", ["sample inputs", "pickled weight"])
def test_a_program_holding_pickled_code_is_refused_and_the_code_never_runs(tmp_path, member):
    """torch.export.load unpickles a program's sample inputs with weights_only=False where the data-only
    read fails, and any weight or constant its config marks use_pickle with weights_only=False: a .pt2 with
    such a member (here one whose unpickling touches a file) ran its code in export.load, ProgramModel.load
    and so eval / predict --program. The file is refused naming it and the member, before torch reads it;
    export_model's programs (tensors only) still load."""
    import io
    import zipfile

    marker = tmp_path / "ran"
    export.save(export.export_model(spnn.Conv3d(2, 3, 3).eval(), _cloud(50, 1, 2)), tmp_path / "good.pt2")
    assert export.load(tmp_path / "good.pt2")[1] == {}
    payload = io.BytesIO()
    torch.save((_Payload(str(marker)),), payload)
    with zipfile.ZipFile(tmp_path / "good.pt2") as good, zipfile.ZipFile(tmp_path / "evil.pt2", "w") as evil:
        for name in good.namelist():
            data = good.read(name)
            if member == "sample inputs" and name.endswith("data/sample_inputs/model.pt"):
                data = payload.getvalue()
            elif member == "pickled weight" and name.endswith("data/weights/weight_0"):
                data = payload.getvalue()
            elif member == "pickled weight" and name.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                assert first["path_name"] == "weight_0"
                first["use_pickle"] = True
                data = json.dumps(config).encode()
            evil.writestr(name, data)
    for load in (export.load, export.ProgramModel.load):
        with pytest.raises(ValueError, match=r"evil\.pt2: its member .* pickled Python objects"):
            load(tmp_path / "evil.pt2")
    assert not marker.exists()


def _with_graph_json(good, evil, edit) -> None:
    """Copy the program ``good`` to ``evil`` with its ``models/model.json`` passed through ``edit``."""
    import zipfile

    with zipfile.ZipFile(good) as source, zipfile.ZipFile(evil, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("models/model.json"):
                graph = json.loads(data)
                edit(graph)
                data = json.dumps(graph).encode()
            target.writestr(name, data)


def _first_expression(value):
    """The first dict holding an ``expr_str`` in the JSON ``value``, or None."""
    if isinstance(value, dict):
        if isinstance(value.get("expr_str"), str):
            return value
        value = list(value.values())
    if isinstance(value, list):
        return next((found for item in value if (found := _first_expression(item)) is not None), None)
    return None


@pytest.mark.parametrize("field", ["a shape expression", "a guard", "a guard's message"])
def test_a_program_whose_graph_holds_python_code_is_refused_and_the_code_never_runs(tmp_path, field):
    """torch.export.load reads each symbolic size of a program (``expr_str``, sympy's srepr) with
    sympy.sympify, an eval, and ``program.module()`` (ProgramModel's) execs the program's guards
    (``guards_code``) as Python: a .pt2 whose graph held code there (here code that touches a file)
    ran it in export.load, ProgramModel.load and so eval / predict --program, though it holds no
    pickle. Each expression is read as sympy's constructors of numbers and symbols, each guard as a
    comparison of the inputs' sizes, before torch reads the file: anything else is a ValueError
    naming the file and the expression; export_model's programs still load and run."""
    marker = tmp_path / "ran"
    good = tmp_path / "good.pt2"
    x = _cloud(50, 1, 2)
    export.save(export.export_model(spnn.Conv3d(2, 3, 3).eval(), x), good)
    assert export.ProgramModel.load(good)(x).feats.shape == (50, 3)
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def edit(graph):
        if field == "a shape expression":
            found = _first_expression(graph)
            found["expr_str"] = f"({touch} and 0) or {found['expr_str']}"
        elif field == "a guard":
            graph["guards_code"] = [f"{touch} is None", *graph["guards_code"]]
        else:  # (a quote in a path's key closes the string literal of the message torch writes the guard into)
            quoted = f'__import__("pathlib").Path("{marker}").touch()'
            graph["guards_code"] = [f"True or L['feats\") or {quoted} or (\"'].size()[0] >= 0", *graph["guards_code"]]

    _with_graph_json(good, tmp_path / "evil.pt2", edit)
    for load in (export.load, export.ProgramModel.load):  # (before the fix: the last ran it when called on x)
        with pytest.raises(ValueError, match=r"evil\.pt2: its graph holds .* which torch would run as Python code"):
            load(tmp_path / "evil.pt2")
    assert not marker.exists()


def test_a_program_whose_shape_expressions_or_guards_are_numerically_huge_is_refused_at_once(tmp_path):
    """A shape expression the code check passes (sympy's constructors of numbers) can still ask sympy for a
    number it never finishes computing when torch.export.load reads it (a tower of powers, a huge exponent,
    factorial of a large integer, a Float of a billion bits of precision), and a guard can ask Python for one
    each time the program runs; a chain of a thousand additions raised a RecursionError from load. Each is
    a ValueError naming the file and what pointsparse reads, before torch reads it. Loaded in a child with a
    time limit: without the refusal the first of them never returned."""
    import subprocess

    good = tmp_path / "good.pt2"
    x = _cloud(50, 1, 2)
    export.save(export.export_model(spnn.Conv3d(2, 3, 3).eval(), x), good)
    with __import__("zipfile").ZipFile(good) as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        symbol = _first_expression(json.loads(archive.read(name)))["expr_str"]
    expressions = {
        "tower": ("Pow(Integer(2), Pow(Integer(2), Pow(Integer(2), Integer(64))))", "exponent"),
        "tower_ops": ("2**2**2**64", "exponent"),
        "exponent": (f"Pow({symbol}, Integer(99999999999))", "exponent"),
        "exponent_ops": (f"{symbol}**99999999999", "exponent"),
        "symbolic_exponent": (f"Pow(Integer(2), {symbol})", "exponent"),
        "nested": ("Pow(" * 30 + "Integer(3)" + ", Integer(3))" * 30, "a power of a power"),
        "precision": ("Float('1.5', precision=1000000000)", "precision"),
        "factorial": ("factorial(Integer(100000000))", "factorial"),
        "literal": ("Integer(" + "9" * 5000 + ")", "digits"),
        "chain": ("+".join(["Integer(1)"] * 900), "levels"),
        "long": ("Add(" + ", ".join([symbol] * 1000) + ")", "characters"),
        "repeat": ("[Integer(1)] * 99999999 == Integer(0)", "list or tuple"),
    }
    guards = {
        "guard_tower": ("2**2**2**64 > 0", "exponent"),
        "guard_exponent": ("L['feats'].size()[0]**99999999999 > 0", "exponent"),
        "guard_factorial": ("math.factorial(100000000) > 0", "factorial"),
    }
    files = {}
    for case, (text, _) in {**expressions, **guards}.items():
        def edit(graph, case=case, text=text):
            if case in guards:
                graph["guards_code"] = [text, *graph["guards_code"]]
            else:
                _first_expression(graph)["expr_str"] = text
        files[case] = tmp_path / f"{case}.pt2"
        _with_graph_json(good, files[case], edit)
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            "from pointsparse import export\n"
            f"for case, path in {[(c, str(p)) for c, p in files.items()]!r}:\n"
            "    try:\n        export.load(path)\n        print(case, 'loaded', flush=True)\n"
            "    except BaseException as error:\n"
            "        print(case, type(error).__name__, str(error).replace(chr(10), ' '), flush=True)\n")
    try:
        child = run_python(code, timeout=90)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"export.load did not return within 90 s; it answered only {error.stdout!r:.2000}")
    answers = dict(line.split(" ", 1) for line in child.stdout.splitlines())
    assert set(answers) == set(files), child.stderr[-2000:]
    for case, (text, why) in {**expressions, **guards}.items():
        answer = answers[case]
        assert answer.startswith("ValueError ") and f"{files[case]}: its graph holds" in answer and why in answer \
            and "pointsparse reads" in answer, (case, answer[:600])
    assert export.ProgramModel.load(good)(x).feats.shape == (50, 3)
    s0 = "Symbol('s0', positive=True, integer=True)"
    in_bounds = {"expr_str": [f"Pow({s0}, Integer(2))", f"{s0}**-1", f"Pow({s0}, Rational(1, 2))",
                              f"Add(FloorDiv(Add({s0}, Integer(-1)), Integer(2)), Integer(1))",
                              "Float('0.5', precision=53)", "Integer(9223372036854775807)",
                              f"Piecewise((Integer(1), Eq({s0}, Integer(0))), (Max(Integer(2), {s0}), true))",
                              f"PowByNatural({s0}, Integer(3))", f"Mul(Pow(Integer(2), Integer(64)), {s0})"],
                 "guards_code": ["2 <= L['feats'].size()[0]", "L['feats'].size()[0]**2 <= 9223372036854775807",
                                 "math.floor(math.sqrt(L['feats'].size()[0])) >= 1"]}
    graph = [{"expr_str": text} for text in in_bounds["expr_str"]] + [{"guards_code": in_bounds["guards_code"]}]
    export._check_graph_code(good, "models/model.json", json.dumps(graph).encode())  # (what torch writes: read)


def test_a_shape_expression_of_a_float_precision_past_the_bound_is_refused(tmp_path):
    """A keyword's bound held for an int alone: ``Float('1.5', precision=1e9)`` (a float constant) passed,
    and sympy never finished reading it (the int 1000000000 was refused). A number's keyword past the bound
    is refused whatever its type; torch's own (precision=53) still reads."""
    path = tmp_path / "m.pt2"
    for text in ("Float('1.5', precision=1e9)", "Float('1.5', precision=1000000000.0)", "Float('1.5', dps=100000.0)"):
        graph = json.dumps([{"expr_str": text}]).encode()
        with pytest.raises(ValueError, match=r"its graph holds the shape expression .* with the keyword (precision|dps)="):
            export._check_graph_code(path, "models/model.json", graph)
    export._check_graph_code(path, "models/model.json", json.dumps([{"expr_str": "Float('0.5', precision=53)"}]).encode())


def test_a_number_written_with_a_large_decimal_exponent_is_refused(tmp_path):
    """The digits bound counted the digits written: ``Float('1e999999999')``, ``Rational('1e999999999')``
    (a few digits, a value of a billion) passed, and sympy never finished reading them (it computes the
    number exactly). An exponent past the bound on digits is refused, as the digits themselves are; a
    float's usual exponent (``1.0e-5``) still reads."""
    path = tmp_path / "m.pt2"
    for text in ("Float('1e999999999')", "Rational('1e999999999')", "Integer(Float('2.5E+65'))",
                 "floor(Float('.5e-1000'))"):
        with pytest.raises(ValueError, match=r"its graph holds the shape expression .* with a number of more than"):
            export._check_graph_code(path, "models/model.json", json.dumps([{"expr_str": text}]).encode())
    for text in ("Float('1.0e-5')", "Float('2.5E+64')", "Mul(Float('1.00000000000000e-5'), Symbol('s0'))"):
        export._check_graph_code(path, "models/model.json", json.dumps([{"expr_str": text}]).encode())


def test_load_reads_the_program_it_checked_when_the_file_is_replaced_after_the_check(tmp_path, monkeypatch):
    """export.load checked the file, then had torch read the path again: a file replaced in between (here
    by one whose shape expression runs code) was read unchecked, its code run. The file is read once, and
    the program torch reads is the one checked."""
    marker = tmp_path / "ran"
    good, evil = tmp_path / "good.pt2", tmp_path / "evil.pt2"
    x = _cloud(50, 1, 2)
    export.save(export.export_model(spnn.Conv3d(2, 3, 3).eval(), x), good)
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def edit(graph):
        found = _first_expression(graph)
        found["expr_str"] = f"({touch} and 0) or {found['expr_str']}"

    _with_graph_json(good, evil, edit)
    path = tmp_path / "m.pt2"
    path.write_bytes(good.read_bytes())
    read = torch.export.load

    def swapped(*args, **kwargs):  # the file is replaced between the check and torch's read
        path.write_bytes(evil.read_bytes())
        return read(*args, **kwargs)

    monkeypatch.setattr(torch.export, "load", swapped)
    program, meta = export.load(path)
    assert not marker.exists()
    assert meta == {} and export.ProgramModel(program)(x).feats.shape == (50, 3)


def test_load_names_a_folder_given_as_the_program(tmp_path):
    """export.load / ProgramModel.load of a folder (a run's folder for the .pt2 in it) said "no exported
    program at" it, a FileNotFoundError for a path that exists; a ValueError names it as a folder, as
    checkpoint.load and export.save do."""
    for load in (export.load, export.ProgramModel.load):
        with pytest.raises(ValueError, match=r"is a folder; give the \.pt2 file in it"):
            load(tmp_path)


def test_load_names_a_pipe_given_as_the_program(tmp_path):
    """export.load / ProgramModel.load of a named pipe said "no exported program at" it, a
    FileNotFoundError for a path that exists; a ValueError says it is no regular file, as
    checkpoint.load's (and nothing opens it: a pipe blocks until a writer comes)."""
    import os

    os.mkfifo(tmp_path / "model.pt2")
    for load in (export.load, export.ProgramModel.load):
        with pytest.raises(ValueError, match=r"model\.pt2 is not a regular file; give the \.pt2 file"):
            load(tmp_path / "model.pt2")


def test_save_refuses_a_program_that_takes_a_sparse_tensor_which_load_would_refuse(tmp_path):
    """torch.export.export of a module given a SparseTensor makes a program
    whose example inputs torch.export.save pickles whole: export.save wrote
    it and export.load (and ProgramModel.load) then refused the file as
    pickled Python objects. save refuses it first, naming export_model."""
    conv = spnn.Conv3d(4, 8, 3).eval()
    x = export.example_input(4, voxel_size=0.5, seed=1)
    program = torch.export.export(conv, (x,))
    with pytest.raises(ValueError, match="the program's inputs hold SparseTensor: .*export.export_model"):
        export.save(program, tmp_path / "direct.pt2")
    assert not (tmp_path / "direct.pt2").exists()
    export.save(export.export_model(conv, x), tmp_path / "made.pt2")
    assert export.load(tmp_path / "made.pt2")[1] == {}

    class Keyed(torch.nn.Module):  # (an OrderedDict of tensors is data: saved and loaded)
        def forward(self, inputs):
            return inputs["a"] * 2

    import collections
    keyed = torch.export.export(Keyed(), (collections.OrderedDict(a=torch.ones(3)),))
    export.save(keyed, tmp_path / "keyed.pt2")
    assert export.load(tmp_path / "keyed.pt2")[1] == {}

    class Union(torch.nn.Module):
        def forward(self, fa, ca, fb, cb):
            return spnn.union([ps.SparseTensor(fa, ca, validate=False), ps.SparseTensor(fb, cb, validate=False)]).feats

    a, b = random_coords(30, extent=4, seed=1), random_coords(30, extent=4, seed=2)
    with pytest.raises(ValueError, match="nn.union cannot be exported"):
        torch.export.export(Union(), (torch.ones(len(a), 2), a, torch.ones(len(b), 2), b))


def test_save_names_a_missing_folder(tmp_path):
    """export.save into a folder that does not exist: FileNotFoundError
    naming it (was torch's RuntimeError from its archive writer)."""
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(FileNotFoundError, match="no folder .*missing"):
        export.save(program, tmp_path / "missing" / "p.pt2")
    export.save(program, tmp_path / "p.pt2", {"k": 1})
    assert export.load(tmp_path / "p.pt2")[1] == {"k": 1}


def test_save_that_fails_part_way_leaves_the_file_it_replaces(tmp_path, monkeypatch):
    """export.save (pointsparse export --out) over an earlier program whose
    writing fails part-way (a full disk, an interrupt): the earlier program
    is still there whole and nothing else is left beside it (torch's writer
    wrote into the target itself: a truncated archive in its place)."""
    import errno

    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    path = tmp_path / "p.pt2"
    export.save(program, path, {"k": 1})
    before = path.read_bytes()

    def failing(program, f, **kwargs):  # writes the archive's start, then the disk is full
        if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__"):
            with open(f, "wb") as target:
                target.write(before[:100])
        else:
            f.write(before[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.export, "save", failing)
    with pytest.raises(ValueError, match="cannot write the exported program"):
        export.save(program, path, {"k": 2})
    monkeypatch.setattr(torch.export, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        export.save(program, path, {"k": 3})
    monkeypatch.undo()
    assert path.read_bytes() == before and export.load(path)[1] == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["p.pt2"]


def _flip(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0x24
    return bytes(damaged)


def test_load_names_a_program_cut_short_or_of_another_version(tmp_path, caplog):
    """A program cut short by 22 bytes to 10 kB lost its archive's end
    records, and Python's zipfile then found those of the torch.save archive
    the program holds (its sample inputs): load said "a torch.save file (a
    checkpoint?)" and told the user to export it. A program naming an
    operator or a schema this pointsparse and torch do not have said "check
    the warnings above", which load keeps from being printed. Now: cut
    short, and the version's cause (torch's own words) with the versions."""
    import logging
    import zipfile

    caplog.set_level(logging.WARNING)
    x = export.example_input(4, 0.4)
    torch.manual_seed(0)
    net = torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.ReLU(), spnn.Conv3d(8, 3, 1)).eval()
    path = tmp_path / "p.pt2"
    export.save(export.export_model(net, x), path, {"classes": ["a", "b", "c"]})
    data = path.read_bytes()
    cut = tmp_path / "cut.pt2"
    with zipfile.ZipFile(path) as archive:  # (cut anywhere past the sample inputs' own archive, whose end stays)
        inner = next(m for m in archive.infolist() if m.filename.endswith("sample_inputs/model.pt"))
    header = inner.header_offset  # (the local header's own name and extra lengths: torch pads it)
    inner_end = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + int.from_bytes(
        data[header + 28:header + 30], "little") + inner.file_size
    for k in (22, 100, len(data) - inner_end - 1):
        cut.write_bytes(data[:-k])
        with pytest.raises(ValueError, match=r"cut\.pt2 is damaged: its zip archive's end records are missing \(the "
                                             r"file is cut short"):
            export.load(cut)
        with pytest.raises(ValueError, match=r"the checkpoint is damaged|checkpoint is corrupted"):
            checkpoint.load(cut)  # (and as a checkpoint: no torch.save file read out of its middle)

    def rewritten(name, change):
        out = tmp_path / name
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
            for info in source.infolist():
                body = source.read(info.filename)
                target.writestr(info, change(body) if info.filename.endswith("models/model.json") else body)
        return out

    renamed = rewritten("renamed.pt2", lambda b: b.replace(b"pointsparse.kmap_build.default",
                                                           b"pointsparse.kmap_build_v9.default"))
    schema = rewritten("schema.pt2", lambda b: json.dumps({**json.loads(b), "schema_version": {
        "major": 99, "minor": 0}}).encode())
    version = rf"written by another version of pointsparse or torch than these \({ps.__version__} and " \
              rf"{re.escape(torch.__version__)}\)"
    with pytest.raises(ValueError, match=version + r" \(SerializeError: We failed to resolve "
                                         r"torch.ops.pointsparse.kmap_build_v9.default"):
        export.load(renamed)
    with pytest.raises(ValueError, match=version + r" \(SerializeError: Serialized schema version "
                                         r"SchemaVersion\(major=99"):
        export.load(schema)
    assert "Traceback" not in caplog.text and "deserializing" not in caplog.text, caplog.text[:500]
    assert export.load(rewritten("same.pt2", lambda b: b))[1] == {"classes": ["a", "b", "c"]}



def test_loads_in_two_threads_leave_torchs_logger_as_it_was(tmp_path, monkeypatch):
    """load first kept torch.export's log quiet by swapping the logger's handlers and level and putting them
    back: two loads in two threads put back each other's stand-ins, and the logger kept a handler that
    swallowed every later torch.export warning. It now adds and removes a filter of its own."""
    import logging
    import threading
    import time

    x = export.example_input(4, 0.4)
    torch.manual_seed(0)
    path = tmp_path / "p.pt2"
    export.save(export.export_model(torch.nn.Sequential(spnn.Conv3d(4, 3, 3)).eval(), x), path, {})
    logger = logging.getLogger("torch.export")
    before = (logger.level, list(logger.handlers), logger.propagate, list(logger.filters))
    real = torch.export.load

    def slow(*args, **kwargs):  # (the first load's read ends while the second's runs)
        out = real(*args, **kwargs)
        time.sleep(0.3 if threading.current_thread().name == "first" else 0.6)
        return out

    monkeypatch.setattr(torch.export, "load", slow)
    threads = [threading.Thread(target=export.load, args=(path,), name=name) for name in ("first", "second")]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for t in threads:
        t.join()
    assert (logger.level, list(logger.handlers), logger.propagate, list(logger.filters)) == before


def test_load_refuses_a_damaged_program(tmp_path):
    """A byte flipped inside any member of a saved program (a weight, the
    graph, the meta) raises a ValueError naming the file and that member:
    torch's reader does not check the CRC-32 the archive stores, and loaded
    a changed weight silently. A flip anywhere else in the file either
    raises a ValueError naming the file or leaves a program that computes
    the same (alignment padding, fields no reader uses)."""
    import random
    import zipfile

    x = export.example_input(7, 0.4)
    torch.manual_seed(0)
    net = torch.nn.Sequential(spnn.Conv3d(7, 8, 3), spnn.BatchNorm(8), spnn.ReLU(), spnn.Conv3d(8, 4, 1)).eval()
    path = tmp_path / "p.pt2"
    export.save(export.export_model(net, x), path, {"classes": ["a", "b", "c", "d"]})
    reference = export.load(path)[0].module()(x.feats, x.coords)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if m.file_size > 0]
    kinds = {"weight": [m for m in members if "/weights/" in m.filename],
             "meta": [m for m in members if m.filename.endswith(export.META_FILE)],
             "graph": [m for m in members if m.filename.endswith(".json") and "/models/" in m.filename]}
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
    for kind, found in kinds.items():
        member = found[0]
        header = member.header_offset  # the local header's own name and extra lengths (its padding is there)
        start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + int.from_bytes(
            data[header + 28:header + 30], "little")
        bad = tmp_path / f"{kind}.pt2"
        bad.write_bytes(_flip(data, start + member.file_size // 2))
        with pytest.raises(ValueError, match="is damaged: its member") as info:
            export.load(bad)
        assert str(bad) in str(info.value) and member.filename in str(info.value)
    rng = random.Random(0)
    loaded_same = 0
    for offset in rng.sample(range(len(data)), 40):
        bad = tmp_path / "any.pt2"
        bad.write_bytes(_flip(data, offset))
        try:
            program, meta = export.load(bad)
            out = program.module()(x.feats, x.coords)
        except ValueError as error:
            assert str(bad) in str(error)
            continue
        assert torch.equal(out, reference) and meta == {"classes": ["a", "b", "c", "d"]}, offset
        loaded_same += 1
    assert loaded_same <= 10, loaded_same  # most of the file is member data: most flips are refused


def test_eval_scores_an_exported_program_as_its_checkpoint(tmp_path, capsys):
    """``pointsparse eval --program FILE.pt2`` scores what ``pointsparse
    export`` wrote (MinkUNet; SPVCNN, whose program takes the points too), on
    the run's own data by default (the file's meta holds it), with the
    confusion matrix of ``eval --checkpoint --inference`` in the same form;
    export.ProgramModel checks what it is given."""
    from pointsparse.app.cli import main
    from test_prune_workflow import TINY

    for model, forms in (("minkunet", ("float32", "bf16")), ("spvcnn", ("fused", "bf16"))):
        run = tmp_path / model
        assert main(["train", *TINY, "--model", model, "--epochs", "1", "--out", str(run)]) == 0
        ckpt = str(run / "checkpoint.pt")
        for inference in forms:
            program = tmp_path / f"{model}-{inference}.pt2"
            assert main(["export", "--checkpoint", ckpt, "--out", str(program), "--inference", inference]) == 0
            # (on the CPU, where the program runs: a CUDA machine's default device rounds otherwise)
            assert main(["eval", "--checkpoint", ckpt, "--inference", inference, "--no-progress", "--device", "cpu",
                         "--out", str(tmp_path / f"{model}-{inference}-eager")]) == 0
            assert main(["eval", "--program", str(program), "--no-progress",
                         "--out", str(tmp_path / f"{model}-{inference}-program")]) == 0
            assert main(["eval", "--checkpoint", ckpt, "--inference", inference, "--no-progress", "--maps-ahead",
                         "--out", str(tmp_path / f"{model}-{inference}-ahead")]) == 0
            eager, exported, ahead = (json.loads((tmp_path / f"{model}-{inference}-{kind}" / "eval-metrics.json")
                                                 .read_text()) for kind in ("eager", "program", "ahead"))
            assert exported["confusion"] == eager["confusion"] and sum(map(sum, eager["confusion"])) > 1000
            assert ahead["confusion"] == eager["confusion"]
            assert exported["data"] == eager["data"] and exported["inference"] == inference
            assert exported["program"] == str(program) and "checkpoint" not in exported
        assert export.ProgramModel.load(program).point_level == (model == "spvcnn")
    # (a bf16 SPVCNN program keeps float32 tensors in its point branch: .double() and .bfloat16() named one
    # dtype each as the program's; both name the program's own now)
    spv = export.ProgramModel.load(tmp_path / "spvcnn-bf16.pt2")
    for convert in (spv.double, spv.bfloat16):
        with pytest.raises(ValueError, match=r"\(a torch.bfloat16 program on cpu: it would turn its torch\."):
            convert()
    program = tmp_path / "minkunet-bf16.pt2"
    capsys.readouterr()
    for flags, message in ((["--inference", "bf16"], "a program keeps the form it was exported in"),
                           (["--inference", "float32"], "a program keeps the form it was exported in"),  # (typed)
                           (["--device", "cuda"], "an exported program runs on the CPU")):
        assert main(["eval", "--program", str(program), "--no-progress", *flags]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "--program", str(tmp_path / "none.pt2"), "--no-progress"]) == 2
    assert "no exported program at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--program", str(program), "--checkpoint", ckpt])
    model, meta = export.ProgramModel.load(program), export.load(program)[1]
    assert model.meta == meta and model.dtype == torch.bfloat16 and model.in_channels == meta["in_channels"]
    x = export.example_input(model.in_channels, 0.5)
    with pytest.raises(TypeError, match=r"feats must be torch.bfloat16 \(the program .* takes it\); got torch.float32"):
        model(x)
    xb = x.with_feats(x.feats.bfloat16())
    with pytest.raises(ValueError, match=f"feats must have {model.in_channels} channels \\(the program "
                                         f"{program} takes them\\); got 3"):
        model(ps.SparseTensor(xb.feats[:, :3], xb.coords))
    with pytest.raises(TypeError, match="x must be a SparseTensor"):
        model(xb.feats)
    with pytest.raises(ValueError, match="inference only"):
        model.train()
    assert model(xb).feats.shape == (len(xb), len(meta["classes"]))
    assert model(ps.SparseTensor(xb.feats[:0], xb.coords[:0])).feats.shape == (0, len(meta["classes"]))
    with pytest.raises(TypeError, match="this program takes voxels only"):
        model(xb, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have feats \(N, C\) and coords \(N, 4\)"):
        model(ps.SparseTensor(xb.feats[:, None], xb.coords, validate=False))
    with pytest.raises(ValueError, match="feats and coords must have one row per site"):  # (validate=False too)
        model(ps.SparseTensor(xb.feats[:-1], xb.coords, validate=False))
    with pytest.raises(TypeError, match="meta must be None or the dict load returns"):
        export.ProgramModel(export.load(program)[0], [1, 2])


def test_spvcnn_program_checks_its_point_arguments():
    torch.manual_seed(0)
    net = _trained_like(SPVCNN(7, 3, cr=0.25, blocks=1))
    program = export.export_model(net, export.example_input(7, 0.4, points=True))
    model = export.ProgramModel(program)
    assert model.output == export.output_kind(program) == "logits" and model.point_level
    for seed in (1, 2):  # other clouds, other numbers of voxels and points
        args = export.example_input(7, 0.3, seed=seed, points=True)
        with torch.no_grad():
            assert torch.equal(model(*args), net(*args))
    voxels, inverse, points, point_batch = args
    with pytest.raises(TypeError, match="points must be torch.float32"):
        model(voxels, inverse, points.double(), point_batch)
    with pytest.raises(ValueError, match="inverse holds rows outside"):
        model(voxels, inverse + len(voxels), points, point_batch)
    with pytest.raises(ValueError, match="point_batch must be the voxels' batch index"):
        model(voxels, inverse, points, point_batch + 1)
    with pytest.raises(TypeError, match="points must be a float tensor"):
        model(voxels)
    assert model(voxels, inverse[:0], points[:0], point_batch[:0]).shape == (0, 3)

    # The program's own module (torch.export.load's, as the README loads it) checks the values too: it ran a -1
    # inverse (the last voxel's row), another batch's index and points in metres silently. The checks are one
    # operator of the graph, which ProgramModel does not repeat.
    checkers = [n for n in program.graph.nodes if n.target is torch.ops.pointsparse.point_coords.default]
    assert len(checkers) == 1 and model.checks_points
    raw = program.module()
    feats, coords, index, batch = voxels.feats, voxels.coords, inverse.long(), point_batch.long()
    with torch.no_grad():
        assert torch.equal(raw(feats, coords, index, points, batch), model(voxels, inverse, points, point_batch))
        wrong = index.clone()
        wrong[0] = -1
        with pytest.raises(ValueError, match=r"inverse holds rows outside \[0, \d+\)"):
            raw(feats, coords, wrong, points, batch)
        with pytest.raises(ValueError, match="point_batch must be the voxels' batch index"):
            raw(feats, coords, index, points, batch + 1)
        with pytest.raises(ValueError, match=r"points\[0\] = .* lies outside its voxel"):
            raw(feats, coords, index, points * 0.4, batch)  # (in metres: voxel units times the voxel's size)
        with pytest.raises(ValueError, match=r"points\[0\] = .* lies outside its voxel"):
            model(voxels, inverse, points * 0.4, point_batch)


def test_spvcnn_program_takes_point_indices_of_any_integer_dtype_as_the_model_does():
    """SPVCNN takes ``inverse`` and ``point_batch`` of any integer dtype (int32
    from a loader, uint8 batch indices: the same rows); its ProgramModel
    refused them with a TypeError ('inverse and point_batch int64 (the
    program's)'), so a pipeline that ran the eager model failed on the
    program. It now takes them as int64, as the model does, and gives its
    logits bit for bit; a float or bool index is still a TypeError."""
    torch.manual_seed(0)
    net = _trained_like(SPVCNN(4, 3, cr=0.25, blocks=1))
    model = export.ProgramModel(export.export_model(net, export.example_input(4, 0.4, points=True)))
    voxels, inverse, points, point_batch = export.example_input(4, 0.3, seed=1, points=True)
    with torch.no_grad():
        want = net(voxels, inverse, points, point_batch)
        for dtype in (torch.int32, torch.int16, torch.uint8):
            if dtype == torch.int32 or int(inverse.max()) <= torch.iinfo(dtype).max:
                assert torch.equal(model(voxels, inverse.to(dtype), points, point_batch), want), dtype
            assert torch.equal(model(voxels, inverse, points, point_batch.to(dtype)), want), dtype
        assert torch.equal(model(voxels, inverse.int(), points, point_batch.int()), want)
    with pytest.raises(TypeError, match="inverse must be an integer tensor"):
        model(voxels, inverse.float(), points, point_batch)
    with pytest.raises(TypeError, match="point_batch must be an integer tensor"):
        model(voxels, inverse, points, point_batch.bool())


def test_spvcnn_exported_on_narrow_point_indices_takes_int64_ones():
    """export_model of an SPVCNN on an example whose inverse and point_batch
    are int16 / int32 (SPVCNN runs them) traced a program taking those
    dtypes, not the int64 the program's interface names: its ProgramModel
    then failed inside torch ('Tensor dtype mismatch! Expected: Short').
    The example's indices are now taken as int64: the program takes int64,
    and its ProgramModel gives the model's logits on any integer dtype."""
    torch.manual_seed(0)
    net = _trained_like(SPVCNN(4, 3, cr=0.25, blocks=1))
    voxels, inverse, points, point_batch = export.example_input(4, 0.4, points=True)
    program = export.export_model(net, (voxels, inverse.short(), points, point_batch.int()))
    placeholders = {s.arg.name: s for s in program.graph_signature.input_specs}
    dtypes = [n.meta["val"].dtype for n in program.graph.nodes if n.op == "placeholder"
              and n.name in placeholders and n.name in program.graph_signature.user_inputs]
    assert dtypes == [torch.float32, torch.int32, torch.int64, torch.float32, torch.int64]
    model = export.ProgramModel(program)
    args = export.example_input(4, 0.3, seed=1, points=True)
    with torch.no_grad():
        want = net(*args)
        assert torch.equal(model(*args), want)
        assert torch.equal(model(args[0], args[1].short(), args[2], args[3].int()), want)


def test_spvcnn_inside_maps_ahead_exports_as_a_point_level_program(tmp_path):
    """An SPVCNN (fused for inference) inside an ``nn.MapsAhead``, given its
    forward's arguments as the example (as a MinkUNet inside one exports on
    its SparseTensor): export took the wrapper for a voxel network and
    refused the example ('example must be a SparseTensor; got tuple'); it
    writes the point-level program, whose logits are the model's."""
    torch.manual_seed(0)
    net = spnn.MapsAhead(spnn.fuse_for_inference(_trained_like(SPVCNN(4, 3, cr=0.25, blocks=1)))).eval()
    example = export.example_input(4, 0.4, points=True)
    model = _program_round_trip(net, example, tmp_path)
    assert model.point_level
    args = export.example_input(4, 0.3, seed=1, points=True)
    with torch.no_grad():
        assert torch.equal(model(*args), net(*args))


def test_a_compiled_spvcnn_exports_as_a_point_level_program(tmp_path):
    """export_model of ``torch.compile(spvcnn)`` (a model compiled for
    serving, then exported) refused SPVCNN's own arguments: 'example must be
    a SparseTensor; got tuple' (the compiled wrapper was taken for a voxel
    network). The model under the wrapper is exported: SPVCNN's program, its
    logits the model's; a compiled MinkUNet's too."""
    torch.manual_seed(0)
    net = _trained_like(SPVCNN(4, 3, cr=0.25, blocks=1))
    torch.compiler.reset()
    model = _program_round_trip(torch.compile(net, backend="eager"), export.example_input(4, 0.4, points=True),
                                tmp_path)
    assert model.point_level
    args = export.example_input(4, 0.3, seed=1, points=True)
    unet = _trained_like(MinkUNet(4, 3, cr=0.25, blocks=1))
    voxels = export.example_input(4, 0.4)
    program = export.ProgramModel(export.export_model(torch.compile(unet, backend="eager"), voxels))
    with torch.no_grad():
        assert torch.equal(model(*args), net(*args))
        assert torch.equal(program(args[0]).feats, unet(args[0]).feats)


def test_export_names_a_model_that_is_a_program_already(tmp_path):
    """export_model of a loaded program (a ProgramModel, or torch's
    ``program.module()``) failed with torch's 'Constraints violated (voxels)!
    ... specialized it to be a constant', or asked for ``model.eval()``,
    which torch's module of a program refuses: a TypeError now says the
    model is a program already."""
    torch.manual_seed(0)
    net = _trained_like(MinkUNet(4, 3, cr=0.25, blocks=1))
    voxels = export.example_input(4, 0.4)
    program = export.export_model(net, voxels)
    for model in (export.ProgramModel(program), program.module()):
        with pytest.raises(TypeError, match="model is an exported program already"):
            export.export_model(model, voxels)


def test_program_model_pickles_and_saves_with_torch(tmp_path):
    """``pickle`` / ``torch.save`` of a ProgramModel (of a fused model) failed
    in torch ("Can't pickle local object '_create_stateful_graph_module.<locals>
    .<lambda>'"); it pickles as its program, meta and source, and the copy
    gives the same logits, with weights loaded after it was made too."""
    import io
    import pickle

    torch.manual_seed(0)
    net = spnn.fuse_for_inference(_trained_like(MinkUNet(3, 4, cr=0.25, blocks=1)))
    x = _cloud(300, 1)
    model = _program_round_trip(net, x, tmp_path)
    other = _trained_like(MinkUNet(3, 4, cr=0.25, blocks=1))
    model.load_state_dict(export.ProgramModel(export.export_model(spnn.fuse_for_inference(other), x)).state_dict())
    with torch.no_grad():
        want = model(x).feats
        assert not torch.equal(want, net(x).feats)  # (the loaded weights are the other model's)
        copy_ = pickle.loads(pickle.dumps(model))
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for loaded in (copy_, torch.load(buffer, weights_only=False), copy.deepcopy(model)):
            assert isinstance(loaded, export.ProgramModel)
            assert loaded.meta == model.meta and loaded.source == model.source
            assert torch.equal(loaded(x).feats, want)


def test_program_model_keeps_the_dtype_and_device_it_was_exported_with():
    """ProgramModel is a torch Module: double() (half(), to(dtype), cuda())
    converted the program's weights in place, those of every module of the
    same program too, while its input check still asked for float32 feats:
    the engine then refused them ("weight and feats must have the same
    dtype"). Conversions that change nothing still return the model."""
    torch.manual_seed(0)
    net = _trained_like(MinkUNet(3, 4, cr=0.25, blocks=1))
    x = _cloud(300, 1)
    program = export.export_model(net, x)
    model = export.ProgramModel(program)
    assert model.output == export.output_kind(program) == "logits"
    with torch.no_grad():
        want = net(x).feats
    for convert in (lambda m: m.double(), lambda m: m.half(), lambda m: m.to(torch.bfloat16),
                    lambda m: m.to("meta")):
        with pytest.raises(ValueError, match=r"an exported program keeps the dtype and device it was exported "
                                             r"with \(a torch.float32 program on cpu: it would turn its "
                                             r"torch.float32 tensors \(to "):
            convert(model)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="keeps the dtype and device it was exported with"):
            model.cuda()  # (torch's AssertionError "Torch not compiled with CUDA enabled" inside)
    assert model.float() is model and model.cpu() is model and model.to("cpu", torch.float32) is model
    with torch.no_grad():
        assert torch.equal(model(x).feats, want)
        assert torch.equal(program.module()(x.feats, x.coords), want)
    # the raw module is torch's (README): its guards assert, ProgramModel names the argument first
    raw = program.module()
    with pytest.raises(AssertionError, match=r"Guard failed: feats.size\(\)\[1\] == 3"):
        raw(x.feats[:, :2], x.coords)
    with pytest.raises(NotImplementedError):
        raw.eval()
    with pytest.raises(ValueError, match=r"feats must have 3 channels \(the program takes them\); got 2"):
        model(ps.SparseTensor(x.feats[:, :2], x.coords))
    assert model.eval() is model


@pytest.mark.parametrize("residual", [False, True])
def test_conv_inference_has_the_gradients_of_conv_plus_the_residual_and_the_relu(residual):
    """conv_inference had no autograd formula: called on tensors that require grad (an exported program's
    module run under grad mode, its weights parameters) its backward raised torch's "no autograd formula
    was registered", and torch.compile of such a module (aot_eager, inductor) failed while compiling, as
    AOT autograd traces the backward. Its gradients are now conv's, through the residual and the ReLU
    (gradcheck in float64, the torch loop too; a residual of another dtype gets its gradient in its own)."""
    x = _cloud(120, 4, channels=3, dtype=torch.float64)
    args, g = conv_operator_args(x, 4, seed=4)
    feats, weight, bias = (t.double().clone().requires_grad_() for t in args[:3])
    add = torch.randn(len(x), 4, generator=g, dtype=torch.float64, requires_grad=True) if residual else None
    graph = args[3:]
    leaves = (feats, weight, bias) + ((add,) if residual else ())

    def run(f, w, b, *a):
        return ops.conv_inference(f, w, b, *graph, a[0] if a else None, True)

    torch.autograd.gradcheck(run, leaves)
    with ps._ext.torch_path():
        torch.autograd.gradcheck(run, leaves)
    torch.library.opcheck(torch.ops.pointsparse.conv_inference.default, (feats, weight, bias, *graph, add, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    if residual:  # a float32 residual: the output float64 (promoted), the residual's gradient float32
        low = add.detach().float().requires_grad_()
        out = ops.conv_inference(feats, weight, bias, *graph, low, True)
        want = torch.relu(ops.conv(feats, weight, bias, *graph) + low)
        assert out.dtype == torch.float64 and torch.equal(out, want)
        got = torch.autograd.grad(out.square().sum(), (feats, weight, bias, low))
        expected = torch.autograd.grad(want.square().sum(), (feats, weight, bias, low))
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_loaded_programs_module_compiles_and_differentiates_under_grad_mode(tmp_path, backend):
    """torch.export.load(path).module() under torch.compile and grad mode (no torch.no_grad()): aot_eager
    failed to compile ("Trying to backward through pointsparse.conv_inference.default but no autograd
    formula was registered"), while the module itself ran. Now the compiled module (fullgraph, dynamic,
    other sizes, no recompile) gives the eager model's output, and its gradients (the weights', the
    feats') equal the eager model's in eval mode, as the uncompiled module's do (float64, a fused model
    whose residual blocks' convs take the sum and the ReLU in their store)."""
    torch.manual_seed(0)
    net = spnn.fuse_for_inference(_trained_like(MinkUNet(3, 4, cr=0.25, blocks=1)).double())
    example = _cloud(300, 1, dtype=torch.float64)
    torch.export.save(export.export_model(net, example), tmp_path / "m.pt2")
    module = torch.export.load(tmp_path / "m.pt2").module()
    assert any(n.target is torch.ops.pointsparse.conv_inference.default and n.args[8] is not None
               for n in module.graph.nodes)  # (a residual in a conv's store)
    names = [name for name, _ in module.named_parameters()]
    eager_params = dict(net.named_parameters())
    assert sorted(names) == sorted("model." + name for name in eager_params)
    torch.compiler.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n, seed in ((300, 1), (420, 2)):
            x = _cloud(n, seed, dtype=torch.float64)
            feats = x.feats.clone().requires_grad_()
            want = net(ps.SparseTensor(feats, x.coords)).feats
            want_grads = torch.autograd.grad(want.square().sum(), [feats, *eager_params.values()])
            for run in (module, compiled):
                given = x.feats.clone().requires_grad_()
                out = run(given, x.coords)
                assert torch.allclose(out.detach(), want.detach(), rtol=0, atol=1e-12)
                got = torch.autograd.grad(out.square().sum(), [given, *module.parameters()])
                assert torch.allclose(got[0], want_grads[0], rtol=0, atol=1e-10)
                by_name = dict(zip(names, got[1:]))
                for name, g in zip(eager_params, want_grads[1:]):
                    assert torch.allclose(by_name["model." + name], g, rtol=0, atol=1e-10), name


def test_program_model_refuses_a_gradient_naming_itself():
    """A ProgramModel's output under grad mode held the program's weights' autograd graph up to its
    inference convs, and backward raised torch's bare "Trying to backward through
    pointsparse.conv_inference.default but no autograd formula was registered". Now the program runs
    without an autograd graph (the same values) and asking for a gradient of its output (backward,
    torch.autograd.grad; through its weights or through feats that require grad) is a RuntimeError naming
    ProgramModel and what gives gradients."""
    torch.manual_seed(0)
    net = _trained_like(MinkUNet(3, 4, cr=0.25, blocks=1))
    x = _cloud(300, 1)
    model = export.ProgramModel(export.export_model(net, x))
    with torch.no_grad():
        want = net(x).feats
    feats = x.feats.clone().requires_grad_()
    message = r"ProgramModel .*inference only.* no gradient.*eager model"
    for given in (x, ps.SparseTensor(feats, x.coords)):
        out = model(given).feats
        assert torch.equal(out.detach(), want) and out.requires_grad
        with pytest.raises(RuntimeError, match=message):
            out.square().sum().backward()
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(model(ps.SparseTensor(feats, x.coords)).feats.sum(), feats)
    with torch.no_grad():
        assert not model(ps.SparseTensor(feats, x.coords)).feats.requires_grad
    with torch.inference_mode():
        assert torch.equal(model(x).feats, want)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_program_model_runs_under_grad_mode_in_one_graph(backend):
    """torch.compile(ProgramModel, fullgraph=True) called under grad mode (no torch.no_grad()) failed to
    compile with dynamo's bare "Unsupported: Observed exception": dynamo traced the backward of the
    output's refusal, which raised. Now it compiles in one graph (dynamic, other sizes, no recompile),
    gives the eager model's output, and asking for a gradient raises the uncompiled ProgramModel's
    RuntimeError naming it."""
    torch.manual_seed(0)
    net = _trained_like(MinkUNet(3, 4, cr=0.25, blocks=1))
    model = export.ProgramModel(export.export_model(net, _cloud(300, 1)))
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n, seed in ((300, 1), (420, 2)):
            x = _cloud(n, seed)
            with torch.no_grad():
                want = net(x).feats
            out = compiled(x).feats
            assert torch.equal(out.detach(), want) and out.requires_grad
            with pytest.raises(RuntimeError, match=r"ProgramModel .*inference only.* no gradient.*eager model"):
                out.square().sum().backward()


def test_compiled_conv3d_add_checks_the_residuals_stride_and_coords():
    """Under torch.compile conv3d(..., add=) checked only the residual's
    row count: one of the same count at another stride or on other coords
    (eager's ValueError) was summed into the wrong rows. The stride is
    refused while tracing; the same coords tensor adds nothing to the graph,
    other coords a run-time assertion (equal ones, as eager, still run)."""
    x = _cloud(300, 3)
    w = torch.randn(27, 3, 5)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    residuals = {
        "same": lambda x: x.with_feats(torch.ones(len(x), 5)),
        "equal": lambda x: ps.SparseTensor(torch.ones(len(x), 5), x.coords.clone(), validate=False),
        "permuted": lambda x: ps.SparseTensor(torch.ones(len(x), 5), x.coords[perm], validate=False),
        "stride": lambda x: ps.SparseTensor(torch.ones(len(x), 5), x.coords, stride=2, validate=False),
    }
    want = spnn.functional.conv3d(x, w, 3).feats + 1
    for name, residual in residuals.items():
        def run(x, residual=residual):
            return spnn.functional.conv3d(x, w, 3, add=residual(x)).feats
        torch.compiler.reset()
        compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="eager")
        if name in ("same", "equal"):
            assert torch.allclose(compiled(x), want, rtol=0, atol=1e-5)
        else:
            with pytest.raises((ValueError, RuntimeError), match=r"add must be on the conv's output coords"):
                compiled(x)


def test_compiled_add_and_cat_take_equal_coords_in_one_graph():
    """functional.add / cat compared two coords tensors that were other
    objects with torch.equal: under torch.compile(fullgraph=True) a
    data-dependent graph break even where they were equal. Now equal coords
    run in one graph, other ones fail there with a run-time assertion
    naming the argument, and eager still refuses them with a ValueError."""
    x = _cloud(200, 6)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))
    others = {
        "equal": lambda x: ps.SparseTensor(x.feats * 2, x.coords.clone(), validate=False),
        "permuted": lambda x: ps.SparseTensor(x.feats * 2, x.coords[perm], validate=False),
        "fewer": lambda x: ps.SparseTensor(x.feats[1:] * 2, x.coords[1:], validate=False),
        "stride": lambda x: ps.SparseTensor(x.feats * 2, x.coords, stride=2, validate=False),
    }
    for name, other in others.items():
        def run(x, other=other):
            return spnn.functional.add(x, other(x)).feats, spnn.functional.cat([x, other(x)]).feats

        torch.compiler.reset()
        compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="eager")
        if name == "equal":
            added, joined = compiled(x)
            assert torch.equal(added, x.feats * 3) and torch.equal(joined, torch.cat([x.feats, x.feats * 2], 1))
            continue
        # (the stride refused while tracing: under fullgraph dynamo's error, which quotes the ValueError)
        error = r"add: item 1 \(stride \(2, 2, 2\)" if name == "stride" else r"add: item 1 has other coords"
        with pytest.raises((ValueError, RuntimeError), match=error):
            compiled(x)
        with pytest.raises(ValueError, match=r"add: item 1 (has other coords|\()"):
            run(x)


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("grad", [False, True])
def test_compiled_conv3d_add_checks_the_residuals_channels(channels, grad):
    """Under torch.compile conv3d(..., add=) did not check the residual's
    channels (eager's ValueError): without gradients the kernel refused it
    with a message that named no argument, with them one channel was
    broadcast over the output's five. Now refused while tracing, as eager."""
    x = _cloud(150, 7)
    w = torch.randn(27, 3, 5, requires_grad=grad)

    def run(x):
        return spnn.functional.conv3d(x, w, 3, add=x.with_feats(torch.ones(len(x), channels))).feats

    error = rf"add must have the conv's 5 output channels; got {channels}"
    with pytest.raises(ValueError, match=error):
        run(x)
    torch.compiler.reset()
    with pytest.raises((ValueError, RuntimeError), match=error):
        torch.compile(run, fullgraph=True, dynamic=True, backend="eager")(x)


def test_compiled_select_voxels_checks_its_rows_and_feats():
    """Under torch.compile select_voxels took any rows and feats of any row
    count (eager's ValueErrors): feats of another count gave a SparseTensor
    with more feats than coords, repeated or unsorted rows repeated or
    reordered sites. Now the graph checks them when it runs; valid ones
    select as eager."""
    x = _cloud(150, 8)
    n = len(x)
    cases = {
        "valid": (torch.arange(0, n, 3), lambda rows: torch.ones(len(rows), 2)),
        "feats": (torch.arange(0, n, 3), lambda rows: torch.ones(len(rows) + 3, 2)),
        "repeated": (torch.tensor([0, 0, 5]), None),
        "unsorted": (torch.tensor([5, 0]), None),
        "outside": (torch.tensor([0, n + 5]), None),
    }
    for name, (rows, feats) in cases.items():
        def run(x, rows=rows, feats=feats):
            y = spnn.functional.select_voxels(x, rows, None if feats is None else feats(rows))
            return y.feats, y.coords

        torch.compiler.reset()
        compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="eager")
        if name == "valid":
            assert all(torch.equal(a, b) for a, b in zip(compiled(x), run(x)))
            continue
        error = r"feats must be \(rows, C\)" if name == "feats" else r"rows must be increasing row indices"
        with pytest.raises(RuntimeError, match=error):
            compiled(x)
        with pytest.raises(ValueError, match=error.replace("rows, C", r"\d+, C")):
            run(x)


def test_compiled_conv3d_add_of_another_dtype_keeps_eagers_promotion():
    """conv3d(..., add=) without gradients with a residual of another dtype
    (float64 on float32 feats): eager sums it after the conv, promoted as
    torch promotes, and so did the graph's conv_inference, but its fake
    implementation said the feats' dtype, so the graph typed the float64
    output float32 (inductor read it as such: wrong values). Now the fake
    promotes as the operator does."""
    x = _cloud(120, 9)
    key = ops.key_to_list(kmap.KernelMapKey((1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 1, 1)))
    weight, add = torch.randn(27, 3, 5), torch.randn(len(x), 5, dtype=torch.float64)
    args = (x.feats, weight, None, x.coords, *ops.kmap_build(x.coords, None, key), key, add, True)
    torch.library.opcheck(torch.ops.pointsparse.conv_inference.default, args, test_utils=("test_faketensor",))

    def run(x):
        return spnn.functional.conv3d(x, weight, 3, add=x.with_feats(add), relu=True).feats.dtype

    torch.compiler.reset()
    with torch.no_grad():
        assert torch.compile(run, fullgraph=True, dynamic=True, backend="eager")(x) == run(x) == torch.float64


def test_compiled_conv3d_masks_a_leaf_weights_gradient():
    """Under torch.compile conv3d ignored weight_mask: a leaf weight passed
    with its mask got the dense gradient at the entries the mask zeroes
    (eager: zero there). Now the compiled gradient is eager's."""
    x = _cloud(150, 11)
    torch.manual_seed(3)
    mask = (torch.rand(27, 3, 4) > 0.5).float()
    w = (torch.randn(27, 3, 4) * mask).requires_grad_()
    feats = x.feats.detach().requires_grad_()

    def run(f, w):
        return spnn.functional.conv3d(x.with_feats(f), w, 3, weight_mask=mask).feats

    out = run(feats, w)
    eager = torch.autograd.grad(out.square().sum(), (feats, w))
    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")
    out_c = compiled(feats, w)
    got = torch.autograd.grad(out_c.square().sum(), (feats, w))
    torch.testing.assert_close(out_c, out)
    assert torch.all(got[1][mask == 0] == 0)
    torch.testing.assert_close(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1])


def test_export_refuses_a_submodule_left_in_training_mode():
    """export_model checked only the top module's mode: a model put in eval
    mode with one batch norm (or dropout) set back to training exported
    silently, its program normalising with each input's own statistics
    (not the running ones, as the program is documented to). A ValueError
    names the submodule; the model in eval mode throughout exports, as does
    one whose modules that run alike in both modes (an Identity
    fuse_for_inference left, a ReLU) are in training mode."""
    model = MinkUNet(4, 3, cr=0.125, blocks=1).eval()
    model.stem[0][1].train()
    x = export.example_input(4, 0.5)
    with pytest.raises(ValueError, match=r"stem\.0\.1 \(BatchNorm\) is in training mode.*model\.eval\(\)"):
        export.export_model(model, x)
    dropout = torch.nn.Sequential(spnn.Conv3d(4, 4, 3), spnn.Dropout(0.5), spnn.Conv3d(4, 3, 1)).eval()
    dropout[1].fn.train()
    with pytest.raises(ValueError, match=r"1\.fn \(Dropout\) is in training mode"):
        export.export_model(dropout, x)
    model.eval().stem[0][2].train()
    dropout.eval()[1].training = True  # (the wrapper only: its forward runs alike)
    export.export_model(model, x)
    export.export_model(dropout, x)


def test_export_refuses_compressed_layers_that_run_their_formats_product():
    """A compressed model (formats.compress) whose layers run their format's
    product (a SparseLinear or SparseConv3d with execution "format")
    failed deep inside torch.export (RuntimeError ".numpy() is not supported
    for tensor subclasses", or a data-dependent guard with a graph dump): a
    ValueError names the layer and what exports instead. A SparseConv3d run
    by the engine exports, its program giving eager's output."""
    from pointsparse import formats, prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(spnn.Conv3d(3, 8, 3), spnn.Linear(8, 5)).eval()
    prune.l1_unstructured(model[0], "weight", 0.5)
    x = _cloud(300, 1)
    compressed = formats.compress(model[:1].eval(), "csr")
    program = export.export_model(compressed, x)  # (execution "engine", compress's default)
    with torch.no_grad():
        assert torch.equal(export.ProgramModel(program)(x).feats, compressed(x).feats)
    compressed[0].execution = "format"
    with pytest.raises(ValueError, match=r"0 \(SparseConv3d, CSR\) runs its format's product.*execution"):
        export.export_model(compressed, x)
    whole = formats.compress(model, "csr")  # (its SparseLinear runs torch's linear: compress's default)
    program = export.export_model(whole, x)
    with torch.no_grad():
        assert torch.equal(export.ProgramModel(program)(x).feats, whole(x).feats)
    whole[1].fn.execution = "format"
    with pytest.raises(ValueError, match=r"1\.fn \(SparseLinear, CSR\) runs its format's product.*'dense'"):
        export.export_model(whole, x)


class _RowTensor(torch.nn.Module):
    """A model returning a plain tensor of one row per input voxel (``out.F``, as TorchSparse models often end)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = spnn.Conv3d(3, 5, 3)

    def forward(self, x):
        return self.conv(x).feats


def test_program_of_a_tensor_of_one_row_per_voxel_gives_that_tensor(tmp_path):
    """A model returning a tensor (not a SparseTensor) of one row per input
    voxel exports to a program of that tensor, but ProgramModel told the
    kinds apart by the output's rows alone and took it for logits: it gave
    a SparseTensor where the eager model gives the tensor. Saved and loaded,
    it now gives eager's tensor (output "tensor"), an empty one for an
    empty input."""
    torch.manual_seed(0)
    model = _RowTensor().eval()
    export.save(export.export_model(model, _cloud(300, 1)), tmp_path / "t.pt2")
    loaded = export.ProgramModel.load(tmp_path / "t.pt2")
    assert (loaded.output, loaded.out_shape, loaded.num_classes) == ("tensor", (5,), None)
    x = _cloud(500, 2)
    with torch.no_grad():
        got, want = loaded(x), model(x)
    assert type(got) is torch.Tensor and torch.equal(got, want)
    empty = loaded(ps.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32)))
    assert type(empty) is torch.Tensor and empty.shape == (0, 5)


def test_load_checkpoint_names_the_file_whose_weights_do_not_fit(tmp_path):
    """export.load_checkpoint on a checkpoint whose config or weights make no
    model: the ValueError / TypeError names the file, as load_model's does
    (it said "the weights do not fit the model its config builds" or
    "config lacks 'cr'", naming no file)."""

    weights = MinkUNet(7, 4, cr=0.25, blocks=1).state_dict()
    first = next(iter(weights))
    cases = {"shape": (_config(), {**weights, first: torch.zeros(3, 3)}, ValueError, first.split(".")[0]),
             "missing": (_config(), {}, ValueError, "do not fit"),
             "no_cr": ({k: v for k, v in _config().items() if k != "cr"}, weights, ValueError, "lacks 'cr'"),
             "widths": (_config(widths=[1]), weights, TypeError, "widths must be a dict")}
    for name, (config, model, error, match) in cases.items():
        path = tmp_path / f"{name}.pt"
        checkpoint.save(path, {"config": config, "model": model})
        with pytest.raises(error, match=match) as info:
            export.load_checkpoint(path)
        assert str(path) in str(info.value), name


def test_example_input_checks_in_channels():
    """example_input sliced the generated feats by in_channels: -1 gave all
    but the last channel and 0 none (an example of the wrong width, no
    error), True one channel, 2.0 Python's "slice indices must be integers".
    A ValueError / TypeError names in_channels; ints (numpy's too) as before."""
    import numpy as np

    for bad, error in ((-1, ValueError), (0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="in_channels must be an int"):
            export.example_input(bad, 0.5)
    assert export.example_input(np.int64(2), 0.5).feats.shape[1] == 2
    assert export.example_input(9, 0.5).feats.shape[1] == 9
    with pytest.raises(ValueError, match=r"in_channels 1000000000: the example's \d+ voxels would hold"):
        export.example_input(10**9, 0.5)  # (checked before the padding allocates them)


def test_save_refuses_what_is_no_program(tmp_path):
    """export.save of a model (not its program) failed inside torch with a
    TypeError naming its parameter 'ep'; it names program and what it takes."""
    with pytest.raises(TypeError, match="program must be a torch.export.ExportedProgram"):
        export.save(MinkUNet(4, 3, cr=0.125, blocks=1), tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


# --- the pruning toolkit's layers, exported and compiled -------------------------------------------------

def _program_round_trip(model, example, tmp_path, name: str = "m.pt2"):
    """``model`` exported on ``example``, saved to a file and loaded back, as a :class:`export.ProgramModel`
    (whose output kind ``export.output_kind`` reads off the program alike)."""
    program = export.export_model(model, example)
    export.save(program, tmp_path / name)
    loaded = export.ProgramModel.load(tmp_path / name)
    assert export.output_kind(program) == loaded.output
    return loaded


def _feats(out):
    return out.feats if isinstance(out, ps.SparseTensor) else out


def _runs_as_eager(model, example, others, tmp_path, compiled: bool = True) -> None:
    """``model``'s program (saved and loaded) and its ``torch.compile(fullgraph=True, dynamic=True)`` give
    eager's output bit for bit on the example and on inputs of other sizes."""
    program = _program_round_trip(model, example, tmp_path)
    torch.compiler.reset()
    fast = torch.compile(model, fullgraph=True, dynamic=True, backend="eager") if compiled else None
    assert any(len(x) != len(example) for x in others)
    for x in (example, *others):
        with torch.no_grad():
            want = _feats(model(x))
            assert torch.equal(_feats(program(x)), want), len(x)
            if fast is not None:
                assert torch.equal(_feats(fast(x)), want), len(x)


class _RegionNet(torch.nn.Module):
    """Convs with a custom kernel region: the cross, a list of offsets (a stride-2 k2 one too), one with a bias
    and its ReLU in its store, one taking a residual (``add``) in its store as a fused ResidualBlock's does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = spnn.Conv3d(3, 32, 3)
        self.cross = spnn.Conv3d(32, 48, 3, kernel_region="cross", bias=True)
        self.cross.relu = True
        self.listed = spnn.Conv3d(48, 48, 3, kernel_region=[0, 4, 13, 22, 26])
        self.listed.relu = True
        self.down = spnn.Conv3d(48, 32, 2, stride=2, kernel_region=[0, 7])
        self.up = spnn.Conv3d(32, 48, 2, stride=2, transposed=True)
        self.head = spnn.Conv3d(48, 5, 1)

    def forward(self, x):
        h = self.cross(self.stem(x))
        h = self.listed(h, add=self.up(self.down(h)))
        return self.head(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_region_convs_export_and_compile_as_eager(tmp_path, dtype):
    """Convs with a kernel region (the cross, listed offsets) with a bias, a ReLU and a residual in their store,
    in float32 and in bf16 inference: the program (saved and loaded) and the compiled model give eager's
    output bit for bit on clouds of other sizes. In bf16 eager runs a region through the float32 kernels on
    the widened values (rounded once, the residual added after), while a graph ran the bf16 kernels on the
    weight zeroed outside the region: other sums, logits off by a bf16 rounding."""
    torch.manual_seed(0)
    model = _RegionNet().eval().to(dtype)
    clouds = [_cloud(n, seed, dtype=dtype) for n, seed in ((800, 1), (1200, 2), (300, 3))]
    _runs_as_eager(model, clouds[0], clouds[1:], tmp_path)


def test_kernel_region_convs_in_bf16_on_the_torch_backend_export_and_compile_as_eager(tmp_path):
    """Where the core serves no call (backend "torch"), eager bf16 inference of a conv with a kernel region
    sums in torch's bf16 loop, as a graph's operator does on the bf16 values: the graph widened them to
    float32 all the same (the core's "bf16 on float32"), so its program and compiled model gave other bits."""
    torch.manual_seed(0)
    model = _RegionNet().eval().to(torch.bfloat16)
    clouds = [_cloud(n, seed, dtype=torch.bfloat16) for n, seed in ((400, 1), (600, 2))]
    with ps._ext.torch_path():
        _runs_as_eager(model, clouds[0], clouds[1:], tmp_path)


def test_save_and_load_name_a_path_that_is_no_path(tmp_path):
    """export.save, export.load, ProgramModel.load and check_out_path given a
    path that is no str or os.PathLike (None, an int, the program itself)
    raised pathlib's TypeError "expected str, bytes or os.PathLike object,
    not int", naming no argument; the TypeError names path and what it
    takes, and nothing is written."""
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    for bad in (None, 3, program, ["m.pt2"]):
        for call in (lambda: export.save(program, bad), lambda: export.load(bad),
                     lambda: export.ProgramModel.load(bad), lambda: export.check_out_path(bad)):
            with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike .*\.pt2.*; got "):
                call()
    assert not list(tmp_path.iterdir())
    export.save(program, str(tmp_path / "p.pt2"))  # a str and a Path, as before
    assert export.load(tmp_path / "p.pt2")[1] == {}


def test_export_names_an_example_the_model_does_not_take():
    """An example the model cannot run (feats of another dtype or width than
    its first conv's, a classifier's input for a model of SparseTensors,
    SPVCNN point arguments that do not fit its voxels) failed with the
    model's own error ("weight dtype torch.float32 differs from the input
    feats' torch.float64", torch's "linear(): argument 'input' ... must be
    Tensor"), naming no argument of export_model: the same error type now
    names example and keeps the model's words."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(spnn.Conv3d(3, 4, 3)).eval()
    with pytest.raises(TypeError, match=r"example does not fit the model: .*float64"):
        export.export_model(model, _cloud(100, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"example does not fit the model: .*5 channels but in_channels is 3"):
        export.export_model(model, _cloud(100, 1, channels=5))
    with pytest.raises(TypeError, match=r"example does not fit the model: .*linear"):
        export.export_model(torch.nn.Linear(3, 4).eval(), _cloud(100, 1))
    voxels, inverse, points, point_batch = export.example_input(4, 0.5, points=True)
    spvcnn = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    with pytest.raises(ValueError, match=r"example does not fit the model: .*inverse"):
        export.export_model(spvcnn, (voxels, inverse[:-1], points, point_batch))


def _pruned_convs(dtype, removed: bool) -> torch.nn.Sequential:
    """Convs pruned by the toolkit: whole kernel offsets (a mask zeroing every third offset, which the engine
    skips), whole output channels (ln_structured), vector sparsity (panel_structured, whole bf16 vectors
    too), 2:4, unstructured; the masks attached (a filter skeleton too), or made permanent (``prune.remove``)."""
    from pointsparse import prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(spnn.Conv3d(3, 32, 3), spnn.ReLU(), spnn.Conv3d(32, 32, 3, bias=True), spnn.ReLU(),
                                spnn.Conv3d(32, 32, 2, stride=2), spnn.Conv3d(32, 32, 2, stride=2, transposed=True),
                                spnn.Conv3d(32, 5, 3))
    offsets = torch.ones_like(model[0].weight)
    offsets[::3] = 0
    prune.custom_from_mask(model[0], "weight", offsets)
    prune.ln_structured(model[2], "weight", 0.25, n=1, dim=2)
    prune.panel_structured(model[2], "weight", 0.6, rows=2)
    prune.panel_structured(model[4], "weight", 0.75)
    prune.nm_structured(model[5], "weight", 2, 4)
    prune.l1_unstructured(model[6], "weight", 0.3)
    prune.custom_from_mask(model[6], "weight", offsets[:, :1, :1].expand_as(model[6].weight))
    for i in (0, 2, 4, 5, 6):
        if removed:
            prune.remove(model[i], "weight")
    if not removed:  # (a skeleton on the masked model; after remove one folds into the weight at the next forward)
        prune.attach_filter_skeleton(model[2], "weight", init=0.7)
    assert (model[0].weight.flatten(1) == 0).all(1).sum() == 9 and (model[6].weight.flatten(1) == 0).all(1).sum() == 9
    return model.eval().to(dtype)


@pytest.mark.parametrize("removed", [False, True], ids=["masked", "removed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_convs_export_and_compile_as_eager(tmp_path, dtype, removed):
    """Convs with whole zero kernel offsets (skipped by the engine), pruned channels and vector sparsity, their
    masks attached or made permanent, in float32 and bf16 inference: the program (saved and loaded) and the
    compiled model give eager's output bit for bit on clouds of other sizes."""
    model = _pruned_convs(dtype, removed)
    clouds = [_cloud(n, seed, dtype=dtype) for n, seed in ((500, 1), (900, 2), (40, 3))]
    _runs_as_eager(model, clouds[0], clouds[1:], tmp_path)


def test_compressed_models_export_in_every_format(tmp_path):
    """formats.compress of a pruned model in every format (its convs running the engine on the weight the
    format holds: compress's default, or its choice where the engine was faster; a kernel region kept, a
    strided and a transposed conv): the program (saved and loaded) gives the compressed model's output bit for
    bit on clouds of other sizes, and the compiled model too; a conv set to run its format's product is
    refused naming it (test_export_refuses_compressed_layers_that_run_their_formats_product)."""
    from pointsparse import formats, prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(spnn.Conv3d(4, 16, 3, bias=True), spnn.ReLU(),
                                spnn.Conv3d(16, 16, 3, kernel_region="cross"), spnn.Conv3d(16, 8, 2, stride=2),
                                spnn.Conv3d(8, 8, 2, stride=2, transposed=True), spnn.Conv3d(8, 4, 1)).eval()
    for i in (0, 2, 3, 4, 5):
        prune.l1_unstructured(model[i], "weight", 0.5)
    options = {"bsr": {"blocksize": (4, 4)}, "nm": {"n": 2, "m": 4, "prune": True}, "eie": {"num_pe": 4}}
    clouds = [_cloud(n, seed, channels=4) for n, seed in ((300, 1), (600, 2))]
    for name in formats.FORMATS:
        compressed = formats.compress(model, name, **options.get(name, {}))
        assert all(m.execution == "engine" for m in compressed.modules() if isinstance(m, formats.SparseConv3d))
        program = _program_round_trip(compressed, clouds[0], tmp_path, f"{name}.pt2")
        for x in clouds:
            with torch.no_grad():
                assert torch.equal(program(x).feats, compressed(x).feats), name
    _runs_as_eager(compressed, clouds[0], clouds[1:], tmp_path)


class _PrunedVoxels(torch.nn.Module):
    """VoxelPrune before the coarse stride's convs (a batch norm among them) and VoxelSkip taking the fine
    decoder's residual (``add_to``), both by magnitude or by a learned score."""

    def __init__(self, score: str, keep_ratio: float) -> None:
        super().__init__()
        width = lambda c: c if score == "learned" else None  # noqa: E731
        self.stem, self.down = spnn.Conv3d(3, 8, 3), spnn.Conv3d(8, 8, 2, stride=2)
        self.prune = spnn.VoxelPrune(keep_ratio, score, width(8))
        self.mid = torch.nn.Sequential(spnn.Conv3d(8, 8, 3), spnn.BatchNorm(8), spnn.ReLU())
        self.up = spnn.Conv3d(8, 8, 2, stride=2, transposed=True)
        self.skip = spnn.VoxelSkip(spnn.Conv3d(16, 16, 3), keep_ratio, score, width(16))
        self.head = spnn.Conv3d(16, 5, 1)

    def forward(self, x):
        a = self.stem(x)
        c = spnn.cat([a, self.up(self.mid(self.prune(self.down(a))))])
        return self.head(self.skip.add_to(c, c))


def _items(*parts) -> ps.SparseTensor:
    """A batch of clouds ``(batch index, points, seed)``: missing indices are empty batch items."""
    clouds = [_cloud(n, seed) for _, n, seed in parts]
    coords = [torch.cat([torch.full((len(x), 1), b, dtype=torch.int32), x.coords[:, 1:]], 1)
              for (b, _, _), x in zip(parts, clouds)]
    return ps.SparseTensor(torch.cat([x.feats for x in clouds]), torch.cat(coords))


@pytest.mark.parametrize("score", ["magnitude", "learned"])
def test_voxel_prune_and_skip_export_with_empty_items_and_tiny_clouds(tmp_path, score):
    """VoxelPrune and VoxelSkip (by magnitude, by a learned score; keep ratio 0.1) inside a model: the program
    (saved and loaded) and the compiled model give eager's output bit for bit on batches with an empty batch
    item, on clouds of fewer voxels than 1 / keep_ratio (one voxel kept of each item) and of one voxel,
    and a program traced on such a tiny cloud runs large ones."""
    torch.manual_seed(0)
    model = _PrunedVoxels(score, 0.1).eval()
    example = _items((0, 300, 1), (1, 150, 2))
    gap, tiny = _items((0, 200, 3), (2, 100, 4)), _items((0, 4, 5), (3, 3, 6))
    assert sorted(set(gap.coords[:, 0].tolist())) == [0, 2] and 2 < len(tiny) < 10
    _runs_as_eager(model, example, [gap, tiny, _items((0, 1, 7))], tmp_path)
    program = _program_round_trip(model, _items((0, 3, 5)), tmp_path, "tiny.pt2")
    with torch.no_grad():
        assert torch.equal(program(gap).feats, model(gap).feats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_pruned_minkunet_exports_and_compiles_as_eager(tmp_path, dtype):
    """fuse_for_inference of a MinkUNet pruned every way the toolkit prunes a trained network (whole kernel
    offsets, vector sparsity, VoxelSkip by magnitude and by a learned score around residual blocks' convs),
    in float32 and in bf16 inference: the program (saved and loaded) and the compiled model give eager
    inference's logits bit for bit on clouds of other sizes."""
    from pointsparse import prune

    torch.manual_seed(0)
    model = _trained_like(MinkUNet(3, 5, cr=0.25, blocks=1))
    model.fuse[3][-1].main = spnn.VoxelSkip(model.fuse[3][-1].main, 0.5)
    learned = model.fuse[1][-1]
    learned.main = spnn.VoxelSkip(learned.main, 0.5, "learned", learned.main[0].in_channels)
    for i, conv in enumerate(m for m in model.modules() if isinstance(m, spnn.Conv3d)):
        if conv.kernel_volume == 27 and i % 2:
            offsets = torch.ones_like(conv.weight)
            offsets[::3] = 0
            prune.custom_from_mask(conv, "weight", offsets)
        elif conv.out_channels >= 16:
            prune.panel_structured(conv, "weight", 0.6, rows=2)
    fused = spnn.fuse_for_inference(model.eval()).to(dtype)
    assert any(m.relu for m in fused.modules() if isinstance(m, spnn.Conv3d))  # (ReLUs and residuals in stores)
    clouds = [_cloud(n, seed, dtype=dtype) for n, seed in ((800, 1), (1200, 2))]
    _runs_as_eager(fused, clouds[0], clouds[1:], tmp_path)


def test_channel_pruned_minkunet_exports_and_compiles_as_eager(tmp_path):
    """A MinkUNet channel-pruned by the dependency graph (every coupled group halved: residual streams, skip
    concatenations, strided and transposed convs), then fused, and that in bf16: each program (saved and
    loaded) gives eager's logits bit for bit on clouds of other sizes, and the compiled pruned model too."""
    torch.manual_seed(0)
    model = _trained_like(MinkUNet(3, 5, cr=0.25, blocks=1))
    example = _cloud(800, 1)
    groups = surgery.channel_groups(model, example)
    surgery.apply_channel_ratios(model, {g.name: 0.5 for g in groups}, example_input=example)
    assert model.stem[0][0].out_channels == 4 and model.fuse[3][0].main[0].out_channels == 12
    clouds = [_cloud(n, seed) for n, seed in ((800, 1), (1200, 2))]
    _runs_as_eager(model.eval(), clouds[0], clouds[1:], tmp_path)
    fused = spnn.fuse_for_inference(model)
    _runs_as_eager(fused, clouds[0], clouds[1:], tmp_path, compiled=False)
    half = [x.with_feats(x.feats.bfloat16()) for x in clouds]
    _runs_as_eager(fused.to(torch.bfloat16), half[0], half[1:], tmp_path, compiled=False)


def test_a_masked_model_exports_with_its_masks_made_permanent():
    """A model pruned with masks (prune.panel_structured, torch's l1_unstructured) was exported with its
    hooks: the program held weight_orig and weight_mask and multiplied them every call, and torch warned of
    every such weight "assigned during export". It now exports a copy with the masks made permanent: no
    warning, each weight once (the masked values: the same zeros the engine skips), the model's bits, and
    the model itself still masked."""
    import warnings

    from pointsparse import prune

    torch.manual_seed(3)
    model = torch.nn.Sequential(spnn.Conv3d(3, 16, 3), spnn.ReLU(), spnn.Conv3d(16, 16, 3), spnn.Conv3d(16, 4, 1)).eval()
    prune.panel_structured(model[0], "weight", 0.5)
    prune.kernel_structured(model[2], "weight", 0.5, scope="offset")
    torch.nn.utils.prune.l1_unstructured(model[3], "weight", 0.5)
    x = _cloud(300, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = export.export_model(model, x)
    assert not [w for w in caught if "assigned" in str(w.message)], [str(w.message)[:200] for w in caught]
    names = list(program.state_dict) + [s.target for s in program.graph_signature.input_specs if s.target]
    assert not [n for n in names if n.endswith(("_orig", "_mask"))], names
    assert all(hasattr(model[i], "weight_orig") for i in (0, 2, 3))
    y = _cloud(500, seed=4)
    with torch.no_grad():
        assert torch.equal(program.module()(y.feats, y.coords), model(y).feats)


def test_a_weight_tied_to_a_masked_one_keeps_its_values_in_the_program_and_fused():
    """b.weight = a.weight, then a pruned with a mask: the copy that export and fuse_for_inference make
    permanent wrote a's masked values into the tied tensor in place (torch's prune.remove), so b ran a's mask
    too: the program and the fused model gave other outputs than the model. The tied tensor is now copied
    first."""
    import torch.nn.utils.prune as torch_prune

    torch.manual_seed(0)
    a, b = spnn.Conv3d(3, 3, 3), spnn.Conv3d(3, 3, 3)
    b.weight = a.weight
    torch_prune.l1_unstructured(a, "weight", 0.5)
    model = torch.nn.Sequential(a, spnn.ReLU(), b).eval()
    x = _cloud(300, seed=1)
    with torch.no_grad():
        want = model(x).feats
        program = export.export_model(model, x)
        assert torch.equal(program.module()(x.feats, x.coords), want)
        torch.testing.assert_close(spnn.fuse_for_inference(model)(x).feats, want, rtol=1e-6, atol=1e-6)
    assert b.weight is a.weight_orig and int((b.weight == 0).sum()) == 0  # the model itself untouched


def test_a_layer_pruned_by_the_toolkit_compiles_fullgraph_with_gradients():
    """A conv pruned with the toolkit's methods (``panel_structured``, ...)
    under ``torch.compile(fullgraph=True)`` in grad mode: its forward hook
    that keeps pruned modules deep-copyable read the product's ``grad_fn``,
    which dynamo does not trace ("Unsupported: Tensor with grad_fn()"); now
    it compiles, gives eager's output and ``weight_orig`` gradient, and the
    module deep-copies after the compiled forward."""
    from pointsparse import prune

    coords = random_coords(300, 8, seed=0)
    x = ps.SparseTensor(torch.randn(len(coords), 8), coords)
    torch.manual_seed(0)
    conv = spnn.Conv3d(8, 16, 3)
    prune.panel_structured(conv, "weight", amount=0.5)
    eager = copy.deepcopy(conv)
    want = eager(x).feats
    want.sum().backward()
    torch._dynamo.reset()
    got = torch.compile(conv, fullgraph=True, backend="eager")(x).feats
    got.sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(conv.weight_orig.grad, eager.weight_orig.grad)
    copied = copy.deepcopy(conv)
    with torch.no_grad():
        torch.testing.assert_close(copied(x).feats, want.detach())


def test_a_flipped_byte_in_the_archives_end_records_names_the_file(tmp_path):
    """A byte flipped in the zip's end records (the zip64 locator's disk
    fields) made zipfile.is_zipfile itself raise zipfile.BadZipFile ('zipfiles
    that span multiple disks are not supported') inside load's check of the
    members, where every other damage is a ValueError naming the file. Each
    flip of the last bytes is refused naming the file, or loads the same
    program."""
    x = export.example_input(7, 0.4)
    torch.manual_seed(0)
    net = torch.nn.Sequential(spnn.Conv3d(7, 4, 3)).eval()
    path = tmp_path / "p.pt2"
    export.save(export.export_model(net, x), path, {"classes": ["a", "b", "c", "d"]})
    data = path.read_bytes()
    bad = tmp_path / "bad.pt2"
    for offset in range(len(data) - 64, len(data)):
        bad.write_bytes(_flip(data, offset))
        try:
            export.load(bad)
        except ValueError as error:
            assert str(bad) in str(error), offset


def test_program_model_refuses_a_gradient_by_name_after_its_weights_changed_in_place():
    """A ProgramModel's output, its weights then changed in place (load_state_dict, an edit under
    torch.no_grad()) before backward: the refusal's backward saved the tensors that wanted gradients, so
    backward raised torch's "one of the variables needed for gradient computation has been modified by an
    inplace operation" instead of the refusal naming ProgramModel (the saved tensors' values are never
    read: only their shapes, dtypes and devices)."""
    torch.manual_seed(0)
    net = _trained_like(MinkUNet(3, 4, cr=0.25, blocks=1))
    x = _cloud(300, 1)
    model = export.ProgramModel(export.export_model(net, x))
    feats = x.feats.clone().requires_grad_()
    out = model(ps.SparseTensor(feats, x.coords)).feats
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)
    with pytest.raises(RuntimeError, match=r"ProgramModel .*inference only.* no gradient.*eager model"):
        out.square().sum().backward()
