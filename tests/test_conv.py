"""Sparse convolution against dense torch convolutions on voxel grids:
submanifold, strided, transposed, gradients, determinism, errors."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse.nn import functional as F
from pointsparse.nn import _engine
from reference import conv_sum, default_isa, dense_conv, dense_conv_transpose, random_coords


def make(n=300, c=3, extent=7, stride=1, dtype=torch.float64, seed=0):
    coords = random_coords(n, extent, stride=stride, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=dtype), coords, stride)


def weight(k, c_in, c_out, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    volume = int(np.prod(k if isinstance(k, tuple) else (k,) * 3))
    return torch.randn(volume, c_in, c_out, generator=g, dtype=dtype)


SUBMANIFOLD = [  # kernel, dilation, tensor stride of the input
    (2, 1, 1), (3, 1, 1), (5, 1, 1), (3, 2, 1), ((3, 1, 2), 1, 1), (3, 1, 2), (1, 1, 1),
]


@pytest.mark.parametrize("k,d,s", SUBMANIFOLD)
@pytest.mark.parametrize("with_bias", [False, True])
def test_submanifold_equals_dense(k, d, s, with_bias):
    x = make(stride=s)
    w = weight(k, 3, 4)
    bias = torch.randn(4, dtype=torch.float64) if with_bias else None
    y = F.conv3d(x, w, k, 1, d, bias)
    assert torch.equal(y.coords, x.coords) and y.stride == x.stride
    torch.testing.assert_close(y.feats, dense_conv(x, w, y.coords, k, 1, d, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,t,s", [(2, 2, 1), (3, 2, 1), (2, 2, 2), (3, 2, 2), (3, 3, 1), ((2, 3, 1), (2, 1, 1), 1)])
def test_strided_equals_dense(k, t, s):
    x = make(stride=s)
    w = weight(k, 3, 5)
    y = F.conv3d(x, w, k, t)
    tt = t if isinstance(t, tuple) else (t,) * 3
    assert y.stride == tuple(s * a for a in tt)
    expect = torch.unique(torch.cat([x.coords[:, :1], x.coords[:, 1:] // torch.tensor(y.stride) * torch.tensor(y.stride)],
                                    1), dim=0)
    assert torch.equal(torch.unique(y.coords, dim=0), expect)
    torch.testing.assert_close(y.feats, dense_conv(x, w, y.coords, k, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,t", [(2, 2), (3, 2), (3, 3)])
def test_transposed_equals_dense_and_adjoint(k, t):
    x = make(c=3)
    down = F.conv3d(x, weight(k, 3, 4, seed=5), k, t)
    coarse = down.with_feats(torch.randn(len(down), 4, dtype=torch.float64))
    w = weight(k, 4, 3)
    up = F.conv3d(coarse, w, k, t, transposed=True)
    assert torch.equal(up.coords, x.coords) and up.stride == x.stride
    torch.testing.assert_close(up.feats, dense_conv_transpose(coarse, w, x.coords, k, t), rtol=1e-12, atol=1e-12)
    # <y, conv(x, W)> == <conv_T(y, W^T), x>
    wt = w.transpose(1, 2).contiguous()  # (K, 3, 4): the forward conv's weight
    lhs = (coarse.feats * F.conv3d(x, wt, k, t).feats).sum()
    rhs = (F.conv3d(coarse, w, k, t, transposed=True).feats * x.feats).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-10)


def test_dilated_strided_and_transposed_equal_dense():
    x = make(n=300, extent=9)
    w = weight(3, 3, 4)
    down = F.conv3d(x, w, 3, 2, 2)
    torch.testing.assert_close(down.feats, dense_conv(x, w, down.coords, 3, 2, 2), rtol=1e-12, atol=1e-12)
    coarse = down.with_feats(torch.randn(len(down), 4, dtype=torch.float64))
    w2 = weight(3, 4, 3, seed=4)
    up = F.conv3d(coarse, w2, 3, 2, 2, transposed=True)
    torch.testing.assert_close(up.feats, dense_conv_transpose(coarse, w2, up.coords, 3, 2, 2), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("k,t,transposed", [(3, 1, False), (2, 1, False), (2, 2, False), (3, 2, False),
                                            (2, 2, True), (3, 2, True)])
def test_gradients_equal_dense(k, t, transposed):
    x = make(c=3)
    if transposed:
        down = F.conv3d(x, weight(k, 3, 3), k, t)
        src, c_out = down.with_feats(torch.randn(len(down), 3, dtype=torch.float64)), 2
    else:
        src, c_out = x, 4
    w = weight(k, 3, c_out).requires_grad_()
    bias = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    feats = src.feats.clone().requires_grad_()
    out = F.conv3d(src.with_feats(feats), w, k, t, bias=bias, transposed=transposed)
    g = torch.randn_like(out.feats)
    grads = torch.autograd.grad(out.feats, (feats, w, bias), g)
    dfeats = src.feats.clone().requires_grad_()
    dense_in = src.with_feats(dfeats)
    ref = (dense_conv_transpose(dense_in, w, out.coords, k, t, bias=bias) if transposed
           else dense_conv(dense_in, w, out.coords, k, t, bias=bias))
    torch.testing.assert_close(out.feats, ref, rtol=1e-12, atol=1e-12)
    ref_grads = torch.autograd.grad(ref, (dfeats, w, bias), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("k,t,transposed", [(3, 1, False), (2, 2, False), (3, 2, True)])
def test_gradcheck(k, t, transposed):
    x = make(n=20, c=2, extent=3, seed=3)
    if transposed:
        src = F.conv3d(x, weight(k, 2, 2), k, t)
        src = src.with_feats(src.feats.detach())
    else:
        src = x
    w = weight(k, 2, 3).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    feats = src.feats.clone().requires_grad_()
    fn = lambda f, w_, b_: F.conv3d(src.with_feats(f), w_, k, t, bias=b_, transposed=transposed).feats  # noqa: E731
    assert torch.autograd.gradcheck(fn, (feats, w, bias))


@pytest.mark.parametrize("k,t,transposed", [(3, 1, False), (2, 2, False), (2, 2, True)])
def test_gradgradcheck(k, t, transposed):
    """Second-order gradients (a gradient penalty, create_graph=True) are exact."""
    x = make(n=20, c=2, extent=3, seed=3)
    src = x
    if transposed:
        src = F.conv3d(x, weight(k, 2, 2), k, t)
        src = src.with_feats(src.feats.detach())
    w = weight(k, 2, 3).requires_grad_()
    feats = src.feats.clone().requires_grad_()
    fn = lambda f, w_: F.conv3d(src.with_feats(f), w_, k, t, transposed=transposed).feats  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (feats, w))


@pytest.mark.parametrize("k,t,transposed", [(3, 1, False), (2, 2, True)])
def test_gradgradcheck_of_non_contiguous_inputs(k, t, transposed):
    """Transposed views as feats and weight: the second-order gradients still
    reach them (the engine runs on contiguous copies of them)."""
    x = make(n=20, c=2, extent=3, seed=3)
    src = x
    if transposed:
        src = F.conv3d(x, weight(k, 2, 2), k, t)
        src = src.with_feats(src.feats.detach())
    w = weight(k, 3, 2).requires_grad_()  # used as (K, 2, 3) through a transposed view
    feats = src.feats.T.contiguous().requires_grad_()  # used as (N, 2) through a transposed view
    fn = lambda f, w_: F.conv3d(src.with_feats(f.T), w_.transpose(1, 2), k, t,  # noqa: E731
                                transposed=transposed).feats
    assert not feats.T.is_contiguous() and not w.transpose(1, 2).is_contiguous()
    assert torch.autograd.gradgradcheck(fn, (feats, w))


def test_gradient_penalty_equals_the_torch_path():
    x = make(n=200, c=3, extent=6, seed=4)
    w0 = weight(3, 3, 4)

    def penalty():
        w = w0.clone().requires_grad_()
        feats = x.feats.clone().requires_grad_()
        y = F.conv3d(x.with_feats(feats), w, 3)
        g_feats, g_w = torch.autograd.grad(y.feats.square().sum(), (feats, w), create_graph=True)
        (g_feats.square().sum() + g_w.pow(3).sum()).backward()
        return feats.grad, w.grad

    engine = penalty()
    with _ext.torch_path():
        reference = penalty()
    for a, b in zip(engine, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bad", ["rows", "volume", "channels", "dtype", "bias_shape", "bias_dtype"])
def test_engine_checks_arguments(bad):
    x = make(n=100, c=3)
    kmap = ps.kmap.get_kmap(x, 3)
    feats, w, bias = x.feats, weight(3, 3, 4), None
    if bad == "rows":
        feats = torch.cat([feats, feats[:5]])
    elif bad == "volume":
        w = weight(2, 3, 4)
    elif bad == "channels":
        w = weight(3, 2, 4)
    elif bad == "dtype":
        w = w.float()
    elif bad == "bias_shape":
        bias = torch.zeros(5, dtype=torch.float64)
    else:
        bias = torch.zeros(4, dtype=torch.float32)
    with pytest.raises((ValueError, TypeError), match="feats|weight|bias"):
        _engine.conv(feats, w, bias, kmap)


def test_partial_gradients():
    x = make(c=3)
    w = weight(3, 3, 4)
    feats = x.feats.clone().requires_grad_()
    only_feats = torch.autograd.grad(F.conv3d(x.with_feats(feats), w, 3).feats.sum(), feats)[0]
    wg = w.clone().requires_grad_()
    only_weight = torch.autograd.grad(F.conv3d(x, wg, 3).feats.sum(), wg)[0]
    both = torch.autograd.grad(F.conv3d(x.with_feats(feats), wg, 3).feats.sum(), (feats, wg))
    assert torch.equal(only_feats, both[0]) and torch.equal(only_weight, both[1])


def test_submanifold_centre_is_one_matmul():
    x = make()
    assert _engine.get_plan(ps.kmap.get_kmap(x, 3)).identity == 13
    assert _engine.get_plan(ps.kmap.get_kmap(x, 2)).identity == 0
    assert _engine.get_plan(ps.kmap.get_kmap(x, 3, 2)).identity is None


def _run(threads, k, t, transposed):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = make(n=4000, c=16, extent=24, dtype=torch.float32, seed=7)
        src = x
        if transposed:
            src = F.conv3d(x, weight(k, 16, 16, torch.float32), k, t).detach()
        w = weight(k, 16, 16, torch.float32, seed=8).requires_grad_()
        feats = src.feats.clone().requires_grad_()
        out = F.conv3d(src.with_feats(feats), w, k, t, transposed=transposed)
        out.feats.backward(torch.ones_like(out.feats) + out.feats.detach())
        return out.feats.detach(), feats.grad, w.grad
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("k,t,transposed", [(3, 1, False), (3, 2, False), (2, 2, True)])
def test_bit_identical_for_1_and_2_threads(k, t, transposed):
    """The engine promises bit-identical results for any thread count."""
    one, two = _run(1, k, t, transposed), _run(2, k, t, transposed)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    for a, b in zip(one, _run(1, k, t, transposed)):
        assert torch.equal(a, b)


def test_plan_built_at_one_thread_count_runs_bit_identically_at_the_other(monkeypatch):
    """A map's plan is built once at the thread count of that moment and kept
    in the cache (nn.build_maps builds them on one thread each); a conv run
    later at another count (forward, input and weight gradients, strided and
    transposed, dense and vector-pruned weights) gives the bits of a fresh
    run at that count."""
    x = make(n=6000, c=16, extent=26, dtype=torch.float32, seed=11)
    dense = [weight(k, 16, 16, torch.float32, seed=s) for k, s in ((3, 3), (2, 4), (2, 5))]
    pruned = [w.clone() for w in dense]
    for w in pruned:  # 70% of the (offset, input channel) vectors of 16 output columns zeroed: vector kernels
        w[torch.rand(w.shape[:2], generator=torch.Generator().manual_seed(6)) < 0.7] = 0
    assert all(_engine.choose_execution(w).vector for w in pruned)

    def run(tensor, weights):
        feats = tensor.feats.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        y = F.conv3d(tensor.with_feats(feats), ws[0], 3)
        z = F.conv3d(F.conv3d(y, ws[1], 2, 2), ws[2], 2, 2, transposed=True)
        grads = torch.autograd.grad((z.feats * torch.linspace(-1, 1, z.feats.numel()).view(z.feats.shape)).sum(),
                                    [feats] + ws)
        return [z.feats.detach(), *grads]

    before = torch.get_num_threads()
    try:
        for weights in (dense, pruned):
            for plan_threads, run_threads in ((1, 2), (2, 1)):
                monkeypatch.setenv("POINTSPARSE_NUM_THREADS", str(plan_threads))
                torch.set_num_threads(plan_threads)
                cached = ps.SparseTensor(x.feats.clone(), x.coords.clone())
                run(cached, weights)  # maps and plans built at plan_threads
                monkeypatch.setenv("POINTSPARSE_NUM_THREADS", str(run_threads))
                torch.set_num_threads(run_threads)
                later = run(cached, weights)
                fresh = run(ps.SparseTensor(x.feats.clone(), x.coords.clone()), weights)
                for a, b in zip(later, fresh):
                    assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


def test_float32_matches_float64():
    x = make(n=500, c=8, extent=9)
    w = weight(3, 8, 8)
    ref = F.conv3d(x, w, 3).feats
    out = F.conv3d(x.to(torch.float32), w.float(), 3).feats
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_uses_the_torch_path():
    x = make(n=200, c=4, extent=6)
    w = weight(3, 4, 4)
    out = F.conv3d(x.to(torch.bfloat16), w.to(torch.bfloat16), 3).feats
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), F.conv3d(x, w, 3).feats, rtol=0.05, atol=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu():
    x = make(n=500, c=4, extent=8)
    w = weight(3, 4, 5).requires_grad_()
    wc = w.detach().cuda().requires_grad_()
    out = F.conv3d(x, w, 3, 2)
    outc = F.conv3d(x.to("cuda"), wc, 3, 2)
    torch.testing.assert_close(outc.feats.cpu(), out.feats, rtol=1e-12, atol=1e-12)
    out.feats.sum().backward()
    outc.feats.sum().backward()
    torch.testing.assert_close(wc.grad.cpu(), w.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,t", [(3, 1), (2, 2)])
def test_empty_input(k, t):
    x = ps.SparseTensor(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.int32))
    w = weight(k, 3, 4).requires_grad_()
    feats = x.feats.clone().requires_grad_()
    out = F.conv3d(x.with_feats(feats), w, k, t, bias=torch.ones(4, dtype=torch.float64))
    assert out.feats.shape == (0, 4) and out.coords.shape == (0, 4)
    out.feats.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and feats.grad.shape == (0, 3)


def test_single_point():
    x = ps.SparseTensor(torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[0, 3, 4, 5]], dtype=torch.int32))
    w = weight(3, 2, 2)
    torch.testing.assert_close(F.conv3d(x, w, 3).feats, x.feats @ w[13])
    down = F.conv3d(x, w[:8], 2, 2)
    assert down.coords.tolist() == [[0, 2, 4, 4]]
    # (3, 4, 5) - (2, 4, 4) = offset (1, 0, 1): index (1 * 2 + 0) * 2 + 1
    torch.testing.assert_close(down.feats, x.feats @ w[5])


def test_module():
    x = make(c=3)
    conv = ps.nn.Conv3d(3, 6, 3, bias=True).double()
    assert isinstance(conv.weight, torch.nn.Parameter) and conv.weight.shape == (27, 3, 6)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.dilation, conv.transposed) == \
        (3, 6, (3, 3, 3), (1, 1, 1), (1, 1, 1), False)
    out = conv(x)
    torch.testing.assert_close(out.feats, dense_conv(x, conv.weight.detach(), x.coords, 3, bias=conv.bias.detach()))
    # pruning replaces the attribute; forward must read it
    mask = torch.zeros_like(conv.weight)
    del conv.weight
    conv.weight = mask
    torch.testing.assert_close(conv(x).feats, conv.bias.detach().expand(len(x), 6))
    down = ps.nn.Conv3d(3, 4, 2, stride=2).double()
    up = ps.nn.Conv3d(4, 3, 2, stride=2, transposed=True).double()
    assert up(down(x)).feats.shape == (len(x), 3)
    assert "transposed=True" in repr(up)


def test_errors():
    x = make()
    with pytest.raises(ValueError, match=r"weight must be \(K, C_in, C_out\) = \(27, 3, C_out\)"):
        F.conv3d(x, weight(3, 4, 4), 3)
    with pytest.raises(ValueError, match="weight must be"):
        F.conv3d(x, weight(2, 3, 4), 3)
    with pytest.raises(TypeError, match="dtype"):
        F.conv3d(x, weight(3, 3, 4, torch.float32), 3)
    with pytest.raises(ValueError, match="bias must be"):
        F.conv3d(x, weight(3, 3, 4), 3, bias=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="SparseTensor"):
        F.conv3d(x.feats, weight(3, 3, 4), 3)
    coarse = ps.SparseTensor(x.feats, x.coords * 2, stride=2)
    with pytest.raises(ValueError, match="no coords at stride"):
        F.conv3d(coarse, weight(2, 3, 4), 2, 2, transposed=True)
    with pytest.raises(ValueError, match="kernel_size"):
        F.conv3d(x, weight(3, 3, 4), 0)


#: The kernel builds this CPU runs, widest first ("generic" always).
ISAS = _ext.core.runnable_isas()
#: Channel counts at the edges of every build's tiles: rows of a tile (6, 8),
#: one and two vectors of columns (4, 8, 16, 32 elements), and past them.
TILE_EDGE_CHANNELS = [1, 5, 6, 7, 13, 15, 16, 17, 31, 33, 64, 100]


def test_isa_reported_and_forced():
    """conv_isa names the widest build that runs (or POINTSPARSE_ISA's); any
    build that runs can be forced, an unknown one or one this CPU cannot run
    is refused by name."""
    core = _ext.core
    assert ISAS[-1] == "generic" and set(ISAS) <= {"avx512", "avx2", "generic"}
    assert core.conv_isa() == core.spmm_isa() == default_isa()
    feats, w, kmap = _fused_case(3, 1, False, 3, 4, torch.float32)
    plan = _engine.make_fused_plan(kmap)
    out = torch.empty(kmap.num_out, 4)
    with pytest.raises(ValueError, match="isa must be one of"):
        plan.core.forward(feats.numpy(), w.numpy(), None, out.numpy(), 1, "sse9")
    for name in {"avx512", "avx2"} - set(ISAS):
        with pytest.raises(ValueError, match=f"isa = '{name}' does not run on this CPU"):
            plan.core.forward(feats.numpy(), w.numpy(), None, out.numpy(), 1, name)
    with pytest.raises(TypeError, match="isa must be None or a str"):
        plan.core.backward_input(out.numpy(), w.numpy(), feats.numpy(), 1, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in", TILE_EDGE_CHANNELS)
def test_every_build_matches_generic_and_dense(c_in, dtype):
    """Forward, input and weight gradients of every build that runs here, at
    tile-edge channel counts (C_out paired with another edge), against the
    generic build and a dense conv3d on the voxel grid (autograd for the
    gradients); 1 and 2 threads bit-identical in each build, and the FMA
    builds (avx2, avx512) bit-identical to each other: the tile shape and
    vector width never change the arithmetic."""
    c_out = TILE_EDGE_CHANNELS[(TILE_EDGE_CHANNELS.index(c_in) + 5) % len(TILE_EDGE_CHANNELS)]
    x = make(n=350, c=c_in, extent=8, dtype=dtype, seed=c_in)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    w = weight(3, c_in, c_out, dtype) / c_in ** 0.5
    g = torch.randn(kmap.num_out, c_out, dtype=dtype, generator=torch.Generator().manual_seed(c_in))
    f, ww = x.feats.clone().requires_grad_(), w.clone().requires_grad_()
    ref = dense_conv(x.with_feats(f), ww, x.coords, 3)
    ref_gf, ref_gw = torch.autograd.grad(ref, (f, ww), g)
    got = {}
    for isa in ISAS:
        per_nt = []
        for nt in (1, 2):
            out = torch.full((kmap.num_out, c_out), float("nan"), dtype=dtype)
            gf, gw = torch.full_like(x.feats, float("nan")), torch.full_like(w, float("nan"))
            plan.core.forward(x.feats.numpy(), w.numpy(), None, out.numpy(), nt, isa)
            plan.core.backward_input(g.numpy(), w.numpy(), gf.numpy(), nt, isa)
            plan.core.backward_weight(x.feats.numpy(), g.numpy(), gw.numpy(), nt, isa)
            per_nt.append((out, gf, gw))
        for a, b in zip(*per_nt):
            assert torch.equal(a, b), isa
        got[isa] = per_nt[0]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    close = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    for isa, res in got.items():
        for a, b, r in zip(res, got["generic"], (ref.detach(), ref_gf, ref_gw)):
            torch.testing.assert_close(a, r, **tol)
            torch.testing.assert_close(a, b, **close)
    if "avx2" in got and "avx512" in got:
        for a, b in zip(got["avx2"], got["avx512"]):
            assert torch.equal(a, b)


def _fused_case(k, t, transposed, c_in, c_out, dtype, seed=0):
    x = make(n=400, c=c_in, extent=8, dtype=dtype, seed=seed)
    if transposed:
        down = ps.kmap.get_kmap(x, k, t)
        src = ps.SparseTensor(torch.randn(down.num_out, c_in, dtype=dtype), down.out_coords, 2, cache=x.cache,
                              validate=False)
    else:
        src = x
    kmap = ps.kmap.get_kmap(src, k, t, 1, transposed)
    w = weight(k, c_in, c_out, dtype)
    return src.feats, w, kmap


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in,c_out", [(1, 1), (5, 6), (6, 16), (7, 17), (13, 35), (64, 64)])
@pytest.mark.parametrize("k,t,transposed", [(3, 1, False), (2, 2, False), (2, 2, True)])
def test_fused_kernels_match_torch_on_any_width(k, t, transposed, c_in, c_out, dtype):
    """Every tile shape (partial row tiles, partial column panels, fewer input
    channels than a tile's rows), every build that runs here, against torch ops."""
    feats, w, kmap = _fused_case(k, t, transposed, c_in, c_out, dtype)
    plan = _engine.make_fused_plan(kmap)
    assert plan.core.num_pairs == kmap.num_pairs
    bias = torch.randn(c_out, dtype=dtype)
    f = feats.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    ref = conv_sum(f, ww, kmap) + bias
    g = torch.randn_like(ref)
    ref_gf, ref_gw = torch.autograd.grad(ref, (f, ww), g)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    nt = min(2, _ext.max_threads())  # (two, whatever the worker's count: make test's run one each)
    for isa in ISAS:
        out = torch.full((kmap.num_out, c_out), float("nan"), dtype=dtype)
        plan.core.forward(feats.numpy(), w.numpy(), bias.numpy(), out.numpy(), nt, isa)
        gf = torch.full_like(feats, float("nan"))
        plan.core.backward_input(g.numpy(), w.numpy(), gf.numpy(), nt, isa)
        gw = torch.full_like(w, float("nan"))
        plan.core.backward_weight(feats.numpy(), g.numpy(), gw.numpy(), nt, isa)
        torch.testing.assert_close(out, ref.detach(), **tol)
        torch.testing.assert_close(gf, ref_gf, **tol)
        torch.testing.assert_close(gw, ref_gw, **tol)


def test_fused_many_units_bit_identical_for_1_and_2_threads():
    """A map large enough for several weight-gradient units and many row
    blocks: results must not depend on the thread count, in any build."""
    x = make(n=40000, c=8, extent=40, dtype=torch.float32, seed=5)
    kmap = ps.kmap.get_kmap(x, 3)
    assert kmap.num_pairs > 3 * 65536  # several units of >= 65536 pairs
    plan = _engine.make_fused_plan(kmap)
    w = weight(3, 8, 8, torch.float32)
    g = torch.randn(len(x), 8)
    for isa in reversed(ISAS):  # the default (widest) build last: `results` is checked below
        results = []
        for nt in (1, 2):
            out, gf, gw = torch.empty(len(x), 8), torch.empty(len(x), 8), torch.empty_like(w)
            plan.core.forward(x.feats.numpy(), w.numpy(), None, out.numpy(), nt, isa)
            plan.core.backward_input(g.numpy(), w.numpy(), gf.numpy(), nt, isa)
            plan.core.backward_weight(x.feats.numpy(), g.numpy(), gw.numpy(), nt, isa)
            results.append((out, gf, gw))
        for a, b in zip(*results):
            assert torch.equal(a, b), isa
    torch.testing.assert_close(results[0][0], conv_sum(x.feats, w, kmap), rtol=1e-4, atol=1e-4)
    f, ww = x.feats.clone().requires_grad_(), w.clone().requires_grad_()
    ref_gw = torch.autograd.grad(conv_sum(f, ww, kmap), ww, g)[0]
    torch.testing.assert_close(results[0][2], ref_gw, rtol=1e-3, atol=1e-3)


def test_fused_plan_sorts_unsorted_pairs():
    """Pairs in any order within an offset give the same results."""
    feats, w, kmap = _fused_case(3, 2, False, 4, 5, torch.float64)
    in_idx, out_idx = kmap.in_idx.numpy(), kmap.out_idx.numpy()
    rng = np.random.default_rng(0)
    order = np.concatenate([lo + rng.permutation(hi - lo) for lo, hi in zip(kmap.ptr[:-1], kmap.ptr[1:])])
    ptr = np.asarray(kmap.ptr, dtype=np.int64)
    a = _ext.core.ConvPlan(in_idx, out_idx, ptr, kmap.num_in, kmap.num_out, -1)
    b = _ext.core.ConvPlan(in_idx[order], out_idx[order], ptr, kmap.num_in, kmap.num_out, -1)
    g = torch.randn(kmap.num_out, 5, dtype=torch.float64)
    outs = []
    for p in (a, b):
        out, gf, gw = torch.empty(kmap.num_out, 5, dtype=torch.float64), torch.empty_like(feats), torch.empty_like(w)
        p.forward(feats.numpy(), w.numpy(), None, out.numpy(), 2)
        p.backward_input(g.numpy(), w.numpy(), gf.numpy(), 2)
        p.backward_weight(feats.numpy(), g.numpy(), gw.numpy(), 2)
        outs.append((out, gf, gw))
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_conv_plan_checks_its_map_and_every_call():
    core = _ext.core
    idx = np.array([0, 1, 2, 1, 2], dtype=np.int64)
    out = np.array([0, 1, 2, 0, 1], dtype=np.int64)
    ptr = np.array([0, 3, 5], dtype=np.int64)
    plan = core.ConvPlan(idx, out, ptr, 3, 3, 0)
    assert (plan.num_in, plan.num_out, plan.kernel_volume, plan.identity, plan.num_pairs) == (3, 3, 2, 0, 5)
    with pytest.raises(ValueError, match=r"in_idx\[2\] = 7 outside \[0, 3\)"):
        core.ConvPlan(np.array([0, 1, 7, 1, 2]), out, ptr, 3, 3, -1)
    with pytest.raises(ValueError, match="out_idx"):
        core.ConvPlan(idx, np.array([0, 1, 2, 0, -1]), ptr, 3, 3, -1)
    with pytest.raises(ValueError, match="output row 0 twice"):
        core.ConvPlan(idx, np.array([0, 1, 2, 0, 0]), ptr, 3, 3, -1)
    with pytest.raises(ValueError, match="not the identity"):
        core.ConvPlan(idx, out, ptr, 3, 3, 1)
    with pytest.raises(ValueError, match="ptr must"):
        core.ConvPlan(idx, out, np.array([0, 3, 4]), 3, 3, -1)
    with pytest.raises(ValueError, match="identity must be"):
        core.ConvPlan(idx, out, ptr, 3, 3, 2)
    with pytest.raises(ValueError, match="out_idx must be 1-D of length 5"):
        core.ConvPlan(idx, out[:4], ptr, 3, 3, -1)
    f, w, y = np.ones((3, 2), np.float32), np.ones((2, 2, 4), np.float32), np.empty((3, 4), np.float32)
    plan.forward(f, w, None, y, 2)
    assert (y == np.array([2, 2, 1])[:, None] * 2).all()  # pairs per output row x C_in
    with pytest.raises(ValueError, match=r"weight must be \(kernel_volume, C_in, C_out\) = \(2, 2, 4\)"):
        plan.forward(f, np.ones((3, 2, 4), np.float32), None, y, 2)
    with pytest.raises(ValueError, match="feats must have num_in = 3 rows"):
        plan.forward(f[:2], w, None, y, 2)
    with pytest.raises(ValueError, match="weight and feats must have the same dtype"):
        plan.forward(f.astype(np.float64), w, None, y, 2)
    with pytest.raises(ValueError, match="bias must be 1-D of length 4"):
        plan.forward(f, w, np.ones(3, np.float32), y, 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        plan.forward(np.ones((2, 3), np.float32).T, w, None, y, 2)
    with pytest.raises(ValueError, match="writeable"):
        y.flags.writeable = False
        plan.forward(f, w, None, y, 2)
    with pytest.raises(ValueError, match="float32 or float64"):
        plan.forward(f.astype(np.int32), w.astype(np.int32), None, y.astype(np.int32), 2)
    with pytest.raises(ValueError, match="grad_weight must be"):
        plan.backward_weight(f, np.ones((3, 4), np.float32), np.empty((2, 2, 3), np.float32), 2)


def test_conv_plan_refuses_block_tables_past_its_limit_before_allocating():
    """300 offsets over 2^31 - 1 rows both ways: the plan's block cuts would
    be 20 GB, zero-filled before the pairs were looked at; refused first, in
    a child capped at 3 GB of address space (a regression dies there, not
    the machine)."""
    from reference import run_core_capped

    code = (
        "ptr = np.zeros(301, np.int64)\n"
        "empty = np.zeros(0, np.int64)\n"
        "attempt(lambda: core.ConvPlan(empty, empty, ptr, 2**31 - 1, 2**31 - 1, -1), '300 offsets')\n"
        "plan = core.ConvPlan(empty, empty, np.zeros(28, np.int64), 2**24, 2**24, -1)  # (14 MB of cuts)\n"
        "print('27 offsets:', plan.kernel_volume)\n"
    )
    run = run_core_capped(code, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ValueError a plan of 300 offsets over num_in = 2147483647 and num_out = 2147483647 rows would hold " \
        "about 2516583000 block cuts, past 268435456 (2 GiB)" in run.stdout
    assert "27 offsets: 27" in run.stdout


def _run_plan(core, feats, w, g, isa=None):
    out = torch.empty(core.num_out, w.shape[2], dtype=feats.dtype)
    gf, gw = torch.empty(core.num_in, w.shape[1], dtype=feats.dtype), torch.empty_like(w)
    core.forward(feats.numpy(), w.numpy(), None, out.numpy(), 2, isa)
    core.backward_input(g.numpy(), w.numpy(), gf.numpy(), 2, isa)
    core.backward_weight(feats.numpy(), g.numpy(), gw.numpy(), 2, isa)
    return out, gf, gw


def test_plans_live_in_the_coordinate_cache_and_transposed_ones_are_derived():
    """A layer's plan is built once, kept beside its map in the tensor's
    cache; the transposed conv's plan is its downsampling map's plan with the
    directions swapped, and runs exactly as a plan built from its own map."""
    x = make(n=500, c=6, extent=9, dtype=torch.float64, seed=3)
    w3, w2 = weight(3, 6, 6), weight(2, 6, 5)
    y = F.conv3d(x, w3, 3)
    sub = ps.kmap.get_kmap(x, 3)
    plan = x.cache.plans[sub.key][1]
    assert plan.identity == 13 and _engine.get_plan(sub, cache=x.cache) is plan
    F.conv3d(y, w3, 3)
    assert _engine.get_plan(sub, cache=x.cache) is plan  # the second layer reused it
    down_out = F.conv3d(x, w2, 2, 2)
    up_in = down_out.with_feats(torch.randn(len(down_out), 6, dtype=torch.float64))
    F.conv3d(up_in, weight(2, 6, 6), 2, 2, transposed=True)
    up = ps.kmap.get_kmap(up_in, 2, 2, 1, True)
    derived = x.cache.plans[up.key][1]
    down_plan = x.cache.plans[ps.kmap.get_kmap(x, 2, 2).key][1]
    assert (derived.num_in, derived.num_out) == (down_plan.num_out, down_plan.num_in) == (up.num_in, up.num_out)
    direct = _engine.make_fused_plan(up)
    w, g = weight(2, 6, 4), torch.randn(up.num_out, 4, dtype=torch.float64)
    for isa in ISAS:
        ours, built = _run_plan(derived.core, up_in.feats, w, g, isa), _run_plan(direct.core, up_in.feats, w, g, isa)
        for a, b in zip(ours, built):
            assert torch.equal(a, b)
    ref = conv_sum(up_in.feats, w, up)
    torch.testing.assert_close(_run_plan(derived.core, up_in.feats, w, g)[0], ref, rtol=1e-12, atol=1e-12)
    # the plans are not pickled or copied with the cache (C++ objects): rebuilt on use
    import copy
    import pickle
    for again in (pickle.loads(pickle.dumps(y)), copy.deepcopy(y)):
        assert again.cache.plans == {} and len(again.cache.kmaps) == len(x.cache.kmaps)
        assert torch.equal(F.conv3d(again, w3, 3).feats, F.conv3d(y, w3, 3).feats)


def test_transposed_plan_of_unsorted_pairs():
    """A plan whose pairs needed sorting (its own by-input arrays) transposes
    too: the same results as a plan of the swapped pairs."""
    feats, w, kmap = _fused_case(3, 2, False, 4, 5, torch.float64)
    rng = np.random.default_rng(1)
    order = np.concatenate([lo + rng.permutation(hi - lo) for lo, hi in zip(kmap.ptr[:-1], kmap.ptr[1:])])
    in_idx, out_idx, ptr = kmap.in_idx.numpy()[order], kmap.out_idx.numpy()[order], np.asarray(kmap.ptr)
    a = _ext.core.ConvPlan(in_idx, out_idx, ptr, kmap.num_in, kmap.num_out, -1).transposed()
    b = _ext.core.ConvPlan(out_idx, in_idx, ptr, kmap.num_out, kmap.num_in, -1)
    wt = w.transpose(1, 2).contiguous()
    src = torch.randn(kmap.num_out, 5, dtype=torch.float64)
    g = torch.randn(kmap.num_in, 4, dtype=torch.float64)
    for x, y in zip(_run_plan(a, src, wt, g), _run_plan(b, src, wt, g)):
        assert torch.equal(x, y)


def test_stride_one_map_onto_other_coords_has_no_identity():
    """A stride-1 map onto given (reordered) out_coords has a zero offset of
    n pairs that is not the identity: the plan runs it as a plain offset."""
    x = make(n=200, c=3, extent=6, dtype=torch.float64, seed=4)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    kmap = ps.kmap.build(x.coords, 3, out_coords=x.coords[perm])
    plan = _engine.make_fused_plan(kmap)
    assert plan.identity is None
    w = weight(3, 3, 4)
    out = torch.empty(kmap.num_out, 4, dtype=torch.float64)
    plan.core.forward(x.feats.numpy(), w.numpy(), None, out.numpy(), 2)
    torch.testing.assert_close(out, conv_sum(x.feats, w, kmap), rtol=1e-12, atol=1e-12)

# --- coordinates anywhere in int32 (adaptive keys) ---------------------------

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# shifts that are multiples of 16 (the coarsest stride below), so that every
# downsampling commutes with them: the far network must equal the near one
FAR_SHIFTS = {
    "x_100000": (0, 100000, 0, 0),
    "int32_min": (0, INT32_MIN, INT32_MIN, INT32_MIN),
    "int32_max": (0, INT32_MAX - 31, INT32_MAX - 31, INT32_MAX - 31),
    "both_ends": (0, INT32_MAX - 31, INT32_MIN + 16, 0),
    "big_batch": (2**31 - 4, 0, 0, 0),
}


def unet_chain(x, path: bool):
    """Submanifold, two strided and two transposed convs (a small U-Net path)."""
    with _ext.torch_path() if path else contextlib.nullcontext():
        h = F.conv3d(x, weight(3, 3, 4, seed=1), 3)
        d1 = F.conv3d(h, weight(2, 4, 4, seed=2), 2, 2)
        d2 = F.conv3d(d1, weight(3, 4, 4, seed=3), 3, 2)
        u1 = F.conv3d(d2, weight(3, 4, 4, seed=4), 3, 2, transposed=True)
        u0 = F.conv3d(u1, weight(2, 4, 2, seed=5), 2, 2, transposed=True)
    return [h, d1, d2, u1, u0]


@pytest.mark.parametrize("shift", sorted(FAR_SHIFTS))
def test_far_networks_equal_the_near_network(shift):
    near = make(n=300, extent=9, seed=31)
    offset = torch.tensor([v // 16 * 16 if a else v for a, v in enumerate(FAR_SHIFTS[shift])])
    feats = near.feats.clone().requires_grad_()
    far_feats = near.feats.clone().requires_grad_()
    far = ps.SparseTensor(far_feats, (near.coords.long() + offset).int())
    near = ps.SparseTensor(feats, near.coords)
    a, b = unet_chain(near, False), unet_chain(far, False)
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(q.coords.long(), p.coords.long() + offset), i
        assert torch.equal(q.feats, p.feats), i  # identical maps in identical order: bit-identical
    b[-1].feats.square().sum().backward()
    a[-1].feats.square().sum().backward()
    assert torch.equal(far_feats.grad, feats.grad)
    far_torch = unet_chain(ps.SparseTensor(far_feats.detach(), far.coords), True)
    for p, q in zip(b, far_torch):
        assert torch.equal(p.coords, q.coords)
        torch.testing.assert_close(q.feats, p.feats.detach(), rtol=1e-12, atol=1e-12)


def test_strided_conv_below_int32_is_a_clear_error():
    x = ps.SparseTensor(torch.zeros(2, 1, dtype=torch.float64),
                        torch.tensor([[0, INT32_MIN + 1, 0, 0], [0, 5, 0, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"downsampled to stride \(3, 3, 3\) falls below the int32 range"):
        F.conv3d(x, weight(3, 1, 1), 3, 3)
    y = F.conv3d(x, weight(2, 1, 1), 2, 2)  # floor(c / 2) * 2 stays in int32
    assert y.coords[:, 1].tolist() == [INT32_MIN, 4]


def test_conv3d_takes_api_md_positional_order_and_defaults():
    """API.md writes ``Conv3d(in_channels, out_channels, kernel_size=3,
    stride=1, dilation=1, bias=False, transposed=False)`` and
    ``functional.conv3d(input, weight, kernel_size, stride=1, dilation=1,
    bias=None, transposed=False)``: code ported from TorchSparse calls them
    positionally, so the order and the defaults are the contract."""
    plain = ps.nn.Conv3d(3, 4)
    assert (plain.kernel_size, plain.stride, plain.dilation, plain.bias, plain.transposed) == \
        ((3, 3, 3), (1, 1, 1), (1, 1, 1), None, False)
    assert plain.weight.shape == (27, 3, 4)
    down = ps.nn.Conv3d(3, 4, 2, 2, 1, True, False).double()
    assert (down.kernel_size, down.stride, down.dilation, down.transposed) == ((2, 2, 2), (2, 2, 2), (1, 1, 1), False)
    assert down.bias is not None and down.bias.shape == (4,)
    up = ps.nn.Conv3d(4, 3, 2, 2, 1, False, True).double()
    assert up.transposed and up.bias is None and up.weight.shape == (8, 4, 3)
    dilated = ps.nn.Conv3d(3, 4, 3, 1, 2)
    assert dilated.dilation == (2, 2, 2) and dilated.stride == (1, 1, 1)

    x = make(c=3)
    w, b = weight(3, 3, 4), torch.randn(4, dtype=torch.float64)
    y = F.conv3d(x, w, 3, 1, 2, b, False)
    assert torch.equal(y.feats, F.conv3d(x, w, kernel_size=3, stride=1, dilation=2, bias=b, transposed=False).feats)
    torch.testing.assert_close(y.feats, dense_conv(x, w, x.coords, 3, 1, 2, b), rtol=1e-12, atol=1e-12)
    assert torch.equal(F.conv3d(x, w, 3).feats, F.conv3d(x, w, 3, 1, 1, None, False).feats)
    coarse = F.conv3d(x, weight(2, 3, 4), 2, 2)
    up_positional = F.conv3d(coarse, weight(2, 4, 3), 2, 2, 1, None, True)
    up_keywords = F.conv3d(coarse, weight(2, 4, 3), kernel_size=2, stride=2, transposed=True)
    assert torch.equal(up_positional.coords, x.coords) and torch.equal(up_positional.feats, up_keywords.feats)
    out = down(x)
    torch.testing.assert_close(out.feats, dense_conv(x, down.weight.detach(), out.coords, 2, 2,
                                                     bias=down.bias.detach()), rtol=1e-12, atol=1e-12)
    assert up(out).coords.shape == x.coords.shape


def test_conv3d_made_in_float64_runs_as_the_float32_one_converted():
    """Conv3d took no ``dtype`` (torch's factory kwarg: ``torch.nn.Conv3d(..., dtype=torch.float64)``): a
    float64 conv was built in float32 and converted. ``dtype=torch.float64`` makes the weight and bias in
    float64: drawn in float64 (torch's float64 uniform draws, not float32 values widened; the same seed gives
    other values than the float32 draws, as for torch's own modules), within the same bound, and on the
    same values the conv runs as the float32-built one converted with ``.double()``, bit for bit."""
    torch.manual_seed(0)
    wide = ps.nn.Conv3d(3, 4, 3, bias=True, dtype=torch.float64)
    assert wide.weight.dtype == wide.bias.dtype == torch.float64
    bound = 1 / np.sqrt(3 * 27)
    assert wide.weight.abs().max() <= bound and wide.bias.abs().max() <= bound
    assert not torch.equal(wide.weight, wide.weight.float().double())  # (drawn in float64)
    torch.manual_seed(0)
    narrow = ps.nn.Conv3d(3, 4, 3, bias=True).double()
    narrow.load_state_dict(wide.state_dict())
    x = make(c=3)
    out = wide(x)
    assert out.feats.dtype == torch.float64 and torch.equal(out.feats, narrow(x).feats)
    torch.testing.assert_close(out.feats, dense_conv(x, wide.weight.detach(), x.coords, 3, bias=wide.bias.detach()),
                               rtol=1e-12, atol=1e-12)
    up = ps.nn.Conv3d(4, 3, 2, 2, 1, False, True, dtype=torch.float64)  # (the positional order kept before them)
    assert up.transposed and up.weight.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_conv3d_takes_device_and_dtype_as_torch_modules_do(dtype):
    """``device`` and ``dtype`` are keyword-only after ``kernel_region``, as torch.nn.Conv3d's factory
    kwargs: the weight and bias made there, in that dtype (any float dtype a SparseTensor holds)."""
    for device in ("cpu", torch.device("cpu")):
        conv = ps.nn.Conv3d(2, 3, 3, 1, 1, True, False, "cross", device=device, dtype=dtype)
        for t in (conv.weight, conv.bias):
            assert isinstance(t, torch.nn.Parameter) and t.dtype == dtype and t.device == torch.device("cpu")
        assert torch.isfinite(conv.weight).all() and conv.weight[list(conv.kernel_region)].abs().sum() > 0
    with pytest.raises(TypeError, match="positional"):
        ps.nn.Conv3d(2, 3, 3, 1, 1, False, False, None, "cpu")


def test_conv3d_on_the_meta_device_and_skip_init():
    """``torch.nn.utils.skip_init(Conv3d, ...)`` (which passes ``device="meta"``), ``device="meta"`` and a
    model built under ``with torch.device("meta")`` (a kernel region's mask was made there, and the
    constructor failed reading it), then ``to_empty`` and ``reset_parameters``: the conv initialised as a
    CPU-built one is, zeros outside its kernel region."""
    meta = ps.nn.Conv3d(4, 8, 3, bias=True, kernel_region=[0, 13], device="meta")
    assert meta.weight.is_meta and meta.bias.is_meta and meta.weight.shape == (27, 4, 8)
    meta.reset_parameters()  # (nothing to initialise; not an error)
    keep = F.region_of(3, "cross")
    bound = 1 / np.sqrt(4 * int(keep.sum()))
    skipped = torch.nn.utils.skip_init(ps.nn.Conv3d, 4, 8, 3, kernel_region="cross")
    assert skipped.weight.device == torch.device("cpu") and skipped.weight.shape == (27, 4, 8)
    with torch.device("meta"):
        model = torch.nn.Sequential(ps.nn.Conv3d(4, 8, 3, kernel_region="cross"), ps.nn.BatchNorm(8),
                                    ps.nn.ReLU(), ps.nn.Conv3d(8, 3, 2, stride=2))
    assert all(p.is_meta for p in model.parameters()) and model[0].kernel_region == (4, 10, 12, 13, 14, 16, 22)
    model.to_empty(device="cpu")
    for conv in (skipped, model[0]):
        with torch.no_grad():
            conv.weight.fill_(7.0)  # (to_empty's values are whatever the memory held)
        conv.reset_parameters()
        assert not conv.weight.detach()[~keep].any()
        assert 0 < conv.weight.detach()[keep].abs().max() <= bound
    model[1].reset_parameters()
    model[3].reset_parameters()
    x = make(c=4)
    out = model.double().eval()(x)
    assert out.feats.shape[1] == 3 and torch.isfinite(out.feats).all()


def test_conv3d_refuses_a_dtype_or_device_it_cannot_make():
    """A dtype the layers do not run (an integer, bool, complex or float8 one, a name, a Python type) is a
    TypeError naming ``dtype`` and what it takes (as a SparseTensor's feats: float8 passes a floating-point
    check and no layer runs it); a device torch does not read, an error naming ``device``."""
    bad = [torch.int64, torch.bool, torch.complex64, "float32", float]
    bad += [torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else []
    for dtype in bad:
        with pytest.raises(TypeError, match=r"dtype must be None or a floating torch.dtype .*torch.float32, "
                                            r"torch.float64, torch.bfloat16 or torch.float16\); got"):
            ps.nn.Conv3d(2, 3, 3, dtype=dtype)
    with pytest.raises(ValueError, match="device must be None, a torch.device or a device string .*got 'nonsense'"):
        ps.nn.Conv3d(2, 3, 3, device="nonsense")
    with pytest.raises(TypeError, match=r"device must be .*got \[1\]"):
        ps.nn.Conv3d(2, 3, 3, device=[1])
