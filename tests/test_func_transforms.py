"""torch.func transforms (grad, vjp, jacrev, grad of grad) through the
engine's autograd Functions equal torch.autograd's gradients, bit for bit;
vmap (per-sample gradients) equals a loop over the samples and forward mode
(jvp, jacfwd, forward_ad) the torch ops' own forward mode on the same pairs;
through voxelize and devoxelize they take torch ops."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import functional_call

import pointsparse as ps
from pointsparse import prune
from pointsparse.nn import functional as F
from reference import random_coords


def cloud(n=40, c=2, extent=4, seed=0):
    coords = random_coords(n, extent, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=torch.float64), coords)


def layer(case):
    """``(module, input)`` of a float64 Conv3d case on a small cloud."""
    torch.manual_seed(0)
    x = cloud()
    if case == "submanifold":
        return ps.nn.Conv3d(2, 3, 3, bias=True).double(), x
    if case == "strided2":
        return ps.nn.Conv3d(2, 3, 2, stride=2).double(), x
    if case == "strided3":
        return ps.nn.Conv3d(2, 3, 3, stride=2, bias=True).double(), x
    if case == "transposed":
        with torch.no_grad():
            down = F.conv3d(x, torch.randn(8, 2, 2, dtype=torch.float64), 2, 2)
        return ps.nn.Conv3d(2, 3, 2, stride=2, transposed=True).double(), down
    if case == "region":
        return ps.nn.Conv3d(2, 3, 3, kernel_region="cross").double(), x
    if case == "mask":
        m = ps.nn.Conv3d(2, 3, 3, bias=True).double()
        prune.l1_unstructured(m, "weight", 0.6)
        return m, x
    if case == "unet":  # down and back up: the transposed conv finds its coords in the cache built in the transform
        down = ps.nn.Conv3d(2, 3, 2, stride=2, kernel_region=[0, 3, 5, 6]).double()
        prune.l1_unstructured(down, "weight", 0.3)
        up = ps.nn.Conv3d(3, 2, 2, stride=2, transposed=True, bias=True).double()
        return torch.nn.Sequential(ps.nn.Conv3d(2, 2, 3).double(), down, up), x
    raise AssertionError(case)


CASES = ["submanifold", "strided2", "strided3", "transposed", "region", "mask", "unet"]


def params_of(m):
    return {k: v.detach() for k, v in m.named_parameters()}


def out_fn(m, x):
    return lambda params, feats: functional_call(m, params, (x.with_feats(feats),)).feats


def loss_fn(m, x):
    out = out_fn(m, x)
    return lambda params, feats: (out(params, feats).sin() * 0.5).sum()


def autograd_grads(fn, params, feats, *args, **kwargs):
    """``(grads of params, grad of feats)`` of ``fn(params, feats)`` by torch.autograd."""
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    feats = feats.clone().requires_grad_()
    grads = torch.autograd.grad(fn(params, feats), (*params.values(), feats), *args, **kwargs)
    return dict(zip(params, grads[:-1])), grads[-1]


def assert_same(got, expect):
    """Equal bit for bit: the transforms run the same kernels as autograd."""
    got_params, got_feats = got
    expect_params, expect_feats = expect
    assert got_params.keys() == expect_params.keys()
    for k in expect_params:
        torch.testing.assert_close(got_params[k], expect_params[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(got_feats, expect_feats, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_func_grad_through_conv_equals_autograd(case):
    m, x = layer(case)
    loss = loss_fn(m, x)
    params = params_of(m)
    got = torch.func.grad(loss, argnums=(0, 1))(params, x.feats)
    assert_same(got, autograd_grads(loss, params, x.feats))


@pytest.mark.parametrize("case", CASES)
def test_func_vjp_through_conv_equals_autograd(case):
    m, x = layer(case)
    fn = out_fn(m, x)
    params = params_of(m)
    out, vjp = torch.func.vjp(fn, params, x.feats)
    assert torch.equal(out, fn(params, x.feats))  # the forward is the engine's, bit for bit
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    assert_same(vjp(cotangent), autograd_grads(fn, params, x.feats, cotangent))


@pytest.mark.parametrize("case", ["submanifold", "transposed", "mask", "unet"])
def test_func_grad_of_grad_through_conv_equals_autograd(case):
    """A gradient penalty by nested torch.func.grad (the input and weight
    gradients differentiated again) equals create_graph autograd."""
    m, x = layer(case)
    loss = loss_fn(m, x)
    penalty = lambda params, feats: (torch.func.grad(loss, argnums=1)(params, feats) ** 2).sum()  # noqa: E731
    params = params_of(m)
    got = torch.func.grad(penalty, argnums=(0, 1))(params, x.feats)

    def autograd_penalty(p, f):
        (g,) = torch.autograd.grad(loss(p, f), f, create_graph=True)
        return (g ** 2).sum()

    assert_same(got, autograd_grads(autograd_penalty, params, x.feats))


def test_func_grad_past_a_frozen_conv_equals_autograd():
    """A first conv (kernel region, pruning mask) with nothing to differentiate
    runs the engine's inference inside the transform; the gradients of the
    layers after it equal autograd's."""
    torch.manual_seed(0)
    x = cloud()
    frozen = ps.nn.Conv3d(2, 3, 3, kernel_region="cross").double()
    prune.l1_unstructured(frozen, "weight", 0.5)
    frozen.requires_grad_(False)
    net = torch.nn.Sequential(frozen, ps.nn.Conv3d(3, 2, 3, stride=2, bias=True).double())
    loss = lambda params: (functional_call(net, params, (x,)).feats.sin() * 0.5).sum()  # noqa: E731
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}
    got = torch.func.grad(loss)(params)
    expect = autograd_grads(lambda p, _f: loss(p), params, x.feats, allow_unused=True)[0]
    assert_same((got, x.feats), (expect, x.feats))


def test_func_jacrev_through_conv_equals_autograd():
    """jacrev one row at a time (chunk_size=1: no vmap) equals autograd's Jacobian."""
    torch.manual_seed(0)
    m, x = ps.nn.Conv3d(2, 2, 3, stride=2).double(), cloud(n=8, extent=2)
    params = params_of(m)
    fn = out_fn(m, x)
    got = torch.func.jacrev(fn, argnums=1, chunk_size=1)(params, x.feats)
    expect = torch.autograd.functional.jacobian(lambda f: fn(params, f), x.feats)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def random_tangents(params: dict, feats: torch.Tensor, seed: int) -> tuple[dict, torch.Tensor]:
    """Seeded random tangents (or vectors) of the parameters and the feats."""
    g = torch.Generator().manual_seed(seed)
    return ({k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()},
            torch.randn(feats.shape, generator=g, dtype=feats.dtype))


def torch_path(fn):
    """``fn`` run with the conv on torch ops (``ps.backend("torch")``): the
    same pairs in index_select / matmul / index_add, whose forward mode and
    vmap are torch's own: the reference for the engine's rules."""
    def run(*args):
        with ps.backend("torch"):
            return fn(*args)
    return run


@pytest.mark.parametrize("case", CASES)
def test_func_vmap_of_conv_equals_a_loop(case):
    """vmap over the feats (no gradient wanted: the inference path cannot read
    a batch, the Function's rule runs it) equals the samples one by one, bit
    for bit; vmap over the parameters too."""
    m, x = layer(case)
    fn = out_fn(m, x)
    params = params_of(m)
    g = torch.Generator().manual_seed(5)
    batched = torch.randn((3, *x.feats.shape), generator=g, dtype=x.feats.dtype)
    got = torch.func.vmap(fn, in_dims=(None, 0))(params, batched)
    expect = torch.stack([fn(params, f) for f in batched])
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    got = torch.func.vmap(fn, in_dims=(0, None))(stacked, x.feats)
    expect = torch.stack([fn({k: v[i] for k, v in stacked.items()}, x.feats) for i in range(2)])
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_func_per_sample_grads_equal_autograd_per_sample(case):
    """vmap(grad): per-sample gradients of the parameters and the feats (a
    Fisher-style pruning score's ingredients) equal autograd's, sample by
    sample, bit for bit."""
    m, x = layer(case)
    loss = loss_fn(m, x)
    params = params_of(m)
    g = torch.Generator().manual_seed(6)
    batched = torch.randn((3, *x.feats.shape), generator=g, dtype=x.feats.dtype)
    got_params, got_feats = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0))(params, batched)
    for i, f in enumerate(batched):
        expect_params, expect_feats = autograd_grads(loss, params, f)
        assert_same(({k: v[i] for k, v in got_params.items()}, got_feats[i]), (expect_params, expect_feats))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's own, setting up its jvp)
def test_func_jacrev_batched_and_jacfwd_equal_autograd():
    """jacrev with its default vmap over the rows of the identity, and jacfwd
    (vmap over jvp), equal autograd's Jacobian, in the feats and the weight."""
    torch.manual_seed(0)
    m, x = ps.nn.Conv3d(2, 2, 3, stride=2, bias=True).double(), cloud(n=8, extent=2)
    params = params_of(m)
    fn = out_fn(m, x)
    expect = torch.autograd.functional.jacobian(lambda f, w: fn({**params, "weight": w}, f),
                                                (x.feats, params["weight"]))
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        got = jac(lambda f, w: fn({**params, "weight": w}, f), argnums=(0, 1))(x.feats, params["weight"])
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's own, setting up its jvp)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
def test_forward_mode_through_conv_equals_torch_ops(case, mode):
    """Tangents on the feats and every parameter through the engine's jvp
    rules equal the torch ops' forward mode on the same pairs (the primal
    output is the engine's, bit for bit)."""
    m, x = layer(case)
    fn = out_fn(m, x)
    params = params_of(m)
    t_params, t_feats = random_tangents(params, x.feats, 8)

    def run(function):
        if mode == "func.jvp":
            return torch.func.jvp(function, (params, x.feats), (t_params, t_feats))
        with forward_ad.dual_level():
            duals = {k: forward_ad.make_dual(v, t_params[k]) for k, v in params.items()}
            out = forward_ad.unpack_dual(function(duals, forward_ad.make_dual(x.feats, t_feats)))
            return out.primal, out.tangent

    out, tangent = run(fn)
    ref_out, ref_tangent = run(torch_path(fn))
    assert tangent is not None
    torch.testing.assert_close(out, fn(params, x.feats), rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's own, setting up its jvp)
@pytest.mark.parametrize("case", ["submanifold", "transposed", "mask"])
def test_forward_over_reverse_hvp_equals_torch_ops(case):
    """A Hessian-vector product by jvp of grad (forward over reverse: the
    jvp rules of the input and weight gradients) equals the torch ops'."""
    m, x = layer(case)
    loss = loss_fn(m, x)
    params = params_of(m)
    v_params, v_feats = random_tangents(params, x.feats, 9)

    def hvp(function):
        grad = torch.func.grad(function, argnums=(0, 1))
        return torch.func.jvp(grad, (params, x.feats), (v_params, v_feats))[1]

    (got_params, got_feats), (ref_params, ref_feats) = hvp(loss), hvp(torch_path(loss))
    for k in params:
        torch.testing.assert_close(got_params[k], ref_params[k], rtol=1e-10, atol=1e-12, msg=k)
    torch.testing.assert_close(got_feats, ref_feats, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's own, setting up its jvp)
@pytest.mark.parametrize("case", ["submanifold", "strided3", "transposed", "region"])
def test_conv_gradcheck_forward_mode(case):
    """torch's own check of the jvp rules against finite differences, float64.
    (Its batched checks run torch's legacy vmap, whose batches reach no
    Function's vmap rule: a clear error, below; torch.func's vmap over vjp
    and over jvp are jacrev and jacfwd, tested above.)"""
    m, x = layer(case)
    params = params_of(m)
    names = list(params)

    def fn(feats, *values):
        return functional_call(m, dict(zip(names, values)), (x.with_feats(feats),)).feats

    inputs = tuple(t.clone().requires_grad_() for t in (x.feats, *params.values()))
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)


def test_legacy_batched_grads_are_a_clear_error():
    """``torch.autograd.grad(..., is_grads_batched=True)`` batches with torch's
    legacy vmap, which the core cannot read: a TypeError naming it and the
    way that works (torch's was 'Batching rule not implemented for
    aten::detach')."""
    m, x = layer("submanifold")
    feats = x.feats.clone().requires_grad_()
    out = m(x.with_feats(feats)).feats
    batched = torch.stack([torch.ones_like(out), 2 * torch.ones_like(out)])
    with pytest.raises(TypeError, match="is_grads_batched.*torch.func.vmap"):
        torch.autograd.grad(out, feats, batched, is_grads_batched=True)
    # the way it names: vmap over torch.func.vjp, equal to one vjp a sample
    _, vjp = torch.func.vjp(lambda f: m(x.with_feats(f)).feats, x.feats)
    got = torch.func.vmap(vjp)(batched)[0]
    expect = torch.stack([torch.autograd.grad(m(x.with_feats(feats)).feats, feats, g)[0] for g in batched])
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def points_cloud(n=60, seed=3):
    g = torch.Generator().manual_seed(seed)
    points = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * 1.5
    feats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return points, feats


@pytest.mark.parametrize("backend", ["auto", "torch"])  # the core's one call, the torch grouping
@pytest.mark.parametrize("reduce", ["mean", "max", "sum", "first"])
def test_func_grad_and_vjp_through_voxelize_equal_autograd(reduce, backend):
    points, feats = points_cloud()
    weights = torch.linspace(-1, 1, 4, dtype=torch.float64)

    def voxel_feats(f):
        return ps.voxelize(points, f, voxel_size=0.5, reduce=reduce)[0].feats

    def loss(f):
        return ((voxel_feats(f) * weights).sin() * 0.5).sum()

    with ps.backend(backend):
        got = torch.func.grad(loss)(feats)
        out, vjp = torch.func.vjp(voxel_feats, feats)
        assert torch.equal(out, voxel_feats(feats))
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
        (got_vjp,) = vjp(cotangent)
        f = feats.clone().requires_grad_()
        (expect,) = torch.autograd.grad(loss(f), f)
        (expect_vjp,) = torch.autograd.grad(voxel_feats(f), f, cotangent)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    torch.testing.assert_close(got_vjp, expect_vjp, rtol=0, atol=0)


def test_func_grad_through_voxelize_and_conv_equals_autograd():
    """Points to voxels to a conv and back to the points, differentiated in
    the point features and the weight."""
    points, feats = points_cloud(n=80)
    torch.manual_seed(0)
    m = ps.nn.Conv3d(4, 2, 3, bias=True).double()

    def loss(params, f):
        x, inverse = ps.voxelize(points, f, voxel_size=0.4, reduce="max")
        y = functional_call(m, params, (x,))
        return (ps.devoxelize(y, inverse).sin() * 0.5).sum()

    params = params_of(m)
    got = torch.func.grad(loss, argnums=(0, 1))(params, feats)
    assert_same(got, autograd_grads(loss, params, feats))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's own, setting up its jvp)
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("reduce", ["mean", "max", "sum", "first"])
def test_func_vmap_and_forward_mode_through_voxelize(reduce, backend):
    """A vmap batch or a tangent on the point features takes voxelize's
    reduction in torch ops (the core's Functions carry neither; they were
    torch's errors): vmap equals a loop bit for bit, per-sample gradients
    equal grad a sample at a time, and the jvp passes torch's check against
    finite differences; the voxels are the ones the core makes."""
    points, feats = points_cloud()

    def voxel_feats(f):
        return ps.voxelize(points, f, voxel_size=0.5, reduce=reduce)[0].feats

    def loss(f):
        return (voxel_feats(f).sin() * 0.5).sum()

    batched = torch.stack([feats, -feats, 2 * feats])
    with ps.backend(backend):
        torch.testing.assert_close(torch.func.vmap(voxel_feats)(batched), torch.stack([voxel_feats(f) for f in batched]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(batched),
                                   torch.stack([torch.func.grad(loss)(f) for f in batched]), rtol=0, atol=0)
        assert torch.autograd.gradcheck(voxel_feats, (feats.clone().requires_grad_(),), check_forward_ad=True)
        with forward_ad.dual_level():
            x, inverse = ps.voxelize(points, forward_ad.make_dual(feats, torch.ones_like(feats)), voxel_size=0.5,
                                     reduce=reduce)
        plain, plain_inverse = ps.voxelize(points, feats, voxel_size=0.5, reduce=reduce)
    assert torch.equal(x.coords, plain.coords) and torch.equal(inverse, plain_inverse)
    torch.testing.assert_close(forward_ad.unpack_dual(x.feats).primal, plain.feats, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's own, setting up its jvp)
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (vmap's fallback for addcmul_)
@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
def test_func_vmap_and_forward_mode_through_devoxelize(mode):
    """devoxelize under vmap equals a loop and its jvp passes torch's check."""
    points, feats = points_cloud(n=80)
    x, inverse = ps.voxelize(points, feats, voxel_size=0.4)

    def point_feats(f):
        if mode == "nearest":
            return ps.devoxelize(x.with_feats(f), inverse)
        return ps.devoxelize(x.with_feats(f), points=points, voxel_size=0.4, mode="trilinear")

    batched = torch.stack([x.feats, -x.feats])
    torch.testing.assert_close(torch.func.vmap(point_feats)(batched), torch.stack([point_feats(f) for f in batched]),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(point_feats, (x.feats.clone().requires_grad_(),), check_forward_ad=True)


@pytest.mark.parametrize("score", ["magnitude", "learned"])
def test_func_grad_through_voxel_prune_equals_autograd(score):
    """VoxelPrune chose its voxels with numpy's partition of the scores read
    by .numpy(), which fails on a transform's wrapper: torch.func.grad
    through a pruned network crashed. It reads them as the core does."""
    torch.manual_seed(0)
    x = cloud(n=60, c=2, extent=5)
    net = torch.nn.Sequential(ps.nn.Conv3d(2, 3, 3, bias=True), ps.nn.VoxelPrune(0.5, score=score, in_channels=3),
                              ps.nn.Conv3d(3, 2, 3)).double()
    fn = loss_fn(net, x)
    params = params_of(net)
    assert_same(torch.func.grad(fn, argnums=(0, 1))(params, x.feats), autograd_grads(fn, params, x.feats))


def compressed(kind, fmt):
    """A float64 compressed layer (running its format's product) and an input."""
    torch.manual_seed(0)
    if kind == "linear":
        module = torch.nn.Linear(8, 4).double()
        x = torch.randn(5, 8, dtype=torch.float64)
    else:
        module, x = ps.nn.Conv3d(4, 4, 3, bias=True).double(), cloud(c=4)
    if fmt == "nm":
        prune.nm_structured(module, "weight", 2, 4)
    else:
        prune.l1_unstructured(module, "weight", amount=0.6)
    prune.remove(module, "weight")
    from pointsparse import formats

    fast = formats.compress(module, fmt, **({"n": 2, "m": 4} if fmt == "nm" else {}))
    fast.execution = "format"  # (compress's defaults run the engine / torch's linear on the weight held)
    return fast, x


@pytest.mark.parametrize("kind, fmt", [(kind, fmt) for kind in ("linear", "conv")
                                       for fmt in ("csr", "coo", "bsr", "nm", "eie", "fkw")
                                       if (kind, fmt) != ("linear", "fkw")])  # (FKW holds a conv's kernel)
def test_func_grad_past_a_compressed_layer_and_its_clear_errors(kind, fmt):
    """A compressed layer (inference only) inside a torch.func transform: its
    product on an input the transform does not differentiate runs (its
    .numpy() failed on the transform's wrapped tensors: "Cannot access data
    pointer"), and the gradient of what follows equals torch.autograd's; a
    differentiated input is refused as autograd's is, a forward-mode tangent
    too (it would be dropped)."""
    fast, x = compressed(kind, fmt)
    feats = (lambda y: y) if kind == "linear" else (lambda y: y.feats)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad((feats(fast(x)) * scale).square().sum(), scale)
    got = torch.func.grad(lambda s: (feats(fast(x)) * s).square().sum())(scale.detach())
    assert torch.equal(got, want)
    with_feats = (lambda v: v) if kind == "linear" else x.with_feats
    with pytest.raises(RuntimeError, match="inference-only and cannot give a gradient"):
        torch.func.grad(lambda v: feats(fast(with_feats(v))).sum())(x if kind == "linear" else x.feats)
    with pytest.raises(RuntimeError, match="inference-only and cannot carry a forward-mode tangent"):
        v0 = x if kind == "linear" else x.feats
        torch.func.jvp(lambda v: feats(fast(with_feats(v))).sum(), (v0,), (torch.ones_like(v0),))
    with forward_ad.dual_level():
        v0 = x if kind == "linear" else x.feats
        dual = forward_ad.make_dual(v0, torch.ones_like(v0))
        with pytest.raises(RuntimeError, match="cannot carry a forward-mode tangent"):
            fast(with_feats(dual))


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
def test_forward_mode_through_bf16_inference_is_not_dropped(mode, grad):
    """A bfloat16 conv whose weights need no gradient ran its inference
    kernels on an input carrying a tangent and dropped it (no tangent; jvp
    gave zeros); the tangent now goes through the differentiated path: the
    conv of the tangent (the conv is linear in its input)."""
    torch.manual_seed(0)
    x = cloud(c=16)
    x = x.with_feats(x.feats.bfloat16())
    conv = ps.nn.Conv3d(16, 16, 3, bias=True).bfloat16().requires_grad_(False)
    tangent = torch.randn(x.feats.shape).bfloat16()
    with torch.no_grad():
        want = F.conv3d(x.with_feats(tangent.float()), conv.weight.float(), 3).feats
    with torch.enable_grad() if grad else torch.no_grad():
        if mode == "func.jvp":
            got = torch.func.jvp(lambda f: conv(x.with_feats(f)).feats, (x.feats,), (tangent,))[1]
        else:
            with forward_ad.dual_level():
                got = forward_ad.unpack_dual(conv(x.with_feats(forward_ad.make_dual(x.feats, tangent))).feats).tangent
    assert got is not None and got.abs().sum() > 0
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.05)


def test_a_compressed_layer_refuses_an_input_an_outer_transform_tracks():
    """jvp over x of grad over a later scale: inside the grad the compressed
    layer's input carries the jvp's tangent, which no inner level can see;
    running the product on its values would drop it silently. Refused, as
    is an input made inside the transform."""
    fast, x = compressed("conv", "csr")
    scale = torch.tensor(1.5, dtype=torch.float64)

    def inner(feats):
        return torch.func.grad(lambda s: (fast(x.with_feats(feats)).feats * s).square().sum())(scale)

    with pytest.raises(RuntimeError, match="cannot run on an input a torch.func transform tracks"):
        torch.func.jvp(inner, (x.feats,), (torch.ones_like(x.feats),))
    with pytest.raises(RuntimeError, match="cannot run on an input a torch.func transform tracks"):
        torch.func.grad(lambda s: (fast(x.with_feats(x.feats * 2)).feats * s).sum())(scale)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's own, setting up its jvp)
@pytest.mark.parametrize("case", ["strided3", "transposed", "unet"])
def test_maps_built_inside_a_transform_serve_later_transforms(case):
    """A map (and plan) built inside ``jvp(grad(...))`` is kept in the
    coordinate cache as plain tensors: a later transform's torch-ops conv on
    the same cache, and a call outside any transform, use it (its index
    tensors came out wrapped at the transform's level: torch's 'escaped'
    INTERNAL ASSERT in the next transform)."""
    m, x = layer(case)
    loss = loss_fn(m, x)
    params = params_of(m)
    ones = ({k: torch.ones_like(v) for k, v in params.items()}, torch.ones_like(x.feats))
    torch.func.jvp(torch.func.grad(loss, argnums=(0, 1)), (params, x.feats), ones)
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for kmap in x.cache.kmaps.values():
        assert not any(wrapped(t) for t in (kmap.in_idx, kmap.out_idx, kmap.sizes, kmap.out_coords, *kmap.indices()))
        assert not wrapped(kmap.offset_of_pairs())
    got = torch.func.jvp(torch.func.grad(torch_path(loss), argnums=1), (params, x.feats), ones)[1]
    expect = torch.func.jvp(torch.func.grad(loss, argnums=1), (params, x.feats), ones)[1]
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch_path(loss)(params, x.feats), loss(params, x.feats), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # (torch's own, setting up its jvp)
def test_jvp_and_per_sample_grads_through_minkunet():
    """A whole MinkUNet (eval: strided, transposed, residual and concatenated
    convs, BatchNorm): jvp in every parameter and the feats equals the torch
    ops' forward mode; per-sample gradients by vmap(grad) equal autograd's
    a sample at a time (to rounding: torch's own batching rules for the
    other layers sum in other orders; one conv's are bit for bit, above)."""
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    x = cloud(n=300, c=4, extent=12)
    net = MinkUNet(4, 3, cr=0.25).double().eval()
    params = params_of(net)
    fn = out_fn(net, x)
    tangents = random_tangents(params, x.feats, 10)
    out, tangent = torch.func.jvp(fn, (params, x.feats), tangents)
    ref_out, ref_tangent = torch.func.jvp(torch_path(fn), (params, x.feats), tangents)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-10, atol=1e-12)
    loss = loss_fn(net, x)
    batched = torch.stack([x.feats, x.feats.flip(0)])
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, batched)
    for i, f in enumerate(batched):
        expect = autograd_grads(loss, params, f)[0]
        for k in expect:
            torch.testing.assert_close(per_sample[k][i], expect[k], rtol=1e-10, atol=1e-12, msg=k)
