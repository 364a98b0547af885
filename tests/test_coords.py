"""Exact 64-bit coordinate keys in layouts fitted to the coordinates: C++
and torch agree with the arithmetic definition, round-trip, sort
lexicographically, fit any int32 set whose span fits 63 bits, and refuse
what they cannot represent with the span or row named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointsparse import _ext
from pointsparse import coords as C
from reference import CORE_ONLY, INT32_MAX, INT32_MIN, pack_ref, run_in_children, run_python

# (batch range, x, y, z range): clouds anywhere in int32, and large batches.
REGIMES = {
    "small": ((0, 4095), (-65536, 65535), (-65536, 65535), (-65536, 65535)),
    "x_100000": ((0, 3), (100000, 100300), (-50, 50), (0, 40)),
    "int32_min": ((0, 7), (INT32_MIN, INT32_MIN + 200), (INT32_MIN, INT32_MIN + 9), (-3, 3)),
    "int32_max": ((0, 7), (INT32_MAX - 200, INT32_MAX), (INT32_MAX - 9, INT32_MAX), (INT32_MAX - 1, INT32_MAX)),
    "both_edges": ((0, 1), (INT32_MIN, INT32_MAX), (-5, 5), (0, 3)),
    "big_batch": ((2**31 - 100, INT32_MAX), (-1000, 1000), (0, 10), (0, 10)),
}


def regime_coords(n: int, regime: str, seed: int = 0) -> torch.Tensor:
    """Random rows within the regime's ranges, both corners of the box included."""
    rng = np.random.default_rng(seed)
    ranges = REGIMES[regime]
    c = np.stack([rng.integers(lo, hi + 1, n) for lo, hi in ranges], 1).astype(np.int32)
    corners = np.array([[r[0] for r in ranges], [r[1] for r in ranges]], dtype=np.int32)
    return torch.from_numpy(np.concatenate([c, corners]))


def test_constants():
    assert (C.COORD_MIN, C.COORD_MAX, C.BATCH_MAX, C.KEY_BITS) == (INT32_MIN, INT32_MAX, INT32_MAX, 63)


FITS = [
    # lo, hi, margin -> origin, bits (batch, x, y, z)
    (([0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0]), ((0, 0, 0), (0, 0, 0, 0))),
    (([0, 5, -3, 7], [4095, 1004, 0, 7], [0, 0, 0]), ((5, -3, 7), (12, 10, 2, 0))),
    (([0, 5, -3, 7], [4095, 1004, 0, 7], [2, 1, 0]), ((3, -4, 7), (12, 10, 3, 0))),
    (([0, INT32_MIN, 0, 0], [0, INT32_MAX, 0, 0], [0, 0, 0]), ((INT32_MIN, 0, 0), (0, 32, 0, 0))),
    (([0, INT32_MIN, 0, 0], [0, INT32_MAX, 0, 0], [1, 1, 1]), ((INT32_MIN - 1, -1, -1), (0, 33, 2, 2))),
    # 63 bits exactly: the batch and a full int32 axis
    (([0, INT32_MIN, 9, 9], [INT32_MAX, INT32_MAX, 9, 9], [0, 0, 0]), ((INT32_MIN, 9, 9), (31, 32, 0, 0))),
    # a margin that does not fit is dropped
    (([0, INT32_MIN, 9, 9], [INT32_MAX, INT32_MAX, 9, 9], [1, 1, 1]), ((INT32_MIN, 9, 9), (31, 32, 0, 0))),
]


@pytest.mark.parametrize("args, want", FITS)
def test_layout_fit_python_equals_core(args, want):
    layout = C.KeyLayout.fit(*args)
    assert (layout.origin, layout.bits) == want
    assert _ext.core.fit_layout(*args) == [*want[0], *want[1]]


@pytest.mark.parametrize("make", [np.int64, np.int32, torch.tensor])
def test_layout_fit_takes_numpy_and_tensor_integers(make):
    args = FITS[2][0]
    layout = C.KeyLayout.fit(*[[make(v) for v in a] for a in args])
    assert (layout.origin, layout.bits) == FITS[2][1]
    assert all(type(v) is int for v in layout.origin + layout.bits)


@pytest.mark.parametrize("lo, hi, margin, name", [
    ([0, 1.5, 0, 0], [0, 5, 0, 0], [0, 0, 0], "lo"),  # int() made it 1
    ([0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0], "hi"),
    ([0, 0, 0, 0], [0, 5, 0, 0], [0, 0.5, 0], "margin"),  # int() made it 0
    ([0, 0, 0, 0], [True, 5, 0, 0], [0, 0, 0], "hi"),  # was batch index 1
    (np.array([0, 0, 0, 0.5]), [0, 5, 0, 0], [0, 0, 0], "lo"),
    ([0, 0, 0, 0], [0, 5, 0, 0], torch.tensor([1.0, 0, 0]), "margin"),
    ([0, 0, 0, 0], [0, "5", 0, 0], [0, 0, 0], "hi"),
])
def test_layout_fit_refuses_non_integers(lo, hi, margin, name):
    with pytest.raises(TypeError, match=rf"KeyLayout.fit: {name} must hold ints"):
        C.KeyLayout.fit(lo, hi, margin)


def test_layout_fit_refuses_a_wrong_count():
    for args, match in ((([0, 0, 0], [0, 5, 0, 0], [0, 0, 0]), "lo must be 4 ints"),
                        (([0, 0, 0, 0], [0, 5, 0, 0, 9], [0, 0, 0]), "hi must be 4 ints"),
                        (([0, 0, 0, 0], [0, 5, 0, 0], [0, 0]), "margin must be 3 ints")):
        with pytest.raises(ValueError, match=f"KeyLayout.fit: {match}"):  # was an IndexError, or ignored
            C.KeyLayout.fit(*args)


@pytest.mark.parametrize("lo, hi", [
    ([0, 5, 0, 0], [0, 0, 0, 0]),  # x from 5 to 0: a layout of x in [5, 12] (the bits of -5)
    ([0, 0, 0, 9], [0, 0, 0, -9]),
    ([2, 0, 0, 0], [1, 0, 0, 0]),  # batch from 2 to 1: the core's "no rows", a layout here
    ([0, -2**40, 0, 0], [0, 0, 0, 0]),  # an origin no int32 coordinate has
    ([0, 0, 0, 0], [0, 0, INT32_MAX + 1, 0]),
    ([0, 0, 0, 0], [INT32_MAX + 1, 0, 0, 0]),
])
def test_layout_fit_refuses_reversed_or_non_int32_bounds(lo, hi):
    """KeyLayout.fit made a layout of bounds the core's fit_layout refuses."""
    with pytest.raises(ValueError, match=r"KeyLayout.fit: lo and hi must be int32 bounds with lo <= hi"):
        C.KeyLayout.fit(lo, hi)
    if lo[0] <= hi[0]:  # (the core takes a reversed batch for no rows)
        with pytest.raises(ValueError, match="lo <= hi"):
            _ext.core.fit_layout(lo, hi, [0, 0, 0])


@pytest.mark.parametrize("lo, hi", [
    ([0, INT32_MIN, 0, 0], [INT32_MAX, INT32_MAX, 1, 0]),  # 31 + 32 + 1 = 64 bits
    ([0, INT32_MIN, INT32_MIN, 0], [0, INT32_MAX, INT32_MAX, 0]),  # 32 + 32
    ([0, 0, INT32_MIN, INT32_MIN], [1, 0, INT32_MAX, -1]),  # 1 + 32 + 31
])
def test_span_over_63_bits_is_a_value_error_naming_it(lo, hi):
    for fit in (C.KeyLayout.fit, _ext.core.fit_layout):
        with pytest.raises(ValueError, match=r"coordinates span batch \[0, .*bits in all, .* holds 63") as err:
            fit(lo, hi, [0, 0, 0])
        assert f"x [{lo[1]}, {hi[1]}]" in str(err.value)
    coords = torch.tensor([lo, hi], dtype=torch.int32)
    for fn in (C.pack, C.pack_torch):
        with pytest.raises(ValueError, match="coordinates span"):
            fn(coords)


def test_random_bounds_python_equals_core():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = rng.integers(INT32_MIN, INT32_MAX, 4, endpoint=True)
        b = a + rng.integers(0, 2 ** rng.integers(0, 33, 4), 4).clip(max=INT32_MAX - a)
        a[0], b[0] = 0, rng.integers(0, 2 ** rng.integers(0, 32))
        margin = rng.integers(0, 2 ** rng.integers(0, 20, 3), 3).tolist()
        try:
            want = _ext.core.fit_layout(a.tolist(), b.tolist(), margin)
        except ValueError as exc:
            with pytest.raises(ValueError) as err:
                C.KeyLayout.fit(a, b, margin)
            assert str(err.value) == str(exc)
            continue
        layout = C.KeyLayout.fit(a, b, margin)
        assert [*layout.origin, *layout.bits] == want


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("n", [0, 1, 3000])
def test_pack_matches_torch_and_arithmetic(n, regime):
    coords = regime_coords(n, regime, seed=n)
    layout = C.KeyLayout.of(coords)
    keys = C.pack(coords, layout)
    assert keys.dtype == torch.int64 and keys.shape == (len(coords),)
    assert torch.equal(keys, C.pack(coords))  # the default layout is the fitted one
    assert torch.equal(keys, C.pack_torch(coords, layout))
    assert np.array_equal(keys.numpy(), pack_ref(coords.numpy(), layout.origin, layout.bits))
    assert bool((keys >= 0).all())
    with _ext.torch_path():
        assert C.KeyLayout.of(coords) == layout


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_unpack_roundtrip(regime):
    coords = regime_coords(3000, regime, seed=10)
    layout = C.KeyLayout.of(coords, margin=(3, 3, 3))
    keys = C.pack(coords, layout)
    back = C.unpack(keys, layout)
    assert back.dtype == torch.int32
    assert torch.equal(back, coords)
    assert torch.equal(C.unpack_torch(keys, layout), coords)


def test_unpack_torch_refuses_keys_outside_the_layout_as_the_core():
    """unpack_torch gave rows of nonsense for a negative key or one past the
    layout's bits, where the core's unpack refuses them; both refuse now."""
    coords = torch.tensor([[0, 1, 2, 3], [1, -4, 5, 6]], dtype=torch.int32)
    layout = C.KeyLayout.of(coords)
    keys = C.pack(coords, layout)
    assert torch.equal(C.unpack_torch(keys, layout), coords)
    for bad in (torch.tensor([-1]), torch.tensor([1 << sum(layout.bits)]), keys.max()[None] * 2 + 2**40):
        with pytest.raises(ValueError, match="keys must be keys of the layout"):
            C.unpack_torch(bad, layout)
        with pytest.raises(ValueError, match="keys must be keys of the layout"):
            C.unpack(bad, layout)  # (the core's where it serves)


def test_full_63_bit_layout_round_trips_and_sorts():
    coords = torch.tensor([[INT32_MAX, INT32_MAX, 5, 5], [0, INT32_MIN, 5, 5], [INT32_MAX, INT32_MIN, 5, 5],
                           [3, 0, 5, 5], [0, INT32_MAX, 5, 5]], dtype=torch.int32)
    layout = C.KeyLayout.of(coords)
    assert sum(layout.bits) == 63
    keys = C.pack(coords, layout)
    assert int(keys.max()) == 2**63 - 1 and int(keys.min()) == 0
    assert torch.equal(keys, C.pack_torch(coords, layout))
    assert torch.equal(C.unpack(keys, layout), coords) and torch.equal(C.unpack_torch(keys, layout), coords)
    assert C.sort(keys)[1].tolist() == [1, 4, 3, 2, 0]


@pytest.mark.parametrize("regime", ["small", "int32_min", "int32_max", "big_batch"])
def test_sort_order_is_lexicographic(regime):
    coords = regime_coords(5000, regime, seed=3)
    coords[1::3] = coords[::3][: len(coords[1::3])]  # many equal rows
    keys = C.pack(coords)
    sorted_keys, perm = C.sort(keys)
    c = coords.numpy()
    order = np.lexsort((c[:, 3], c[:, 2], c[:, 1], c[:, 0]))  # last key is primary
    assert np.array_equal(perm.numpy(), order)  # stable: equal rows keep their order
    assert torch.equal(sorted_keys, keys[perm])
    s, p = C.sort_torch(keys)
    assert torch.equal(s, sorted_keys) and torch.equal(p, perm)


@pytest.mark.parametrize("key_bits", [11, 22, 33, 44, 46, 47, 62])
def test_sort_carries_rows_in_the_keys_or_beside_them(key_bits):
    """2^17 rows (17 bits): keys of up to 46 bits are sorted with their row
    in the word's low bits, wider ones with the rows moved beside them; the
    same stable order either way, for odd and even counts of digit passes."""
    n = 1 << 17
    keys = np.random.default_rng(key_bits).integers(0, 2**key_bits, n)
    keys[1::3] = keys[::3][: len(keys[1::3])]  # many equal keys
    keys[5] = 2**key_bits - 1  # the widest key has exactly key_bits bits
    sorted_keys, perm = C.sort(torch.from_numpy(keys))
    order = np.argsort(keys, kind="stable")
    assert np.array_equal(perm.numpy(), order)
    assert np.array_equal(sorted_keys.numpy(), keys[order])


@pytest.mark.parametrize("n", [0, 1, 2, 20000])
def test_unique_groups(n):
    rng = np.random.default_rng(n)
    coords = torch.from_numpy(rng.integers(0, 6, (n, 4)).astype(np.int32))
    keys = C.pack(coords)
    uniq, inverse, perm, seg_ptr = C.unique(keys)
    np_uniq, np_inv = np.unique(keys.numpy(), return_inverse=True)
    assert np.array_equal(uniq.numpy(), np_uniq)
    assert np.array_equal(inverse.numpy(), np_inv.reshape(-1))
    assert seg_ptr[0] == 0 and seg_ptr[-1] == n and len(seg_ptr) == len(uniq) + 1
    for j in range(len(uniq)):
        rows = perm[seg_ptr[j]:seg_ptr[j + 1]]
        assert bool((keys[rows] == uniq[j]).all())
        assert bool((rows[1:] > rows[:-1]).all())  # original order inside a group
    for got, want in zip((uniq, inverse, perm, seg_ptr), C.unique_torch(keys)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("regime", ["x_100000", "int32_min", "int32_max", "big_batch"])
def test_delta_shifts_coordinates_within_the_margin(regime):
    coords = regime_coords(500, regime, seed=5)
    layout = C.KeyLayout.of(coords, margin=(7, 7, 7))
    assert sum(layout.bits) < 63  # the margin fits
    for d in [(1, 0, 0), (0, -1, 0), (0, 0, 1), (-3, 2, -1), (7, -7, 7)]:
        shifted = coords.long()
        shifted[:, 1:] += torch.tensor(d)
        assert bool(layout.contains(shifted).all())
        want = pack_ref(shifted.numpy(), layout.origin, layout.bits)
        assert np.array_equal((C.pack(coords, layout) + layout.delta(*d)).numpy(), want)


@pytest.mark.parametrize("row", [
    [0, 17, 2, 3], [0, 0, 2, 3], [0, 5, 18, 3], [0, 5, 1, 3], [0, 5, 2, 35], [0, 5, 2, 2], [2, 5, 2, 3],
    [0, INT32_MAX, 0, 0], [0, 0, 0, INT32_MIN],
])
def test_rows_outside_a_layout_are_a_value_error(row):
    layout = C.KeyLayout.fit([0, 1, 2, 3], [1, 10, 17, 34])  # fields: x in [1, 16], y [2, 17], z [3, 34]
    assert [layout.axis_range(a) for a in range(3)] == [(1, 16), (2, 17), (3, 34)]
    coords = torch.tensor([[0, 1, 2, 3], row, [1, 1, 2, 3]], dtype=torch.int32)
    for fn in (C.pack, C.pack_torch):
        with pytest.raises(ValueError, match=r"coords row 1 = .* lies outside the key layout: batch in \[0, 1\]"):
            fn(coords, layout)


def test_negative_batch_is_a_value_error_naming_the_row():
    coords = torch.tensor([[0, 1, 2, 3], [-1, 0, 0, 0]], dtype=torch.int32)
    for path in (False, True):
        with _ext.torch_path() if path else torch.no_grad():
            with pytest.raises(ValueError, match=r"coords row 1 = \[-1, 0, 0, 0\] has a negative batch"):
                C.pack(coords)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.zeros(3, 4, dtype=torch.int64), TypeError, "int32"),
    (torch.zeros(3, 4), TypeError, "int32"),
    (torch.zeros(3, 3, dtype=torch.int32), ValueError, r"\(N, 4\)"),
    (torch.zeros(4, dtype=torch.int32), ValueError, r"\(N, 4\)"),
    (np.zeros((3, 4), dtype=np.int32), TypeError, "torch.Tensor"),
])
def test_pack_rejects_bad_coords(bad, exc, match):
    with pytest.raises(exc, match=match):
        C.pack(bad)


@pytest.mark.parametrize("bad, exc, match", [
    (torch.tensor([2.5, 2.7]), TypeError, "keys must be a 1-D integer tensor"),
    (torch.tensor([True, False]), TypeError, "keys must be a 1-D integer tensor"),
    (torch.zeros(1, 3, dtype=torch.int64), ValueError, r"keys must be a 1-D integer tensor .*\(1, 3\)"),
    ([1, 2], TypeError, "keys must be a 1-D integer tensor .*list"),
])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_key_functions_refuse_what_is_no_keys_alike_on_both_paths(bad, exc, match, backend):
    """sort, unique and unpack cast float keys to int64 silently (unique of
    2.5 and 2.7 gave one key), and on the torch path a 2-D tensor gave a
    (1, 4, 3) "unpack" or an IndexError from unique, a list an
    AttributeError (the core's path: a 1-D ValueError, a bare device()
    TypeError)."""
    import pointsparse as ps

    layout = C.KeyLayout.of(torch.tensor([[0, 1, 2, 3]], dtype=torch.int32))
    with ps.backend(backend):
        for call in (C.sort, C.unique, lambda k: C.unpack(k, layout)):
            with pytest.raises(exc, match=match):
                call(bad)


@pytest.mark.parametrize("layout, exc, match", [
    ([0, 0, 0, 1, 2, 2, 2], TypeError, "layout must be a KeyLayout .*list"),
    (None, TypeError, "layout must be a KeyLayout .*NoneType"),
    (C.KeyLayout((0, 0, 0), (20, 20, 20, 20)), ValueError, r"layout bits must lie in \[0, 62\] and add up to at most 63"),
    (C.KeyLayout((0, 0, 0), (-1, 2, 2, 2)), ValueError, r"layout bits must lie in \[0, 62\] and add up to at most 63"),
    (C.KeyLayout((2**41, 0, 0), (1, 2, 2, 2)), ValueError, r"layout origin must lie within \+-2\*\*40"),
    (C.KeyLayout((0.5, 0, 0), (1, 2, 2, 2)), TypeError, "layout origin and bits must be ints"),
])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_pack_and_unpack_refuse_what_is_no_layout_alike_on_both_paths(layout, exc, match, backend):
    """A layout of another type was an AttributeError ("'list' object has no
    attribute 'core'"); one whose fields add up past 63 bits packed on the
    torch path into wrapped, negative keys (row [8, 1, 1, 1] read back as
    [-8, 1, 1, 1]) where the core refuses it, and negative bits were torch's
    "negative shift count"."""
    import pointsparse as ps

    coords = torch.tensor([[8, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.int32)
    calls = [lambda: C.unpack(torch.tensor([0, 1]), layout), lambda: C.unpack_torch(torch.tensor([0, 1]), layout)]
    if layout is not None:  # (pack's layout None: the one fitted to the coords)
        calls += [lambda: C.pack(coords, layout), lambda: C.pack_torch(coords, layout)]
    with ps.backend(backend):
        for call in calls:
            with pytest.raises(exc, match=match):
                call()


def test_non_contiguous_coords():
    base = regime_coords(100, "int32_max", seed=8)
    wide = torch.zeros(len(base), 8, dtype=torch.int32)
    wide[:, ::2] = base
    view = wide[:, ::2]
    assert not view.is_contiguous()
    assert torch.equal(C.pack(view), C.pack(base))
    assert C.bounds(view) == C.bounds(base)


def test_one_and_two_threads_bit_identical(monkeypatch):
    """Above 2^18 keys the radix sort, above 2^20 rows the packing, bounds
    and scatters run on both threads (below, one thread: cpp/common.h)."""
    coords = regime_coords(1_100_000, "x_100000", seed=11)
    results = []
    before = torch.get_num_threads()
    try:
        for nt in (1, 2):
            monkeypatch.setenv("POINTSPARSE_NUM_THREADS", str(nt))
            torch.set_num_threads(nt)
            layout = C.KeyLayout.of(coords)
            keys = C.pack(coords, layout)
            results.append((keys, *C.sort(keys), *C.unique(keys), C.unpack(keys, layout)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("omp_env", [{"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true", "OMP_THREAD_LIMIT": "2"}])
def test_sort_correct_when_openmp_starts_fewer_threads(omp_env):
    """A team smaller than the requested thread count must still sort every row."""
    code = CORE_ONLY + (
        "import numpy as np\n"
        "k = np.random.default_rng(0).integers(0, 2**62, 300000)\n"
        "for keys in (k, k >> 29):\n"  # 6 and 3 digit passes: the result in the output or the scratch buffers
        "    s, p = core.sort_keys(keys, 4)\n"
        "    assert np.array_equal(p, np.argsort(keys, kind='stable')), 'wrong permutation'\n"
        "    assert np.array_equal(s, np.sort(keys)), 'wrong keys'\n"
        "u, inv, perm, seg = core.unique_keys(k % 1000, 4)\n"
        "assert np.array_equal(u, np.unique(k % 1000)), 'wrong unique'\n"
        "print('ok')\n"
    )
    proc = run_python(code, omp_env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# Raw core calls with arrays that would corrupt memory: each must raise
# ValueError (or TypeError for an unconvertible argument), never crash.
RAW_CASES = {
    "pack_shape": ("core.pack_keys(np.zeros((3, 3), np.int32), LAY, 2)", ("ValueError",), "coords"),
    "pack_1d": ("core.pack_keys(np.zeros(4, np.int32), LAY, 2)", ("ValueError",), "coords"),
    "pack_range": ("core.pack_keys(np.array([[0, 70000, 0, 0]], np.int32), LAY, 2)", ("ValueError",), "coords"),
    "pack_strings": ("core.pack_keys(np.array([['a'] * 4]), LAY, 2)", ("ValueError", "TypeError"), "coords"),
    "pack_layout_bits": ("core.pack_keys(np.zeros((1, 4), np.int32), [0, 0, 0, 16, 16, 16, 16], 2)",
                         ("ValueError",), "layout"),
    "pack_layout_negative": ("core.pack_keys(np.zeros((1, 4), np.int32), [0, 0, 0, 1, -1, 1, 1], 2)",
                             ("ValueError",), "layout"),
    "pack_layout_origin": ("core.pack_keys(np.zeros((1, 4), np.int32), [2**50, 0, 0, 1, 1, 1, 1], 2)",
                           ("ValueError",), "layout"),
    "pack_layout_above_int32": ("core.pack_keys(np.array([[0, 2**31 - 1, 0, 0]], np.int32), "
                                "[2**33, 0, 0, 1, 1, 1, 1], 2)", ("ValueError",), "outside the key layout"),
    "pack_layout_below_int32": ("core.pack_keys(np.array([[0, -2**31, 0, 0]], np.int32), "
                                "[-2**36, 0, 0, 1, 2, 1, 1], 2)", ("ValueError",), "outside the key layout"),
    "pack_layout_short": ("core.pack_keys(np.zeros((1, 4), np.int32), [0, 0, 0], 2)", ("ValueError",), "layout"),
    "unpack_negative": ("core.unpack_keys(np.array([5, -1]), LAY, 2)", ("ValueError",), "keys"),
    "unpack_too_big": ("core.unpack_keys(np.array([5, 2**40]), LAY, 2)", ("ValueError",), "keys"),
    "unpack_past_int32": ("core.unpack_keys(np.array([2**33 - 1]), [2**31 - 4, 0, 0, 0, 33, 0, 0], 2)",
                          ("ValueError",), "keys"),
    "unpack_2d": ("core.unpack_keys(np.zeros((2, 2), np.int64), LAY, 2)", ("ValueError",), "keys"),
    "bounds_negative_batch": ("core.coords_bounds(np.array([[0, 1, 1, 1], [-3, 0, 0, 0]], np.int32), 2)",
                              ("ValueError",), "row 1"),
    "bounds_shape": ("core.coords_bounds(np.zeros((2, 5), np.int32), 2)", ("ValueError",), "coords"),
    "fit_inverted": ("core.fit_layout([0, 5, 0, 0], [0, 4, 0, 0], [0, 0, 0])", ("ValueError",), "lo <= hi"),
    "fit_past_int32": ("core.fit_layout([0, 0, 0, 0], [0, 2**40, 0, 0], [0, 0, 0])", ("ValueError",), "int32"),
    "fit_margin": ("core.fit_layout([0, 0, 0, 0], [0, 1, 0, 0], [0, -1, 0])", ("ValueError",), "margin"),
    "fit_short": ("core.fit_layout([0, 0, 0], [0, 1, 0, 0], [0, 0, 0])", ("ValueError",), "fit_layout"),
    "sort_negative": ("core.sort_keys(np.array([3, -1, 2]), 2)", ("ValueError",), "keys"),
    "sort_2d": ("core.sort_keys(np.zeros((2, 2), np.int64), 2)", ("ValueError",), "keys"),
    "unique_negative": ("core.unique_keys(np.array([-(2**63), 1]), 2)", ("ValueError",), "keys"),
    "unique_big_negative": ("core.unique_keys(np.r_[np.arange(40000), -1], 2)", ("ValueError",), "keys"),
    "unique_strings": ("core.unique_keys(np.array(['x', 'y']), 2)", ("ValueError", "TypeError"), "keys"),
}


@pytest.fixture(scope="module")
def raw_results():
    return run_in_children({k: v[0] for k, v in RAW_CASES.items()},
                           setup=CORE_ONLY + "import numpy as np\nLAY = [0, 0, 0, 2, 8, 8, 8]\n")


@pytest.mark.parametrize("name", sorted(RAW_CASES))
def test_raw_core_bad_arrays(raw_results, name):
    _, types, word = RAW_CASES[name]
    r = raw_results[name]
    assert r["status"] == 0, f"{name} crashed the process (status {r['status']})"
    assert r["exc"] in types, r
    assert word in r["msg"], r


def test_num_threads_below_one_means_one():
    coords = regime_coords(100, "small", seed=2).numpy()
    layout = C.KeyLayout.of(torch.from_numpy(coords)).core()
    keys = _ext.core.pack_keys(coords, layout, 0)
    assert np.array_equal(keys, _ext.core.pack_keys(coords, layout, -5))
