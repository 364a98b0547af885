"""Exact 64-bit coordinate keys: C++ and torch agree with the arithmetic
definition, round-trip, sort lexicographically, and refuse what they cannot
represent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointsparse import _ext
from pointsparse import coords as C
from reference import CORE_ONLY, BATCH_MAX, COORD_MAX, COORD_MIN, pack_ref, run_in_children, run_python

EXTREMES = [
    [0, COORD_MIN, COORD_MIN, COORD_MIN],
    [BATCH_MAX, COORD_MAX, COORD_MAX, COORD_MAX],
    [0, 0, 0, 0],
    [BATCH_MAX, COORD_MIN, COORD_MAX, -1],
    [1, -1, 0, COORD_MAX],
    [4094, COORD_MAX, COORD_MIN, 0],
]


def random_coords(n: int, seed: int = 0, batch_max: int = BATCH_MAX, lo: int = COORD_MIN, hi: int = COORD_MAX,
                  extremes: bool = True):
    rng = np.random.default_rng(seed)
    c = np.empty((n, 4), dtype=np.int32)
    c[:, 0] = rng.integers(0, batch_max + 1, n)
    c[:, 1:] = rng.integers(lo, hi + 1, (n, 3))
    if extremes:
        c = np.concatenate([c, np.array(EXTREMES, dtype=np.int32)])
    return torch.from_numpy(c)


def test_constants():
    assert (C.COORD_MIN, C.COORD_MAX, C.BATCH_MAX, C.COORD_BITS) == (COORD_MIN, COORD_MAX, BATCH_MAX, 17)


@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_pack_matches_torch_and_arithmetic(n):
    coords = random_coords(n, seed=n)
    keys = C.pack(coords)
    assert keys.dtype == torch.int64 and keys.shape == (len(coords),)
    assert torch.equal(keys, C.pack_torch(coords))
    assert np.array_equal(keys.numpy(), pack_ref(coords.numpy()))
    assert bool((keys >= 0).all())


@pytest.mark.parametrize("n", [0, 1, 3000])
def test_unpack_roundtrip(n):
    coords = random_coords(n, seed=10 + n)
    keys = C.pack(coords)
    back = C.unpack(keys)
    assert back.dtype == torch.int32
    assert torch.equal(back, coords)
    assert torch.equal(C.unpack_torch(keys), coords)


def test_sort_order_is_lexicographic():
    coords = random_coords(5000, seed=3, batch_max=3, lo=-5, hi=5)  # many ties per column
    keys = C.pack(coords)
    sorted_keys, perm = C.sort(keys)
    c = coords.numpy()
    order = np.lexsort((c[:, 3], c[:, 2], c[:, 1], c[:, 0]))  # last key is primary
    assert np.array_equal(perm.numpy(), order)  # stable: equal rows keep their order
    assert torch.equal(sorted_keys, keys[perm])
    s, p = C.sort_torch(keys)
    assert torch.equal(s, sorted_keys) and torch.equal(p, perm)


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


def test_key_delta_shifts_coordinates():
    coords = random_coords(500, seed=5, lo=-100, hi=100, extremes=False)
    for d in [(1, 0, 0), (0, -1, 0), (0, 0, 1), (-3, 2, -1), (7, -7, 7)]:
        shifted = coords.clone()
        shifted[:, 1:] += torch.tensor(d, dtype=torch.int32)
        assert torch.equal(C.pack(shifted), C.pack(coords) + C.key_delta(*d))


@pytest.mark.parametrize("row", [
    [-1, 0, 0, 0], [BATCH_MAX + 1, 0, 0, 0],
    [0, COORD_MIN - 1, 0, 0], [0, COORD_MAX + 1, 0, 0],
    [0, 0, COORD_MIN - 1, 0], [0, 0, COORD_MAX + 1, 0],
    [0, 0, 0, COORD_MIN - 1], [0, 0, 0, COORD_MAX + 1],
    [0, 2**31 - 1, 0, 0], [0, 0, 0, -(2**31)],
])
def test_out_of_range_is_a_value_error(row):
    coords = torch.tensor([[0, 1, 2, 3], row, [1, 0, 0, 0]], dtype=torch.int32)
    for fn in (C.pack, C.pack_torch):
        with pytest.raises(ValueError, match=r"coords row 1 .*outside the representable range"):
            fn(coords)


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


def test_non_contiguous_coords():
    base = random_coords(100, seed=8)
    wide = torch.zeros(len(base), 8, dtype=torch.int32)
    wide[:, ::2] = base
    view = wide[:, ::2]
    assert not view.is_contiguous()
    assert torch.equal(C.pack(view), C.pack(base))


def test_one_and_two_threads_bit_identical(monkeypatch):
    """Above 16k rows the radix sort and the packing run on both threads."""
    coords = random_coords(60000, seed=11, batch_max=7, lo=-300, hi=300)
    results = []
    before = torch.get_num_threads()
    try:
        for nt in (1, 2):
            monkeypatch.setenv("POINTSPARSE_NUM_THREADS", str(nt))
            torch.set_num_threads(nt)
            keys = C.pack(coords)
            results.append((keys, *C.sort(keys), *C.unique(keys), C.unpack(keys)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("omp_env", [{"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true", "OMP_THREAD_LIMIT": "2"}])
def test_sort_correct_when_openmp_starts_fewer_threads(omp_env):
    """A team smaller than the requested thread count must still sort every row."""
    code = CORE_ONLY + (
        "import numpy as np\n"
        "k = np.random.default_rng(0).integers(0, 2**62, 50000)\n"
        "s, p = core.sort_keys(k, 4)\n"
        "assert np.array_equal(p, np.argsort(k, kind='stable')), 'wrong permutation'\n"
        "assert np.array_equal(s, np.sort(k)), 'wrong keys'\n"
        "u, inv, perm, seg = core.unique_keys(k % 1000, 4)\n"
        "assert np.array_equal(u, np.unique(k % 1000)), 'wrong unique'\n"
        "print('ok')\n"
    )
    proc = run_python(code, omp_env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# Raw core calls with arrays that would corrupt memory: each must raise
# ValueError (or TypeError for an unconvertible argument), never crash.
RAW_CASES = {
    "pack_shape": ("core.pack_keys(np.zeros((3, 3), np.int32), 2)", ("ValueError",), "coords"),
    "pack_1d": ("core.pack_keys(np.zeros(4, np.int32), 2)", ("ValueError",), "coords"),
    "pack_range": ("core.pack_keys(np.array([[0, 70000, 0, 0]], np.int32), 2)", ("ValueError",), "coords"),
    "pack_strings": ("core.pack_keys(np.array([['a'] * 4]), 2)", ("ValueError", "TypeError"), "coords"),
    "unpack_negative": ("core.unpack_keys(np.array([5, -1]), 2)", ("ValueError",), "keys"),
    "unpack_2d": ("core.unpack_keys(np.zeros((2, 2), np.int64), 2)", ("ValueError",), "keys"),
    "sort_negative": ("core.sort_keys(np.array([3, -1, 2]), 2)", ("ValueError",), "keys"),
    "sort_2d": ("core.sort_keys(np.zeros((2, 2), np.int64), 2)", ("ValueError",), "keys"),
    "unique_negative": ("core.unique_keys(np.array([-(2**63), 1]), 2)", ("ValueError",), "keys"),
    "unique_big_negative": ("core.unique_keys(np.r_[np.arange(40000), -1], 2)", ("ValueError",), "keys"),
    "unique_strings": ("core.unique_keys(np.array(['x', 'y']), 2)", ("ValueError", "TypeError"), "keys"),
}


@pytest.fixture(scope="module")
def raw_results():
    return run_in_children({k: v[0] for k, v in RAW_CASES.items()},
                           setup=CORE_ONLY + "import numpy as np\n")


@pytest.mark.parametrize("name", sorted(RAW_CASES))
def test_raw_core_bad_arrays(raw_results, name):
    _, types, word = RAW_CASES[name]
    r = raw_results[name]
    assert r["status"] == 0, f"{name} crashed the process (status {r['status']})"
    assert r["exc"] in types, r
    assert word in r["msg"], r


def test_num_threads_below_one_means_one():
    coords = random_coords(100, seed=2).numpy()
    keys = _ext.core.pack_keys(coords, 0)
    assert np.array_equal(keys, _ext.core.pack_keys(coords, -5))
