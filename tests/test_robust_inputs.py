"""Bad inputs found by a fuzzing pass give a clear TypeError/ValueError
naming the argument (never a deep torch error or a silently wrong result):
SPVCNN's point arguments, export.save's meta, SparseTensor's stride, cache
and meta-device moves, voxelize's meta tensors and complex batch, and
KernelMap.pairs' offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pointsparse as ps
import pointsparse.export as pe
import pointsparse.models as pm
from reference import random_coords


def _cloud(n=40, c=4, seed=0):
    coords = random_coords(n, seed=seed)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=torch.Generator().manual_seed(seed)), coords)


# --- SPVCNN.forward ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spvcnn_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(300, 3, generator=g) * 8
    batch = (torch.arange(300) >= 150).long()
    v, inv = ps.voxelize(pts, torch.randn(300, 4, generator=g), voxel_size=1.0, batch=batch)
    return pm.SPVCNN(4, 3, cr=0.1, blocks=1).eval(), v, inv, pts, batch


def test_spvcnn_accepts_consistent_arguments(spvcnn_case):
    m, v, inv, pts, batch = spvcnn_case
    with torch.no_grad():
        assert m(v, inv, pts, batch).shape == (300, 3)
        assert m(v, inv.int(), pts, batch.int()).shape == (300, 3)


@pytest.mark.parametrize("point_batch", ["all5", "swapped", "one_row"])
def test_spvcnn_point_batch_must_match_the_voxels(spvcnn_case, point_batch):
    m, v, inv, pts, batch = spvcnn_case
    bad = {"all5": torch.full_like(batch, 5), "swapped": 1 - batch,
           "one_row": batch.clone().index_fill_(0, torch.tensor([7]), 1)}[point_batch]
    with torch.no_grad(), pytest.raises(ValueError, match="point_batch"):
        m(v, inv, pts, bad)


@pytest.mark.parametrize("inverse, error", [
    (lambda inv: inv.float(), TypeError), (lambda inv: inv.bool(), TypeError), (lambda inv: inv.tolist(), TypeError),
    (lambda inv: inv + 10_000, ValueError), (lambda inv: inv - inv.max() - 1, ValueError),
])
def test_spvcnn_inverse_must_be_an_integer_row_map(spvcnn_case, inverse, error):
    m, v, inv, pts, batch = spvcnn_case
    with torch.no_grad(), pytest.raises(error, match="inverse"):
        m(v, inverse(inv), pts, batch)


@pytest.mark.parametrize("points", [lambda p: p.tolist(), lambda p: p.long(), lambda p: p.numpy()])
def test_spvcnn_points_must_be_a_float_tensor(spvcnn_case, points):
    m, v, inv, pts, batch = spvcnn_case
    with torch.no_grad(), pytest.raises(TypeError, match="points"):
        m(v, inv, points(pts), batch)


def test_spvcnn_point_batch_must_be_an_integer_tensor(spvcnn_case):
    m, v, inv, pts, batch = spvcnn_case
    for bad in (batch.float(), batch.tolist()):
        with torch.no_grad(), pytest.raises(TypeError, match="point_batch"):
            m(v, inv, pts, bad)


@pytest.mark.parametrize("units", ["metres", "one_row"])
def test_spvcnn_points_must_lie_in_their_voxels(spvcnn_case, units):
    """Points not in voxel units (metres of a 0.25 m grid), or a point far
    from its voxel: a ValueError naming points (their features were read
    from other voxels silently); a point a float32 rounding past its voxel's
    edge is still taken."""
    m, v, inv, pts, batch = spvcnn_case
    bad = pts * 0.25 if units == "metres" else pts.clone().index_fill_(0, torch.tensor([7]), 50.0)
    with torch.no_grad(), pytest.raises(ValueError, match=r"points\[\d+\] = .* lies outside its voxel"):
        m(v, inv, bad, batch)
    edge = pts.clone()
    edge[3] = torch.nextafter(v.coords[inv[3], 1:].float() + 1, torch.tensor(2.0**30))  # just past the far edge
    with torch.no_grad():
        assert m(v, inv, edge, batch).shape == (300, 3)


@pytest.mark.parametrize("dtype, far", [(torch.float32, far) for far in (0, 2**21 - 8, -(2**21) + 3)] +
                         [(torch.float64, far) for far in (0, 2**24 - 2, 2**26, -(2**31) + 3, 2**31 - 128)])
def test_spvcnn_points_lie_within_two_voxels_of_theirs_exactly(dtype, far):
    """check_points takes a point within 2 voxel edges of its voxel's coords on every axis and refuses one
    further, exactly, at every coordinate int32 voxels reach (float64 points; float32 ones up to 2**21 voxel
    units away, below): past 2**24 float32 does not hold every voxel coordinate (a check in float32 would read
    c + 3 as c)."""
    from pointsparse.models.spvcnn import check_points

    base = torch.tensor([float(far), 0.0, -3.0], dtype=torch.float64).to(dtype)  # a point `dtype` holds
    exact = base.double().long()
    for step, ok in ((0, True), (2, True), (-2, True), (3, False), (-3, False)):
        coords = torch.cat([torch.zeros(1, 1, dtype=torch.long), (exact + step)[None]], 1).int()
        if int(coords[0, 1]) != int(exact[0]) + step:
            continue  # (past int32)
        voxels = ps.SparseTensor(torch.zeros(1, 1), coords)
        args = (voxels, torch.zeros(1, dtype=torch.long), base[None], torch.zeros(1, dtype=torch.long))
        if ok:
            assert torch.equal(check_points(*args), coords), (step, far)
        else:
            with pytest.raises(ValueError, match=r"points\[0\] = .* lies outside its voxel"):
                check_points(*args)
    # a point just past the far edge of a two-voxel margin is out
    coords = torch.tensor([[0, 5, 5, 5]], dtype=torch.int32)
    voxels, zero = ps.SparseTensor(torch.zeros(1, 1), coords), torch.zeros(1, dtype=torch.long)
    past = torch.nextafter(torch.tensor([7.0, 5, 5], dtype=dtype), torch.tensor(8.0, dtype=dtype))
    with pytest.raises(ValueError, match="lies outside its voxel"):
        check_points(voxels, zero, past[None], zero)


def test_spvcnn_refuses_float32_points_past_a_quarter_voxels_precision():
    """A street at UTM coordinates voxelised at 0.2 m (3.4e7 voxel units),
    its points given as float32: each point up to 2 voxels off, within the
    check's margin, and 8% of the points changed class (an SPVCNN review).
    float32 points whose voxels reach past 2**21 units (where float32 holds
    a position to a quarter voxel) are a ValueError saying what to give;
    the same points in float64 are taken."""
    from pointsparse.models.spvcnn import FLOAT32_POINTS_REACH, check_points

    zero = torch.zeros(1, dtype=torch.long)
    for far, spacing in ((FLOAT32_POINTS_REACH, "0.25"), (34_300_242, "4")):
        voxels = ps.SparseTensor(torch.zeros(1, 1), torch.tensor([[0, far, 5, 5]], dtype=torch.int32))
        point = torch.tensor([[far + 0.5, 5.5, 5.5]], dtype=torch.float64)
        with pytest.raises(ValueError, match=rf"points are float32 and their voxels reach {far + 1} voxel units .* "
                                             rf"only to {spacing} voxel .* as float64, or take the origin near"):
            check_points(voxels, zero, point.float(), zero)
        assert check_points(voxels, zero, point, zero).tolist() == [[0, far, 5, 5]]
    near = ps.SparseTensor(torch.zeros(1, 1), torch.tensor([[0, FLOAT32_POINTS_REACH - 1, 5, 5]], dtype=torch.int32))
    check_points(near, zero, torch.tensor([[FLOAT32_POINTS_REACH - 0.5, 5.5, 5.5]]), zero)  # (just within)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_spvcnn_refuses_16_bit_points(dtype):
    """Points cast with a bf16 model's inputs passed the check (70-78% of a
    sweep's points outside their own voxel, within its two-voxel margin) and
    moved the logits 10-26x more than bf16's rounding: a TypeError naming
    the dtype and what to give."""
    from pointsparse.models.spvcnn import check_points

    voxels = ps.SparseTensor(torch.zeros(1, 1), torch.tensor([[0, 300, 5, 5]], dtype=torch.int32))
    zero = torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError, match=rf"points must be float32 or float64; got {dtype}.*float32 points"):
        check_points(voxels, zero, torch.tensor([[300.5, 5.5, 5.5]], dtype=dtype), zero)
    assert check_points(voxels, zero, torch.tensor([[300.5, 5.5, 5.5]]), zero).tolist() == [[0, 300, 5, 5]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_spvcnn_refuses_points_that_are_not_finite(bad):
    """A NaN point passed the check (no comparison with its voxel holds) and
    reached the point branch's interpolation; NaN and inf are refused,
    naming the point."""
    from pointsparse.models.spvcnn import check_points

    voxels = ps.SparseTensor(torch.zeros(1, 1), torch.tensor([[0, 5, 5, 5]], dtype=torch.int32))
    zero = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"points\[0\] = .* is not finite"):
        check_points(voxels, zero, torch.tensor([[5.5, bad, 5.5]]), zero)


def test_spvcnn_point_check_makes_no_float64_copy_of_float32_points(spvcnn_case):
    """The check that points lie in their voxels compares float32 points in float32 where the voxels'
    coordinates fit it exactly (it made a float64 copy of every point and of its voxel's coords, each
    forward)."""
    from torch.overrides import TorchFunctionMode

    from pointsparse.models.spvcnn import check_points

    m, v, inv, pts, batch = spvcnn_case
    made = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                made.append((getattr(func, "__name__", func), tuple(out.shape)))
            return out

    with Record():
        check_points(v, inv, pts, batch)
    assert not made, made


# --- export.save's meta -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def program():
    x = _cloud()
    return pe.export_model(torch.nn.Sequential(ps.nn.Conv3d(4, 8)).eval(), x), x


@pytest.mark.parametrize("meta", [[1, 2], "abc", ("a", 1), {1: 2}, {"a": 1, (1, 2): 3}, {"a": {1, 2}},
                                  {"a": torch.ones(2)}, {"a": {1: 2}}, {"a": [{"b": {2.5: 1}}]},
                                  {"a": float("nan")}, {"a": [float("inf")]}])
def test_save_refuses_meta_load_cannot_return(tmp_path, program, meta):
    path = tmp_path / "m.pt2"
    with pytest.raises(TypeError, match="meta"):
        pe.save(program[0], path, meta)
    assert not path.exists()


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_save_names_meta_nested_too_deep(tmp_path, program, kind):
    """meta nested some hundreds of levels deep (a log kept as a linked list)
    made save raise Python's RecursionError from json.dumps, naming nothing.
    It is a TypeError saying where meta nests too deep and the most it
    takes, and nothing is written; meta nested as deep as that saves."""
    from pointsparse import checkpoint

    def nested(depth):
        top = inner = [] if kind == "list" else {}
        for _ in range(depth):
            child = [] if kind == "list" else {}
            inner.append(child) if kind == "list" else inner.update(a=child)
            inner = child
        return top

    path = tmp_path / "m.pt2"
    for depth in (checkpoint.MAX_NESTING + 1, 5000):
        with pytest.raises(TypeError, match=rf"meta nests containers more than {checkpoint.MAX_NESTING} levels "
                                            r"deep \(at meta\['log'\]"):
            pe.save(program[0], path, {"log": nested(depth)})
        assert not path.exists()
    meta = {"log": nested(checkpoint.MAX_NESTING - 1)}
    pe.save(program[0], path, meta)
    assert pe.load(path)[1] == meta


def test_save_keeps_dict_meta(tmp_path, program):
    path = tmp_path / "m.pt2"
    meta = {"classes": ["a", "b"], "voxel_size": 0.2, "nested": {"k": None}}
    pe.save(program[0], path, meta)
    assert pe.load(path)[1] == meta
    pe.save(program[0], path, None)
    assert pe.load(path)[1] == {}


# --- SparseTensor -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [2**40, 2**31, (1, 1, 2**31), np.int64(2**35), torch.tensor(2**33)])
def test_sparse_tensor_stride_range(stride):
    x = _cloud()
    with pytest.raises(ValueError, match=r"stride must be in \[1, 2147483647\] per axis"):
        ps.SparseTensor(x.feats, x.coords, stride=stride)


def test_sparse_tensor_largest_stride_accepted():
    coords = torch.tensor([[0, 0, 0, 0]], dtype=torch.int32)
    assert ps.SparseTensor(torch.ones(1, 2), coords, stride=2**31 - 1).stride == (2**31 - 1,) * 3


@pytest.mark.parametrize("cache", ["x", {}, 1])
def test_sparse_tensor_cache_type(cache):
    x = _cloud()
    with pytest.raises(TypeError, match="cache must be a CoordinateCache or None"):
        ps.SparseTensor(x.feats, x.coords, cache=cache)


@pytest.mark.parametrize("args, kwargs", [(("meta",), {}), ((torch.device("meta"),), {}),
                                          ((), {"device": "meta"}), (("meta", torch.float64), {})])
def test_sparse_tensor_to_meta_refused(args, kwargs):
    x = _cloud()
    with pytest.raises(ValueError, match="meta"):
        x.to(*args, **kwargs)
    assert x.to(torch.float64).dtype == torch.float64  # other moves still work


# --- voxelize ---------------------------------------------------------------------------------------------

def test_voxelize_refuses_meta_points_and_feats():
    with pytest.raises(ValueError, match="points is a meta tensor"):
        ps.voxelize(torch.zeros(10, 3, device="meta"), voxel_size=1.0)
    with pytest.raises(ValueError, match="feats is a meta tensor"):
        ps.voxelize(torch.zeros(10, 3), torch.zeros(10, 2, device="meta"), voxel_size=1.0)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_voxelize_refuses_complex_batch(dtype):
    with pytest.raises(TypeError, match="batch must hold integer batch indices"):
        ps.voxelize(torch.rand(10, 3), voxel_size=1.0, batch=torch.zeros(10, dtype=dtype))


# --- torch sparse layouts and meta coords at every entry of API.md ----------------------------------------

SPARSE_LAYOUTS = [lambda t: t.to_sparse(), lambda t: t.to_sparse_csr()]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", SPARSE_LAYOUTS, ids=["coo", "csr"])
def test_sparse_layouts_are_refused_naming_the_argument(layout):
    """A torch sparse-layout tensor was taken as dense: coords gave torch's
    NotImplementedError ('aten::lt.Scalar' ... 'SparseCPU' backend), feats
    made a SparseTensor whose first conv failed, voxelize and conv3d gave
    torch's RuntimeError ('unsupported memory format option Contiguous')."""
    x = _cloud()
    strided = "must be a dense .strided. tensor; got layout torch.sparse"
    with pytest.raises(TypeError, match="coords " + strided):
        ps.SparseTensor(x.feats, layout(x.coords))
    with pytest.raises(TypeError, match="feats " + strided):
        ps.SparseTensor(layout(x.feats), x.coords)
    with pytest.raises(TypeError, match="feats " + strided):
        x.with_feats(layout(x.feats))
    with pytest.raises(TypeError, match="coords " + strided):
        ps.kmap.build(layout(x.coords))
    points = torch.rand(10, 3)
    with pytest.raises(TypeError, match="points " + strided):
        ps.voxelize(layout(points), voxel_size=1.0)
    with pytest.raises(TypeError, match="feats " + strided):
        ps.voxelize(points, layout(torch.rand(10, 2)), voxel_size=1.0)
    with pytest.raises(TypeError, match="batch " + strided):
        ps.voxelize(points, voxel_size=1.0, batch=torch.zeros(10, dtype=torch.int64).to_sparse())  # (1-D: COO)
    weight = torch.randn(27, x.num_channels, 2)
    with pytest.raises(TypeError, match="weight " + strided):
        ps.nn.functional.conv3d(x, weight.to_sparse(), 3)
    with pytest.raises(TypeError, match="bias " + strided):
        ps.nn.functional.conv3d(x, weight, 3, bias=torch.zeros(2).to_sparse())


@pytest.mark.parametrize("method", [None, "torch", "hash", "mergesort"])
def test_kmap_build_refuses_meta_coords(method):
    """kmap.build of meta coords gave torch's NotImplementedError ('Cannot
    copy out of meta tensor') or RuntimeError ('Tensor.item() cannot be
    called on meta tensors'), as a SparseTensor of them refuses them."""
    coords = torch.zeros(5, 4, dtype=torch.int32, device="meta")
    for kernel_size, stride in ((3, 1), (2, 2), (3, 2)):
        with pytest.raises(ValueError, match="coords is a meta tensor|method .* runs on CPU tensors"):
            ps.kmap.build(coords, kernel_size, stride, method=method)
    with pytest.raises(ValueError, match="out_coords is a meta tensor"):
        ps.kmap.build(random_coords(30), 3, 2, out_coords=coords)


# --- KernelMap.pairs --------------------------------------------------------------------------------------

def test_kernel_map_pairs_offset_type():
    kmap = ps.kmap.build(random_coords(30), kernel_size=3)
    want = kmap.pairs(4)
    for ok in (np.int64(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)):
        got = kmap.pairs(ok)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for bad in (1.5, "1", True, torch.tensor(1.0), torch.tensor([1]), None):
        with pytest.raises(TypeError, match="offset must be an int"):
            kmap.pairs(bad)
    with pytest.raises(ValueError, match=r"offset must be an offset index in \[0, 27\)"):
        kmap.pairs(27)


# --- exported programs' coords dtype ----------------------------------------------------------------------

@pytest.mark.parametrize("conv", [dict(kernel_size=3), dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2)],
                         ids=["submanifold", "k2s2", "k3s2"])
def test_exported_program_refuses_non_int32_coords(conv):
    """The program's first coords operator (kmap_build, kmap_parents or
    downsample) checks the input's dtype when it runs, as eager mode does
    (float coords were truncated silently, int64 taken)."""
    x = _cloud()
    layers = [ps.nn.Conv3d(4, 8, **conv)]
    if conv.get("stride", 1) > 1:  # back up to the input's coords (a program gives a row per input voxel)
        layers.append(ps.nn.Conv3d(8, 8, **conv, transposed=True))
    net = torch.nn.Sequential(*layers).eval()
    run = pe.export_model(net, x).module()
    with torch.no_grad():
        want = net(x).feats
        assert torch.allclose(run(x.feats, x.coords), want, atol=1e-5)
        for coords in (x.coords.float() + 0.25, x.coords.long(), x.coords.double()):
            with pytest.raises(TypeError, match=r"coords must be int32"):
                run(x.feats, coords)


def _map_and_conv_op_calls():
    """{operator name: (operator, its arguments by name)} of the kernel-map
    and conv operators on a small valid input."""
    ops = torch.ops.pointsparse
    coords = random_coords(60, 5, batch=1, seed=3)
    x = ps.SparseTensor(torch.randn(len(coords), 4, generator=torch.Generator().manual_seed(0)), coords)
    key = ps.ops.key_to_list(ps.kmap.get_kmap(x, 3).key)
    in_idx, out_idx, sizes = ops.kmap_build(coords, None, key, False)
    down_key = ps.ops.key_to_list(ps.kmap.get_kmap(x, 2, 2).key)
    coarse, d_in, d_out, d_sizes = ops.kmap_parents(coords, down_key, False)
    weight, grad = torch.randn(27, 4, 6), torch.randn(len(coords), 6)
    pairs = dict(out_coords=coords, in_idx=in_idx, out_idx=out_idx, sizes=sizes, key=key)
    return {
        "kmap_build": (ops.kmap_build, dict(coords=coords, out_coords=coords, key=key, trusted=False)),
        "kmap_transpose": (ops.kmap_transpose, dict(coarse_coords=coarse, fine_coords=coords, in_idx=d_in,
                                                    out_idx=d_out, sizes=d_sizes, key=down_key, trusted=False)),
        "conv": (ops.conv, dict(feats=x.feats, weight=weight, bias=torch.randn(6), **pairs)),
        "conv_inference": (ops.conv_inference, dict(feats=x.feats, weight=weight, bias=None, **pairs,
                                                    add=torch.randn(len(coords), 6), relu=True)),
        "conv_input_grad": (ops.conv_input_grad, dict(grad=grad, weight=weight, **pairs, num_in=len(coords))),
        "conv_weight_grad": (ops.conv_weight_grad, dict(feats=x.feats, grad=grad, **pairs)),
    }


@pytest.mark.parametrize("op, name", [("kmap_build", "out_coords"), ("kmap_transpose", "fine_coords"),
                                      ("kmap_transpose", "sizes"), ("conv", "weight"), ("conv", "bias"),
                                      ("conv", "in_idx"), ("conv_inference", "add"), ("conv_inference", "feats"),
                                      ("conv_input_grad", "weight"), ("conv_weight_grad", "grad")])
def test_map_and_conv_operators_refuse_a_meta_tensor_beside_real_ones(op, name):
    """A kernel-map or conv operator called with one tensor on the meta
    device and the others on the CPU ran its fake implementation (torch
    dispatches to the Meta kernel) and returned uninitialised CPU memory as
    its result (a conv's output of 1e-17s, pairs of any rows), silently.
    Now a ValueError naming the operator and the argument; every tensor on
    meta still gives the result's shape and dtype."""
    fn, args = _map_and_conv_op_calls()[op]
    want = fn(**args)
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{op}: {name} is on meta but \w+ on cpu"):
        fn(**args)
    if op == "kmap_build":  # (its pairs' count is data: torch runs it on fake tensors, not meta ones)
        return
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    got = fn(**meta)
    for g, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
        assert g.is_meta and g.dtype == w.dtype and g.dim() == w.dim()
