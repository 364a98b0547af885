"""Kernel maps: every method against the brute-force reference, canonical
order, thread-count independence, range borders, errors, and the cache."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse import kmap as km
from reference import kmap_reference

METHODS = ["mergesort", "hash", "torch"]

# (kernel_size, stride, dilation, tensor_stride)
MAPS = [
    (3, 1, 1, 1),
    (5, 1, 1, 1),
    (1, 1, 1, 1),
    (2, 1, 1, 1),
    (4, 1, 1, 1),
    ((3, 1, 5), 1, 1, 1),
    (3, 1, 2, 1),
    (3, 1, (1, 3, 2), 1),
    (3, 1, 9, 1),
    (3, 1, 1, 2),
    (2, 2, 1, 1),
    (3, 2, 1, 1),
    (2, 2, 1, 2),
    (3, 2, 1, 4),
    ((2, 3, 1), (2, 1, 3), 1, 1),
    (3, (1, 2, 2), 2, (2, 1, 1)),
]


def random_coords(n: int, batches: int, extent: int, stride=(1, 1, 1), seed: int = 0, shuffle: bool = False):
    """Unique int32 coords with negative values, on multiples of ``stride``."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, batches, (n, 1), generator=g)
    xyz = torch.randint(-extent, extent + 1, (n, 3), generator=g) * torch.tensor(stride)
    coords = torch.unique(torch.cat([b, xyz], 1).int(), dim=0)
    if shuffle:
        coords = coords[torch.randperm(coords.shape[0], generator=g)]
    return coords.contiguous()


def assert_matches_reference(kmap: km.KernelMap, coords, k, t, d, s):
    out_coords, in_idx, out_idx, sizes = kmap_reference(coords, k, t, d, s)
    assert torch.equal(kmap.out_coords, out_coords)
    assert torch.equal(kmap.sizes, sizes)
    assert torch.equal(kmap.in_idx, in_idx)
    assert torch.equal(kmap.out_idx, out_idx)
    assert kmap.in_idx.dtype == kmap.out_idx.dtype == torch.int64
    assert kmap.out_coords.dtype == torch.int32
    assert kmap.num_in == coords.shape[0] and kmap.num_out == out_coords.shape[0]
    assert torch.equal(kmap.offsets, km.kernel_offsets(k, d, s))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k, t, d, s", MAPS)
@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
def test_matches_reference(method, k, t, d, s, shuffle):
    st = km.as_triple(s, "s")
    coords = random_coords(300, 3, 5, st, seed=hash((str(k), str(t), str(d), str(s))) % 1000, shuffle=shuffle)
    kmap = km.build(coords, k, t, d, s, method=method)
    assert_matches_reference(kmap, coords, k, t, d, s)


@pytest.mark.parametrize("method", METHODS)
def test_many_batches_dense_block(method):
    # A solid block: every offset is hit, many batches (some empty).
    g = torch.Generator().manual_seed(1)
    x = torch.stack(torch.meshgrid(*[torch.arange(-3, 3)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.cat([torch.full((x.shape[0], 1), b), x], 1) for b in (0, 2, 5, 4095)]).int()
    coords = coords[torch.randperm(coords.shape[0], generator=g)]
    for k, t in ((3, 1), (3, 2), (2, 2)):
        assert_matches_reference(km.build(coords, k, t, method=method), coords, k, t, 1, 1)


@pytest.mark.parametrize("method", METHODS)
def test_all_methods_identical(method):
    coords = random_coords(3000, 4, 12, seed=7, shuffle=True)
    for k, t in ((3, 1), (5, 1), (3, 2)):
        a = km.build(coords, k, t, method="torch")
        b = km.build(coords, k, t, method=method)
        for name in ("out_coords", "in_idx", "out_idx", "sizes", "offsets"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("method", METHODS)
def test_one_point_and_empty(method):
    one = torch.tensor([[3, -7, 0, 65535]], dtype=torch.int32)
    kmap = km.build(one, 3, method=method)
    assert kmap.sizes.tolist() == [0] * 13 + [1] + [0] * 13
    assert kmap.pairs(13)[0].tolist() == [0] and kmap.pairs(13)[1].tolist() == [0]
    down = km.build(one, 2, 2, method=method)
    assert down.out_coords.tolist() == [[3, -8, 0, 65534]]
    assert_matches_reference(down, one, 2, 2, 1, 1)
    empty = torch.zeros((0, 4), dtype=torch.int32)
    for t in (1, 2):
        kmap = km.build(empty, 3, t, method=method)
        assert kmap.num_in == kmap.num_out == kmap.num_pairs == 0
        assert kmap.sizes.tolist() == [0] * 27 and kmap.out_coords.shape == (0, 4)
        assert kmap.in_idx.shape == (0,) and kmap.in_idx.dtype == torch.int64


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# Clouds at the borders of int32 and of their key layouts: (batches, x, y, z values).
BORDERS = {
    "int32_min": ((0, 1), [INT32_MIN, INT32_MIN + 1, INT32_MIN + 2, INT32_MIN + 5], [INT32_MIN, INT32_MIN + 1],
                  [INT32_MIN, INT32_MIN + 2, INT32_MIN + 7]),
    "int32_max": ((0, 3), [INT32_MAX - 5, INT32_MAX - 1, INT32_MAX], [INT32_MAX, 0, 1], [INT32_MAX - 1, INT32_MAX]),
    "x_both_ends": ((0, 1), [INT32_MIN, INT32_MIN + 1, -1, 0, INT32_MAX - 1, INT32_MAX], [-1, 0, 1], [0, 1]),
    # fields without slack: 2**bits values exactly, no room for a margin (63 bits in all):
    # a shifted key past the top of x would carry into the batch field
    "no_margin_63_bits": ((0, 1, 2**31 - 2, INT32_MAX), [INT32_MIN, INT32_MIN + 1, INT32_MAX - 1, INT32_MAX], [4], [8]),
    "no_margin_power_of_two": ((0, 1), [0, 1, 2**20 - 2, 2**20 - 1], [0, 1, 2**20 - 1], [0, 2**21 - 1]),
}


def border_coords(name: str) -> torch.Tensor:
    batches, xs, ys, zs = BORDERS[name]
    rows = [[b, x, y, z] for b in batches for x in xs for y in ys for z in zs]
    coords = torch.tensor(rows, dtype=torch.int32)
    return coords[torch.randperm(coords.shape[0], generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(BORDERS))
def test_layout_borders_never_wrap(method, name):
    # Shifted keys must never carry into a neighbouring field (which would
    # match a wrong row), whether the layout has a margin or not.
    coords = border_coords(name)
    for k, t, d in ((3, 1, 1), (5, 1, 1), (3, 1, 2), (2, 1, 1), (3, 2, 1), (2, 2, 1)):
        if name.startswith("int32_min") and t > 1:
            continue  # floor(c / 2) * 2 of INT32_MIN + 1 stays in int32, tested below
        assert_matches_reference(km.build(coords, k, t, d, method=method), coords, k, t, d, 1)
        with _ext.torch_path():
            assert_matches_reference(km.build(coords, k, t, d, method=method if method == "torch" else None),
                                     coords, k, t, d, 1)


# Clouds far from the origin: the same shapes as near it, shifted.
SHIFTS = {
    "x_100000": (0, 100000, 0, 0),
    "int32_min": (0, INT32_MIN + 40, INT32_MIN + 40, INT32_MIN + 40),
    "int32_max": (0, INT32_MAX - 40, INT32_MAX - 40, INT32_MAX - 40),
    "mixed_ends": (0, INT32_MAX - 40, INT32_MIN + 40, 123456789),
    "big_batch": (2**31 - 8, 0, 0, 0),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shift", sorted(SHIFTS))
@pytest.mark.parametrize("k, t, d, s", [(3, 1, 1, 1), (2, 2, 1, 1), (3, 2, 1, 1), (3, 1, 1, 2), (3, 2, 1, 4)])
def test_far_clouds_match_reference_and_the_shifted_map(method, shift, k, t, d, s):
    st = km.as_triple(s, "s")
    # shifts are multiples of every stride here, so the downsampling commutes with them
    near = random_coords(300, 3, 5, st, seed=21, shuffle=True)
    near[:, 1:] -= near[:, 1:].min(0).values
    q = 8  # s * t
    offset = torch.tensor([v // q * q if a else v for a, v in enumerate(SHIFTS[shift])], dtype=torch.int64)
    far = (near.long() + offset).int()
    kmap = km.build(far, k, t, d, s, method=method)
    assert_matches_reference(kmap, far, k, t, d, s)
    ref = km.build(near, k, t, d, s, method=method)
    for name in ("in_idx", "out_idx", "sizes"):
        assert torch.equal(getattr(kmap, name), getattr(ref, name)), name
    assert torch.equal(kmap.out_coords.long(), ref.out_coords.long() + offset)
    with _ext.torch_path():
        torch_map = km.build(far, k, t, d, s, method="torch")
    for name in ("out_coords", "in_idx", "out_idx", "sizes"):
        assert torch.equal(getattr(kmap, name), getattr(torch_map, name)), name


@pytest.mark.parametrize("method", METHODS)
def test_span_over_63_bits_is_a_value_error(method):
    wide = torch.tensor([[0, INT32_MIN, INT32_MIN, 0], [0, INT32_MAX, INT32_MAX, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"coordinates span .*x \[-2147483648, 2147483647\] \(32 bits\)"):
        km.build(wide, 3, method=method)
    # 63 bits exactly works: no room for a margin, every row checked
    full = torch.tensor([[0, INT32_MIN, 0, 0], [INT32_MAX, INT32_MAX, 0, 0], [INT32_MAX, INT32_MAX - 1, 0, 0]],
                        dtype=torch.int32)
    assert_matches_reference(km.build(full, 3, method=method), full, 3, 1, 1, 1)


@pytest.mark.parametrize("method", METHODS)
def test_downsampling_below_int32_is_a_value_error(method):
    coords = torch.tensor([[0, 5, 5, 5], [0, INT32_MIN + 1, 0, 0]], dtype=torch.int32)
    assert_matches_reference(km.build(coords, 2, 2, method=method), coords, 2, 2, 1, 1)  # INT32_MIN: in range
    for path in (False, True):
        with _ext.torch_path() if path else torch.no_grad():
            with pytest.raises(ValueError, match=r"row 1 = \[0, -2147483647, 0, 0\] downsampled to stride "
                                                 r"\(3, 3, 3\) falls below the int32 range"):
                km.build(coords, 3, 3, method=method)


def test_thread_count_does_not_change_result(monkeypatch):
    coords = random_coords(40000, 2, 30, seed=5, shuffle=True)
    results = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("POINTSPARSE_NUM_THREADS", threads)
        results[threads] = [km.build(coords, k, t, method=m) for m in ("mergesort", "hash") for k, t in ((3, 1), (3, 2))]
    for a, b in zip(results["1"], results["2"] + results["3"]):
        assert torch.equal(a.in_idx, b.in_idx) and torch.equal(a.out_idx, b.out_idx)
        assert torch.equal(a.sizes, b.sizes) and torch.equal(a.out_coords, b.out_coords)
    for a, b in zip(results["1"], results["3"]):
        assert torch.equal(a.in_idx, b.in_idx) and torch.equal(a.out_idx, b.out_idx)


def test_large_cloud_methods_agree():
    # Many chunks of the C++ finders (rows > their work-item sizes).
    coords = random_coords(60000, 3, 25, seed=11)
    ref = km.build(coords, 3, method="torch")
    for method in ("mergesort", "hash"):
        kmap = km.build(coords, 3, method=method)
        assert torch.equal(kmap.in_idx, ref.in_idx) and torch.equal(kmap.out_idx, ref.out_idx)


def test_mirrored_offsets_are_swapped_pairs():
    coords = random_coords(500, 2, 6, seed=2, shuffle=True)
    kmap = km.build(coords, 3)
    offsets = kmap.offsets.tolist()
    for o, off in enumerate(offsets):
        neg = offsets.index([-v for v in off])
        a_in, a_out = kmap.pairs(o)
        b_in, b_out = kmap.pairs(neg)
        assert sorted(zip(a_in.tolist(), a_out.tolist())) == sorted(zip(b_out.tolist(), b_in.tolist()))
        assert bool((a_out[1:] > a_out[:-1]).all())


def test_pairs_and_ptr():
    coords = random_coords(200, 1, 4, seed=4)
    kmap = km.build(coords, 3)
    assert kmap.ptr[0] == 0 and kmap.ptr[-1] == kmap.num_pairs == kmap.in_idx.numel()
    assert kmap.sizes.device.type == "cpu" and kmap.kernel_volume == 27
    for o in range(27):
        i, j = kmap.pairs(o)
        assert torch.equal(coords[i, 1:] - coords[j, 1:], kmap.offsets[o].expand(i.numel(), 3))
    for bad in (27, -1, 2**70):  # a ValueError naming offset and the range (was an IndexError)
        with pytest.raises(ValueError, match=rf"offset must be an offset index in \[0, 27\) .*; got {bad}"):
            kmap.pairs(bad)


def test_offset_of_pairs_is_made_once_per_device():
    """Every pair's offset index (what the columns of a GPU conv take on
    every call) is the map's ``sizes`` repeated, made once per device; one
    made under torch.inference_mode is made again outside it (autograd
    cannot save an inference tensor), as indices() copies the pairs."""
    kmap = km.build(random_coords(200, 1, 4, seed=4), 3, 2)
    ref = torch.repeat_interleave(torch.arange(kmap.kernel_volume), kmap.sizes)
    got = kmap.offset_of_pairs()
    assert torch.equal(got, ref) and got.device == kmap.in_idx.device
    assert kmap.offset_of_pairs() is got and kmap.offset_of_pairs("cpu") is got
    meta = kmap.offset_of_pairs("meta")
    assert meta.device.type == "meta" and meta.shape == ref.shape and kmap.offset_of_pairs("meta") is meta
    assert kmap.offset_of_pairs() is got  # (the CPU's kept beside it)
    fresh = km.build(random_coords(200, 1, 4, seed=4), 3, 2)
    with torch.inference_mode():
        inside = fresh.offset_of_pairs()
        assert inside.is_inference() and fresh.offset_of_pairs() is inside
    outside = fresh.offset_of_pairs()
    assert not outside.is_inference() and torch.equal(outside, ref) and fresh.offset_of_pairs() is outside
    coords = random_coords(200, 1, 4, seed=4, shuffle=True)  # (the transpose re-sorts its pairs by the index)
    down = km.build(coords, 3, 2)
    assert not down._in_idx_ascending() and torch.equal(down.transpose(coords).offset_of_pairs(), ref)


def test_kernel_map_methods_name_their_bad_arguments():
    """offset_of_pairs(device) and transpose(out_coords) took their argument
    unchecked: a device string torch does not know was its bare
    RuntimeError, a float its bare TypeError, a list of
    coords an AttributeError ('list' object has no attribute 'shape'), and
    int64 or (N, 3) coords made a map with such out_coords. Each is now a
    TypeError / ValueError naming the argument and what it takes."""
    coords = random_coords(200, 1, 4, seed=4)
    kmap = km.build(coords, 2, 2)
    for bad, err in (("nope", ValueError), (1.5, TypeError), (object(), TypeError)):
        with pytest.raises(err, match=r"device must be a torch.device or a device name \('cpu', 'cuda:0', ...\); "):
            kmap.offset_of_pairs(bad)
    assert kmap._offset_of_pairs == {}
    for bad, err, what in ((coords.tolist(), TypeError, "must be a torch.Tensor"),
                           (coords.long(), TypeError, "must be int32"),
                           (coords[:, :3], ValueError, r"must be \(N, 4\)")):
        with pytest.raises(err, match=f"out_coords {what}"):
            kmap.transpose(bad)
    assert torch.equal(kmap.transpose(coords).out_coords, coords)


def test_transpose_refuses_coords_that_are_not_the_maps_inputs():
    """KernelMap.transpose(out_coords) took any coords of the right row count
    and labelled the adjoint's outputs with them: build(c, 2, 2).transpose(
    c.flip(0)) put every upsampled row at another row's coords without a
    word. Every pair's input coords are checked against its output's coords
    plus its offset now (a ValueError naming a row); the map's own inputs
    pass, whatever their order, and a transposed map transposes back. The
    library's own transposes (a cache's, a graph's) skip it as trusted."""
    coords = random_coords(200, 2, 6, seed=5, shuffle=True)
    for k, t in ((2, 2), (3, 2), (3, 1), (2, 3)):
        down = km.build(coords, k, t)
        up = down.transpose(coords)
        assert torch.equal(up.out_coords, coords)
        back = up.transpose(down.out_coords)  # (a transposed map's inputs are the coarse coords)
        assert torch.equal(back.out_coords, down.out_coords) and back.num_pairs == down.num_pairs
        for bad in (coords.flip(0), coords + torch.tensor([0, 0, 0, t], dtype=torch.int32),
                    torch.cat([coords[:, :1] + 1, coords[:, 1:]], 1)):
            with pytest.raises(ValueError, match=r"out_coords must be the coords of the map's inputs .*: row \d+ is "
                                                 r"\[.*\] but its pair with output row \d+ .* puts it at \["):
                down.transpose(bad)
        with pytest.raises(ValueError, match=r"out_coords must be the coords of the map's inputs"):
            up.transpose(down.out_coords.flip(0) if len(down.out_coords) > 1 else down.out_coords + 1)
    assert torch.equal(down.transpose(coords.flip(0), trusted=True).out_coords, coords.flip(0))  # (unchecked)
    from pointsparse import ops

    down = km.build(coords, 2, 2)
    args = (down.in_idx, down.out_idx, down.sizes, ops.key_to_list(down.key))
    with pytest.raises(ValueError, match=r"fine_coords must be the coords of the map's inputs"):
        ops.kmap_transpose(down.out_coords, coords.flip(0), *args)  # (an exported program's operator, untrusted)
    assert torch.equal(ops.kmap_transpose(down.out_coords, coords, *args)[0], down.transpose(coords).in_idx)


def test_kernel_offsets_order():
    assert km.kernel_offsets(3).tolist()[:4] == [[-1, -1, -1], [-1, -1, 0], [-1, -1, 1], [-1, 0, -1]]
    assert km.kernel_offsets(2).tolist()[:2] == [[0, 0, 0], [0, 0, 1]]
    assert km.kernel_offsets((1, 1, 4), 3, 2)[:, 2].tolist() == [-6, 0, 6, 12]


def test_downsample_coords_matches_torch_floor():
    coords = random_coords(2000, 3, 40, seed=9, shuffle=True)
    for stride in ((2, 2, 2), (3, 1, 4)):
        st = torch.tensor(stride)
        q = torch.cat([coords[:, :1], torch.div(coords[:, 1:], st, rounding_mode="floor") * st], 1)
        assert torch.equal(km.downsample_coords(coords, stride), torch.unique(q, dim=0).int())
    with pytest.raises(ValueError, match="below the int32 range"):
        km.downsample_coords(torch.tensor([[0, INT32_MIN, 0, 0]], dtype=torch.int32), (3, 3, 3))



def test_downsample_coords_in_torch_ops_does_not_recheck_its_own_keys():
    """downsample_coords' torch path (a GPU's) unpacks keys it packed in the
    layout it fitted: keys of the layout by construction. unpack_torch's
    check of keys given to it (a pass over them and a host read) ran on
    them too, at every downsampling of every forward; it is skipped there,
    and still refuses a bad key given to unpack_torch."""
    import traceback

    from torch.overrides import TorchFunctionMode

    from pointsparse import coords as C

    coords = random_coords(2000, 3, 40, seed=9, shuffle=True)
    package, readers = os.path.dirname(ps.__file__) + os.sep, []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__bool__:
                readers.append([f for f in traceback.extract_stack() if f.filename.startswith(package)][-1].name)
            return func(*args, **(kwargs or {}))

    with ps.backend("torch"):
        expected = km.downsample_coords(coords, (2, 2, 2))
        with Record():
            assert torch.equal(km.downsample_coords(coords, (2, 2, 2)), expected)
    assert readers and "unpack_torch" not in readers, readers
    layout = C.KeyLayout.of(expected)
    with pytest.raises(ValueError, match="keys must be keys of the layout"):
        C.unpack_torch(torch.tensor([-1]), layout)

def test_transpose_is_adjoint_map():
    coords = random_coords(400, 2, 6, seed=6, shuffle=True)
    for k in (2, 3):
        down = km.build(coords, k, 2)
        up = down.transpose(coords)
        assert up.num_in == down.num_out and up.num_out == down.num_in
        assert up.key.transposed and torch.equal(up.sizes, down.sizes)
        for o in range(down.kernel_volume):
            di, do = down.pairs(o)
            ui, uo = up.pairs(o)
            assert sorted(zip(di.tolist(), do.tolist())) == sorted(zip(uo.tolist(), ui.tolist()))
            assert bool((uo[1:] > uo[:-1]).all())
    sorted_coords = torch.unique(coords, dim=0).int()
    down = km.build(sorted_coords, 3, 2)
    up = down.transpose(sorted_coords)
    assert up.in_idx.data_ptr() == down.out_idx.data_ptr()  # no re-sort needed for key-sorted coords


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="dense"), ValueError, "method must be one of"),
        (dict(method=3), ValueError, "method must be one of"),
        (dict(kernel_size=0), ValueError, "kernel_size"),
        (dict(kernel_size=(3, 3)), TypeError, "kernel_size"),
        (dict(kernel_size=2.0), TypeError, "kernel_size"),
        (dict(stride=0), ValueError, "stride"),
        (dict(dilation=-1), ValueError, "dilation"),
        (dict(tensor_stride=0), ValueError, "tensor_stride"),
        (dict(kernel_size=3, dilation=1 << 31), ValueError, "kernel_size \\* dilation"),
        (dict(kernel_size=2, dilation=1 << 30, tensor_stride=2), ValueError, "within int32"),
        (dict(kernel_size=(4096, 4096, 1)), ValueError, "at most 32,768"),
        (dict(kernel_size=33), ValueError, "35,937 offsets"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    coords = random_coords(20, 1, 3)
    with pytest.raises(error, match=match):
        km.build(coords, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_bad_coords(method):
    with pytest.raises(TypeError, match="int32"):
        km.build(torch.zeros((3, 4), dtype=torch.int64), method=method)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        km.build(torch.zeros((3, 3), dtype=torch.int32), method=method)
    with pytest.raises(ValueError, match="duplicate"):
        km.build(torch.tensor([[0, 1, 2, 3], [0, 5, 5, 5], [0, 1, 2, 3]], dtype=torch.int32), method=method)
    with pytest.raises(ValueError, match=r"coords row 1 = \[-1, 0, 0, 0\] has a negative batch"):
        km.build(torch.tensor([[0, 70000, 0, 0], [-1, 0, 0, 0]], dtype=torch.int32), method=method)
    off_stride = torch.tensor([[0, 1, 0, 0], [0, 4, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiples of the stride"):  # x = 1 is no site of a stride-2 tensor
        km.build(off_stride, 3, stride=2, tensor_stride=2, method=method)
    with pytest.raises(ValueError, match="out_coords"):
        km.build(off_stride * 2, 2, stride=2, method=method, out_coords=torch.tensor([[0, 1, 0, 0]], dtype=torch.int32))


def test_core_checks_shapes_itself():
    offsets = _ext.to_numpy(km.kernel_offsets(3))
    coords = np.zeros((2, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="offsets"):
        _ext.core.kmap_mergesort(coords, None, np.zeros((0, 3), dtype=np.int32), 1)
    with pytest.raises(ValueError, match="in_coords"):
        _ext.core.kmap_hash(np.zeros((2, 3), dtype=np.int32), None, offsets, 1)
    with pytest.raises(ValueError, match="out_coords"):
        _ext.core.kmap_hash(coords[:1], np.zeros((2, 2), dtype=np.int32), offsets, 1)
    # what numpy cannot make an int32 array of: named as the argument, by every binding that takes out_coords
    for bad in ("abc", object(), [[0, 1], [1]]):
        for build in (_ext.core.kmap_hash, _ext.core.kmap_mergesort):
            with pytest.raises(ValueError, match="out_coords cannot be converted to a int32 array"):
                build(coords, bad, offsets, 1)
        with pytest.raises(ValueError, match="out_coords cannot be converted to a int32 array"):
            _ext.core.kmap_parents(coords, [2, 2, 2], [2, 2, 2], bad, 1)


def test_core_bounds_kernel_volume():
    coords = np.zeros((2, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="at most|1 to 32768"):
        _ext.core.kmap_hash(coords, None, np.zeros((km.MAX_KERNEL_VOLUME + 1, 3), dtype=np.int32), 1)


def test_large_kernels_are_quick():
    # The mirror plan is O(K log K): a 31^3 kernel (29791 offsets) on a small
    # cloud takes well under a second per C++ method (k=101 used to take minutes).
    import time
    coords = random_coords(40, 1, 20, seed=15)
    for method in ("mergesort", "hash"):
        t0 = time.perf_counter()
        kmap = km.build(coords, 31, method=method)
        assert time.perf_counter() - t0 < 5.0, method
        assert_matches_reference(kmap, coords, 31, 1, 1, 1)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="at most 32,768"):
        km.build(coords, (4096, 4096, 1))
    assert time.perf_counter() - t0 < 1.0


def test_default_method():
    assert km.default_method("cpu") in km.CPU_METHODS
    assert km.default_method(torch.device("cuda")) == "torch"
    assert km.default_method(torch.device("cpu")) == km.default_method("cpu")
    # a name that is no device, or an accelerator's index where none is: an error naming device, on every
    # backend (torch's bare "Expected one of cpu, cuda, ..." RuntimeError where the core serves, and the
    # torch backend answered "torch" for anything)
    for backend in ("auto", "torch"):
        with ps.backend(backend):
            with pytest.raises(ValueError, match="device must be a torch.device or a device name"):
                km.default_method("xyz")
            with pytest.raises(TypeError, match="device must be a torch.device or a device name"):
                km.default_method(1.5)
    coords = random_coords(100, 1, 3)
    assert torch.equal(km.build(coords).in_idx, km.build(coords, method="torch").in_idx)


def test_cpu_methods_refuse_other_devices():
    with pytest.raises(ValueError, match="CPU"):
        km._check_method("mergesort", torch.device("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_method_on_cuda():
    coords = random_coords(2000, 2, 10, seed=8, shuffle=True)
    for k, t in ((3, 1), (2, 2), (3, 2)):
        a = km.build(coords, k, t, method="mergesort")
        b = km.build(coords.cuda(), k, t, method="torch")
        assert torch.equal(a.in_idx, b.in_idx.cpu()) and torch.equal(a.out_idx, b.out_idx.cpu())
        assert torch.equal(a.out_coords, b.out_coords.cpu())


def test_real_sweep_methods_agree(datasets_dir):
    path = datasets_dir / "kitti-raw" / "000049.bin"
    if not path.exists():
        pytest.skip("kitti-raw/000049.bin not present")
    pts = np.fromfile(path, dtype=np.float32).reshape(-1, 4)[:, :3]
    tensor, _ = ps.voxelize(torch.from_numpy(pts - pts.min(0)), voxel_size=0.2)
    coords = tensor.coords
    for k, t in ((3, 1), (3, 2)):
        ref = km.build(coords, k, t, method="torch")
        for method in ("mergesort", "hash"):
            kmap = km.build(coords, k, t, method=method)
            assert torch.equal(kmap.in_idx, ref.in_idx) and torch.equal(kmap.out_idx, ref.out_idx)
            assert torch.equal(kmap.sizes, ref.sizes)


# --- the coordinate cache -------------------------------------------------

def counting_build(monkeypatch):
    """Every map a cache builds (through kmap._build, as the public build does)."""
    calls = []
    real = km._build

    def build(*args, **kwargs):
        calls.append((args[1:], kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(km, "_build", build)
    return calls


def test_cache_builds_each_key_once(monkeypatch):
    calls = counting_build(monkeypatch)
    coords = random_coords(300, 2, 6, seed=12)
    x = ps.SparseTensor(torch.randn(coords.shape[0], 2), coords)
    a = km.get_kmap(x, 3)
    y = x.with_feats(torch.randn(coords.shape[0], 2))
    assert km.get_kmap(y, 3) is a and len(calls) == 1
    km.get_kmap(y, 3, dilation=2)
    km.get_kmap(y, (3, 3, 1))
    assert len(calls) == 3
    down = km.get_kmap(y, 2, 2)
    assert len(calls) == 4 and x.cache.get_coords((2, 2, 2)) is down.out_coords
    coarse = ps.SparseTensor(torch.randn(down.num_out, 2), down.out_coords, 2, cache=x.cache)
    km.get_kmap(coarse, 3)
    km.get_kmap(coarse, 3)
    assert len(calls) == 5
    # A second downsampling to the same stride reuses the cached coords.
    down3 = km.get_kmap(y, 3, 2)
    assert down3.out_coords is down.out_coords and len(calls) == 6


def test_cache_transposed_is_transpose_of_downsampling(monkeypatch):
    calls = counting_build(monkeypatch)
    coords = random_coords(400, 2, 6, seed=13, shuffle=True)
    x = ps.SparseTensor(torch.randn(coords.shape[0], 1), coords)
    down = km.get_kmap(x, 2, 2)
    coarse = ps.SparseTensor(torch.randn(down.num_out, 1), down.out_coords, 2, cache=x.cache)
    up = km.get_kmap(coarse, 2, 2, transposed=True)
    assert len(calls) == 1  # the transposed map reuses the downsampling map
    ref = down.transpose(coords)
    assert torch.equal(up.in_idx, ref.in_idx) and torch.equal(up.out_idx, ref.out_idx)
    assert up.out_coords is coords and up.key.transposed
    assert km.get_kmap(coarse, 2, 2, transposed=True) is up
    # Transposed before the downsampling was built: it builds the downsampling once.
    up3 = km.get_kmap(coarse, 3, 2, transposed=True)
    assert len(calls) == 2
    assert km.get_kmap(x, 3, 2) is x.cache.kmaps[km.KernelMapKey((1, 1, 1), (3, 3, 3), (2, 2, 2), (1, 1, 1))]
    assert len(calls) == 2 and up3.num_out == coords.shape[0]


@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 2, 2)])
def test_cached_1x1x1_map_is_every_builders_map(stride):
    """A cache's 1x1x1 map (built without a search) equals what every builder
    returns for those coords, at any tensor stride and dilation."""
    coords = random_coords(500, 2, 7, stride, seed=15, shuffle=True)
    x = ps.SparseTensor(torch.randn(coords.shape[0], 3), coords, stride)
    for dilation in (1, 2):
        got = km.get_kmap(x, 1, dilation=dilation)
        for method in ("mergesort", "hash", "torch"):
            want = km.build(coords, 1, dilation=dilation, tensor_stride=stride, method=method)
            for a, b in ((got.in_idx, want.in_idx), (got.out_idx, want.out_idx), (got.sizes, want.sizes),
                         (got.offsets, want.offsets), (got.out_coords, want.out_coords)):
                assert a.dtype == b.dtype and torch.equal(a, b), method
            assert (got.num_in, got.num_out, got.ptr) == (want.num_in, want.num_out, want.ptr)
    conv = ps.nn.Conv3d(3, 4, 1, bias=True).double()
    ref = x.feats.double() @ conv.weight.detach()[0] + conv.bias.detach()
    torch.testing.assert_close(conv(ps.SparseTensor(x.feats.double(), coords, stride)).feats, ref)


@pytest.mark.parametrize("stride,kernel", [((1, 1, 1), (2, 2, 2)), ((2, 2, 2), (2, 2, 2)), ((3, 3, 3), (2, 2, 2)),
                                           ((1, 2, 4), (2, 1, 2)), ((3, 1, 2), (2, 2, 1))])
@pytest.mark.parametrize("shuffle", [False, True])
def test_cached_map_of_a_kernel_tiling_its_stride_is_every_builders_map(stride, kernel, shuffle):
    """A cache's k == s map (each row paired with its parent by
    _core.kmap_parents, no search) equals every builder's: tensor strides of
    powers of two and not, kernels of 1 and 2 per axis, negative coords,
    batches, rows in key order (a cache's) and shuffled; with the out
    coords built by it, given by the cache, or given and not the
    downsampled ones (then a search)."""
    coords = random_coords(900, 3, 9, stride, seed=16, shuffle=shuffle)
    x = ps.SparseTensor(torch.randn(coords.shape[0], 2), coords, stride)
    got = km.get_kmap(x, kernel, kernel)
    out_stride = tuple(a * b for a, b in zip(stride, kernel))
    for method in ("mergesort", "hash", "torch"):
        want = km.build(coords, kernel, kernel, tensor_stride=stride, method=method)
        for a, b in ((got.in_idx, want.in_idx), (got.out_idx, want.out_idx), (got.sizes, want.sizes),
                     (got.offsets, want.offsets), (got.out_coords, want.out_coords)):
            assert a.dtype == b.dtype and torch.equal(a, b), method
    assert_matches_reference(got, coords, kernel, kernel, (1, 1, 1), stride)
    assert x.cache.get_coords(out_stride) is got.out_coords
    # Out coords the cache holds already (a strided conv of another kernel built them first).
    y = ps.SparseTensor(torch.randn(coords.shape[0], 2), coords, stride)
    first = km.get_kmap(y, 3, kernel)
    again = km.get_kmap(y, kernel, kernel)
    assert again.out_coords is first.out_coords and torch.equal(again.in_idx, got.in_idx)
    assert torch.equal(again.out_idx, got.out_idx)
    # Given out coords that are not the downsampled ones: the search's map.
    fewer = got.out_coords[::2].contiguous()
    mapped = km._build(coords, kernel, kernel, (1, 1, 1), stride, out_coords=fewer, trusted=True)
    want = km.build(coords, kernel, kernel, tensor_stride=stride, out_coords=fewer, method="mergesort")
    assert torch.equal(mapped.in_idx, want.in_idx) and torch.equal(mapped.out_idx, want.out_idx)
    assert torch.equal(mapped.sizes, want.sizes) and mapped.out_coords is fewer


@pytest.mark.parametrize("stride,kernel", [((1, 1, 1), (2, 2, 2)), ((2, 2, 2), (2, 2, 2)), ((3, 3, 3), (2, 2, 2)),
                                           ((1, 2, 4), (2, 1, 2))])
@pytest.mark.parametrize("shuffle", [False, True])
def test_default_build_of_a_kernel_tiling_its_stride_takes_the_parents(stride, kernel, shuffle, monkeypatch):
    """build() with the default method maps a k == s conv through
    _core.kmap_parents (no search): every builder's tensors, on coords in key
    order and shuffled, with out coords built, given (the downsampled ones)
    or given and not the downsampled ones (then a search); duplicates and
    coords off the tensor stride are refused as by the builders."""
    calls = []
    parents = _ext.core.kmap_parents

    def counted(*args):
        calls.append(args[0].shape[0])
        return parents(*args)

    monkeypatch.setattr(_ext.core, "kmap_parents", counted)
    coords = random_coords(900, 3, 9, stride, seed=17, shuffle=shuffle)
    got = km.build(coords, kernel, kernel, tensor_stride=stride)
    assert calls == [coords.shape[0]]
    for method in ("mergesort", "hash", "torch"):
        want = km.build(coords, kernel, kernel, tensor_stride=stride, method=method)
        for a, b in ((got.in_idx, want.in_idx), (got.out_idx, want.out_idx), (got.sizes, want.sizes),
                     (got.offsets, want.offsets), (got.out_coords, want.out_coords)):
            assert a.dtype == b.dtype and torch.equal(a, b), method
        assert (got.num_in, got.num_out, got.ptr) == (want.num_in, want.num_out, want.ptr)
    assert len(calls) == 1  # the named methods search
    assert_matches_reference(got, coords, kernel, kernel, (1, 1, 1), stride)
    given = got.out_coords.clone()
    again = km.build(coords, kernel, kernel, tensor_stride=stride, out_coords=given)
    assert again.out_coords is given and torch.equal(again.in_idx, got.in_idx)
    assert torch.equal(again.out_idx, got.out_idx) and torch.equal(again.sizes, got.sizes)
    fewer = got.out_coords[::2].contiguous()
    mapped = km.build(coords, kernel, kernel, tensor_stride=stride, out_coords=fewer)
    want = km.build(coords, kernel, kernel, tensor_stride=stride, out_coords=fewer, method="mergesort")
    assert torch.equal(mapped.in_idx, want.in_idx) and torch.equal(mapped.out_idx, want.out_idx)
    assert torch.equal(mapped.sizes, want.sizes) and mapped.out_coords is fewer
    twice = torch.cat([coords, coords[3:4]])
    for method in (None, "mergesort"):
        with pytest.raises(ValueError, match=r"^coords hold duplicate rows; each \[batch, x, y, z\] must appear once$"):
            km.build(twice, kernel, kernel, tensor_stride=stride, method=method)
    if max(stride) > 1:
        off = coords.clone()
        off[5, 1 + stride.index(max(stride))] += 1
        with pytest.raises(ValueError, match="multiple"):
            km.build(off, kernel, kernel, tensor_stride=stride)


@pytest.mark.parametrize("shuffle", [False, True])
def test_kmap_parents_is_the_same_for_any_thread_count(shuffle):
    """Above 2^15 rows kmap_parents splits its passes after the sort over the
    threads (chunks starting where a parent starts): the same arrays as one
    thread and as the merge-sort builder; a duplicate is refused with any
    thread count."""
    core = _ext.core
    coords = random_coords(120_000, 2, 40, (2, 2, 2), seed=18, shuffle=shuffle)
    assert coords.shape[0] > 2**15
    c = coords.numpy()
    one = core.kmap_parents(c, [4, 4, 4], [2, 2, 2], None, 1)
    for nt in (2, 3, 7):
        many = core.kmap_parents(c, [4, 4, 4], [2, 2, 2], None, nt)
        for a, b in zip(one, many):
            assert a.dtype == b.dtype and np.array_equal(a, b), nt
    want = km.build(coords, 2, 2, tensor_stride=2, method="mergesort")
    assert np.array_equal(one[0], want.out_coords.numpy()) and np.array_equal(one[3], want.sizes.numpy())
    assert np.array_equal(one[1], want.in_idx.numpy()) and np.array_equal(one[2], want.out_idx.numpy())
    # A repeated row in the last chunk: found (and named the same) with any thread count.
    twice = np.concatenate([c, c[-5:-4]])
    for nt in (1, 2, 7):
        with pytest.raises(ValueError, match="duplicate"):
            core.kmap_parents(twice, [4, 4, 4], [2, 2, 2], None, nt)


def test_kmap_parents_rejects_bad_arguments():
    core = _ext.core
    c = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 2, 2]], np.int32)
    assert core.kmap_parents(c, [2, 2, 2], [2, 2, 2], None, 1) is not None
    with pytest.raises(ValueError, match="duplicate"):
        core.kmap_parents(np.concatenate([c, c[1:2]]), [2, 2, 2], [2, 2, 2], None, 1)
    with pytest.raises(ValueError, match="row 1 .* multiple of the tensor stride"):
        core.kmap_parents(c, [4, 4, 4], [2, 2, 2], None, 1)
    with pytest.raises(ValueError, match="kernel must be 1 or 2"):
        core.kmap_parents(c, [3, 3, 3], [3, 3, 3], None, 1)
    with pytest.raises(ValueError, match="kernel must be 1 or 2"):
        core.kmap_parents(c, [3, 2, 2], [2, 2, 2], None, 1)
    with pytest.raises(ValueError, match="stride"):
        core.kmap_parents(c, [0, 2, 2], [1, 2, 2], None, 1)
    with pytest.raises(ValueError, match="out_coords"):
        core.kmap_parents(c, [2, 2, 2], [2, 2, 2], np.zeros((2, 3), np.int32), 1)
    with pytest.raises(ValueError, match="coords"):
        core.kmap_parents(c[:, :3].copy(), [2, 2, 2], [2, 2, 2], None, 1)
    low = np.array([[0, -2**31, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="below the int32 range"):
        core.kmap_parents(low, [6, 1, 1], [2, 1, 1], None, 1)


def test_cache_missing_finer_stride_raises():
    coords = random_coords(50, 1, 3, (2, 2, 2), seed=14)
    coarse = ps.SparseTensor(torch.randn(coords.shape[0], 1), coords, 2)
    with pytest.raises(ValueError, match="no coords at stride"):
        km.get_kmap(coarse, 2, 2, transposed=True)
    with pytest.raises(ValueError, match="divisible"):
        km.get_kmap(coarse, 3, 4, transposed=True)


def test_env_threads_is_used():
    assert _ext.num_threads() >= 1
    assert os.environ.get("POINTSPARSE_NUM_THREADS", "1") != "0"


def test_key_out_stride_for_down_and_transposed_maps():
    coords = random_coords(400, 2, 10, stride=(2, 2, 2), seed=3)
    x = ps.SparseTensor(torch.zeros(len(coords), 1), coords, 2)
    down = km.get_kmap(x, 2, (2, 1, 2))
    assert down.key.out_stride == (4, 2, 4)
    coarse = ps.SparseTensor(torch.zeros(down.num_out, 1), down.out_coords, (4, 2, 4), cache=x.cache, validate=False)
    up = km.get_kmap(coarse, 2, (2, 1, 2), 1, True)
    assert up.key.transposed and up.key.out_stride == (2, 2, 2) and up.num_out == len(x)
    assert km.get_kmap(x, 3).key.out_stride == (2, 2, 2)


def test_get_kmap_names_a_tensor_that_is_no_sparse_tensor():
    """get_kmap reads the SparseTensor's coordinate cache: a plain tensor or
    coords array is a TypeError naming the argument (was AttributeError)."""
    from pointsparse.kmap import get_kmap

    for bad in (torch.zeros(3, 4, dtype=torch.int32), [[0, 0, 0, 0]], None):
        with pytest.raises(TypeError, match="tensor must be a SparseTensor"):
            get_kmap(bad, 3)


def test_get_kmap_transposed_must_be_a_bool():
    """get_kmap's ``transposed`` is a flag, checked as conv3d and Conv3d
    check it: a string or an int is a TypeError naming it (it was read by
    truthiness: transposed="no" or "False" built and cached the transposed
    map, the upsampling, without a word)."""
    coords = random_coords(60, 1, 4, seed=21)
    x = ps.SparseTensor(torch.zeros(len(coords), 1), coords)
    coarse = ps.SparseTensor(torch.zeros(km.get_kmap(x, 2, 2).num_out, 1), km.get_kmap(x, 2, 2).out_coords, 2,
                             cache=x.cache, validate=False)
    for bad in ("no", "False", 1, 0, None):
        with pytest.raises(TypeError, match="transposed"):
            km.get_kmap(coarse, 2, 2, transposed=bad)
    assert not any(key.transposed for key in x.cache.kmaps)
    assert km.get_kmap(coarse, 2, 2, transposed=np.bool_(True)).key.transposed


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_output_stride_beyond_int32_refused_on_every_backend(backend):
    """tensor_stride x stride past 2**31 - 1 on an axis is a ValueError naming
    both, from build, get_kmap and a strided conv alike (the torch backend
    gave a map, and a conv a tensor of stride 2**31; the core refused)."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 2, 2, 2]], dtype=torch.int32)
    x = ps.SparseTensor(torch.randn(2, 3), coords)
    with ps.backend(backend):
        for call in (lambda: km.build(coords, 3, stride=2**40), lambda: km.build(coords, 1, tensor_stride=2**40),
                     lambda: km.build(coords, 2, stride=(2, 2**31, 2), method="torch"),
                     lambda: km.get_kmap(x, 1, 2**31), lambda: ps.nn.Conv3d(3, 4, 1, stride=2**31)(x),
                     lambda: ps.nn.Conv3d(3, 4, 2, stride=2**30)(ps.nn.Conv3d(3, 3, 2, stride=2)(x))):
            with pytest.raises(ValueError, match=r"tensor_stride \(.*\) x stride \(.*\) = output stride .*"
                                                 r"strides must be in \[1, 2147483647\] per axis"):
                call()
        assert km.build(coords, 1, stride=2**31 - 1).out_coords.tolist() == [[0, 0, 0, 0]]


@pytest.mark.parametrize("method", ["hash", "mergesort", "torch"])
def test_build_refuses_out_coords_given_twice(method):
    """build(out_coords=...) with a row given twice made two output rows of
    one site (each with the same pairs): refused as duplicate coords are."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 3, 0, 0]], dtype=torch.int32)
    twice = torch.tensor([[0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="out_coords hold duplicate rows"):
        km.build(coords, 3, stride=2, method=method, out_coords=twice)
    once = km.build(coords, 3, stride=2, method=method, out_coords=twice[:2])
    assert once.num_out == 2


@pytest.mark.parametrize("method", ["hash", "mergesort", "torch"])
@pytest.mark.parametrize("stride", [1, 2])
def test_build_names_out_coords_with_a_negative_batch(method, stride):
    """out_coords with a negative batch index were refused as 'coords row 0
    = [-1, 0, 0, 0] has a negative batch index', naming the input coords
    (which were fine): the error names out_coords."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^out_coords row 1 = \[-1, 0, 0, 0\] has a negative batch index"):
        km.build(coords, 3, stride=stride, method=method,
                 out_coords=torch.tensor([[0, 0, 0, 0], [-1, 0, 0, 0]], dtype=torch.int32))


def test_operator_keys_refuse_sizes_below_one():
    """An operator's 13-int key (a program's argument) took a kernel size,
    stride or dilation of 0 or -1 (dilation -1 built a map of mirrored
    offsets) and any transposed value; a ValueError names them."""
    from pointsparse.ops import key_from_list, key_to_list

    good = [1, 1, 1, 3, 3, 3, 1, 1, 1, 1, 1, 1, 0]
    assert key_to_list(key_from_list(good)) == good
    for i, bad in ((9, -1), (3, 0), (6, 0), (0, 0), (12, 2)):
        key = list(good)
        key[i] = bad
        with pytest.raises(ValueError, match="must be >= 1 and transposed 0 or 1"):
            key_from_list(key)


@pytest.mark.parametrize("chunk", [None, 1000, 1])
def test_the_torch_query_of_every_offset_at_once_equals_the_core(monkeypatch, chunk):
    """The torch method searches every offset's keys at once (a few
    launches and syncs a map, what a GPU runs): the core's pairs in the
    core's order, for submanifold maps (the mirrored offsets swapped and
    re-sorted when the coords come unsorted), strided and dilated maps,
    offsets reaching past the layout's margin (coords at the edge of their
    fields), chunks of any size, and empty inputs."""
    if chunk is not None:
        monkeypatch.setattr(km, "QUERY_CHUNK", chunk)
    cases = [random_coords(1500, 2, 9, seed=4, shuffle=True), random_coords(800, 1, 6, seed=5),
             torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 5, 5, 5]], dtype=torch.int32),
             torch.zeros(0, 4, dtype=torch.int32)] + [border_coords(name) for name in sorted(BORDERS)]
    for coords in cases:
        for k, t, d in ((3, 1, 1), (3, 1, 2), (2, 2, 1), (3, 2, 1), (5, 1, 1)):
            if coords.numel() and int(coords[:, 1:].min()) < -(2**30) and t > 1:
                continue  # (floor of INT32_MIN + 1: test_layout_borders_never_wrap's exception)
            a = km.build(coords, k, t, d, method="mergesort")
            b = km.build(coords, k, t, d, method="torch")
            assert torch.equal(a.in_idx, b.in_idx) and torch.equal(a.out_idx, b.out_idx), (k, t, d)
            assert torch.equal(a.sizes, b.sizes) and torch.equal(a.out_coords, b.out_coords)


@pytest.mark.parametrize("k", [2, (2, 2, 1), (1, 2, 2)])
def test_the_torch_parents_map_equals_the_core(k):
    """A kernel that tiles its stride (the U-Net's k2 s2) on the torch path
    (a GPU's default method, or a cache's maps) pairs each row with its
    parent from the downsampling's unique (``_parents_torch``, no search):
    the core's pairs in the core's order, out_coords too, on shuffled,
    strided and int32-border coords; duplicate rows the builders' ValueError."""
    t = k
    cases = [(random_coords(1500, 2, 9, seed=6, shuffle=True), 1), (random_coords(700, 2, 5, seed=7) * 2, 2),
             (torch.zeros(0, 4, dtype=torch.int32), 1)] + [(border_coords(name), 1) for name in sorted(BORDERS)
                                                          if not name.startswith("int32_min")]
    for coords, s in cases:
        if s == 2:
            coords[:, 0] //= 2  # (batch indices stay small)
        want = km.build(coords, k, t, tensor_stride=s, method="mergesort")
        with _ext.torch_path():
            got = km.build(coords, k, t, tensor_stride=s)  # (the default method there: torch, its shortcut)
            tensor = ps.SparseTensor(torch.zeros(len(coords), 1), coords, s)
            cached = km.get_kmap(tensor, k, t)
        for kmap in (got, cached):
            assert torch.equal(kmap.out_coords, want.out_coords)
            assert torch.equal(kmap.in_idx, want.in_idx) and torch.equal(kmap.out_idx, want.out_idx)
            assert torch.equal(kmap.sizes, want.sizes)
    twice = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.int32)
    with _ext.torch_path(), pytest.raises(ValueError, match="duplicate rows"):
        km.build(twice, 2, 2)


def test_which_builds_of_a_kernel_tiling_its_stride_take_the_torch_parents(monkeypatch):
    """On the torch path the default method's and a cache's maps of a k2 s2
    kernel take ``_parents_torch``, the core's ``kmap_parents`` never; a
    method named by build() searches, as do out_coords given and a
    submanifold or non-tiling kernel."""
    calls = []
    parents = km._parents_torch

    def counted(*args):
        calls.append(args[0].shape[0])
        return parents(*args)

    monkeypatch.setattr(km, "_parents_torch", counted)
    coords = random_coords(500, 2, 7, seed=8, shuffle=True)
    want = km.build(coords, 2, 2, method="mergesort")
    with _ext.torch_path():
        monkeypatch.setattr(_ext.core, "kmap_parents", None)  # (never called there)
        taken = [km.build(coords, 2, 2), km.get_kmap(ps.SparseTensor(torch.zeros(len(coords), 1), coords), 2, 2)]
        assert calls == [len(coords)] * 2
        searched = [km.build(coords, 2, 2, method="torch"), km.build(coords, 2, 2, out_coords=want.out_coords),
                    km.build(coords, 3, 2), km.build(coords, 2, 1)]
        assert calls == [len(coords)] * 2
    for kmap in taken + searched[:2]:
        assert torch.equal(kmap.in_idx, want.in_idx) and torch.equal(kmap.out_idx, want.out_idx)


def test_the_torch_parents_map_of_no_rows_is_no_view_of_its_coords():
    """``_parents_torch`` gave no rows' out_coords as ``coords[:0]``, a view
    of its input: the ``kmap_parents`` operator (whose real implementation it
    is on the torch backend) may not return one, a RuntimeError where the
    core and the search before it made fresh coords."""
    from pointsparse import ops  # noqa: PLC0415

    empty = torch.zeros(0, 4, dtype=torch.int32)
    key = ops.key_to_list(km.KernelMapKey((1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 1, 1)))
    with _ext.torch_path():
        parents, in_idx, out_idx, sizes = ops.kmap_parents(empty, key, False)
        kmap = km.build(empty, 2, 2)
    assert parents.shape == (0, 4) and parents.dtype == torch.int32
    assert in_idx.shape == out_idx.shape == (0,) and sizes.tolist() == [0] * 8
    assert kmap.out_coords.shape == (0, 4) and kmap.out_coords._base is None


@pytest.mark.parametrize("k,t", [(3, 1), (2, 2), (3, 2)])
def test_a_cache_of_unchecked_coords_refuses_duplicates_on_the_torch_path_as_the_core(k, t):
    """A tensor made with ``validate=False`` (the exported programs' inputs,
    a user's) reaches its cache's maps unchecked: duplicate rows, and for a
    k2 s2 map coords off their stride, are a ValueError on the torch path (a
    GPU's) as on the core; the torch path gave wrong pairs silently."""
    twice = torch.tensor([[0, 0, 0, 0], [0, 2, 2, 2], [0, 0, 0, 0]], dtype=torch.int32)
    for backend in ("core", "torch"):
        with ps.backend(backend), pytest.raises(ValueError, match="duplicate rows"):
            km.get_kmap(ps.SparseTensor(torch.zeros(3, 1), twice, validate=False), k, t)
    off = torch.tensor([[0, 0, 0, 0], [0, 2, 2, 3]], dtype=torch.int32)
    for backend in ("core", "torch"):
        with ps.backend(backend), pytest.raises(ValueError, match="multiple"):
            km.get_kmap(ps.SparseTensor(torch.zeros(2, 1), off, 2, validate=False), 2, 2)


@pytest.mark.parametrize("k,t", [(3, 1), (2, 2), (3, 2)])
def test_a_negative_batch_is_named_by_the_input_row_on_every_backend(k, t):
    """The torch path named a downsampling's negative batch index by the
    downsampled row ([-1, 0, 0, 0] for the input's [-1, 1, 1, 1]); now by the
    input row, as the core does."""
    coords = torch.tensor([[0, 0, 0, 0], [-1, 1, 1, 1]], dtype=torch.int32)
    for backend in ("core", "torch"):
        with ps.backend(backend), pytest.raises(ValueError, match=r"^coords row 1 = \[-1, 1, 1, 1\] has a negative "
                                                                  r"batch index"):
            km.build(coords, k, t)


def test_star_import_gives_the_public_names_not_the_module_imports():
    """API.md's ``pointsparse.kmap.build`` and ``KernelMap``: the module had
    no ``__all__``, so ``from pointsparse.kmap import *`` also brought in
    ``torch``, ``itertools``, ``dataclass``, ``field``, ``SparseTensor``,
    ``as_int``... over the user's names."""
    names: dict = {}
    exec("from pointsparse.kmap import *", names)
    assert {"build", "KernelMap", "KernelMapKey", "get_kmap", "kernel_offsets"} <= set(names)
    assert not {"torch", "itertools", "dataclass", "field", "annotations", "SparseTensor", "as_int",
                "as_triple", "Triple"} & set(names)
    assert all(hasattr(km, name) for name in km.__all__)


def test_kernel_maps_refuse_sparse_layout_and_meta_coords_naming_them():
    """kmap.build (and the coords it packs) took a torch sparse tensor or a
    meta tensor as coords: torch's "unsupported memory format option
    Contiguous", "Cannot copy out of meta tensor; no data!" or
    "Tensor.item() cannot be called on meta tensors"."""
    from pointsparse import coords as C

    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 2, 2, 2]], dtype=torch.int32)
    for stride in (1, 2):
        with pytest.raises(TypeError, match=r"coords must be a dense \(strided\) tensor; got .*sparse"):
            km.build(coords.to_sparse(), 3, stride)
        with pytest.raises(ValueError, match="coords is a meta tensor"):
            km.build(coords.to("meta"), 3, stride)
    with pytest.raises(ValueError, match="coords is a meta tensor"):
        C.pack(coords.to("meta"))
    with pytest.raises(ValueError, match="out_coords is a meta tensor"):
        km.build(coords, 2, 2, out_coords=coords.to("meta"))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_downsample_coords_checks_its_arguments_alike_on_both_paths(backend):
    """kmap.downsample_coords checked nothing itself: an int stride was
    "'int' object is not iterable" on the core's path (and worked on the
    torch path), stride 0 a bare ZeroDivisionError on the torch path,
    int64 coords were taken by the core and refused by torch, 3 columns a
    bare size mismatch, meta coords "Tensor.item() cannot be called on meta
    tensors"."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 2, 2, 2], [1, -3, 5, 2]], dtype=torch.int32)
    want = km.build(coords, 2, 2).out_coords
    with ps.backend(backend):
        assert torch.equal(km.downsample_coords(coords, 2), want)
        assert torch.equal(km.downsample_coords(coords, (2, 2, 2)), want)
        assert torch.equal(km.downsample_coords(coords, np.array([2, 2, 2])), want)
        with pytest.raises(ValueError, match="out_stride must be >= 1 on every axis"):
            km.downsample_coords(coords, (0, 2, 2))
        with pytest.raises(ValueError, match=r"out_stride must be in \[1, 2147483647\]"):
            km.downsample_coords(coords, (2**31, 1, 1))
        with pytest.raises(TypeError, match="out_stride must be an int or a 3-tuple"):
            km.downsample_coords(coords, 2.0)
        with pytest.raises(TypeError, match="coords must be int32"):
            km.downsample_coords(coords.long(), 2)
        with pytest.raises(ValueError, match=r"coords must be \(N, 4\)"):
            km.downsample_coords(coords[:, :3], 2)
        with pytest.raises(ValueError, match="coords is a meta tensor"):
            km.downsample_coords(coords.to("meta"), 2)


def _k2s2_operator_map():
    from pointsparse import ops

    key = ops.key_to_list(km.KernelMapKey((1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 1, 1)))
    fine = random_coords(200, 2, 6, seed=11, shuffle=True)
    return fine, key, ops.kmap_parents(fine, key)


def test_the_kmap_transpose_operator_checks_the_map_it_is_given():
    """``torch.ops.pointsparse.kmap_transpose`` (a program's operator) took
    any pairs: fine coords of another count and pair rows outside either
    side were transposed silently, sizes of another count or sum were a bare
    RuntimeError / IndexError from inside torch; a ValueError naming the
    argument."""
    from pointsparse import ops

    fine, key, (coarse, in_idx, out_idx, sizes) = _k2s2_operator_map()
    up_in, up_out = ops.kmap_transpose(coarse, fine, in_idx, out_idx, sizes, key)
    assert torch.equal(up_in, km.build(fine, 2, 2).transpose(fine).in_idx)
    bad_sizes = sizes.clone()
    bad_sizes[0] += 1
    cases = [((coarse, fine[:-3], in_idx, out_idx, sizes), "in_idx"),
             ((coarse, fine, in_idx + len(fine), out_idx, sizes), "in_idx"),
             ((coarse, fine, in_idx - 1000, out_idx, sizes), "in_idx"),
             ((coarse[:-2], fine, in_idx, out_idx, sizes), "out_idx"),
             ((coarse, fine, in_idx, out_idx, sizes[:-1]), "sizes"),
             ((coarse, fine, in_idx, out_idx, bad_sizes), "sizes"),
             ((coarse, fine, in_idx, out_idx[:-1], sizes), "out_idx"),
             ((coarse, fine, in_idx.float(), out_idx, sizes), "in_idx")]
    for args, word in cases:
        with pytest.raises((ValueError, TypeError), match=word):
            ops.kmap_transpose(*args, key)


def test_the_kmap_transpose_operator_names_its_fine_coords():
    """``torch.ops.pointsparse.kmap_transpose`` refused fine coords that are
    not the coords of the map's inputs (or not (N, 4) int32) with
    ``KernelMap.transpose``'s message, naming ``out_coords``: an argument
    the operator does not have (a program's user reads the operator's
    schema). Its errors name ``fine_coords`` now, trusted or not (the shape
    and dtype checks run either way); ``KernelMap.transpose`` itself still
    names its own ``out_coords``."""
    from pointsparse import ops

    fine, key, (coarse, in_idx, out_idx, sizes) = _k2s2_operator_map()
    shift = torch.tensor([0, 0, 0, 2], dtype=torch.int32)
    for op in (ops.kmap_transpose, torch.ops.pointsparse.kmap_transpose):
        for bad in (fine.flip(0), fine + shift, torch.cat([fine[:, :1] + 1, fine[:, 1:]], 1)):
            with pytest.raises(ValueError, match=r"^fine_coords must be the coords of the map's inputs .*: row \d+ "
                                                 r"is \[.*\] but its pair with output row \d+ .* puts it at \["):
                op(coarse, bad, in_idx, out_idx, sizes, key)
        for trusted in (False, True):
            for bad, err, what in ((fine.long(), TypeError, "must be int32"),
                                   (fine[:, :3], ValueError, r"must be \(N, 4\)")):
                with pytest.raises(err, match=f"^fine_coords {what}"):
                    op(coarse, bad, in_idx, out_idx, sizes, key, trusted)
    down = km.build(fine, 2, 2)
    with pytest.raises(ValueError, match=r"^out_coords must be the coords of the map's inputs"):
        down.transpose(fine.flip(0))
    with pytest.raises(TypeError, match="^out_coords must be int32"):
        down.transpose(fine.long())


def test_the_kmap_transpose_operator_checks_its_coarse_coords_trusted_or_not():
    """``torch.ops.pointsparse.kmap_transpose`` never checked
    ``coarse_coords``: float or (M, 3) coarse coords were a bare
    RuntimeError from inside torch ("result type Float can't be cast ...",
    "The size of tensor a (4) must match ...") and went through silently
    with ``trusted=True``, as did pairs of a float dtype, a second dimension
    or another length (later a bare IndexError / NotImplementedError). The
    dtype and shape checks (no host read) now run trusted or not, naming
    the operator's argument."""
    from pointsparse import ops

    fine, key, (coarse, in_idx, out_idx, sizes) = _k2s2_operator_map()
    for op in (ops.kmap_transpose, torch.ops.pointsparse.kmap_transpose):
        for trusted in (False, True):
            for bad, err, what in ((coarse.float(), TypeError, "must be int32"),
                                   (coarse.long(), TypeError, "must be int32"),
                                   (coarse[:, :3], ValueError, r"must be \(N, 4\)"),
                                   (coarse[:, 0], ValueError, r"must be \(N, 4\)")):
                with pytest.raises(err, match=f"^coarse_coords {what}"):
                    op(bad, fine, in_idx, out_idx, sizes, key, trusted)
            for args, err, word in (((in_idx.float(), out_idx, sizes), TypeError, "in_idx"),
                                    ((in_idx, out_idx.float(), sizes), TypeError, "out_idx"),
                                    ((in_idx, out_idx, sizes.float()), TypeError, "sizes"),
                                    ((in_idx[None], out_idx, sizes), ValueError, "in_idx"),
                                    ((in_idx, out_idx, sizes[None]), ValueError, "sizes"),
                                    ((in_idx, out_idx[:-1], sizes), ValueError, "out_idx"),
                                    ((in_idx, out_idx, sizes[:-1]), ValueError, "sizes")):
                with pytest.raises(err, match=f"^{word}"):
                    op(coarse, fine, *args, key, trusted)
            up_in, up_out = op(coarse, fine, in_idx, out_idx, sizes, key, trusted)
            assert torch.equal(up_in, km.build(fine, 2, 2).transpose(fine).in_idx)


def test_the_kmap_restrict_operator_checks_and_names_its_arguments():
    """``torch.ops.pointsparse.kmap_restrict`` took ``in_coords`` and
    ``out_coords`` unchecked (float, (N, 3) or 1-D went through silently),
    pairs of a float dtype silently too (the core cast them), a 2-D
    ``sizes`` as a TypeError from int(), and named its ``kept_coords``
    ``out_coords`` (KernelMap.restricted's argument, not the operator's).
    Each is a TypeError / ValueError naming the operator's argument."""
    from pointsparse import ops

    fine, key, (coarse, in_idx, out_idx, sizes) = _k2s2_operator_map()
    rows = torch.tensor([0, 2, 5])
    kept = coarse[rows]
    want = km.build(fine, 2, 2, out_coords=coarse).restricted(rows, kept)
    for op in (ops.kmap_restrict, torch.ops.pointsparse.kmap_restrict):
        got = op(fine, coarse, in_idx, out_idx, sizes, key, rows, kept)
        assert all(torch.equal(a, b) for a, b in zip(got, (want.in_idx, want.out_idx, want.sizes)))
        args = dict(in_coords=fine, out_coords=coarse, in_idx=in_idx, out_idx=out_idx, sizes=sizes, rows=rows,
                    kept_coords=kept)
        for name in ("in_coords", "out_coords", "kept_coords"):
            c = args[name]
            for bad, err, what in ((c.float(), TypeError, "must be int32"), (c.long(), TypeError, "must be int32"),
                                   (c[:, :3], ValueError, r"must be \(N, 4\)"),
                                   (c[:, 0], ValueError, r"must be \(N, 4\)")):
                with pytest.raises(err, match=f"^{name} {what}"):
                    op(**{**args, name: bad}, key=key)
        for name, bad, err in (("in_idx", in_idx.float(), TypeError), ("out_idx", out_idx.float(), TypeError),
                               ("sizes", sizes.float(), TypeError), ("in_idx", in_idx[None], ValueError),
                               ("sizes", sizes[None], ValueError), ("out_idx", out_idx[:-1], ValueError),
                               ("sizes", sizes[:-1], ValueError)):
            with pytest.raises(err, match=f"^{name}"):
                op(**{**args, name: bad}, key=key)
        with pytest.raises(ValueError, match="^kept_coords must be the 3 kept rows' coords"):
            op(**{**args, "kept_coords": kept[:2]}, key=key)
    down = km.build(fine, 2, 2, out_coords=coarse)
    with pytest.raises(TypeError, match="^out_coords must be int32"):  # the method still names its own argument
        down.restricted(rows, kept.float())


def test_the_map_building_operators_check_their_coords_when_trusted_too():
    """``kmap_build`` / ``kmap_parents`` with ``trusted=True`` (a program's
    user may pass it) skipped the coords check: float or int64 coords
    built a map silently. The dtype and shape check (no host read) runs
    either way; only the checks of the values are skipped."""
    from pointsparse import ops

    fine, key, _ = _k2s2_operator_map()
    sub = ops.key_to_list(km.KernelMapKey((1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 1, 1)))
    calls = [lambda c, t: torch.ops.pointsparse.kmap_build(c, None, sub, t),
             lambda c, t: torch.ops.pointsparse.kmap_build(c, None, key, t),
             lambda c, t: torch.ops.pointsparse.kmap_parents(c, key, t)]
    for call in calls:
        for trusted in (False, True):
            for bad, err, what in ((fine.float(), TypeError, "must be int32"), (fine.long(), TypeError, "must be int32"),
                                   (fine[:, :3], ValueError, r"must be \(N, 4\)")):
                with pytest.raises(err, match=f"^coords {what}"):
                    call(bad, trusted)
            call(fine, trusted)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_conv_operators_check_a_given_map_on_the_torch_loop_too(dtype):
    """The conv operators' torch loop (CPU float16; the fused engine's path
    checks in its plan) took a hand-given map as it came: pair rows past
    either side were a bare IndexError / RuntimeError from inside torch, and
    negative ones inside [-N, 0) indexed from the end, a silent wrong sum.
    On the CPU every path now names the argument (ValueError)."""
    from pointsparse import ops

    coords = random_coords(60, 1, 6, seed=3)
    x = ps.SparseTensor(torch.randn(len(coords), 4, dtype=dtype), coords)
    m = km.get_kmap(x, 3)
    key = ops.key_to_list(m.key)
    w = torch.randn(m.kernel_volume, 4, 5, dtype=dtype)
    g = torch.randn(len(coords), 5, dtype=dtype)
    n = len(coords)
    want = ops.conv(x.feats, w, None, coords, m.in_idx, m.out_idx, m.sizes, key)
    from pointsparse.nn.reference import conv_sum

    torch.testing.assert_close(want, conv_sum(x.feats.double(), w.double(), m).to(dtype), rtol=1e-2, atol=1e-2)
    shifted = m.in_idx.clone()
    shifted[m.in_idx == 0] = -1  # a valid negative index: torch would read the last row
    cases = [(m.in_idx + n, m.out_idx, "in_idx"), (shifted, m.out_idx, "in_idx"),
             (m.in_idx, m.out_idx + n, "out_idx"), (m.in_idx, m.out_idx - n, "out_idx")]
    for in_idx, out_idx, word in cases:
        with pytest.raises(ValueError, match=word):
            ops.conv(x.feats, w, None, coords, in_idx, out_idx, m.sizes, key)
        with pytest.raises(ValueError, match=word):
            ops.conv_input_grad(g, w, coords, in_idx, out_idx, m.sizes, key, n)
        with pytest.raises(ValueError, match=word):
            ops.conv_weight_grad(x.feats, g, coords, in_idx, out_idx, m.sizes, key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_conv_operators_check_their_tensors_dtypes_and_shapes(dtype):
    """The conv operators (a program's ``torch.ops.pointsparse.conv`` ...)
    took their tensors as they came: on the torch loop (CPU float16) int
    feats, weight or grad, a 2-D weight, a short weight, bias or grad, or a
    weight of another dtype were a bare RuntimeError / IndexError from
    inside torch; on every path float coords, a float sizes and a
    mismatched or 2-D bias went through silently, and a 2-D sizes was a
    TypeError from int(). Each is a TypeError (dtype) / ValueError (shape)
    naming the operator's argument, on every path (no host read)."""
    from pointsparse import ops

    def named(name):  # (two tensors of different dtypes: either may be named, the other as the one it differs from)
        return rf"^{name}\b|differs from {name}'s"

    coords = random_coords(60, 1, 6, seed=3)
    x = ps.SparseTensor(torch.randn(len(coords), 4, dtype=dtype), coords)
    m = km.get_kmap(x, 3)
    key, n = ops.key_to_list(m.key), len(coords)
    f, w, b = x.feats, torch.randn(m.kernel_volume, 4, 5, dtype=dtype), torch.randn(5, dtype=dtype)
    g, add = torch.randn(n, 5, dtype=dtype), torch.randn(n, 5, dtype=dtype)
    good = dict(feats=f, weight=w, bias=b, out_coords=coords, in_idx=m.in_idx, out_idx=m.out_idx, sizes=m.sizes)
    other = torch.float64 if dtype != torch.float64 else torch.float32
    shared = [("out_coords", coords.float(), TypeError), ("out_coords", coords[:, :3], ValueError),
              ("in_idx", m.in_idx.float(), TypeError), ("sizes", m.sizes.float(), TypeError),
              ("sizes", m.sizes[None], ValueError), ("out_idx", m.out_idx[:-1], ValueError),
              ("weight", w.long(), TypeError), ("weight", w[0], ValueError), ("weight", w[:5], ValueError),
              ("weight", w.to(other), TypeError)]
    forward = shared + [("feats", f.long(), TypeError), ("feats", f[:, 0], ValueError),
                        ("bias", b.long(), TypeError), ("bias", b.to(other), TypeError),
                        ("bias", b[:3], ValueError), ("bias", b[None], ValueError)]
    for name, bad, err in forward:
        args = {**good, name: bad}
        with pytest.raises(err, match=named(name)):
            ops.conv(**args, key=key)
        with pytest.raises(err, match=named(name)):
            torch.ops.pointsparse.conv_inference(**args, key=key, add=None, relu=False)
    with pytest.raises(ValueError, match=r"^weight must be \(K, C_in, C_out\) = \(27, 3, C_out\)"):
        ops.conv(**{**good, "feats": f[:, :3]}, key=key)  # (the feats' channels: the weight's C_in is named)
    for name, bad, err in [("add", add.long(), TypeError), ("add", add[:3], ValueError), ("add", add[:, 0], ValueError),
                           ("add", add[:, :3], ValueError)]:
        with pytest.raises(err, match=named(name)):
            torch.ops.pointsparse.conv_inference(**good, key=key, add=bad, relu=True)
    pairs = dict(out_coords=coords, in_idx=m.in_idx, out_idx=m.out_idx, sizes=m.sizes)
    grads = [("grad", g.long(), TypeError), ("grad", g[:, 0], ValueError), ("grad", g[:10], ValueError),
             ("grad", g.to(other), TypeError)]
    with pytest.raises(ValueError, match=r"^weight must be \(K, C_in, C_out\) = \(27, C_in, 3\)"):
        torch.ops.pointsparse.conv_input_grad(g[:, :3], w, *pairs.values(), key, n)  # (the weight's C_out named)
    for name, bad, err in shared + grads:
        args = {"grad": g, "weight": w, **pairs, name: bad}
        with pytest.raises(err, match=named(name)):
            torch.ops.pointsparse.conv_input_grad(**args, key=key, num_in=n)
    with pytest.raises(ValueError, match="^num_in"):
        torch.ops.pointsparse.conv_input_grad(g, w, *pairs.values(), key, -1)
    weight_grad = [(k, v, e) for k, v, e in shared if k != "weight"] + grads + [
        ("feats", f.long(), TypeError), ("feats", f[:, 0], ValueError)]
    for name, bad, err in weight_grad:
        args = {"feats": f, "grad": g, **pairs, name: bad}
        with pytest.raises(err, match=named(name)):
            torch.ops.pointsparse.conv_weight_grad(**args, key=key)
    from pointsparse.nn.reference import conv_sum

    want = conv_sum(f.double(), w.double(), m).to(dtype) + b
    torch.testing.assert_close(torch.ops.pointsparse.conv(**good, key=key), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch.ops.pointsparse.conv_inference(**good, key=key, add=add.double(), relu=False),
                               want.double() + add.double(), rtol=1e-2, atol=1e-2)


def test_the_conv_operator_follows_a_new_sizes_tensor_for_the_same_pairs():
    """The conv operator's plan cache is keyed by the pair tensors; given the
    same ``in_idx`` / ``out_idx`` with another ``sizes`` (the pairs split
    among the offsets otherwise) it ran the first call's plan: the second
    call's sum silently over the old split."""
    from pointsparse import ops
    from pointsparse.nn.reference import conv_sum

    coords = random_coords(80, 1, 6, seed=5)
    x = ps.SparseTensor(torch.randn(len(coords), 3, dtype=torch.float64), coords)
    m = km.get_kmap(x, 3)
    key = ops.key_to_list(m.key)
    w = torch.randn(m.kernel_volume, 3, 2, dtype=torch.float64)
    first = ops.conv(x.feats, w, None, coords, m.in_idx, m.out_idx, m.sizes, key)
    torch.testing.assert_close(first, conv_sum(x.feats, w, m))
    moved = m.sizes.clone()  # the first offset's pairs given to the second
    moved[1] += moved[0]
    moved[0] = 0
    other = ops._as_kmap(coords, m.in_idx, m.out_idx, moved, key, m.num_in)
    got = ops.conv(x.feats, w, None, coords, m.in_idx, m.out_idx, moved, key)
    torch.testing.assert_close(got, conv_sum(x.feats, w, other))


def test_the_kmap_parents_operator_names_a_key_without_a_stride():
    """``kmap_parents`` of a stride-1 key (no parents: a submanifold map's
    outputs are its inputs) returned the input coords as its output, which
    torch refused from inside its custom-operator machinery ("must not also
    be an input"); a ValueError naming the key."""
    from pointsparse import ops

    fine, _, _ = _k2s2_operator_map()
    for k in (1, 3):
        key = ops.key_to_list(km.KernelMapKey((1, 1, 1), (k, k, k), (1, 1, 1), (1, 1, 1)))
        with pytest.raises(ValueError, match="key"):
            ops.kmap_parents(fine, key)


def test_the_map_building_operators_refuse_a_transposed_key():
    """``kmap_build`` / ``kmap_parents`` build the map down from ``coords``;
    a key marked transposed (its 13th int 1) built that same down map
    silently, though the key named the adjoint; a ValueError naming the key
    (``kmap_transpose`` makes the transposed pairs)."""
    from pointsparse import ops

    fine, _, _ = _k2s2_operator_map()
    for k, t in ((3, 1), (2, 2)):
        key = ops.key_to_list(km.KernelMapKey((1, 1, 1), (k, k, k), (t, t, t), (1, 1, 1), True))
        with pytest.raises(ValueError, match="transposed"):
            ops.kmap_build(fine, None, key)
        if t > 1:
            with pytest.raises(ValueError, match="transposed"):
                ops.kmap_parents(fine, key)


def test_the_voxel_rows_operator_names_point_coords():
    """``torch.ops.pointsparse.voxel_rows`` (a program's operator) given
    point coords of 3 columns was a bare RuntimeError (a size mismatch from
    inside torch.cat) and float point coords a TypeError naming "coords";
    both now name point_coords."""
    from pointsparse import ops

    coords = torch.tensor([[0, 0, 0, 0], [0, 2, 2, 2]], dtype=torch.int32)
    points = torch.tensor([[0, 1, 1, 1], [0, 3, 2, 2]], dtype=torch.int32)
    assert ops.voxel_rows(coords, [2, 2, 2], points).tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"point_coords must be \(N, 4\).*\(2, 3\)"):
        ops.voxel_rows(coords, [2, 2, 2], points[:, 1:])
    with pytest.raises(TypeError, match="point_coords must be int32"):
        ops.voxel_rows(coords, [2, 2, 2], points.float())


def test_the_batch_counts_operator_checks_its_coords():
    """``torch.ops.pointsparse.batch_counts`` (a program's operator) took its
    coords unchecked: float or (N, 3) coords counted silently, 1-D ones
    were a bare IndexError, a negative batch index a bare RuntimeError from
    bincount. A TypeError / ValueError naming coords (the negative batch
    read with the largest one: no extra host read)."""
    coords = torch.tensor([[0, 0, 0, 0], [2, 1, 1, 1], [2, 2, 2, 2]], dtype=torch.int32)
    assert torch.ops.pointsparse.batch_counts(coords, 4, 4).tolist() == [1, 0, 2]
    assert torch.ops.pointsparse.batch_counts(coords[:0], 4, 4).tolist() == []
    for bad, err, what in ((coords.float(), TypeError, "must be int32"), (coords.long(), TypeError, "must be int32"),
                           (coords[:, :3], ValueError, r"must be \(N, 4\)"),
                           (coords[:, 0], ValueError, r"must be \(N, 4\)")):
        with pytest.raises(err, match=f"^coords {what}"):
            torch.ops.pointsparse.batch_counts(bad, 4, 4)
    with pytest.raises(ValueError, match=r"^coords hold a negative batch index \(-1\)"):
        torch.ops.pointsparse.batch_counts(coords - torch.tensor([1, 0, 0, 0], dtype=torch.int32), 4, 4)
    # the size limit's factors: a negative channels or element_size made any batch index pass it
    for channels, element_size, name in ((-1, 4, "channels"), (4, 0, "element_size"), (4, -2, "element_size")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            torch.ops.pointsparse.batch_counts(coords, channels, element_size)
    assert torch.ops.pointsparse.batch_counts(coords, 0, 4).tolist() == [1, 0, 2]  # (no channels: still counts)


def test_get_kmap_checks_its_method_on_a_cache_hit():
    """get_kmap(tensor, 3, method="bogus") (or method=5) after the map was
    built returned the cached map without a word, where the first call
    would have refused it: a benchmark of get_kmap naming a method it
    misspelt timed cache hits. The method is checked before the cache is
    read now, downsampling and transposed maps alike."""
    coords = random_coords(300, 1, 6, seed=5)
    tensor = ps.SparseTensor(torch.randn(len(coords), 2), coords)
    km.get_kmap(tensor, 3)
    km.get_kmap(tensor, 2, 2)
    down = ps.SparseTensor(torch.randn(km.get_kmap(tensor, 2, 2).num_out, 2),
                           km.get_kmap(tensor, 2, 2).out_coords, 2, cache=tensor.cache, validate=False)
    km.get_kmap(down, 2, 2, transposed=True)
    for bad in ("bogus", "Hash", 5):
        for layer, args in ((tensor, (3,)), (tensor, (2, 2)), (down, (2, 2, 1, True))):
            with pytest.raises(ValueError, match=r"method must be one of \('mergesort', 'hash', 'torch'\)"):
                km.get_kmap(layer, *args, method=bad)
    for m in km.METHODS:
        assert km.get_kmap(tensor, 3, method=m) is km.get_kmap(tensor, 3)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.uint8])
def test_operators_refuse_pairs_of_a_narrow_integer_dtype(dtype):
    """The operators' pair check took any integer dtype, but torch indexes
    by int64 / int32 only: the conv operators' torch loop gave int16 pairs
    a bare IndexError and read uint8 pairs as a boolean mask (a bare
    IndexError, or the rows where the value is non-zero where the lengths
    match). A TypeError naming the argument, on every path and trusted or
    not, as a float one; int32 pairs still run."""
    from pointsparse import ops

    g = torch.Generator().manual_seed(0)
    x, _ = ps.voxelize(torch.rand(60, 3, generator=g) * 4, voxel_size=1.0)
    coords = x.coords
    key = ops.key_to_list(km.KernelMapKey((1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 1, 1)))
    in_idx, out_idx, sizes = ops.kmap_build(coords, None, key)
    feats, weight = torch.randn(len(coords), 2, dtype=torch.float64), torch.randn(27, 2, 3, dtype=torch.float64)
    grad = torch.randn(len(coords), 3, dtype=torch.float64)
    calls = {"conv": lambda i, o, s: ops.conv(feats, weight, None, coords, i, o, s, key),
             "conv_inference": lambda i, o, s: ops.conv_inference(feats, weight, None, coords, i, o, s, key, None,
                                                                  False),
             "conv_input_grad": lambda i, o, s: ops.conv_input_grad(grad, weight, coords, i, o, s, key, len(coords)),
             "conv_weight_grad": lambda i, o, s: ops.conv_weight_grad(feats, grad, coords, i, o, s, key),
             "kmap_transpose": lambda i, o, s: ops.kmap_transpose(coords, coords, i, o, s, key, True),
             "kmap_restrict": lambda i, o, s: ops.kmap_restrict(coords, coords, i, o, s, key,
                                                                torch.arange(3), coords[:3])}
    for backend in ("auto", "torch"):
        with ps.backend(backend):
            for name, call in calls.items():
                for which, word in ((0, "in_idx"), (1, "out_idx"), (2, "sizes")):
                    args = [in_idx, out_idx, sizes]
                    args[which] = args[which].to(dtype)
                    with pytest.raises(TypeError, match=f"^{word} must be an int64 .*got {dtype}"):
                        call(*args)
                call(in_idx.int(), out_idx.int(), sizes.int())


# Sizes whose running sum wrapped int64 back to the pairs' count: the check
# of their sum passed and the core walked each offset's 2^62 "pairs" far past
# the arrays (SIGSEGV). Each call in a child process, which a crash would kill.
RESTRICT_WRAPPING_SIZES = {
    "four_2_62_no_pairs": "core.kmap_restrict(e, e, np.array([2**62] * 4), np.array([0]), 2)",
    "max_max_and_three_pairs": "core.kmap_restrict(p, p, np.array([2**63 - 1, 2**63 - 1, 5]), np.array([0, -1, 1]), 2)",
    "first_past_the_pairs": "core.kmap_restrict(p, p, np.array([4, 2**64 - 1 - 2**63]), np.array([0, -1, 1]), 2)",
}


def test_kmap_restrict_refuses_sizes_whose_sum_wraps():
    from reference import CORE_ONLY, run_in_children

    setup = CORE_ONLY + "import numpy as np\ne = np.zeros(0, np.int64)\np = np.arange(3, dtype=np.int64)\n"
    results = run_in_children(RESTRICT_WRAPPING_SIZES, setup=setup)
    for name in RESTRICT_WRAPPING_SIZES:
        r = results[name]
        assert r["status"] == 0, f"{name}: the process crashed (status {r['status']})"
        assert r["exc"] == "ValueError" and "sizes" in r["msg"], (name, r)


@pytest.mark.parametrize("method", METHODS)
def test_build_takes_api_md_positional_order_and_pairs_are_int64(method):
    """API.md's ``build(coords, kernel_size=3, stride=1, dilation=1,
    tensor_stride=1, method=...)`` called positionally, and its promise per
    method: ``.out_coords`` int32 ``(M, 4)``, ``.pairs(o)`` a pair of int64
    tensors for every offset, each pair ``coords[in] - out_coords[out]`` =
    the offset ``(i - (k - 1) // 2) * d * s`` of index ``(i_x * k_y + i_y) * k_z + i_z``."""
    coords = random_coords(200, 2, 4, (2, 1, 2), seed=11)
    k, t, d, s = (3, 2, 1), (2, 1, 1), (1, 2, 1), (2, 1, 2)
    kmap = km.build(coords, k, t, d, s, method)
    assert torch.equal(kmap.in_idx, km.build(coords, kernel_size=k, stride=t, dilation=d, tensor_stride=s,
                                             method=method).in_idx)
    assert_matches_reference(kmap, coords, k, t, d, s)
    assert kmap.out_coords.dtype == torch.int32 and kmap.out_coords.shape[1] == 4
    for ix, iy, iz in itertools.product(range(k[0]), range(k[1]), range(k[2])):
        o = (ix * k[1] + iy) * k[2] + iz
        offset = [(i - (kk - 1) // 2) * dd * ss for i, kk, dd, ss in zip((ix, iy, iz), k, d, s)]
        i, j = kmap.pairs(o)
        assert i.dtype == j.dtype == torch.int64
        assert torch.equal(coords[i, 0], kmap.out_coords[j, 0])
        expected = torch.tensor([offset], dtype=torch.int32).expand(len(i), 3)
        assert torch.equal(coords[i, 1:] - kmap.out_coords[j, 1:], expected)
    default = km.build(coords)  # kernel 3, stride 1, dilation 1, tensor stride 1
    assert default.kernel_volume == 27 and torch.equal(default.out_coords, coords)


@pytest.mark.parametrize("device, error", [("banana", ValueError), (None, TypeError), (1.5, TypeError)])
def test_a_kernel_map_to_what_is_no_device_is_named(device, error):
    """torch's bare RuntimeError ("Expected one of cpu, cuda, ...") before;
    SparseTensor.to named it already."""
    kmap = km.build(torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32), 3)
    with pytest.raises(error, match="device must be a torch.device or a device name"):
        kmap.to(device)
    assert kmap.to("cpu").num_pairs == kmap.num_pairs


@pytest.mark.parametrize("method", ["mergesort", "hash", "torch"])
def test_a_strided_maps_key_refusal_says_its_spans_hold_the_outputs_too(method):
    """Inputs whose own spans fit the 63 key bits (x all of int32, y 31
    bits, z all 1) and whose floored outputs (z 0) do not fit with them: the
    refusal named a z span of [0, 1] for inputs whose z were all 1 (a
    kernel-map review). It says the spans are of inputs and outputs."""
    coords = torch.tensor([[0, -2**31, 0, 1], [0, 2**31 - 1, 2**31 - 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"z \[0, 1\] .*input coords and its output coords together"):
        km.build(coords, kernel_size=2, stride=2, method=method)


def test_the_default_builds_the_tiling_map_the_named_methods_refuse_for_its_spans():
    """build()'s docstring: the default method's map of a kernel tiling its
    stride packs no keys, so coords the named methods refuse (spans past
    the 63 key bits) get their map; it pairs each row with its parent."""
    coords = torch.tensor([[0, -2**31, 0, 1], [0, 2**31 - 1, 2**31 - 1, 1]], dtype=torch.int32)
    kmap = km.build(coords, kernel_size=2, stride=2)
    assert kmap.out_coords.tolist() == [[0, -2**31, 0, 0], [0, 2**31 - 2, 2**31 - 2, 0]]
    pairs = sorted(zip(kmap.in_idx.tolist(), kmap.out_idx.tolist()))
    assert pairs == [(0, 0), (1, 1)]
    # each row at its place in the parent: offset (x, y, z) = (0, 0, 1) and (1, 1, 1) of the 2x2x2 kernel
    offsets = torch.repeat_interleave(torch.arange(8), kmap.sizes)
    assert sorted(zip(kmap.in_idx.tolist(), offsets.tolist())) == [(0, 1), (1, 7)]
