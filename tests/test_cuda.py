"""The path for any device (torch ops; the C++ core takes CPU tensors only)
on a CUDA GPU, against the C++ core on the CPU in float64: tensors,
voxelize / devoxelize, kernel maps, every layer, MinkUNet and SPVCNN forward
and backward, pruned convs (masked offsets, masked vectors), the channel
graph's cut, spatial pruning, fusing, checkpoints; compress and export say
clearly that they run on the CPU.

Each test runs on "cuda" (skipped without a CUDA device) and on "cpu-torch"
(the CPU under ``backend("torch")``), so that CI runs the same comparisons
for the torch path on the CPU; the reference is always the C++ core."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import pointsparse as ps
from pointsparse import kmap as km
from pointsparse.nn import functional as F
from reference import random_coords

DEVICES = [pytest.param("cpu", id="cpu-torch"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device under test; on the CPU the torch path is forced for the
    code under test, and :func:`core` runs the reference on the C++ core."""
    if request.param == "cpu":
        with ps.backend("torch"):
            yield torch.device("cpu")
    else:
        yield torch.device("cuda")


def core(fn, *args, **kwargs):
    """``fn`` run with the C++ core serving every CPU op."""
    with ps.backend("core"):
        return fn(*args, **kwargs)


def make(n=400, c=4, extent=8, seed=0, dtype=torch.float64):
    coords = random_coords(n, extent, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=dtype), coords)


def leaf(t, device=None):
    """A fresh leaf copy of ``t`` (on ``device``) that requires a gradient."""
    return t.detach().clone().to(device).requires_grad_()


def close(got, want, tol=1e-10):
    torch.testing.assert_close(got.detach().cpu(), want.detach().cpu(), rtol=tol, atol=tol)


def grads(module):
    return {n: p.grad.detach().cpu().clone() for n, p in module.named_parameters() if p.grad is not None}


def test_tensor_moves_and_dense(device):
    x = make()
    y = x.to(device)
    assert y.feats.device.type == device.type and y.coords.device.type == device.type
    assert torch.equal(y.coords.cpu(), x.coords) and torch.equal(y.feats.cpu(), x.feats)
    close(y.dense(), core(x.dense))
    z = y.with_feats(y.feats * 2)
    assert z.cache is y.cache and torch.equal(z.cpu().feats, x.feats * 2)
    a, b = make(seed=3), make(seed=4)
    both = ps.collate([a.to(device), b.to(device)])
    want = core(ps.collate, [a, b])
    assert both.coords.device.type == device.type
    assert torch.equal(both.coords.cpu(), want.coords) and torch.equal(both.feats.cpu(), want.feats)


@pytest.mark.parametrize("reduce", ["mean", "max", "sum"])
def test_voxelize_and_devoxelize(device, reduce):
    g = torch.Generator().manual_seed(0)
    points = torch.rand(3000, 3, generator=g, dtype=torch.float64) * 6 - 3
    feats = torch.randn(3000, 5, generator=g, dtype=torch.float64)
    batch = (torch.arange(3000) >= 1700).long()
    want, want_inv = core(ps.voxelize, points, feats, voxel_size=0.4, batch=batch, reduce=reduce)
    f = leaf(feats, device)
    got, inv = ps.voxelize(points.to(device), f, voxel_size=0.4, batch=batch.to(device), reduce=reduce)
    assert got.coords.device.type == device.type and inv.device.type == device.type
    assert torch.equal(got.coords.cpu(), want.coords) and torch.equal(inv.cpu(), want_inv)
    close(got.feats, want.feats)
    # gradients through voxelize and back to the points
    back = ps.devoxelize(got, inv)
    close(back, want.feats[want_inv])
    tri = ps.devoxelize(got, points=points.to(device), voxel_size=0.4, batch=batch.to(device), mode="trilinear")
    want_tri = core(ps.devoxelize, want, points=points, voxel_size=0.4, batch=batch, mode="trilinear")
    close(tri, want_tri)
    (back.square().sum() + tri.sum()).backward()
    fc = leaf(feats)
    w, wi = core(ps.voxelize, points, fc, voxel_size=0.4, batch=batch, reduce=reduce)
    core(lambda: (ps.devoxelize(w, wi).square().sum() + ps.devoxelize(
        w, points=points, voxel_size=0.4, batch=batch, mode="trilinear").sum()).backward())
    close(f.grad, fc.grad)


@pytest.mark.parametrize("k,t,d", [(3, 1, 1), (3, 1, 2), (2, 2, 1), (3, 2, 1), (5, 1, 1), ((3, 1, 3), 1, 1)])
def test_kernel_maps(device, k, t, d):
    coords = random_coords(2000, 12, seed=5)
    want = core(km.build, coords, k, t, d, method="mergesort")
    got = km.build(coords.to(device), k, t, d)
    assert got.out_coords.device.type == device.type
    assert torch.equal(got.out_coords.cpu(), want.out_coords)
    for o in range(want.kernel_volume):
        a, b = got.pairs(o), want.pairs(o)
        assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])


@pytest.mark.parametrize("k,t,d,bias", [(3, 1, 1, True), (3, 1, 2, False), (2, 2, 1, True), (3, 2, 1, False),
                                         ((1, 3, 3), 1, 1, False)])
def test_conv_and_its_transpose_forward_backward(device, k, t, d, bias):
    x = make(c=5)
    torch.manual_seed(0)
    conv = ps.nn.Conv3d(5, 6, k, t, d, bias=bias).double()
    up = ps.nn.Conv3d(6, 3, k, t, d, bias=bias, transposed=True).double() if t > 1 else None

    def run(net, up, inp):
        feats = leaf(inp.feats)
        y = net(inp.with_feats(feats))
        z = up(y) if up is not None else y
        (z.feats * torch.linspace(-1, 1, z.feats.shape[1], dtype=z.feats.dtype, device=z.feats.device)).sum().backward()
        return z, feats.grad

    want, want_gx = core(run, conv, up, x)
    conv_d, up_d = copy.deepcopy(conv).to(device), (copy.deepcopy(up).to(device) if up is not None else None)
    got, gx = run(conv_d, up_d, x.to(device))
    assert torch.equal(got.coords.cpu(), want.coords)
    close(got.feats, want.feats)
    close(gx, want_gx)
    for name, g in grads(conv).items():
        close(dict(conv_d.named_parameters())[name].grad, g)
    if up is not None:
        for name, g in grads(up).items():
            close(dict(up_d.named_parameters())[name].grad, g)


def test_conv_gradcheck(device):
    x = make(n=60, c=2, extent=4).to(device)
    w = torch.randn(27, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    feats = leaf(x.feats)
    assert torch.autograd.gradcheck(lambda f, w: F.conv3d(x.with_feats(f), w, 3).feats, (feats, w))
    w2 = torch.randn(8, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: F.conv3d(x.with_feats(f), w, 2, 2).feats, (feats, w2))


def test_layers(device):
    x = make(c=4)
    torch.manual_seed(1)
    layers = [ps.nn.MaxPool3d(2, 2), ps.nn.AvgPool3d(3, 2), ps.nn.GlobalAvgPool(), ps.nn.GlobalMaxPool(),
              ps.nn.BatchNorm(4).double(), ps.nn.Linear(4, 3).double()]
    for layer in layers:
        feats = leaf(x.feats)
        want = core(layer, x.with_feats(feats))
        w = want.feats if isinstance(want, ps.SparseTensor) else want
        core(lambda: w.square().sum().backward())
        moved = copy.deepcopy(layer).to(device)
        fd = leaf(x.feats, device)
        got = moved(x.to(device).with_feats(fd))
        g = got.feats if isinstance(got, ps.SparseTensor) else got
        close(g, w)
        g.square().sum().backward()
        close(fd.grad, feats.grad)


def _models():
    from pointsparse.models import SPVCNN, MinkUNet

    return {"minkunet": MinkUNet, "spvcnn": SPVCNN}


def _scan(seed=0, n=2500):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 3, generator=g, dtype=torch.float64) * 10
    batch = (torch.arange(n) >= n // 2).long()
    feats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    x, inverse = core(ps.voxelize, points, feats, voxel_size=0.5, batch=batch)
    return x, inverse, points / 0.5, batch  # SPVCNN's points: in voxel units


def _run_model(net, name, x, inverse, points, batch):
    out = net(x) if name == "minkunet" else net(x, inverse, points, batch)
    logits = out.feats if isinstance(out, ps.SparseTensor) else out
    (logits * torch.linspace(-1, 1, logits.shape[1], dtype=logits.dtype, device=logits.device)).sum().backward()
    return logits


@pytest.mark.parametrize("name", ["minkunet", "spvcnn"])
def test_models_forward_backward(device, name):
    scan = _scan()
    torch.manual_seed(0)
    net = _models()[name](4, 5, cr=0.25, blocks=1).double()
    if name == "spvcnn":
        net.dropout.p = 0.0  # (the devices draw other masks)
    moved = copy.deepcopy(net).to(device)
    want = core(_run_model, net, name, *scan)
    got = _run_model(moved, name, *(t.to(device) for t in scan))
    close(got, want, 1e-9)
    ref = grads(net)
    mine = grads(moved)
    assert ref.keys() == mine.keys() and len(ref) == len(list(net.parameters()))
    for key in ref:
        close(mine[key], ref[key], 1e-9)
    # the running statistics BatchNorm kept
    for (key, a), (_, b) in zip(net.state_dict().items(), moved.state_dict().items()):
        close(b, a, 1e-9)


def test_model_float32_and_eval(device):
    from pointsparse.models import MinkUNet

    x = _scan()[0]
    torch.manual_seed(0)
    net = MinkUNet(4, 5, cr=0.25, blocks=1).eval()
    want = core(lambda: net(x.to(torch.float32)).feats)
    with torch.no_grad():
        got = copy.deepcopy(net).to(device)(x.to(device).to(torch.float32)).feats
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want.detach(), rtol=1e-4, atol=1e-4)


def test_masked_offsets_and_vectors(device):
    """A conv pruned by masks (whole offsets, vectors of input channels) gives
    the masked weight's output, and no gradient reaches masked entries."""
    x = make(c=8)
    torch.manual_seed(2)
    conv = ps.nn.Conv3d(8, 8, 3).double()
    moved = copy.deepcopy(conv).to(device)
    mask = torch.ones_like(conv.weight)
    mask[::2] = 0
    mask[1, :4] = 0
    ps.prune.custom_from_mask(conv, "weight", mask)
    ps.prune.custom_from_mask(moved, "weight", mask.to(device))
    want = core(_run_model, conv, "minkunet", x, None, None, None)
    got = _run_model(moved, "minkunet", x.to(device), None, None, None)
    close(got, want)
    g = moved.weight_orig.grad.cpu()
    close(g, conv.weight_orig.grad)
    assert torch.all(g[mask == 0] == 0)


def test_channel_graph_cut(device):
    from pointsparse.models import MinkUNet
    from pointsparse.prune import graph as G

    x = _scan()[0]
    torch.manual_seed(0)
    net = MinkUNet(4, 5, cr=0.25, blocks=1).double().eval()
    moved = copy.deepcopy(net).to(device)
    xd = x.to(device)
    graph = G.DependencyGraph(moved, xd)
    ref_graph = core(G.DependencyGraph, net, x)
    assert [g.name for g in graph.groups] == [g.name for g in ref_graph.groups]
    keep = {g.name: torch.arange(0, g.size, 2) for g in graph.groups[:6]}
    graph.mask(keep)
    with torch.no_grad():
        masked = moved(xd).feats
    graph.cut(keep)
    with torch.no_grad():
        cut = moved(xd).feats
    core(ref_graph.cut, keep)
    with torch.no_grad():
        want = core(lambda: net(x).feats)
    close(cut, masked, 1e-9)
    close(cut, want, 1e-9)
    assert all(p.device.type == device.type for p in moved.parameters())


def test_channel_surgery_reconstruction(device):
    """apply_channel_ratios(reconstruct=True) on the device: the least
    squares' ridge term was made on the CPU (torch.eye without a device),
    which a GPU's Gram matrix cannot take. The refit (masks kept) gives what
    the C++ core gives on the CPU."""
    from pointsparse.models import MinkUNet
    from pointsparse.prune import adapters, surgery

    x = _scan()[0]

    def masked_net():
        torch.manual_seed(0)
        net = MinkUNet(4, 5, cr=0.25, blocks=1).double().eval()
        for m in net.modules():
            if adapters.is_layer(m):
                ps.prune.l1_unstructured(m, "weight", amount=0.5)
        return net

    net, moved = masked_net(), masked_net().to(device)
    ratios = {g.producer: 0.5 for g in surgery.channel_groups(net)[:4]}
    surgery.apply_channel_ratios(moved, ratios, reconstruct=True, calibration_input=x.to(device))
    core(surgery.apply_channel_ratios, net, ratios, reconstruct=True, calibration_input=x)
    for (name, got), want in zip(moved.state_dict().items(), net.state_dict().values()):
        close(got, want, 1e-7) if got.is_floating_point() else torch.testing.assert_close(got.cpu(), want)
    assert all(p.device.type == device.type for p in moved.parameters())


@pytest.mark.parametrize("score", ["magnitude", "learned"])
def test_voxel_prune(device, score):
    x = make(c=4)
    torch.manual_seed(3)
    layer = ps.nn.VoxelPrune(0.4, score=score, in_channels=4).double()
    conv = ps.nn.Conv3d(4, 3, 3).double()
    net = torch.nn.Sequential(layer, conv)
    feats = leaf(x.feats)
    want = core(net, x.with_feats(feats))
    core(lambda: want.feats.square().sum().backward())
    moved = copy.deepcopy(net).to(device)
    fd = leaf(x.feats, device)
    got = moved(x.to(device).with_feats(fd))
    assert torch.equal(got.coords.cpu(), want.coords)
    close(got.feats, want.feats)
    got.feats.square().sum().backward()
    close(fd.grad, feats.grad)
    for key, g in grads(net).items():
        close(dict(moved.named_parameters())[key].grad, g)
    # devoxelize after the stride-1 prune: zeros for the dropped voxels' points
    inverse = torch.arange(len(x)).flip(0)
    close(ps.devoxelize(got, inverse.to(device)), core(ps.devoxelize, want, inverse))


def test_fuse_for_inference(device):
    from pointsparse.models import MinkUNet
    from pointsparse.nn.fuse import fuse_for_inference

    x = _scan()[0]
    torch.manual_seed(0)
    net = MinkUNet(4, 5, cr=0.25, blocks=1).double()
    for m in net.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    net.eval()
    moved = copy.deepcopy(net).to(device)
    fused = fuse_for_inference(moved)
    assert all(p.device.type == device.type for p in fused.parameters())
    with torch.no_grad():
        want = core(lambda: net(x).feats)
        close(fused(x.to(device)).feats, want, 1e-9)


def test_checkpoint_round_trip_across_devices(device, tmp_path):
    from pointsparse.models import MinkUNet, load_model

    torch.manual_seed(0)
    net = MinkUNet(4, 5, cr=0.25, blocks=1).to(device)
    path = tmp_path / "m.pt"
    from pointsparse import checkpoint

    checkpoint.save(path, {"model": net.state_dict(), "config": {"model": "minkunet", "in_channels": 4,
                                                                  "classes": list("abcde"), "cr": 0.25, "blocks": 1}})
    loaded = load_model(path, map_location="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.cpu(), b)
    again = load_model(path, map_location=device)
    assert all(p.device.type == device.type for p in again.parameters())


def test_compress_and_export_of_a_model_on_the_device(device):
    """Formats and exported programs hold CPU tensors: a model on another
    device is refused with a ValueError naming the device and what to do
    (compress gave a CPU module that then refused the device's inputs);
    on the CPU both run and give the model's output."""
    from pointsparse import export

    x = make(c=4)
    torch.manual_seed(4)
    conv = ps.nn.Conv3d(4, 4, 3).double()
    moved = copy.deepcopy(conv).to(device)
    mask = torch.ones_like(conv.weight)
    mask[:13] = 0
    ps.prune.custom_from_mask(conv, "weight", mask)
    ps.prune.custom_from_mask(moved, "weight", mask.to(device))
    with torch.no_grad():
        want = core(lambda: conv(x).feats)
    if device.type != "cpu":
        with pytest.raises(ValueError, match=rf"compress runs on the CPU .* weight_orig is on {device.type}"):
            ps.formats.compress(moved, "csr")
        with pytest.raises(ValueError, match=rf"export writes CPU programs; the model's parameter weight_orig is on "
                                             rf"{device.type}"):
            export.export_model(moved.eval(), x.to(device))
        return
    with torch.no_grad():
        close(ps.formats.compress(moved, "csr")(x).feats, want)
    program = export.export_model(moved.eval(), x)
    close(program.module()(x.feats, x.coords), want)


@pytest.mark.parametrize("k,t,transposed", [(3, 1, False), (2, 2, False), (3, 2, False), (2, 2, True), (3, 2, True)])
def test_the_gpu_conv_gemm_equals_the_per_offset_sum(k, t, transposed):
    """The torch path on a GPU runs a conv as one product of scattered
    columns (``reference.conv_gemm``, a few launches) where the columns fit,
    else the per-offset loop: the same sums, forward and gradients, on the
    CPU here (float64), an empty map, a map built under inference_mode then
    used in training, and under autocast (the product's precision)."""
    from pointsparse.nn import reference

    x = make(c=5)
    kmap = km.get_kmap(x, k, t) if not transposed else km.get_kmap(x, k, t).transpose(x.coords)
    rows = kmap.num_in
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(rows, 5, generator=g, dtype=torch.float64)
    w = torch.randn(kmap.kernel_volume, 5, 3, generator=g, dtype=torch.float64)
    f1, w1, f2, w2 = leaf(feats), leaf(w), leaf(feats), leaf(w)
    a, b = reference.conv_gemm(f1, w1, kmap), reference.conv_sum(f2, w2, kmap)
    close(a, b, 1e-12)
    r = torch.randn(a.shape, generator=g, dtype=torch.float64)
    (a * r).sum().backward()
    (b * r).sum().backward()
    close(f1.grad, f2.grad, 1e-12)
    close(w1.grad, w2.grad, 1e-12)
    assert reference.gemm_fits(feats, kmap)
    empty = km.get_kmap(ps.SparseTensor(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.int32)),
                        3)
    assert reference.conv_gemm(torch.zeros(0, 5, dtype=torch.float64), w[:27] if k == 3 else w.new_zeros(27, 5, 3),
                               empty).shape == (0, 3)
    with torch.inference_mode():
        fresh = km.build(x.coords, 3)
    f3 = leaf(x.feats)
    reference.conv_gemm(f3, leaf(torch.randn(27, 5, 3, dtype=torch.float64)), fresh).sum().backward()
    assert f3.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = reference.conv_gemm(feats.float(), w.float(), kmap)
        wide = reference.conv_gemm(feats, w, kmap)  # (autocast casts float32 only)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), b.detach(), rtol=0.05, atol=0.1)
    assert wide.dtype == torch.float64 and torch.equal(wide, a.detach())
    # the columns made in bf16 (half the bytes): the product autocast would take of the float32 columns
    cols = reference.im2col(feats.float(), kmap).reshape(kmap.num_out, -1)
    assert torch.equal(low, cols.bfloat16() @ w.float().reshape(-1, 3).bfloat16())


def test_a_gpu_conv_too_large_for_columns_runs_per_offset(device, monkeypatch):
    """Past GEMM_COLUMN_BYTES the columns are not made: the per-offset loop
    runs, with the same result (on the CPU the torch path always loops)."""
    from pointsparse.nn import reference

    x = make(c=4)
    kmap = km.get_kmap(x, 3)
    assert reference.gemm_fits(x.feats, kmap)
    monkeypatch.setattr(reference, "GEMM_COLUMN_BYTES", kmap.num_out * 27 * 4 * 8 - 1)
    assert not reference.gemm_fits(x.feats, kmap)
    made = []
    monkeypatch.setattr(reference, "conv_gemm", lambda *a: made.append(1))  # (never called now)
    w = torch.randn(27, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    close(F.conv3d(x.to(device), w.to(device), 3).feats, core(lambda: F.conv3d(x, w, 3).feats))
    assert not made


@pytest.mark.parametrize("columns", [True, False])
def test_a_float64_conv_under_autocast_stays_float64(device, columns, monkeypatch):
    """torch.autocast casts float32 only: torch's matmuls and convs leave
    float64 alone under it. The torch path's per-offset loop gave a
    float64 conv's sum rounded to autocast's bf16 (the GPU's one product,
    a float64 matmul, did not): every row of the path now float64, equal to
    the C++ core's sum."""
    from pointsparse.nn import reference

    if not columns:  # (the per-offset loop on a GPU too)
        monkeypatch.setattr(reference, "GEMM_COLUMN_BYTES", 0)
    x = make(c=5)
    torch.manual_seed(0)
    conv = ps.nn.Conv3d(5, 6, 3, bias=True).double()
    want = core(lambda: conv(x).feats)
    moved = copy.deepcopy(conv).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = moved(x.to(device)).feats
    assert got.dtype == torch.float64
    close(got, want)
