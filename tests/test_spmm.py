"""The SpMM kernels called directly: products against dense matmul across
the cache-block and tile boundaries, thread-count independence, and bad
inputs rejected with ValueError before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointsparse import _ext
from pointsparse.formats import BSR, CSR, EIE, NM
from reference import CORE_ONLY, default_isa, run_in_children

core = _ext.core
#: The kernel builds this CPU runs, widest first ("generic" always).
ISAS = core.runnable_isas()


def _sparse(M, K, density, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((M, K)).astype(dtype)
    w[rng.random((M, K)) >= density] = 0
    return w


def _csr_arrays(w, col_dtype=np.uint32):
    rows, cols = np.nonzero(w)
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=w.shape[0]))]).astype(np.int64)
    return row_ptr, cols.astype(col_dtype), w[rows, cols]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 7, 31, 32, 33, 64, 65, 129, 300])
@pytest.mark.parametrize("isa", ISAS)
def test_csr_kernel_against_dense(dtype, N, isa):
    w = _sparse(40, 70, 0.25, N, dtype)
    x = np.random.default_rng(N + 1).standard_normal((70, N)).astype(dtype)
    row_ptr, col, val = _csr_arrays(w)
    y = core.csr_spmm(row_ptr, col, val, x, 70, isa, 2)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, w.astype(np.float64) @ x.astype(np.float64), atol=tol, rtol=tol)


@pytest.mark.parametrize("col_dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_csr_kernel_index_widths(col_dtype):
    w = _sparse(30, 200, 0.2, 3)
    x = np.random.default_rng(4).standard_normal((200, 50)).astype(np.float32)
    row_ptr, col, val = _csr_arrays(w, col_dtype)
    np.testing.assert_allclose(core.csr_spmm(row_ptr, col, val, x, 200, False, 2), w @ x,
                               atol=1e-4, rtol=1e-4)


def test_kernels_deterministic_over_threads():
    w = _sparse(333, 257, 0.1, 5)
    w[:100] = 0  # skewed rows: the nonzero-balanced split differs from an even one
    x = np.random.default_rng(6).standard_normal((257, 700)).astype(np.float32)
    t = torch.from_numpy(w)
    for fmt in (CSR.from_dense(t), BSR.from_dense(t, blocksize=(4, 2)), EIE.from_dense(t, num_pe=3),
                NM.from_dense(t, prune=True)):
        for isa in ISAS:
            outs = [fmt._kernel(x, isa)]
            for nt in (1, 2, 4):
                monkey = _ext.num_threads
                try:
                    _ext.num_threads = lambda nt=nt: nt
                    outs.append(fmt._kernel(x, isa))
                finally:
                    _ext.num_threads = monkey
            for o in outs[1:]:
                assert np.array_equal(outs[0], o), (type(fmt).__name__, isa)


def test_csr_kernel_bad_inputs():
    w = _sparse(5, 6, 0.5, 7)
    row_ptr, col, val = _csr_arrays(w)
    x = np.ones((6, 3), np.float32)
    ok = dict(row_ptr=row_ptr, col=col, val=val, x=x, K=6)

    def call(**kw):
        a = {**ok, **kw}
        return core.csr_spmm(a["row_ptr"], a["col"], a["val"], a["x"], a["K"], False, 2)

    call()
    bad_ptr = row_ptr.copy()
    bad_ptr[2], bad_ptr[3] = bad_ptr[3] + 1, bad_ptr[2]
    cases = [
        (dict(row_ptr=row_ptr[:-1]), "row_ptr"),
        (dict(row_ptr=bad_ptr), "non-decreasing|row_ptr"),
        (dict(col=(col + 6).astype(np.uint32)), "col_idx must be < K"),
        (dict(col=col.astype(np.int64)), "unsigned"),
        (dict(val=val.astype(np.float64)), "same dtype"),
        (dict(val=val.astype(np.int32), x=x.astype(np.int32)), "float32 or float64"),
        (dict(x=np.ones((5, 3), np.float32)), "dense must be 2-D with 6 rows"),
        (dict(x=np.ones(6, np.float32)), "dense must be 2-D"),
        (dict(val=val[:-1]), "values"),
        (dict(K=-1), "K must be >= 0"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call(**kw)


def test_bsr_nm_eie_kernels_bad_inputs():
    t = torch.from_numpy(_sparse(8, 8, 0.4, 8))
    x = np.ones((8, 2), np.float32)
    b = BSR.from_dense(t, blocksize=2)
    ptr = b.block_ptr.numpy().astype(np.int64)
    with pytest.raises(ValueError, match="block_col must be <"):
        core.bsr_spmm(ptr, b.block_col.numpy() + 10, b.values.numpy(), x, 8, 8, False, 2)
    with pytest.raises(ValueError, match="values must be"):
        core.bsr_spmm(ptr, b.block_col.numpy(), b.values.numpy()[:, 0], x, 8, 8, False, 2)
    with pytest.raises(ValueError, match="block_ptr"):
        core.bsr_spmm(ptr, b.block_col.numpy(), b.values.numpy(), x, 12, 8, False, 2)

    nm = NM.from_dense(t, prune=True)
    pos = nm.positions.numpy()
    with pytest.raises(ValueError, match="positions"):
        core.nm_spmm(pos[:-1], nm.values.numpy(), 2, 2, 4, x, 8, False, 2)
    with pytest.raises(ValueError, match="n:m"):
        core.nm_spmm(pos, nm.values.numpy(), 2, 5, 4, x, 8, False, 2)
    with pytest.raises(ValueError, match="bits"):
        core.nm_spmm(pos, nm.values.numpy(), 1, 2, 4, x, 8, False, 2)
    # 3:5 with 3-bit positions: a position of 7 points outside its group of 5
    nm35 = NM.from_dense(torch.ones(1, 5), n=3, m=5, prune=True)
    bad = np.array([0xFF, 0x01], np.uint8)
    with pytest.raises(ValueError, match="outside its group"):
        core.nm_spmm(bad, nm35.values.numpy(), 3, 3, 5, np.ones((5, 1), np.float32), 5, False, 2)

    e = EIE.from_dense(t, num_pe=2)
    cp = e.col_ptr.numpy().astype(np.int64)
    with pytest.raises(ValueError, match="local row"):
        core.eie_spmm(cp, np.full_like(e.rel_idx.numpy(), 0xFF), e.values.numpy(), x, 8, False, 2)
    with pytest.raises(ValueError, match="rel_idx"):
        core.eie_spmm(cp, e.rel_idx.numpy()[:-1], e.values.numpy(), x, 8, False, 2)
    with pytest.raises(ValueError, match="col_ptr"):
        core.eie_spmm(cp[:, ::-1].copy(), e.rel_idx.numpy(), e.values.numpy(), x, 8, False, 2)


# Sizes whose arithmetic overflowed int64 (the lengths checked against a
# wrapped value, then arrays read far out of bounds): each call in a child
# process, which a crash would kill; the words its message must hold.
OVERFLOW = {
    "bsr_rows": ("core.bsr_spmm(np.zeros(1, np.int64), np.zeros(0, np.uint32), np.zeros((0, 3, 2), np.float32), "
                 "np.zeros((8, 1), np.float32), 2**63 - 1, 8, None, 2)", "block_ptr must be 1-D of length"),
    "bsr_rows_one_row_blocks": ("core.bsr_spmm(np.zeros(1, np.int64), np.zeros(0, np.uint32), "
                                "np.zeros((0, 1, 2), np.float32), np.zeros((8, 1), np.float32), 2**63 - 1, 8, None, 2)",
                                "block_ptr must be 1-D of length 9223372036854775808"),
    "eie_entries": ("core.eie_spmm(np.array([[0, 2**63 - 1], [0, 1]]), np.zeros(1, np.uint8), np.zeros(1, np.float32), "
                    "np.zeros((1, 1), np.float32), 4, None, 2)", "col_ptr[:, -1] must add up to len(values)"),
    "eie_entries_wrap_to_zero": ("core.eie_spmm(np.array([[0, 2**62]] * 4), np.zeros(0, np.uint8), "
                                 "np.zeros(0, np.float32), np.zeros((1, 1), np.float32), 4, None, 2)",
                                 "col_ptr[:, -1] must add up to len(values)"),
    # The output (M, N): M x N x 4 bytes past 2^63 (numpy refused it without naming M or N).
    "csr_output": ("core.csr_spmm(np.zeros(5, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.float32), "
                   "np.empty((0, 2**60), np.float32), 0, None, 2)", "output (M, N) = (4, 1152921504606846976)"),
    "bsr_output": ("core.bsr_spmm(np.zeros(2, np.int64), np.zeros(0, np.uint8), np.zeros((0, 2**60, 1), np.float32), "
                   "np.empty((0, 4), np.float32), 2**60, 0, None, 2)", "output (M, N) = (1152921504606846976, 4)"),
    "nm_output": ("core.nm_spmm(np.zeros(0, np.uint8), np.empty((2**60, 0), np.float32), 1, 1, 1, "
                  "np.empty((0, 4), np.float32), 0, None, 2)", "output (M, N) = (1152921504606846976, 4)"),
    "eie_output": ("core.eie_spmm(np.zeros((1, 1), np.int64), np.zeros(0, np.uint8), np.zeros(0, np.float32), "
                   "np.empty((0, 4), np.float32), 2**60, None, 2)", "output (M, N) = (1152921504606846976, 4)"),
    # An output that fits int64 but passes the 2^36-byte limit on a dense result (the formats' own check,
    # pointsparse.tensor.MAX_DENSE_BYTES): refused by the core too, before a 2^38-byte allocation.
    "csr_output_past_limit": ("core.csr_spmm(np.zeros(5, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.float32), "
                              "np.empty((0, 2**34), np.float32), 0, None, 2)", "past the 2^36-byte (64 GiB) limit"),
    "eie_output_past_limit": ("core.eie_spmm(np.zeros((1, 1), np.int64), np.zeros(0, np.uint8), "
                              "np.zeros(0, np.float32), np.empty((0, 8), np.float32), 2**32, None, 2)",
                              "output (M, N) = (4294967296, 8) of float32 would take 137438953472 bytes"),
}


def test_sizes_that_overflow_are_refused():
    results = run_in_children({k: v[0] for k, v in OVERFLOW.items()}, setup=CORE_ONLY + "import numpy as np\n")
    for name, (_, word) in OVERFLOW.items():
        r = results[name]
        assert r["status"] == 0, f"{name} crashed the process (status {r['status']})"
        assert r["exc"] == "ValueError" and word in r["msg"], (name, r)


def test_csr_conv_accumulate_refuses_an_out_sharing_memory():
    """out is written by parallel blocks while feats and values are read:
    an out overlapping either raced (results changed from run to run)."""
    s = _sparse(4, 4, 0.6, 13)
    row_ptr, col, val = _csr_arrays(s, np.uint8)
    buf = np.random.default_rng(14).standard_normal((6, 4)).astype(np.float32)
    idx = np.arange(3, dtype=np.int64)
    with pytest.raises(ValueError, match="feats must not share memory with out"):
        core.csr_conv_accumulate(row_ptr, col, val, buf, idx, idx + 3, buf, None, 2)
    with pytest.raises(ValueError, match="feats must not share memory with out"):
        core.csr_conv_accumulate(row_ptr, col, val, buf[:4], idx, idx, buf[2:], None, 2)
    out = np.zeros((len(val), 4), np.float32)
    with pytest.raises(ValueError, match="values must not share memory with out"):
        core.csr_conv_accumulate(row_ptr, col, out.reshape(-1)[:len(val)], buf, idx, idx, out, None, 2)
    # rows of one buffer that do not overlap: accepted, and the sum is right
    want = buf.astype(np.float64)
    want[3:] += buf[:3].astype(np.float64) @ s.T.astype(np.float64)
    core.csr_conv_accumulate(row_ptr, col, val, buf[:3], idx, idx, buf[3:], None, 2)
    np.testing.assert_allclose(buf, want, atol=1e-5, rtol=1e-5)


# out over the memory of an index array the kernel reads while it writes out:
# the pairs and the CSR structure, checked before the kernel, were overwritten
# by its sums and read back as rows and columns far outside the arrays
# (SIGSEGV, or garbage summed silently). Each call in a child process.
ACCUMULATE_OUT_OVER_INDICES = {
    "in_idx": ("buf = np.zeros(16, np.int64)\nbuf[:2] = [0, 3]\n"
               "core.csr_conv_accumulate(row_ptr, col, big, feats, buf[:2], np.array([0, 1]), "
               "buf.view(np.float32).reshape(16, 2), None, 2)"),
    "out_idx": ("buf = np.zeros(8, np.int64)\nbuf[:2] = [0, 1]\n"
                "core.csr_conv_accumulate(row_ptr, col, big, feats, np.array([0, 3]), buf[:2], "
                "buf.view(np.float32).reshape(8, 2), None, 2)"),
    "row_ptr": ("buf = np.zeros(8, np.int64)\nbuf[:3] = row_ptr\n"
                "core.csr_conv_accumulate(buf[:3], col, big, feats, np.array([0, 3]), np.array([0, 1]), "
                "buf.view(np.float32).reshape(8, 2), None, 2)"),
    "col_idx": ("buf = np.zeros(8, np.uint32)\nbuf[:3] = col\n"
                "core.csr_conv_accumulate(row_ptr, buf[:3], big, feats, np.array([0, 3]), np.array([0, 1]), "
                "buf.view(np.float32).reshape(4, 2), None, 2)"),
}


def test_csr_conv_accumulate_refuses_an_out_over_its_index_arrays():
    setup = (CORE_ONLY + "import numpy as np\nrow_ptr = np.array([0, 2, 3], np.int64)\n"
             "col = np.array([0, 2, 1], np.uint32)\nbig = np.full(3, 1e30, np.float32)\n"
             "feats = np.full((4, 3), 1e8, np.float32)\n")
    results = run_in_children(ACCUMULATE_OUT_OVER_INDICES, setup=setup)
    for name in ACCUMULATE_OUT_OVER_INDICES:
        r = results[name]
        assert r["status"] == 0, f"out over {name}: the process crashed (status {r['status']})"
        assert r["exc"] == "ValueError" and f"{name} must not share memory with out" in r["msg"], (name, r)


def test_csr_conv_accumulate_sizes_no_table_by_an_empty_out():
    """An out without columns (C_out = 0) backs none of its N_out rows: the
    check of distinct out_idx took a table of N_out flags all the same (2^40
    bytes here), allocated before any pair was read. In a child capped at
    3 GB of address space: the call runs, and repeated rows are still refused."""
    from reference import run_core_capped

    code = (
        "args = (np.zeros(1, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.float32), np.ones((2, 3), np.float32))\n"
        "out = np.empty((2**40, 0), np.float32)\n"
        "core.csr_conv_accumulate(*args, np.array([0, 1]), np.array([5, 2**40 - 1]), out, None, 2)\n"
        "print('ran')\n"
        "for rows in ([7, 7], [2**40, 0]):\n"
        "    attempt(lambda: core.csr_conv_accumulate(*args, np.array([0, 1]), np.array(rows), out, None, 2), rows)\n"
    )
    proc = run_core_capped(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "ran" and len(lines) == 3, proc.stdout
    assert "out_idx must hold distinct rows" in lines[1], lines[1]
    assert "out_idx[0] = 1099511627776 is outside" in lines[2], lines[2]


def test_operands_that_cannot_be_copied_contiguous_are_value_errors():
    """Each operand that is not C-contiguous is copied before the kernels run;
    where numpy could not make the copy (a broadcast view of more bytes than
    the process may hold), the copy was a null array that the checks then
    read (SIGSEGV). In a child capped at 3 GB of address space, views of
    4 GiB or more: a ValueError naming the operand, and the process lives."""
    from reference import run_core_capped

    code = (
        "wide = np.broadcast_to(np.float32(1), (2**20, 2**10))\n"  # 4 GiB
        "e64, eu8, ef = np.zeros(1, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.float32)\n"
        "attempt(lambda: core.csr_spmm(e64, eu8, ef, wide, 2**20, None, 2), 'csr dense')\n"
        "attempt(lambda: core.csr_spmm(e64, np.broadcast_to(np.uint8(0), (2**33,)), ef, wide[:1], 1, None, 2), "
        "'csr col_idx')\n"
        "attempt(lambda: core.bsr_spmm(e64, eu8, np.zeros((0, 1, 1), np.float32), wide, 0, 2**20, None, 2), "
        "'bsr dense')\n"
        "attempt(lambda: core.bsr_spmm(np.zeros(2, np.int64), np.zeros(1, np.uint8), "
        "np.broadcast_to(np.float32(1), (1, 2**16, 2**16)), wide[:1], 1, 1, None, 2), 'bsr values')\n"
        "attempt(lambda: core.nm_spmm(eu8, wide, 0, 1, 1, wide[:1], 1, None, 2), 'nm values')\n"
        "attempt(lambda: core.nm_spmm(eu8, np.zeros((0, 2**20), np.float32), 0, 1, 1, wide, 2**20, None, 2), "
        "'nm dense')\n"
        "attempt(lambda: core.eie_spmm(np.zeros((1, 2**20 + 1), np.int64), eu8, ef, wide, 0, None, 2), "
        "'eie dense')\n"
        "attempt(lambda: core.eie_spmm(np.zeros((1, 2), np.int64), eu8, np.broadcast_to(np.float32(1), (2**31,)), "
        "wide[:1], 0, None, 2), 'eie values')\n"
        "attempt(lambda: core.csr_conv_accumulate(np.zeros(2**10 + 1, np.int64), eu8, ef, wide, e64[:0], e64[:0], "
        "np.zeros((1, 2**10), np.float32), None, 2), 'accumulate feats')\n"
    )
    proc = run_core_capped(code)
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 9, proc.stdout
    for line, name in zip(lines, ["dense", "col_idx", "dense", "values", "values", "dense", "dense", "values",
                                  "feats"]):
        assert line.startswith(f"ValueError {name} ") and "C-contiguous" in line, line


def test_empty_operands():
    for M, K, N in ((0, 4, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)):
        w = torch.zeros(M, K)
        x = torch.randn(K, N)
        for fmt in (CSR.from_dense(w), BSR.from_dense(w, blocksize=2), EIE.from_dense(w, num_pe=2),
                    NM.from_dense(w)):
            out = fmt.matmul(x)
            assert out.shape == (M, N) and not out.any()


def test_isa_reported():
    assert core.spmm_isa() == default_isa() and ISAS[-1] == "generic"  # (POINTSPARSE_ISA's cap, if set)
    x = np.ones((3, 2), np.float32)
    row_ptr, col, val = _csr_arrays(np.eye(2, 3, dtype=np.float32))
    with pytest.raises(ValueError, match="isa must be one of"):
        core.csr_spmm(row_ptr, col, val, x, 3, "avx1024", 1)
    for name in {"avx512", "avx2"} - set(ISAS):
        with pytest.raises(ValueError, match="does not run on this CPU"):
            core.csr_spmm(row_ptr, col, val, x, 3, name, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 300])
def test_every_build_matches_generic(dtype, N):
    """CSR, BSR, N:M and EIE in every build that runs here against the generic
    build and dense matmul, across the tile and column-block widths of each
    build (8 vectors of 32 or 64 bytes; blocks of 256 or 512 bytes)."""
    w = _sparse(70, 90, 0.3, N, dtype)
    t = torch.from_numpy(w)
    x = np.random.default_rng(N + 2).standard_normal((90, N)).astype(dtype)
    ref = w.astype(np.float64) @ x.astype(np.float64)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for fmt in (CSR.from_dense(t), BSR.from_dense(t, blocksize=(4, 3)), EIE.from_dense(t, num_pe=3),
                NM.from_dense(t, prune=True)):
        generic = fmt._kernel(x, "generic")
        dense = fmt.to_dense().double().numpy() @ x.astype(np.float64)
        for isa in ISAS:
            y = fmt._kernel(x, isa)
            np.testing.assert_allclose(y, dense, atol=tol, rtol=tol, err_msg=f"{type(fmt).__name__} {isa}")
            np.testing.assert_allclose(y, generic, atol=tol, rtol=tol, err_msg=f"{type(fmt).__name__} {isa}")
        if not isinstance(fmt, NM):  # N:M prunes: its dense is not w
            np.testing.assert_allclose(dense, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("isa", ISAS)
def test_csr_conv_accumulate(dtype, isa):
    rng = np.random.default_rng(11)
    c_in, c_out, n_in, n_out, pairs = 13, 9, 200, 150, 140
    s = _sparse(c_out, c_in, 0.4, 12, dtype)
    row_ptr, col, val = _csr_arrays(s, np.uint8)
    feats = rng.standard_normal((n_in, c_in)).astype(dtype)
    in_idx = rng.integers(0, n_in, pairs).astype(np.int64)
    out_idx = rng.permutation(n_out)[:pairs].astype(np.int64)
    out = rng.standard_normal((n_out, c_out)).astype(dtype)
    ref = out.astype(np.float64).copy()
    ref[out_idx] += feats[in_idx].astype(np.float64) @ s.T.astype(np.float64)
    core.csr_conv_accumulate(row_ptr, col, val, feats, in_idx, out_idx, out, isa, 2)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    for kw, msg in ((dict(out_idx=np.zeros(pairs, np.int64)), "distinct"),
                    (dict(in_idx=in_idx + n_in), "in_idx"),
                    (dict(out_idx=out_idx - n_out - 1), "out_idx"),
                    (dict(out=out[:, :3].copy()), "out must be"),
                    (dict(out=np.asfortranarray(out)), "C-contiguous"),
                    (dict(feats=feats[:, :2].copy()), "col_idx must be < C_in")):
        a = dict(in_idx=in_idx, out_idx=out_idx, out=out, feats=feats, **{})
        a.update(kw)
        with pytest.raises(ValueError, match=msg):
            core.csr_conv_accumulate(row_ptr, col, val, a["feats"], a["in_idx"], a["out_idx"],
                                     a["out"], isa, 2)
