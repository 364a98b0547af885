"""The engine executes weight sparsity: skipped kernel offsets, the
vector-sparse fused kernels, masked weight gradients and custom kernel
regions, each against the dense engine (bit for bit where the arithmetic is
the same) and against torch references with the pruned entries zeroed."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse import prune
from pointsparse.nn import _engine
from pointsparse.nn import functional as F
from reference import conv_sum, default_isa, dense_conv, random_coords, run_python


def make(n=400, c=8, extent=8, dtype=torch.float64, seed=0):
    coords = random_coords(n, extent, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=dtype), coords)


def sparse_weight(volume, c_in, c_out, dtype, seed=0, vector_keep=0.3, dead=(0, 4), span=1):
    """Random weight with whole vectors (offset, input channel, ``span``
    adjacent panels) zeroed at random and the offsets ``dead`` zeroed."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(volume, c_in, c_out, generator=g, dtype=dtype)
    width = _engine.panel_width(dtype) * span
    panels = -(-c_out // width)
    keep = torch.rand(volume, c_in, panels, generator=g) < vector_keep
    w *= keep.repeat_interleave(width, 2)[:, :, :c_out].to(dtype)
    w[[d for d in dead if d < volume]] = 0
    return w


def case(k, t, transposed, c_in, c_out, dtype, seed=0):
    x = make(c=c_in, dtype=dtype, seed=seed)
    src = x
    if transposed:
        down = ps.kmap.get_kmap(x, k, t)
        src = ps.SparseTensor(torch.randn(down.num_out, c_in, dtype=dtype), down.out_coords, 2, cache=x.cache,
                              validate=False)
    kmap = ps.kmap.get_kmap(src, k, t, 1, transposed)
    return src.feats, kmap


def run_core(plan, feats, w, g, portable, active=None, vector=False, wactive=None, mask=None, nt=None):
    nt = nt or 2
    out = torch.full((plan.num_out, w.shape[2]), float("nan"), dtype=w.dtype)
    plan.core.forward(feats.numpy(), w.numpy(), None, out.numpy(), nt, isa=portable, active=active, vector=vector)
    gf = torch.full_like(feats, float("nan"))
    plan.core.backward_input(g.numpy(), w.numpy(), gf.numpy(), nt, isa=portable, active=active, vector=vector)
    gw = torch.full_like(w, float("nan"))
    plan.core.backward_weight(feats.numpy(), g.numpy(), gw.numpy(), nt, isa=portable, active=wactive,
                              mask=None if mask is None else mask.numpy())
    return out, gf, gw


CASES = [(3, 1, False), (2, 2, False), (2, 2, True), (5, 1, False)]
#: The kernel builds this CPU runs, widest first: each has its own
#: vector-sparse forward (avx512: one 64-byte vector per panel, a taller tile).
ISAS = ps._ext.core.runnable_isas()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# (8, 24): panels of exactly one 32-byte vector of float32 (all of c_in = 8
# in the input gradient, the last of c_out = 24), which the vector kernels'
# one-vector tiles take whole.
@pytest.mark.parametrize("c_in,c_out", [(1, 1), (5, 6), (7, 17), (13, 35), (8, 24), (64, 64)])
@pytest.mark.parametrize("k,t,transposed", CASES)
def test_skipping_and_vector_kernels_equal_the_dense_kernels(k, t, transposed, c_in, c_out, dtype, isa):
    """Forward and input gradient of each build: skipping zero offsets and
    zero vectors changes no bit; weight gradient with a mask: dense gradient
    * mask, bit for bit; and all of it against torch ops on the zeroed weight."""
    feats, kmap = case(k, t, transposed, c_in, c_out, dtype)
    plan = _engine.make_fused_plan(kmap)
    w = sparse_weight(kmap.kernel_volume, c_in, c_out, dtype)
    mask = (w != 0).to(dtype)
    g = torch.randn(kmap.num_out, c_out, dtype=dtype)
    dense = run_core(plan, feats, w, g, isa)
    fwd = _engine.choose_execution(w)
    assert fwd.active is not None and not fwd.active[0]
    wactive = _engine.weight_execution(mask, None)[0]
    assert wactive is not None and not wactive[0]
    for vector in (False, True):  # vector: the vector kernels and the masked weight gradient
        out, gf, gw = run_core(plan, feats, w, g, isa, fwd.active, vector, wactive, mask if vector else None)
        assert torch.equal(out, dense[0]) and torch.equal(gf, dense[1])
        assert torch.equal(gw * mask, dense[2] * mask)
        assert not gw[0].any() and not (vector and gw[mask == 0].any())
    f, ww = feats.clone().requires_grad_(), w.clone().requires_grad_()
    ref = conv_sum(f, ww, kmap)
    ref_gf, ref_gw = torch.autograd.grad(ref, (f, ww), g)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(out, ref.detach(), **tol)
    torch.testing.assert_close(gf, ref_gf, **tol)
    torch.testing.assert_close(gw, ref_gw * mask, **tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c", [16, 24])  # whole panels in every build, and a last panel of one vector
def test_skipping_over_many_blocks_equals_the_dense_kernels_for_every_thread_count(c, isa):
    """A map of many blocks of written rows (the offset-skipping forward
    fetches each thread's next block's rows ahead while one runs): the
    forward and input gradient with three quarters of the offsets and the
    identity zeroed equal the dense kernels' bit for bit on 1, 2 and 3
    threads, and torch ops on the zeroed weight."""
    x = make(n=6000, c=c, extent=40, dtype=torch.float32, seed=5)
    kmap = ps.kmap.get_kmap(x, 3)
    assert kmap.num_out > 8 * 512
    plan = _engine.make_fused_plan(kmap)
    w = torch.randn(27, c, c, generator=torch.Generator().manual_seed(6)) / c ** 0.5
    w[torch.randperm(27, generator=torch.Generator().manual_seed(7))[:20]] = 0
    w[13] = 0
    active = _engine.choose_execution(w).active
    assert active is not None and active.sum() == 27 - len(torch.nonzero(w.flatten(1).abs().sum(1) == 0))
    g = torch.randn(kmap.num_out, c, generator=torch.Generator().manual_seed(8))
    dense = run_core(plan, x.feats, w, g, isa, nt=1)
    for nt in (1, 2, 3):
        out, gf, _ = run_core(plan, x.feats, w, g, isa, active, nt=nt)
        assert torch.equal(out, dense[0]) and torch.equal(gf, dense[1]), nt
    torch.testing.assert_close(out, conv_sum(x.feats, w, kmap), rtol=1e-4, atol=1e-4)


def test_the_isa_limit_caps_every_default_call_and_the_env_sets_it_at_import():
    """set_isa_limit / POINTSPARSE_ISA: an AVX-512 machine runs the defaults
    of one without it (an AMD Zen 3's paths: its tests and benchmarks on
    another CPU). Every call that names no build takes the cap (the generic
    build's bits, which differ from the FMA builds' by rounding), the bf16
    kernels and AMX are off, avx512_full_width() is False; a call naming a
    build still runs it; None lifts the cap."""
    import subprocess
    import sys

    core = ps._ext.core
    best, bf16, wide = core.conv_isa(), core.conv_bf16(), core.avx512_full_width()
    for bad, error in (("avx3", ValueError), (2, TypeError)):
        with pytest.raises(error, match="limit must be 'generic', 'avx2', 'avx512' or None"):
            core.set_isa_limit(bad)
    x = make(n=3000, c=16, extent=30, dtype=torch.float32, seed=4)
    conv = ps.nn.Conv3d(16, 24, 3)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap, x.cache)
    w = conv.weight.detach().contiguous()

    def core_forward(isa):
        out = torch.empty(kmap.num_out, 24)
        plan.core.forward(x.feats.numpy(), w.numpy(), None, out.numpy(), 1, isa=isa)
        return out

    generic = core_forward("generic")
    fma = core_forward("avx2") if "avx2" in core.runnable_isas() else None
    assert fma is None or not torch.equal(generic, fma)  # (else the cap's effect below would not show)
    before = core.set_isa_limit("generic")  # (POINTSPARSE_ISA's, where the suite runs under one)
    try:
        assert core.set_isa_limit("generic") == "generic"
        assert (core.conv_isa(), core.spmm_isa(), core.conv_bf16(), core.conv_amx(), core.avx512_full_width()) == \
            ("generic", "generic", False, False, False)
        assert torch.equal(core_forward(None), generic)
        with torch.no_grad():
            assert torch.equal(conv(x).feats, generic)
        if fma is not None:
            assert torch.equal(core_forward("avx2"), fma)  # (a build named still runs)
            core.set_isa_limit("avx2")
            assert core.conv_isa() == "avx2" and not core.conv_bf16() and not core.avx512_full_width()
            assert torch.equal(core_forward(None), fma)
        assert core.set_isa_limit(None) in ("avx2", "generic") and core.conv_isa() == core.runnable_isas()[0]
    finally:
        core.set_isa_limit(before)
        _engine.vector_threshold(64)  # (the engine's module-level choices follow the width back)
    assert (core.conv_isa(), core.conv_bf16(), core.avx512_full_width()) == (best, bf16, wide)
    assert torch.equal(core_forward(None), generic if fma is None or best == "generic" else fma)
    # the variable, read at import (before the engine's thresholds), and its check
    code = ("import pointsparse as ps\nfrom pointsparse.nn import _engine\n"
            "print(ps._ext.core.conv_isa(), ps._ext.core.conv_bf16(), _engine.VECTOR_DENSITY)")
    env = dict(os.environ, POINTSPARSE_ISA="generic", POINTSPARSE_AVX512_FULL_WIDTH="")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["generic", "False", str(_engine.VECTOR_DENSITY_SPLIT)]
    env["POINTSPARSE_ISA"] = "avx3"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0 and "POINTSPARSE_ISA must be 'generic', 'avx2', 'avx512' or empty; got 'avx3'" \
        in run.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_block_fetch_is_intel_s_and_changes_no_bit(dtype):
    """The vector-sparse walks fetch the thread's next block's rows during
    this one on Intel CPUs only (it cost 4-10% on an AMD Zen 5): the CPU's
    answer, the override and its check, and on a map of many blocks the
    same output bits with the fetch on and off, float32 and bf16 (where
    AVX512-BF16 runs), 1 and 2 threads, against torch ops."""
    core = ps._ext.core
    if dtype == torch.bfloat16 and not core.conv_bf16():
        pytest.skip("the CPU has no AVX512-BF16")
    with open("/proc/cpuinfo") as f:
        intel = "GenuineIntel" in f.read()
    assert core.next_block_fetch() == intel
    with pytest.raises(ValueError, match="value must be 1, 0 or -1"):
        core.set_next_block_fetch(2)
    x = make(n=6000, c=32, extent=40, dtype=torch.float32, seed=9)
    kmap = ps.kmap.get_kmap(x, 3)
    assert kmap.num_out > 8 * 512
    conv = ps.nn.Conv3d(32, 32, 3, bias=True)
    prune.panel_structured(conv, "weight", 0.75, panels=2)
    prune.remove(conv, "weight")
    assert _engine.choose_execution(conv.weight.detach()).vector  # (the float32 walk: vectors)
    conv = conv.to(dtype)
    xin = x.with_feats(x.feats.to(dtype))
    outs, threads = {}, torch.get_num_threads()
    try:
        for fetch in (1, 0):
            core.set_next_block_fetch(fetch)
            for nt in (1, 2):
                torch.set_num_threads(nt)
                with torch.no_grad():
                    outs[fetch, nt] = conv(xin).feats
    finally:
        core.set_next_block_fetch(-1)
        torch.set_num_threads(threads)
    assert core.next_block_fetch() == intel
    assert all(torch.equal(o, outs[1, 1]) for o in outs.values())
    ref = conv_sum(xin.feats.double(), conv.weight.detach().double(), kmap) + conv.bias.detach().double()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[1, 1].double(), ref, rtol=tol, atol=tol)


def _forward_and_input_grad(plan, feats, w, bias, g, isa, nt, vector, relu):
    active = _engine.choose_execution(w).active
    out = torch.full((plan.num_out, w.shape[2]), float("nan"), dtype=w.dtype)
    plan.core.forward(feats.numpy(), w.numpy(), bias.numpy(), out.numpy(), nt, isa, relu, active=active,
                      vector=vector)
    gf = torch.full_like(feats, float("nan"))
    plan.core.backward_input(g.numpy(), w.numpy(), gf.numpy(), nt, isa, active=active, vector=vector)
    return out, gf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in,c_out", [(16, 16), (3, 40), (33, 100), (130, 24), (64, 128), (20, 141)])
@pytest.mark.parametrize("k,t,transposed", CASES[:3])
def test_vector_kernels_of_every_build_agree_bit_for_bit(k, t, transposed, c_in, c_out, dtype):
    """The vector-sparse forward and input gradient (W[k].T: panels of input
    channels) of every FMA build (avx2: 6 x 2 vectors of 32 bytes; avx512: one
    64-byte vector per panel, taller tiles, masked tails) equal bit for bit
    each other and the dense kernels of both, with bias and ReLU, for 1 and 2
    threads; the generic build (no FMA) agrees to rounding. Channel counts
    off the 16-float panels, and runs of pairs off every tile height."""
    feats, kmap = case(k, t, transposed, c_in, c_out, dtype, seed=c_in)
    plan = _engine.make_fused_plan(kmap)
    w = sparse_weight(kmap.kernel_volume, c_in, c_out, dtype, seed=c_out, vector_keep=0.4)
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(c_out, generator=gen, dtype=dtype)
    g = torch.randn(kmap.num_out, c_out, generator=gen, dtype=dtype)
    assert _engine.choose_execution(w).active is not None
    got = {}
    for isa in ISAS:
        for nt in (1, 2):
            for vector in (False, True):
                got[isa, nt, vector] = _forward_and_input_grad(plan, feats, w, bias, g, isa, nt, vector, True)
    fma = [isa for isa in ISAS if isa != "generic"]
    want = got[ISAS[0], 1, False]
    assert not torch.isnan(want[0]).any() and not torch.isnan(want[1]).any()
    for (isa, nt, vector), res in got.items():
        for a, b in zip(res, want):
            if isa in fma:
                assert torch.equal(a, b), (isa, nt, vector)
            else:
                torch.testing.assert_close(a, b, rtol=1e-4 if dtype == torch.float32 else 1e-12, atol=1e-5)
    for vector in (False, True):  # generic: its own runs agree bit for bit across threads and kernels
        for a, b in zip(got["generic", 2, vector], got["generic", 1, False]):
            assert torch.equal(a, b)


def test_avx512_and_avx2_vector_kernels_agree_on_a_large_map():
    """A map of some 8000 rows (full 512-row blocks, long runs of pairs per
    offset, every tile height's tails) at the bench's density, no bias,
    128+ columns (where the avx512 vector kernel runs) with a half panel:
    the avx512 and avx2 vector kernels and the dense kernel agree bit for bit."""
    if "avx512" not in ISAS:
        pytest.skip("this CPU (or build) does not run AVX-512")
    x = make(n=9000, c=48, extent=24, dtype=torch.float32, seed=3)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    w = sparse_weight(27, 48, 136, torch.float32, vector_keep=0.25, dead=())
    bias = torch.zeros(136)
    g = torch.randn(kmap.num_out, 136)
    runs = [_forward_and_input_grad(plan, x.feats, w, bias, g, isa, 2, vector, False)
            for isa, vector in (("avx512", True), ("avx2", True), ("avx512", False))]
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


def square_weight(volume, c_in, c_out, dtype, seed=0, keep=0.3):
    """Random weight zeroed in square blocks of two panels a side (as
    panel_structured(square=True, panels=2)): twin vectors in ``W[k]`` and in
    ``W[k].T`` alike, the last blocks partial where a size is off them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(volume, c_in, c_out, generator=g, dtype=dtype)
    side = 2 * _engine.panel_width(dtype)
    blocks = torch.rand(volume, -(-c_in // side), -(-c_out // side), generator=g) < keep
    return w * blocks.repeat_interleave(side, 1).repeat_interleave(side, 2)[:, :c_in, :c_out].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_out", [32, 44, 48, 64, 71, 72, 136])
@pytest.mark.parametrize("square", [False, True])
def test_twin_panels_run_two_vectors_a_row_bit_for_bit(c_out, dtype, square):
    """Weights pruned in vectors of two panels (panel_structured(panels=2)),
    or in square blocks of two panels a side (``square``: twins in the input
    gradient's ``W[k].T`` too, 48 input channels): adjacent whole panels
    that list the same rows run in the avx512 build's two-vector tiles
    (SparseApplyArgs::twin). Some offsets' second panel gets one more row,
    so twins and lone panels mix in one offset, and a last partial panel
    (float32: 44, 71, 72, 136; float64: 44, 71) never pairs. On a map of many
    blocks, with bias and ReLU, 1 and 2 threads: every FMA build's vector
    forward and input gradient equal the dense kernels' bit for bit, the
    generic build's to rounding, and torch ops."""
    c_in = 48 if square else 24
    x = make(n=7000, c=c_in, extent=30, dtype=dtype, seed=9)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    if square:
        w = square_weight(27, c_in, c_out, dtype, seed=c_out)
    else:
        w = sparse_weight(27, c_in, c_out, dtype, seed=c_out, vector_keep=0.3, span=2)
    width = _engine.panel_width(dtype)
    w[1:27:3, 5, width:2 * width] = 0.5  # breaks the twin of panels 0 and 1 there (or fills a pruned one)
    assert int(_twinned(w).sum()) > 0  # twins in the forward's panels (and lone panels: the line above)
    if square:
        assert int(_twinned(w, transpose=True).sum()) > 0  # and in the input gradient's
    bias = torch.randn(c_out, generator=torch.Generator().manual_seed(1), dtype=dtype)
    # (its own generator, as every other value here: the global RNG's state depends on the tests run before)
    g = torch.randn(kmap.num_out, c_out, generator=torch.Generator().manual_seed(2), dtype=dtype)
    want = _forward_and_input_grad(plan, x.feats, w, bias, g, ISAS[0], 1, False, True)
    for isa in ISAS:
        for nt in (1, 2):
            got = _forward_and_input_grad(plan, x.feats, w, bias, g, isa, nt, True, True)
            if isa == "generic":
                tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
                torch.testing.assert_close(got[0], want[0], **tol)
                torch.testing.assert_close(got[1], want[1], **tol)
            else:
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (isa, nt)
    ref = torch.relu(conv_sum(x.feats, w, kmap) + bias)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(want[0], ref, **tol)


def test_large_outputs_with_bias_and_relu():
    """An output of more than 4 MB (advised to huge pages before it is
    written) on a submanifold map (the identity offset stores bias + its
    products first, listed panels or not): dense and vector kernels agree
    bit for bit and equal torch ops; every row is written (NaN-filled first)."""
    x = make(n=22000, c=16, extent=40, dtype=torch.float32)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    w = sparse_weight(27, 16, 64, torch.float32, dead=(0, 13))  # 13: the identity, skipped too
    w_ident = sparse_weight(27, 16, 64, torch.float32)
    bias = torch.randn(64)
    assert plan.identity == 13 and kmap.num_out * 64 * 4 > 4 << 20
    for weight in (w, w_ident):
        outs = []
        for vector in (False, True):
            out = torch.full((kmap.num_out, 64), float("nan"))
            plan.core.forward(x.feats.numpy(), weight.numpy(), bias.numpy(), out.numpy(), 2, None, True,
                              active=_engine.choose_execution(weight).active, vector=vector)
            outs.append(out)
        assert torch.equal(outs[0], outs[1])
        ref = torch.relu(conv_sum(x.feats, weight, kmap) + bias)
        torch.testing.assert_close(outs[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_out", [32, 64])
def test_vector_panels_with_no_row_or_one_row_listed(c_out, dtype):
    """Panels of whole tiles (C_out a multiple of the panel) listing no row,
    one row or an odd number of rows, on the identity offset (its tiles store
    bias + products into every panel, one listing nothing stores the bias
    alone) and on the others (a panel listing nothing is left as it is):
    with and without bias and ReLU, the vector kernels of each build equal
    its dense kernels bit for bit, and torch ops."""
    feats, kmap = case(3, 1, False, 24, c_out, dtype)
    plan = _engine.make_fused_plan(kmap)
    assert plan.identity == 13
    width = _engine.panel_width(dtype)
    w = sparse_weight(27, 24, c_out, dtype, vector_keep=0.5)
    for k in (13, 5):  # the identity, and one other
        w[k, :, :width] = 0  # panel 0: no row
        w[k, :, width:2 * width] = 0
        w[k, 7, width:2 * width] = 1.5  # panel 1: one row
        w[k, :, 2 * width:] = 0
        w[k, ::8, 2 * width:] = 0.25  # then three rows a panel
    for bias in (None, torch.randn(c_out, dtype=dtype)):
        for relu in (False, True):
            outs = {}
            for isa in ISAS:
                for vector in (False, True):
                    out = torch.full((kmap.num_out, c_out), float("nan"), dtype=dtype)
                    plan.core.forward(feats.numpy(), w.numpy(), None if bias is None else bias.numpy(),
                                      out.numpy(), 2, isa, relu, active=_engine.choose_execution(w).active,
                                      vector=vector)
                    outs[isa, vector] = out
            ref = conv_sum(feats, w, kmap) + (0 if bias is None else bias)
            for isa in ISAS:
                assert torch.equal(outs[isa, True], outs[isa, False])
                torch.testing.assert_close(outs[isa, True], torch.relu(ref) if relu else ref, rtol=1e-4,
                                           atol=1e-4)


def test_skipped_offsets_and_vectors_are_never_read():
    """Offsets left out and zero vectors: NaN in the weight outside what runs
    never reaches the output (the data really is not touched)."""
    feats, kmap = case(3, 1, False, 8, 16, torch.float32)
    plan = _engine.make_fused_plan(kmap)
    w = sparse_weight(27, 8, 16, torch.float32, dead=())
    active = np.ones(27, dtype=np.uint8)
    active[[3, 13]] = 0  # 13: the identity of the submanifold map
    poisoned = w.clone()
    poisoned[[3, 13]] = float("nan")
    ref = w.clone()
    ref[[3, 13]] = 0
    g = torch.randn(kmap.num_out, 16)
    out, gf, gw = run_core(plan, feats, poisoned, g, False, active, True, active)
    want = run_core(plan, feats, ref, g, False)
    assert torch.equal(out, want[0]) and torch.equal(gf, want[1])
    assert not gw[[3, 13]].any() and torch.equal(gw[:3], want[2][:3])


def test_core_checks_active_and_mask():
    feats, kmap = case(3, 1, False, 4, 4, torch.float64)
    plan = _engine.make_fused_plan(kmap)
    w = torch.randn(27, 4, 4, dtype=torch.float64)
    out = torch.empty(kmap.num_out, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="active"):
        plan.core.forward(feats.numpy(), w.numpy(), None, out.numpy(), 1, isa=False, active=np.ones(26, np.uint8))
    gw = torch.empty_like(w)
    with pytest.raises(ValueError, match="mask"):
        plan.core.backward_weight(feats.numpy(), out.numpy(), gw.numpy(), 1, False, None, np.ones((27, 4, 3)))
    with pytest.raises(ValueError, match="dtype"):
        plan.core.backward_weight(feats.numpy(), out.numpy(), gw.numpy(), 1, False, None,
                                  np.ones((27, 4, 4), np.float32))


def test_execution_choice():
    w = torch.randn(27, 64, 64)
    assert _engine.choose_execution(w).name == "dense"
    w[:5] = 0
    run = _engine.choose_execution(w)
    assert run.name == "offsets" and run.active.tolist() == [0] * 5 + [1] * 22 and run.density == 1.0
    w[:, :48] = 0  # 25% of the rows of every panel left
    run = _engine.choose_execution(w)
    assert run.name == "vector" and run.density == 0.25
    # W[k].T: rows are output channels, panels of input channels (3 of 4 all zero)
    assert _engine.choose_execution(w, transpose=True).density == 0.25
    w[:, :, 16:] = 0  # then only rows 48.. x panel 0 (W.T: rows :16 x panel 3)
    assert _engine.choose_execution(w).density == 0.0625
    assert _engine.choose_execution(w, transpose=True).density == 0.0625
    region = torch.zeros(27, dtype=torch.bool)
    region[13] = True
    assert _engine.choose_execution(torch.randn(27, 4, 4), region).active.tolist() == [int(i == 13) for i in range(27)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_execution_choice_in_cpp_equals_the_numpy_choice(dtype):
    """``_core.conv_execution`` (the choice every conv call makes) against
    :func:`_engine._execution` on the counts: the same offsets, the same
    density (a float compared exactly), the same kernels, for weights with
    dead offsets and vectors, regions and thresholds at and around the
    density."""
    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        K = int(torch.randint(1, 28, (1,), generator=g))
        c_in, c_out = (int(v) for v in torch.randint(1, 70, (2,), generator=g))
        w = sparse_weight(K, c_in, c_out, dtype, seed=trial, vector_keep=float(torch.rand(1, generator=g)),
                          dead=tuple(int(i) for i in torch.randint(0, K, (trial % 4,), generator=g)))
        if trial % 7 == 0:
            w.zero_()
        region = None if trial % 3 else torch.rand(K, generator=g) < 0.6
        for transpose in (False, True):
            counts = _engine.vector_counts(w, transpose).numpy()
            rows = c_out if transpose else c_in
            want = _engine._execution(counts, rows, region, _engine.vector_threshold(rows))
            got = _engine.choose_execution(w, region, transpose)
            assert (got.active is None) == (want.active is None)
            if want.active is not None:
                assert got.active.dtype == np.uint8 and got.active.tolist() == want.active.tolist()
            assert got.density == want.density and got.vector == want.vector
            for threshold in (0.0, want.density, np.nextafter(want.density, 0), 1.0):
                flags = None if region is None else region.numpy()
                _, vector, density = ps._ext.core.conv_execution(w.numpy(), transpose, flags, float(threshold))
                assert density == want.density and vector == (want.density <= threshold)
    with pytest.raises(ValueError, match="weight"):
        ps._ext.core.conv_execution(np.ones((2, 2)), False, None, 0.5)
    with pytest.raises(ValueError, match="region"):
        ps._ext.core.conv_execution(np.ones((3, 2, 2)), False, np.ones(2, np.uint8), 0.5)
    with pytest.raises(ValueError, match="threshold must be a number"):  # (took the dense kernels)
        ps._ext.core.conv_execution(np.ones((3, 2, 2)), False, None, float("nan"))


def _cpuinfo_full_width():
    """Whether /proc/cpuinfo names a CPU whose AVX-512 FMAs run at full
    width: Intel's, AMD's from family 26 (Zen 5) but models 0x20-0x2f and
    0x60-0x6f (its laptop parts); None without /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("vendor_id") == "GenuineIntel":
        return True
    if fields.get("vendor_id") != "AuthenticAMD":
        return False
    family, model = int(fields["cpu family"]), int(fields["model"])
    return family > 26 or (family == 26 and not (0x20 <= model <= 0x2F or 0x60 <= model <= 0x6F))


def test_vector_density_follows_the_width_of_the_cpus_fmas():
    """0.85 (measured on AMD Zen 3) unless the CPU runs the avx512 build at
    full width (Intel; AMD Zen 5), whose 512-bit FMAs make the dense kernels
    faster against the vector ones: 0.6 there (measured on an Intel Xeon and
    an AMD EPYC Zen 5)."""
    detected = _cpuinfo_full_width()
    if detected is None:
        pytest.skip("no /proc/cpuinfo to tell the vendor")
    core = ps._ext.core
    wide = detected and "avx512" in core.runnable_isas()
    assert core.avx512_full_width_detected() == wide
    if not os.environ.get(ps._ext.FULL_WIDTH_ENV, "").strip():
        assert core.avx512_full_width() == (wide and default_isa() == "avx512")  # (POINTSPARSE_ISA: off below)
    wide = core.avx512_full_width()
    assert _engine.VECTOR_DENSITY == (_engine.VECTOR_DENSITY_WIDE if wide else _engine.VECTOR_DENSITY_SPLIT)
    assert (_engine.VECTOR_DENSITY_SPLIT, _engine.VECTOR_DENSITY_WIDE) == (0.85, 0.6)


_WIDTH_PROBE = """
import pointsparse as ps
from pointsparse.nn import _engine, functional as F
import torch
core = ps._ext.core
print(core.avx512_full_width(), _engine.VECTOR_DENSITY, _engine.VECTOR_DENSITY_TWIN,
      F.tile_panels(torch.float32), core.conv_stream_auto_bytes(), _engine.BF16_VECTOR_DENSITY,
      _engine.VECTOR_FULL_ROWS)
"""


@pytest.mark.parametrize("value", ["0", "1"])
def test_full_width_is_set_by_the_environment(value):
    """POINTSPARSE_AVX512_FULL_WIDTH sets what the engine's choices follow
    (the vector thresholds, float32 and bf16, twin tiles, streamed outputs), for comparing the
    two kinds of CPU on one; "1" is refused where the avx512 build does not run
    (or POINTSPARSE_ISA keeps the kernels below it)."""
    proc = run_python(_WIDTH_PROBE, {"POINTSPARSE_AVX512_FULL_WIDTH": value})
    if value == "1" and default_isa() != "avx512":
        assert proc.returncode != 0 and "POINTSPARSE_AVX512_FULL_WIDTH=1" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    wide = value == "1"
    expected = (f"{wide} {0.6 if wide else 0.85} {0.75 if wide else None} {2 if wide else 1} "
                f"{(8 << 20) if wide else (1 << 62)} {0.6 if wide else 0.75} {16 if wide else 32}")
    assert proc.stdout.strip() == expected


def test_engine_choices_follow_the_width_set_after_import():
    """_core.set_avx512_full_width after import changed the core's answer
    (and the core's own choices: streamed outputs) but not the thresholds
    nn._engine had read once at import, so the engine chose by the old
    width. They follow the core's answer now, both ways, and come back with it."""
    core = ps._ext.core
    before = core.avx512_full_width()
    widths = [0, 1] if default_isa() == "avx512" else [0]
    w = torch.randn(27, 64, 64)
    w[:, 51:] = 0  # 51 of 64 rows listed in every panel: density 0.797, over full width's thresholds (twins
    #                 included), under the split one's
    try:
        for value in widths:
            core.set_avx512_full_width(value)
            wide = bool(value)
            assert (_engine.vector_threshold(64), _engine.VECTOR_FULL_ROWS) == \
                ((0.6, 16) if wide else (0.85, 32))
            assert F.tile_panels(torch.float32) == (2 if wide else 1)
            assert _engine.twin_threshold(64) == (0.75 if wide else None)
            assert _engine.bf16_vector_threshold(64) == (0.6 if wide else 0.75)
            execution = _engine.choose_execution(w)
            assert execution.density == pytest.approx(51 / 64)
            assert execution.name == ("dense" if wide else "vector"), value
    finally:
        core.set_avx512_full_width(int(before))
    assert _engine.vector_threshold(64) == (0.6 if before else 0.85)


def test_a_width_change_is_seen_whole_by_another_thread():
    """_follow_width recorded the new width before setting the choices that
    follow it: a conv on another thread that came in between found the width
    already followed and chose by the old width's thresholds. Held there (a
    trace on the first thread, paused before its first choice is set), the
    other thread's threshold is the new width's."""
    import inspect
    import sys
    import threading

    core = ps._ext.core
    if default_isa() != "avx512":
        pytest.skip("the full width needs the avx512 build (run by default: POINTSPARSE_ISA may keep it off)")
    before = core.avx512_full_width()
    lines, start = inspect.getsourcelines(_engine._follow_width)
    hold = start + next(i for i, line in enumerate(lines) if line.strip().startswith("VECTOR_DENSITY ="))
    paused, go, seen = threading.Event(), threading.Event(), []

    def tracer(frame, event, arg):
        if frame.f_code is not _engine._follow_width.__code__:
            return None

        def line(frame, event, arg):
            if event == "line" and frame.f_lineno == hold and not paused.is_set():
                paused.set()
                go.wait(30)
            return line
        return line

    def first():
        sys.settrace(tracer)
        try:
            seen.append(_engine.vector_threshold(64))
        finally:
            sys.settrace(None)

    try:
        _engine.vector_threshold(64)  # (followed: the old width's)
        core.set_avx512_full_width(0 if before else 1)
        want = 0.85 if before else 0.6
        thread = threading.Thread(target=first)
        thread.start()
        try:
            assert paused.wait(30), "the first thread never reached the width's choices"
            assert _engine.vector_threshold(64) == want
        finally:
            go.set()
            thread.join(30)
        assert seen == [want]
    finally:
        core.set_avx512_full_width(int(before))
    assert _engine.vector_threshold(64) == (0.6 if before else 0.85)


def test_full_width_refuses_bad_values():
    proc = run_python("import pointsparse", {"POINTSPARSE_AVX512_FULL_WIDTH": "yes"})
    assert proc.returncode != 0
    assert "POINTSPARSE_AVX512_FULL_WIDTH must be '1', '0' or empty; got 'yes'" in proc.stderr
    core = ps._ext.core
    with pytest.raises(ValueError, match="value must be 1, 0 or -1"):
        core.set_avx512_full_width(2)
    if "avx512" not in core.runnable_isas():
        with pytest.raises(ValueError, match="does not run here"):
            core.set_avx512_full_width(1)


def test_vector_threshold_falls_with_the_rows_per_panel(monkeypatch):
    """Fewer rows per panel (C_in forward, C_out for the input gradient):
    the vector kernels need a sparser weight (on the Zen 3 they broke even
    with the dense ones near density 0.3 at C = 8 and above 0.9 at C = 64;
    its density and rows, whatever this CPU's; at full width the scaling
    starts at 16 rows: 0.36 at 8)."""
    monkeypatch.setattr(_engine, "VECTOR_FULL_ROWS", _engine.VECTOR_FULL_ROWS_WIDE)
    monkeypatch.setattr(_engine, "VECTOR_DENSITY", _engine.VECTOR_DENSITY_WIDE)
    assert _engine.vector_threshold(16) == _engine.vector_threshold(64) == _engine.VECTOR_DENSITY_WIDE
    assert _engine.vector_threshold(8) == pytest.approx(0.36)
    monkeypatch.setattr(_engine, "VECTOR_FULL_ROWS", _engine.VECTOR_FULL_ROWS_SPLIT)
    monkeypatch.setattr(_engine, "VECTOR_DENSITY", _engine.VECTOR_DENSITY_SPLIT)
    assert _engine.vector_threshold(64) == _engine.vector_threshold(256) == _engine.VECTOR_DENSITY
    assert _engine.vector_threshold(8) == pytest.approx(_engine.VECTOR_DENSITY / 3)
    w = torch.randn(27, 8, 32)
    w[:, 4:] = 0  # half the rows of every panel listed: dense at 8 rows
    assert _engine.choose_execution(w).name == "dense"
    w[:, 2:] = 0  # a quarter
    assert _engine.choose_execution(w).name == "vector"
    w = torch.randn(27, 32, 8)
    w[:, 8:] = 0  # a quarter of 32 rows: vector; W.T: 8 rows, half of the 2 input panels: dense
    assert _engine.choose_execution(w).name == "vector"
    back = _engine.choose_execution(w, transpose=True)
    assert back.density == 0.5 and back.name == "dense"


def pruned_conv(kind, dtype=torch.float64, c=8, seed=0):
    torch.manual_seed(seed)
    conv = ps.nn.Conv3d(c, c, 3).to(dtype)
    if kind in ("offset", "both"):
        prune.kernel_structured(conv, "weight", 0.5, scope="offset")
    if kind in ("vector", "both"):
        prune.panel_structured(conv, "weight", 0.6)
    return conv


@pytest.mark.parametrize("kind", ["offset", "vector", "both"])
def test_pruned_module_forward_backward_against_dense_conv3d(kind, monkeypatch):
    """A pruned Conv3d: outputs against torch's conv3d with the pruned
    entries zeroed; weight_orig's gradient exactly the unmasked engine's
    gradient * mask (the masked vectors are not computed)."""
    monkeypatch.setattr(_engine, "VECTOR_DENSITY", 1.0)  # the vector kernels on any density
    monkeypatch.setattr(_engine, "VECTOR_FULL_ROWS", 0)
    monkeypatch.setattr(_engine, "MASKED_WGRAD_DENSITY", 1.0)
    conv = pruned_conv(kind)
    x = make(c=8)
    feats = x.feats.clone().requires_grad_()
    out = conv(x.with_feats(feats))
    w = (conv.weight_orig * conv.weight_mask).detach()
    torch.testing.assert_close(out.feats, dense_conv(x, w, x.coords), rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out.feats)
    out.feats.backward(g)
    ref_w = w.clone().requires_grad_()
    ref_f = x.feats.clone().requires_grad_()
    ref = F.conv3d(x.with_feats(ref_f), ref_w, 3)  # no mask: the dense weight gradient
    ref_gf, ref_gw = torch.autograd.grad(ref.feats, (ref_f, ref_w), g)
    assert torch.equal(conv.weight_orig.grad, ref_gw * conv.weight_mask)
    assert torch.equal(feats.grad, ref_gf)


def test_removed_pruning_keeps_the_full_weight_gradient():
    """After prune.remove the zero offsets still run in the weight gradient
    (nothing guarantees it is multiplied by zero)."""
    conv = pruned_conv("offset")
    prune.remove(conv, "weight")
    dead = conv.weight.detach().flatten(1).abs().sum(1) == 0
    assert dead.sum() == 14  # round(0.5 * 27)
    x = make(c=8)
    conv(x).feats.square().sum().backward()
    ref_w = conv.weight.detach().clone().requires_grad_()
    ref = dense_conv(x, ref_w, x.coords).square().sum()
    (ref_gw,) = torch.autograd.grad(ref, ref_w)
    assert conv.weight.grad[dead].abs().sum() > 0
    torch.testing.assert_close(conv.weight.grad, ref_gw, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("vector_density", [0.0, 1.0])
def test_gradcheck_pruned(vector_density, monkeypatch):
    monkeypatch.setattr(_engine, "VECTOR_DENSITY", vector_density)
    monkeypatch.setattr(_engine, "VECTOR_FULL_ROWS", 0)
    monkeypatch.setattr(_engine, "MASKED_WGRAD_DENSITY", vector_density)
    conv = pruned_conv("both", c=3)
    x = make(n=60, c=3, extent=4)
    w = (conv.weight_orig * conv.weight_mask).detach().requires_grad_()
    kmap = ps.kmap.get_kmap(x, 3)
    f = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _engine.conv(a, b, None, kmap), (f, w))
    # with the mask: the gradient of the masked product
    orig = conv.weight_orig.detach().clone().requires_grad_()
    mask = conv.weight_mask
    assert torch.autograd.gradcheck(lambda a, b: _engine.conv(a, b * mask, None, kmap, mask=mask), (f, orig))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gradcheck_of_masked_strided_and_transposed_convs_on_every_path(backend):
    """float64 gradcheck of F.conv3d with a weight_mask down a stride-2 conv
    and back up its transposed conv, on the engine and on the torch path
    (the GPU's). gradcheck also runs the backward with an undefined output
    gradient, which the torch path's mask hook got as None and multiplied
    by the mask: a TypeError instead of the check."""
    x = make(n=12, c=2, extent=3)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(27, 2, 2, generator=g, dtype=torch.float64)
    w[[0, 4, 13, 20]] = 0
    mask = (w != 0).double()
    up_mask = mask.transpose(1, 2).contiguous()

    def conv(f, w):
        y = F.conv3d(x.with_feats(f), w * mask, 3, 2, weight_mask=mask)
        return F.conv3d(y, (w * mask).transpose(1, 2), 3, 2, transposed=True, weight_mask=up_mask).feats

    with ps.backend(backend):
        assert torch.autograd.gradcheck(conv, (x.feats.clone().requires_grad_(), w.clone().requires_grad_()))


def _threads_run(threads, kind):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        conv = pruned_conv(kind, torch.float32, c=16, seed=3)
        x = make(n=4000, c=16, extent=24, dtype=torch.float32, seed=7)
        feats = x.feats.clone().requires_grad_()
        out = conv(x.with_feats(feats))
        out.feats.backward(torch.ones_like(out.feats) + out.feats.detach())
        return out.feats.detach(), feats.grad, conv.weight_orig.grad
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("kind", ["offset", "both"])
def test_bit_identical_for_1_and_2_threads(kind, monkeypatch):
    monkeypatch.setattr(_engine, "VECTOR_DENSITY", 1.0)
    monkeypatch.setattr(_engine, "VECTOR_FULL_ROWS", 0)
    monkeypatch.setattr(_engine, "MASKED_WGRAD_DENSITY", 1.0)
    for a, b in zip(_threads_run(1, kind), _threads_run(2, kind)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("region", ["cross", [0, 5, 13, 26]])
def test_kernel_region_against_dense_conv3d(region):
    torch.manual_seed(0)
    conv = ps.nn.Conv3d(4, 5, 3, kernel_region=region).double()
    keep = F.region_of(3, region)
    if region == "cross":
        assert keep.nonzero().flatten().tolist() == [4, 10, 12, 13, 14, 16, 22]
    assert not conv.weight.detach()[~keep].any()
    with torch.no_grad():
        conv.weight[~keep] = 7.0  # ignored
    x = make(c=4)
    out = conv(x)
    zeroed = conv.weight.detach().clone()
    zeroed[~keep] = 0
    torch.testing.assert_close(out.feats, dense_conv(x, zeroed, x.coords), rtol=1e-10, atol=1e-10)
    out.feats.sum().backward()
    assert not conv.weight.grad[~keep].any() and conv.weight.grad[keep].abs().sum() > 0
    assert "kernel_region" in repr(conv)


def test_kernel_region_gradcheck_and_errors():
    x = make(n=60, c=2, extent=4)
    w = torch.randn(27, 2, 3, dtype=torch.float64, requires_grad=True)
    f = x.feats.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: F.conv3d(x.with_feats(a), b, 3, kernel_region="cross").feats, (f, w))
    with pytest.raises(ValueError, match="kernel_region must be None, 'cross' \\(the hyper-cross: MinkowskiEngine's "
                                         "HYPER_CROSS\\)"):
        ps.nn.Conv3d(2, 2, 3, kernel_region="hyper-cross")
    with pytest.raises(ValueError, match="kernel_region"):
        ps.nn.Conv3d(2, 2, 3, kernel_region=[0, 27])
    with pytest.raises(ValueError, match="kernel_region"):
        ps.nn.Conv3d(2, 2, 3, kernel_region=[])
    with pytest.raises(TypeError, match="kernel_region"):
        ps.nn.Conv3d(2, 2, 3, kernel_region=3)
    with pytest.raises(ValueError, match="mask"):
        F.conv3d(x, w.detach(), 3, weight_mask=torch.ones(27, 2, 2, dtype=torch.float64))


def test_kernel_region_of_bools_is_refused():
    """A bool mask of the offsets (a torch bool tensor: its items are 0-d
    bool tensors, which operator.index reads as 0 and 1) was taken as the
    offset indices 0 and 1: an all-True mask ran offset 1 alone, an
    all-False one offset 0. Bools are refused, the mask's indices named as
    what to give; so are bools in a generator (iterated once for the check)."""
    every = torch.ones(27, dtype=torch.bool)
    for region in (every, torch.zeros(27, dtype=torch.bool), torch.arange(27) % 2 == 0, np.ones(27, dtype=bool),
                   (i for i in [True, False]), [torch.tensor(True)]):
        with pytest.raises(TypeError, match=r"kernel_region must list offset indices, not bools .*nonzero"):
            ps.nn.Conv3d(2, 2, 3, kernel_region=region)
    with pytest.raises(TypeError, match="kernel_region must list offset indices, not bools"):
        F.region_of(3, every)
    x = make(n=40, c=2, extent=4)
    with pytest.raises(TypeError, match="kernel_region must list offset indices, not bools"):
        F.conv3d(x, torch.randn(27, 2, 2, dtype=torch.float64), 3, kernel_region=every)
    assert ps.nn.Conv3d(2, 2, 3, kernel_region=every.nonzero().flatten()).kernel_region == tuple(range(27))
    assert ps.nn.Conv3d(2, 2, 3, kernel_region=(i for i in [13, 4])).kernel_region == (4, 13)


def test_kernel_region_of_too_large_a_kernel_is_refused_before_allocating():
    """region_of of a kernel past kmap.MAX_KERNEL_VOLUME offsets built its
    (K,) mask (and for "cross" a (K, 3) grid) first: kernel_size 1001 asked
    for 24 GB and 10**6 overflowed torch's storage size (RuntimeErrors).
    It is the ValueError every kernel map gives such a kernel, at once."""
    import time

    from pointsparse import kmap
    for region in ("cross", [0], range(3)):
        # (sizes whose refusal, were it missing, fails cheaply: an overflow or a 32,769-entry mask)
        for k in ((10**6, 10**6, 10**6), (kmap.MAX_KERNEL_VOLUME + 1, 1, 1)):
            start = time.perf_counter()
            with pytest.raises(ValueError, match=r"kernel_size .* offsets; a kernel may have at most 32,768"):
                F.region_of(k, region)
            assert time.perf_counter() - start < 1.0
        with pytest.raises(ValueError, match=r"kernel_size .* offsets; a kernel may have at most"):
            F.engine_cost(torch.zeros(1, 1, 1), torch.zeros(1, dtype=torch.int64), (10**6, 10**6, 10**6), region)
    assert F.region_of((kmap.MAX_KERNEL_VOLUME, 1, 1), [5]).nonzero().flatten().tolist() == [5]
    assert int(F.region_of((kmap.MAX_KERNEL_VOLUME, 1, 1), "cross").sum()) == kmap.MAX_KERNEL_VOLUME


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_weight_mask_checked_and_taken_alike_on_every_path(backend):
    """conv3d checks weight_mask (the weight's shape, dtype, device) before
    choosing a path, and the torch path masks the weight gradient as the
    engine does (it ignored the mask: any shape taken, gradients differed)."""
    x = make(n=60, c=3, extent=5)
    w = torch.randn(27, 3, 2, dtype=torch.float64)
    with ps.backend(backend):
        for bad, error, match in [(torch.ones(5), ValueError, r"weight_mask must have the weight's shape \(27, 3, 2\)"),
                                  (torch.ones(27, 2, 3, dtype=torch.float64), ValueError, "weight_mask must have"),
                                  (torch.ones(27, 3, 2), TypeError, r"weight_mask \(torch.float32, cpu\) must match"),
                                  (torch.ones(27, 3, 2, dtype=torch.float64, device="meta"), TypeError,
                                   "weight_mask .* must match the weight")]:
            with pytest.raises(error, match=match):
                F.conv3d(x, w, 3, weight_mask=bad)
    grads = {}
    masks = {"zero": torch.zeros_like(w), "half": (torch.rand(w.shape, generator=torch.Generator().manual_seed(0))
                                                   < 0.5).double()}
    for path in ("auto", "torch"):
        for name, mask in masks.items():
            weight = w.clone().requires_grad_()
            with ps.backend(path):
                F.conv3d(x, weight, 3, weight_mask=mask).feats.square().sum().backward()
            grads[path, name] = weight.grad
            assert torch.equal(weight.grad == 0, (weight.grad == 0) | (mask == 0))  # masked entries: no gradient
    for name in ("zero", "half"):
        torch.testing.assert_close(grads["auto", name], grads["torch", name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_mask_of_other_values_than_one_leaves_the_kept_gradient_unscaled(backend):
    """weight_mask only says which entries are pruned: the weight given is
    already the product, so the gradient of the entries it keeps is the
    dense one. A mask of 0.5 (torch's custom_from_mask takes any values)
    scaled it by 0.5 on every eager path (a pruned Conv3d's weight_orig got dense * mask^2 where torch's conv gives dense
    * mask; the compiled graph already kept it unscaled)."""
    x = make(n=60, c=2, extent=5)
    mask = torch.full((27, 2, 3), 0.5, dtype=torch.float64)
    mask[0], mask[5, 1] = 0, 2.0
    w = torch.randn(27, 2, 3, dtype=torch.float64, requires_grad=True)
    with ps.backend(backend):
        weight = w.detach().clone().requires_grad_()
        F.conv3d(x, weight, 3, weight_mask=mask).feats.sin().sum().backward()
        dense = w.detach().clone().requires_grad_()
        F.conv3d(x, dense, 3).feats.sin().sum().backward()
        torch.testing.assert_close(weight.grad, dense.grad * (mask != 0), rtol=1e-12, atol=1e-12)
        conv = ps.nn.Conv3d(2, 3, 3).double()
        prune.custom_from_mask(conv, "weight", mask)
        conv(x).feats.sin().sum().backward()
        orig = conv.weight_orig.detach().clone().requires_grad_()
        F.conv3d(x, orig * mask, 3).feats.sin().sum().backward()
        torch.testing.assert_close(conv.weight_orig.grad, orig.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_mask_that_requires_grad_gets_torchs_gradient_on_its_pruned_entries(backend):
    """Methods that score or regrow connections by the gradient of the mask
    (SNIP's connection sensitivity on a pruned model, gradient regrowth) set
    ``weight_mask.requires_grad_()``: torch's pruned conv gives it ``dense
    gradient * weight_orig`` everywhere, but a pruned Conv3d gave 0 on the
    pruned entries (the engine computes no weight gradient there), so every
    pruned connection scored 0."""
    x = make(n=60, c=2, extent=5)
    mask = (torch.rand(27, 2, 3, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    conv = ps.nn.Conv3d(2, 3, 3).double()
    prune.custom_from_mask(conv, "weight", mask)
    conv.weight_mask.requires_grad_()
    with ps.backend(backend):
        conv(x).feats.sin().sum().backward()
        orig = conv.weight_orig.detach().clone()
        dense = orig.clone().requires_grad_()
        F.conv3d(x, dense * mask, 3).feats.sin().sum().backward()
    torch.testing.assert_close(conv.weight_mask.grad, _dense_grad(x, orig * mask) * orig,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.weight_orig.grad, dense.grad, rtol=1e-12, atol=1e-12)


def _dense_grad(x, weight):
    """The gradient of ``conv(x, weight).feats.sin().sum()`` for ``weight``, unmasked."""
    weight = weight.clone().requires_grad_()
    F.conv3d(x, weight, 3).feats.sin().sum().backward()
    return weight.grad


def test_panel_structured_prunes_engine_vectors():
    conv = ps.nn.Conv3d(8, 40, 3)
    prune.panel_structured(conv, "weight", 0.5)
    blocks = _engine.vector_blocks(conv.weight_mask)
    assert blocks.shape == (27, 8, 3)
    # every vector all kept or all pruned (the last panel is 8 of 16 columns wide)
    mask = conv.weight_mask.view(27, 8, 40)
    full = torch.nn.functional.pad(mask, (0, 8)).view(27, 8, 3, 16)
    assert torch.equal(full[:, :, :2].amax(-1), full[:, :, :2].amin(-1))
    assert torch.equal(full[:, :, 2, :8].amax(-1), full[:, :, 2, :8].amin(-1))
    assert abs(blocks.float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("c_in", [8, 7])
def test_pair_panels_prune_whole_bf16_vectors(c_in):
    """rows=2: blocks of two input channels x 16 columns (odd c_in: the
    last block holds one channel), so a bf16 vector (offset, channel pair,
    16 columns) is all kept or all pruned; panel_width is 16 for a bf16
    weight too (its vectors span 16 columns on every CPU)."""
    assert _engine.panel_width(torch.bfloat16) == _engine.panel_width(torch.float32) == 16
    conv = ps.nn.Conv3d(c_in, 40, 3)
    prune.panel_structured(conv, "weight", 0.5, rows=2)
    mask = conv.weight_mask.view(27, c_in, 40)
    kept = []
    for q in range(0, c_in, 2):
        for p in range(0, 40, 16):
            block = mask[:, q:q + 2, p:p + 16].flatten(1)  # a bf16 vector (one channel at an odd end)
            assert torch.equal(block.amax(1), block.amin(1)), (q, p)
            kept.append(block.amax(1))
    assert abs(torch.cat(kept).float().mean().item() - 0.5) < 0.02  # half the blocks
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="rows"):
            prune.panel_structured(ps.nn.Conv3d(4, 4, 3), "weight", 0.5, rows=bad)
    with pytest.raises(ValueError, match="square"):
        prune.panel_structured(ps.nn.Conv3d(4, 4, 3), "weight", 0.5, square=True, rows=2)
    unpruned = ps.nn.Conv3d(4, 4, 3)
    with pytest.raises(TypeError, match="square must be True or False"):  # "no" pruned square blocks
        prune.panel_structured(unpruned, "weight", 0.5, square="no")
    assert not prune.is_pruned(unpruned)


def test_panels_prune_vectors_of_adjacent_panels():
    """panels=2: blocks of one input channel x 2 panels (32 float32
    columns; the last block of 40 columns holds 8), so both panels of a pair
    list the same channels; tile_panels says 2 where the AVX-512 vector
    kernels run two vectors a row (full-width AVX-512: Intel, AMD Zen 5;
    float32 / float64), else 1."""
    conv = ps.nn.Conv3d(8, 40, 3)
    prune.panel_structured(conv, "weight", 0.5, panels=2)
    mask = conv.weight_mask.view(27, 8, 40)
    assert torch.equal(mask[..., :32].amax(-1), mask[..., :32].amin(-1))
    assert torch.equal(mask[..., 32:].amax(-1), mask[..., 32:].amin(-1))
    assert mask[..., 0].sum() + mask[..., 32].sum() == 27 * 8  # half of the 2 x 27 x 8 blocks
    blocks = _engine.vector_blocks(conv.weight)
    assert torch.equal(blocks[..., 0], blocks[..., 1])
    for bad, error in ((0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(error, match="panels"):
            prune.panel_structured(ps.nn.Conv3d(4, 4, 3), "weight", 0.5, panels=bad)
    square = ps.nn.Conv3d(64, 64, 3)  # square: 32 x 32 blocks, twins in the input gradient's W[k].T too
    prune.panel_structured(square, "weight", 0.5, square=True, panels=2)
    for transpose in (False, True):
        blocks = _engine.vector_blocks(square.weight.detach(), transpose)
        assert torch.equal(blocks[..., 0::2], blocks[..., 1::2])
        assert _twinned(square.weight.detach(), transpose).sum() == blocks.sum()
    with pytest.raises(ValueError, match="square"):
        prune.panel_structured(square, "weight", 0.5, square=True, panels=2, rows=16)
    wide = "avx512" in ps._ext.core.runnable_isas() and ps._ext.core.avx512_full_width()
    assert F.tile_panels(torch.float32) == F.tile_panels(torch.float64) == (2 if wide else 1)
    assert F.tile_panels(torch.bfloat16) == 1


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_panel_structured_takes_numpy_integers(make):
    """panels and rows may be numpy integers (they were refused: isinstance
    int), with the masks the ints give."""
    masks = []
    for cast in (int, make):
        torch.manual_seed(0)
        conv = ps.nn.Conv3d(8, 40, 3)
        prune.panel_structured(conv, "weight", 0.5, rows=cast(2), panels=cast(2))
        masks.append(conv.weight_mask)
    assert torch.equal(*masks)


@pytest.mark.parametrize("bad", [np.bool_(True), 2.0, np.float64(2.0)])
def test_panel_structured_refuses_bools_and_floats(bad):
    for kwargs, match in (({"panels": bad}, "panels must be a positive int"), ({"rows": bad}, "rows must be a")):
        with pytest.raises(TypeError, match=match):
            prune.panel_structured(ps.nn.Conv3d(4, 4, 3), "weight", 0.5, **kwargs)


def _twinned(weight, transpose=False):
    """The reference for the twin count: per offset, the listed vectors in
    twin panels (two adjacent whole panels listing the same rows, paired
    from panel 0 on), from vector_blocks in torch ops."""
    blocks = _engine.vector_blocks(weight, transpose)
    cols = weight.shape[1] if transpose else weight.shape[2]
    width = _engine.panel_width(weight.dtype)
    out = torch.zeros(weight.shape[0], dtype=torch.int64)
    for k in range(weight.shape[0]):
        p = 0
        while p + 1 < blocks.shape[2]:
            if (p + 2) * width <= cols and torch.equal(blocks[k, :, p], blocks[k, :, p + 1]):
                out[k] += int(blocks[k, :, p].sum()) * 2
                p += 2
            else:
                p += 1
    return out


def _twin_choice(counts, twinned, rows, region, threshold, twin):
    """The reference choice: _execution's density, the threshold moved
    toward ``twin`` by the kept offsets' share of listed vectors in twins."""
    run = _engine._execution(counts, rows, region, threshold)
    keep = counts.sum(1) > 0
    if region is not None:
        keep &= region.numpy()
    listed = int(counts.sum(1)[keep].sum())
    if twin is not None and listed:
        threshold = threshold + (twin - threshold) * int(twinned[keep].sum()) / listed
    return run.density <= threshold, run.density


@pytest.mark.parametrize("transpose", [False, True])
def test_twin_share_moves_the_vector_threshold_in_cpp_as_in_torch(transpose):
    """conv_execution's twin_threshold: the threshold moves toward it by the
    kept offsets' share of listed vectors in twin panels. The C++ choice
    equals the reference's on _twinned (torch ops) for weights whose
    share runs from none to all (vectors of one and of two panels mixed per
    offset, a partial last panel, a dead offset, a region), at thresholds
    around each weight's density; and the torch count of twins is checked
    by hand on one weight."""
    def check(w, rows, region, label):
        """The C++ choice against the reference on every threshold around the density."""
        counts = _engine.vector_counts(w, transpose).numpy()
        twinned = _twinned(w, transpose).numpy()
        density = _engine._execution(counts, rows, region, 0.5).density
        choices = set()
        for reg in (None, region):
            for thr in (density - 0.2, density - 0.05, density - 0.01, density + 0.01):
                for twin in (None, density - 0.3, density, density + 0.02, 0.95):
                    if twin is not None and twin < 0:
                        continue
                    got = ps._ext.core.conv_execution(w.numpy(), transpose, None if reg is None else reg.numpy(),
                                                      thr, twin)
                    want = _twin_choice(counts, twinned, rows, reg, thr, twin)
                    assert (got[1], got[2]) == want, (label, thr, twin)
                    choices.add(want[0])
        return twinned, choices

    rng = torch.Generator().manual_seed(3)
    region = torch.ones(27, dtype=torch.bool)
    region[7] = False
    for c, mix in ((64, 0.0), (64, 0.5), (64, 1.0), (72, 0.7), (40, 1.0), (16, 1.0)):
        w = torch.randn(27, c, c, generator=rng)
        width = _engine.panel_width(torch.float32)
        panels = -(-c // width)
        keep = torch.rand(27, c, panels, generator=rng) < 0.6
        # Per offset (with probability mix) each odd panel takes the panel before it: twins
        keep[:, :, 1::2] = torch.where(torch.rand(27, 1, 1, generator=rng) < mix, keep[:, :, 0:panels - 1:2],
                                       keep[:, :, 1::2])
        w *= keep.repeat_interleave(width, 2)[:, :, :c]
        w[5] = 0
        if transpose:
            w = w.transpose(1, 2).contiguous()
        twinned, _ = check(w, c, region, (c, mix))
        listed = int(_engine.vector_counts(w, transpose).sum())
        if mix == 0.0 or c < 32:  # none paired (64 random rows never match), or one panel only
            assert int(twinned.sum()) == 0, (c, mix)
        elif mix == 1.0 and c % (2 * width) == 0:
            assert int(twinned.sum()) == listed, (c, mix)  # every vector in a twin
        else:
            assert 0 < int(twinned.sum()) < listed, (c, mix)
    w = torch.zeros(3, 2, 48)
    w[0, 0, :32] = 1  # panels 0 and 1 list row 0: a twin; panel 2 alone
    w[0, 1, 32:] = 1
    w[1, 0, 16:] = 1  # panel 0 lists nothing: panels 1 and 2 (row 0) pair
    w[2, 0, :] = 1  # every panel lists row 0: 0 and 1 pair, 2 is left alone
    assert _twinned(w).tolist() == [2, 2, 2]
    if not transpose:  # the C++ count on it too: 6 of 8 listed vectors in twins
        _, choices = check(w, 2, None, "by hand")
        assert choices == {False, True}  # the thresholds tried give both choices
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="twin_threshold"):
            ps._ext.core.conv_execution(w.numpy(), False, None, 0.5, bad)


def test_twin_pruned_weights_run_the_vector_kernels_to_a_higher_density():
    """Where tile_panels is 2 (full-width AVX-512), a weight pruned in vectors of
    two panels at density 0.7 runs the vector kernels (twin threshold 0.75),
    the same density in vectors of one panel the dense ones (0.6); elsewhere
    both go by VECTOR_DENSITY alone. sparsity_report's executed FLOPs follow
    the same choice."""
    torch.manual_seed(0)
    twin, single = ps.nn.Conv3d(64, 64, 3), ps.nn.Conv3d(64, 64, 3)
    prune.panel_structured(twin, "weight", 0.3, panels=2)
    prune.panel_structured(single, "weight", 0.3)
    runs = [_engine.choose_execution(m.weight.detach()) for m in (twin, single)]
    assert all(abs(r.density - 0.7) < 0.01 for r in runs)
    wide = F.tile_panels(torch.float32) == 2
    assert _engine.twin_threshold(64) == (0.75 if wide else None)
    assert runs[0].vector == (wide or _engine.VECTOR_DENSITY >= runs[0].density)
    assert runs[1].vector == (_engine.VECTOR_DENSITY >= runs[1].density)
    pairs = torch.full((27,), 1000)
    for m, r in zip((twin, single), runs):
        flops = _engine.executed_flops(m.weight.detach(), pairs)
        dense = 2 * 27000 * 64 * 64
        assert (flops < dense) == r.vector


def test_square_panels_zero_vectors_in_both_directions():
    conv = ps.nn.Conv3d(32, 32, 3)
    prune.panel_structured(conv, "weight", 0.75, square=True)
    forward = _engine.choose_execution(conv.weight)
    backward = _engine.choose_execution(conv.weight, transpose=True)
    assert forward.vector and backward.vector and forward.density == backward.density
    assert _engine.vector_blocks(conv.weight).float().mean() == 0.25
    assert _engine.vector_blocks(conv.weight, transpose=True).float().mean() == 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(27, 5, 7), (8, 40, 17), (1, 1, 1), (3, 0, 4)])
def test_vector_counts_in_cpp_equal_torch(shape, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=dtype) * (torch.rand(shape, generator=g) < 0.1)
    for transpose in (False, True):
        want = _engine.vector_blocks(w, transpose).sum(1)
        assert torch.equal(_engine.vector_counts(w, transpose), want)
    with pytest.raises(ValueError, match="weight"):
        ps._ext.core.conv_weight_vectors(np.ones((2, 2)), False)


@pytest.mark.parametrize("shape", [(1, 2**31, 0), (1, 0, 2**31)])
def test_weight_choice_refuses_dimensions_past_int32(shape):
    """The vector counts are int32 counts of rows: a weight dimension of 2**31
    or more is refused before any pass over the weight (an empty weight of
    such a shape was walked row by row: seconds here, hours at 2**40)."""
    w = np.ones(shape, np.float32)
    for transpose in (False, True):
        with pytest.raises(ValueError, match=r"weight must be .* every dimension below 2\^31; got shape"):
            ps._ext.core.conv_weight_vectors(w, transpose)
        with pytest.raises(ValueError, match=r"weight must be .* every dimension below 2\^31; got shape"):
            ps._ext.core.conv_execution(w, transpose, None, 0.5)


def test_weight_choice_refuses_empty_weights_whose_tables_it_cannot_hold():
    """An empty weight backs none of the tables its vector counts take (K x
    panels counts, C_in x panels marks; C_out x panels of C_in when
    transposed): past 2^24 entries they are refused with a ValueError naming
    weight before any is allocated, here in a child capped at 3 GB of address
    space (where 8 to 64 GB of tables allocated first fail with MemoryError)."""
    from reference import run_core_capped

    code = (
        "cases = [((0, 2**17, 2**20), False), ((0, 2**20, 2**17), True), ((2**20, 0, 2**18), False),\n"
        "         ((2**20, 2**18, 0), True)]\n"
        "for shape, transpose in cases:\n"
        "    w = np.empty(shape, np.float32)\n"
        "    attempt(lambda: core.conv_weight_vectors(w, transpose), shape)\n"
        "    attempt(lambda: core.conv_execution(w, transpose, None, 0.5), shape)\n"
    )
    proc = run_core_capped(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 8 and all(line.startswith("ValueError weight of shape (") for line in lines), proc.stdout
    # An empty weight with small tables is counted as before.
    assert ps._ext.core.conv_weight_vectors(np.empty((27, 0, 2**16), np.float32), False).shape == (27, 2**12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vector_counts_and_packing_take_special_values_as_the_comparison_does(dtype):
    """The core tests a value's bits without its sign: -0.0 is zero; NaN,
    +-inf and a subnormal are not, as for ``!= 0``. In the choice, the
    counts and the packed forward (whose listed rows must hold them)."""
    w = torch.zeros(27, 20, 24, dtype=dtype)
    w[0, 1, 3] = -0.0
    w[0, 2, 17] = float("nan")
    w[1, 5, 20] = float("inf")
    w[1, 6, 0] = -float("inf")
    w[2, 7, 23] = torch.finfo(dtype).tiny / 4
    w[2, 8, 8] = -0.0
    w[2, 9, 15] = -torch.finfo(dtype).tiny / 2
    for transpose in (False, True):
        want = _engine.vector_blocks(w, transpose).sum(1)
        assert torch.equal(_engine.vector_counts(w, transpose), want)
        counts = want.numpy()
        rows = w.shape[2] if transpose else w.shape[1]
        got, ref = _engine.choose_execution(w, None, transpose), _engine._execution(counts, rows, None, 1.0)
        assert got.density == ref.density
    # A forward through the vector kernels sees every listed value (the subnormals and infinities).
    finite = w.clone()
    finite[0, 2, 17] = 0.5
    x = make(n=300, c=20, dtype=dtype)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap).core
    outs = []
    for vector in (False, True):
        out = torch.full((kmap.num_out, 24), float("nan"), dtype=dtype)
        plan.forward(x.feats.numpy(), finite.numpy(), None, out.numpy(), 1, active=None, vector=vector)
        outs.append(out)
    assert torch.equal(outs[0].isnan(), outs[1].isnan())
    assert torch.equal(torch.nan_to_num(outs[0]), torch.nan_to_num(outs[1]))


def test_no_active_offset_leaves_the_bias_and_a_zero_weight_gradient():
    feats, kmap = case(3, 1, False, 5, 6, torch.float64)
    plan = _engine.make_fused_plan(kmap)
    w = torch.randn(27, 5, 6, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    none = np.zeros(27, np.uint8)
    for vector in (False, True):
        out = torch.full((kmap.num_out, 6), float("nan"), dtype=torch.float64)
        plan.core.forward(feats.numpy(), w.numpy(), bias.numpy(), out.numpy(), 2, isa=False, active=none, vector=vector)
        assert torch.equal(out, bias.expand_as(out))
    gw = torch.full_like(w, float("nan"))
    g = torch.randn(kmap.num_out, 6, dtype=torch.float64)
    plan.core.backward_weight(feats.numpy(), g.numpy(), gw.numpy(), 2, False, none, None)
    assert not gw.any()


def blocked_case(c_in, c_out, dtype, seed):
    """A submanifold map of several 512-row blocks and a partial one, its
    plan, a bias, a residual and an output gradient, and weights: dense,
    offsets skipped with and without the identity, vector-sparse."""
    x = make(n=2500, c=c_in, extent=20, dtype=dtype, seed=seed)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    assert plan.identity == 13 and kmap.num_out > 3 * 512
    g = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(c_out, generator=g, dtype=dtype)
    add = torch.randn(kmap.num_out, c_out, generator=g, dtype=dtype)
    grad = torch.randn(kmap.num_out, c_out, generator=g, dtype=dtype)
    weights = {"dense": torch.randn(27, c_in, c_out, generator=g, dtype=dtype),
               "offsets": sparse_weight(27, c_in, c_out, dtype, vector_keep=1.0, dead=(0, 4)),
               "offsets, no identity": sparse_weight(27, c_in, c_out, dtype, vector_keep=1.0, dead=(0, 4, 13)),
               "vectors": sparse_weight(27, c_in, c_out, dtype, vector_keep=0.25, dead=(2,))}
    return x, kmap, plan, bias, add, grad, weights


@pytest.fixture
def stream_all():
    """Every output whose rows the streaming stores take is streamed
    (threshold 0); the threshold in force before is put back after."""
    core = ps._ext.core
    before = core.conv_stream_bytes(0)
    yield core
    core.conv_stream_bytes(before)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in,c_out", [(16, 64), (24, 32), (8, 12)])
def test_streamed_output_equals_the_output_summed_in_place(c_in, c_out, dtype, isa, stream_all):
    """Large outputs are summed block by block in a scratch and streamed to
    their place (the threshold set to 0 here, so these small maps take that
    path): bit for bit the in-place result for the dense, offset-skipping and
    vector kernels, with the identity offset run first or skipped (the rows
    then start from the bias), with bias, ReLU and a residual, for the input
    gradient too, on 1 and 2 threads; every row written (NaN first). 12
    columns are rows the streaming stores do not take (not whole vectors):
    summed in place, the same."""
    x, kmap, plan, bias, add, grad, weights = blocked_case(c_in, c_out, dtype, 5)

    def run(weight, vector, nt, stream):
        stream_all.conv_stream_bytes(0 if stream else 1 << 62)
        active = _engine.choose_execution(weight).active
        out = torch.full((kmap.num_out, c_out), float("nan"), dtype=dtype)
        plan.core.forward(x.feats.numpy(), weight.numpy(), bias.numpy(), out.numpy(), nt, isa, True,
                          active=active, vector=vector, add=add.numpy())
        plain = torch.full((kmap.num_out, c_out), float("nan"), dtype=dtype)
        plan.core.forward(x.feats.numpy(), weight.numpy(), None, plain.numpy(), nt, isa, False, active=active,
                          vector=vector)
        gf = torch.full_like(x.feats, float("nan"))
        plan.core.backward_input(grad.numpy(), weight.numpy(), gf.numpy(), nt, isa, active=active, vector=vector)
        return out, plain, gf

    for name, weight in weights.items():
        for vector in (False, True):
            for nt in (1, 2):
                in_place = run(weight, vector, nt, False)
                streamed = run(weight, vector, nt, True)
                for a, b in zip(in_place, streamed):
                    assert not b.isnan().any(), (name, vector, nt)
                    assert torch.equal(a, b), (name, vector, nt)
    ref = torch.relu(conv_sum(x.feats, weights["vectors"], kmap) + bias + add)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(streamed[0], ref, **tol)


def test_stream_threshold_is_checked_and_restored():
    core = ps._ext.core
    before = core.conv_stream_bytes()
    assert before == 1 << 62  # the default: off (no output that large)
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        core.conv_stream_bytes(-1)
    assert core.conv_stream_bytes(123) == before and core.conv_stream_bytes() == 123
    assert core.conv_stream_bytes(before) == 123 and core.conv_stream_bytes() == before


@pytest.fixture
def auto_stream():
    """The threshold of the offset-pruned forward's streamed output set to 0
    (every output it marks is streamed), the one in force put back after."""
    core = ps._ext.core
    before = core.conv_stream_auto_bytes(0)
    yield core
    core.conv_stream_auto_bytes(before)


def test_offset_pruned_forward_without_its_identity_streams_its_output(auto_stream):
    """ConvPlan.streams_output marks the forward whose kept offsets leave out
    a submanifold map's identity and run no more pairs than it has output
    rows (offset pruning), and only it: not with the identity kept, not with
    more pairs, not in the vector kernels, not for a map without an identity
    (k2 s2). The marked forward, streamed from conv_stream_auto_bytes() on
    (0 here) where the avx512 build runs it (conv_streamed()), gives the
    in-place output bit for bit, on 1 and 2 threads, with bias, ReLU and a
    residual; off (2**62) it is summed in place."""
    x = make(n=2500, c=16, extent=20, dtype=torch.float32, seed=7)  # several 512-row blocks
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    assert plan.identity == 13
    sizes = kmap.sizes.clone()
    sizes[13] = kmap.num_out
    order = [k for k in torch.argsort(sizes).tolist() if k != 13]  # fewest pairs first
    few = np.zeros(27, np.uint8)
    run = 0
    for k in order:  # as many offsets as fit in one pair a row
        if run + int(sizes[k]) > kmap.num_out:
            break
        few[k], run = 1, run + int(sizes[k])
    assert 0 < run <= kmap.num_out and few.sum() >= 2
    core = plan.core
    assert core.streams_output(few)
    assert not core.streams_output(few, vector=True)
    with_identity = few.copy()
    with_identity[13] = 1
    assert not core.streams_output(with_identity) and not core.streams_output(None)
    many = np.ones(27, np.uint8)
    many[13] = 0
    assert not core.streams_output(many)  # no identity but ~2 pairs a row
    down = _engine.make_fused_plan(ps.kmap.get_kmap(x, 2, 2))
    assert down.identity is None and not down.core.streams_output(np.ones(8, np.uint8))
    g = torch.Generator().manual_seed(8)
    w = torch.randn(27, 16, 32, generator=g) * torch.as_tensor(few, dtype=torch.float32).view(27, 1, 1)
    bias = torch.randn(32, generator=g)
    add = torch.randn(kmap.num_out, 32, generator=g)

    avx512 = default_isa() == "avx512"  # (the forward below names no build)

    def forward(nt, threshold, isa=None, active=few):
        auto_stream.conv_stream_auto_bytes(threshold)
        out = torch.full((kmap.num_out, 32), float("nan"))
        core.forward(x.feats.numpy(), w.numpy(), bias.numpy(), out.numpy(), nt, isa, True, active=active,
                     add=add.numpy())
        return out, auto_stream.conv_streamed()

    for nt in (1, 2):
        (streamed, on), (in_place, off) = forward(nt, 0), forward(nt, 1 << 62)
        assert (on, off) == (avx512, False), nt
        assert not streamed.isnan().any() and torch.equal(streamed, in_place), nt
    assert not forward(1, 0, active=with_identity)[1]  # not marked: in place at any threshold
    assert not forward(1, 0, isa="generic")[1]  # marked, but streamed only in the avx512 build
    ref = torch.relu(conv_sum(x.feats, w, kmap) + bias + add)
    torch.testing.assert_close(streamed, ref, rtol=1e-4, atol=1e-4)


def test_stream_auto_threshold_is_checked_and_restored():
    core = ps._ext.core
    before = core.conv_stream_auto_bytes()
    assert before == (8 << 20 if core.avx512_full_width() else 1 << 62)  # the default: on where measured
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        core.conv_stream_auto_bytes(-1)
    assert core.conv_stream_auto_bytes(123) == before and core.conv_stream_auto_bytes() == 123
    assert core.conv_stream_auto_bytes(before) == 123 and core.conv_stream_auto_bytes() == before


def test_outputs_sharing_memory_with_what_the_kernels_read_are_refused():
    """Every product writes blocks of its output while it still reads its
    inputs: an output that shares memory with feats, weight, bias (or, for
    the weight gradient, feats, grad and mask) is a ValueError naming both,
    not a silently wrong result."""
    x = make(n=300, c=8, dtype=torch.float32, seed=9)
    kmap = ps.kmap.get_kmap(x, 3)
    core = _engine.make_fused_plan(kmap).core
    w = torch.randn(27, 8, 8)
    feats = x.feats.numpy()
    with pytest.raises(ValueError, match="feats must not share memory with out"):
        core.forward(feats, w.numpy(), None, feats, 1)  # C_in == C_out: the in-place call a user might try
    big = np.zeros((kmap.num_out + 27 * 8, 8), np.float32)  # out's last 8 rows are the weight's first 8
    with pytest.raises(ValueError, match="weight must not share memory with out"):
        core.forward(feats, big[kmap.num_out - 8:kmap.num_out - 8 + 27 * 8].reshape(27, 8, 8), None,
                     big[:kmap.num_out], 1)
    out = torch.zeros(kmap.num_out, 8)
    with pytest.raises(ValueError, match="bias must not share memory with out"):
        core.forward(feats, w.numpy(), out[0].numpy(), out.numpy(), 1)
    g = torch.randn(kmap.num_out, 8)
    with pytest.raises(ValueError, match="grad must not share memory with grad_feats"):
        core.backward_input(g.numpy(), w.numpy(), g.numpy(), 1)
    gw = torch.zeros(27, 8, 8)
    with pytest.raises(ValueError, match="feats must not share memory with grad_weight"):
        core.backward_weight(feats, g.numpy(), feats[:27 * 8].reshape(27, 8, 8), 1)
    with pytest.raises(ValueError, match="mask must not share memory with grad_weight"):
        core.backward_weight(feats, g.numpy(), gw.numpy(), 1, mask=gw.numpy())
    core.forward(feats, w.numpy(), None, out.numpy(), 1)  # apart: runs
    torch.testing.assert_close(out, conv_sum(x.feats, w, kmap), rtol=1e-4, atol=1e-4)
    if _engine.bf16_kernels():
        fb = x.feats.bfloat16().view(torch.int16).numpy()
        wb = w.bfloat16().view(torch.int16).numpy()
        with pytest.raises(ValueError, match="feats must not share memory with out_bf16"):
            core.forward_bf16(fb, wb, None, None, 1, out_bf16=fb)
        o16 = np.zeros((kmap.num_out + 27 * 8, 8), np.int16)
        with pytest.raises(ValueError, match="weight must not share memory with out_bf16"):
            core.forward_bf16(fb, o16[kmap.num_out - 1:kmap.num_out - 1 + 27 * 8].reshape(27, 8, 8), None, None,
                              1, out_bf16=o16[:kmap.num_out])
        with pytest.raises(ValueError, match="bias must not share memory with out"):
            o32 = np.zeros((kmap.num_out, 8), np.float32)
            core.forward_bf16(fb, wb, o32[3], o32, 1)


def test_panel_width_and_tile_panels_take_a_torch_dtype():
    """The public helpers name their argument: a string was torch's own "empty(): argument 'dtype' must be
    torch.dtype" (panel_width) or silently 1 (tile_panels)."""
    from pointsparse.nn import functional as F

    assert F.panel_width(torch.float64) == 8 and F.tile_panels(torch.float32) in (1, 2)
    for fn in (F.panel_width, F.tile_panels):
        with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
            fn("float32")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_weight_mask_holds_in_a_gradient_penalty(backend):
    """With create_graph=True (a gradient penalty) the engine's weight
    gradient is the masked one too, as without it and as on the torch path
    (it was the dense gradient: the masked entries got gradients)."""
    x = make(n=60, c=3, extent=5)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(27, 3, 2, generator=g) < 0.5).double()
    w0 = torch.randn(27, 3, 2, generator=g, dtype=torch.float64) * mask
    grads = {}
    for create_graph in (False, True):
        w = w0.clone().requires_grad_()
        with ps.backend(backend):
            y = F.conv3d(x, w, 3, weight_mask=mask)
            (grads[create_graph],) = torch.autograd.grad(y.feats.square().sum(), w, create_graph=create_graph)
        assert not grads[create_graph][mask == 0].any()
    torch.testing.assert_close(grads[True].detach(), grads[False], rtol=1e-10, atol=1e-10)


def test_weight_mask_holds_in_the_second_derivative_of_the_input_gradient():
    """A penalty on the input gradient (create_graph=True) differentiated for
    the weight: the masked entries get no gradient on the engine, as on the
    torch path (its hook masks every gradient of the weight) and in a
    compiled graph; the kept entries' equal the torch path's. The engine
    masked only the weight gradient itself: the input gradient's own
    derivative by the weight reached the pruned entries, which a step
    would revive."""
    x = make(n=60, c=3, extent=5)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(27, 3, 2, generator=g) < 0.5).double()
    w0 = torch.randn(27, 3, 2, generator=g, dtype=torch.float64) * mask
    grads = {}
    for backend in ("auto", "torch"):
        w, feats = w0.clone().requires_grad_(), x.feats.clone().requires_grad_()
        with ps.backend(backend):
            y = F.conv3d(x.with_feats(feats), w, 3, weight_mask=mask)
            (g_feats,) = torch.autograd.grad(y.feats.pow(3).sum(), feats, create_graph=True)
            (grads[backend],) = torch.autograd.grad(g_feats.square().sum(), w)
    assert not grads["auto"][mask == 0].any()
    torch.testing.assert_close(grads["auto"], grads["torch"], rtol=1e-10, atol=1e-8)


def test_the_engine_sees_a_skipped_offset_filled_through_data():
    """The offsets and kernels a conv runs are chosen from its weight on
    every call: a weight changed in place through ``.data`` keeps its
    version counter, so a choice kept while the counter held (tried in stop
    54) skipped an offset that now weighs, silently (gradcheck's
    perturbations failed on it)."""
    torch.manual_seed(0)
    conv = ps.nn.Conv3d(8, 8, 3)
    prune.kernel_structured(conv, "weight", 0.5, scope="offset")
    prune.remove(conv, "weight")
    zeroed = int((conv.weight.detach().abs().sum((1, 2)) == 0).nonzero()[0])
    x = make(c=8, dtype=torch.float32)
    with torch.no_grad():
        conv(x)
        conv.weight.data[zeroed] = 0.5
        out = conv(x).feats
    torch.testing.assert_close(out, dense_conv(x, conv.weight.detach(), x.coords), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vector_walk_over_blocks_in_place_and_streamed_against_the_reference(dtype):
    """The vector-sparse walk fetches a thread's next 512-row block's rows
    during this block's tiles (apply_blocks' kNext), which must change no
    result. A weight pruned in vectors by prune.panel_structured (the
    engine's forward choice: the vector kernels) on maps of at least three
    blocks of written rows, both ways: a submanifold map with its identity
    offset kept and skipped, and a k2 s2 map (no identity). On 1 and 2
    threads, summed in place and in scratch blocks (streamed, threshold 0;
    rows of whole 64-byte vectors, which the streaming stores take),
    the vector forward and input gradient equal the dense kernels' bit for
    bit (the FMA builds) and the naive conv sum and its autograd gradient."""
    x = make(n=8000, c=32, extent=20, dtype=dtype, seed=11)
    conv = ps.nn.Conv3d(32, 48, 3).to(dtype)
    prune.panel_structured(conv, "weight", 0.75)
    w = (conv.weight_orig * conv.weight_mask).detach()
    no_ident = w.clone()
    no_ident[13] = 0
    down = ps.nn.Conv3d(32, 48, 2, stride=2).to(dtype)
    prune.panel_structured(down, "weight", 0.75)
    cases = [(ps.kmap.get_kmap(x, 3), w), (ps.kmap.get_kmap(x, 3), no_ident),
             (ps.kmap.get_kmap(x, 2, 2), (down.weight_orig * down.weight_mask).detach())]
    core = ps._ext.core
    before = core.conv_stream_bytes()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    try:
        for kmap, weight in cases:
            assert min(kmap.num_out, kmap.num_in) > 3 * 512
            plan = _engine.make_fused_plan(kmap)
            assert _engine.choose_execution(weight).vector
            g = torch.randn(kmap.num_out, 48, generator=torch.Generator().manual_seed(3), dtype=dtype)
            f = x.feats.clone().requires_grad_()
            ref = conv_sum(f, weight, kmap)
            (ref_gf,) = torch.autograd.grad(ref, f, g)
            for stream in (False, True):
                core.conv_stream_bytes(0 if stream else 1 << 62)
                for nt in (1, 2):
                    got = {}
                    for vector in (False, True):
                        out = torch.full((kmap.num_out, 48), float("nan"), dtype=dtype)
                        plan.core.forward(x.feats.numpy(), weight.numpy(), None, out.numpy(), nt, None,
                                          vector=vector)
                        assert core.conv_streamed() == stream, (plan.identity, stream, nt, vector)
                        gf = torch.full_like(x.feats, float("nan"))
                        plan.core.backward_input(g.numpy(), weight.numpy(), gf.numpy(), nt, None, vector=vector)
                        assert core.conv_streamed() == stream, (plan.identity, stream, nt, vector)
                        got[vector] = out, gf
                    if ISAS[0] != "generic":
                        assert torch.equal(got[True][0], got[False][0]), (plan.identity, stream, nt)
                        assert torch.equal(got[True][1], got[False][1]), (plan.identity, stream, nt)
                    torch.testing.assert_close(got[True][0], ref.detach(), **tol)
                    torch.testing.assert_close(got[True][1], ref_gf, **tol)
    finally:
        core.conv_stream_bytes(before)
