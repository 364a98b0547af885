"""SparseTensor as API.md promises it: properties and aliases, .to/.cpu,
dense() against a naive grid, with_feats sharing the coordinate cache,
collate, empty tensors, and every bad input in a child process."""

from __future__ import annotations

import copy
import warnings

import numpy as np

import pytest
import torch

import pointsparse as ps
from pointsparse.tensor import CoordinateCache, as_triple
from reference import dense_ref, run_in_children, run_python


def make(n=50, c=3, batches=2, stride=1, seed=0, dtype=torch.float32, lo=0, hi=8):
    """A tensor with unique coords (multiples of the stride)."""
    g = torch.Generator().manual_seed(seed)
    st = torch.tensor(as_triple(stride, "stride"))
    rows = torch.cat([torch.randint(0, batches, (4 * n, 1), generator=g),
                      torch.randint(lo, hi, (4 * n, 3), generator=g) * st], 1)
    coords = torch.unique(rows, dim=0)[torch.randperm(len(torch.unique(rows, dim=0)), generator=g)][:n]
    feats = torch.randn(len(coords), c, generator=g, dtype=torch.float64).to(dtype)
    return ps.SparseTensor(feats, coords.to(torch.int32), stride)


def test_properties_and_aliases():
    x = make(stride=2)
    assert x.F is x.feats and x.C is x.coords
    assert x.stride == (2, 2, 2) and isinstance(x.stride, tuple)
    assert x.coords.dtype == torch.int32 and x.coords.shape[1] == 4
    assert len(x) == x.feats.shape[0] == x.coords.shape[0]
    assert x.batch_size == int(x.coords[:, 0].max()) + 1
    y = ps.SparseTensor(torch.zeros(1, 2), torch.tensor([[0, 2, 4, 6]], dtype=torch.int32), (2, 4, 6))
    assert y.stride == (2, 4, 6)
    assert ps.SparseTensor(torch.zeros(1, 2), torch.zeros(1, 4, dtype=torch.int32), np.int64(2)).stride == (2, 2, 2)
    assert ps.SparseTensor(torch.zeros(1, 2), torch.zeros(1, 4, dtype=torch.int32), [1, 2, 3]).stride == (1, 2, 3)


def test_setting_feats_coords_or_stride_says_how_to_make_a_new_tensor():
    """``x.F = relu(x.F)`` (TorchSparse's SparseTensor has that setter) was
    an AttributeError "property 'F' of 'SparseTensor' object has no setter",
    and ``x.feats = ...`` named 'F' too: the error names what was set and
    the way: with_feats for new feats, a new SparseTensor for new coords or
    stride."""
    x = make()
    for name in ("feats", "F"):
        with pytest.raises(AttributeError, match=r"SparseTensor\.feats \(\.F\) is read-only.*with_feats"):
            setattr(x, name, torch.zeros_like(x.feats))
    for name in ("coords", "C", "stride"):
        with pytest.raises(AttributeError, match=r"SparseTensor\.(coords \(\.C\)|stride) is read-only.*new "
                                                 r"SparseTensor"):
            setattr(x, name, x.coords if name != "stride" else 2)
    assert x.F is x.feats and x.stride == (1, 1, 1)


def test_to_and_cpu():
    x = make()
    y = x.to(torch.float64)
    assert y.feats.dtype == torch.float64 and torch.equal(y.coords, x.coords) and y.cache is x.cache
    assert torch.equal(y.feats, x.feats.double())
    z = x.cpu()
    assert z.device.type == "cpu" and z.cache is x.cache and torch.equal(z.feats, x.feats)


def test_dtype_casts_as_torch_names_them():
    """.double(), .float(), .half() and .bfloat16() cast the feats, as on a
    torch tensor and a module (net.half() then x.half(), as TorchSparse's
    tensor takes it): the 16-bit two were an AttributeError."""
    x = make()
    for cast, dtype in (("double", torch.float64), ("float", torch.float32), ("half", torch.float16),
                        ("bfloat16", torch.bfloat16)):
        y = getattr(x, cast)()
        assert y.dtype == dtype and y.coords is x.coords and y.cache is x.cache
        assert torch.equal(y.feats, x.feats.to(dtype))


# .to("meta") is refused (tests/test_robust_inputs.py): a device change needs a second real device
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="a device change needs CUDA")


@needs_cuda
def test_to_another_device():
    x = make()
    m = x.to("cuda")  # a device change: coords and cache move along
    assert m.feats.device.type == "cuda" and m.coords.device.type == "cuda"
    assert m.cache is not x.cache and m.cache.get_coords((1, 1, 1)) is m.coords
    assert m.stride == x.stride and torch.equal(m.feats.cpu(), x.feats) and torch.equal(m.coords.cpu(), x.coords)


def test_a_cache_refuses_other_coords():
    """``cache=`` with coords other than those the cache holds at that
    stride (another cloud of the same length, the same sites in another
    order, another length) is refused: its maps and plans were built on its
    own coords, which a conv would silently reuse. The same coords (the held
    tensor, or an equal copy) are taken."""
    x = make(seed=1)
    conv = ps.nn.Conv3d(3, 2, 3)
    conv(x)  # the cache now holds x's k3 map
    n = len(x)
    others = [make(seed=2, n=n).coords, x.coords.flip(0), x.coords[: n - 1]]
    assert len(others[0]) == n and not torch.equal(others[0], x.coords)
    for coords in others:
        with pytest.raises(ValueError, match="cache holds other coords"):
            ps.SparseTensor(torch.zeros(len(coords), 3), coords, cache=x.cache)
    for coords in (x.coords, x.coords.clone()):
        y = ps.SparseTensor(torch.randn(n, 3), coords, cache=x.cache)
        torch.testing.assert_close(conv(y).feats, conv(x.with_feats(y.feats)).feats)


def test_a_cache_refuses_coarse_coords_other_than_its_coords_downsample_to():
    """``SparseTensor(feats, c2, 2, cache=x.cache)`` made before x's first
    strided conv, on coords other than those x's downsample to, became the
    cache's stride-2 coords: the strided conv then put its output on them
    (API.md: unique floor(c / 2) * 2), dropping the sums of every other
    site silently. Now refused; the sites x's coords downsample to (in any
    row order) are taken, and the conv on them matches the dense one."""
    from reference import dense_conv

    x = make(seed=3, n=60)
    down = ps.nn.Conv3d(3, 2, 2, stride=2)
    expected = down(ps.SparseTensor(x.feats, x.coords.clone())).coords  # a fresh cache: API.md's coords
    others = [torch.tensor([[0, 0, 0, 0], [0, 100, 100, 100]], dtype=torch.int32), expected[1:],
              torch.cat([expected, torch.tensor([[0, 20, 20, 20]], dtype=torch.int32)])]
    for coarse in others:
        with pytest.raises(ValueError, match=r"not the sites .* stride \(1, 1, 1\) downsample to at stride "
                                             r"\(2, 2, 2\)"):
            ps.SparseTensor(torch.zeros(len(coarse), 2), coarse, 2, cache=x.cache)
    shuffled = expected.flip(0)
    ps.SparseTensor(torch.zeros(len(shuffled), 2), shuffled, 2, cache=x.cache)
    with torch.no_grad():
        out = down(x)
        assert out.coords is x.cache.get_coords((2, 2, 2)) and torch.equal(out.coords, shuffled)
        torch.testing.assert_close(out.feats, dense_conv(x, down.weight, out.coords, 2, 2))


def test_a_cache_refuses_fine_coords_that_do_not_downsample_to_its_coarse_coords():
    """A cache holding only coarse coords (a tensor made at stride 2, as a
    MinkowskiEngine user shares a coordinate manager) given to a stride-1
    tensor whose coords downsample to other sites: its strided convs and
    poolings put their output on the cache's stride-2 coords instead of
    API.md's unique floor(c / 2) * 2 (x = 5 went to no output at all,
    x = 2 got an empty sum). Now refused naming both strides; fine coords
    that do downsample to the held ones (in any row order) are taken, and
    the conv on them matches the dense one."""
    from reference import dense_conv

    coarse = ps.SparseTensor(torch.ones(2, 1), torch.tensor([[0, 0, 0, 0], [0, 2, 0, 0]], dtype=torch.int32), 2)
    for fine in ([[0, 0, 0, 0], [0, 5, 0, 0]], [[0, 1, 0, 0]], [[0, 0, 0, 0], [0, 3, 1, 1], [0, 4, 0, 0]]):
        with pytest.raises(ValueError, match=r"downsample to .* stride \(2, 2, 2\) .* stride \(1, 1, 1\)"):
            ps.SparseTensor(torch.ones(len(fine), 1), torch.tensor(fine, dtype=torch.int32), cache=coarse.cache)
    fine = torch.tensor([[0, 3, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0], [0, 2, 0, 1]], dtype=torch.int32)
    x = ps.SparseTensor(torch.randn(4, 1), fine, cache=coarse.cache)
    down = ps.nn.Conv3d(1, 2, 2, stride=2)
    with torch.no_grad():
        out = down(x)
        assert out.coords is coarse.coords
        torch.testing.assert_close(out.feats, dense_conv(x, down.weight, out.coords, 2, 2))


@needs_cuda
def test_to_keeps_own_coords_when_the_cache_holds_others():
    x = make(seed=1)
    other = ps.SparseTensor(torch.zeros(2, 3), torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2]], dtype=torch.int32),
                            cache=x.cache, validate=False)  # refused where validated (above)
    assert x.cache.get_coords((1, 1, 1)) is x.coords  # the first coords of a stride stay cached
    m = other.to("cuda")
    assert torch.equal(m.coords.cpu(), other.coords)


def test_with_feats_shares_the_cache():
    x = make(seed=2)
    x.cache.kmaps["probe"] = "a kernel map"
    f = torch.randn(len(x), 7)
    y = x.with_feats(f)
    assert y.feats is f and y.coords is x.coords and y.stride == x.stride and y.cache is x.cache
    assert y.cache.kmaps["probe"] == "a kernel map"
    with pytest.raises(ValueError, match="feats"):
        x.with_feats(torch.randn(len(x) + 1, 7))
    with pytest.raises(TypeError, match="feats"):
        x.with_feats(torch.ones(len(x), 7, dtype=torch.long))
    with pytest.raises(ValueError, match="feats"):
        x.with_feats(torch.ones(len(x)))


@pytest.mark.parametrize("stride", [1, 2, (1, 2, 4)])
def test_dense_matches_reference(stride):
    x = make(n=40, c=3, stride=stride, seed=3)
    st = x.stride
    d = x.dense()
    idx = x.coords[:, 1:].numpy() // np.array(st)
    shape = (x.batch_size, 3, *(idx.max(0) + 1))
    assert d.shape == shape
    assert np.array_equal(d.numpy(), dense_ref(x.feats.numpy(), x.coords.numpy(), st, shape))
    d2 = x.dense((10, 11, 12))
    assert d2.shape == (x.batch_size, 3, 10, 11, 12)
    assert np.array_equal(d2.numpy(), dense_ref(x.feats.numpy(), x.coords.numpy(), st, d2.shape))
    d3 = x.dense((4, 3, 9, 9, 9))
    assert d3.shape == (4, 3, 9, 9, 9)
    assert torch.equal(d3[: x.batch_size, :, : d.shape[2], : d.shape[3], : d.shape[4]], d)
    assert int((d3 != 0).any(1).sum()) == len(x)  # inactive sites are 0


def test_dense_is_differentiable():
    x = make(n=10, c=2, seed=4, dtype=torch.float64)
    f = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: x.with_feats(t).dense((8, 8, 8)), (f,))


@pytest.mark.parametrize("shape", [None, (3, 3, 3), (2, 4, 3, 3, 3)])
def test_dense_of_no_sites_is_linked_to_the_feats(shape):
    """dense() of a tensor with no sites whose feats need a gradient was a
    fresh zero grid: backward of a loss on it raised "element 0 of tensors
    does not require grad"; now it is linked to the feats (a zero gradient),
    as the grid of a tensor with sites is."""
    feats = torch.zeros(0, 4, requires_grad=True)
    out = ps.SparseTensor(feats, torch.zeros(0, 4, dtype=torch.int32)).dense(shape)
    assert out.requires_grad and not out.any()
    out.sum().backward()
    assert feats.grad is not None and feats.grad.shape == (0, 4)


def test_dense_errors():
    x = make(n=10, seed=5)
    with pytest.raises(ValueError, match="shape"):
        x.dense((2, 2, 2))  # active sites outside
    with pytest.raises(ValueError, match="channels"):
        x.dense((2, 99, 8, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        x.dense((1, 3, 8, 8, 8)) if x.batch_size > 1 else x.dense((0, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        x.dense((8, 8))
    with pytest.raises(ValueError, match="shape"):
        ps.SparseTensor(torch.zeros(0, 2), torch.zeros(0, 4, dtype=torch.int32)).dense((-1, 2, 2))
    with pytest.raises(TypeError, match="shape"):
        x.dense((8.5, 8, 8))
    neg = ps.SparseTensor(torch.ones(1, 1), torch.tensor([[0, -1, 0, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-negative"):
        neg.dense()


def test_empty_and_single():
    e = ps.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32))
    assert len(e) == 0 and e.batch_size == 0 and e.stride == (1, 1, 1)
    assert e.dense().shape == (0, 3, 0, 0, 0)
    assert e.dense((2, 3, 4)).shape == (0, 3, 2, 3, 4)
    assert torch.equal(e.dense((2, 3, 4, 5, 6)), torch.zeros(2, 3, 4, 5, 6))
    assert len(e.with_feats(torch.zeros(0, 5))) == 0
    s = ps.SparseTensor(torch.tensor([[2.0, 3.0]]), torch.tensor([[1, 2, 0, 1]], dtype=torch.int32))
    d = s.dense()
    assert d.shape == (2, 2, 3, 1, 2) and d[1, :, 2, 0, 1].tolist() == [2.0, 3.0] and d.abs().sum() == 5


def test_dense_shape_of_bools_is_a_type_error():
    s = ps.SparseTensor(torch.tensor([[2.0]]), torch.tensor([[0, 0, 0, 0]], dtype=torch.int32))
    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        s.dense((True, True, True))
    assert s.dense(torch.tensor([1, 2, 1])).shape == (1, 1, 1, 2, 1)  # 0-d integer tensors still count


def test_collate():
    a, b = make(n=20, batches=2, seed=6), make(n=15, batches=1, seed=7)
    e = ps.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32))
    out = ps.collate([a, e, b, e])
    assert len(out) == 35 and out.stride == (1, 1, 1)
    assert torch.equal(out.feats, torch.cat([a.feats, b.feats]))
    assert torch.equal(out.coords[:20], a.coords)
    shifted = b.coords.clone()
    shifted[:, 0] += a.batch_size + 1  # past a's batches and the empty item's one
    assert torch.equal(out.coords[20:], shifted)
    assert out.batch_size == a.batch_size + 2  # (the trailing empty item holds no row to count)
    single = ps.collate([a])
    assert torch.equal(single.coords, a.coords) and torch.equal(single.feats, a.feats)
    only_empty = ps.collate([e])
    assert len(only_empty) == 0 and only_empty.feats.shape == (0, 3)
    s2 = ps.collate([make(n=5, stride=2, seed=8), make(n=6, stride=2, seed=9)])
    assert s2.stride == (2, 2, 2) and len(s2) == 11
    # collated coords are valid: revalidate them from scratch
    ps.SparseTensor(out.feats, out.coords)


@pytest.mark.parametrize("given", [5, None, 2.0])
def test_collate_of_no_list_names_what_it_takes(given):
    """``collate(5)`` or ``collate(None)`` was Python's bare "'int' object is
    not iterable"; now a TypeError saying collate takes a list of
    SparseTensors and what it got."""
    with pytest.raises(TypeError, match=rf"collate takes a list of SparseTensors; got {type(given).__name__}"):
        ps.collate(given)


def test_collate_gives_item_i_batch_index_i_after_empty_items():
    """As MinkowskiEngine's and TorchSparse's sparse_collate: the i-th of
    single-scan tensors has batch index i, an empty one before it or not
    (collate gave an empty item no index, so the items after it moved down)."""
    e = ps.SparseTensor(torch.zeros(0, 2), torch.zeros(0, 4, dtype=torch.int32))
    one = ps.SparseTensor(torch.ones(2, 2), torch.tensor([[0, 1, 2, 3], [0, 4, 5, 6]], dtype=torch.int32))
    assert ps.collate([e, one, e, one]).coords[:, 0].tolist() == [1, 1, 3, 3]
    assert ps.collate([one, e, one]).coords[:, 0].tolist() == [0, 0, 2, 2]
    assert ps.collate([e, e, one]).batch_size == 3
    assert ps.collate([one, e]).coords[:, 0].tolist() == [0, 0]
    assert len(ps.collate([e, e])) == 0
    # the range check counts the empty item's batch too
    last = ps.SparseTensor(torch.zeros(1, 2), torch.tensor([[2**31 - 1, 0, 0, 0]], dtype=torch.int32))
    with pytest.warns(UserWarning, match="item 0 holds no row of batch 0"):
        assert ps.collate([last]).coords[:, 0].tolist() == [2**31 - 1]
    for items in ([e, last], [last, e]):
        with pytest.raises(ValueError, match=r"2147483649 batches in all"):
            ps.collate(items)



def test_a_pytree_map_over_a_sparse_tensor_leaves_other_kinds_of_leaves():
    """torch's tree_map over a SparseTensor rebuilds one from whatever the
    function gives: the row check added with validate=False read .shape of
    leaves that are no tensors (AttributeError); it checks tensors only."""
    import torch.utils._pytree as pytree

    x = make(n=10, seed=1)
    shapes = pytree.tree_map(lambda t: t.shape, x)
    assert isinstance(shapes, ps.SparseTensor) and shapes.feats == x.feats.shape
    assert pytree.tree_map(lambda t: t, x).coords is x.coords


def test_collate_of_scans_numbered_before_says_where_their_rows_land():
    """A port of MinkowskiEngine's batched_coordinates numbered scan i with
    batch index i and then collated: scan 1 landed at batch 2, and a global
    pool gave 3 rows for 2 scans without a word. collate warns, naming the
    item and where its rows land; scans made with batch 0 give no warning."""
    scans = [ps.SparseTensor(torch.ones(2, 2), torch.tensor([[i, 1, 2, 3], [i, 4, 5, 6]], dtype=torch.int32))
             for i in range(2)]
    with pytest.warns(UserWarning, match=r"collate: item 1 holds no row of batch 0 \(its smallest batch index is "
                                         r"1\); .* its rows land at batch 2 and batch 1 is empty"):
        assert ps.collate(scans).batch_size == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ps.collate([scans[0], scans[0]]).batch_size == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_collate_under_autocast_keeps_the_feats_dtype(dtype, low):
    """Batching clouds inside an autocast region (an inference loop under
    ``torch.autocast("cpu", torch.float16)`` feeding a bf16 model, or the
    reverse) stopped in torch's cat with a bare "RuntimeError: Unexpected
    floating ScalarType in at::autocast::prioritize": autocast's cat refuses
    a 16-bit dtype that is not its own. collate's feats are of one dtype: they
    are concatenated as outside autocast, in that dtype, whatever the
    autocast."""
    a, b = make(n=20, batches=2, seed=6), make(n=15, batches=1, seed=7)
    a, b = a.with_feats(a.feats.to(dtype)), b.with_feats(b.feats.to(dtype))
    want = ps.collate([a, b])
    with torch.autocast("cpu", low):
        got = ps.collate([a, b])
    assert got.feats.dtype == dtype and torch.equal(got.feats, want.feats) and torch.equal(got.coords, want.coords)


def test_collate_errors():
    a = make(n=5, seed=10)
    with pytest.raises(ValueError, match="at least one"):
        ps.collate([])
    with pytest.raises(TypeError, match="item 1"):
        ps.collate([a, a.feats])
    # one tensor, not a list of them: Python's "'SparseTensor' object is not iterable" before
    with pytest.raises(TypeError, match=r"collate takes a list of SparseTensors; got one SparseTensor"):
        ps.collate(a)
    with pytest.raises(TypeError, match=r"cat takes a list of SparseTensors; got one SparseTensor"):
        ps.nn.functional.cat(a)
    with pytest.raises(ValueError, match="stride"):
        ps.collate([a, make(n=5, stride=2, seed=11)])
    with pytest.raises(ValueError, match="channels"):
        ps.collate([a, make(n=5, c=4, seed=12)])
    # mixed feats dtypes: no silent promotion by torch.cat
    with pytest.raises(ValueError, match=r"item 1 has feats of dtype torch.float64, item 0 torch.float32"):
        ps.collate([a, make(n=5, seed=13).to(torch.float64)])
    big = ps.SparseTensor(torch.zeros(1, 3), torch.tensor([[2**31 - 1, 0, 0, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"2147483650 batches in all; batch indices must stay within \[0, 2147483647\]"):
        ps.collate([a, big])
    far = ps.SparseTensor(torch.zeros(1, 3), torch.tensor([[0, -2**31, -2**31, 0]], dtype=torch.int32))
    other = ps.SparseTensor(torch.zeros(1, 3), torch.tensor([[0, 2**31 - 1, 2**31 - 1, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match="coordinates span"):
        ps.collate([far, other])


def test_coordinate_cache():
    cache = CoordinateCache()
    calls = []
    assert cache.get_kmap("k", lambda: calls.append(1) or "map") == "map"
    assert cache.get_kmap("k", lambda: calls.append(1) or "other") == "map"
    assert calls == [1]
    c = torch.zeros(1, 4, dtype=torch.int32)
    cache.set_coords((1, 1, 1), c)
    cache.set_coords((1, 1, 1), c.clone())
    assert cache.get_coords((1, 1, 1)) is c
    assert "strides" in repr(cache)


def _shared_cache_example():
    """A stride-1 tensor whose cache holds a downsampling map onto stride 2,
    and the stride-2 tensor on that map's outputs (the same cache)."""
    from pointsparse import kmap

    g = torch.Generator().manual_seed(0)
    x = ps.voxelize(torch.rand(300, 3, generator=g) * 10, voxel_size=1.0)[0]
    down = kmap.get_kmap(x, 2, 2)
    return x, ps.SparseTensor(torch.ones(down.num_out, 1), down.out_coords, 2, cache=x.cache)


def test_a_walk_over_the_maps_onto_a_stride_survives_a_map_added_meanwhile():
    """maps_onto yields as it walks the cache's maps: a conv on the same
    cache that adds a map between two steps (another thread's network on
    a tensor of the shared cache) ended the walk in "dictionary changed
    size during iteration"."""
    from pointsparse import kmap

    x, y = _shared_cache_example()
    kmap.get_kmap(x, 3, 2)  # (a second map onto stride 2: the walk has two steps)
    walk = y.cache.maps_onto(y.stride, y.coords)
    first = next(walk)
    kmap.get_kmap(x, 3, 1)  # meanwhile
    assert [first[0], *(key for key, _, _ in walk)] == [kmap.KernelMapKey((1, 1, 1), (2, 2, 2), (2, 2, 2),
                                                                          (1, 1, 1)),
                                                        kmap.KernelMapKey((1, 1, 1), (3, 3, 3), (2, 2, 2),
                                                                          (1, 1, 1))]


def _race_an_adder(x, work, calls: int) -> list:
    """Run ``work()`` over and over in one thread while another adds
    ``calls`` maps to ``x``'s cache (a new stride on every other), the
    threads switching between almost every two bytecodes; the errors
    ``work`` raised (none or the first)."""
    import sys
    import threading

    from pointsparse import kmap

    errors, done = [], threading.Event()

    def add():  # a new map on every call, and a new stride on every other
        for d in range(1, calls):
            kmap.get_kmap(x, 1, 1, dilation=d)
            if d % 2:
                kmap.get_kmap(x, 1, (1, 1, d + 2))
        done.set()

    def repeat():
        try:
            while not done.is_set():
                work()
        except Exception as error:  # noqa: BLE001 - reported to the caller
            errors.append(error)
            done.set()

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (the threads take turns between almost every two bytecodes)
    try:
        threads = [threading.Thread(target=add), threading.Thread(target=repeat)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(before)
    return errors


def test_a_cache_shared_by_threads_is_read_while_another_adds_maps_and_strides():
    """Two networks on one input's cache, one per thread: a VoxelPrune's
    selection (copy_finer, maps_onto, input_coords) walked the cache's
    dicts while the other thread's convs added maps and strides to them,
    and failed now and then with "dictionary changed size during
    iteration". Each walk reads a snapshot now."""
    from pointsparse.nn import functional as F

    x, y = _shared_cache_example()
    rows = torch.arange(0, len(y), 2)
    expected = F.select_voxels(y, rows)

    def read():
        got = F.select_voxels(y, rows)
        assert torch.equal(got.coords, expected.coords) and torch.equal(got.feats, expected.feats)
        y.cache.input_coords()
        list(y.cache.maps_onto(y.stride, y.coords))

    assert _race_an_adder(x, read, 600) == []


def test_a_cache_shared_by_threads_is_copied_while_another_adds_maps_and_strides():
    """A copy of a tensor (deepcopy, pickle) or of its cache moved (``to``)
    while another thread's network adds maps and strides to that cache:
    the copy walked the cache's dicts as they grew and failed now and then
    with "dictionary changed size during iteration"."""
    import pickle

    x, y = _shared_cache_example()

    def copy_():
        for got in (copy.deepcopy(y), pickle.loads(pickle.dumps(y))):
            assert torch.equal(got.coords, y.coords) and got.cache.coords.keys() >= {(1, 1, 1), (2, 2, 2)}
        y.cache.to("cpu")

    assert _race_an_adder(x, copy_, 300) == []

# --- bad input, each case in its own process ---------------------------------------

SETUP = "import numpy as np, torch, pointsparse as ps\nf = torch.zeros(3, 2)\ni32 = torch.int32\n"
BAD = {
    "duplicate": ("ps.SparseTensor(f, torch.tensor([[0, 1, 2, 3], [0, 5, 5, 5], [0, 1, 2, 3]], dtype=i32))",
                  "ValueError", "duplicate"),
    "coords_int64": ("ps.SparseTensor(f, torch.zeros(3, 4, dtype=torch.int64))", "TypeError", "coords"),
    "coords_float": ("ps.SparseTensor(f, torch.zeros(3, 4))", "TypeError", "coords"),
    "coords_nan": ("ps.SparseTensor(f, torch.tensor([[0, 1, 2, 3], [0, float('nan'), 5, 5], [0, 1, 2, 4.0]]))",
                   "ValueError", "coords"),
    "coords_inf": ("ps.SparseTensor(f, torch.full((3, 4), float('inf')))", "ValueError", "coords"),
    "coords_numpy": ("ps.SparseTensor(f, np.zeros((3, 4), np.int32))", "TypeError", "coords"),
    "coords_3_columns": ("ps.SparseTensor(f, torch.zeros(3, 3, dtype=i32))", "ValueError", "coords"),
    "coords_1d": ("ps.SparseTensor(f, torch.zeros(4, dtype=i32))", "ValueError", "coords"),
    "coords_3d": ("ps.SparseTensor(f, torch.zeros(3, 4, 1, dtype=i32))", "ValueError", "coords"),
    "negative_batch": ("ps.SparseTensor(f, torch.tensor([[0, 1, 2, 3], [-1, 5, 5, 5], [0, 1, 2, 4]], dtype=i32))",
                       "ValueError", "batch"),
    "span_too_wide": ("ps.SparseTensor(f[:2], torch.tensor([[0, -2**31, 0, -2**31], [0, 2**31 - 1, 0, 2**31 - 1]], "
                      "dtype=i32))", "ValueError", "coordinates span"),
    "span_batch_too_wide": ("ps.SparseTensor(f[:2], torch.tensor([[0, -2**31, 0, 0], [2**31 - 1, 2**31 - 1, 1, 0]], "
                            "dtype=i32))", "ValueError", "bits in all"),
    "feats_rows": ("ps.SparseTensor(torch.zeros(4, 2), torch.zeros(3, 4, dtype=i32))", "ValueError", "feats"),
    "feats_int": ("ps.SparseTensor(torch.zeros(3, 2, dtype=i32), torch.zeros(3, 4, dtype=i32))", "TypeError",
                  "feats"),
    "feats_1d": ("ps.SparseTensor(torch.zeros(3), torch.zeros(3, 4, dtype=i32))", "ValueError", "feats"),
    "feats_numpy": ("ps.SparseTensor(np.zeros((3, 2)), torch.zeros(3, 4, dtype=i32))", "TypeError", "feats"),
    "stride_zero": ("ps.SparseTensor(f[:1], torch.zeros(1, 4, dtype=i32), 0)", "ValueError", "stride"),
    "stride_float": ("ps.SparseTensor(f[:1], torch.zeros(1, 4, dtype=i32), 1.5)", "TypeError", "stride"),
    "stride_two": ("ps.SparseTensor(f[:1], torch.zeros(1, 4, dtype=i32), (1, 2))", "TypeError", "stride"),
    "stride_not_multiple": ("ps.SparseTensor(f[:1], torch.tensor([[0, 2, 3, 4]], dtype=i32), 2)", "ValueError",
                            "stride"),
    "collate_mixed": ("ps.collate([ps.SparseTensor(f[:1], torch.zeros(1, 4, dtype=i32)), 3])", "TypeError",
                      "item 1"),
    "dense_negative": ("ps.SparseTensor(f[:1], torch.tensor([[0, -2, 0, 0]], dtype=i32)).dense()", "ValueError",
                       "non-negative"),
    "dense_shape": ("ps.SparseTensor(f[:1], torch.zeros(1, 4, dtype=i32)).dense((1, 1, -3))", "ValueError", "shape"),
}


@pytest.fixture(scope="module")
def bad_results():
    return run_in_children({k: v[0] for k, v in BAD.items()}, setup=SETUP)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input(bad_results, name):
    _, exc, word = BAD[name]
    r = bad_results[name]
    assert r["status"] == 0, f"{name} crashed the process (status {r['status']})"
    assert r["exc"] == exc, f"{name}: expected {exc}, got {r['exc']}: {r['msg']}"
    assert word in r["msg"], f"{name}: the message must name {word!r}: {r['msg']}"


def test_dense_of_a_huge_extent_is_refused_before_allocating():
    coords = torch.tensor([[0, 0, 0, 0], [0, 60000, 60000, 60000]], dtype=torch.int32)
    x = ps.SparseTensor(torch.ones(2, 4), coords)
    with pytest.raises(ValueError, match="GiB"):
        x.dense()


@pytest.mark.parametrize("n", [0, 2])
@pytest.mark.parametrize("shape", [(2**63, 1, 1), (1, 2**64, 1), (2, 4, 2**63, 1, 1)])
def test_dense_of_a_shape_past_int64_names_the_shape(n, shape):
    """A size past int64 was torch's "Overflow when unpacking long long"
    (a ValueError naming nothing) from the active-site check, or, without
    rows, a TypeError with a C++ backtrace from new_zeros."""
    x = ps.SparseTensor(torch.ones(n, 4), torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.int32)[:n])
    with pytest.raises(ValueError, match=r"shape must be non-negative ints below 2\*\*63"):
        x.dense(shape)


def test_unreachable_devices_and_meta_tensors_are_clear_errors():
    x = ps.SparseTensor(torch.ones(2, 3), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            x.to("cuda")
    with pytest.raises(TypeError, match="floating"):
        x.to(torch.int64)
    with pytest.raises(ValueError, match="meta"):
        ps.SparseTensor(torch.ones(2, 3, device="meta"), x.coords)
    with pytest.raises(ValueError, match="meta"):
        ps.SparseTensor(torch.ones(2, 3), x.coords.to("meta"))

def test_to_of_an_argument_of_the_wrong_type_is_a_type_error():
    """``.to(other_sparse_tensor)``, ``.to(object())``, ``.to(dtype="float")``
    were ValueErrors ("not possible here") where torch's own ``Tensor.to``
    raises TypeError: the argument's type is wrong, not the target
    unreachable. A SparseTensor argument is named, with the way to take its
    device and dtype. A plain tensor gives its dtype and device, as torch."""
    x = ps.SparseTensor(torch.ones(2, 3), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"SparseTensor.to.*got a SparseTensor.*\.to\(other\.feats\)"):
        x.to(x.double())
    for args, kwargs in (((object(),), {}), ((), {"dtype": "float"}), ((), {"bogus": 1})):
        with pytest.raises(TypeError, match="SparseTensor.to takes a device, a dtype"):
            x.to(*args, **kwargs)
    assert x.to(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


def test_duplicates_found_in_key_order_and_out_of_it():
    """Coords in key order take the one-pass check, others the sort: a
    duplicate is reported either way, wherever it sits."""
    rng = np.random.default_rng(5)
    c = torch.from_numpy(np.unique(rng.integers(0, 50, (3000, 4)), axis=0).astype(np.int32))  # key order
    ps.SparseTensor(torch.ones(len(c), 1), c)
    ps.SparseTensor(torch.ones(len(c), 1), c.flip(0))
    for i in (0, 1, len(c) // 2, len(c) - 2):
        twice = torch.cat([c[: i + 1], c[i:]])  # row i twice, still sorted
        for coords in (twice, twice.flip(0)):
            with pytest.raises(ValueError, match="1 duplicate rows"):
                ps.SparseTensor(torch.ones(len(coords), 1), coords)


# --- coordinates anywhere in int32 (adaptive keys) ---------------------------

def test_far_coords_construct_collate_and_dense():
    int32_min, int32_max = -(2**31), 2**31 - 1
    for coords in ([[0, 100000, 0, 0], [1, 100003, 2, 1]],
                   [[0, int32_min, int32_min, 5], [0, int32_min + 1, int32_min, 5]],
                   [[3, int32_max, int32_max, int32_max], [2**31 - 1, int32_max - 1, 0, int32_max]]):
        c = torch.tensor(coords, dtype=torch.int32)
        x = ps.SparseTensor(torch.ones(2, 1), c)
        assert torch.equal(x.coords, c)
        with pytest.raises(ValueError, match="duplicate"):
            ps.SparseTensor(torch.ones(3, 1), torch.cat([c, c[:1]]))
    a = ps.SparseTensor(torch.ones(2, 1), torch.tensor([[0, 100000, 0, 0], [1, 100003, 2, 1]], dtype=torch.int32))
    b = ps.SparseTensor(torch.full((1, 1), 2.0), torch.tensor([[0, int32_max, 7, 7]], dtype=torch.int32))
    both = ps.collate([a, b])
    assert both.coords.tolist() == [[0, 100000, 0, 0], [1, 100003, 2, 1], [2, int32_max, 7, 7]]
    dense = a.dense()  # x = 100000: a dense grid just large enough
    assert dense.shape == (2, 1, 100004, 3, 2)
    assert dense[0, 0, 100000, 0, 0] == 1 and dense[1, 0, 100003, 2, 1] == 1 and dense.sum() == 2


def test_deepcopy_refuses_feats_inside_an_autograd_graph():
    """copy.deepcopy of a SparseTensor whose feats a graph computed failed
    with torch's message about graph leaves, which named neither the
    SparseTensor nor a way out. As torch, such a copy is refused (copying
    the values would drop the graph): a TypeError naming SparseTensor and
    .detach(). Leaf feats copy as before, the copy's cache holding its coords."""
    x = make()
    weight = torch.randn(3, 3, requires_grad=True)
    y = x.with_feats(x.feats @ weight)
    with pytest.raises(TypeError, match=r"copy.deepcopy\(SparseTensor\): its feats are not a graph leaf.*\.detach\(\)"):
        copy.deepcopy(y)
    for z, source in ((copy.deepcopy(y.detach()), y), (copy.deepcopy([x, x])[1], x)):
        assert torch.equal(z.feats, source.feats) and z.feats is not source.feats and z.coords is not source.coords
        assert z.cache.get_coords(z.stride) is z.coords and z.stride == source.stride
    leaf = copy.deepcopy(x.with_feats(x.feats.clone().requires_grad_()))
    assert leaf.feats.requires_grad and leaf.feats.is_leaf


def _stepped_coords(n=40):
    g = torch.Generator().manual_seed(3)
    xyz = torch.unique(torch.randint(0, 6, (n, 3), generator=g), dim=0)
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int()


@pytest.mark.parametrize("layer", ["conv", "strided", "pool", "transposed"])
def test_coords_changed_in_place_after_the_cache_took_them_are_refused(layer):
    """A tensor's cache keeps the maps built on its coords: coords changed in
    place afterwards (an augmentation on x.coords) met those stale maps and
    gave the old result silently; now a ValueError says to make a new tensor."""
    coords = _stepped_coords()
    x = ps.SparseTensor(torch.randn(len(coords), 2), coords)
    conv = ps.nn.Conv3d(2, 3, 3)
    down = ps.nn.Conv3d(2, 2, 2, stride=2)
    up = ps.nn.Conv3d(2, 2, 2, stride=2, transposed=True)

    def run(t):
        if layer == "conv":
            return conv(t)
        if layer == "strided":
            return down(t)
        if layer == "pool":
            return ps.nn.functional.max_pool3d(t, 3, 1)
        return up(down(t))

    with torch.no_grad():
        run(x)
        coords[::2, 1] += 7  # in place: the cache's coords are this tensor
        with pytest.raises(ValueError, match="changed in place"):
            run(x)
        fresh = ps.SparseTensor(x.feats, coords.clone())  # a new tensor on the changed coords runs
        run(fresh)


@pytest.mark.parametrize("again", ["same", "other kernel", "pool"])
def test_output_coords_changed_in_place_are_refused_by_the_next_strided_conv(again):
    """A strided conv's output coords are its input cache's coords at the
    coarser stride: changed in place (an augmentation on y.coords), the next
    strided conv from the same input onto that stride (the same layer in a
    second model run on the input, or another kernel) put its output on the
    changed coords without a word (the cached map's, or a map built onto
    them); now the ValueError that every other lookup of them raises."""
    coords = _stepped_coords()
    x = ps.SparseTensor(torch.randn(len(coords), 2), coords)
    down = ps.nn.Conv3d(2, 2, 2, stride=2)
    with torch.no_grad():
        y = down(x)
        before = y.coords.clone()
        y.coords[0, 1] += 1000  # in place: the cache's coords at stride 2
        with pytest.raises(ValueError, match="changed in place"):
            if again == "same":
                down(x)
            elif again == "other kernel":
                ps.nn.Conv3d(2, 2, 3, stride=2)(x)
            else:
                ps.nn.functional.max_pool3d(x, 2)
        fresh = down(ps.SparseTensor(x.feats, coords.clone()))  # a new tensor gets the downsampled coords
        assert torch.equal(fresh.coords, before)


@pytest.mark.parametrize("first", ["x", "y"])
def test_equal_coords_given_with_a_cache_and_changed_in_place_are_refused(first):
    """``SparseTensor(feats, c, cache=x.cache)`` on ``c = x.coords.clone()``
    is taken (equal coords); ``c`` changed in place afterwards met the maps
    built on the old values: the conv ran silently on the old sites (its
    output on x's coords, or, where y built the map, x's output on ``c``'s
    new values). Now y's conv refuses, and x's runs on x's coords."""
    from reference import dense_conv

    coords = _stepped_coords()
    x = ps.SparseTensor(torch.randn(len(coords), 2), coords)
    conv = ps.nn.Conv3d(2, 3, 3)
    c = coords.clone()
    y = ps.SparseTensor(torch.randn(len(coords), 2), c, cache=x.cache)
    with torch.no_grad():
        for t in ((x, y) if first == "x" else (y, x)):
            out = conv(t)
            assert torch.equal(out.coords, coords)
            torch.testing.assert_close(out.feats, dense_conv(t, conv.weight, coords))
        c[:, 1] = 5 - c[:, 1]  # in place: still unique, other sites
        with pytest.raises(ValueError, match="changed in place"):
            conv(y)
        out = conv(x)
        assert torch.equal(out.coords, coords)
        torch.testing.assert_close(out.feats, dense_conv(x, conv.weight, coords))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_tensor_made_on_equal_coords_refuses_them_changed_in_place(how):
    """A deep copy or a pickle of ``SparseTensor(feats, c, cache=x.cache)``
    (``c`` equal to x's coords, another tensor) holds a copy of ``c`` beside
    the copied cache's own coords: the copy's coords changed in place met
    the copied maps and the conv ran on the old sites silently. The copy
    refuses them, as the original does."""
    import pickle

    coords = _stepped_coords()
    x = ps.SparseTensor(torch.randn(len(coords), 2), coords)
    y = ps.SparseTensor(torch.randn(len(coords), 2), coords.clone(), cache=x.cache)
    conv = ps.nn.Conv3d(2, 3, 3)
    with torch.no_grad():
        before = conv(y).feats
        z = copy.deepcopy(y) if how == "deepcopy" else pickle.loads(pickle.dumps(y))
        torch.testing.assert_close(conv(z).feats, before)
        z.coords[:, 1] = 5 - z.coords[:, 1]
        with pytest.raises(ValueError, match="changed in place"):
            conv(z)
        w = copy.deepcopy(x) if how == "deepcopy" else pickle.loads(pickle.dumps(x))  # its own coords: as before
        assert w.coords is w.cache.get_coords(w.stride) and not w.cache.aliases
        torch.testing.assert_close(conv(w).feats, conv(x).feats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a move to another device needs CUDA")
def test_a_moved_tensor_made_on_equal_coords_refuses_them_changed_in_place():
    """``.to(device)`` copies a tensor as deepcopy does: the moved copy of
    ``SparseTensor(feats, c, cache=x.cache)`` (``c`` equal to x's coords)
    refuses its coords changed in place, as the original does."""
    coords = _stepped_coords()
    x = ps.SparseTensor(torch.randn(len(coords), 2), coords)
    y = ps.SparseTensor(torch.randn(len(coords), 2), coords.clone(), cache=x.cache)
    conv = ps.nn.Conv3d(2, 3, 3).cuda()
    with torch.no_grad():
        z = y.to("cuda")
        torch.testing.assert_close(conv(z).feats.cpu(), conv.cpu()(y).feats)
        conv.cuda()
        z.coords[:, 1] = 5 - z.coords[:, 1]
        with pytest.raises(ValueError, match="changed in place"):
            conv(z)


def test_coords_in_place_check_leaves_inference_tensors_and_clones_alone():
    coords = _stepped_coords()
    with torch.inference_mode():
        x = ps.SparseTensor(torch.randn(len(coords), 2), coords.clone())
        conv = ps.nn.Conv3d(2, 3, 3)
        a = conv(x)
        b = conv(x)  # inference tensors keep no version: nothing to compare, the maps reused
    torch.testing.assert_close(a.feats, b.feats)
    y = ps.SparseTensor(torch.randn(len(coords), 2), coords)
    c = coords.clone()
    c[:, 1] += 1  # a clone changed: y's coords are not
    with torch.no_grad():
        conv(y)
        conv(y)


@pytest.mark.parametrize("dtype", [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
                                   if d is not None])
def test_float8_feats_are_refused_where_the_tensor_is_made(dtype):
    """float8 feats passed the floating-point check and failed later inside a
    conv, a pooling or a global pooling with torch's NotImplementedError."""
    coords = _stepped_coords()
    with pytest.raises(TypeError, match="feats must be a floating-point tensor .*float16.*float8"):
        ps.SparseTensor(torch.randn(len(coords), 3).to(dtype), coords)
    x = ps.SparseTensor(torch.randn(len(coords), 3), coords)
    with pytest.raises(TypeError, match="feats must be a floating-point tensor .*float16.*float8"):
        x.with_feats(torch.randn(len(coords), 3).to(dtype))
    with pytest.raises(TypeError, match="feats must stay floating point .float16"):
        x.to(dtype)


def test_plus_of_two_sparse_tensors_is_nn_add():
    """TorchSparse's and MinkowskiEngine's residual blocks write x + y of two
    tensors on the same coords: here that was a TypeError, unsupported operand."""
    coords = _stepped_coords()
    x = ps.SparseTensor(torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True), coords)
    y = x.with_feats(torch.randn(len(coords), 3, dtype=torch.float64))
    z = x + y
    assert z.cache is x.cache and torch.equal(z.coords, x.coords)
    assert torch.equal(z.feats, ps.nn.functional.add(x, y).feats)
    z.feats.sum().backward()
    assert torch.equal(x.feats.grad, torch.ones_like(x.feats))
    other = ps.SparseTensor(torch.randn(len(coords) - 1, 3, dtype=torch.float64), coords[:-1])
    with pytest.raises(ValueError, match="add"):
        x + other
    with pytest.raises(TypeError):
        x + 1.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "cache.to", "selection"])
def test_coords_changed_in_place_stay_refused_in_a_copy_of_the_cache(how):
    """A copy of a cache whose coords were changed in place (a deep copy, a
    pickle, a device move, a selection's cache of the finer strides) took
    the changed coords' version afresh while it carried the maps built on
    the old values, so the copy reused them silently where the original
    refused them. The copy refuses them too."""
    import pickle

    coords = _stepped_coords()
    x = ps.SparseTensor(torch.randn(len(coords), 2), coords)
    conv = ps.nn.Conv3d(2, 3, 3)
    down = ps.nn.Conv3d(2, 2, 2, stride=2)
    up = ps.nn.Conv3d(2, 2, 2, stride=2, transposed=True)
    with torch.no_grad():
        conv(x)
        coarse = down(x)
        up(coarse)
        coords[::2, 1] += 7
        if how == "selection":  # (the selection keeps the stride-1 coords and maps, for the way back up)
            kept = ps.nn.functional.select_voxels(coarse, torch.arange(len(coarse.coords)))
            with pytest.raises(ValueError, match="changed in place"):
                up(kept)
            return
        if how == "deepcopy":
            y = copy.deepcopy(x)
        elif how == "pickle":
            y = pickle.loads(pickle.dumps(x))
        else:
            cache = x.cache.to("cpu")
            y = ps.SparseTensor(x.feats, cache.get_coords(x.stride), x.stride, cache=cache, validate=False)
        with pytest.raises(ValueError, match="changed in place"):
            conv(y)
    fresh = ps.SparseTensor(x.feats, coords.clone())
    conv(fresh)


def test_coords_that_are_columns_of_a_larger_tensor_are_not_refused_for_its_other_columns():
    """Coords taken as a view of a larger tensor (``data[:, :4]`` of
    [batch, x, y, z, label] rows) share its version counter: a change of
    the label column in place was refused as 'coords changed in place'
    though the coords were not; their own change still is, and so in a
    copy of the cache."""
    coords = _stepped_coords()
    data = torch.cat([coords, torch.zeros(len(coords), 1, dtype=torch.int32)], 1)
    x = ps.SparseTensor(torch.randn(len(coords), 2), data[:, :4])
    conv = ps.nn.Conv3d(2, 3, 3)
    with torch.no_grad():
        before = conv(x).feats
        data[:, 4] = 7  # the labels, not the coords
        torch.testing.assert_close(conv(x).feats, before)
        torch.testing.assert_close(conv(copy.deepcopy(x)).feats, before)
        data[::2, 1] += 7  # the coords
        with pytest.raises(ValueError, match="changed in place"):
            conv(x)
        with pytest.raises(ValueError, match="changed in place"):
            conv(copy.deepcopy(x))


def test_sparse_layout_feats_and_coords_are_refused_naming_them():
    """A torch sparse (COO / CSR) tensor passed the type checks: sparse coords
    were NotImplementedError "aten::lt.Scalar ... SparseCPU", and sparse feats
    made a SparseTensor whose first conv, pooling, batch norm or dense() was
    a bare torch error ("unsupported memory format option Contiguous")."""
    coords = _stepped_coords()
    feats = torch.randn(len(coords), 3)
    for sparse in (lambda t: t.to_sparse(), lambda t: t.to_sparse_csr()):
        with pytest.raises(TypeError, match=r"coords must be a dense \(strided\) tensor; got .*sparse"):
            ps.SparseTensor(feats, sparse(coords))
        with pytest.raises(TypeError, match=r"feats must be a dense \(strided\) tensor; got .*sparse"):
            ps.SparseTensor(sparse(feats), coords)
        x = ps.SparseTensor(feats, coords)
        with pytest.raises(TypeError, match=r"feats must be a dense \(strided\) tensor; got .*sparse"):
            x.with_feats(sparse(feats))


def test_dense_peaks_at_its_output_and_refuses_more_than_the_memory_available(monkeypatch):
    """dense() filled a (B, X, Y, Z, C) grid and permuted it into a second,
    contiguous copy: a peak of twice its output (a 2 GB result peaked at
    +3.8 GB). It writes the (B, C, X, Y, Z) grid in place: in a child, the
    resident peak of a 256 MiB dense() grows by about its output, not twice.
    A grid larger than the memory the system has available (Linux's
    MemAvailable) is a ValueError before allocating (the zeroed buffer was
    granted, then the process killed as it wrote the zeros)."""
    code = (
        "import torch, pointsparse as ps\n"
        "def peak():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024\n"
        "x = ps.SparseTensor(torch.ones(2, 4), torch.tensor([[0, 0, 0, 0], [0, 255, 255, 255]], dtype=torch.int32))\n"
        "ps.SparseTensor(torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.int32)).dense()  # (warm)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = peak()\n"
        "d = x.dense()\n"
        "print(peak() - before, d.numel() * 4, float(d.sum()), tuple(d.shape))\n")
    run = run_python(code)
    if run.returncode != 0 and "clear_refs" in run.stderr:
        pytest.skip("this kernel does not reset the resident peak")
    assert run.returncode == 0, run.stderr[-2000:]
    grown, output, total, shape = run.stdout.split(maxsplit=3)
    assert shape.strip() == "(1, 4, 256, 256, 256)" and float(total) == 8.0
    assert int(output) == 2**28 and int(grown) < 1.3 * int(output), (grown, output)
    x = ps.SparseTensor(torch.ones(2, 4), torch.tensor([[0, 0, 0, 0], [0, 9, 9, 9]], dtype=torch.int32))
    from pointsparse import tensor as tensor_module
    monkeypatch.setattr(tensor_module, "available_memory", lambda: 1000)
    with pytest.raises(ValueError, match=r"dense\(\) of shape \(1, 4, 10, 10, 10\) needs 16,000 bytes, more than the "
                                         r"1,000 bytes of memory available \(crop or shift"):
        x.dense()
    monkeypatch.setattr(tensor_module, "available_memory", lambda: None)
    assert x.dense().shape == (1, 4, 10, 10, 10)
