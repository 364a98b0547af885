"""The one backend policy (``pointsparse.backend``, ``POINTSPARSE_BACKEND``):
forcing "torch" reaches every module (the core is never called), and the
public ops give the same results on the torch path and on the core."""

from __future__ import annotations

import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse import coords as C
from pointsparse import formats
from pointsparse import kmap as km
from pointsparse.nn import functional as F
from reference import dense_conv, dense_conv_transpose, kmap_reference, random_coords


class _NoCore:
    """Stands in for the C++ core: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the core's {name} was called under the torch backend")


def _cloud(n=400, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 3, generator=g, dtype=dtype) * 6 - 2
    feats = torch.randn(n, 3, generator=g, dtype=dtype)
    feats[5, 1] = float("nan")  # max propagates NaN on both paths
    batch = torch.randint(0, 2, (n,), generator=g)
    return points, feats, batch


def _tensor(seed=0, c=3):
    coords = random_coords(300, 7, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=torch.float64), coords)


def _weight(volume, c_in, c_out, seed=2):
    return torch.randn(volume, c_in, c_out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _conv_chain(x, w_sub, w_down, w_up):
    """Submanifold, strided and transposed conv with gradients for feats and weights."""
    feats = x.feats.clone().requires_grad_()
    weights = [w.clone().requires_grad_() for w in (w_sub, w_down, w_up)]
    a = F.conv3d(x.with_feats(feats), weights[0], 3)
    b = F.conv3d(a, weights[1], 2, 2)
    c = F.conv3d(b, weights[2], 2, 2, transposed=True)
    c.feats.square().sum().backward()
    return [a.feats, b.feats, c.feats, b.coords, feats.grad, *(w.grad for w in weights)]


def _public_ops():
    """A representative run of the public ops; every result as a list of tensors."""
    points, feats, batch = _cloud()
    out = []
    coords = random_coords(300, 9, seed=3)
    layout = C.KeyLayout.of(coords)
    keys = C.pack(coords, layout)
    out += [keys, *C.unique(torch.cat([keys, keys[:50]])), C.unpack(keys, layout), *C.sort(keys)]
    for reduce in ("mean", "max", "sum", "first"):
        x, inverse = ps.voxelize(points, feats, 0.5, batch, reduce)
        out += [x.feats, x.coords, inverse]
    out += [ps.devoxelize(x, points=points, voxel_size=0.5, batch=batch, mode="trilinear")]
    for k, t in ((3, 1), (2, 2), (3, 2)):
        m = km.build(coords, k, t)
        out += [m.out_coords, m.in_idx, m.out_idx, m.sizes]
    x = _tensor()
    out += _conv_chain(x, _weight(27, 3, 4), _weight(8, 4, 5), _weight(8, 5, 4))
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    w[w.abs() < 0.8] = 0
    dense = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out += [formats.CSR.from_dense(w).matmul(dense), formats.BSR.from_dense(w, blocksize=(3, 3)).matmul(dense)]
    return out


def _assert_same(core, torch_path):
    assert len(core) == len(torch_path)
    for i, (a, b) in enumerate(zip(core, torch_path)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, msg=f"result {i}")
        else:
            assert torch.equal(a, b), f"result {i}"


def test_forced_torch_reaches_every_module_and_equals_the_core(monkeypatch):
    with ps.backend("core"):
        core = _public_ops()
    with monkeypatch.context() as patch:
        patch.setattr(_ext, "core", _NoCore())
        with ps.backend("torch"):
            torch_path = _public_ops()
    _assert_same(core, torch_path)


def test_environment_variable_forces_the_torch_path(monkeypatch):
    auto = _public_ops()
    monkeypatch.setenv("POINTSPARSE_BACKEND", "torch")
    assert ps.get_backend() == "torch"
    with monkeypatch.context() as patch:
        patch.setattr(_ext, "core", _NoCore())
        torch_path = _public_ops()
    with ps.backend("auto"):  # the call's setting wins over the environment
        assert ps.get_backend() == "auto"
    _assert_same(auto, torch_path)


def test_the_torch_path_matches_naive_references():
    coords = random_coords(200, 6, seed=7)
    with ps.backend("torch"):
        m = km.build(coords, 3, 2)
        x = _tensor(seed=5)
        w, w_up = _weight(8, 3, 4), _weight(8, 4, 3, seed=3)
        down = F.conv3d(x, w, 2, 2)
        up = F.conv3d(down, w_up, 2, 2, transposed=True)
    out_coords, in_idx, out_idx, sizes = kmap_reference(coords, 3, 2)
    for name, ref in (("out_coords", out_coords), ("in_idx", in_idx), ("out_idx", out_idx), ("sizes", sizes)):
        assert torch.equal(getattr(m, name), torch.as_tensor(ref, dtype=getattr(m, name).dtype)), name
    torch.testing.assert_close(down.feats, dense_conv(x, w, down.coords, 2, 2))
    torch.testing.assert_close(up.feats, dense_conv_transpose(down, w_up, x.coords, 2, 2))


def test_backend_setting_nests_and_restores():
    assert ps.get_backend() == "auto"
    with ps.backend("torch"):
        with ps.backend("core"):
            assert ps.get_backend() == "core"
        assert ps.get_backend() == "torch"
    assert ps.get_backend() == "auto"
    setting = ps.backend("torch")  # without `with`: until changed
    try:
        assert ps.get_backend() == "torch" and repr(setting) == "pointsparse.backend('torch')"
    finally:
        setting.__exit__(None, None, None)
    assert ps.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["gpu", "", 3, None])
def test_bad_backend_is_a_value_error_naming_it(bad, monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        ps.backend(bad)
    assert ps.get_backend() == "auto"
    monkeypatch.setenv("POINTSPARSE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="POINTSPARSE_BACKEND must be one of"):
        ps.get_backend()


def test_forced_core_refuses_what_the_core_cannot_take():
    x = _tensor()
    w = _weight(27, 3, 4)
    with ps.backend("core"):
        with pytest.raises(ValueError, match="backend 'core' is in force"):
            km.default_method("meta")
        points, feats, _ = _cloud()
        with pytest.raises(ValueError, match="float32 or torch.float64"):
            ps.voxelize(points, feats.half(), 0.5)
        # an fp16 conv the core takes on its values widened (stop 75: in inference too, as in training)
        half = F.conv3d(ps.SparseTensor(x.feats.half(), x.coords), w.half(), 3).feats
    wide = F.conv3d(ps.SparseTensor(x.feats.half().float(), x.coords), w.half().float(), 3).feats
    assert half.dtype == torch.float16 and torch.equal(half, wide.half())
    # the default policy takes the same path
    assert torch.equal(F.conv3d(ps.SparseTensor(x.feats.half(), x.coords), w.half(), 3).feats, half)


def _fresh_and_cached_under_inference_mode(backend, run, leaves):
    """``run(x, leaves)``'s output and the leaves' gradients of a square
    loss on a fresh tensor, and on one whose maps ``run`` first cached under
    torch.inference_mode: they must be equal."""
    results = []
    with ps.backend(backend):
        for first_in_inference in (False, True):
            x = _tensor()
            if first_in_inference:
                with torch.inference_mode():
                    run(x, leaves)
            grads = [t.detach().clone().requires_grad_(True) for t in leaves]
            out = run(x, grads)
            out.feats.square().sum().backward()
            results.append([out.feats.detach(), *(t.grad for t in grads)])
    for fresh, cached in zip(*results):
        assert torch.equal(fresh, cached)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_maps_built_under_inference_mode_then_trained_on(backend):
    """A tensor first run under torch.inference_mode and then trained on:
    its cached maps' pairs were inference tensors, which the torch path's
    index_add_ and indexing save for backward ('Inference tensors cannot be
    saved for backward'); the outputs and gradients are those of maps built
    fresh."""
    w = [_weight(27, 3, 4), _weight(8, 4, 5, seed=3), _weight(8, 5, 3, seed=4)]

    def chain(x, ws):
        b = F.conv3d(F.conv3d(x, ws[0], 3), ws[1], 2, 2)
        return F.conv3d(b, ws[2], 2, 2, transposed=True)

    _fresh_and_cached_under_inference_mode(backend, chain, w)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("pool", [F.max_pool3d, F.avg_pool3d])
def test_poolings_on_maps_built_under_inference_mode_then_trained_on(backend, pool):
    """As the convs': a pooling whose map was cached under
    torch.inference_mode and is then trained on took the map's inference
    tensors into autograd ('Inference tensors cannot be saved for
    backward'); the outputs and gradients are those of a map built fresh."""
    _fresh_and_cached_under_inference_mode(backend, lambda x, fs: pool(x.with_feats(fs[0]), 3, 2), [_tensor().feats])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_torch_path_sums_low_precision_products_in_float32(dtype):
    """bf16 / fp16 on the torch path (the CPU fallback, and where no core
    serves): each offset's product rounded once (its matmul's), summed in
    float32 and the sum rounded once, as the core's bf16 kernels and one
    matmul sum; a sum kept in the low precision rounded at every offset
    (on a k3 conv about twice the error against float64)."""
    coords = random_coords(300, 6, seed=3)
    g = torch.Generator().manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), 16, generator=g).to(dtype), coords)
    w = (torch.randn(27, 16, 16, generator=g) / 8).to(dtype)
    with ps.backend("torch"):
        out = F.conv3d(x, w, 3).feats
    kmap = km.get_kmap(x, 3)
    want = torch.zeros(kmap.num_out, 16)
    for o in range(27):
        in_idx, out_idx = kmap.pairs(o)
        want.index_add_(0, out_idx, (x.feats[in_idx] @ w[o]).float())
    assert out.dtype == dtype and torch.equal(out, want.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_torch_path_sums_low_precision_input_gradients_in_float32(dtype):
    """Training in bf16 / fp16 on the torch path (the CPU runs no bf16
    gradient in the core): the input gradient's per-offset products
    (``grad[out_idx] @ W[o].T``, each rounded once by its matmul) are summed
    in float32 and the sum rounded once, as the forward sums; autograd
    summed the offsets' gradients in the low precision, rounding at every
    offset (on a k3 conv about four times the forward's error against
    float64)."""
    coords = random_coords(300, 6, seed=3)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(coords), 16, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(27, 16, 16, generator=g) / 8).to(dtype)
    x = ps.SparseTensor(feats, coords)
    grad = torch.randn(len(coords), 16, generator=g).to(dtype)
    with ps.backend("torch"):
        F.conv3d(x, w, 3).feats.backward(grad)
    kmap = km.get_kmap(x, 3)
    want = torch.zeros(len(coords), 16)
    for o in range(27):
        in_idx, out_idx = kmap.pairs(o)
        want.index_add_(0, in_idx, (grad[out_idx] @ w[o].t()).float())
    assert feats.grad.dtype == dtype and torch.equal(feats.grad, want.to(dtype))


def test_a_core_call_out_of_memory_names_the_function():
    """A kernel map of kernel 32 over a dense 40^3 cube (about 1e9 pairs)
    ended in C++'s bare 'MemoryError: std::bad_alloc', naming nothing: the
    core's calls name the function and what to shrink."""
    from pointsparse import _ext

    def kmap_mergesort(*args):
        raise MemoryError("std::bad_alloc")

    with pytest.raises(MemoryError, match=r"the C\+\+ core's kmap_mergesort ran out of memory \(std::bad_alloc\): "
                                          r".*use fewer points or sites, a smaller kernel or fewer channels"):
        _ext.call(kmap_mergesort, 1, 2)
