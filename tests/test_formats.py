"""Sparse weight formats: round trips, exact storage against hand counts,
products against dense matmul, thread-count independence."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from pointsparse import formats as F
from pointsparse import nn as psnn
from pointsparse.formats._base import torch_spmm
from pointsparse.formats._storage import index_width, pack_bits, unpack_bits


def _random(shape, density, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=dtype)
    return w * (torch.rand(shape, generator=g) < density)


def _empty_rows_cols():
    w = _random((9, 7), 0.6, 1)
    w[[0, 4, 8]] = 0
    w[:, [1, 6]] = 0
    return w


MATRICES = {
    "random": lambda: _random((13, 11), 0.3, 0),
    "empty_rows_cols": _empty_rows_cols,
    "all_zero": lambda: torch.zeros(6, 5, dtype=torch.float64),
    "dense": lambda: _random((5, 8), 1.0, 2) + 0.5,
    "one_by_one": lambda: torch.tensor([[2.5]], dtype=torch.float64),
    "one_by_one_zero": lambda: torch.zeros(1, 1, dtype=torch.float64),
    "tall_long_gaps": lambda: _random((70, 3), 0.05, 3),  # EIE gaps > 15
    "no_rows": lambda: torch.zeros(0, 4, dtype=torch.float64),
    "no_cols": lambda: torch.zeros(4, 0, dtype=torch.float64),
}

# format, from_dense kwargs; NM prunes a random matrix to 2:4 first (see _input).
FORMATS = {
    "coo": (F.COO, {}),
    "csr": (F.CSR, {}),
    "csc": (F.CSC, {}),
    "bsr_2x3": (F.BSR, {"blocksize": (2, 3)}),
    "bsr_1x1": (F.BSR, {"blocksize": 1}),
    "bsr_ell_2x2": (F.BSR, {"blocksize": 2, "layout": "ell"}),
    "nm_2_4": (F.NM, {"n": 2, "m": 4}),
    "nm_3_8": (F.NM, {"n": 3, "m": 8}),
    "eie_1": (F.EIE, {"num_pe": 1}),
    "eie_4": (F.EIE, {"num_pe": 4}),
    "fkw": (F.FKW, {}),
}


def _input(fmt_name, matrix):
    """NM stores only n:m matrices: prune the test matrix to n:m first."""
    cls, kwargs = FORMATS[fmt_name]
    if cls is F.NM:
        return F.NM.from_dense(matrix, prune=True, **kwargs).to_dense()
    return matrix


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("matrix", sorted(MATRICES))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_round_trip_and_matmul(fmt, matrix, dtype):
    cls, kwargs = FORMATS[fmt]
    w = _input(fmt, MATRICES[matrix]()).to(dtype)
    s = cls.from_dense(w, **kwargs)
    assert s.shape == tuple(w.shape)
    assert s.dtype == dtype
    assert torch.equal(s.to_dense(), w)
    assert s.nnz == int((w != 0).sum())
    K = w.shape[1]
    x = _random((K, 37), 1.0, 5, dtype)
    ref = w.double() @ x.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    out = s.matmul(x)
    assert out.dtype == dtype and out.shape == (w.shape[0], 37)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    vec = s @ x[:, 3]
    torch.testing.assert_close(vec.double(), ref[:, 3], atol=tol, rtol=tol)
    # the pure-torch path gives the same product
    rows, cols, vals = s._triplets()
    torch.testing.assert_close(torch_spmm(rows, cols, vals, x, w.shape[0]).double(), ref,
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("fmt", sorted(f for f in FORMATS if not f.startswith("nm")))  # NM: packed bytes only
def test_pickle_with_wide_index_arrays(fmt):
    """A format whose index arrays need 2 bytes (a column past 255, over 255
    entries) pickles and unpickles to the same arrays, dtypes included (plain
    pickle of a uint16 tensor fails in torch), also after a product (FKW
    caches its decoded columns), and so does a module holding it."""
    import pickle

    cls, kwargs = FORMATS[fmt]
    w = _input(fmt, _random((40, 300), 0.3, 11)).float()
    s = cls.from_dense(w, **kwargs)
    x = _random((300, 5), 1.0, 12, torch.float32)
    ref = s.matmul(x)
    assert any(isinstance(a, torch.Tensor) and a.dtype == torch.uint16 for a in vars(s).values())
    back = pickle.loads(pickle.dumps(s))
    assert {k: a.dtype for k, a in back.arrays().items()} == {k: a.dtype for k, a in s.arrays().items()}
    assert all(torch.equal(a, back.arrays()[k]) for k, a in s.arrays().items())
    assert torch.equal(back.to_dense(), w) and back.nbytes() == s.nbytes()
    assert torch.equal(back.matmul(x), ref)
    module = pickle.loads(pickle.dumps(F.SparseLinear(s)))
    assert torch.equal(module(x.t()), ref.t())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_matmul_refuses_a_dense_that_needs_a_gradient(fmt):
    """The product is not differentiable: a dense that requires a gradient is
    a RuntimeError saying so (it returned a result cut off from autograd, so
    a loss through it silently gave that input no gradient); under no_grad,
    or detached, it runs."""
    cls, kwargs = FORMATS[fmt]
    w = _input(fmt, _random((6, 8), 0.5, 13))
    s = cls.from_dense(w, **kwargs)
    x = _random((8, 3), 1.0, 14).requires_grad_()
    with pytest.raises(RuntimeError, match="no gradient for dense"):
        s.matmul(x)
    with torch.no_grad():
        torch.testing.assert_close(s.matmul(x), w @ x.detach())
    torch.testing.assert_close(s.matmul(x.detach()), w @ x.detach())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_one_and_two_threads_identical(fmt, monkeypatch):
    cls, kwargs = FORMATS[fmt]
    w = _input(fmt, _random((150, 90), 0.2, 7)).float()
    s = cls.from_dense(w, **kwargs)
    x = _random((90, 300), 1.0, 8, torch.float32)  # 300 columns: panels + a ragged block
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("POINTSPARSE_NUM_THREADS", threads)
        outs.append(s.matmul(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0].double(), w.double() @ x.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["csr", "bsr_2x3", "nm_2_4", "eie_4", "coo"])
def test_portable_kernel_matches(fmt):
    """Every build that runs here gives the generic build's product."""
    cls, kwargs = FORMATS[fmt]
    w = _input(fmt, _random((64, 48), 0.3, 9))
    s = cls.from_dense(w, **kwargs)
    x = _random((48, 200), 1.0, 10)
    from pointsparse import _ext
    a = torch.from_numpy(s._kernel(_ext.to_numpy(x), isa="generic"))
    for isa in _ext.core.runnable_isas():
        b = torch.from_numpy(s._kernel(_ext.to_numpy(x), isa=isa))
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_torch_path_for_other_dtypes():
    w = _random((8, 12), 0.4, 11, torch.float32)
    x = _random((12, 5), 1.0, 12, torch.float32)
    for cls, kwargs in FORMATS.values():
        wi = F.NM.from_dense(w, prune=True, **kwargs).to_dense() if cls is F.NM else w
        s = cls.from_dense(wi.to(torch.bfloat16), **kwargs)
        out = s.matmul(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), wi.bfloat16().float() @ x.bfloat16().float(),
                                   atol=0.1, rtol=0.05)


# ---------------------------------------------------------------- storage
CLASSIC = torch.tensor([[3.0, 0, 0, 0], [0, 7, 8, 0], [0, 0, 0, 0], [2, 0, 5, 9]])


def test_classic_csr_is_35_bytes():
    s = F.CSR.from_dense(CLASSIC)
    # 6 fp32 values + 6 one-byte column indices + 5 one-byte row pointers
    assert s.nbytes() == 6 * 4 + 6 * 1 + 5 * 1 == 35
    assert s.col_idx.dtype == torch.uint8 and s.row_ptr.dtype == torch.uint8
    assert s.row_ptr.tolist() == [0, 1, 3, 3, 6]
    assert s.col_idx.tolist() == [0, 1, 2, 0, 2, 3]


def test_hand_counts_of_every_format():
    # COO: values + row + col, one byte each
    assert F.COO.from_dense(CLASSIC).nbytes() == 24 + 6 + 6
    # CSC: values + row indices + 5 column pointers
    assert F.CSC.from_dense(CLASSIC).nbytes() == 24 + 6 + 5
    # BSR 2x2: all four blocks are non-empty: 4 blocks x 4 values x 4 B + 4 cols + 3 ptrs
    assert F.BSR.from_dense(CLASSIC, blocksize=2).nbytes() == 64 + 4 + 3
    # BSR 4x4: one block of 16 values + 1 col + 2 ptrs
    assert F.BSR.from_dense(CLASSIC, blocksize=4).nbytes() == 64 + 1 + 2
    # Block-ELL 1x2: block rows hold 1, 2, 0, 2 blocks -> width 2, 8 slots of 2 values
    # + 8 one-byte block columns, no block_ptr
    ell = F.BSR.from_dense(CLASSIC, blocksize=(1, 2), layout="ell")
    assert ell.nbytes() == 8 * 2 * 4 + 8
    assert torch.equal(ell.to_dense(), CLASSIC)
    # NM 2:4: 4 rows x 2 kept x 4 B + 8 positions x 2 bits = 2 bytes
    nm = F.NM.from_dense(CLASSIC, n=2, m=4, prune=True)
    assert nm.nbytes() == 32 + 2
    # NM 2:8 on a 2 x 8 matrix: 4 values + 4 positions x 3 bits = 12 bits -> 2 bytes
    assert F.NM.from_dense(_random((2, 8), 0.2, 0).float(), n=2, m=8, prune=True).nbytes() == 16 + 2
    # EIE, 2 PEs: PE 0 (rows 0, 2) holds 1 entry, PE 1 (rows 1, 3) 5 entries:
    # 6 values, ceil(1/2) + ceil(5/2) = 4 bytes of 4-bit indices, col_ptr 2 x 5 x 1 B
    eie = F.EIE.from_dense(CLASSIC, num_pe=2)
    assert eie.entries_per_pe.tolist() == [1, 5]
    assert eie.nbytes() == 24 + 4 + 10
    # FKW of a matrix (kernels of volume 1): 6 kernels, 1 pattern:
    # weight 24 + index 6 + offset 5 + reorder 4 + stride 4 x 2 + patterns 1 bit -> 1
    assert F.FKW.from_dense(CLASSIC).nbytes() == 24 + 6 + 5 + 4 + 8 + 1


def test_eie_padding_zeros():
    # one column, nonzeros at rows 0 and 39: gap 38 = 2 paddings (16 rows each) + z = 6
    w = torch.zeros(40, 1)
    w[0, 0], w[39, 0] = 1.0, 2.0
    s = F.EIE.from_dense(w, num_pe=1)
    assert s.values.tolist() == [1.0, 0.0, 0.0, 2.0]
    assert pack_bits(torch.tensor([0, 15, 15, 6]), 4).tolist() == s.rel_idx.tolist()
    assert s.nbytes() == 4 * 4 + 2 + 2 * 1
    assert torch.equal(s.to_dense(), w)
    # a gap of exactly 15 needs no padding, 16 needs one
    for gap, entries in ((15, 2), (16, 3)):
        w = torch.zeros(gap + 2, 1)
        w[0, 0], w[gap + 1, 0] = 1.0, 1.0
        assert F.EIE.from_dense(w, num_pe=1).entries_per_pe.tolist() == [entries]


def test_fkw_patterns_and_reorder():
    w = torch.zeros(2, 3, 3)
    w[0, 0] = torch.tensor([1.0, 0, 2])   # pattern 0b101
    w[0, 2] = torch.tensor([0.0, 4, 0])   # pattern 0b010
    w[1, 1] = torch.tensor([5.0, 0, 6])   # pattern 0b101
    s = F.FKW.from_dense(w)
    assert s.num_patterns == 2 and s.reorder.tolist() == [0, 1]
    assert s.offset.tolist() == [0, 2, 3]
    assert s.stride.tolist() == [[0, 1, 2], [0, 0, 1]]  # patterns sorted: 0b010, 0b101
    assert s.index.tolist() == [2, 0, 1]
    assert s.weight.tolist() == [4.0, 1.0, 2.0, 5.0, 6.0]
    # weight 5 x 4 + index 3 + offset 3 + reorder 2 + stride 6 + patterns 2 x 3 bits -> 1
    assert s.nbytes() == 20 + 3 + 3 + 2 + 6 + 1
    assert torch.equal(s.to_dense(), w)
    # filters with more kernels go first
    w2 = torch.zeros(3, 4, 1)
    w2[0, 0], w2[1, :3], w2[2, :2] = 1.0, 1.0, 1.0
    assert F.FKW.from_dense(w2).reorder.tolist() == [1, 2, 0]
    x = torch.randn(4, 5)
    torch.testing.assert_close(F.FKW.from_dense(w2).matmul(x), w2[:, :, 0] @ x)


def _fkw_arrays_dense_table(tensor):
    """FKW.from_dense's arrays as it built them with a dense (C_out,
    n_patterns) count table and Python lists of it (the reference the
    sparse sort must match)."""
    c_out, c_in = tensor.shape[0], tensor.shape[1]
    volume = math.prod(tensor.shape[2:])
    w = tensor.reshape(c_out, c_in, volume)
    nonzero = w != 0
    codes = (nonzero.to(torch.int64) << torch.arange(volume)).sum(2)
    present = codes != 0
    patterns, inverse = torch.unique(codes[present], return_inverse=True)
    n_p = patterns.numel()
    pid = torch.full((c_out, c_in), -1, dtype=torch.int64)
    pid[present] = inverse
    hist = torch.zeros(c_out, n_p, dtype=torch.int64)
    f_idx, c_idx = present.nonzero(as_tuple=True)
    hist.index_put_((f_idx, pid[f_idx, c_idx]), torch.ones_like(f_idx), accumulate=True)
    kernels = hist.sum(1)
    hist_l, kernels_l = hist.tolist(), kernels.tolist()
    order = torch.tensor(sorted(range(c_out), key=lambda f: (-kernels_l[f], [-h for h in hist_l[f]], f)),
                         dtype=torch.int64)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(c_out)
    key = (rank[f_idx] * max(1, n_p) + pid[f_idx, c_idx]) * max(1, c_in) + c_idx
    sort = torch.argsort(key)
    f_sorted, c_sorted = f_idx[sort], c_idx[sort]
    return {"weight": w[f_sorted, c_sorted][nonzero[f_sorted, c_sorted]], "index": c_sorted,
            "offset": torch.cat([kernels.new_zeros(1), kernels[order].cumsum(0)]), "reorder": order,
            "stride": torch.cat([hist.new_zeros(c_out, 1), hist[order].cumsum(1)], 1),
            "patterns": pack_bits(((patterns[:, None] >> torch.arange(volume)) & 1).reshape(-1), 1)}


@pytest.mark.parametrize("seed", range(12))
def test_fkw_from_dense_sorts_filters_as_the_dense_count_table_did(seed):
    """FKW.from_dense orders filters by kernel count, then by their per-pattern
    counts, then by index, now from the (filter, pattern) pairs present
    rather than a dense (C_out, n_patterns) table: the same arrays, ties and
    filters with equal counts over different patterns included."""
    g = torch.Generator().manual_seed(seed)
    c_out, c_in = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    kernel = [(1,), (3,), (2, 2), (3, 3, 3)][seed % 4]
    # few distinct kernels, so that filters tie on kernels and on counts and differ in the patterns they use
    choices = (torch.rand((4, *kernel), generator=g) < 0.5) * torch.randn((4, *kernel), generator=g)
    pick = torch.randint(0, 4, (c_out, c_in), generator=g)
    w = choices[pick] * (torch.rand(c_out, c_in, *[1] * len(kernel), generator=g) < 0.7)
    if seed == 0:
        w = torch.zeros(3, 2, 3)
    s = F.FKW.from_dense(w)
    for name, expected in _fkw_arrays_dense_table(w).items():
        assert torch.equal(getattr(s, name).to(torch.int64) if name != "weight" else s.weight,
                           expected.to(torch.int64) if name != "weight" else expected), name
    assert torch.equal(s.to_dense(), w)


def test_fkw_from_dense_refuses_a_pattern_table_past_the_dense_limit():
    """A weight with nearly as many kernel patterns as kernels (not pattern
    pruned) needs a (C_out, n_patterns + 1) stride table: 2**18 filters over
    2**16 patterns is 2**37 bytes (the count table was about that before
    the lists). Refused before the table is made: a ValueError naming
    tensor, the patterns and the limit, pointing at pattern pruning."""
    from pointsparse.tensor import MAX_DENSE_BYTES

    c_out, volume = 1 << 18, 27
    code = torch.arange(c_out) % (1 << 16) + 1
    w = ((code[:, None] >> torch.arange(volume)) & 1).to(torch.float32).reshape(c_out, 1, 3, 3, 3)
    match = (r"tensor of shape \(262144, 1, 3, 3, 3\) has 65,536 distinct kernel patterns.*"
             rf"262144 x 65537.*{MAX_DENSE_BYTES / 2**30:.0f} GiB limit.*pattern")
    with pytest.raises(ValueError, match=match):
        F.FKW.from_dense(w)
    assert F.FKW.from_dense(w[:64]).num_patterns == 64


def test_index_widths():
    assert [index_width(v) for v in (0, 255, 256, 65535, 65536, 2**32 - 1, 2**32)] == \
        [1, 1, 2, 2, 4, 4, 8]
    for cols, width in ((300, 2), (70000, 4)):
        w = torch.zeros(1, cols)
        w[0, -1] = 1.0
        s = F.CSR.from_dense(w)
        assert s.col_idx.element_size() == width
        assert s.nbytes() == 4 + width + 2
        x = torch.randn(cols, 2)
        torch.testing.assert_close(s.matmul(x), w @ x)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_bits_round_trip(bits):
    values = torch.randint(0, 1 << bits, (37,))
    packed = pack_bits(values, bits)
    assert packed.numel() == (37 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 37), values)


def test_nm_partial_group_and_checks():
    w = torch.tensor([[1.0, 0, 2, 0, 3, 4]])  # K = 6: one group of 4, a partial group of 2
    s = F.NM.from_dense(w, n=2, m=4)
    assert s.values.shape == (1, 4) and torch.equal(s.to_dense(), w)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        F.NM.from_dense(torch.ones(2, 4), n=2, m=4)
    with pytest.raises(ValueError, match="n:m"):
        F.NM.from_dense(torch.ones(2, 4), n=5, m=4)
    with pytest.raises(ValueError, match="n:m"):
        F.NM.from_dense(torch.ones(2, 4), n=2, m=17)
    pruned = F.NM.from_dense(torch.tensor([[1.0, -4, 3, 2]]), n=2, m=4, prune=True)
    assert pruned.to_dense().tolist() == [[0.0, -4, 3, 0]]


def test_nm_no_rows_with_a_short_last_group():
    """A 0-row matrix whose last group is shorter than n (K = 5, 2:4: a last
    group of 1 column) is an empty NM like any other, not a reshape error."""
    for n, m, K in ((2, 4, 5), (3, 8, 10)):
        s = F.NM.from_dense(torch.zeros(0, K), n=n, m=m)
        assert s.shape == (0, K) and s.values.shape == (0, F.nm.kept_per_row(K, n, m))
        assert s.to_dense().shape == (0, K) and s.nbytes() == 0
        assert s.matmul(torch.ones(K, 3)).shape == (0, 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        F.CSR.from_dense(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        F.CSR.from_dense(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        F.CSR.from_dense([[1.0]])
    s = F.CSR.from_dense(torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"\(4, N\)"):
        s.matmul(torch.ones(3, 2))
    with pytest.raises(TypeError, match="dtype"):
        s.matmul(torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="blocksize"):
        F.BSR.from_dense(torch.ones(2, 2), blocksize=(0, 2))
    with pytest.raises(ValueError, match="num_pe"):
        F.EIE.from_dense(torch.ones(2, 2), num_pe=0)
    with pytest.raises(ValueError, match="at most 62"):
        F.FKW.from_dense(torch.ones(2, 2, 4, 4, 4))


@pytest.mark.parametrize("blocksize, error", [
    ((2.5, 2), TypeError), (2.0, TypeError), ((2, True), TypeError), ("22", TypeError),
    ((2, 2, 2), ValueError), ((2, -1), ValueError), (0, ValueError),
    ((10**9, 10**9), ValueError), ((2**31, 1), ValueError),  # refused before the blocks are allocated
])
def test_bsr_rejects_bad_blocksize(blocksize, error):
    with pytest.raises(error, match="blocksize"):
        F.BSR.from_dense(torch.ones(4, 4), blocksize=blocksize)


def test_bsr_blocksize_accepts_integer_types():
    import numpy as np

    s = F.BSR.from_dense(torch.ones(4, 6), blocksize=(np.int64(2), 3))
    assert s.blocksize == (2, 3)


@pytest.mark.parametrize("layout", ["CSR", "ellpack", "", None])
def test_bsr_rejects_unknown_layout(layout):
    with pytest.raises(ValueError, match="layout must be 'csr' or 'ell'"):
        F.BSR.from_dense(torch.ones(4, 4), blocksize=2, layout=layout)
    s = F.BSR.from_dense(torch.ones(4, 4), blocksize=2)
    with pytest.raises(ValueError, match="layout must be 'csr' or 'ell'"):
        F.BSR(s.block_ptr, s.block_col, s.values, s.shape, layout=layout)


def test_from_module_uses_the_masked_weight():
    from torch.nn.utils import prune

    lin = torch.nn.Linear(6, 4)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    for cls, kwargs in FORMATS.values():
        if cls is F.NM:
            continue
        s = cls.from_module(lin, **kwargs)
        assert torch.equal(s.to_dense().reshape(4, 6), lin.weight.detach())
    # A conv weight is named with what takes it: compress turns a pointsparse
    # Conv3d only (a torch conv it leaves as it is), FKW.from_module any conv
    # (the message sent a torch Conv2d to compress, which gave it back dense).
    conv2d = torch.nn.Conv2d(2, 3, 3)
    for conv in (conv2d, psnn.Conv3d(2, 3, 3)):
        with pytest.raises(ValueError, match=r"FKW\.from_module .*\(C_out, C_in, \*kernel\).*compress .*"
                                             r"pointsparse\.nn\.Conv3d"):
            F.CSR.from_module(conv)
    assert torch.equal(F.FKW.from_module(conv2d).to_dense(), conv2d.weight.detach())


def test_eie_num_pe_is_bounded_by_the_rows():
    from pointsparse.formats import EIE
    w = torch.randn(100, 5)
    assert EIE.from_dense(w, num_pe=100).to_dense().equal(w)
    assert EIE.from_dense(w[:3], num_pe=64).to_dense().equal(w[:3])
    for bad, error in ((10**9, ValueError), (101, ValueError), (0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_pe"):
            EIE.from_dense(w, num_pe=bad)
    with pytest.raises(ValueError, match=r"^num_pe must be an int in \[1, 100\] \(at most max\(rows, 64\) for a "
                                         r"100-row matrix\); got 101$"):
        EIE.from_dense(w, num_pe=101)


@pytest.mark.parametrize("make", [np.int64, np.int32, np.uint8])
def test_eie_and_nm_take_numpy_integers(make):
    """A numpy integer (what numpy arithmetic gives) is the int it holds
    (num_pe, n and m were refused: isinstance int)."""
    w = _random((9, 8), 0.5, 0)
    eie, want = F.EIE.from_dense(w, num_pe=make(3)), F.EIE.from_dense(w, num_pe=3)
    assert eie.num_pe == 3 and type(eie.num_pe) is int
    assert torch.equal(eie.col_ptr, want.col_ptr) and torch.equal(eie.to_dense(), w)
    again = F.EIE(eie.values, eie.rel_idx, eie.col_ptr, make(3), eie.shape)
    assert type(again.num_pe) is int and torch.equal(again.to_dense(), w)
    nm, want = F.NM.from_dense(w, n=make(2), m=make(4), prune=True), F.NM.from_dense(w, n=2, m=4, prune=True)
    assert (nm.n, nm.m) == (2, 4) and type(nm.n) is type(nm.m) is int
    assert torch.equal(nm.to_dense(), want.to_dense()) and nm.nbytes() == want.nbytes()
    again = F.NM(nm.values, nm.positions, make(2), make(4), nm.shape)
    assert torch.equal(again.to_dense(), want.to_dense())


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5, np.float64(2.0), "2"])
def test_eie_and_nm_refuse_bools_and_floats(bad):
    w = _random((9, 8), 0.5, 0)
    with pytest.raises(TypeError, match=f"^num_pe must be a positive int; got {re.escape(repr(bad))}$"):
        F.EIE.from_dense(w, num_pe=bad)  # (the type as EIE(...)'s num_pe and every count: was a ValueError)
    s = F.EIE.from_dense(w, num_pe=2)
    with pytest.raises(TypeError, match="num_pe must be a positive int"):
        F.EIE(s.values, s.rel_idx, s.col_ptr, bad, s.shape)
    with pytest.raises(TypeError, match=f"^n must be an int; got {re.escape(repr(bad))}$"):  # was "n and m"
        F.NM.from_dense(w, n=bad, m=4, prune=True)
    with pytest.raises(TypeError, match=f"^m must be an int; got {re.escape(repr(bad))}$"):
        F.NM.from_dense(w, n=1, m=bad, prune=True)


def test_coo_refuses_indices_outside_its_shape():
    """COO's constructor checks its indices against ``shape`` (a row index
    past it made a product with more rows than the shape, silently)."""
    ok = F.COO(torch.tensor([1, 0]), torch.tensor([3, 0]), torch.tensor([2.0, 1.0]), (2, 4))
    assert torch.equal(ok.matmul(torch.ones(4, 3)), torch.tensor([[1.0] * 3, [2.0] * 3]))
    for rows, cols, match in (([0, 99], [0, 1], "row_idx must lie in"), ([0, -1], [0, 1], "non-negative"),
                              ([0, 1], [0, 4], "col_idx must lie in"), ([0, 1], [-3, 1], "non-negative")):
        with pytest.raises(ValueError, match=match):
            F.COO(torch.tensor(rows), torch.tensor(cols), torch.tensor([1.0, 2.0]), (2, 4))


def test_load_balanced_num_pe_is_bounded_by_the_rows():
    """More PEs than rows is refused at once (it looped over every PE: a
    billion PEs hung)."""
    lin = torch.nn.Linear(8, 8)
    F.load_balanced_unstructured(lin, "weight", amount=0.5, num_pe=8)
    for bad in (9, 10**9):
        with pytest.raises(ValueError, match="num_pe must be at most the 8 rows"):
            F.load_balanced_unstructured(torch.nn.Linear(8, 8), "weight", amount=0.5, num_pe=bad)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_from_dense_refuses_sparse_layouts_and_meta_tensors(fmt):
    """A torch sparse-layout tensor is a TypeError, a meta tensor a
    ValueError (as a SparseTensor, kmap.build and sparsity_report refuse
    one; the formats alone said TypeError), each naming the argument
    (torch's RuntimeError / NotImplementedError before)."""
    cls, kwargs = FORMATS[fmt]
    for bad, error, match in ((torch.eye(4).to_sparse(), TypeError, "dense \\(strided\\)"),
                              (torch.eye(4).to_sparse_csr(), TypeError, "dense \\(strided\\)"),
                              (torch.empty(4, 4, device="meta"), ValueError, "meta tensor")):
        with pytest.raises(error, match="tensor .*" + match):
            cls.from_dense(bad, **kwargs)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_matmul_refuses_sparse_layouts_and_meta_tensors(fmt):
    """matmul's dense operand as from_dense's tensor: a torch sparse-layout
    tensor was torch's bare RuntimeError ('unsupported memory format option
    Contiguous', 'Sparse CSR tensors do not have is_contiguous') and a meta
    tensor ran; now a TypeError (sparse layout) or ValueError (meta) naming
    dense."""
    cls, kwargs = FORMATS[fmt]
    fmt_ = cls.from_dense(_input(fmt, MATRICES["random"]().float()), **kwargs)
    K = fmt_.shape[1]
    for bad, error, match in ((torch.ones(K, 2).to_sparse(), TypeError, "dense \\(strided\\)"),
                              (torch.ones(K, 2).to_sparse_csr(), TypeError, "dense \\(strided\\)"),
                              (torch.empty(K, 2, device="meta"), ValueError, "meta tensor")):
        with pytest.raises(error, match="dense .*" + match):
            fmt_.matmul(bad)


def test_compress_and_from_module_refuse_a_meta_weight():
    with torch.device("meta"):
        lin = torch.nn.Linear(4, 4)
    for call in (lambda: F.compress(lin, "csr"), lambda: F.CSR.from_module(lin),
                 lambda: F.FKW.from_module(lin)):
        with pytest.raises(ValueError, match="Linear.weight is a meta tensor"):
            call()
    for call in (lambda: F.CSR(torch.zeros(5, dtype=torch.int64, device="meta"), torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0), (4, 4)),
                 lambda: F.CSR.from_dense(torch.eye(4)).matmul(torch.ones(4, device="meta"))):
        with pytest.raises(ValueError, match="meta tensor"):  # (a constructor's arrays, a vector operand)
            call()


@pytest.mark.parametrize("prune", ["no", 1, 0, None, torch.tensor(True)])
def test_nm_prune_flag_must_be_a_bool(prune):
    """prune='no' was taken as true (any truthy object)."""
    with pytest.raises(TypeError, match="prune must be a bool"):
        F.NM.from_dense(torch.ones(2, 4), prune=prune)


PARTS_MATRIX = torch.tensor([[1.0, 0, 2, 0, 0, 3], [0, 0, 0, 0, 0, 0], [0, 4, 0, 5, 0, 0], [6, 0, 0, 0, 7, 0]])


def _parts(fmt):
    """The constructor arguments of ``fmt`` for PARTS_MATRIX (from_dense's arrays)."""
    w = PARTS_MATRIX
    if fmt == "csr":
        s = F.CSR.from_dense(w)
        return F.CSR, {"row_ptr": s.row_ptr, "col_idx": s.col_idx, "values": s.values, "shape": s.shape}
    if fmt == "csc":
        s = F.CSC.from_dense(w)
        return F.CSC, {"col_ptr": s.col_ptr, "row_idx": s.row_idx, "values": s.values, "shape": s.shape}
    if fmt == "coo":
        s = F.COO.from_dense(w)
        return F.COO, {"row_idx": s.row_idx, "col_idx": s.col_idx, "values": s.values, "shape": s.shape}
    if fmt in ("bsr", "ell"):
        s = F.BSR.from_dense(w, blocksize=2, layout="csr" if fmt == "bsr" else "ell")
        return F.BSR, {"block_ptr": s.block_ptr, "block_col": s.block_col, "values": s.values,
                       "shape": s.shape, "layout": s.layout}
    if fmt == "nm":
        s = F.NM.from_dense(w, n=2, m=4)
        return F.NM, {"values": s.values, "positions": s.positions, "n": 2, "m": 4, "shape": s.shape}
    if fmt == "eie":
        s = F.EIE.from_dense(w, num_pe=2)
        return F.EIE, {"values": s.values, "rel_idx": s.rel_idx, "col_ptr": s.col_ptr, "num_pe": 2,
                       "shape": s.shape}
    s = F.FKW.from_dense(w.reshape(4, 3, 2))
    return F.FKW, {"weight": s.weight, "index": s.index, "offset": s.offset, "reorder": s.reorder,
                   "stride": s.stride, "patterns": s.patterns, "weight_shape": s.weight_shape}


T = torch.tensor
BAD_PARTS = [
    # (format, changed arguments, error, match)
    ("csc", {"col_ptr": T([0, 1, 1, 1, 1, 1, 7]), "row_idx": T([9, 0, 0, 0, 0, 0, 0])}, ValueError,
     r"row_idx must lie in \[0, 4\)"),  # the product had 10 rows
    ("csc", {"col_ptr": T([0, 2, 3, 4, 5, 6, 7]), "row_idx": T([3, 0, 2, 0, 2, 3, 0])}, ValueError,
     "row_idx must be strictly increasing within each column"),
    ("csc", {"col_ptr": T([0, 2, 3, 4, 5, 6])}, ValueError, r"col_ptr must have K \+ 1 = 7 entries"),
    ("csr", {"row_ptr": T([0, 3, 3, 5, 9])}, ValueError, r"row_ptr\[-1\] must equal nnz"),
    ("csr", {"row_ptr": T([0, 3, 2, 5, 7])}, ValueError, "row_ptr must be non-decreasing"),  # torch's RuntimeError
    ("csr", {"row_ptr": T([1, 3, 3, 5, 7])}, ValueError, r"row_ptr\[0\] must be 0"),
    ("csr", {"row_ptr": T([[0, 3, 3, 5, 7]])}, ValueError, "row_ptr must be 1-D"),
    ("csr", {"row_ptr": T([0.0, 3, 3, 5, 7])}, TypeError, "row_ptr must be an integer tensor"),
    ("csr", {"row_ptr": T([0, 3, 3, 5, 7]).bool()}, TypeError, "row_ptr must be an integer tensor"),
    ("csr", {"row_ptr": [0, 3, 3, 5, 7]}, TypeError, "row_ptr must be a torch.Tensor"),
    ("csr", {"col_idx": T([0, 2, 6, 1, 3, 0, 4])}, ValueError, r"col_idx must lie in \[0, 6\)"),
    ("csr", {"col_idx": T([0, 5, 2, 1, 3, 0, 4])}, ValueError, "col_idx must be strictly increasing within each row"),
    ("csr", {"col_idx": T([0, 2, 2, 1, 3, 0, 4])}, ValueError, "col_idx must be strictly increasing within each row"),
    ("csr", {"col_idx": T([0, 2, 5])}, ValueError, r"col_idx must have one entry per value \(7\)"),
    ("csr", {"values": T([1, 2, 3, 4, 5, 6, 7])}, TypeError, "values must be a floating tensor"),
    ("csr", {"values": torch.ones(7, 1)}, ValueError, "values must be 1-D"),
    ("csr", {"shape": (4,)}, ValueError, "shape must be 2 sizes"),
    ("csr", {"shape": None}, TypeError, "shape must be a tuple of ints"),
    ("csr", {"shape": (4.0, 6)}, TypeError, "shape must be a tuple of ints"),
    ("csr", {"shape": (4, -6)}, ValueError, "shape must be 2 sizes >= 0"),
    ("coo", {"row_idx": T([0, 0, 0, 2, 2, 3, 3]), "col_idx": T([0, 2, 0, 1, 3, 0, 4])}, ValueError,
     r"hold the entry \(0, 0\) more than once"),
    ("coo", {"row_idx": T([0, 0, 0, 2, 2, 3, 3.0])}, TypeError, "row_idx must be an integer tensor"),
    ("bsr", {"block_ptr": T([0, 3, 2])}, ValueError, "block_ptr must be non-decreasing"),
    ("bsr", {"block_ptr": T([0, 2, 9])}, ValueError, r"block_ptr\[-1\] must equal the number of blocks"),
    ("bsr", {"block_col": T([0, 3, 2, 0, 1, 2])}, ValueError, r"block_col must lie in \[0, 3\)"),
    ("bsr", {"block_col": T([0, 1])}, ValueError, "block_col must have one entry per block"),
    # (a repeated block was summed by the products, an unsorted row taken: torch's BSR refuses both, as CSR does)
    ("bsr", {"block_col": T([0, 2, 1, 0, 1, 2])}, ValueError,
     r"block_col must be strictly increasing within each block row .* entry 2 \(1\) follows 2 in block row 0"),
    ("bsr", {"block_col": T([0, 1, 2, 0, 2, 2])}, ValueError, "block_col must be strictly increasing"),
    ("bsr", {"values": torch.ones(5, 4)}, ValueError, "values must be 3-D"),
    ("ell", {"block_ptr": T([0, 2, 6])}, ValueError, "Block-ELL block_ptr must be i \\* E"),
    ("nm", {"positions": T([0x68, 0x4E, 0x4D, 0x48])}, ValueError,
     r"positions entry \(0, 2\) = 2 points outside its group"),  # column 6 of 6
    ("nm", {"positions": T([0x4A, 0x4E, 0x4D, 0x48])}, ValueError, "positions must be strictly increasing"),
    ("nm", {"positions": T([0x48, 0x4E, 0x4D])}, ValueError, "positions must hold the M \\* L = 16"),
    ("nm", {"positions": T([0x48, 0x4E, 0x4D, 300])}, ValueError, r"positions must lie in \[0, 256\)"),
    ("nm", {"positions": T([0x48, 0x4E, 0x4D, 0x48]).float()}, TypeError, "positions must be an integer"),
    ("nm", {"values": torch.ones(4, 3)}, ValueError, r"values must be \(M, L\) = \(4, 4\)"),
    ("eie", {"col_ptr": T([[0, 1, 2, 3, 4, 4, 5], [0, 1, 2, 1, 1, 2, 2]])}, ValueError,
     r"col_ptr\[1\] must be non-decreasing"),
    ("eie", {"col_ptr": T([[1, 1, 2, 3, 4, 4, 5], [0, 1, 1, 1, 1, 2, 2]])}, ValueError, r"col_ptr\[0, 0\] must be 0"),
    ("eie", {"col_ptr": T([0, 1, 2, 3, 4, 4, 5])}, ValueError, "col_ptr must be 2-D"),
    ("eie", {"num_pe": 3}, ValueError, r"col_ptr must be \(num_pe, K \+ 1\) = \(3, 7\)"),
    ("eie", {"num_pe": 0}, ValueError, "num_pe must be a positive int"),
    ("eie", {"rel_idx": T([0x1F, 0x10, 0x00, 0x11])}, ValueError, r"rel_idx reaches row 30 >= M = 4"),
    ("eie", {"rel_idx": T([0x10, 0x10])}, ValueError, "rel_idx must hold the entries' 4-bit fields in 4 bytes"),
    ("eie", {"values": T([1.0, 2.0])}, ValueError, "values must hold the 7 entries col_ptr counts"),
    ("fkw", {"reorder": T([0, 0, 1, 2])}, ValueError, "reorder must be a permutation"),  # a row was never written
    ("fkw", {"reorder": T([0, 1, 2, 4])}, ValueError, r"reorder must lie in \[0, 4\)"),
    ("fkw", {"index": T([0, 0, 2, 0, 2, 0, 1])}, ValueError, "index holds input channel 0 twice in stored filter 0"),
    ("fkw", {"index": T([0, 3, 2, 0, 2, 0, 1])}, ValueError, r"index must lie in \[0, 3\)"),
    ("fkw", {"offset": T([0, 2, 4, 6, 5])}, ValueError, "offset must be non-decreasing"),
    ("fkw", {"offset": T([0, 2, 4, 5])}, ValueError, r"offset must have C_out \+ 1 = 5 entries"),
    ("fkw", {"stride": T([[0, 1], [0, 1], [0, 1], [0, 0]])}, ValueError, r"stride\[0, -1\] must equal the kernels"),
    ("fkw", {"stride": T([0, 1, 2, 0])}, ValueError, "stride must be 2-D"),
    ("fkw", {"patterns": T([9, 0])}, ValueError, "patterns must hold n_patterns x V"),
    ("fkw", {"weight": T([1.0, 2.0])}, ValueError, "weight must hold one value per pattern offset"),
    ("fkw", {"weight_shape": (4, 3)}, ValueError, r"offset must have C_out \+ 1|weight must hold"),
    ("fkw", {"weight_shape": (4,)}, ValueError, "weight_shape must be at least 2 sizes"),
]


@pytest.mark.parametrize("fmt, changes, error, match", BAD_PARTS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_PARTS)])
def test_constructors_refuse_arrays_that_make_no_matrix(fmt, changes, error, match):
    """Every format's constructor checks its pointer and index arrays (as the
    C++ kernels do): they gave products of the wrong shape, uninitialised rows
    (FKW reorder), a to_dense of garbage or torch's RuntimeError before."""
    cls, parts = _parts(fmt)
    assert torch.equal(cls(**parts).to_dense().reshape(4, 6), PARTS_MATRIX)  # the unchanged arrays are fine
    with pytest.raises(error, match=match):
        cls(**{**parts, **changes})


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "bsr", "ell", "nm", "eie", "fkw"])
def test_constructors_take_any_integer_index_dtype(fmt):
    cls, parts = _parts(fmt)
    wide = {k: v.to(torch.int32) if isinstance(v, torch.Tensor) and not v.is_floating_point() else v
            for k, v in parts.items()}
    assert torch.equal(cls(**wide).to_dense(), cls(**parts).to_dense())


def test_to_dense_of_a_huge_declared_shape_is_refused_before_allocating():
    """A valid format may declare a huge, empty matrix: its to_dense is a
    ValueError naming the size and the limit (was an attempt to allocate
    terabytes: torch's RuntimeError, or the kernel's OOM killer)."""
    import pointsparse.formats as F

    for fmt in (F.CSR(torch.zeros(3, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                      (2, 10**12)),
                F.COO(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                      (10**9, 10**9))):
        with pytest.raises(ValueError, match=r"to_dense of a (CSR|COO) of shape \(\d+, \d+\) needs .*GiB limit"):
            fmt.to_dense()
    small = F.CSR.from_dense(torch.eye(3))
    assert torch.equal(small.to_dense(), torch.eye(3))


@pytest.mark.parametrize("fmt", ["coo", "csr", "csc", "bsr_2x3", "nm_2_4", "eie_4", "fkw"])
def test_from_dense_of_a_huge_expanded_tensor_is_refused_before_materialising(fmt):
    """An expanded (stride 0) tensor of 10**12 entries holds 4 bytes, but
    from_dense made it contiguous first: torch's DefaultCPUAllocator error
    (terabytes). Now a ValueError naming tensor and the dense limit, before
    any copy; the same tensor at a small size still converts."""
    from pointsparse.tensor import MAX_DENSE_BYTES

    cls, kwargs = FORMATS[fmt]
    huge = torch.zeros(1, 1).expand(10**6, 10**6)
    with pytest.raises(ValueError, match=r"tensor of shape \(1000000, 1000000\) .*4,000,000,000,000 bytes.*"
                                         + f"{MAX_DENSE_BYTES / 2**30:.0f} GiB limit"):
        cls.from_dense(huge, **kwargs)
    if fmt == "fkw":  # its (C_out, C_in, *kernel) weight
        with pytest.raises(ValueError, match=r"tensor of shape \(100000, 100000, 27\) .*GiB limit"):
            cls.from_dense(torch.zeros(1, 1, 1, dtype=torch.float64).expand(10**5, 10**5, 27))
    small = torch.tensor([1.0, 0.0, 2.0, 0.0] * 2).expand(4, 8)  # (2:4 sparse, as NM takes it)
    assert torch.equal(cls.from_dense(small, **kwargs).to_dense(), small)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_matmul_of_a_huge_declared_shape_is_refused_before_allocating(backend):
    """A valid format of a huge, nearly empty (M, K): its matmul's (M, N)
    output and row pointers are checked against the dense limit first, a
    ValueError naming the shapes (was torch's DefaultCPUAllocator error)."""
    import re

    import pointsparse as ps

    one = (torch.tensor([0]), torch.ones(1))
    eie = F.EIE.from_dense(torch.eye(3), num_pe=2)
    for fmt in (F.COO(torch.tensor([0]), *one, (2**40, 3)), F.CSC(torch.tensor([0, 1, 1, 1]), *one, (2**40, 3)),
                F.EIE(eie.values, eie.rel_idx, eie.col_ptr, 2, (2**40, 3))):
        for dense in (torch.ones(3, 2), torch.ones(3), torch.ones(3, 0)):
            match = re.escape(f"matmul of a {type(fmt).__name__} of shape (1099511627776, 3) with dense of shape "
                              f"{tuple(dense.shape)}") + ".*GiB limit"
            with ps.backend(backend), pytest.raises(ValueError, match=match):
                fmt.matmul(dense)
    with ps.backend(backend):
        assert torch.equal(F.COO.from_dense(torch.eye(3)) @ torch.ones(3, 2), torch.ones(3, 2))


_UNALLOCATABLE_PRODUCT = """
import resource
import torch
import pointsparse as ps
from pointsparse import formats as F

w = torch.zeros(10**6, 4)
w[::2, 0] = 1.0
w[::3, 2] = 2.0
fmts = [F.COO.from_dense(w), F.CSR.from_dense(w), F.CSC.from_dense(w), F.BSR.from_dense(w, blocksize=2),
        F.NM.from_dense(w, n=2, m=4), F.EIE.from_dense(w, num_pe=4), F.FKW.from_dense(w[:, :, None])]
dense = torch.ones(4, 10**4)  # (10**6, 10**4) float32 out: 40 GB, under the dense limit, over the cap
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
for backend in ("auto", "torch"):
    for fmt in fmts:
        try:
            with ps.backend(backend):
                fmt.matmul(dense)
            print("ran", type(fmt).__name__, backend)
        except ValueError as exc:
            print("ValueError", exc)
        except BaseException as exc:
            print("bare", type(fmt).__name__, backend, type(exc).__name__, str(exc)[:120])
print("small", bool(torch.equal(fmts[1].matmul(torch.ones(4, 3)), w @ torch.ones(4, 3))))
"""


def test_matmul_whose_output_cannot_be_allocated_is_a_value_error():
    """A product under the dense limit that the process cannot allocate (a
    (10**6, 4) weight times a (4, 10**4) dense: a 40 GB output) was numpy's
    bare MemoryError inside the C++ call, torch's 'can't allocate'
    RuntimeError on the torch path; now every format's matmul gives the
    ValueError SparseTensor.dense() gives, naming the product's shapes. Run
    in a child whose address space is capped (RLIMIT_AS), so nothing that
    size is ever allocated."""
    from reference import run_python

    proc = run_python(_UNALLOCATABLE_PRODUCT.replace("{limit}", str(8 << 30)),
                      {"OMP_NUM_THREADS": "1", "POINTSPARSE_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "small True", proc.stdout
    refused = [line for line in lines if line.startswith("ValueError")]
    assert len(refused) == 14, proc.stdout
    for line, name in zip(refused, ["COO", "CSR", "CSC", "BSR", "NM", "EIE", "FKW"] * 2):
        assert re.search(rf"matmul of a {name} of shape \(1000000, 4\) with dense of shape \(4, 10000\).*"
                         r"\(1000000, 10000\) output .*could not be allocated", line), line


def test_matmul_inside_torch_func_transforms_and_with_a_tangent():
    """W @ X inside torch.func.grad of something else failed in .numpy()
    ('Cannot access data pointer'); it runs on a tensor made outside the
    transform. A tangent on X (jvp, forward_ad) was dropped silently (no
    tangent) and a vmap batch named no product: both are refused by name."""
    from torch.autograd import forward_ad

    torch.manual_seed(0)
    dense = torch.randn(4, 6) * (torch.rand(4, 6) > 0.5)
    W = F.CSR.from_dense(dense)
    X = torch.randn(6, 3)
    s = torch.tensor(2.0)
    got = torch.func.grad(lambda s: ((W @ X) * s).square().sum())(s)
    assert torch.allclose(got, 2 * s * (dense @ X).square().sum())
    with pytest.raises(RuntimeError, match=r"CSR.matmul gives no tangent for dense"):
        torch.func.jvp(lambda x: (W @ x).sum(), (X,), (torch.ones_like(X),))
    with forward_ad.dual_level():
        with pytest.raises(RuntimeError, match=r"CSR.matmul gives no tangent for dense"):
            W @ forward_ad.make_dual(X, torch.ones_like(X))
    with pytest.raises(RuntimeError, match=r"CSR.matmul is inference-only and cannot run on an input a torch.func "
                                           r"transform tracks"):
        torch.func.vmap(lambda x: W @ x)(X.unsqueeze(0).expand(2, 6, 3))


@pytest.mark.parametrize("kind", ["COO", "CSC"])
def test_matmul_of_a_coo_or_csc_allocates_the_row_pointers_its_check_counts(kind):
    """matmul's size check counts the (M, N) output and M + 1 int64 row
    pointers; a COO's and a CSC's product built its pointers through three
    M-long int64 arrays (bincount's counts, their cumsum and the pointer),
    so a nearly empty matrix of a large declared M allocated three times
    what the limit counted. Measured in a fresh process (peak RSS) on an
    (M, 0) product, whose output holds nothing."""
    import os
    import subprocess
    import sys

    from reference import ROOT

    M = 2**24
    make = {"COO": f"F.COO(torch.tensor([0]), torch.tensor([0]), torch.ones(1), ({M}, 3))",
            "CSC": f"F.CSC(torch.tensor([0, 1, 1, 1]), torch.tensor([0]), torch.ones(1), ({M}, 3))"}[kind]
    script = ("import resource, torch\n"
              "from pointsparse import formats as F\n"
              f"fmt = {make}\n"
              "F.COO.from_dense(torch.eye(3)) @ torch.ones(3, 2)\n"
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"assert fmt.matmul(torch.ones(3, 0)).shape == ({M}, 0)\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counted = 8 * (M + 1)
    assert int(proc.stdout) < 1.5 * counted, (int(proc.stdout), counted)



@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_from_dense_refuses_dtypes_without_kernels(fmt):
    """A float8 matrix passed the floating-point check and failed inside torch
    ('"nonzero_count_cpu" not implemented for Float8_e4m3fn', from every
    format), and FKW gave a ValueError for an integer, complex or bool one
    where the others give a TypeError: now a TypeError naming the argument
    and the dtypes taken, from every format."""
    cls, kwargs = FORMATS[fmt]
    w = _input(fmt, MATRICES["random"]()).to(torch.float32)
    if cls is F.FKW:
        w = w[:, :10].reshape(13, 2, 5)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.int32, torch.bool):
        with pytest.raises(TypeError, match=r"tensor must be a floating .*float16, bfloat16, float32 or float64"):
            cls.from_dense(w.to(dtype), **kwargs)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "bsr", "ell", "nm", "eie", "fkw"])
def test_constructors_refuse_float8_values(fmt):
    """float8 stored values passed the constructors' floating-point check and
    failed later inside torch (to_dense, matmul)."""
    cls, parts = _parts(fmt)
    name = "weight" if cls is F.FKW else "values"
    parts[name] = parts[name].to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=rf"{name} must be a floating .*float16, bfloat16, float32 or float64"):
        cls(**parts)


def test_nnz_counts_from_the_stored_arrays_never_the_dense_matrix(monkeypatch):
    """``nnz`` made the whole dense matrix to count it: a 20000 x 20000 COO
    of 2 entries took 2.6 s and 1.6 GB (a formats review). It counts the
    stored arrays now, with the same meaning: the nonzeros of the matrix
    held (a stored explicit zero not counted; Block-ELL's padding blocks at
    block column 0, which its products sum, counted as their sum)."""
    for cls in (F.COO, F.BSR):
        monkeypatch.setattr(cls, "to_dense", lambda self: pytest.fail("nnz made the dense matrix"))
    big = F.COO(torch.tensor([0, 19999]), torch.tensor([0, 19999]), torch.tensor([1.0, 0.0]), (20000, 20000))
    assert big.nnz == 1
    # two Block-ELL blocks stored at block (0, 0): [[1, 0], [0, 0]] + [[-1, 2], [0, 0]] = [[0, 2], [0, 0]]
    twice = F.BSR(torch.tensor([0, 2]), torch.tensor([0, 0]),
                  torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[-1.0, 2.0], [0.0, 0.0]]]), (2, 2), layout="ell")
    assert twice.nnz == 1
    assert F.CSR.from_dense(torch.zeros(0, 5)).nnz == 0 and F.CSC.from_dense(torch.zeros(3, 0)).nnz == 0


def test_a_format_multiplies_only_what_it_stores_so_inf_inputs_give_nan_in_fewer_places():
    """README: outputs equal the masked dense module's for finite inputs; an
    inf input gives NaN where a stored value (an N:M group's explicit zero
    too) meets it, and nowhere else (the dense product: at every zero)."""
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]])
    nm = F.NM.from_dense(w, 2, 4)
    stored = set(nm._columns()[0].tolist())
    assert len(stored) == 4 and {0, 4} <= stored  # each group: its nonzero and one explicit zero
    csr = F.CSR.from_dense(w)
    for col in (1, 2, 3, 5, 6, 7):
        x = torch.ones(8, 1)
        x[col] = float("inf")
        assert torch.isnan(w @ x).all()  # the dense product: 0 * inf
        assert (csr @ x).item() == 3.0  # stores no zero
        got = (nm @ x).item()
        if col in stored:
            assert math.isnan(got), col
        else:
            assert got == 3.0, col


def test_fkw_shape_is_its_matrix_view_and_to_dense_its_weight():
    """A formats review found FKW's ``shape`` (the (C_out, C_in * V) matrix its matmul multiplies) unlike its
    ``to_dense()`` (the weight, (C_out, C_in, *kernel)); the docstring says so, and this pins both: the
    matrix view is what the product multiplies."""
    w = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    w[w.abs() < 0.5] = 0
    f = F.FKW.from_dense(w)
    assert f.shape == (4, 6) and f.weight_shape == (4, 3, 2) and torch.equal(f.to_dense(), w)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(f @ x, f.to_dense().reshape(f.shape) @ x)


def _torch_interop_cases():
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w[w.abs() < 0.7] = 0
    w[:, 1::4] = 0
    w[:, 2::4] = 0  # (2:4 already: NM takes it as it is)
    return w, [(F.CSR, {}), (F.CSC, {}), (F.COO, {}), (F.BSR, {"blocksize": (2, 4)}),
               (F.BSR, {"blocksize": (4, 3), "layout": "ell"}), (F.NM, {"n": 2, "m": 4}), (F.EIE, {"num_pe": 2}),
               (F.FKW, {})]


def test_formats_convert_to_and_from_torch_sparse_and_transpose_and_multiply_from_the_left():
    """A formats review: no converter to or from torch.sparse, no ``.T``, no ``dense @ fmt``. Every format now
    gives ``to_torch()`` (CSR / CSC their own compressed layouts, the others a coalesced COO), takes
    ``from_torch`` of every torch sparse layout and of a dense tensor, transposes (``.T``: CSR <-> CSC on the
    same arrays, the others a COO) and multiplies from the left, each against the dense matrix."""
    w, cases = _torch_interop_cases()
    x_left = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v_left = torch.randn(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for cls, kwargs in cases:
        f = cls.from_dense(w, **kwargs)
        matrix = f.to_dense().reshape(f.shape)
        assert torch.equal(matrix, w), cls
        t = f.to_torch()
        want_layout = {F.CSR: torch.sparse_csr, F.CSC: torch.sparse_csc}.get(cls, torch.sparse_coo)
        assert t.layout == want_layout and t.dtype == torch.float64 and tuple(t.shape) == (6, 8)
        assert torch.equal(t.to_dense(), w), cls
        for source in (w, w.to_sparse_coo(), w.to_sparse_csr(), w.to_sparse_csc(), w.to_sparse_bsr((2, 2)),
                       w.to_sparse_bsc((3, 4))):
            g = cls.from_torch(source, **kwargs)
            assert type(g) is cls and torch.equal(g.to_dense().reshape(g.shape), w), (cls, source.layout)
        assert torch.equal(f.T.to_dense(), w.t()) and f.T.shape == (8, 6), cls
        torch.testing.assert_close(x_left @ f, x_left @ w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v_left @ f, v_left @ w, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match=r"dense must be \(N, 6\) or \(6,\) to multiply a 6 x 8 .* from the left"):
            torch.randn(5, 7, dtype=torch.float64) @ f
    csr = F.CSR.from_dense(w)
    assert type(csr.T) is F.CSC and csr.T.values.data_ptr() == csr.values.data_ptr() and type(csr.T.T) is F.CSR


def test_from_torch_keeps_stored_zeros_sums_coo_repeats_and_refuses_what_is_no_matrix():
    """from_torch takes a sparse tensor's stored entries as they are, as scipy's converters do: an explicit
    zero stays stored (nnz does not count it), a COO's repeated entry is summed (coalesce); a tensor that is
    no 2-D floating matrix is refused naming it."""
    stored = torch.sparse_csr_tensor(torch.tensor([0, 2, 3]), torch.tensor([0, 2, 1]),
                                     torch.tensor([1.0, 0.0, 3.0]), (2, 3))
    csr = F.CSR.from_torch(stored)
    assert csr.values.tolist() == [1.0, 0.0, 3.0] and csr.nnz == 2
    repeated = torch.sparse_coo_tensor(torch.tensor([[0, 0, 1], [1, 1, 0]]), torch.tensor([1.0, 2.0, 4.0]), (2, 2))
    assert F.COO.from_torch(repeated).to_dense().tolist() == [[0.0, 3.0], [4.0, 0.0]]
    with pytest.raises(ValueError, match="2-D sparse matrix"):
        F.CSR.from_torch(torch.eye(2).to_sparse_coo().unsqueeze(0))
    with pytest.raises(ValueError, match="2-D sparse matrix"):
        F.COO.from_torch(torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, 3), (2, 3)))
    with pytest.raises(TypeError, match="tensor must be a floating tensor"):
        F.CSR.from_torch(torch.eye(3, dtype=torch.int64).to_sparse_csr())
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        F.CSR.from_torch([[1.0]])
    with pytest.raises(ValueError, match="meta"):
        F.COO.from_torch(torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0), (2, 2))
                         .to("meta"))


def test_to_torch_keeps_the_stored_zeros_of_the_formats_that_store_them_and_names_left_products_as_such():
    """A review: to_torch()'s docstring said every format kept its explicit zeros, but BSR and EIE give their
    nonzeros; and ``X @ W``'s errors named the transposed format (``CSC.matmul gives no gradient`` for a CSR)
    while from_torch of a COO printed torch's beta warning for its compressed layouts."""
    import warnings

    w = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0]])
    stored_zero = F.CSR(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2]), torch.tensor([1.0, 0.0, 3.0]), (2, 4))
    assert stored_zero.to_torch().values().tolist() == [1.0, 0.0, 3.0]
    nm = F.NM.from_dense(w, n=2, m=4)
    assert nm.to_torch()._nnz() == 4 and torch.equal(nm.to_torch().to_dense(), w)  # (each group's explicit zero)
    for fmt in (F.BSR.from_dense(w, blocksize=2), F.EIE.from_dense(w, num_pe=2)):
        t = fmt.to_torch()
        assert t._nnz() == 3 and torch.equal(t.to_dense(), w), type(fmt).__name__
    with pytest.raises(RuntimeError, match=r"dense @ CSR gives no gradient"):
        torch.ones(3, 2).requires_grad_() @ stored_zero
    with pytest.raises(TypeError, match=r"dense must have dtype torch.float32"):
        torch.ones(3, 2, dtype=torch.float64) @ stored_zero
    out = torch.ones(3, 2) @ stored_zero
    assert out.is_contiguous() and out.tolist() == [[1.0, 0.0, 3.0, 0.0]] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.CSR.from_torch(w.to_sparse_coo())
        F.CSC.from_torch(w.to_sparse_coo())
        F.CSR.from_dense(w).to_torch()
